"""One train run per checkpoint: a second train command in the same workspace is refused.

Two runs writing the same checkpoint would each resume from, and overwrite, the other's epochs.
It happens after `kill -9` of dvc: the stage's process is not killed with it and trains on as an
orphan, and the next `dvc repro` (DVC clears its own dead lock) starts a second one beside it.
The lock is an exclusive fcntl lock on a file beside the checkpoint; the kernel drops it when
its process exits however it exits, so it never outlives its run. The file holds the pid of the
run that holds it, so the refusal can name it. (The standard library's fcntl is all it takes.)
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError


@contextmanager
def one_run_per_checkpoint(checkpoint: Path) -> Iterator[None]:
    """Hold the lock of `checkpoint`'s run for the duration; refuse in one line when another run holds it."""
    path = Path(checkpoint).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"another train run (pid {holder}) is writing {checkpoint}; wait for it or end it "
                            f"(`kill {holder}` keeps its last epoch's checkpoint), then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock
