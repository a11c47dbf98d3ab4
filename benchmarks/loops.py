"""The training loops the benchmarks race against each other, and the helpers to time them fairly.

  core        stages.core exactly as the train stage drives it:
              place_split -> prepare_model -> build_loop_state -> train_one_epoch
  bare        the least a PyTorch loop can do with in-memory uint8 tensors: index by a
              permutation, normalise, forward, cross-entropy, backward, step
  dataloader  the tutorial way: a Dataset whose __getitem__ returns one normalised float
              image, a DataLoader(batch_size, shuffle=True), each batch moved to the device
  graph       the floor on a GPU: the bare loop's whole step (gather, normalise, forward,
              loss, backward, AdamW) captured once as a CUDA graph and replayed; per step the
              host copies the batch's indices into the graph and launches it, nothing more

All loops train the same model (same seed, so the same initial weights) with the same
optimizer, lr, precision and memory format, so what differs is only the data path and
the loop's own bookkeeping. Only torch and the training core are imported: no DVC.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stages.core.batches import place_split
from stages.core.devices import DevicePlan, plan_devices
from stages.core.distributed import DistContext
from stages.core.loop import build_loop_state, prepare_model, train_one_epoch, use_channels_last
from stages.core.models import build_model
from stages.core.precision import resolve_precision
from stages.params import TrainParams

# The core's cosine schedule runs over cfg.epochs; a long nominal run keeps its lr near
# the peak through a benchmark, as the bare loop's constant lr is.
NOMINAL_EPOCHS = 1000


# --- the data and the job ------------------------------------------------------------


def synthetic_images(n: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images (n, C, H, W) and int64 labels: the speed of a step does not
    depend on what the pixels show, only on their shape."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    return images, labels


@dataclass(frozen=True)
class Workload:
    """What every loop in one comparison trains on: the same model, data, batch, lr and precision."""

    model_name: str
    images: torch.Tensor  # uint8 (N, C, H, W), on the CPU
    labels: torch.Tensor  # int64 (N,), on the CPU
    num_classes: int
    batch_size: int  # the global batch
    lr: float
    device: torch.device
    precision: str = "fp32"  # as train.precision: auto | bf16 | fp32
    seed: int = 0

    @property
    def steps(self) -> int:
        return len(self.labels) // self.batch_size  # every loop drops the last partial batch

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return resolve_precision(self.precision, self.device)

    def subset(self, n: int) -> Workload:
        return replace(self, images=self.images[:n], labels=self.labels[:n])

    def info(self) -> dict:
        """The slice of prepared-data info.json that build_loop_state reads."""
        sample = self.images[:4096].float().div_(255.0)
        mean = sample.mean(dim=(0, 2, 3)).tolist()
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
        return {"dataset": "synthetic", "shape": list(self.images.shape[1:]), "mean": mean, "std": std,
                "num_classes": self.num_classes}


def stats_on(w: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    """The same per-channel mean/std the core uses, as (C, 1, 1) tensors on the device."""
    info = w.info()
    mean = torch.tensor(info["mean"], device=w.device).view(-1, 1, 1)
    std = torch.tensor(info["std"], device=w.device).view(-1, 1, 1)
    return mean, std


def autocast(w: Workload, cache_enabled: bool = True):
    """bf16/fp16 autocast for the forward pass, or nothing at all for fp32. Inside a CUDA graph
    capture, autocast's weight cache must be off (cached casts would be stale on replay)."""
    if w.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(w.device.type, dtype=w.amp_dtype, cache_enabled=cache_enabled)


def plain_model(w: Workload) -> tuple[nn.Module, bool]:
    """The model as the core would place it (channels_last for conv nets on CUDA), unwrapped."""
    torch.manual_seed(w.seed)
    c, h, _ = w.images.shape[1:]
    model = build_model(w.model_name, c, h, w.num_classes)
    channels_last = use_channels_last(model, w.device)
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(w.device, memory_format=fmt), channels_last


def adamw(model: nn.Module, lr: float, **options) -> torch.optim.Optimizer:
    # The core's default optimizer and weight decay, so every loop does the same update work.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=TrainParams().weight_decay, **options)


# --- the loops: each has samples, warm_up(steps) and run_epoch() -----------------------


class CoreLoop:
    """The training core, called the way the train stage (stages/train.py) calls it."""

    name = "core"

    def __init__(self, w: Workload, plan: DevicePlan | None = None, ctx: DistContext | None = None,
                 force_data_parallel: bool = False, **cfg_changes):
        self.w = w
        ctx = ctx or DistContext()
        plan = plan or plan_devices(w.device.type, 1, "dp")
        self.cfg = replace(TrainParams(), epochs=NOMINAL_EPOCHS, batch_size=w.batch_size, lr=w.lr, seed=w.seed,
                           accelerator=w.device.type, devices=1, precision=w.precision, **cfg_changes)
        torch.manual_seed(w.seed)
        c, h, _ = w.images.shape[1:]
        model = build_model(w.model_name, c, h, w.num_classes)
        self.model = prepare_model(model, self.cfg, plan, ctx, w.device)
        if force_data_parallel:
            # prepare_model only wraps for two or more GPUs; wrap anyway to exercise scatter/gather.
            self.model = nn.DataParallel(self.model, device_ids=[w.device.index or 0])
        self.state = build_loop_state(self.model, self.cfg, ctx, w.device, w.info(), len(w.labels))
        self.split = place_split(w.images, w.labels, w.device, self.cfg.data_placement)
        self.samples = w.samples
        self.epoch = 0

    def warm_up(self, steps: int) -> None:
        n = min(steps * self.w.batch_size, len(self.w.labels))
        split = place_split(self.w.images[:n], self.w.labels[:n], self.w.device, self.cfg.data_placement)
        train_one_epoch(self.model, split, 0, self.state)

    def run_epoch(self) -> None:
        self.epoch += 1
        train_one_epoch(self.model, self.split, self.epoch, self.state)


class PlainLoop:
    """What the two reference loops share: a plain model and optimizer, and one bare step."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.w):
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def warm_up(self, steps: int) -> None:
        self._steps(min(steps, self.w.steps))

    def run_epoch(self) -> None:
        self._steps(self.w.steps)


class BareLoop(PlainLoop):
    """The floor: nothing but what a training step needs, data already on the device."""

    name = "bare"

    def __init__(self, w: Workload):
        self.w = w
        self.model, self.channels_last = plain_model(w)
        self.model.train()
        self.optimizer = adamw(self.model, w.lr)
        self.images, self.labels = w.images.to(w.device), w.labels.to(w.device)
        self.mean, self.std = stats_on(w)
        self.samples = w.samples

    def _steps(self, steps: int) -> None:
        b = self.w.batch_size
        perm = torch.randperm(len(self.labels), device=self.w.device)
        for s in range(steps):
            idx = perm[s * b:(s + 1) * b]
            self.step((self.images[idx].float() / 255.0 - self.mean) / self.std, self.labels[idx])


class PerSampleImages(Dataset):
    """The tutorial dataset: one image at a time, converted and normalised in Python."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[i].float() / 255.0 - self.mean) / self.std, self.labels[i]


class DataLoaderLoop(PlainLoop):
    """The tutorial loop: DataLoader batches built on the CPU, each copied to the device."""

    def __init__(self, w: Workload, workers: int = 0):
        self.w = w
        self.name = "dataloader" if workers == 0 else f"dataloader-w{workers}"
        self.model, self.channels_last = plain_model(w)
        self.model.train()
        self.optimizer = adamw(self.model, w.lr)
        mean, std = (t.cpu() for t in stats_on(w))
        self.loader = DataLoader(PerSampleImages(w.images, w.labels, mean, std), batch_size=w.batch_size,
                                 shuffle=True, drop_last=True, num_workers=workers,
                                 pin_memory=w.device.type == "cuda")
        self.samples = w.samples

    def _steps(self, steps: int) -> None:
        for s, (x, y) in enumerate(self.loader):
            if s == steps:
                break
            self.step(x.to(self.w.device, non_blocking=True), y.to(self.w.device, non_blocking=True))



class CapturedStepLoop:
    """The floor for one training step on a GPU: the bare loop's step, captured as one CUDA graph.

    The images and labels are resident; the graph holds the gather by a static index buffer, the
    normalisation, forward, cross-entropy, backward and the optimizer step (AdamW with
    capturable=True, so its step counters live on the GPU). A replay launches all of it at once:
    what is left of a step's time is the GPU's own work, which no loop can go below for this
    model, batch and precision. Capture follows PyTorch's whole-network recipe: warm up on a side
    stream, set the grads to None, capture; backward then writes (not adds) the grads on replay.
    """

    name = "graph"

    def __init__(self, w: Workload):
        if w.device.type != "cuda":
            raise RuntimeError("a CUDA graph needs a CUDA device")
        self.w = w
        self.model, self.channels_last = plain_model(w)
        self.model.train()
        self.optimizer = adamw(self.model, w.lr, capturable=True)
        self.images, self.labels = w.images.to(w.device), w.labels.to(w.device)
        self.mean, self.std = stats_on(w)
        self.index = torch.zeros(w.batch_size, dtype=torch.int64, device=w.device)  # the graph's input
        self.samples = w.samples
        self.graph = self._capture()

    def _step(self) -> None:
        x = (self.images[self.index].float() / 255.0 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.w, cache_enabled=False):
            loss = F.cross_entropy(self.model(x), self.labels[self.index])
        loss.backward()
        self.optimizer.step()

    def _capture(self) -> torch.cuda.CUDAGraph:
        self.index.copy_(torch.arange(self.w.batch_size, device=self.w.device) % len(self.labels))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN autotuning and the optimizer's state, outside the graph
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's pool
        with torch.cuda.graph(graph):
            self._step()
        return graph

    def _steps(self, steps: int) -> None:
        b = self.w.batch_size
        perm = torch.randperm(len(self.labels), device=self.w.device)
        for s in range(steps):
            self.index.copy_(perm[s * b:(s + 1) * b])
            self.graph.replay()

    def warm_up(self, steps: int) -> None:
        self._steps(min(steps, self.w.steps))

    def run_epoch(self) -> None:
        self._steps(self.w.steps)

# --- timing ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall seconds of fn(), with the GPU drained before and after so queued work is counted."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Timing:
    samples: int  # per timed epoch
    seconds: list[float]  # one per repeat

    @property
    def best(self) -> float:
        """samples/s of the fastest repeat: the least disturbed by other work on the machine."""
        return self.samples / min(self.seconds)

    @property
    def median(self) -> float:
        return self.samples / statistics.median(self.seconds)


def race(loops: list, repeats: int, warmup_steps: int, device: torch.device) -> dict[str, Timing]:
    """Warm every loop up, then time one epoch of each in turn, `repeats` rounds.

    Interleaving the rounds (a, b, c, a, b, c, ...) spreads any drift in the machine's
    speed (turbo, other processes) over all loops instead of loading it onto one."""
    for loop in loops:
        loop.warm_up(warmup_steps)
    seconds: dict[str, list[float]] = {loop.name: [] for loop in loops}
    for _ in range(repeats):
        for loop in loops:
            seconds[loop.name].append(timed(loop.run_epoch, device))
    return {loop.name: Timing(loop.samples, seconds[loop.name]) for loop in loops}


# --- the machine -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return info


def describe(info: dict) -> str:
    lines = [f"date {info['date']}  torch {info['torch']}  python {info['python']}",
             f"cpu {info['cpu']} ({info['cpu_count']} cores, torch threads {info['torch_threads']}), "
             f"load average {info['load_average']}",
             f"device {info['device']}"]
    if "gpu" in info:
        lines[-1] += (f": {info['gpu']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, bf16 {info['bf16']}, "
                      f"TF32 matmul {info['tf32_matmul']} / cuDNN {info['tf32_cudnn']}")
    return "\n".join(lines)
