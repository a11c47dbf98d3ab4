"""Where the core loop spends time that the bare loop does not: a torch.profiler diff per step.

    python benchmarks/profile_loop.py                          # mlp on the CPU (overheads show most)
    python benchmarks/profile_loop.py --model small-cnn --device cuda --precision auto --shape 3 32 32 --batch 256

Profiles the same number of steps of each loop and prints, per operator, how many more calls
and how much more self CPU time per step the core makes than the bare loop. On CUDA the
extra calls are extra kernel launches, which is what a small model's step time is made of.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks.loops import BareLoop, CoreLoop, Workload, synchronize, synthetic_images, timed  # noqa: E402


def per_step(loop, steps: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """{operator: (calls per step, self CPU microseconds per step)} over one epoch of `steps` steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loop.run_epoch()
        synchronize(device)
    return {e.key: (e.count / steps, e.self_cpu_time_total / steps) for e in prof.key_averages()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    images, labels = synthetic_images(args.steps * args.batch, tuple(args.shape), 10)
    w = Workload(args.model, images, labels, 10, args.batch, 0.002, device, args.precision)
    core, bare = CoreLoop(w), BareLoop(w)
    for loop in (core, bare):
        loop.warm_up(10)
    # Unprofiled timings first: the profiler's own cost would blur a small difference.
    t_core = min(timed(core.run_epoch, device) for _ in range(3))
    t_bare = min(timed(bare.run_epoch, device) for _ in range(3))
    print(f"{args.model} {tuple(args.shape)} batch {args.batch} {args.precision} on {device}: "
          f"core {t_core / args.steps * 1e3:.3f} ms/step, bare {t_bare / args.steps * 1e3:.3f} ms/step, "
          f"core/bare speed {t_bare / t_core:.3f}")
    a, b = per_step(core, args.steps, device), per_step(bare, args.steps, device)
    diff = [(k, a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0], a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1])
            for k in set(a) | set(b)]
    diff.sort(key=lambda r: -abs(r[2]))
    print(f"\nper step, core minus bare (top {args.rows} by self CPU time):")
    print(f"  {'operator':<48} {'+calls':>8} {'+self CPU us':>13}")
    for key, calls, us in diff[:args.rows]:
        print(f"  {key[:48]:<48} {calls:>+8.2f} {us:>+13.1f}")
    # Call counts do not depend on how busy the machine is: the surest sign of extra work.
    extra = sorted((r for r in diff if abs(r[1]) >= 0.5), key=lambda r: -r[1])
    print("\nper step, operators the core calls more (or less) often than the bare loop:")
    for key, calls, us in extra:
        print(f"  {key[:48]:<48} {calls:>+8.2f} {us:>+13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
