"""The train stage's loop against a bare PyTorch loop and a tutorial DataLoader loop, side by side.

    python benchmarks/bench_train.py                      # small-cnn and mlp, 8000 x 1x28x28, batch 64
    python benchmarks/bench_train.py --model small-cnn --images 4000 --shape 3 32 32 --json out.json

Every loop trains the same model from the same weights on the same uint8 images with the
same global batch, AdamW and lr; each timed epoch is the same number of samples. Prints
samples/s per loop and the ratios core/bare (target >= 0.95) and core/dataloader
(target >= 1.25). See benchmarks/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with or without `pip install -e .`

import torch  # noqa: E402

from benchmarks.loops import BareLoop, CoreLoop, DataLoaderLoop, Workload, describe, machine, race, synthetic_images  # noqa: E402

TARGET_CORE_VS_BARE = 0.95
TARGET_CORE_VS_DATALOADER = 1.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["small-cnn", "mlp"],
                   help="model(s) to race, one comparison each (default: small-cnn mlp)")
    p.add_argument("--images", type=int, default=8000, help="number of images (default 8000)")
    p.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"),
                   help="image shape (default 1 28 28)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="global batch (default 64, the params.yaml default)")
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"],
                   help="as train.precision (default fp32; auto = bf16 on a GPU that has it)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per loop; the best counts (default 3)")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps per loop first (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures to PATH")
    return p.parse_args(argv)


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "MISSED"


def compare_model(model_name: str, images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> dict:
    w = Workload(model_name, images, labels, args.classes, args.batch, args.lr, device, args.precision)
    loops = [CoreLoop(w), BareLoop(w), DataLoaderLoop(w)]
    timings = race(loops, args.repeats, args.warmup_steps, device)
    core, bare, loader = (timings[name].best for name in ("core", "bare", "dataloader"))
    return {
        "model": model_name,
        "samples_per_epoch": w.samples,
        "steps_per_epoch": w.steps,
        "loops": {name: {"samples_per_second_best": round(t.best, 1), "samples_per_second_median": round(t.median, 1),
                         "epoch_seconds": [round(s, 4) for s in t.seconds]} for name, t in timings.items()},
        "ratios": {"core/bare": round(core / bare, 3), "core/dataloader": round(core / loader, 3),
                   "bare/dataloader": round(bare / loader, 3)},
        "targets": {"core/bare": TARGET_CORE_VS_BARE, "core/dataloader": TARGET_CORE_VS_DATALOADER},
    }


def print_result(r: dict) -> None:
    print(f"\n{r['model']}: {r['steps_per_epoch']} steps x batch = {r['samples_per_epoch']} samples per timed epoch")
    print(f"  {'loop':<12} {'samples/s best':>15} {'median':>10}   epoch seconds")
    for name, t in r["loops"].items():
        secs = " ".join(f"{s:.3f}" for s in t["epoch_seconds"])
        print(f"  {name:<12} {t['samples_per_second_best']:>15,.0f} {t['samples_per_second_median']:>10,.0f}   {secs}")
    ratios = r["ratios"]
    print(f"  core/bare        {ratios['core/bare']:.3f}   target >= {TARGET_CORE_VS_BARE}   "
          f"{verdict(ratios['core/bare'], TARGET_CORE_VS_BARE)}")
    print(f"  core/dataloader  {ratios['core/dataloader']:.3f}   target >= {TARGET_CORE_VS_DATALOADER}   "
          f"{verdict(ratios['core/dataloader'], TARGET_CORE_VS_DATALOADER)}"
          f"   (bare/dataloader {ratios['bare/dataloader']:.3f}: the most any in-memory loop could gain here)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the train stage sets it (not deterministic)
    info = machine(device)
    print(describe(info))
    print(f"data: {args.images} synthetic uint8 images {tuple(args.shape)}, {args.classes} classes; "
          f"batch {args.batch}, "
          f"AdamW lr {args.lr}, precision {args.precision}; {args.warmup_steps} warm-up steps, "
          f"best of {args.repeats} epochs, loops interleaved")
    images, labels = synthetic_images(args.images, tuple(args.shape), args.classes)
    results = []
    for model_name in args.model:
        results.append(compare_model(model_name, images, labels, args, device))
        print_result(results[-1])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": info, "settings": settings, "results": results}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
