"""What the stages print around their work, without torch: warnings, progress, the cores to use.

Shared by prepare-data and predict (whose ONNX path runs where torch is not installed).
"""

from __future__ import annotations

import contextlib
import os
import sys

from .params import plural

MAX_WARNINGS = 20  # skipped files named one per line; the rest are counted


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class NoBar(contextlib.nullcontext):
    """What a progress bar is where nobody watches (no terminal): tqdm's import alone takes 40 ms."""

    def __enter__(self) -> NoBar:
        return self

    def update(self, n: int) -> None:
        pass


def progress_bar(total: int, desc: str):
    if not sys.stderr.isatty():
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:MAX_WARNINGS]:
        warn(f"skipped unreadable image {path}: {reason}")
    if len(skipped) > MAX_WARNINGS:
        warn(f"... and {plural(len(skipped) - MAX_WARNINGS, 'more unreadable image')} skipped")
