"""Peak private memory of a command and every process it starts (Linux /proc).

    python benchmarks/memory.py -- python -m stages prepare-data --out /tmp/prepared

A thread samples the command's process tree every `interval` seconds and keeps the peak of
two sums over its processes:

  RssAnon    resident anonymous memory (heap, arrays): the memory a process owns. File-backed
             pages, such as a memory-mapped split in the page cache, are not in it. A forked
             child starts by sharing its parent's anonymous pages copy-on-write, and RssAnon
             counts them in both, so a tree of forked decoders over-counts the parent's heap.
  Pss_Anon   the same memory with each page shared by k processes counted 1/k in each: the
             tree's real footprint (from /proc/<pid>/smaps_rollup, Linux 5.0+).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass


def children(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found += [int(v) for v in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    return tree


def kib_field(path: str, name: str) -> int:
    """The `name:  N kB` line of a /proc file, in KiB (0 when the process has ended or has no such line)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Peak:
    rss_anon_mb: float = 0.0
    pss_anon_mb: float = 0.0
    processes: int = 0
    samples: int = 0


class TreeSampler:
    """Samples a process tree on a thread until `stop()`; the peaks are in `.peak`.

    RssAnon every `interval` (a counter the kernel keeps: cheap); Pss_Anon every `pss_every`-th
    time, since reading smaps_rollup walks the process's page tables under its memory-map lock,
    which would slow the very processes being measured."""

    def __init__(self, pid: int, interval: float = 0.05, pss_every: int = 10):
        self.pid, self.interval, self.pss_every, self.peak = pid, interval, pss_every, Peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def sample(self) -> None:
        pids = process_tree(self.pid)
        anon = sum(kib_field(f"/proc/{p}/status", "RssAnon") for p in pids) / 1024
        peak = self.peak
        peak.rss_anon_mb = max(peak.rss_anon_mb, anon)
        if peak.samples % self.pss_every == 0:
            pss = sum(kib_field(f"/proc/{p}/smaps_rollup", "Pss_Anon") for p in pids) / 1024
            peak.pss_anon_mb = max(peak.pss_anon_mb, pss)
        peak.processes, peak.samples = max(peak.processes, len(pids)), peak.samples + 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> Peak:
        self._stop.set()
        self._thread.join()
        return self.peak


@dataclass
class Run:
    returncode: int
    seconds: float
    peak: Peak
    output: str


def run_sampled(cmd: list[str], interval: float = 0.05, **popen) -> Run:
    """Run `cmd` to its end, sampling its process tree; stdout and stderr are captured together."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    sampler = TreeSampler(proc.pid, interval).start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    return Run(proc.returncode, seconds, sampler.stop(), output)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit(__doc__)
    run = run_sampled(args)
    sys.stdout.write(run.output)
    print(f"exit {run.returncode}, {run.seconds:.2f} s, peak RssAnon {run.peak.rss_anon_mb:,.0f} MB, "
          f"Pss_Anon {run.peak.pss_anon_mb:,.0f} MB over {run.peak.processes} processes", file=sys.stderr)
    sys.exit(run.returncode)
