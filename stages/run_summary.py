"""run.json: what one training run did, as one type.

The train stage writes it (`RunSummary.write`) once training has completed; the probe stage, the
analyze stage and the tests read it back through the same type (`read_run_summary`), so a key is
spelled once, here. It records where and how the run trained (devices, batches, precision,
launcher), how long it took, its peak memory, the library versions, the train params, and the
per-epoch history, from which analyze draws the learning curves.

A run.json written by another version of the train stage (a key missing or unknown) is refused in
one line that says to rerun the pipeline, never with a KeyError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import read_json, write_json

# The curves keep 6 decimals: DVCLive's plots and analyze's learning curves show the same numbers.
CURVE_DIGITS = 6


@dataclass(frozen=True)
class RunSummary:
    accelerator: str  # "cuda" or "cpu"
    strategy: str  # "dp" or "ddp"
    data_parallel: bool  # nn.DataParallel over several GPUs
    device_ids: list[int]  # the CUDA ids used ([] on the CPU)
    device_names: list[str]  # one per device ("cpu" per CPU process)
    num_devices: int
    world_size: int  # DDP processes (1 for dp)
    global_batch: int
    accumulate: int
    per_device_batch: int
    precision: str
    model: str
    parameters: int
    small_input_stem: bool | None  # resnets only
    pretrained: dict | None  # where the starting weights came from
    normalization: str  # where mean and std came from
    dataset: str
    epochs: int
    epochs_run: int
    stopped_early: bool
    best_epoch: int
    best_val_accuracy: float
    kept: str  # which epoch's weights were saved, in words
    resumed_from_epoch: int | None
    epoch_seconds: list[float]
    compile: str | None  # torch.compile's mode, None when not compiled
    compile_seconds: float  # this process's; not in epoch_seconds or samples/s
    stage_seconds: float  # the train process's wall time, start-up included
    data_on_device: bool
    data_streamed: bool
    torch_version: str
    versions: dict[str, str]  # torch, torchvision, numpy
    train_params: dict[str, Any]
    samples_per_second: float
    peak_memory_mb: list[float]  # per device (CUDA) or per process (CPU)
    peak_memory_kind: str
    launcher: str | None  # None, "stages (torch elastic)" or "torchrun"
    restarts: int
    gpu_claim: dict | None
    threads: int
    threads_from: str
    omp_wait_policy: str
    # One record per epoch: epoch, train_loss, train_accuracy, seconds, samples, samples_per_second,
    # val_loss, val_accuracy.
    history: list[dict[str, float]]

    def write(self, path: Path) -> None:
        write_json(path, asdict(self))

    def curves(self) -> dict[str, dict[str, list[float]]]:
        """The per-epoch learning curves: {"loss" | "accuracy": {"train" | "val": [one value per epoch]}}."""
        points = [curve_point(record) for record in self.history]
        return {metric: {split: [p[f"{split}/{metric}"] for p in points] for split in ("train", "val")}
                for metric in ("loss", "accuracy")}


def curve_point(record: dict[str, float]) -> dict[str, float]:
    """One epoch of the learning curves ("train/loss", ..., "val/accuracy"), as DVCLive logs it too."""
    return {f"{split}/{metric}": round(record[f"{split}_{metric}"], CURVE_DIGITS)
            for split in ("train", "val") for metric in ("loss", "accuracy")}


def read_run_summary(path: Path) -> RunSummary:
    """The run.json at `path`, or one line saying it belongs to another version of the pipeline."""
    data = read_json(path)
    names = [f.name for f in fields(RunSummary)]
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a run summary of the train stage; rerun `dvc repro`")
    missing = [name for name in names if name not in data]
    unknown = [key for key in data if key not in names]
    if missing or unknown:
        what = "; ".join(part for part in (
            f"it lacks {', '.join(missing)}" if missing else "",
            f"it has unknown {', '.join(map(str, unknown))}" if unknown else "") if part)
        raise UserError(f"{path} was written by another version of the train stage ({what}); rerun `dvc repro` "
                        "(or `dvc repro -f -s train` when the params did not change, then `dvc repro`)")
    return RunSummary(**data)
