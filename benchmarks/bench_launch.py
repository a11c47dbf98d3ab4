"""What torch's elastic launcher costs over starting the DDP ranks by hand, and what a restart costs.

    python benchmarks/bench_launch.py                 # 2 CPU ranks (gloo), 3 rounds, about a minute
    python benchmarks/bench_launch.py --ranks 4 --json out.json

Each launch starts `--ranks` processes that import torch, join a gloo group the way the train
stage does (`stages.core.distributed.init_distributed`), all-reduce once and exit. Three ways,
interleaved round by round so a slow moment of the machine hits all alike:

- bare: `subprocess.Popen` per rank with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (what
  the project did before it used torch's launcher), waiting for all;
- elastic: `stages.core.launch.launch_ranks`, as `train.strategy: ddp` runs;
- restart: elastic with `max_restarts=1`, where rank 1 of the first attempt kills itself with
  SIGKILL once the group has formed, and the agent starts the group again.

Prints the best wall time of each, elastic/bare (the launcher's overhead) and restart - elastic
(what one restart of the group adds, before any training is redone).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with or without `pip install -e .`

import torch  # noqa: E402

from benchmarks.loops import describe, machine  # noqa: E402


def rank_main(die_on_first_attempt: bool) -> None:
    """One rank: join, all-reduce once, exit (rank 1 of attempt 0 dies instead, when asked)."""
    import torch.distributed as dist

    from stages.core.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu", timeout_s=120)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if die_on_first_attempt and attempt == 0 and ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError:  # the peer that died on purpose: exit quietly, the agent restarts the group
        raise SystemExit(1) from None
    shutdown_distributed()


def bare(ranks: int) -> float:
    from stages.core.distributed import free_port

    started = time.perf_counter()
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_launch", "--rank"], cwd=ROOT,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks),
                                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(ranks)]
    if any(p.wait() for p in procs):
        raise SystemExit("a bare rank failed")
    return time.perf_counter() - started


def elastic(ranks: int, restart: bool) -> float:
    from stages.core.launch import launch_ranks

    started = time.perf_counter()
    launch_ranks("benchmarks.bench_launch", ["--rank"] + (["--die"] if restart else []), ranks,
                 max_restarts=1 if restart else 0, timeout_s=120)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best time of each way counts (default 3)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)  # run as one rank
    p.add_argument("--die", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank:
        rank_main(args.die)
        return
    os.chdir(ROOT)  # the ranks run `python -m benchmarks.bench_launch`
    info = machine(torch.device("cpu"))
    print(describe(info))
    print(f"{args.ranks} CPU ranks (gloo): import torch, join, one all-reduce, exit; {args.repeats} rounds")
    seconds: dict[str, list[float]] = {"bare": [], "elastic": [], "restart": []}
    for _ in range(args.repeats):
        seconds["bare"].append(bare(args.ranks))
        seconds["elastic"].append(elastic(args.ranks, restart=False))
        seconds["restart"].append(elastic(args.ranks, restart=True))
    best = {k: min(v) for k, v in seconds.items()}
    for name, values in seconds.items():
        print(f"  {name:8s} best {best[name]:6.2f} s   rounds {', '.join(f'{v:.2f}' for v in values)}")
    print(f"  elastic / bare          {best['elastic'] / best['bare']:.2f}x  (the launcher's overhead)")
    print(f"  restart - elastic       {best['restart'] - best['elastic']:+.2f} s  (one restart of the group)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "ranks": args.ranks, "seconds": seconds, "best": best,
                                         "elastic_over_bare": best["elastic"] / best["bare"],
                                         "restart_seconds": best["restart"] - best["elastic"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
