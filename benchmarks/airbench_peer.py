"""airbench, a peer run beside the project on the same GPU: its training samples/s next to ours.

airbench (github.com/KellerJordan/cifar10-airbench) holds the fastest known CIFAR-10 trainings
on one GPU. It is fetched, never committed: clone it anywhere and pass its folder

    git clone https://github.com/KellerJordan/cifar10-airbench /tmp/airbench
    python benchmarks/gpu_check.py --airbench /tmp/airbench

Its `airbench94_muon.py` reads `cifar10/train.pt` and `cifar10/test.pt` below the working
folder (its own format: a `torch.save`d dict of uint8 images N x 32 x 32 x 3, int64 labels and
class names). This module writes those two files in a temporary folder from random pixels of
CIFAR-10's shape (speed does not depend on what the pixels show), then runs airbench in a child
process there: its warm-up run (which compiles its model, untimed) and one timed run. airbench
times its own training epochs with CUDA events; its batch and step count give the samples.
The files are the peer's input format, read only by the peer; the project itself reads no pickle.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = "airbench94_muon.py"
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000

# Run as a file, not `python -c`: airbench reads its own source through sys.argv[0] at import.
# Its main() hands every log row's locals to print_training_details; keep the numbers we need.
DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import airbench94_muon as airbench

rows = []
def record(variables, is_final_entry):
    rows.append({"epoch": str(variables["epoch"]), "time_seconds": float(variables["time_seconds"]),
                 "steps": int(variables["total_train_steps"]), "batch": int(variables["batch_size"]),
                 "run": str(variables.get("run"))})
airbench.print_training_details = record

model = airbench.CifarNet().cuda().to(memory_format=torch.channels_last)
model.compile(mode="max-autotune")  # as airbench's own __main__ runs it
airbench.main("warmup", model)
rows.clear()
airbench.main(0, model)
trained = [r for r in rows if r["epoch"] != "eval"]
last = trained[-1]
print("AIRBENCH " + json.dumps({"samples": last["steps"] * last["batch"], "seconds": last["time_seconds"],
                                "batch": last["batch"], "steps": last["steps"], "epochs": len(trained)}))
"""


def write_cifar_shaped(folder: Path, seed: int = 0) -> None:
    """cifar10/train.pt and test.pt as airbench reads them, from seeded random pixels."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    classes = [f"class_{i}" for i in range(10)]
    for name, n in (("train.pt", TRAIN_IMAGES), ("test.pt", TEST_IMAGES)):
        images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
        labels = torch.randint(0, 10, (n,), generator=gen)
        torch.save({"images": images, "labels": labels, "classes": classes}, folder / name)


def run_airbench(airbench_dir: Path, timeout_s: float = 900) -> dict:
    """airbench's training samples/s on this GPU: {"samples_per_second", "samples", "seconds", ...}."""
    airbench_dir = Path(airbench_dir).resolve()
    if not (airbench_dir / SCRIPT).is_file():
        raise FileNotFoundError(f"{airbench_dir} has no {SCRIPT}: pass a clone of KellerJordan/cifar10-airbench")
    with tempfile.TemporaryDirectory(prefix="airbench-") as tmp:
        work = Path(tmp)
        write_cifar_shaped(work / "cifar10")
        (work / "driver.py").write_text(DRIVER)
        proc = subprocess.run([sys.executable, "driver.py", str(airbench_dir)], cwd=work, capture_output=True,
                              text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("AIRBENCH ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"airbench exited with {proc.returncode}: {tail}")
    result = json.loads(lines[-1].removeprefix("AIRBENCH "))
    result["samples_per_second"] = result["samples"] / result["seconds"]
    return result
