"""Start the DDP ranks of one machine with torch's elastic launcher, the engine torchrun is.

`python -m stages train` with `train.strategy: ddp` and the probe stage's DDP points start their
ranks here, in one way: each rank reruns the same command (`python -m stages <command> ...`) and
finds the plan its launching command made in one environment variable (`launched_plan`). So one
machine and many run the same code under the same agent, with its failure handling and restarts:
when a rank dies, the agent stops the others and, while `max_restarts` allows, starts the whole
group again (the train stage then resumes from its last checkpoint). Each launch gets its own
rendezvous port (c10d on 127.0.0.1:0: the OS picks a free one), so experiments running side by
side never meet. A failure that ends the launch becomes one line naming the rank, how it died and
what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import UserError, first_line
from . import rank_status
from .distributed import (
    DistContext,
    PeerLost,
    RefusedOnEveryRank,
    collective_device,
    collective_errors,
    init_distributed,
    shutdown_distributed,
)

PLAN_ENV = "STAGES_LAUNCH"  # the plan a command gives the ranks it starts (JSON): devices, claim, probe point


class Stopped(UserError):
    """The launch was stopped by a signal (Ctrl-C, SIGTERM): the caller may add what was kept."""


def launched_plan() -> dict | None:
    """The plan the command that started this rank gave it (`launch_ranks(plan=...)`); None for a
    rank that torchrun started, where no command of ours ran before the ranks."""
    return json.loads(os.environ[PLAN_ENV]) if PLAN_ENV in os.environ else None


def run_as_rank(accelerator: str, timeout_s: float,
                body: Callable[[DistContext, rank_status.RestartReport | None], None]) -> None:
    """Be one DDP rank, started by torchrun or by `launch_ranks` (the train and probe stages' ranks alike):
    join the group, learn whether this is a restart of it (and who died), run `body(ctx, restart)`, and
    leave a record of how it ended, which the launcher reads (`failure_line`)."""
    launched = launched_plan() is not None
    status = rank_status.start_rank_status()
    try:
        ctx = init_distributed(accelerator, timeout_s, on_give_up=lambda m: status.end("error", m))
        with collective_errors(ctx, timeout_s):
            body(ctx, rank_status.restart_report(ctx, collective_device()))
    except PeerLost as exc:  # a consequence: the launcher names the rank that failed
        status.end("peer-lost", str(exc))
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except UserError as exc:
        status.end("refused", str(exc))  # our launcher prints this message, once (failure_line)
        refuse_once(exc, launched)
    except BaseException as exc:
        status.end("error", first_line(exc))
        raise
    else:
        status.end("done")
        status.remove()
    finally:
        shutdown_distributed()


def refuse_once(exc: UserError, launched: bool) -> None:
    """End a DDP rank with a refusal said once, not once per rank: under our own launcher no rank says it
    (the launcher prints the failed rank's message); under torchrun rank 0 says a refusal that every rank
    reaches alike, and each rank its own. Exit code 2, as the CLI's for any refusal."""
    if launched or (isinstance(exc, RefusedOnEveryRank) and os.environ.get("RANK", "0") != "0"):
        raise SystemExit(2) from None
    raise exc


def launch_ranks(module: str, argv: list[str], nproc: int, max_restarts: int, timeout_s: float,
                 plan: dict | None = None, env: dict[str, str] | None = None) -> None:
    """Run `python -m MODULE ARGV` as `nproc` DDP ranks on this machine and wait for them; each
    rank reads `plan` with `launched_plan()`, and `env` is added to the ranks' environment.
    Raises UserError when the group fails for good."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="stages-ddp-") as tmp:  # else torch leaves /tmp/torchelastic_* behind
        status_dir = Path(tmp) / "ranks"
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"stages-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0",  # port 0: a free port of its own per launch
            rdzv_configs={"join_timeout": int(timeout_s)},  # c10d reads join_timeout ("timeout" is ignored)
            max_restarts=max_restarts,  # LaunchConfig's default is 3, torchrun's 0
            monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp) / "logs")))
        ranks_env = {
            **(env or {}),
            **({PLAN_ENV: json.dumps(plan)} if plan is not None else {}),
            # The agent then gives each attempt a fresh store hosted by rank 0, instead of sharing its
            # own across restarts, which in torch 2.5+ makes about half of all restarts fail or hang
            # (pytorch/pytorch#135712).
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            rank_status.STATUS_DIR_ENV: str(status_dir),
            # c10d's C++ warnings (socket timeouts while a peer goes away) repeat what the ranks say.
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
        }
        with environment(ranks_env), agent_logs(status_dir), own_signal_handlers():
            try:
                elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
            except ChildFailedError as exc:
                raise UserError(failure_line(exc.failures, status_dir, max_restarts)) from None
            except SignalException as exc:
                # Ctrl-C reaches the ranks too: rank 0's own line says where it stopped (the train stage's
                # epoch and the checkpoint kept).
                said = rank0_refusal(rank_status.records(status_dir) if status_dir.is_dir() else {})
                name = signal.Signals(exc.sigval).name
                if said:
                    raise UserError(said) from None
                raise Stopped(f"stopped by {name}; the ddp ranks were stopped too") from None
            except RendezvousTimeoutError:  # raised with no message of its own
                raise UserError(f"the {nproc} ddp ranks did not all start within {timeout_s:g} s "
                                "(train.dist_timeout)") from None


@contextlib.contextmanager
def own_signal_handlers():
    """Give back the signal handlers torch's agent replaces: it makes SIGTERM, SIGINT, SIGHUP and SIGQUIT
    raise an exception in this process and never restores them, which would outlive the launch in a
    caller that goes on (a test, the probe stage) and in every process it forks later."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    saved = {sig: signal.getsignal(sig) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():  # where the agent set them
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def failure_line(failures: dict, status_dir: Path, max_restarts: int) -> str:
    """The rank that failed on its own (the agent lists the ranks it stopped with SIGTERM too), how,
    with the memory it had, and what to do."""
    known = rank_status.records(status_dir) if status_dir.is_dir() else {}
    said = rank0_refusal(known)
    if said:  # rank 0 refused (bad params, data or files, Ctrl-C): its own one line says it all
        return said
    described = {}
    for rank, failure in failures.items():
        record = dict(known.get(failure.pid, {"rank": rank, "pid": failure.pid}))
        record["exitcode"] = failure.exitcode
        described[rank] = (record, failure)
    rank, (record, failure) = min(described.items(), key=lambda kv: (not rank_status.is_cause(kv[1][0]),
                                                                      kv[1][1].timestamp, kv[0]))
    if record.get("ended") == "refused":  # a refusal (bad params, data or files): its own one line says it all
        return record["message"]
    line = rank_status.describe(record)
    if failure.exitcode == -signal.SIGKILL:
        line += ("; if the kernel's log (dmesg) names the out-of-memory killer, lower train.batch_size (or "
                 "train.devices: fewer ranks share the memory)")
    elif record.get("ended") != "error":
        line += "; its output above says why"
    if max_restarts:
        line += f" (after {max_restarts} restart{'s' if max_restarts > 1 else ''} of the group)"
    elif failure.exitcode < 0:
        line += "; train.max_restarts: 1 restarts the group from the last epoch's checkpoint"
    return line


def rank0_refusal(known: dict[int, dict]) -> str | None:
    """The refusal rank 0 ended with (the line it says when it runs alone), or None."""
    zeros = sorted((r for r in known.values() if r.get("rank") == 0), key=lambda r: r.get("attempt", 0))
    last = zeros[-1] if zeros else {}  # the latest attempt's rank 0 (the group may have been restarted)
    return last["message"] if last.get("ended") == "refused" and last.get("message") else None


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (the agent passes this process's environment on)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ExitNoter(logging.Handler):
    """The agent logs "failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s" each time the group
    fails, before it restarts it: note the exit code in that rank's status file, where the restarted
    rank 0 reads it (a process killed by a signal cannot write its own)."""

    def __init__(self, status_dir: Path):
        super().__init__(logging.ERROR)
        self.status_dir = status_dir

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("failed (exitcode") and isinstance(record.args, tuple) \
                and len(record.args) >= 3:
            exitcode, _, pid = record.args[:3]
            with contextlib.suppress(OSError, TypeError, ValueError):
                rank_status.note_exit(self.status_dir, int(pid), int(exitcode))


@contextlib.contextmanager
def agent_logs(status_dir: Path) -> Iterator[None]:
    """Silence the agent's own log lines (the ranks' output and our failure line say what matters),
    and listen for the failures it logs."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates the loggers)
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401

    names = [n for n in logging.root.manager.loggerDict
             if n.startswith("torch.distributed.elastic") or n == "torch.distributed.launcher.api"]
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    failures = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    failures.setLevel(logging.ERROR)
    failures.propagate = False
    noter = ExitNoter(status_dir)
    failures.addHandler(noter)
    try:
        yield
    finally:
        failures.removeHandler(noter)
        for name, (level, propagate) in saved.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate
