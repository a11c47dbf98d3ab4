"""Per-epoch time of the default digits run by intra-op thread count, on a quiet machine and beside
one busy process, with OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE.

    python benchmarks/bench_threads.py                   # 4 epochs per run, threads 1, 2, auto
    python benchmarks/bench_threads.py --epochs 6 --threads 1 2 4 auto --json out.json

Each configuration is a fresh process (OpenMP reads its wait policy when it starts) training the
default model (small-cnn, batch 64, AdamW) with the core loop on the prepared digits; its median
epoch time (the first epoch, warm-up, left out) is printed as a ratio against the quiet 1-thread
run with the default policy, measured in the same invocation. The busy process is a Python loop
that keeps one core busy. See benchmarks/README.md for figures and what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with or without `pip install -e .`

# A busy loop that ends when its parent does: killed or not, the benchmark leaves no spinning orphan.
BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
# OpenMP's wait policies to compare: its default (GNU OpenMP spins about 300,000 times before it
# sleeps), passive (sleeps at once) and a short spin before sleeping.
POLICIES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed (default 4)")
    p.add_argument("--threads", nargs="+", default=["1", "2", "auto"], help="thread settings (default 1 2 auto)")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES),
                   help="OpenMP wait policies (default: all)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures to PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--setting", default="1", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One run: the default model on the prepared digits, the core loop's epochs; prints JSON."""
    import torch

    from stages.core.batches import place_split
    from stages.core.devices import plan_devices
    from stages.core.distributed import DistContext
    from stages.core.loop import build_loop_state, prepare_model, train_one_epoch
    from stages.core.models import build_model
    from stages.core.threads import choose_threads
    from stages.io import load_tensors
    from stages.params import TrainParams

    setting = args.setting if args.setting == "auto" else int(args.setting)
    threads, _ = choose_threads(setting, 1)
    torch.set_num_threads(threads)
    # The prepared training split, as prepare-data wrote it (benchmarks read files, not the stage modules).
    tensors, _ = load_tensors(args.data / "train.safetensors")
    images, labels = tensors["images"], tensors["labels"]
    info = json.loads((args.data / "info.json").read_text())
    cfg = TrainParams(accelerator="cpu")
    cpu = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    model = build_model("small-cnn", *info["shape"][:2], info["num_classes"])
    wrapped = prepare_model(model, cfg, plan_devices("cpu", 1, "dp"), DistContext(), cpu)
    st = build_loop_state(wrapped, cfg, DistContext(), cpu, info, len(labels))
    split = place_split(images, labels, cpu)
    seconds = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        train_one_epoch(wrapped, split, epoch, st)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"threads": threads, "epoch_seconds": seconds}))


def run(data: Path, setting: str, policy: str, epochs: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    env.update(POLICIES[policy])
    out = subprocess.run([sys.executable, __file__, "--worker", "--data", str(data), "--setting", setting,
                          "--epochs", str(epochs)], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["median_epoch_seconds"] = statistics.median(result["epoch_seconds"][1:] or result["epoch_seconds"])
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        data = Path(tmp) / "prepared"
        subprocess.run([sys.executable, "-m", "stages", "prepare-data", "--params", str(ROOT / "params.yaml"),
                        "--out", str(data)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       check=True, capture_output=True)
        for busy in (False, True):
            competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
            try:
                for policy in args.policies:
                    for setting in args.threads:
                        r = run(data, setting, policy, args.epochs)
                        rows.append({"setting": setting, "threads": r["threads"], "busy_process": busy,
                                     "omp_wait_policy": policy,
                                     "median_epoch_seconds": round(r["median_epoch_seconds"], 4)})
                        print(f"threads {setting:>4} ({r['threads']})  busy process: {'yes' if busy else 'no ':<3}  "
                              f"wait policy {policy:<7}  {r['median_epoch_seconds']:.3f} s/epoch", flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    reference = next(r for r in rows if r["setting"] == args.threads[0] and not r["busy_process"]
                     and r["omp_wait_policy"] == args.policies[0])["median_epoch_seconds"]
    print(f"\nepoch time / the quiet {args.threads[0]}-thread run with the {args.policies[0]} policy "
          f"({reference:.3f} s):")
    for r in rows:
        r["ratio"] = round(r["median_epoch_seconds"] / reference, 3)
        print(f"  threads {r['setting']:>4}  busy {'yes' if r['busy_process'] else 'no ':<3}  "
              f"{r['omp_wait_policy']:<7}  {r['ratio']:.2f}")
    report = {"machine": {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
                          "torch": torch.__version__, "load_average": os.getloadavg()},
              "epochs": args.epochs, "rows": rows}
    print(f"machine: {report['machine']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
