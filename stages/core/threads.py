"""How many CPU threads each training process uses for torch's intra-op work (train.threads).

`auto` shares the cores this process may run on (its CPU affinity: what taskset, cgroups' cpusets
and Slurm give it, not the machine's count) between the ranks on this machine, so that DDP ranks
never ask for more threads than there are cores together. An explicit OMP_NUM_THREADS wins over
auto (torchrun sets it to 1 for every rank unless told otherwise). Float sums split over threads
differently with each count, so the bytes of CPU results are the same for the same thread count.
"""

from __future__ import annotations

import os

import torch

from ..errors import UserError

# More threads than this many times the usable cores is refused, not only warned about: on this project's
# 2-core machine 64 threads trained the digits about 200 times slower than 2, and 1000 did not finish an
# epoch of 0.1 s in 5 minutes, which looks like a hang. Below it a warning (`oversubscription`) suffices.
MAX_THREADS_PER_CORE = 4


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def choose_threads(setting: int | str, local_ranks: int) -> tuple[int, str]:
    """The intra-op thread count for train.threads (`auto` or a count) and where it comes from."""
    if setting != "auto":
        return int(setting), "train.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = usable_cores()
    ranks = f" / {local_ranks} ranks on this machine" if local_ranks > 1 else ""
    return max(1, cores // local_ranks), f"auto: {cores} usable cores{ranks}"


def check_thread_count(setting: int | str, local_ranks: int) -> None:
    """Refuse a train.threads count that would make training crawl on this machine's usable cores: more
    than MAX_THREADS_PER_CORE times them over the ranks on this machine. Refused here, by check-params and
    by train, as `accelerator: cuda` is refused without CUDA; auto fits every machine's own cores."""
    if setting == "auto":
        return
    cores = usable_cores()
    most = max(1, MAX_THREADS_PER_CORE * cores // local_ranks)
    if setting <= most:
        return
    per = f"{setting} CPU threads x {local_ranks} processes" if local_ranks > 1 else f"{setting} CPU threads"
    raise UserError(f"train.threads = {setting} is not allowed on this machine: {per} on {cores} usable cores "
                    "would wait for one another at every step, and training would seem to hang; use auto "
                    f"({max(1, cores // local_ranks)} here; each machine's own cores elsewhere) or at most {most}")


def oversubscription(threads: int, source: str, local_ranks: int) -> str | None:
    """Why `threads` per process (chosen by `source`) is too many for this machine's usable cores, or
    None. Not refused: the same params.yaml runs on machines with more cores; but on too few, every
    step's threads wait for one another (on 2 cores, 64 threads trained the digits about 200 times
    slower than 2)."""
    cores = usable_cores()
    if threads * local_ranks <= cores:
        return None
    per = f"{threads} CPU threads x {local_ranks} processes" if local_ranks > 1 else f"{threads} CPU threads"
    return (f"{per} ({source}) on {cores} usable cores: the threads wait for one another and training runs "
            f"far slower than with {max(1, cores // local_ranks)} per process")


def set_threads(setting: int | str, local_ranks: int) -> dict:
    """Set this process's intra-op threads; what run.json records of the choice."""
    threads, source = choose_threads(setting, local_ranks)
    torch.set_num_threads(threads)
    # OMP_WAIT_POLICY: set by the CLI from the load when the command started (stages/cli.py), or by the user
    return {"threads": threads, "threads_from": source, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
