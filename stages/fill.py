"""Filling the prepared split files from a source: the one writer prepare-data has for every source.

Each split's rows are cut into tasks of `rows.per_task` items; a task fills a buffer of rows from
the source (`Source.rows`: a copy for arrays, a decode per file for image folders) and writes it
into its place in the split file with `SplitWriter.write_rows`. Tasks that decode run on every
core, in forked processes that write their rows themselves: only a task's pixel counts and its
unreadable files come back, never the pixels. Rows of unreadable files are dropped, or refused
all together, once every task is in.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .console import cpu_count, progress_bar
from .errors import UserError
from .params import plural
from .prepared import ChannelStats, SplitWriter
from .sources import Rows

MAX_NAMED = 10  # unreadable files named in the one line that refuses them; all of them go to a file


@dataclass
class Job:
    """What every task reads: set before the decoders fork, so they inherit it instead of receiving it."""

    rows: Rows
    items: dict[str, tuple[str, np.ndarray]]  # split -> (the source's split, its items there, in row order)
    writers: dict[str, SplitWriter]


@dataclass(frozen=True)
class Task:
    split: str
    start: int  # the first row of the split this task fills
    stop: int


_job: Job | None = None
_buffers = threading.local()  # one rows buffer per decoder (process or thread), reused: a fresh 3 MB
# array per task would cost page faults and zeroing on every image


def fill_task(task: Task) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
    """Fill and write one task's rows; returns their pixel-value counts per channel (train split) and
    the unreadable items as (row, reason), whose rows are written as zeros."""
    writer = _job.writers[task.split]
    native, items = _job.items[task.split]
    n = task.stop - task.start
    buffer = getattr(_buffers, "rows", None)
    if buffer is None or buffer.shape[1:] != writer.shape or len(buffer) < n:
        buffer = _buffers.rows = np.empty((max(n, _job.rows.per_task), *writer.shape), dtype=np.uint8)
    out = buffer[:n]
    counts = np.zeros((writer.shape[0], 256), dtype=np.int64) if task.split == "train" else None
    bad = _job.rows.fill(native, items[task.start : task.stop], out, counts)
    for i, _ in bad:
        out[i] = 0
    writer.write_rows(task.start, out)
    return counts, [(task.start + i, reason) for i, reason in bad]


def ignore_interrupts() -> None:
    """Decoder processes leave Ctrl-C to the stage, which stops them, and die of the SIGTERM it stops them
    with: a handler inherited from the parent that raises instead (torch's elastic agent installs one)
    would be caught as an unreadable image by the decoder, which would go on and never exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def parallel_map(workers: int):
    """An ordered imap over `workers` decoders.

    Processes, not threads: decoding is Pillow's C code, but the Python around each image
    (EXIF, alpha, the copy into the row) holds the GIL. Measured on this project's 2-core
    machine with 160x120 JPEGs written into the split file: 2,800 images/s on two processes
    against 2,100 on two threads. Forked, so a decoder starts in milliseconds with everything
    already imported and the job inherited (spawn or forkserver would import everything again).
    Where fork is not the platform's way (macOS, Windows), threads; with one decoder, this process.
    """
    if workers <= 1:
        yield map
        return
    if sys.platform.startswith("linux"):
        with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process; the
            warnings.simplefilter("ignore", DeprecationWarning)  # decoders use no lock the threads hold
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=ignore_interrupts)
    else:
        pool = multiprocessing.pool.ThreadPool(workers)
    with pool:  # leaving it terminates the decoders: at once on an error
        yield pool.imap


def fill_splits(writers: dict[str, SplitWriter], rows: Rows, items: dict[str, tuple[str, np.ndarray]],
                skip_bad: bool, stats: ChannelStats) -> list[tuple[str, str]]:
    """Fill every split file with its items' rows; returns the skipped (name, reason), sorted by name. Without
    `skip_bad`, unreadable items are refused together once all are read, so a folder's bad files are all named
    by one run.

    One stream of tasks covers all splits (train first), so the decoders never wait between splits. Unreadable
    files are named sorted by path, not in split order: the split a file lands in depends on the seed and on
    the other files, and the files of one folder belong together in the warnings. When
    a split's last task is in, its unreadable rows are dropped while the decoders go on with the next
    split. Pixel values of the train split are counted on the way, for mean/std. The files are flushed
    to disk when they are committed, not here: a flush while decoders write the next split cost them
    0.3 s of system time (of 5) on 16,000 photos here, and gained nothing.
    """
    global _job
    tasks = [Task(split, start, min(start + rows.per_task, len(items[split][1])))
             for split in writers for start in range(0, len(items[split][1]), rows.per_task)]
    left = {split: sum(t.split == split for t in tasks) for split in writers}
    bad_rows: dict[str, list[int]] = {split: [] for split in writers}
    skipped: list[tuple[str, str]] = []
    total = sum(len(native_items) for _, native_items in items.values())
    workers = max(1, min(cpu_count(), len(tasks))) if rows.parallel else 1
    started = time.perf_counter()
    _job = Job(rows, items, writers)
    try:
        with parallel_map(workers) as imap, progress_bar(total, "decode") as bar:
            for task, (counts, bad) in zip(tasks, imap(fill_task, tasks)):
                bar.update(task.stop - task.start)
                native, native_items = items[task.split]
                for row, reason in bad:
                    skipped.append((rows.name(native, int(native_items[row])), reason))
                    bad_rows[task.split].append(row)
                if counts is not None:
                    stats.add(counts)
                left[task.split] -= 1
                if left[task.split] == 0 and skip_bad:  # without skip_bad, a refusal comes once all are read
                    writers[task.split].drop_rows(bad_rows[task.split])
    finally:
        _job = None
    if skipped and not skip_bad:
        refuse_unreadable(skipped)
    if rows.parallel:
        seconds = time.perf_counter() - started
        how = "1 process" if workers == 1 else \
            f"{workers} {'processes' if sys.platform.startswith('linux') else 'threads'}"
        decoded = total - len(skipped)  # the files that failed were tried, not decoded
        print(f"decoded {decoded:,} images in {seconds:.2f} s ({decoded / max(seconds, 1e-9):,.0f} images/s, {how})"
              + (f"; skipped {plural(len(skipped), 'unreadable file')}" if skipped else ""))
    return sorted(skipped)


def refuse_unreadable(bad: list[tuple[str, str]]) -> None:
    """One line for all the unreadable files, so that one run finds them all: each named with its
    reason up to MAX_NAMED, and beyond that the full list written to a file the line names. Sorted by
    path, so that files of one folder stand together whichever split they were drawn into."""
    bad = sorted(bad)
    if len(bad) == 1:
        path, reason = bad[0]
        raise UserError(f"cannot read image {path}: {reason}; fix or remove it, "
                        f"or set data.skip_bad_images: true to skip such files")
    named = ", ".join(f"{path} ({reason})" for path, reason in bad[:MAX_NAMED])
    if len(bad) > MAX_NAMED:
        fd, full_list = tempfile.mkstemp(prefix="unreadable-images-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in bad)
        named += f" and {len(bad) - MAX_NAMED:,} more (all {len(bad):,} in {full_list})"
    raise UserError(f"cannot read {plural(len(bad), 'image')}: {named}; fix or remove them, "
                    f"or set data.skip_bad_images: true to skip such files")
