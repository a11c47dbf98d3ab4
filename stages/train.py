"""The train stage: check the params against the data, decide on resume, build, train epoch by
epoch, write the outputs. The training core (`stages/core/`) does the work; this shell adds
DVCLive logging, the per-epoch checkpoint, the weights file and the run summary.

Only rank 0 logs and writes. Outputs (paths from dvc.yaml via the CLI):
  model weights (.safetensors), DVCLive metrics + per-epoch plots, run.json
  (devices, batches, timings, peak memory), and the per-epoch checkpoint (persist).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from .core.batches import place_split
from .core.checkpoint import (
    Checkpoint,
    file_digest,
    fingerprint_difference,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .core.devices import DevicePlan, configure_determinism, device_names, peak_memory_mb, plan_devices, process_device
from .core.distributed import (
    DistContext,
    all_gather_floats,
    all_reduce_sum,
    init_distributed,
    launch_workers,
    shutdown_distributed,
    under_launcher,
)
from .core.loop import build_loop_state, evaluate, prepare_model, train_one_epoch, unwrap
from .core.models import build_model, check_input_size, count_parameters, set_backbone_trainable, uses_small_stem
from .core.precision import precision_name
from .core.pretrained import fetch_weights, fit_pretrained, pretrained_normalization, read_pretrained
from .core.weights import model_metadata, save_model
from .errors import UserError
from .io import write_json
from .params import Params, TrainParams, is_resnet, weights_kind
from .prepared import load_prepared


def train_stage(p: Params, data_dir: Path, model_path: Path, metrics_dir: Path, checkpoint_path: Path,
                argv: list[str]) -> None:
    """Plan the devices; start the DDP workers or join their group; train; turn OOM into advice."""
    started = time.perf_counter() - (process_seconds() or 0.0)  # count the process's start-up too
    cfg = p.train
    plan = plan_devices(cfg.accelerator, cfg.devices, cfg.strategy)
    if under_launcher() and plan.strategy != "ddp" and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError(f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but train.strategy = "
                        f"{cfg.strategy!r}; set train.strategy: ddp")
    fetch_weights(p.model, progress=sys.stderr.isatty())  # once, before any worker starts
    if plan.strategy == "ddp" and not under_launcher() and plan.world_size > 1:
        launch_workers(argv, plan.world_size)  # each worker reruns this command as one rank
        return
    ctx = init_distributed(plan.accelerator) if plan.strategy == "ddp" else DistContext()
    try:
        train(p, plan, ctx, data_dir, model_path, metrics_dir, checkpoint_path, started)
    except torch.OutOfMemoryError:
        per_device = plan.per_device_batch(cfg.batch_size // cfg.accumulate, ctx)
        raise UserError(f"CUDA ran out of memory with a per-device batch of {per_device} (train.batch_size = "
                        f"{cfg.batch_size}); try train.batch_size = {max(1, cfg.batch_size // 2)}, or "
                        f"train.accumulate = {cfg.accumulate * 2} to keep the batch in smaller passes") from None
    finally:
        shutdown_distributed()


def train(p: Params, plan: DevicePlan, ctx: DistContext, data_dir: Path, model_path: Path, metrics_dir: Path,
          checkpoint_path: Path, started: float) -> None:
    cfg = p.train
    configure_determinism(cfg.deterministic)
    device = process_device(plan, ctx)
    log = print if ctx.is_main else (lambda *a, **k: None)

    # The data, and the params checked against it.
    train_images, train_labels, info = load_prepared(data_dir, "train")
    val_images, val_labels, _ = load_prepared(data_dir, "val")
    check_batch_size(cfg, len(train_labels), plan, ctx, log)

    # Resume only from a checkpoint of this very run: same params, same data, not yet complete.
    fingerprint = run_fingerprint(p, data_dir)
    resume = resumable_checkpoint(checkpoint_path, fingerprint, cfg, log)
    start_epoch = resume.epoch if resume is not None else 0

    # Build: the model for the data (seeded, so every rank starts from the same weights), checked
    # against the image size before any work; the pretrained weights into it; wrappers, optimizer.
    torch.manual_seed(cfg.seed)
    c, h, _ = info["shape"]
    small_stem = uses_small_stem(p.model.name, h, p.model.small_input_stem)
    model = build_model(p.model.name, c, h, info["num_classes"], small_stem)
    check_input_size(model, p.model.name, c, h)
    pretrained = read_pretrained(p.model)
    normalization = pretrained_normalization(pretrained, c)  # None: the train split's mean and std
    if pretrained is not None and resume is None:
        log(fit_pretrained(model, pretrained, p.model.name, small_stem))
    if resume is not None:
        model.load_state_dict(resume.model_state)
    frozen = start_epoch < cfg.freeze_epochs
    if frozen:
        set_backbone_trainable(model, False)
    wrapped = prepare_model(model, cfg, plan, ctx, device)
    if normalization is not None:
        info = dict(info, mean=normalization[0], std=normalization[1])
    st = build_loop_state(wrapped, cfg, ctx, device, info, len(train_labels))
    history: list[dict] = []
    best_state = None  # the kept weights of the best epoch so far (train.keep: best), on the CPU
    if resume is not None:
        st.optimizer.load_state_dict(resume.optim_state)
        if st.scaler is not None and resume.scaler_state:
            st.scaler.load_state_dict(resume.scaler_state)
        if st.ema is not None:
            st.ema.load_state_dict(resume.ema_state)
        best_state = resume.best_state
        restore_rng(resume.rng)
        st.step, history = resume.step, resume.history
        log(f"Resuming from {checkpoint_path} after epoch {start_epoch} of {cfg.epochs}")
    per_device = plan.per_device_batch(cfg.batch_size // cfg.accumulate, ctx)
    strategy = {"dp": "dp (nn.DataParallel)" if plan.use_data_parallel else "dp (single device)",
                "ddp": f"ddp ({ctx.world_size} processes)"}[plan.strategy]
    where = f"cuda {plan.used_device_ids(ctx)}" if device.type == "cuda" else \
        "cpu" + (f" x{ctx.world_size} processes" if ctx.world_size > 1 else "")
    passes = f" in {cfg.accumulate} passes of {cfg.batch_size // cfg.accumulate}" if cfg.accumulate > 1 else ""
    log(f"train: accelerator {device.type}{'' if device.type == 'cuda' else ' (no CUDA device; training on the CPU)'}, "
        f"devices {where}, strategy {strategy}, global batch {cfg.batch_size}{passes}, per-device batch {per_device}, "
        f"precision {precision_name(st.amp_dtype)}, model {p.model.name} ({count_parameters(model):,} parameters)")

    train_split = place_split(train_images, train_labels, device)
    val_split = place_split(val_images, val_labels, device)
    live = open_live(metrics_dir, history) if ctx.is_main else None

    # The epochs: train, validate (rank 0) the weights to be kept, log, checkpoint, stop early.
    progress = Progress(ctx.is_main, cfg.epochs, cfg.batch_size)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        if frozen and epoch > cfg.freeze_epochs:
            # The wrappers (DDP's gradient reducer) see which parameters train when built: wrap again.
            set_backbone_trainable(model, True)
            wrapped = prepare_model(model, cfg, plan, ctx, device)
            frozen = False
            log(f"epoch {epoch}: the backbone trains from now on, at {cfg.backbone_lr:g} x the lr")
        stats = train_one_epoch(wrapped, train_split, epoch, st, progress.for_epoch(epoch))
        record = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                  "seconds": stats.seconds, "samples": stats.samples,
                  "samples_per_second": stats.samples_per_second}
        history.append(record)
        stop = None
        if ctx.is_main:
            kept = kept_model(wrapped, st)
            val = evaluate(kept, val_split.images, val_split.labels, st.mean, st.std, p.evaluate.batch_size, device,
                           st.amp_dtype, st.channels_last)
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
            log_epoch(live, record)
            if cfg.keep == "best" and best_epoch(history) == epoch:
                best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
            save_checkpoint(checkpoint_path, unwrap(wrapped), st.optimizer, st.scaler, epoch, st.step, history,
                            fingerprint, st.ema, best_state)
            log(f"epoch {epoch}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
                f"val loss {val.loss:.4f} acc {val.accuracy:.4f}  "
                f"{stats.samples_per_second:,.0f} samples/s  {stats.seconds:.2f}s", flush=True)
            stop = early_stop(history, cfg.patience)
        if cfg.patience and stop_on_every_rank(stop is not None, ctx, device):
            log(stop)
            break

    # The outputs: rank 0 writes the weights, the metrics and the run summary.
    peaks = all_gather_floats(peak_memory_mb(plan, device), ctx, device)
    if not ctx.is_main:
        return
    kept = kept_model(wrapped, st)
    if best_state is not None:
        kept.load_state_dict(best_state)
    save_model(model_path, kept, model_metadata(p.model.name, info, small_stem,
                                                pretrained.source if pretrained else None, normalization))
    throughput = sum(r["samples"] for r in history) / max(sum(r["seconds"] for r in history), 1e-9)
    for name, value in (("samples_per_second", round(throughput, 1)), ("num_devices", plan.num_devices(ctx)),
                        ("world_size", ctx.world_size)):
        live.log_metric(name, value, plot=False)
    live.end()
    best = best_epoch(history)
    write_json(metrics_dir / "run.json", {
        "accelerator": device.type,
        "strategy": plan.strategy,
        "data_parallel": plan.use_data_parallel,
        "device_ids": plan.used_device_ids(ctx),
        "device_names": device_names(plan, ctx, device),
        "num_devices": plan.num_devices(ctx),
        "world_size": ctx.world_size,
        "global_batch": cfg.batch_size,
        "accumulate": cfg.accumulate,
        "per_device_batch": per_device,
        "precision": precision_name(st.amp_dtype),
        "model": p.model.name,
        "parameters": count_parameters(model),
        "small_input_stem": small_stem if is_resnet(p.model.name) else None,
        "pretrained": pretrained.source if pretrained else None,
        "normalization": normalization[2] if normalization else "train split",
        "dataset": info["dataset"],
        "epochs": cfg.epochs,
        "epochs_run": len(history),
        "stopped_early": early_stop(history, cfg.patience) is not None,
        "best_epoch": best,
        "best_val_accuracy": history[best - 1]["val_accuracy"],
        "kept": f"best (epoch {best})" if cfg.keep == "best" else f"last (epoch {len(history)})",
        "resumed_from_epoch": start_epoch or None,
        "epoch_seconds": [round(r["seconds"], 4) for r in history],
        "stage_seconds": round(time.perf_counter() - started, 3),
        "data_on_device": train_split.images.device.type == "cuda",
        "torch_version": torch.__version__,
        "train_params": p.section_dict("train"),
        "samples_per_second": round(throughput, 1),
        "peak_memory_mb": peaks,
        "peak_memory_kind": "cuda allocated per device" if device.type == "cuda" else "process max RSS per process",
    })
    log(f"saved {model_path}  ({throughput:,.0f} samples/s over {len(history)} epochs)")


# --- the steps above, spelled out ---------------------------------------------------------


def check_batch_size(cfg: TrainParams, n_train: int, plan: DevicePlan, ctx: DistContext, log) -> None:
    batch_size = cfg.batch_size
    if batch_size > n_train:
        raise UserError(f"train.batch_size = {batch_size} is larger than the training split ({n_train} images)")
    if batch_size % (ctx.world_size * cfg.accumulate):
        raise UserError(f"train.batch_size = {batch_size} must be divisible by the {ctx.world_size} ddp processes "
                        f"times train.accumulate = {cfg.accumulate}")
    if plan.use_data_parallel and batch_size // cfg.accumulate < plan.num_devices(ctx):
        log(f"warning: train.batch_size = {batch_size} is smaller than the {plan.num_devices(ctx)} GPUs; "
            f"some GPUs get no samples")


def run_fingerprint(p: Params, data_dir: Path) -> dict:
    """What the weights depend on: the model and train params, the content of a local weights file,
    and the prepared training data. (model.download decides only whether a file may be fetched.)"""
    fingerprint = {f"{section}.{key}": value for section in ("model", "train")
                   for key, value in p.section_dict(section).items() if f"{section}.{key}" != "model.download"}
    if weights_kind(p.model.weights) == "file":
        fingerprint["model.weights sha256"] = file_digest([Path(p.model.weights)])[:16]
    fingerprint["prepared data sha256"] = file_digest(
        [data_dir / "info.json", data_dir / "train.safetensors", data_dir / "val.safetensors"])[:16]
    return fingerprint


def resumable_checkpoint(path: Path, fingerprint: dict, cfg: TrainParams, log) -> Checkpoint | None:
    """The checkpoint at `path` if it belongs to this run and has epochs left; says why not otherwise."""
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    why = fingerprint_difference(ck.fingerprint, fingerprint)
    if why is not None:
        log(f"Not resuming from {path}: it was made with other params or data: {why}")
        return None
    if ck.epoch >= cfg.epochs or early_stop(ck.history, cfg.patience):
        log(f"Not resuming from {path}: that run completed ({ck.epoch} epochs); training afresh")
        return None
    return ck


def kept_model(wrapped: torch.nn.Module, st) -> torch.nn.Module:
    """The weights that are validated and saved: the moving average with train.ema, else the model's."""
    return st.ema.module if st.ema is not None else unwrap(wrapped)


def best_epoch(history: list[dict]) -> int:
    """The epoch with the highest validation accuracy (the first of equals)."""
    return max(history, key=lambda r: r["val_accuracy"])["epoch"]


def early_stop(history: list[dict], patience: int) -> str | None:
    """Why training stops here (train.patience epochs without a better val accuracy), or None."""
    if not patience or not history:
        return None
    best = best_epoch(history)
    if history[-1]["epoch"] - best < patience:
        return None
    return (f"early stop after epoch {history[-1]['epoch']}: val accuracy {history[best - 1]['val_accuracy']:.4f} "
            f"of epoch {best} was not bettered in {patience} epochs (train.patience)")


def stop_on_every_rank(stop: bool, ctx: DistContext, device: torch.device) -> bool:
    """Rank 0's decision (it alone validates), shared with every rank so that all leave the loop together."""
    return all_reduce_sum(torch.tensor(float(stop), device=device), ctx).item() > 0


def open_live(metrics_dir: Path, history: list[dict]):
    """DVCLive in `metrics_dir`; a resumed run replays the epochs it kept, so the curves are whole."""
    from dvclive import Live

    live = Live(dir=str(metrics_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for record in history:
        log_epoch(live, record)
    return live


def log_epoch(live, record: dict) -> None:
    live.log_metric("train/loss", round(record["train_loss"], 6))
    live.log_metric("train/accuracy", round(record["train_accuracy"], 6))
    live.log_metric("val/loss", round(record["val_loss"], 6))
    live.log_metric("val/accuracy", round(record["val_accuracy"], 6))
    live.next_step()


def process_seconds() -> float | None:
    """Wall time since this process started (imports included), from /proc; None elsewhere."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return None


class Progress:
    """A tqdm bar per epoch in a terminal; nothing per step otherwise (the epoch line says it all)."""

    def __init__(self, enabled: bool, epochs: int, samples_per_step: int):
        self.enabled = enabled and sys.stderr.isatty()
        self.epochs, self.samples_per_step = epochs, samples_per_step

    def for_epoch(self, epoch: int):
        if not self.enabled:
            return None
        from tqdm import tqdm

        bar = None

        def update(step: int, steps: int, loss: torch.Tensor) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=steps, desc=f"epoch {epoch}/{self.epochs}", leave=False, unit="step")
            bar.update(1)
            if step % 10 == 0 or step == steps:  # .item() syncs the GPU: not every step
                rate = bar.format_dict["rate"] or 0.0
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate * self.samples_per_step:,.0f}")
            if step == steps:
                bar.close()

        return update
