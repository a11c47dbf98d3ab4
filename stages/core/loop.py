"""The training and evaluation loops, written out: wrap the model, train_one_epoch, evaluate.

The train stage (`stages/train.py`) drives them epoch by epoch; the scaling probe and the
benchmarks call the same functions, so what they time is what training runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..params import TrainParams
from .batches import Split, batch_stream
from .devices import DevicePlan
from .distributed import DistContext, all_reduce_sum
from .precision import autocast_context, resolve_precision
from .transforms import FLIP_DATASETS, crop_padding, normalize, random_crop_flip, stats_tensors

# --- the model: placement, wrappers, optimizer --------------------------------------------


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last pays for conv nets on CUDA; with one input channel the first conv's weight
    has ambiguous strides and DDP warns about gradient layouts, so keep NCHW there."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return device.type == "cuda" and first_conv is not None and first_conv.in_channels > 1


def prepare_model(model: nn.Module, cfg: TrainParams, plan: DevicePlan, ctx: DistContext,
                  device: torch.device) -> nn.Module:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
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


def rank_batches(perm: torch.Tensor, global_batch: int, ctx: DistContext) -> list[torch.Tensor]:
    """This rank's rows of every complete global batch of `perm`: rank r takes the r-th of
    world_size equal slices, so the ranks together see exactly the single process's batches."""
    local = global_batch // ctx.world_size
    return [perm[s * global_batch + ctx.rank * local : s * global_batch + (ctx.rank + 1) * local]
            for s in range(len(perm) // global_batch)]


# --- what one run's epochs share ----------------------------------------------------------


@dataclass
class LoopState:
    """Everything an epoch needs beyond the model and the data; built once per run."""

    optimizer: torch.optim.Optimizer
    cfg: TrainParams
    ctx: DistContext
    device: torch.device
    mean: torch.Tensor  # (C, 1, 1) on device
    std: torch.Tensor
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool
    augment_pad: int  # 0 = no crop
    augment_flip: bool
    total_steps: int
    step: int = 0  # optimizer steps taken so far (the lr schedule's position)


def build_loop_state(model: nn.Module, cfg: TrainParams, ctx: DistContext, device: torch.device, info: dict,
                     n_train: int) -> LoopState:
    """The optimizer, precision, normalisation and augmentation of a run; `info` is the prepared data's."""
    amp_dtype = resolve_precision(cfg.precision, device)
    mean, std = stats_tensors(info["mean"], info["std"], device)
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


# --- one epoch of training ------------------------------------------------------------------


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_one_epoch(model: nn.Module, split: Split, epoch: int, st: LoopState, progress=None) -> EpochStats:
    """One pass over a fresh permutation of the split. Each rank takes its slice of every
    global batch; the last incomplete global batch is dropped so all ranks step together.
    `progress(step, steps, loss)`, if given, is called after every step."""
    cfg, ctx = st.cfg, st.ctx
    model.train()
    global_batch = cfg.batch_size
    local_batch = global_batch // ctx.world_size
    steps = len(split) // global_batch
    batches = rank_batches(epoch_permutation(len(split), cfg.seed, epoch).to(split.images.device), global_batch, ctx)
    aug_gen = None
    if st.augment_pad or st.augment_flip:
        aug_gen = torch.Generator(device=st.device).manual_seed(cfg.seed * 7919 + epoch * 131 + ctx.rank)
    # Running sums stay on the device: no host sync per step, and only two extra kernels.
    loss_sum = torch.zeros((), dtype=torch.float32, device=st.device)
    correct = torch.zeros((), dtype=torch.int64, device=st.device)
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)
    start = time.perf_counter()
    with batch_stream(split, batches, st.device) as stream:
        for s, (x_u8, y) in enumerate(stream):
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


# --- evaluation: validation during training, and the evaluate stage's test pass ------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy (a fraction) and predicted labels (int64, on the CPU).

    The split's rows are read in order, batch by batch: indexed where it lives if resident,
    streamed from its mapping otherwise (`core.batches`)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    preds = []
    batches = [slice(start, start + batch_size) for start in range(0, len(split), batch_size)]
    with batch_stream(split, batches, device) as stream:
        for x, y in stream:
            x = normalize(x, mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(device, amp_dtype):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            preds.append(logits.argmax(dim=1))
    model.train(was_training)
    predicted = torch.cat(preds).cpu()
    accuracy = (predicted == split.labels.cpu()).double().mean().item()
    return loss_sum.item() / len(split), accuracy, predicted
