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
    init_distributed,
    launch_workers,
    shutdown_distributed,
    under_launcher,
)
from .core.loop import build_loop_state, evaluate, prepare_model, train_one_epoch, unwrap
from .core.models import build_model, count_parameters
from .core.precision import precision_name
from .core.weights import model_metadata, save_model
from .errors import UserError
from .io import write_json
from .params import Params
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
    if plan.strategy == "ddp" and not under_launcher() and plan.world_size > 1:
        launch_workers(argv, plan.world_size)  # each worker reruns this command as one rank
        return
    ctx = init_distributed(plan.accelerator) if plan.strategy == "ddp" else DistContext()
    try:
        train(p, plan, ctx, data_dir, model_path, metrics_dir, checkpoint_path, started)
    except torch.OutOfMemoryError:
        per_device = plan.per_device_batch(cfg.batch_size, ctx)
        raise UserError(f"CUDA ran out of memory with a per-device batch of {per_device} (train.batch_size = "
                        f"{cfg.batch_size}); try train.batch_size = {max(1, cfg.batch_size // 2)}") from None
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
    check_batch_size(cfg.batch_size, len(train_labels), plan, ctx, log)

    # Resume only from a checkpoint of this very run: same params, same data, not yet complete.
    fingerprint = run_fingerprint(p, data_dir)
    resume = resumable_checkpoint(checkpoint_path, fingerprint, cfg.epochs, log)

    # Build: the model (seeded, so every rank starts from the same weights), wrappers, optimizer.
    torch.manual_seed(cfg.seed)
    c, h, _ = info["shape"]
    model = build_model(p.model.name, c, h, info["num_classes"])
    if resume is not None:
        model.load_state_dict(resume.model_state)
    wrapped = prepare_model(model, cfg, plan, ctx, device)
    st = build_loop_state(wrapped, cfg, ctx, device, info, len(train_labels))
    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        st.optimizer.load_state_dict(resume.optim_state)
        if st.scaler is not None and resume.scaler_state:
            st.scaler.load_state_dict(resume.scaler_state)
        restore_rng(resume.rng)
        st.step, history, start_epoch = resume.step, resume.history, resume.epoch
        log(f"Resuming from {checkpoint_path} after epoch {start_epoch} of {cfg.epochs}")
    per_device = plan.per_device_batch(cfg.batch_size, ctx)
    strategy = {"dp": "dp (nn.DataParallel)" if plan.use_data_parallel else "dp (single device)",
                "ddp": f"ddp ({ctx.world_size} processes)"}[plan.strategy]
    where = f"cuda {plan.used_device_ids(ctx)}" if device.type == "cuda" else \
        "cpu" + (f" x{ctx.world_size} processes" if ctx.world_size > 1 else "")
    log(f"train: accelerator {device.type}{'' if device.type == 'cuda' else ' (no CUDA device; training on the CPU)'}, "
        f"devices {where}, strategy {strategy}, global batch {cfg.batch_size}, per-device batch {per_device}, "
        f"precision {precision_name(st.amp_dtype)}, model {p.model.name} ({count_parameters(model):,} parameters)")

    train_split = place_split(train_images, train_labels, device, cfg.data_placement)
    val_split = place_split(val_images, val_labels, device, cfg.data_placement)
    log(f"data: {len(train_split):,} training images, {train_split.where()}")
    live = open_live(metrics_dir, history) if ctx.is_main else None

    # The epochs: train, validate (rank 0), log, checkpoint.
    progress = Progress(ctx.is_main, cfg.epochs, cfg.batch_size)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        stats = train_one_epoch(wrapped, train_split, epoch, st, progress.for_epoch(epoch))
        record = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                  "seconds": stats.seconds, "samples": stats.samples,
                  "samples_per_second": stats.samples_per_second}
        history.append(record)
        if not ctx.is_main:
            continue
        val_loss, val_acc, _ = evaluate(unwrap(wrapped), val_split, st.mean, st.std, p.evaluate.batch_size, device,
                                        st.amp_dtype, st.channels_last)
        record.update(val_loss=val_loss, val_accuracy=val_acc)
        log_epoch(live, record)
        save_checkpoint(checkpoint_path, unwrap(wrapped), st.optimizer, st.scaler, epoch, st.step, history,
                        fingerprint)
        log(f"epoch {epoch}/{cfg.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.4f}  "
            f"val loss {val_loss:.4f} acc {val_acc:.4f}  "
            f"{stats.samples_per_second:,.0f} samples/s  {stats.seconds:.2f}s", flush=True)

    # The outputs: rank 0 writes the weights, the metrics and the run summary.
    peaks = all_gather_floats(peak_memory_mb(plan, device), ctx, device)
    if not ctx.is_main:
        return
    save_model(model_path, unwrap(wrapped), model_metadata(p.model.name, info))
    throughput = sum(r["samples"] for r in history) / max(sum(r["seconds"] for r in history), 1e-9)
    for name, value in (("samples_per_second", round(throughput, 1)), ("num_devices", plan.num_devices(ctx)),
                        ("world_size", ctx.world_size)):
        live.log_metric(name, value, plot=False)
    live.end()
    write_json(metrics_dir / "run.json", {
        "accelerator": device.type,
        "strategy": plan.strategy,
        "data_parallel": plan.use_data_parallel,
        "device_ids": plan.used_device_ids(ctx),
        "device_names": device_names(plan, ctx, device),
        "num_devices": plan.num_devices(ctx),
        "world_size": ctx.world_size,
        "global_batch": cfg.batch_size,
        "per_device_batch": per_device,
        "precision": precision_name(st.amp_dtype),
        "model": p.model.name,
        "parameters": count_parameters(model),
        "dataset": info["dataset"],
        "epochs": cfg.epochs,
        "resumed_from_epoch": start_epoch or None,
        "epoch_seconds": [round(r["seconds"], 4) for r in history],
        "stage_seconds": round(time.perf_counter() - started, 3),
        "data_on_device": train_split.images.device.type == "cuda",
        "data_streamed": train_split.streamed,
        "torch_version": torch.__version__,
        "train_params": p.section_dict("train"),
        "samples_per_second": round(throughput, 1),
        "peak_memory_mb": peaks,
        "peak_memory_kind": "cuda allocated per device" if device.type == "cuda" else "process max RSS per process",
    })
    log(f"saved {model_path}  ({throughput:,.0f} samples/s over {len(history)} epochs)")


# --- the steps above, spelled out ---------------------------------------------------------


def check_batch_size(batch_size: int, n_train: int, plan: DevicePlan, ctx: DistContext, log) -> None:
    if batch_size > n_train:
        raise UserError(f"train.batch_size = {batch_size} is larger than the training split ({n_train} images)")
    if batch_size % ctx.world_size:
        raise UserError(f"train.batch_size = {batch_size} must be divisible by the {ctx.world_size} ddp processes")
    if plan.use_data_parallel and batch_size < plan.num_devices(ctx):
        log(f"warning: train.batch_size = {batch_size} is smaller than the {plan.num_devices(ctx)} GPUs; "
            f"some GPUs get no samples")


def run_fingerprint(p: Params, data_dir: Path) -> dict:
    """What the weights depend on: the model and train params, and the prepared training data."""
    fingerprint = {f"{section}.{key}": value for section in ("model", "train")
                   for key, value in p.section_dict(section).items()}
    fingerprint["prepared data sha256"] = file_digest(
        [data_dir / "info.json", data_dir / "train.safetensors", data_dir / "val.safetensors"])[:16]
    return fingerprint


def resumable_checkpoint(path: Path, fingerprint: dict, epochs: int, log) -> Checkpoint | None:
    """The checkpoint at `path` if it belongs to this run and has epochs left; says why not otherwise."""
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    why = fingerprint_difference(ck.fingerprint, fingerprint)
    if why is not None:
        log(f"Not resuming from {path}: it was made with other params or data: {why}")
        return None
    if ck.epoch >= epochs:
        log(f"Not resuming from {path}: that run completed all {ck.epoch} epochs; training afresh")
        return None
    return ck


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
