"""The data path at scale: prepare-data, training and DDP on JPEG folders of two sizes, side by side.

    python benchmarks/bench_data.py                        # 4,000 and 16,000 photos; about 10 minutes on 2 cores
    python benchmarks/bench_data.py --sizes 4000 16000 --rounds 3 --work /tmp/bench-data --json out.json
    python benchmarks/bench_data.py --sizes 100000 --rounds 1 --skip-throughput

Makes synthetic JPEG photo folders (`photos.py`, 160x120, 10 classes; kept in --work and
reused), then per folder and round, one after the other so that a slow moment of the machine
hits all of them alike:

  bare          a bare Pillow loop over the same files on every core (fork pool, 64 files a
                task): open, draft, convert to RGB, resize; nothing kept or written
  prepare-data  `python -m stages prepare-data` (image_size 128): its own decoding phase (the
                time it prints) and the whole command
  train         `python -m stages train`, mlp, one epoch, on the CPU
  ddp           the same with train.strategy ddp on 2 CPU processes

Each command's process tree is sampled for private memory (`memory.py`: RssAnon, the issue's
measure, and Pss_Anon, which counts pages a forked decoder shares with its parent once).
Then the training throughput from a memory-mapped split against the same split in memory,
with the training core, on the digits (the default dataset) and on MNIST-sized data.

Ratios printed against the targets:
  extra private memory per extra prepared byte, smallest -> largest folder: prepare-data < 0.2,
      train ~0, ddp (both ranks) ~0
  prepare-data decoding / bare loop, images/s, best round of each: >= 0.7
  mapped / in-memory training samples/s: >= 0.95
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with or without `pip install -e .`

from benchmarks.memory import Run, run_sampled  # noqa: E402
from benchmarks.photos import make_photos  # noqa: E402

TARGET_PREPARE_SLOPE = 0.2
TARGET_FLAT_SLOPE = 0.05  # "about 0" for train and ddp: under 5% of the extra data
TARGET_DECODE_VS_BARE = 0.7
TARGET_MAPPED_VS_MEMORY = 0.95
IMAGE_SIZE = 128
FILES_PER_TASK = 64


# --- the reference: a bare Pillow loop on every core -----------------------------------------


def list_photos(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.jpg"))


def _bare_task(paths: list[str]) -> int:
    from PIL import Image

    for path in paths:
        with Image.open(path) as img:
            img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # as prepare-data does: the decoder's own shrinking
            img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return len(paths)


def bare_loop(paths: list[str]) -> float:
    """Seconds for the bare loop over `paths` on all cores."""
    import multiprocessing

    workers = len(os.sched_getaffinity(0))
    tasks = [paths[i : i + FILES_PER_TASK] for i in range(0, len(paths), FILES_PER_TASK)]
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        done = sum(pool.imap_unordered(_bare_task, tasks))
    assert done == len(paths)
    return time.perf_counter() - start


# --- the stage's commands --------------------------------------------------------------------


def write_params(path: Path, root: Path, **train) -> Path:
    import yaml

    from stages.params import read_params_file

    params = read_params_file(ROOT / "params.yaml")  # as the stages read it (YAML 1.2, as DVC does)
    params["data"].update(dataset="imagefolder", root=str(root), image_size=IMAGE_SIZE)
    params["model"]["name"] = "mlp"
    params["train"].update(epochs=1, accelerator="cpu", **train)
    # Validation batches of the same size on every folder (the smallest val split is 320 images),
    # so that peak memory compares the data, not a larger last batch.
    params["evaluate"]["batch_size"] = 256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stages_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages", *args]


# The commands run this checkout's code, whatever `pip install -e` points at.
STAGES_ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def checked(run: Run, what: str) -> Run:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.output[-3000:]}")
    return run


DECODED = re.compile(r"decoded ([\d,]+) images in ([\d.]+) s")


@dataclass
class Measured:
    seconds: list[float] = field(default_factory=list)
    rss_anon_mb: list[float] = field(default_factory=list)
    pss_anon_mb: list[float] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.seconds.append(round(run.seconds, 3))
        self.rss_anon_mb.append(round(run.peak.rss_anon_mb, 1))
        self.pss_anon_mb.append(round(run.peak.pss_anon_mb, 1))


@dataclass
class Folder:
    images: int
    root: str
    prepared_bytes: int = 0
    bare_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)  # prepare-data's own decoding phase
    prepare: Measured = field(default_factory=Measured)
    train: Measured = field(default_factory=Measured)
    ddp: Measured = field(default_factory=Measured)

    def rate(self, seconds: list[float]) -> float:
        return self.images / min(seconds)


def round_on(folder: Folder, work: Path, train_too: bool) -> None:
    """One round on one folder: bare loop, prepare-data, then (optionally) train and ddp."""
    out = work / f"out_{folder.images}"
    params = write_params(out / "params.yaml", Path(folder.root))
    ddp_params = write_params(out / "ddp.yaml", Path(folder.root), strategy="ddp", devices=2)
    folder.bare_seconds.append(round(bare_loop(list_photos(Path(folder.root))), 3))
    run = checked(run_sampled(stages_command("prepare-data", "--params", str(params), "--out", str(out / "prepared")),
                              env=STAGES_ENV), "prepare-data")
    folder.prepare.add(run)
    decoded = DECODED.search(run.output)
    folder.decode_seconds.append(float(decoded.group(2)))
    folder.prepared_bytes = sum(f.stat().st_size for f in (out / "prepared").glob("*.safetensors"))
    print(f"  {folder.images:>7,} photos: bare {folder.bare_seconds[-1]:.2f} s, prepare-data decoding "
          f"{folder.decode_seconds[-1]:.2f} s (command {run.seconds:.2f} s, RssAnon {run.peak.rss_anon_mb:,.0f} MB)",
          flush=True)
    if not train_too:
        return
    for name, yaml_path, measured in (("train", params, folder.train), ("ddp", ddp_params, folder.ddp)):
        shutil.rmtree(out / name, ignore_errors=True)
        run = checked(run_sampled(stages_command(
            "train", "--params", str(yaml_path), "--data", str(out / "prepared"), "--model",
            str(out / name / "model.safetensors"), "--metrics", str(out / name / "metrics"),
            "--checkpoint", str(out / name / "checkpoint.safetensors")), env=STAGES_ENV), name)
        measured.add(run)
        print(f"  {folder.images:>7,} photos: {name} {run.seconds:.2f} s, RssAnon {run.peak.rss_anon_mb:,.0f} MB",
              flush=True)


def ensure_photos(work: Path, count: int) -> Path:
    root = work / f"photos_{count}"
    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        make_photos(str(root), count)
        marker.write_text(f"{count}\n")
        print(f"made {count:,} photos in {root} ({time.perf_counter() - start:.1f} s)", flush=True)
    return root


# --- training throughput: mapped split vs the same split in memory ----------------------------


class Repeated:
    """A loop whose timed unit is `loop.repeat` epochs: a digits epoch of mlp lasts 30 ms, too short to time."""

    def __init__(self, loop):
        self.loop, self.name, self.samples = loop, loop.name, loop.samples * loop.repeat

    def warm_up(self, steps: int) -> None:
        self.loop.warm_up(steps)

    def run_epoch(self) -> None:
        for _ in range(self.loop.repeat):
            self.loop.run_epoch()


def epochs_per_second(loop) -> int:
    """How many epochs of `loop` last about a second (one untimed epoch to find out)."""
    start = time.perf_counter()
    loop.run_epoch()
    return max(1, round(1.0 / max(time.perf_counter() - start, 1e-3)))


def throughput_pairs(work: Path, rounds: int) -> list[dict]:
    """The core loop on a memory-mapped split vs a private in-memory copy, interleaved."""
    import torch

    from benchmarks.loops import CoreLoop, Workload, race, synthetic_images
    from stages.io import load_tensors, save_tensors

    digits = work / "digits"
    if not (digits / "train.safetensors").exists():
        command = stages_command("prepare-data", "--params", str(ROOT / "params.yaml"), "--out", str(digits))
        checked(run_sampled(command, env=STAGES_ENV), "prepare-data (digits)")
    mnist = work / "mnist_sized.safetensors"
    if not mnist.exists():
        images, labels = synthetic_images(60_000, (1, 28, 28), 10)
        save_tensors(mnist, {"images": images, "labels": labels})
    results = []
    # small-cnn on MNIST-sized data is left out: 45 s an epoch here, and its arithmetic hides any
    # difference in the data path that mlp shows.
    for data, path, model_name in (("digits", digits / "train.safetensors", "small-cnn"),
                                   ("digits", digits / "train.safetensors", "mlp"),
                                   ("MNIST-sized 60,000 x 1x28x28", mnist, "mlp")):
        tensors, _ = load_tensors(path)
        mapped_images, mapped_labels = tensors["images"], tensors["labels"]
        device = torch.device("cpu")
        loops = []
        for name, images, labels in (("mapped", mapped_images, mapped_labels),
                                     ("memory", mapped_images.clone(), mapped_labels.clone())):
            loop = CoreLoop(Workload(model_name, images, labels, 10, 64, 0.002, device))
            loop.name = name
            loops.append(loop)
        repeat = epochs_per_second(loops[1])
        for loop in loops:
            loop.repeat = repeat
        timing = race([Repeated(loop) for loop in loops], rounds, 10, device)
        ratio = timing["mapped"].best / timing["memory"].best
        results.append({"data": data, "model": model_name, "mapped_samples_per_second": round(timing["mapped"].best, 1),
                        "memory_samples_per_second": round(timing["memory"].best, 1), "ratio": round(ratio, 3)})
        print(f"  {data}, {model_name}: mapped {timing['mapped'].best:,.0f} samples/s, in memory "
              f"{timing['memory'].best:,.0f}: {ratio:.3f}", flush=True)
    return results


# --- the report ------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def slope(small: float, large: float, small_bytes: int, large_bytes: int) -> float:
    """Extra MB of private memory per extra MB prepared."""
    return (large - small) / max((large_bytes - small_bytes) / 2**20, 1e-9)


def report(folders: list[Folder], pairs: list[dict]) -> dict:
    print("\nper folder (best round for times, largest peak for memory; MB = 2^20 bytes)")
    header = (f"  {'photos':>8} {'prepared MB':>11} {'bare s':>7} {'decode s':>8} {'img/s':>7} {'ratio':>6} "
              f"{'prep s':>7} {'prep RssAnon':>12} {'prep Pss':>9} {'train s':>8} {'train MB':>9} "
              f"{'ddp s':>7} {'ddp MB':>7}")
    print(header)
    figures: dict = {"folders": [asdict(f) for f in folders], "throughput": pairs, "ratios": {}}
    for f in folders:
        ratio = f.rate(f.decode_seconds) / f.rate(f.bare_seconds)
        train = f"{min(f.train.seconds):>8.1f} {max(f.train.rss_anon_mb):>9,.0f}" if f.train.seconds else " " * 18
        ddp = f"{min(f.ddp.seconds):>7.1f} {max(f.ddp.rss_anon_mb):>7,.0f}" if f.ddp.seconds else ""
        print(f"  {f.images:>8,} {f.prepared_bytes / 2**20:>11,.0f} {min(f.bare_seconds):>7.2f} "
              f"{min(f.decode_seconds):>8.2f} {f.rate(f.decode_seconds):>7,.0f} {ratio:>6.2f} "
              f"{min(f.prepare.seconds):>7.2f} {max(f.prepare.rss_anon_mb):>12,.0f} "
              f"{max(f.prepare.pss_anon_mb):>9,.0f} {train} {ddp}")
        figures["ratios"][f"decode/bare {f.images}"] = round(ratio, 3)
    print("\ntargets")
    worst = min(f.rate(f.decode_seconds) / f.rate(f.bare_seconds) for f in folders)
    print(f"  prepare-data decoding / bare Pillow loop (worst folder)  {worst:.2f}   target >= "
          f"{TARGET_DECODE_VS_BARE}   {verdict(worst >= TARGET_DECODE_VS_BARE)}")
    if len(folders) >= 2:
        small, large = folders[0], folders[-1]
        rows = [("prepare-data, RssAnon", small.prepare.rss_anon_mb, large.prepare.rss_anon_mb, TARGET_PREPARE_SLOPE),
                ("prepare-data, Pss_Anon", small.prepare.pss_anon_mb, large.prepare.pss_anon_mb,
                 TARGET_PREPARE_SLOPE)]
        if small.train.seconds and large.train.seconds:
            rows += [("train, RssAnon", small.train.rss_anon_mb, large.train.rss_anon_mb, TARGET_FLAT_SLOPE),
                     ("ddp (2 ranks together), RssAnon", small.ddp.rss_anon_mb, large.ddp.rss_anon_mb,
                      TARGET_FLAT_SLOPE)]
        for name, a, b, target in rows:
            s = slope(max(a), max(b), small.prepared_bytes, large.prepared_bytes)
            figures["ratios"][f"slope {name}"] = round(s, 4)
            print(f"  extra private / extra prepared byte, {name:<33} {s:+.3f}   target < {target}   "
                  f"{verdict(s < target)}   ({max(a):,.0f} -> {max(b):,.0f} MB)")
    for pair in pairs:
        ok = pair["ratio"] >= TARGET_MAPPED_VS_MEMORY
        print(f"  mapped / in-memory training, {pair['data']}, {pair['model']:<9}  {pair['ratio']:.3f}   "
              f"target >= {TARGET_MAPPED_VS_MEMORY}   {verdict(ok)}")
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000], help="photos per folder (default 4000 16000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of bare loop + prepare-data (default 3)")
    p.add_argument("--train-rounds", type=int, default=1, help="of those rounds, how many also train (default 1)")
    p.add_argument("--throughput-rounds", type=int, default=5,
                   help="timed rounds (of about a second) per loop; the best counts (default 5)")
    p.add_argument("--skip-throughput", action="store_true", help="skip the mapped vs in-memory training race")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stages-bench-data",
                   help="where photo folders and outputs go; folders are reused (default: $TMPDIR/stages-bench-data)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks.loops import describe, machine

    info = machine(torch.device("cpu"))
    print(describe(info), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    folders = [Folder(n, str(ensure_photos(args.work, n))) for n in sorted(args.sizes)]
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for folder in folders:
            round_on(folder, args.work, train_too=r < args.train_rounds)
    pairs = []
    if not args.skip_throughput:
        print("training throughput, memory-mapped split vs in memory (the core loop, CPU, batch 64)", flush=True)
        pairs = throughput_pairs(args.work, args.throughput_rounds)
    figures = report(folders, pairs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "settings": {k: str(v) for k, v in vars(args).items()},
                                         **figures}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
