"""prepare-data on a JPEG folder against a bare Pillow loop on every core, side by side in one run.

    python benchmarks/bench_prepare.py                    # 16,000 photos 160x120 -> 128 px, 5 rounds
    python benchmarks/bench_prepare.py --photos 4000 --rounds 3 --work /tmp/bench-prepare --json out.json
    python benchmarks/bench_prepare.py --also /tmp/old-checkout     # and an older checkout's stage, same rounds

Makes (once, kept in --work) a folder of synthetic 160x120 JPEG photos (`photos.py`), then per
round, one right after the other so that a busy moment of the machine hits all three alike:

  bare     the reference: a bare Pillow loop over the same files on every core (a fork pool, 64
           files a task): open, draft, convert to RGB, resize to 128x128; nothing kept or written
  decode   prepare-data's decode loop alone: the `decoded N images in S s` line the stage prints
           (first task handed out to the last split file flushed)
  stage    `python -m stages prepare-data` as a subprocess (this checkout's code), wall time:
           Python's start, imports, listing the folder, the decode loop, info.json

With `--also PATH`, each round also runs the stage of another checkout of the project (a `git
worktree` of an older commit, say), so that before and after are measured side by side.

Prints each round and the ratios bare/decode and bare/stage (1.0: as fast as the bare loop), the
median over rounds of each round's own ratio, and the machine's load average before and after.
Targets (issue 23): decode >= 0.9, stage >= 0.7. Beside the wall times, the CPU seconds (user +
system, all processes) of the bare loop and of the whole stage: on a shared machine whose load
comes and goes between the runs of one round, their ratio is the steadier measure of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, with or without `pip install -e .`

from benchmarks.bench_data import DECODED, IMAGE_SIZE, bare_loop, ensure_photos, list_photos  # noqa: E402

TARGET_DECODE = 0.9
TARGET_STAGE = 0.7


def write_params(path: Path, root: Path) -> Path:
    """The project's params with an image folder of 128 px RGB crops (what prepare-data reads: data only)."""
    import yaml

    from stages.params import read_params_file

    params = read_params_file(ROOT / "params.yaml")
    params["data"].update(dataset="imagefolder", root=str(root), image_size=IMAGE_SIZE, channels=3, resize="crop")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have ended, theirs included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare_round(paths: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the decoders) of the bare loop."""
    cpu = children_cpu()
    seconds = bare_loop(paths)
    return seconds, children_cpu() - cpu


def run_stage(checkout: Path, params: Path, out: Path) -> tuple[float, float, float]:
    """(wall seconds of the whole command, seconds of its decode loop as it prints them, CPU seconds of
    the command and its decoders), with the `stages` package of `checkout`, whatever `pip install -e`
    points at."""
    command = [sys.executable, "-m", "stages", "prepare-data", "--params", str(params), "--out", str(out)]
    cpu = children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(checkout)), cwd=checkout,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu = children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"prepare-data failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds, float(DECODED.search(proc.stdout).group(2)), cpu


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=16_000, help="photos in the folder (default 16000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of bare loop + prepare-data (default 5)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stages-bench-data",
                   help="where the photo folder and outputs go, reused (default: $TMPDIR/stages-bench-data)")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="CHECKOUT",
                   help="also run the stage of this checkout of the project each round (repeatable)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import PIL

    args.work.mkdir(parents=True, exist_ok=True)
    root = ensure_photos(args.work, args.photos)
    paths = list_photos(root)
    params = write_params(args.work / f"prepare_{args.photos}" / "params.yaml", root)
    out = args.work / f"prepare_{args.photos}" / "prepared"
    print(f"{len(paths):,} photos in {root}; {len(os.sched_getaffinity(0))} cores; Python "
          f"{sys.version.split()[0]}, Pillow {PIL.__version__}; load average {load()}", flush=True)
    checkouts = {"this": ROOT, **{str(path): path.resolve() for path in args.also}}
    rounds: dict[str, list[dict]] = {name: [] for name in checkouts}
    for r in range(args.rounds):
        for name, checkout in checkouts.items():
            bare, bare_cpu = bare_round(paths)
            stage, decode, stage_cpu = run_stage(checkout, params, out)
            rounds[name].append({"bare_s": round(bare, 3), "decode_s": decode, "stage_s": round(stage, 3),
                                 "bare_cpu_s": round(bare_cpu, 3), "stage_cpu_s": round(stage_cpu, 3)})
            print(f"round {r + 1}, {name}: bare {bare:.2f} s, decode {decode:.2f} s ({bare / decode:.2f}x), "
                  f"stage {stage:.2f} s ({bare / stage:.2f}x); CPU bare {bare_cpu:.2f} s, stage {stage_cpu:.2f} s "
                  f"({bare_cpu / stage_cpu:.2f}x); load {load()}", flush=True)
    print("\nmedian of the rounds' ratios (bare loop seconds / prepare-data seconds; 1.0 = as fast):")
    figures = {"photos": len(paths), "rounds": rounds, "ratios": {}}
    for name, measured in rounds.items():
        decode_ratio = statistics.median(x["bare_s"] / x["decode_s"] for x in measured)
        stage_ratio = statistics.median(x["bare_s"] / x["stage_s"] for x in measured)
        cpu_ratio = statistics.median(x["bare_cpu_s"] / x["stage_cpu_s"] for x in measured)
        figures["ratios"][name] = {"decode": round(decode_ratio, 3), "stage": round(stage_ratio, 3),
                                   "stage_cpu": round(cpu_ratio, 3)}
        print(f"  {name}\n"
              f"    decode loop   {decode_ratio:.2f}   target >= {TARGET_DECODE}   "
              f"{'met' if decode_ratio >= TARGET_DECODE else 'MISSED'}\n"
              f"    whole stage   {stage_ratio:.2f}   target >= {TARGET_STAGE}   "
              f"{'met' if stage_ratio >= TARGET_STAGE else 'MISSED'}\n"
              f"    whole stage, CPU seconds   {cpu_ratio:.2f}\n"
              f"    best rounds: bare {min(x['bare_s'] for x in measured):.2f} s, decode "
              f"{min(x['decode_s'] for x in measured):.2f} s, stage {min(x['stage_s'] for x in measured):.2f} s")
    print(f"load average at the end {load()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
