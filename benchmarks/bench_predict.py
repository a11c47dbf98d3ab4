"""predict from the ONNX export against predict from the weights file, on one folder of photos, in one run.

    python benchmarks/bench_predict.py                      # 4,000 photos, small-cnn (the default) and resnet18
    python benchmarks/bench_predict.py --photos 4000 --rounds 3 --json predict.json

For each model, the weights file and its ONNX export (written and checked by `python -m stages export`)
label the same folder with `python -m stages predict`, started as a user starts it, in turns
(PyTorch, ONNX, PyTorch, ...). Two figures per path:

- wall time end to end, start-up included (Python, imports, opening the model, the whole folder);
- images per second after start-up: (N - n) / (T_N - T_n), from the same command on the whole folder
  (N photos) and on its first n photos, so that start-up cancels out.

The median of the rounds counts. The models: small-cnn for the default params (the digits: 8x8 grey)
and resnet18 for 32x32 RGB photos (an image folder prepared at data.image_size 32). Their weights are
initialised, not trained: the speed does not depend on them, and the export's check holds either way.
The photos are bench_data's synthetic 160x120 JPEGs, decoded and resized by predict for either model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with or without `pip install -e .`

from benchmarks.bench_data import STAGES_ENV, ensure_photos, list_photos, stages_command  # noqa: E402
from benchmarks.loops import describe, machine  # noqa: E402
from stages.core.models import build_model  # noqa: E402
from stages.core.weights import save_model  # noqa: E402
from stages.model_file import model_metadata, trained_params  # noqa: E402
from stages.params import load_params  # noqa: E402

TARGETS = {"small-cnn": 1.5, "resnet18": 1.0}  # ONNX end to end at least this many times faster
FIRST = 200  # photos of the short run that start-up is measured with


def run(*args: str) -> float:
    """`python -m stages ...` as a user runs it: its wall time; a failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(stages_command(*args), env=STAGES_ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stages {' '.join(args[:3])} ... failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def params_file(path: Path, model: str, **data) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    params["model"]["name"] = model
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_model(work: Path, name: str, params: Path) -> tuple[Path, Path]:
    """Prepared data for the model's input (its test split checks the export), initialised weights, the export."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    prepared, weights, onnx_file = folder / "prepared", folder / "model.safetensors", folder / "model.onnx"
    run("prepare-data", "--params", str(params), "--out", str(prepared))
    info = json.loads((prepared / "info.json").read_text())
    channels, size, _ = info["shape"]
    torch.manual_seed(0)
    # The params recorded as if these weights were trained with the params file: export checks them.
    recorded = trained_params(load_params(params))
    save_model(weights, build_model(name, channels, size, info["num_classes"]), model_metadata(name, info,
                                                                                               params=recorded))
    run("export", "--params", str(params), "--model", str(weights), "--data", str(prepared), "--out", str(onnx_file))
    return weights, onnx_file


def measure(model: Path, photos: Path, first: list[str], out: Path) -> tuple[float, float]:
    """(seconds for the whole folder, seconds for its first photos) of `python -m stages predict`."""
    whole = run("predict", str(photos), "--model", str(model), "--out", str(out))
    short = run("predict", *first, "--model", str(model), "--out", str(out))
    return whole, short


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=4000, help="photos in the folder (default 4000)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per path; the median counts (default 3)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stages-bench-predict",
                   help="where photos, models and CSVs go; photos are reused (default: $TMPDIR/stages-bench-predict)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime

    info = machine(torch.device("cpu"))
    info["onnxruntime"] = onnxruntime.__version__
    print(describe(info) + f"\nonnxruntime {info['onnxruntime']}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    photos = ensure_photos(args.work, args.photos)
    first = list_photos(photos)[:FIRST]
    models = {
        "small-cnn": make_model(args.work, "small-cnn", params_file(args.work / "digits.yaml", "small-cnn")),
        "resnet18": make_model(args.work, "resnet18", params_file(
            args.work / "photos.yaml", "resnet18", dataset="imagefolder", root=str(ensure_photos(args.work, 400)),
            image_size=32, channels=3)),
    }
    figures: dict = {"machine": info, "photos": args.photos, "short_run": FIRST, "models": {}}
    print(f"\npredict on {args.photos:,} photos (160x120 JPEG); wall time with start-up; images/s after start-up "
          f"(from a second run on the first {FIRST}); median of {args.rounds} rounds")
    print(f"  {'model':<10} {'path':<8} {'wall s':>7} {'start-up s':>10} {'img/s':>7}")
    ok = True
    for name, (weights, onnx_file) in models.items():
        times: dict[str, list[tuple[float, float]]] = {"pytorch": [], "onnx": []}
        for _ in range(args.rounds):
            for path, model in (("pytorch", weights), ("onnx", onnx_file)):
                times[path].append(measure(model, photos, first, args.work / f"{name}-{path}.csv"))
        row = {}
        for path, runs in times.items():
            whole = statistics.median(w for w, _ in runs)
            short = statistics.median(s for _, s in runs)
            rate = (args.photos - FIRST) / (whole - short)
            startup = short - FIRST / rate
            row[path] = {"wall_s": round(whole, 2), "startup_s": round(startup, 2), "images_per_s": round(rate),
                         "runs": runs}
            print(f"  {name:<10} {path:<8} {whole:>7.2f} {startup:>10.2f} {rate:>7,.0f}")
        speedup = row["pytorch"]["wall_s"] / row["onnx"]["wall_s"]
        row["onnx_speedup_end_to_end"] = round(speedup, 2)
        row["onnx_speedup_after_startup"] = round(row["onnx"]["images_per_s"] / row["pytorch"]["images_per_s"], 2)
        figures["models"][name] = row
        ok &= speedup >= TARGETS[name]
    print("\ntargets")
    for name, row in figures["models"].items():
        verdict = "ok" if row["onnx_speedup_end_to_end"] >= TARGETS[name] else "MISSED"
        print(f"  {name:<10} ONNX / PyTorch end to end {row['onnx_speedup_end_to_end']:.2f}x   target >= "
              f"{TARGETS[name]}x   {verdict}   (after start-up {row['onnx_speedup_after_startup']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
