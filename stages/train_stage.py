"""The train stage: devices, resume, the fit loop, DVCLive logging, weights and run summary.

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

from .artifacts import write_json
from .checkpoint import file_digest, fingerprint_difference, load_checkpoint, restore_rng, save_checkpoint
from .errors import UserError
from .models import build_model, count_parameters
from .parallel import (DevicePlan, DistContext, all_gather_floats, init_distributed, launch_workers, plan_devices,
                       process_device,
                       shutdown_distributed, under_launcher, unwrap)
from .params import Params
from .prepare_data import load_prepared
from .train import build_loop_state, fit, peak_memory_mb, place_split, prepare_model


def model_metadata(model_name: str, info: dict) -> dict:
    """What `load_model` needs to rebuild the model; nothing that changes from run to run."""
    return {
        "format": "stages.model/1",
        "model_name": model_name,
        "num_classes": info["num_classes"],
        "input_shape": info["shape"],
        "class_names": info["class_names"],
        "mean": info["mean"],
        "std": info["std"],
        "dataset": info["dataset"],
    }


def process_seconds() -> float | None:
    """Wall time since this process started (imports included), from /proc; None elsewhere."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return None


def configure_determinism(deterministic: bool) -> None:
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # tensor cores for fp32 Linear layers, as cuDNN does for convs


def describe_devices(plan: DevicePlan, ctx: DistContext, device: torch.device) -> tuple[list[str], str]:
    if device.type == "cuda":
        ids = plan.device_ids if plan.strategy == "dp" else list(range(ctx.world_size))
        names = [torch.cuda.get_device_name(i) for i in ids] if plan.strategy == "dp" else [torch.cuda.get_device_name(device)] * ctx.world_size
        return names, f"cuda {ids}"
    return ["cpu"] * max(ctx.world_size, 1), "cpu" + (f" x{ctx.world_size} processes" if ctx.world_size > 1 else "")


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


def train_stage(p: Params, data_dir: Path, model_path: Path, metrics_dir: Path, checkpoint_path: Path,
                argv: list[str]) -> None:
    started = time.perf_counter() - (process_seconds() or 0.0)  # count the process's start-up too
    cfg = p.train
    plan = plan_devices(cfg.accelerator, cfg.devices, cfg.strategy)
    if under_launcher() and plan.strategy != "ddp" and int(os.environ["WORLD_SIZE"]) > 1:
        raise UserError(f"started by torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']} but train.strategy = "
                        f"{cfg.strategy!r}; set train.strategy: ddp")
    if plan.strategy == "ddp" and not under_launcher() and plan.world_size > 1:
        launch_workers(argv, plan.world_size)
        return
    ctx = init_distributed(plan.accelerator) if plan.strategy == "ddp" else DistContext()
    try:
        _train(p, plan, ctx, data_dir, model_path, metrics_dir, checkpoint_path, started)
    except torch.OutOfMemoryError:
        per_device = cfg.batch_size // max(ctx.world_size, len(plan.device_ids), 1)
        raise UserError(f"CUDA ran out of memory with a per-device batch of {per_device} "
                        f"(train.batch_size = {cfg.batch_size}); try train.batch_size = {max(1, cfg.batch_size // 2)}") from None
    finally:
        shutdown_distributed()


def _train(p: Params, plan: DevicePlan, ctx: DistContext, data_dir: Path, model_path: Path, metrics_dir: Path,
           checkpoint_path: Path, started: float) -> None:
    cfg = p.train
    configure_determinism(cfg.deterministic)
    device = process_device(plan, ctx)
    log = print if ctx.is_main else (lambda *a, **k: None)

    train_images, train_labels, info = load_prepared(data_dir, "train")
    val_images, val_labels, _ = load_prepared(data_dir, "val")
    n_train = len(train_labels)
    if cfg.batch_size > n_train:
        raise UserError(f"train.batch_size = {cfg.batch_size} is larger than the training split ({n_train} images)")
    if cfg.batch_size % ctx.world_size:
        raise UserError(f"train.batch_size = {cfg.batch_size} must be divisible by the {ctx.world_size} ddp processes")
    n_dev = max(len(plan.device_ids), 1) if plan.strategy == "dp" else ctx.world_size
    if plan.use_data_parallel and cfg.batch_size < n_dev:
        log(f"warning: train.batch_size = {cfg.batch_size} is smaller than the {n_dev} GPUs; some GPUs get no samples")

    # What the weights depend on: a checkpoint is resumed only when all of it matches.
    fingerprint = {f"{section}.{key}": value for section in ("model", "train")
                   for key, value in p.section_dict(section).items()}
    fingerprint["prepared data sha256"] = file_digest(
        [data_dir / "info.json", data_dir / "train.safetensors", data_dir / "val.safetensors"])[:16]
    resume = None
    if checkpoint_path.exists():
        ck = load_checkpoint(checkpoint_path)
        why = fingerprint_difference(ck.fingerprint, fingerprint)
        if why is not None:
            log(f"Not resuming from {checkpoint_path}: it was made with other params or data: {why}")
        elif ck.epoch >= cfg.epochs:
            log(f"Not resuming from {checkpoint_path}: that run completed all {ck.epoch} epochs; training afresh")
        else:
            resume = ck

    torch.manual_seed(cfg.seed)
    c, h, _ = info["shape"]
    model = build_model(p.model.name, c, h, info["num_classes"])
    if resume is not None:
        model.load_state_dict(resume.model_state)
    wrapped = prepare_model(model, cfg, plan, ctx, device)
    st = build_loop_state(wrapped, cfg, ctx, device, info, n_train)
    history: list[dict] = []
    start_epoch = 0
    if resume is not None:
        st.optimizer.load_state_dict(resume.optim_state)
        if st.scaler is not None and resume.scaler_state:
            st.scaler.load_state_dict(resume.scaler_state)
        restore_rng(resume.rng)
        st.step, history, start_epoch = resume.step, resume.history, resume.epoch
        log(f"Resuming from {checkpoint_path} after epoch {start_epoch} of {cfg.epochs}")

    names, where = describe_devices(plan, ctx, device)
    per_device = cfg.batch_size // n_dev
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[st.amp_dtype]
    strategy = {"dp": "dp (nn.DataParallel)" if plan.use_data_parallel else "dp (single device)",
                "ddp": f"ddp ({ctx.world_size} processes)"}[plan.strategy]
    log(f"train: accelerator {device.type}{'' if device.type == 'cuda' else ' (no CUDA device; training on the CPU)'}, "
        f"devices {where}, strategy {strategy}, global batch {cfg.batch_size}, per-device batch {per_device}, "
        f"precision {precision}, model {p.model.name} ({count_parameters(model):,} parameters)")

    train_split = place_split(train_images, train_labels, device)
    val_split = place_split(val_images, val_labels, device)
    live = None
    if ctx.is_main:
        from dvclive import Live

        live = Live(dir=str(metrics_dir), save_dvc_exp=False, dvcyaml=None, report=None)
        for record in history:  # a resumed run replays the epochs it kept, so the curves are whole
            _log_epoch(live, record)

    def on_epoch(epoch: int, hist: list[dict]) -> None:
        if not ctx.is_main:
            return
        r = hist[-1]
        _log_epoch(live, r)
        save_checkpoint(checkpoint_path, unwrap(wrapped), st.optimizer, st.scaler, epoch, st.step, hist, fingerprint)
        log(f"epoch {epoch}/{cfg.epochs}  train loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f}  "
            f"val loss {r['val_loss']:.4f} acc {r['val_accuracy']:.4f}  "
            f"{r['samples_per_second']:,.0f} samples/s  {r['seconds']:.2f}s", flush=True)

    progress = Progress(ctx.is_main, cfg.epochs, cfg.batch_size)
    history = fit(wrapped, train_split, val_split, st, p.evaluate.batch_size, start_epoch, history, on_epoch,
                  progress.for_epoch)
    peaks = all_gather_floats(peak_memory_mb(plan, device), ctx, device)
    if not ctx.is_main:
        return

    from .artifacts import save_tensors

    save_tensors(model_path, unwrap(wrapped).state_dict(), model_metadata(p.model.name, info))
    samples = sum(r["samples"] for r in history)
    seconds = sum(r["seconds"] for r in history)
    throughput = samples / max(seconds, 1e-9)
    for name, value in (("samples_per_second", round(throughput, 1)), ("num_devices", n_dev),
                        ("world_size", ctx.world_size)):
        live.log_metric(name, value, plot=False)
    live.end()
    write_json(metrics_dir / "run.json", {
        "accelerator": device.type,
        "strategy": plan.strategy,
        "data_parallel": plan.use_data_parallel,
        "device_ids": plan.device_ids if plan.strategy == "dp" else list(range(ctx.world_size)),
        "device_names": names,
        "num_devices": n_dev,
        "world_size": ctx.world_size,
        "global_batch": cfg.batch_size,
        "per_device_batch": per_device,
        "precision": precision,
        "model": p.model.name,
        "parameters": count_parameters(model),
        "dataset": info["dataset"],
        "epochs": cfg.epochs,
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


def _log_epoch(live, record: dict) -> None:
    live.log_metric("train/loss", round(record["train_loss"], 6))
    live.log_metric("train/accuracy", round(record["train_accuracy"], 6))
    live.log_metric("val/loss", round(record["val_loss"], 6))
    live.log_metric("val/accuracy", round(record["val_accuracy"], 6))
    live.next_step()
