"""The training loop, written out: place data, wrap the model, train_one_epoch, fit.

This core needs only torch, so it runs and is benchmarked on a bare GPU machine;
the stage around it (DVC, DVCLive, checkpoints, weights) lives in `train_stage.py`.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import autocast_context, evaluate, stats_tensors
from .parallel import DevicePlan, DistContext, all_reduce_sum, unwrap
from .params import TrainParams
from .transforms import FLIP_DATASETS, crop_padding, random_crop_flip, normalize


# --- data placement -----------------------------------------------------------------


@dataclass
class Split:
    """One split's uint8 images (N, C, H, W) and int64 labels, on `device` or pinned on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def place_split(images: torch.Tensor, labels: torch.Tensor, device: torch.device, max_fraction: float = 0.4) -> Split:
    """Put a whole split on the GPU once when it fits in `max_fraction` of free memory
    (batches are then built by indexing on the device); otherwise pin it on the CPU so
    batch copies can be non-blocking."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() + labels.numel() * 8 < max_fraction * free:
            return Split(images.to(device), labels.to(device))
        return Split(images.pin_memory(), labels.pin_memory())
    return Split(images, labels)


def gather_batch(split: Split, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index a batch out of the split and bring it to `device` (a no-op copy when it lives there)."""
    if split.images.device.type == device.type:  # placed there by place_split: index in place
        return split.images[idx], split.labels[idx]
    idx = idx.cpu()
    x = torch.empty((len(idx), *split.images.shape[1:]), dtype=torch.uint8, pin_memory=device.type == "cuda")
    torch.index_select(split.images, 0, idx, out=x)
    return x.to(device, non_blocking=True), split.labels[idx].to(device, non_blocking=True)


# --- precision, wrapping, optimizer -------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that support it, fp32 elsewhere. None means plain fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last pays for conv nets on CUDA; with one input channel the first conv's weight
    has ambiguous strides and DDP warns about gradient layouts, so keep NCHW there."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return device.type == "cuda" and first_conv is not None and first_conv.in_channels > 1


def prepare_model(model: nn.Module, cfg: TrainParams, plan: DevicePlan, ctx: DistContext, device: torch.device) -> nn.Module:
    """Move to the device (channels_last for conv nets on CUDA) and wrap for dp / ddp / compile."""
    channels_last = use_channels_last(model, device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if plan.use_data_parallel:
        model = nn.DataParallel(model, device_ids=plan.device_ids, output_device=plan.device_ids[0])
    elif ctx.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        model = torch.compile(model)
    return model


def make_optimizer(model: nn.Module, cfg: TrainParams) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr to 0 over the whole run, per optimizer step."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank (and after a resume): derived from (seed, epoch) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


# --- one epoch ----------------------------------------------------------------------


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


@dataclass
class LoopState:
    """Everything one epoch needs beyond the model: built once per run by `fit`."""

    optimizer: torch.optim.Optimizer
    cfg: TrainParams
    ctx: DistContext
    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool
    augment_pad: int  # 0 = no crop
    augment_flip: bool
    total_steps: int
    step: int = 0


def train_one_epoch(model: nn.Module, split: Split, epoch: int, st: LoopState,
                    progress: Callable[[int, int, torch.Tensor], None] | None = None) -> EpochStats:
    """One pass over a fresh permutation of the split. Each rank takes its slice of every
    global batch; the last incomplete global batch is dropped so all ranks step together."""
    cfg, ctx = st.cfg, st.ctx
    model.train()
    global_batch = cfg.batch_size
    local_batch = global_batch // ctx.world_size
    steps = len(split) // global_batch
    perm = epoch_permutation(len(split), cfg.seed, epoch).to(split.images.device)
    aug_gen = None
    if st.augment_pad or st.augment_flip:
        aug_gen = torch.Generator(device=st.device).manual_seed(cfg.seed * 7919 + epoch * 131 + ctx.rank)
    # Running sums stay on the device: no host sync per step, and only two extra kernels.
    loss_sum = torch.zeros((), dtype=torch.float32, device=st.device)
    correct = torch.zeros((), dtype=torch.int64, device=st.device)
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)
    start = time.perf_counter()
    for s in range(steps):
        idx = perm[s * global_batch + ctx.rank * local_batch : s * global_batch + (ctx.rank + 1) * local_batch]
        x_u8, y = gather_batch(split, idx, st.device)
        x = normalize(x_u8, st.mean, st.std)  # (b, C, H, W) float32
        if aug_gen is not None:
            x = random_crop_flip(x, st.augment_pad, st.augment_flip, aug_gen)
        if st.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in st.optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.lr, st.step, st.total_steps)
        with autocast_context(st.device, st.amp_dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        st.optimizer.zero_grad(set_to_none=True)
        if st.scaler is not None:
            st.scaler.scale(loss).backward()
            st.scaler.step(st.optimizer)
            st.scaler.update()
        else:
            loss.backward()
            st.optimizer.step()
        st.step += 1
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(dim=1) == y).sum()
        if progress is not None:
            progress(s + 1, steps, loss)
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum.double() * local_batch, correct.double()]), ctx)
    samples = steps * global_batch
    return EpochStats(totals[0].item() / samples, totals[1].item() / samples, samples, seconds)


# --- the run ------------------------------------------------------------------------


def peak_memory_mb(plan: DevicePlan, device: torch.device) -> list[float]:
    """Peak memory per device used by this process (CUDA) or of the process itself (CPU)."""
    if device.type == "cuda":
        ids = plan.device_ids if plan.use_data_parallel else [device.index]
        return [round(torch.cuda.max_memory_allocated(i) / 2**20, 1) for i in ids]
    return [round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)]


def build_loop_state(model: nn.Module, cfg: TrainParams, ctx: DistContext, device: torch.device, info: dict,
                     n_train: int) -> LoopState:
    amp_dtype = resolve_precision(cfg.precision, device)
    mean, std = stats_tensors(info, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 and device.type == "cuda" else None
    size = info["shape"][-1]
    return LoopState(
        optimizer=make_optimizer(model, cfg), cfg=cfg, ctx=ctx, device=device, mean=mean, std=std,
        amp_dtype=amp_dtype, scaler=scaler,
        channels_last=use_channels_last(model, device),
        augment_pad=crop_padding(size) if cfg.augment else 0,
        augment_flip=cfg.augment and info.get("dataset") in FLIP_DATASETS,
        total_steps=cfg.epochs * (n_train // cfg.batch_size),
    )


def fit(model: nn.Module, train: Split, val: Split, st: LoopState, eval_batch_size: int, start_epoch: int = 0,
        history: list[dict] | None = None, on_epoch: Callable[[int, list[dict]], None] | None = None,
        progress_factory: Callable[[int], Callable] | None = None) -> list[dict]:
    """Train epochs start_epoch+1 .. cfg.epochs; after each, validate (rank 0) and call on_epoch."""
    history = list(history or [])
    for epoch in range(start_epoch + 1, st.cfg.epochs + 1):
        progress = progress_factory(epoch) if progress_factory else None
        stats = train_one_epoch(model, train, epoch, st, progress)
        record = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                  "seconds": stats.seconds, "samples": stats.samples,
                  "samples_per_second": stats.samples_per_second}
        if st.ctx.is_main:
            val_loss, val_acc, _ = evaluate(unwrap(model), val.images, val.labels, st.mean, st.std,
                                            eval_batch_size, st.device, st.amp_dtype, st.channels_last)
            record.update(val_loss=val_loss, val_accuracy=val_acc)
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, history)
    return history
