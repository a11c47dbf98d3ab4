"""Claim GPUs that no other run on this machine holds (`train.devices: free` or `free:N`).

`dvc queue start -j 4` runs four experiments side by side, and with `train.devices: all` each
one takes every GPU: they fight over memory and time. DVC has no GPU scheduling (nor do
Lightning or Accelerate), so a run claims its GPUs itself: an exclusive fcntl lock on one file
per GPU, named by the GPU's UUID, in a folder every run on the machine shares. The kernel drops
a process's locks when it exits, however it exits (a crash, SIGKILL, the out-of-memory killer),
so a claim can never outlive its run and there is nothing to clean up. A run that finds too few
free GPUs says so once and waits. Written by hand because no library does it; the standard
library's fcntl is all it takes.

The folder is `/tmp/stages-gpu-locks` (one per machine, for every user), or $STAGES_GPU_LOCK_DIR.
Each lock file holds the pid of the run that holds it, so a waiting run can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

LOCK_DIR_ENV = "STAGES_GPU_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/stages-gpu-locks"  # fixed, not $TMPDIR: every run on the machine must meet here
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Gpu:
    id: int  # torch's index in this process (after CUDA_VISIBLE_DEVICES)
    uuid: str  # the same in every process, whatever its CUDA_VISIBLE_DEVICES: what a lock is named by


@dataclass
class GpuClaim:
    gpus: list[Gpu]
    lock_dir: Path
    waited_seconds: float = 0.0
    _fds: list[int] = field(default_factory=list, repr=False)

    @property
    def ids(self) -> list[int]:
        return [g.id for g in self.gpus]

    def record(self) -> dict:
        """What run.json keeps of the claim."""
        return {"gpus": [{"id": g.id, "uuid": g.uuid} for g in self.gpus], "lock_dir": str(self.lock_dir),
                "waited_seconds": round(self.waited_seconds, 1)}

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing the file drops this process's lock on it
        self._fds.clear()

    def __enter__(self) -> GpuClaim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def visible_gpus() -> list[Gpu]:
    if not torch.cuda.is_available():
        return []
    return [Gpu(i, f"GPU-{torch.cuda.get_device_properties(i).uuid}") for i in range(torch.cuda.device_count())]


def lock_dir() -> Path:
    """The machine-wide folder of lock files, made world-writable (sticky, like /tmp) on first use."""
    path = Path(os.environ.get(LOCK_DIR_ENV) or DEFAULT_LOCK_DIR)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        try:
            path.chmod(0o1777)  # other users' runs must be able to create their lock files here
        except OSError:
            pass  # another user made it first
    return path


def try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on `path`, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as exc:
        raise UserError(f"cannot open the GPU lock file {path}: {exc.strerror}; set {LOCK_DIR_ENV} to a folder "
                        "every run on this machine can write") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    try:
        os.fchmod(fd, 0o666)  # the umask narrowed it; the next holder may be another user
    except OSError:
        pass
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as its file says (only read files this process does not hold:
    closing any descriptor of a file drops this process's fcntl lock on it)."""
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another run"
    return f"pid {pid}" if pid.isdigit() else "another run"


def claim_gpus(count: int, log: Callable[[str], None] = print, poll_seconds: float = POLL_SECONDS) -> GpuClaim:
    """Lock `count` GPUs that no other run holds, waiting (and saying so once) until there are enough."""
    gpus = visible_gpus()
    if count > len(gpus):
        raise UserError(f"train.devices asks for {count} free GPU(s) but only {len(gpus)} CUDA device(s) are "
                        "visible; ask for fewer, or use 'all' or a count")
    folder = lock_dir()
    started = time.monotonic()
    announced = False
    while True:
        held: list[tuple[Gpu, int]] = []
        for gpu in gpus:
            fd = try_lock(folder / f"{gpu.uuid}.lock")
            if fd is not None:
                held.append((gpu, fd))
                if len(held) == count:
                    claim = GpuClaim([g for g, _ in held], folder, time.monotonic() - started)
                    claim._fds = [fd for _, fd in held]
                    return claim
        # All or nothing: two runs that each held part of what they need would wait for each other for ever.
        for _, fd in held:
            os.close(fd)
        if not announced:
            taken = [f"GPU {g.id} by {holder(folder / f'{g.uuid}.lock')}" for g in gpus
                     if g not in [h for h, _ in held]]
            log(f"waiting for {count} free GPU{'s' if count > 1 else ''}: {len(gpus) - len(taken)} of {len(gpus)} "
                f"free ({', '.join(taken)} held); locks in {folder}")
            announced = True
        time.sleep(poll_seconds)
