"""What each DDP rank leaves behind: its pid, its memory while it ran, and how it ended.

A rank killed with SIGKILL (by the kernel's out-of-memory killer, by `kill -9`, or with its
machine) says nothing, and its memory figures die with it. So every rank keeps a small JSON
file up to date while it runs (pid, resident and peak memory, sampled twice a second by a
daemon thread) and writes how it ended: `done`, `error` with its message, or `peer-lost` when
its collective failed because another rank had gone. When one rank fails, the elastic agent
stops the others with SIGTERM; faulthandler's C-level handler leaves a mark for that (and the
signal still kills at once, where a Python handler would wait for the main thread). So after a
failure, a rank with neither an ending nor a SIGTERM mark is one that died without a word.

Readers: the launcher (`launch.py`) for its one-line failure report, which adds the exit code
the agent saw to the dead rank's file; and the restarted group, whose rank 0 says which rank
died before it resumes (`restart_report`).

The files live in a folder per launcher process on each machine: $STAGES_RANK_STATUS_DIR (our
launcher's temporary folder), else <tmp>/stages-ranks/<run id>-<launcher pid> under torchrun.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .distributed import DistContext, all_gather_json

STATUS_DIR_ENV = "STAGES_RANK_STATUS_DIR"
SAMPLE_SECONDS = 0.5


def status_dir() -> Path | None:
    """This machine's folder of rank records for this job; None for ranks no elastic agent started
    (RANK etc. set by hand): nobody restarts them, so nobody reads what they would leave."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if folder:
        return Path(folder)
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    # Ranks are children of their launcher (torchrun's agent): its pid tells this job from others.
    run_id = os.environ["TORCHELASTIC_RUN_ID"].replace("/", "_")
    return Path(tempfile.gettempdir()) / "stages-ranks" / f"{run_id}-{os.getppid()}"


def memory_mib() -> dict[str, float]:
    """This process's resident and peak resident memory (VmRSS, VmHWM) in MiB; {} where /proc has none."""
    found = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found["rss_mib" if key == "VmRSS" else "peak_mib"] = round(int(value.split()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return found


def write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # readers see the old record or the new one, never half of one


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RankStatus:
    """This process's record, kept up to date from `start()` until `end()` (nothing without a folder)."""

    def __init__(self, folder: Path | None, rank: int, attempt: int):
        self.folder, self.rank, self.attempt = folder, rank, attempt
        self.path = folder / f"rank{rank}.pid{os.getpid()}.json" if folder else None
        self.record = {"rank": rank, "pid": os.getpid(), "attempt": attempt, "started": time.time()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sigterm_file = None

    def start(self) -> RankStatus:
        if self.folder is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        self._sample()
        # Written by faulthandler from inside the signal handler; the signal then kills as before.
        self._sigterm_file = open(self.path.with_suffix(".sigterm"), "w")  # noqa: SIM115 (open until exit)
        faulthandler.register(signal.SIGTERM, file=self._sigterm_file, all_threads=False, chain=True)
        threading.Thread(target=self._sample_until_stopped, name="stages-rank-status", daemon=True).start()
        return self

    def _sample(self) -> None:
        with self._lock:
            if "ended" not in self.record:
                self.record.update(memory_mib(), sampled=time.time())
                write_record(self.path, self.record)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                self._sample()
            except OSError:
                return  # the folder is gone (the launcher cleaned up); nothing left to report to

    def end(self, outcome: str, message: str = "") -> None:
        """Record how this rank ended: "done", "error" or "refused" (a UserError; with its message) or "peer-lost"."""
        self._stop.set()
        with self._lock:
            if self.path is None or "ended" in self.record:
                return
            self.record.update(memory_mib(), ended=outcome, message=message.splitlines()[0] if message else "")
            try:
                write_record(self.path, self.record)
            except OSError:
                pass

    def remove(self) -> None:
        """A rank that finished cleanly leaves nothing behind."""
        if self.path is None:
            return
        faulthandler.unregister(signal.SIGTERM)
        if self._sigterm_file is not None:
            self._sigterm_file.close()
        for path in (self.path, self.path.with_suffix(".sigterm")):
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()  # the last rank out removes the folder
        except OSError:
            pass


def start_rank_status() -> RankStatus:
    """Start this DDP rank's record (RANK and TORCHELASTIC_RESTART_COUNT come from the launcher)."""
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return RankStatus(status_dir(), rank, attempt).start()


# --- reading what the ranks left ----------------------------------------------------------


def records(folder: Path) -> dict[int, dict]:
    """Every rank record in `folder` by pid, with `stopped` set where the agent's SIGTERM left its mark."""
    found = {}
    for path in sorted(folder.glob("rank*.pid*.json")):
        record = read_record(path)
        if record is not None:
            sigterm = path.with_suffix(".sigterm")
            record["stopped"] = sigterm.is_file() and sigterm.stat().st_size > 0
            record["path"] = str(path)
            found[record["pid"]] = record
    return found


def note_exit(folder: Path, pid: int, exitcode: int) -> None:
    """Add the exit code the launcher saw to a dead rank's record (its own process cannot)."""
    for path in folder.glob(f"rank*.pid{pid}.json"):
        record = read_record(path)
        if record is not None:
            record["exitcode"] = exitcode
            write_record(path, record)


def is_cause(record: dict) -> bool:
    """Did this rank fail on its own (rather than finish, lose a peer, or be stopped by the agent)?"""
    exitcode = record.get("exitcode")
    if exitcode is not None:
        return exitcode not in (0, -signal.SIGTERM) and record.get("ended") not in ("done", "peer-lost")
    return record.get("ended") not in ("done", "peer-lost") and not record.get("stopped")


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else "?"
        oom = ", as the kernel's out-of-memory killer does" if exitcode == -signal.SIGKILL else ""
        return f"was killed by signal {-exitcode} ({name}{oom})"
    return f"exited with code {exitcode}"


def describe(record: dict) -> str:
    """One rank's end in words, e.g. "ddp rank 1 (pid 4242) was killed by signal 9 (SIGKILL, as the
    kernel's out-of-memory killer does); it had 736 MiB resident (peak 740 MiB) when last sampled"."""
    who = f"ddp rank {record['rank']} (pid {record['pid']})"
    if record.get("ended") in ("error", "refused") and record.get("message"):
        how = f"failed: {record['message']}"
    elif record.get("exitcode") is not None:
        how = describe_exit(record["exitcode"])
    elif record.get("ended") is None:
        how = ("died without a word: killed by a signal it cannot catch (SIGKILL, as the kernel's out-of-memory "
               "killer sends), or its machine went down")
    else:
        how = f"ended ({record['ended']})"
    if "rss_mib" in record:
        how += (f"; it had {record['rss_mib']:,.0f} MiB resident (peak {record.get('peak_mib', 0):,.0f} MiB) "
                "when last sampled")
    return f"{who} {how}"


# --- after a restart: which ranks of the last attempt died --------------------------------


@dataclass
class RestartReport:
    attempt: int  # restarts so far (the highest TORCHELASTIC_RESTART_COUNT of the group)
    max_restarts: int
    lost: list[dict] = field(default_factory=list)  # records of the ranks that failed on their own

    @property
    def lost_ranks(self) -> str:
        return ", ".join(str(r["rank"]) for r in self.lost) or "?"


def restart_report(ctx: DistContext, device: torch.device) -> RestartReport | None:
    """On every rank (a collective): what the previous attempt of this group lost, or None when this
    is the group's first attempt. Each machine's local rank 0 reads that machine's records of ranks
    that are gone, then removes them."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    gone: list[dict] = []
    folder = status_dir()
    if ctx.local_rank == 0 and folder is not None and folder.is_dir():
        gone = [r for r in records(folder).values() if not pid_alive(r["pid"])]
    found = all_gather_json({"attempt": attempt, "lost": [r for r in gone if is_cause(r)]}, ctx, device)
    for record in gone:  # every rank has read the reports now
        for path in (Path(record["path"]), Path(record["path"]).with_suffix(".sigterm")):
            path.unlink(missing_ok=True)
    # Agents of a multi-machine job count restarts differently (a machine whose ranks were fine is
    # not "restarted"), so the group's attempt is the highest count.
    top = max(part["attempt"] for part in found)
    lost = sorted((r for part in found for r in part["lost"]), key=lambda r: r["rank"])
    if top == 0 and not lost:
        return None
    return RestartReport(top, int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")), lost)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
