"""The train stage: check the params against the data, decide on resume, build, train epoch by
epoch, write the outputs. The training core (`stages/core/`) does the work; this shell adds
DVCLive logging, the per-epoch checkpoint, the weights file and the run summary.

Only rank 0 logs and writes. Outputs (paths from dvc.yaml via the CLI):
  model weights (.safetensors), DVCLive metrics + per-epoch plots, run.json
  (devices, batches, timings, peak memory). They are written only when training has completed
  (`write_outputs`): until then DVCLive logs into a folder beside the checkpoint, so a run that
  is refused, crashes or is stopped leaves the last good outputs in place.

The per-epoch checkpoint is not a DVC output: it lives only while a run is incomplete. It is
written after every epoch, resumed after a kill when it belongs to this very run, and deleted
once the weights and metrics are written. So a finished stage leaves nothing DVC would have to
store, push or find missing in a fresh clone (docs/reliability.md, "Why the checkpoint is not a DVC output").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
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
from .core.devices import (
    DevicePlan,
    configure_determinism,
    device_names,
    peak_memory_mb,
    plan_training,
    process_device,
    rank_plan,
    visible_devices_env,
    with_claimed,
)
from .core.distributed import (
    DistContext,
    PeerLost,
    RefusedOnEveryRank,
    all_gather_floats,
    all_reduce_sum,
    broadcast_bytes,
    collective_device,
    collective_errors,
    init_distributed,
    shutdown_distributed,
    under_launcher,
)
from .core.gpu_claims import GpuClaim, claim_gpus
from .core.launch import Stopped, launch_ranks
from .core.loop import build_loop_state, compile_mode, evaluate, prepare_model, train_one_epoch, unwrap
from .core.models import build_model, check_input_size, count_parameters, set_backbone_trainable, uses_small_stem
from .core.precision import precision_name
from .core.pretrained import fetch_weights, fit_pretrained, pretrained_normalization, read_pretrained
from .core.rank_status import RestartReport, describe, restart_report, start_rank_status
from .core.readout import LatestValue
from .core.threads import set_threads
from .core.transforms import augmentations
from .core.weights import model_metadata, save_model, trained_params
from .errors import UserError, first_line
from .io import install, write_json
from .params import Params, TrainParams, free_gpu_count, is_resnet, plural, show_value, weights_kind
from .prepared import load_prepared

LAUNCH_ENV = "STAGES_LAUNCH"  # what this command tells the DDP ranks it starts: the planned devices, the claim


def train_stage(p: Params, data_dir: Path, model_path: Path, metrics_dir: Path, checkpoint_path: Path,
                argv: list[str]) -> None:
    """Plan the devices (claiming free GPUs when asked); start the DDP ranks, or be one; train."""
    started = time.perf_counter() - (process_seconds() or 0.0)  # count the process's start-up too
    cfg = p.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if under_launcher() and (cfg.strategy == "ddp" or world > 1):
        if cfg.strategy != "ddp":
            refuse_once(RefusedOnEveryRank(f"started by torchrun with WORLD_SIZE={world} but train.strategy = "
                                           f"{cfg.strategy!r}; set train.strategy: ddp"), launched=False)
        run_rank(p, data_dir, model_path, metrics_dir, checkpoint_path, started)
        return
    plan = plan_training(cfg)  # refused here once, before any rank starts
    fetch_weights(p.model, progress=sys.stderr.isatty())  # once, before any rank starts
    claim = claim_gpus(plan.claim) if plan.claim else None
    try:
        if claim is not None:
            plan = with_claimed(plan, claim.ids)
            waited = f" after waiting {claim.waited_seconds:.0f} s" if claim.waited_seconds >= 1 else ""
            print(f"claimed {', '.join(f'GPU {g.id} ({g.uuid})' for g in claim.gpus)} for this run{waited}",
                  flush=True)
        if plan.strategy == "ddp" and plan.world_size > 1:
            # Each rank reruns this command under torch's elastic launcher (and lands in run_rank).
            try:
                launch_ranks("stages", argv, plan.world_size, cfg.max_restarts, cfg.dist_timeout,
                             env=rank_environment(plan, claim))
            except Stopped as exc:  # before rank 0 could say where it stopped: the checkpoint says it
                raise UserError(f"{exc}; {checkpoint_kept(checkpoint_path, p, data_dir)}") from None
            return
        ctx = init_distributed(plan.accelerator, cfg.dist_timeout) if plan.strategy == "ddp" else DistContext()
        try:
            extra = {"launcher": None, "restarts": 0, "gpu_claim": claim.record() if claim else None}
            with out_of_memory_advice(cfg, plan, ctx):
                train(p, plan, ctx, data_dir, model_path, metrics_dir, checkpoint_path, started, None, extra)
        finally:
            shutdown_distributed()
    finally:
        if claim is not None:
            claim.release()


def run_rank(p: Params, data_dir: Path, model_path: Path, metrics_dir: Path, checkpoint_path: Path,
             started: float) -> None:
    """One DDP rank, started by torchrun or by this command's own launcher: join the group, learn
    whether this is a restart (and who died), train, and leave a record of how it ended."""
    cfg = p.train
    launched = json.loads(os.environ[LAUNCH_ENV]) if LAUNCH_ENV in os.environ else None
    plan = rank_plan(cfg.accelerator, int(os.environ["WORLD_SIZE"]), launched)
    status = start_rank_status()
    if launched is None:  # started by torchrun: no command of ours ran before the ranks
        fetch_weights(p.model, progress=False)
    try:
        ctx = init_distributed(plan.accelerator, cfg.dist_timeout, on_give_up=lambda m: status.end("error", m))
        if ctx.is_main and launched is None and free_gpu_count(cfg.devices):
            print(f"note: train.devices = {cfg.devices!r} claims GPUs for runs this command starts; under torchrun, "
                  "--nproc-per-node and CUDA_VISIBLE_DEVICES choose them", flush=True)
        with collective_errors(ctx, cfg.dist_timeout), out_of_memory_advice(cfg, plan, ctx):
            restart = restart_report(ctx, collective_device())
            extra = {"launcher": "stages (torch elastic)" if launched else "torchrun",
                     "restarts": restart.attempt if restart else 0,
                     "gpu_claim": launched.get("gpu_claim") if launched else None}
            train(p, plan, ctx, data_dir, model_path, metrics_dir, checkpoint_path, started, restart, extra)
    except PeerLost as exc:  # a consequence: the launcher names the rank that failed
        status.end("peer-lost", str(exc))
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except UserError as exc:
        status.end("refused", str(exc))  # our launcher prints this message, once (launch.failure_line)
        refuse_once(exc, launched is not None)
    except BaseException as exc:
        status.end("error", first_line(exc))
        raise
    else:
        status.end("done")
        status.remove()
    finally:
        shutdown_distributed()


def refuse_once(exc: UserError, launched: bool) -> None:
    """End a DDP rank with a refusal said once, not once per rank: under our own launcher no rank says it
    (the launcher prints the failed rank's message); under torchrun rank 0 says a refusal that every rank
    reaches alike, and each rank its own. Exit code 2, as the CLI's for any refusal."""
    if launched or (isinstance(exc, RefusedOnEveryRank) and os.environ.get("RANK", "0") != "0"):
        raise SystemExit(2) from None
    raise exc


@contextlib.contextmanager
def out_of_memory_advice(cfg: TrainParams, plan: DevicePlan, ctx: DistContext):
    """A CUDA out-of-memory error becomes the per-device batch and smaller passes to try."""
    try:
        yield
    except torch.OutOfMemoryError:
        per_device = plan.per_device_batch(cfg.pass_batch, ctx)
        raise UserError(f"CUDA ran out of memory with a per-device batch of {per_device} (train.batch_size = "
                        f"{cfg.batch_size}); try train.batch_size = {max(1, cfg.batch_size // 2)}, or "
                        f"train.accumulate = {cfg.accumulate * 2} to keep the batch in smaller passes") from None


def rank_environment(plan: DevicePlan, claim: GpuClaim | None) -> dict[str, str]:
    """The environment of the ranks this command starts: they see exactly the planned GPUs."""
    env = {LAUNCH_ENV: json.dumps({"accelerator": plan.accelerator, "device_ids": plan.device_ids,
                                   "gpu_claim": claim.record() if claim else None})}
    if plan.accelerator == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = visible_devices_env(plan.device_ids)
    return env


def train(p: Params, plan: DevicePlan, ctx: DistContext, data_dir: Path, model_path: Path, metrics_dir: Path,
          checkpoint_path: Path, started: float, restart: RestartReport | None, extra: dict) -> None:
    cfg = p.train
    configure_determinism(cfg.deterministic)
    device = process_device(plan, ctx)
    extra = {**extra, **set_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)))}
    log = print if ctx.is_main else (lambda *a, **k: None)

    # The data, and the params checked against it.
    train_images, train_labels, info = load_prepared(data_dir, "train")
    val_images, val_labels, _ = load_prepared(data_dir, "val")
    with same_on_every_rank():
        check_batch_size(cfg, len(train_labels), plan, ctx, log)

    # Resume only from a checkpoint of this very run: same params, same data.
    # Rank 0 decides, and every rank resumes from its checkpoint (after a restart of the group too).
    fingerprint = run_fingerprint(p, data_dir)
    resume = shared_checkpoint(checkpoint_path, fingerprint, ctx, log)
    start_epoch = resume.epoch if resume is not None else 0

    # Build: the model for the data (seeded, so every rank starts from the same weights), checked
    # against the image size before any work; the pretrained weights into it; wrappers, optimizer.
    torch.manual_seed(cfg.seed)
    c, h, _ = info["shape"]
    small_stem = uses_small_stem(p.model.name, h, p.model.small_input_stem)
    model = build_model(p.model.name, c, h, info["num_classes"], small_stem)
    with same_on_every_rank():
        check_input_size(model, p.model.name, c, h, info.get("dataset"))
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
    if restart is not None:  # the elastic agent restarted the group after a rank died
        for lost in restart.lost:
            log(describe(lost))
        log(f"restarted after rank {restart.lost_ranks} died (attempt {restart.attempt} of {restart.max_restarts}); "
            + (f"resuming after epoch {start_epoch}" if resume else "no epoch had completed; starting afresh"))
    elif resume is not None:
        log(f"Resuming from {checkpoint_path} after epoch {start_epoch} of {cfg.epochs}")
    per_device = plan.per_device_batch(cfg.pass_batch, ctx)
    strategy = {"dp": "dp (nn.DataParallel)" if plan.use_data_parallel else "dp (single device)",
                "ddp": f"ddp ({plural(ctx.world_size, 'process', 'processes')})"}[plan.strategy]
    where = f"cuda {plan.used_device_ids(ctx)}" if device.type == "cuda" else \
        "cpu" + (f" x{ctx.world_size} processes" if ctx.world_size > 1 else "")
    passes = f" in {cfg.accumulate} passes of {cfg.pass_batch}" if cfg.accumulate > 1 else ""
    threads = f", {plural(torch.get_num_threads(), 'CPU thread')}" + (" per process" if ctx.world_size > 1 else "")
    log(f"train: accelerator {device.type}{'' if device.type == 'cuda' else ' (no CUDA device; training on the CPU)'}, "
        f"devices {where}, strategy {strategy}, global batch {cfg.batch_size}{passes}, per-device batch {per_device}, "
        f"precision {precision_name(st.amp_dtype)}, model {p.model.name} ({count_parameters(model):,} parameters)"
        f"{threads if device.type == 'cpu' else ''}")

    train_split = place_split(train_images, train_labels, device, cfg.data_placement)
    val_split = place_split(val_images, val_labels, device, cfg.data_placement)
    log(f"data: {len(train_split):,} training images, {train_split.where()}")
    augmented = augmentations(st.augment_pad, st.augment_flip, cfg.mixup_alpha, cfg.cutmix_alpha)
    if augmented or cfg.augment:
        flip = "" if st.augment_flip or not cfg.augment else \
            f"; no horizontal flip (train.hflip: {show_value(cfg.hflip)}, dataset {info['dataset']})"
        log(f"augmentation: {augmented}{flip}")
    live = open_live(live_staging(checkpoint_path), history) if ctx.is_main else None

    # The epochs: train, validate (rank 0) the weights to be kept, log, checkpoint, stop early.
    progress = Progress(ctx.is_main, cfg.epochs, cfg.batch_size, device)
    # A run killed after it stopped early resumes only to write its outputs.
    last_epoch = start_epoch if early_stop(history, cfg.patience) else cfg.epochs
    position = RunPosition(checkpoint_path, cfg.epochs, start_epoch, start_epoch if resume is not None else None)
    with position.said_on_interrupt():
        for epoch in range(start_epoch + 1, last_epoch + 1):
            position.epoch = epoch
            if frozen and epoch > cfg.freeze_epochs:
                # The wrappers (DDP's gradient reducer) see which parameters train when built: wrap again.
                set_backbone_trainable(model, True)
                wrapped = prepare_model(model, cfg, plan, ctx, device)
                st.model_wrapped()
                frozen = False
                log(f"epoch {epoch}: the backbone trains from now on, at {cfg.backbone_lr:g} x the lr")
            compiled_before = st.compile_seconds
            stats = train_one_epoch(wrapped, train_split, epoch, st, progress.for_epoch(epoch))
            if st.compile_seconds > compiled_before:
                log(f"epoch {epoch}: compiling (train.compile: {show_value(cfg.compile)}) took "
                    f"{st.compile_seconds - compiled_before:.1f} s, not counted in samples/s")
            record = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                      "seconds": stats.seconds, "samples": stats.samples,
                      "samples_per_second": stats.samples_per_second}
            history.append(record)
            stop = None
            if ctx.is_main:
                kept = kept_model(wrapped, st)
                val = evaluate(kept, val_split, st.mean, st.std, p.evaluate.batch_size, device, st.amp_dtype,
                               st.channels_last)
                record.update(val_loss=val.loss, val_accuracy=val.accuracy)
                log_epoch(live, record)
                if cfg.keep == "best" and best_epoch(history) == epoch:
                    best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
                save_checkpoint(checkpoint_path, unwrap(wrapped), st.optimizer, st.scaler, epoch, st.step, history,
                                fingerprint, st.ema, best_state)
                position.saved = epoch
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
    metadata = model_metadata(p.model.name, info, small_stem, pretrained.source if pretrained else None,
                              normalization, trained_params(p, LAUNCH_ONLY))
    throughput = sum(r["samples"] for r in history) / max(sum(r["seconds"] for r in history), 1e-9)
    for name, value in (("samples_per_second", round(throughput, 1)), ("num_devices", plan.num_devices(ctx)),
                        ("world_size", ctx.world_size)):
        live.log_metric(name, value, plot=False)
    best = best_epoch(history)
    run = {
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
        "compile": compile_mode(cfg.compile),
        "compile_seconds": round(st.compile_seconds, 3),  # this process's; not in epoch_seconds or samples/s
        "stage_seconds": round(time.perf_counter() - started, 3),
        "data_on_device": train_split.images.device.type == "cuda",
        "data_streamed": train_split.streamed,
        "torch_version": torch.__version__,
        "versions": library_versions(),
        "train_params": p.section_dict("train"),
        "samples_per_second": round(throughput, 1),
        "peak_memory_mb": peaks,
        # On the CPU max RSS also counts the pages of the memory-mapped splits a process has read: shared
        # page cache, not its own memory (benchmarks/README.md, "100,000 photos").
        "peak_memory_kind": "cuda allocated per device" if device.type == "cuda"
        else "process max RSS per process, incl. the mapped splits' shared pages",
        **extra,  # launcher, restarts, gpu_claim
    }
    write_outputs(model_path, kept, metadata, live, run, metrics_dir)
    kept_weights = (f"epoch {best}'s weights (train.keep: best; val accuracy {history[best - 1]['val_accuracy']:.4f})"
                    if cfg.keep == "best" else f"the last epoch's weights (epoch {len(history)})")
    if st.ema is not None:
        kept_weights += f", their moving average (train.ema = {cfg.ema:g})"
    log(f"saved {model_path}: {kept_weights}  ({throughput:,.0f} samples/s over {plural(len(history), 'epoch')})")
    # Last: a kill before this line leaves the checkpoint, and the next run rewrites the outputs from it.
    checkpoint_path.unlink(missing_ok=True)


# --- the steps above, spelled out ---------------------------------------------------------


def library_versions() -> dict[str, str]:
    """The versions of the libraries the weights' bytes depend on (requirements.lock pins them)."""
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("torch", "torchvision", "numpy")}


@contextlib.contextmanager
def same_on_every_rank():
    """The checks of the params against the data: every rank refuses alike, so rank 0 alone says it."""
    try:
        yield
    except RefusedOnEveryRank:
        raise
    except UserError as exc:
        raise RefusedOnEveryRank(str(exc)) from None


def check_batch_size(cfg: TrainParams, n_train: int, plan: DevicePlan, ctx: DistContext, log) -> None:
    batch_size = cfg.batch_size
    if batch_size > n_train:
        raise UserError(f"train.batch_size = {batch_size} is larger than the training split ({n_train} images)")
    if batch_size % (ctx.world_size * cfg.accumulate):
        raise UserError(f"train.batch_size = {batch_size} must be divisible by the {ctx.world_size} ddp processes "
                        f"times train.accumulate = {cfg.accumulate}")
    if plan.use_data_parallel and cfg.pass_batch < plan.num_devices(ctx):
        log(f"warning: train.batch_size = {batch_size} is smaller than the {plan.num_devices(ctx)} GPUs; "
            f"some GPUs get no samples")


# How a run is kept going, whether a file may be fetched, how the data reaches the device: not what it computes.
LAUNCH_ONLY = {"train.max_restarts", "train.dist_timeout", "model.download", "train.data_placement"}


def run_fingerprint(p: Params, data_dir: Path) -> dict:
    """What the weights depend on: the model and train params, the content of a local weights file,
    and the prepared training data. (model.download decides only whether a file may be fetched.)"""
    fingerprint = trained_params(p, LAUNCH_ONLY)
    if weights_kind(p.model.weights) == "file":
        fingerprint["model.weights sha256"] = file_digest([Path(p.model.weights)])[:16]
    fingerprint["prepared data sha256"] = file_digest(
        [data_dir / "info.json", data_dir / "train.safetensors", data_dir / "val.safetensors"])[:16]
    return fingerprint


def shared_checkpoint(path: Path, fingerprint: dict, ctx: DistContext, log) -> Checkpoint | None:
    """Rank 0's resumable checkpoint, on every rank: rank 0 reads it and sends its bytes, since on
    several machines only rank 0's has the file, and all ranks must resume from the same state."""
    resume = resumable_checkpoint(path, fingerprint, log) if ctx.is_main else None
    if not ctx.distributed:
        return resume
    blob = broadcast_bytes(path.read_bytes() if resume is not None else None, ctx)
    if blob is None or ctx.is_main:
        return resume
    with tempfile.TemporaryDirectory(prefix="stages-resume-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(blob)
        return load_checkpoint(copy)


def resumable_checkpoint(path: Path, fingerprint: dict, log) -> Checkpoint | None:
    """The checkpoint at `path` if it belongs to this run; says why not otherwise.

    A completed run deletes its checkpoint, so one that is here was left by a run that was
    killed: mid-way, or after its last epoch but before its outputs were all written (then
    resuming runs no epoch and only writes the outputs)."""
    if not path.exists():
        return None
    ck = load_checkpoint(path)
    why = fingerprint_difference(ck.fingerprint, fingerprint)
    if why is not None:
        log(f"Not resuming from {path}: it was made with other params or data: {why}")
        return None
    return ck


class RunPosition:
    """Where training is (the epoch running, the last one checkpointed), for what Ctrl-C says."""

    def __init__(self, checkpoint_path: Path, epochs: int, epoch: int, saved: int | None):
        self.checkpoint_path, self.epochs, self.epoch, self.saved = checkpoint_path, epochs, epoch, saved

    @contextlib.contextmanager
    def said_on_interrupt(self):
        """Ctrl-C (SIGINT) becomes one line: the epoch interrupted, the checkpoint kept, how to resume."""
        try:
            yield
        except KeyboardInterrupt:
            # Every rank of a DDP group gets the terminal's SIGINT: rank 0 says it.
            raise RefusedOnEveryRank(interrupted_line(self.epoch, self.epochs, self.saved, self.checkpoint_path)) \
                from None


def checkpoint_kept(checkpoint_path: Path, p: Params, data_dir: Path) -> str:
    """What a stopped run leaves to resume from, read from the checkpoint file itself."""
    try:
        ck = resumable_checkpoint(checkpoint_path, run_fingerprint(p, data_dir), lambda *a, **k: None)
    except (UserError, OSError):  # a damaged checkpoint or missing data: nothing to resume from
        ck = None
    if ck is None:
        return "no checkpoint of this run was kept: `dvc repro` starts afresh"
    return f"kept the checkpoint of epoch {ck.epoch} ({checkpoint_path}): {how_to_resume(ck.epoch)}"


def interrupted_line(epoch: int, epochs: int, saved: int | None, checkpoint_path: Path) -> str:
    where = f"interrupted after epoch {epoch} of {epochs}" if saved == epoch else \
        f"interrupted in epoch {epoch} of {epochs}"
    if saved is None:
        return f"{where}, before any epoch of this run completed; no checkpoint kept: `dvc repro` starts afresh"
    return f"{where}; kept the checkpoint of epoch {saved} ({checkpoint_path}): {how_to_resume(saved)}"


def how_to_resume(epoch: int) -> str:
    # DVC reruns the stage only when something it depends on changed: after an interrupted `dvc repro -f`
    # (or a direct train command) of an up-to-date stage, the last good outputs are in place and only -f
    # reruns it.
    return (f"rerun the same command to resume after epoch {epoch} (`dvc repro` reruns train when its params or "
            "data changed; `dvc repro -f train` when they did not)")


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
            f"of epoch {best} was not bettered in {plural(patience, 'epoch')} (train.patience)")


def stop_on_every_rank(stop: bool, ctx: DistContext, device: torch.device) -> bool:
    """Rank 0's decision (it alone validates), shared with every rank so that all leave the loop together."""
    return all_reduce_sum(torch.tensor(float(stop), device=device), ctx).item() > 0


def live_staging(checkpoint_path: Path) -> Path:
    """Where DVCLive logs while the run lasts: beside the checkpoint (git-ignored, no DVC output),
    so that a run that fails or is stopped leaves the last good metrics and curves as they were."""
    return checkpoint_path.with_name(checkpoint_path.stem + ".live")


def open_live(live_dir: Path, history: list[dict]):
    """DVCLive in `live_dir` (a fresh folder: Live clears only the files it knows of); a resumed run
    replays the epochs it kept, so the curves are whole."""
    from dvclive import Live

    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    for record in history:
        log_epoch(live, record)
    return live


def write_outputs(model_path: Path, model: torch.nn.Module, metadata: dict, live, run: dict, metrics_dir: Path) -> None:
    """The stage's outputs, all at the very end, each written beside and renamed into place: the
    weights, then DVCLive's folder moved from its staging place into `metrics_dir` (the curves'
    folder swapped whole, so no curve of an older run survives), then run.json. dvc.yaml marks them
    `persist: true`: DVC leaves the last good ones in place, and only a run that completes replaces them."""
    live.end()
    save_model(model_path, model, metadata)
    live_dir = Path(live.dir)
    for item in sorted(live_dir.iterdir()):
        install(item, metrics_dir / item.name)
    shutil.rmtree(live_dir, ignore_errors=True)
    write_json(metrics_dir / "run.json", run)


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
    """A tqdm bar per epoch in a terminal; nothing per step otherwise (the epoch line says it all).

    The bar never waits for the GPU: it shows the newest loss that has reached the host (see
    `LatestValue`), so the CPU keeps queueing steps ahead of the GPU."""

    def __init__(self, enabled: bool, epochs: int, samples_per_step: int, device: torch.device):
        self.enabled = enabled and sys.stderr.isatty()
        self.epochs, self.samples_per_step, self.device = epochs, samples_per_step, device

    def for_epoch(self, epoch: int):
        if not self.enabled:
            return None
        from tqdm import tqdm

        bar = None
        latest = LatestValue(self.device)

        def update(step: int, steps: int, loss: torch.Tensor) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=steps, desc=f"epoch {epoch}/{self.epochs}", leave=False, unit="step")
            bar.update(1)
            latest.offer(loss)
            if step % 10 == 0 or step == steps:
                rate = bar.format_dict["rate"] or 0.0
                bar.set_postfix(loss=f"{latest.value():.4f}", samples_s=f"{rate * self.samples_per_step:,.0f}")
            if step == steps:
                bar.close()

        return update
