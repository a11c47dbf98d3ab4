"""The training and evaluation loops, written out: wrap the model, train_one_epoch, evaluate.

The train stage (`stages/train.py`) drives them epoch by epoch; the scaling probe and the
benchmarks call the same functions, so what they time is what training runs. The recipe's
knobs (train.label_smoothing, warmup_epochs, ema, mixup_alpha, cutmix_alpha, clip_grad_norm,
accumulate, backbone_lr) are plain steps of `train_one_epoch`, each a no-op when off.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..params import TrainParams
from .batches import Split, batch_stream
from .devices import DevicePlan
from .distributed import DistContext, all_reduce_sum
from .models import classifier_head
from .precision import autocast_context, resolve_precision
from .transforms import crop_padding, normalize, random_crop_flip, stats_tensors, use_hflip

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
    mode = compile_mode(cfg.compile)
    if mode is not None:
        model = torch.compile(model, mode=mode)
    return model


def compile_mode(setting: bool | str) -> str | None:
    """torch.compile's mode for train.compile (None: not compiled). reduce-overhead records the
    compiled forward and backward as CUDA graphs, so a step launches a few graphs instead of one
    kernel at a time: what bounds small models, whose kernels are shorter than their launches."""
    if setting is False:
        return None
    return "default" if setting is True else setting


# The first steps of a compiled model compile it (and, with reduce-overhead, warm up and record its
# CUDA graphs: cudagraph trees record on the third call); their time is compile time, not training.
COMPILE_WARMUP_STEPS = 3


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def ddp_wrapper(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel wrapper among the model's wrappers (for `no_sync`), or None."""
    while not isinstance(model, nn.parallel.DistributedDataParallel):
        if isinstance(model, nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return None
    return model


def parameter_groups(model: nn.Module, cfg: TrainParams) -> list:
    """All parameters in one group; with train.backbone_lr below 1, the backbone and the classifier
    head apart, each group's `lr_scale` multiplying the scheduled lr."""
    if cfg.backbone_lr == 1.0:
        return list(model.parameters())
    head = classifier_head(unwrap(model)) + "."
    named = list(unwrap(model).named_parameters())
    return [{"params": [p for n, p in named if not n.startswith(head)], "lr_scale": cfg.backbone_lr},
            {"params": [p for n, p in named if n.startswith(head)], "lr_scale": 1.0}]


def make_optimizer(model: nn.Module, cfg: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """SGD or AdamW. On CUDA the fused kernels: one launch updates every parameter, and with a
    GradScaler the inf check stays on the GPU (no host sync). The CPU keeps the default
    implementation, so CPU runs keep their bytes."""
    params = parameter_groups(model, cfg)
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr to 0 over the whole run, per optimizer step."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def scheduled_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to base_lr over the first warmup_steps optimizer steps (train.warmup_epochs),
    then the cosine decay to 0 over the steps left."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_lr(base_lr, step - warmup_steps, total_steps - warmup_steps)


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the average's next update after `updates` earlier ones: train.ema, warmed up as
    tf.train.ExponentialMovingAverage (num_updates) and timm's ModelEma do, min(decay, (1 + n) / (10 + n)).
    Without it a short run keeps its first weights in the average: 315 steps at 0.999 leave 0.999^315
    = 73% of them. With it the average spans about the last tenth of the steps taken so far, up to
    1 / (1 - decay) steps; a decay fixed to the run's length (torchvision's reference) would also
    work, but this one needs nothing but the count AveragedModel already keeps (and checkpoints)."""
    return min(decay, (1 + updates) / (10 + updates))


def make_ema(model: nn.Module, decay: float):
    """torch's exponential moving average of the plain model's weights and BatchNorm statistics
    (train.ema): after each optimizer step, average = d * average + (1 - d) * weights, where
    d = ema_decay(decay, updates so far) warms up to train.ema. The count is AveragedModel's
    n_averaged buffer, saved in the checkpoint with the average, so a resumed run continues exactly."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    def warmed_up(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        # n_averaged: the updates before this one (AveragedModel copies the weights on the first)
        get_ema_multi_avg_fn(ema_decay(decay, int(n_averaged)))(averaged, current, n_averaged)

    return AveragedModel(unwrap(model), multi_avg_fn=warmed_up, use_buffers=True)


def make_mix(cfg: TrainParams, num_classes: int):
    """torchvision's batched MixUp and/or CutMix (train.mixup_alpha, cutmix_alpha); with both, each batch
    gets one of them at random. They take (images, labels) and give soft labels (N, classes)."""
    if not (cfg.mixup_alpha or cfg.cutmix_alpha):
        return None
    from torchvision.transforms import v2

    mixes = ([v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)] if cfg.mixup_alpha else []) + \
            ([v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes)] if cfg.cutmix_alpha else [])
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank (and after a resume): derived from (seed, epoch) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def rank_batches(perm: torch.Tensor, global_batch: int, ctx: DistContext, accumulate: int = 1) -> list[torch.Tensor]:
    """This rank's rows of every forward pass of `perm`'s complete global batches, in order: each
    global batch is `accumulate` passes, and of each pass rank r takes the r-th of world_size equal
    slices, so the ranks together see exactly the single process's batches."""
    micro = global_batch // accumulate
    local = micro // ctx.world_size
    starts = [s * global_batch + m * micro + ctx.rank * local
              for s in range(len(perm) // global_batch) for m in range(accumulate)]
    return [perm[first : first + local] for first in starts]


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
    warmup_steps: int
    ema: nn.Module | None  # torch's AveragedModel of the plain model (train.ema), or None
    mix: object | None  # MixUp / CutMix (train.mixup_alpha, cutmix_alpha), or None
    step: int = 0  # optimizer steps taken so far (the lr schedule's position)
    untimed_steps: int = 0  # steps still to run before timing counts (a compiled model compiles in them)
    compile_seconds: float = 0.0  # wall time of those steps, over the run

    def model_wrapped(self) -> None:
        """The model was just wrapped: compiled, its first steps compile (and capture) and are timed apart."""
        if compile_mode(self.cfg.compile) is not None:
            self.untimed_steps = COMPILE_WARMUP_STEPS


def build_loop_state(model: nn.Module, cfg: TrainParams, ctx: DistContext, device: torch.device, info: dict,
                     n_train: int) -> LoopState:
    """The optimizer, precision, normalisation and augmentation of a run; `info` is the prepared data's."""
    amp_dtype = resolve_precision(cfg.precision, device)
    mean, std = stats_tensors(info["mean"], info["std"], device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 and device.type == "cuda" else None
    size = info["shape"][-1]
    steps_per_epoch = n_train // cfg.batch_size
    st = LoopState(
        optimizer=make_optimizer(model, cfg, device), cfg=cfg, ctx=ctx, device=device, mean=mean, std=std,
        amp_dtype=amp_dtype, scaler=scaler,
        channels_last=use_channels_last(model, device),
        augment_pad=crop_padding(size) if cfg.augment else 0,
        augment_flip=cfg.augment and use_hflip(cfg.hflip, info.get("dataset")),
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=cfg.warmup_epochs * steps_per_epoch,
        ema=make_ema(model, cfg.ema) if cfg.ema else None,
        mix=make_mix(cfg, info["num_classes"]),
    )
    st.model_wrapped()
    return st


# --- one epoch of training ------------------------------------------------------------------


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int  # trained in `seconds` (the steps that compiled are in neither)
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train_one_epoch(model: nn.Module, split: Split, epoch: int, st: LoopState, progress=None) -> EpochStats:
    """One pass over a fresh permutation of the split, one optimizer step per global batch
    (train.batch_size samples). Each step runs train.accumulate forward/backward passes of
    batch_size / accumulate samples, each rank taking its slice of every one; gradients add up
    across them (DDP all-reduces only on the last). The last incomplete global batch is dropped
    so all ranks step together. `progress(step, steps, loss)`, if given, is called after every step
    with the loss as a device tensor (reading it is the caller's choice: `.item()` waits for the GPU).
    Nothing here waits for the GPU between steps: the sums stay on the device until the epoch ends.
    The first steps of a compiled model are timed apart, into `st.compile_seconds`."""
    cfg, ctx = st.cfg, st.ctx
    model.train()
    global_batch = cfg.batch_size
    local_batch = cfg.pass_batch // ctx.world_size  # this rank's samples per forward pass
    steps = len(split) // global_batch
    # Each rank's rows of every forward pass, in order: `accumulate` passes per optimizer step.
    batches = rank_batches(epoch_permutation(len(split), cfg.seed, epoch).to(split.images.device), global_batch,
                           ctx, cfg.accumulate)
    ddp = ddp_wrapper(model)
    aug_gen = None
    if st.augment_pad or st.augment_flip:
        aug_gen = torch.Generator(device=st.device).manual_seed(cfg.seed * 7919 + epoch * 131 + ctx.rank)
    # Running sums stay on the device: no host sync per step, and only two extra kernels.
    loss_sum = torch.zeros((), dtype=torch.float32, device=st.device)
    correct = torch.zeros((), dtype=torch.int64, device=st.device)
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)
    start = time.perf_counter()
    untimed = min(st.untimed_steps, steps)
    with batch_stream(split, batches, st.device) as stream:
        for s in range(steps):
            if s == untimed and untimed:  # compiled (and captured): the timing starts here
                if st.device.type == "cuda":
                    torch.cuda.synchronize(st.device)
                now = time.perf_counter()
                st.compile_seconds += now - start
                st.untimed_steps -= untimed
                start = now
            lr = scheduled_lr(cfg.lr, st.step, st.total_steps, st.warmup_steps)
            for group in st.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            st.optimizer.zero_grad(set_to_none=True)
            for micro in range(cfg.accumulate):
                x_u8, y = next(stream)
                x = normalize(x_u8, st.mean, st.std)  # (b, C, H, W) float32
                if aug_gen is not None:
                    x = random_crop_flip(x, st.augment_pad, st.augment_flip, aug_gen)
                target = y
                if st.mix is not None:
                    x, target = st.mix(x, y)  # target: (b, classes) mixed one-hot labels
                if st.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                # DDP all-reduces gradients in backward: only once per optimizer step, on its last pass.
                last = micro == cfg.accumulate - 1
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    with autocast_context(st.device, st.amp_dtype):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                    # The mean over the whole step's batch: each of its passes counts 1/accumulate.
                    scaled = loss / cfg.accumulate if cfg.accumulate > 1 else loss
                    if st.scaler is not None:
                        st.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                loss_sum += loss.detach()
                correct += (logits.detach().argmax(dim=1) == y).sum()  # against the unmixed labels
            if cfg.clip_grad_norm:
                if st.scaler is not None:
                    st.scaler.unscale_(st.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            if st.scaler is not None:
                st.scaler.step(st.optimizer)
                st.scaler.update()
            else:
                st.optimizer.step()
            st.step += 1
            if st.ema is not None:
                st.ema.update_parameters(unwrap(model))
            if progress is not None:
                progress(s + 1, steps, loss)
    if st.device.type == "cuda":
        torch.cuda.synchronize(st.device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum.double() * local_batch, correct.double()]), ctx)
    samples = steps * global_batch
    if untimed == steps and untimed:  # an epoch too short to leave a timed step: all of it compiled
        st.compile_seconds += seconds
        st.untimed_steps -= untimed
    timed = (steps - untimed) * global_batch
    return EpochStats(totals[0].item() / samples, totals[1].item() / samples, timed, seconds if timed else 0.0)


# --- evaluation: validation during training, and the evaluate stage's test pass ------------


class Evaluation(NamedTuple):
    loss: float  # mean cross-entropy
    accuracy: float  # a fraction
    predicted: torch.Tensor  # int64 labels, on the CPU
    top5_accuracy: float | None  # the true label among the 5 highest scores; None with 5 classes or fewer


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
) -> Evaluation:
    """Mean cross-entropy, accuracy, predicted labels and top-5 accuracy of `model` on the images.

    The split's rows are read in order, batch by batch: indexed where it lives if resident,
    streamed from its mapping otherwise (`core.batches`)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
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
            if logits.shape[1] > 5:
                top5 += (logits.topk(5, dim=1).indices == y[:, None]).any(dim=1).sum()
    model.train(was_training)
    predicted = torch.cat(preds).cpu()
    accuracy = (predicted == split.labels.cpu()).double().mean().item()
    top5_accuracy = top5.item() / len(split) if logits.shape[1] > 5 else None
    return Evaluation(loss_sum.item() / len(split), accuracy, predicted, top5_accuracy)
