"""The train stage: load the data and check the params against it, resume, build, train epoch by
epoch (validate, checkpoint, stop early), write the outputs; `train()` reads top down, and each
step is a named helper below it or in the core. The training core (`stages/core/`) does the work
(devices, launching and joining DDP ranks, the loop, the checkpoint and resume); this shell adds
DVCLive logging, the weights file and the run summary (`RunSummary`, run.json).

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
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .console import warn
from .core.batches import Split, place_split
from .core.checkpoint import (
    Checkpoint,
    CheckpointWriter,
    restore_loop_state,
    resumable_checkpoint,
    run_fingerprint,
    shared_checkpoint,
)
from .core.devices import (
    DevicePlan,
    check_batch_split,
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
    RefusedOnEveryRank,
    all_gather_floats,
    all_reduce_sum,
    init_distributed,
    shutdown_distributed,
    under_launcher,
)
from .core.gpu_claims import claim_gpus
from .core.launch import Stopped, launch_ranks, launched_plan, refuse_once, run_as_rank
from .core.loop import LoopState, build_loop_state, compile_mode, evaluate, prepare_model, train_one_epoch, unwrap
from .core.models import build_model, check_input_size, count_parameters, set_backbone_trainable, uses_small_stem
from .core.precision import check_precision, precision_name
from .core.pretrained import Pretrained, fetch_weights, fit_pretrained, pretrained_normalization, read_pretrained
from .core.rank_status import RestartReport, describe
from .core.readout import LatestValue
from .core.threads import check_thread_count, oversubscription, set_threads
from .core.transforms import augmentations
from .core.weights import save_model
from .errors import UserError
from .io import WriteBehind, install
from .model_file import model_metadata, trained_params
from .params import Params, TrainParams, free_gpu_count, is_resnet, plural, show_value
from .prepared import check_prepared_with, load_prepared, read_info
from .run_summary import RunSummary, curve_point


@dataclass(frozen=True)
class TrainPaths:
    """The train stage's files (dvc.yaml's, through the CLI): the data it reads and what it writes."""

    data: Path  # the prepared data
    model: Path  # the weights (.safetensors)
    metrics: Path  # DVCLive's metrics and curves, and run.json
    checkpoint: Path  # the per-epoch checkpoint: no DVC output, deleted once the outputs are written
    params: Path = Path("params.yaml")  # the file the params were read from, named when the data do not match


def train_stage(p: Params, paths: TrainPaths, argv: list[str]) -> None:
    """Plan the devices (claiming free GPUs when asked); start the DDP ranks, or be one; train."""
    started = time.perf_counter() - (process_seconds() or 0.0)  # count the process's start-up too
    cfg = p.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if under_launcher() and (cfg.strategy == "ddp" or world > 1):
        if cfg.strategy != "ddp":
            refuse_once(RefusedOnEveryRank(f"started by torchrun with WORLD_SIZE={world} but train.strategy = "
                                           f"{cfg.strategy!r}; set train.strategy: ddp"), launched=False)
        run_rank(p, paths, started)
        return
    plan = plan_training(cfg)  # refused here once, before any rank starts
    check_precision(cfg.precision, cfg.accelerator, plan.accelerator)
    check_thread_count(cfg.threads, plan.world_size)
    # Data that other params prepared: said before GPUs are waited for and weights fetched (`load_data`
    # checks it again in every rank, which is all a run started by torchrun has).
    check_prepared_with(read_info(paths.data), p, paths.params, paths.data)
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
                             plan={"accelerator": plan.accelerator, "device_ids": plan.device_ids,
                                   "gpu_claim": claim.record() if claim else None},
                             env=rank_environment(plan))
            except Stopped as exc:  # before rank 0 could say where it stopped: the checkpoint says it
                raise UserError(f"{exc}; {checkpoint_kept(p, paths)}") from None
            return
        ctx = init_distributed(plan.accelerator, cfg.dist_timeout) if plan.strategy == "ddp" else DistContext()
        try:
            extra = {"launcher": None, "restarts": 0, "gpu_claim": claim.record() if claim else None}
            with out_of_memory_advice(cfg, plan, ctx):
                train(p, plan, ctx, paths, started, None, extra)
        finally:
            shutdown_distributed()
    finally:
        if claim is not None:
            claim.release()


def run_rank(p: Params, paths: TrainPaths, started: float) -> None:
    """One DDP rank, started by torchrun or by this command's own launcher (`core.launch.run_as_rank`)."""
    cfg = p.train
    launched = launched_plan()
    plan = rank_plan(cfg.accelerator, int(os.environ["WORLD_SIZE"]), launched)
    if launched is None:  # started by torchrun: no command of ours ran before the ranks
        fetch_weights(p.model, progress=False)

    def rank(ctx: DistContext, restart: RestartReport | None) -> None:
        if ctx.is_main and launched is None and free_gpu_count(cfg.devices):
            print(f"note: train.devices = {cfg.devices!r} claims GPUs for runs this command starts; under torchrun, "
                  "--nproc-per-node and CUDA_VISIBLE_DEVICES choose them", flush=True)
        extra = {"launcher": "stages (torch elastic)" if launched else "torchrun",
                 "restarts": restart.attempt if restart else 0,
                 "gpu_claim": launched.get("gpu_claim") if launched else None}
        with out_of_memory_advice(cfg, plan, ctx):
            train(p, plan, ctx, paths, started, restart, extra)

    run_as_rank(plan.accelerator, cfg.dist_timeout, rank)


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


def rank_environment(plan: DevicePlan) -> dict[str, str]:
    """The environment of the ranks this command starts: they see exactly the planned GPUs."""
    return {"CUDA_VISIBLE_DEVICES": visible_devices_env(plan.device_ids)} if plan.accelerator == "cuda" else {}


def train(p: Params, plan: DevicePlan, ctx: DistContext, paths: TrainPaths, started: float,
          restart: RestartReport | None, extra: dict) -> None:
    """One process of the run: load, resume, build; then epoch by epoch train, validate, checkpoint
    and stop early; then rank 0 writes the outputs."""
    cfg = p.train
    configure_determinism(cfg.deterministic)
    device = process_device(plan, ctx)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    with same_on_every_rank():  # checked in train_stage before a run this command starts; torchrun's here
        check_precision(cfg.precision, cfg.accelerator, device.type)
        check_thread_count(cfg.threads, local_ranks)
    extra = {**extra, **set_threads(cfg.threads, local_ranks)}
    log = print if ctx.is_main else (lambda *a, **k: None)
    too_many = oversubscription(extra["threads"], extra["threads_from"], local_ranks) if device.type == "cpu" else None
    if too_many and ctx.is_main:
        warn(too_many)

    # Load the data and check the params against it; resume only from a checkpoint of this very run
    # (same params, same data): rank 0 decides, every rank resumes from its checkpoint.
    (train_images, train_labels), (val_images, val_labels), info = load_data(p, paths.data, paths.params, plan,
                                                                             ctx, extra["launcher"], log)
    fingerprint = run_fingerprint(p, paths.data)
    resume = shared_checkpoint(paths.checkpoint, fingerprint, ctx, log)
    start_epoch = resume.epoch if resume is not None else 0

    # Build: the model (its starting or resumed weights), its wrappers, the optimizer and the rest of
    # the loop's state, as the checkpoint left them.
    model, made = build_for_data(p, info, resume, log)
    frozen = start_epoch < cfg.freeze_epochs
    if frozen:
        set_backbone_trainable(model, False)
    wrapped = prepare_model(model, cfg, plan, ctx, device)
    info = made.normalized(info)
    st = build_loop_state(wrapped, cfg, ctx, device, info, len(train_labels))
    history, best_state = restore_loop_state(st, resume)  # ([], None) when starting afresh
    log_resume(restart, resume, paths.checkpoint, cfg.epochs, log)
    log(setup_line(p, plan, ctx, device, st, model))
    train_split = place_split(train_images, train_labels, device, cfg.data_placement)
    val_split = place_split(val_images, val_labels, device, cfg.data_placement)
    log_data(cfg, st, info, train_split, log)
    live = open_live(live_staging(paths.checkpoint), history) if ctx.is_main else None
    # Rank 0's per-epoch files, the checkpoint and DVCLive's step, are written behind the training thread,
    # and the lines of the epochs are said in turn with them: an epoch's line once its checkpoint is on
    # disk, so a run killed after it resumes after that epoch.
    writes = WriteBehind() if ctx.is_main else None
    checkpoints = CheckpointWriter(paths.checkpoint, start_epoch if resume is not None else None, writes) \
        if ctx.is_main else None
    say = (lambda *args: writes.submit(print_flushed, *args)) if ctx.is_main else log

    # The epochs: train, validate (rank 0) the weights to be kept, log, checkpoint, stop early.
    progress = Progress(ctx.is_main, cfg.epochs, cfg.batch_size, device)
    # A run killed after it stopped early resumes only to write its outputs.
    last_epoch = start_epoch if early_stop(history, cfg.patience) else cfg.epochs
    position = RunPosition(paths.checkpoint, cfg.epochs, start_epoch, checkpoints)
    with position.said_on_interrupt():
        for epoch in range(start_epoch + 1, last_epoch + 1):
            position.epoch = epoch
            if progress.enabled:
                writes.wait()  # the last epoch's line before this epoch's bar, in a terminal
            if frozen and epoch > cfg.freeze_epochs:
                # The wrappers (DDP's gradient reducer) see which parameters train when built: wrap again.
                set_backbone_trainable(model, True)
                wrapped = prepare_model(model, cfg, plan, ctx, device)
                st.model_wrapped()
                frozen = False
                say(f"epoch {epoch}: the backbone trains from now on, at {cfg.backbone_lr:g} x the lr")
            history.append(train_epoch(wrapped, train_split, epoch, st, progress, cfg, say))
            stop = None
            if ctx.is_main:
                best_state = validate(wrapped, st, val_split, history, best_state, p, device)
                writes.submit(log_epoch, live, dict(history[-1]))
                save_epoch_checkpoint(checkpoints, wrapped, st, history, fingerprint, best_state)
                say(epoch_line(history[-1], cfg.epochs))
                stop = early_stop(history, cfg.patience)
            if cfg.patience and stop_on_every_rank(stop is not None, ctx, device):
                say(stop)
                break

    # The outputs: rank 0 writes the weights, the metrics and the run summary.
    peaks = all_gather_floats(peak_memory_mb(plan, device), ctx, device)
    if not ctx.is_main:
        return
    checkpoints.wait()  # every epoch's checkpoint and DVCLive step is written (a failed write is raised here)
    kept = kept_model(wrapped, st)
    if best_state is not None:
        kept.load_state_dict(best_state)
    run = summarize(p, plan, ctx, device, st, model, made, info, history, start_epoch, train_split, peaks,
                    started, extra)
    kept_record = next(r for r in history if r["epoch"] == run.best_epoch) if cfg.keep == "best" else history[-1]
    write_outputs(paths, kept, made.metadata(p, info), live, run, kept_record)
    log(saved_line(paths.model, cfg, st, run))
    # Last: a kill before this line leaves the checkpoint, and the next run rewrites the outputs from it.
    paths.checkpoint.unlink(missing_ok=True)


# --- the steps above, spelled out ---------------------------------------------------------


def load_data(p: Params, data_dir: Path, params_path: Path, plan: DevicePlan, ctx: DistContext, launcher: str | None,
              log):
    """The train and val splits ((images, labels) each, memory-mapped) and info.json, prepared with
    `params_path`'s data.* params, with the batch checked against the training split and the processes
    that share it."""
    train_images, train_labels, info = load_prepared(data_dir, "train")
    val_images, val_labels, _ = load_prepared(data_dir, "val")
    with same_on_every_rank():
        check_prepared_with(info, p, params_path, data_dir)
        check_batch_size(p.train, len(train_labels), plan, ctx, launcher, log)
    return (train_images, train_labels), (val_images, val_labels), info


@dataclass(frozen=True)
class MadeFor:
    """How the model was made for the data: its stem, its starting weights, its normalisation."""

    small_stem: bool
    pretrained: Pretrained | None
    normalization: tuple[list[float], list[float], str] | None  # None: the train split's mean and std

    def normalized(self, info: dict) -> dict:
        """info.json with the mean and std the model is trained with."""
        if self.normalization is None:
            return info
        return dict(info, mean=self.normalization[0], std=self.normalization[1])

    def metadata(self, p: Params, info: dict) -> dict:
        """The weights file's metadata (stages/model_file.py)."""
        return model_metadata(p.model.name, info, self.small_stem, self.pretrained.source if self.pretrained else None,
                              self.normalization, trained_params(p))


def build_for_data(p: Params, info: dict, resume: Checkpoint | None, log) -> tuple[torch.nn.Module, MadeFor]:
    """The model for the data (seeded, so every rank starts from the same weights), checked against the
    image size before any work, with the pretrained weights in it, or the checkpoint's when resuming."""
    torch.manual_seed(p.train.seed)
    c, h, _ = info["shape"]
    small_stem = uses_small_stem(p.model.name, h, p.model.small_input_stem)
    model = build_model(p.model.name, c, h, info["num_classes"], small_stem, info.get("dataset"))
    with same_on_every_rank():
        check_input_size(model, p.model.name, c, h, info.get("dataset"))
    pretrained = read_pretrained(p.model)
    normalization = pretrained_normalization(pretrained, c)
    if pretrained is not None and resume is None:
        log(fit_pretrained(model, pretrained, p.model.name, small_stem))
    if resume is not None:
        model.load_state_dict(resume.model_state)
    return model, MadeFor(small_stem, pretrained, normalization)


def log_resume(restart: RestartReport | None, resume: Checkpoint | None, checkpoint_path: Path, epochs: int,
               log) -> None:
    """Say where the run starts: after a restart of the group (and who died), from a checkpoint, or afresh."""
    start_epoch = resume.epoch if resume is not None else 0
    if restart is not None:  # the elastic agent restarted the group after a rank died
        for lost in restart.lost:
            log(describe(lost))
        log(f"restarted after rank {restart.lost_ranks} died (attempt {restart.attempt} of {restart.max_restarts}); "
            + (f"resuming after epoch {start_epoch}" if resume else "no epoch had completed; starting afresh"))
    elif resume is not None:
        log(f"Resuming from {checkpoint_path} after epoch {start_epoch} of {epochs}")


def setup_line(p: Params, plan: DevicePlan, ctx: DistContext, device: torch.device, st: LoopState,
               model: torch.nn.Module) -> str:
    """The run's set-up in one line: devices, strategy, batches, precision, model."""
    cfg = p.train
    per_device = plan.per_device_batch(cfg.pass_batch, ctx)
    strategy = {"dp": "dp (nn.DataParallel)" if plan.use_data_parallel else "dp (single device)",
                "ddp": f"ddp ({plural(ctx.world_size, 'process', 'processes')})"}[plan.strategy]
    where = f"cuda {plan.used_device_ids(ctx)}" if device.type == "cuda" else \
        "cpu" + (f" x{ctx.world_size} processes" if ctx.world_size > 1 else "")
    passes = f" in {cfg.accumulate} passes of {cfg.pass_batch}" if cfg.accumulate > 1 else ""
    threads = f", {plural(torch.get_num_threads(), 'CPU thread')}" + (" per process" if ctx.world_size > 1 else "")
    return (f"train: accelerator {device.type}"
            f"{'' if device.type == 'cuda' else ' (no CUDA device; training on the CPU)'}, "
            f"devices {where}, strategy {strategy}, global batch {cfg.batch_size}{passes}, per-device batch "
            f"{per_device}, precision {precision_name(st.amp_dtype)}, model {p.model.name} "
            f"({count_parameters(model):,} parameters){threads if device.type == 'cpu' else ''}")


def log_data(cfg: TrainParams, st: LoopState, info: dict, train_split: Split, log) -> None:
    """Say where the batches come from and how they are augmented."""
    log(f"data: {len(train_split):,} training images, {train_split.where()}")
    augmented = augmentations(st.augment_pad, st.augment_flip, cfg.mixup_alpha, cfg.cutmix_alpha)
    if augmented or cfg.augment:
        flip = "" if st.augment_flip or not cfg.augment else \
            f"; no horizontal flip (train.hflip: {show_value(cfg.hflip)}, dataset {info['dataset']})"
        log(f"augmentation: {augmented}{flip}")


def train_epoch(wrapped: torch.nn.Module, train_split: Split, epoch: int, st: LoopState, progress: Progress,
                cfg: TrainParams, log) -> dict:
    """One epoch of training on every rank: its record in the history (val_* added by `validate`)."""
    compiled_before = st.compile_seconds
    stats = train_one_epoch(wrapped, train_split, epoch, st, progress.for_epoch(epoch))
    if st.compile_seconds > compiled_before:
        log(f"epoch {epoch}: compiling (train.compile: {show_value(cfg.compile)}) took "
            f"{st.compile_seconds - compiled_before:.1f} s, not counted in samples/s")
    return {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy, "seconds": stats.seconds,
            "samples": stats.samples, "samples_per_second": stats.samples_per_second}


def validate(wrapped: torch.nn.Module, st: LoopState, val_split: Split, history: list[dict],
             best_state: dict | None, p: Params, device: torch.device) -> dict | None:
    """Rank 0: validate the weights to be kept and complete the epoch's record; the kept weights of the
    best epoch so far (train.keep: best), else `best_state` as it was."""
    record = history[-1]
    kept = kept_model(wrapped, st)
    val = evaluate(kept, val_split, st.mean, st.std, p.evaluate.batch_size, device, st.amp_dtype, st.channels_last)
    record.update(val_loss=val.loss, val_accuracy=val.accuracy)
    if p.train.keep == "best" and best_epoch(history) == record["epoch"]:
        best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
    return best_state


def print_flushed(*args) -> None:
    print(*args, flush=True)  # at once, also into DVC's pipe: the line says the epoch is checkpointed


def epoch_line(record: dict, epochs: int) -> str:
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.4f}  val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}  "
            f"{record['samples_per_second']:,.0f} samples/s  {record['seconds']:.2f}s")


def save_epoch_checkpoint(checkpoints: CheckpointWriter, wrapped: torch.nn.Module, st: LoopState,
                          history: list[dict], fingerprint: dict, best_state: dict | None) -> None:
    """The per-epoch checkpoint (rank 0): everything a killed run needs to resume byte-identically,
    copied now and written while the next epoch trains."""
    epoch = history[-1]["epoch"]
    checkpoints.save(epoch, unwrap(wrapped), st.optimizer, st.scaler, epoch, st.step, history, fingerprint, st.ema,
                     best_state)


def summarize(p: Params, plan: DevicePlan, ctx: DistContext, device: torch.device, st: LoopState,
              model: torch.nn.Module, made: MadeFor, info: dict, history: list[dict], start_epoch: int,
              train_split: Split, peaks: list[float], started: float, extra: dict) -> RunSummary:
    """run.json: how the run went."""
    cfg = p.train
    throughput = sum(r["samples"] for r in history) / max(sum(r["seconds"] for r in history), 1e-9)
    best = best_epoch(history)
    return RunSummary(
        accelerator=device.type,
        strategy=plan.strategy,
        data_parallel=plan.use_data_parallel,
        device_ids=plan.used_device_ids(ctx),
        device_names=device_names(plan, ctx, device),
        num_devices=plan.num_devices(ctx),
        world_size=ctx.world_size,
        global_batch=cfg.batch_size,
        accumulate=cfg.accumulate,
        per_device_batch=plan.per_device_batch(cfg.pass_batch, ctx),
        precision=precision_name(st.amp_dtype),
        model=p.model.name,
        parameters=count_parameters(model),
        small_input_stem=made.small_stem if is_resnet(p.model.name) else None,
        pretrained=made.pretrained.source if made.pretrained else None,
        normalization=made.normalization[2] if made.normalization else "train split",
        dataset=info["dataset"],
        epochs=cfg.epochs,
        epochs_run=len(history),
        stopped_early=early_stop(history, cfg.patience) is not None,
        best_epoch=best,
        best_val_accuracy=history[best - 1]["val_accuracy"],
        kept=f"best (epoch {best})" if cfg.keep == "best" else f"last (epoch {len(history)})",
        resumed_from_epoch=start_epoch or None,
        epoch_seconds=[round(r["seconds"], 4) for r in history],
        compile=compile_mode(cfg.compile),
        compile_seconds=round(st.compile_seconds, 3),
        stage_seconds=round(time.perf_counter() - started, 3),
        data_on_device=train_split.images.device.type == "cuda",
        data_streamed=train_split.streamed,
        torch_version=torch.__version__,
        versions=library_versions(),
        train_params=p.section_dict("train"),
        samples_per_second=round(throughput, 1),
        peak_memory_mb=peaks,
        # On the CPU max RSS also counts the pages of the memory-mapped splits a process has read: shared
        # page cache, not its own memory (benchmarks/README.md, "100,000 photos").
        peak_memory_kind="cuda allocated per device" if device.type == "cuda"
        else "process max RSS per process, incl. the mapped splits' shared pages",
        **extra,  # launcher, restarts, gpu_claim, threads, threads_from, omp_wait_policy
        history=history,
    )


def saved_line(model_path: Path, cfg: TrainParams, st: LoopState, run: RunSummary) -> str:
    kept_weights = (f"epoch {run.best_epoch}'s weights (train.keep: best; val accuracy {run.best_val_accuracy:.4f})"
                    if cfg.keep == "best" else f"the last epoch's weights (epoch {run.epochs_run})")
    if st.ema is not None:
        kept_weights += f", their moving average (train.ema = {cfg.ema:g})"
    throughput = sum(r["samples"] for r in run.history) / max(sum(r["seconds"] for r in run.history), 1e-9)
    return (f"saved {model_path}: {kept_weights}  ({throughput:,.0f} samples/s over "
            f"{plural(run.epochs_run, 'epoch')})")


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


def check_batch_size(cfg: TrainParams, n_train: int, plan: DevicePlan, ctx: DistContext, launcher: str | None,
                     log) -> None:
    batch_size = cfg.batch_size
    if batch_size > n_train:
        raise UserError(f"train.batch_size = {batch_size} is larger than the training split ({n_train} images); "
                        f"set train.batch_size to {n_train} or less")
    if launcher == "torchrun":  # a run this command plans was checked before any rank started (plan_training)
        check_batch_split(cfg, ctx.world_size, under_torchrun=True)
    if plan.use_data_parallel and cfg.pass_batch < plan.num_devices(ctx):
        log(f"warning: train.batch_size = {batch_size} is smaller than the {plan.num_devices(ctx)} GPUs; "
            f"some GPUs get no samples")


class RunPosition:
    """Where training is (the epoch running, the last one checkpointed), for what Ctrl-C says."""

    def __init__(self, checkpoint_path: Path, epochs: int, epoch: int, checkpoints: CheckpointWriter | None):
        self.checkpoint_path, self.epochs, self.epoch, self.checkpoints = checkpoint_path, epochs, epoch, checkpoints

    def saved(self) -> int | None:
        """The epoch whose checkpoint is on disk, once the writes under way have landed (rank 0)."""
        if self.checkpoints is None:
            return None
        try:
            return self.checkpoints.wait()
        except Exception:  # noqa: BLE001 - a failed write: the file on disk is the one before it
            return self.checkpoints.saved

    @contextlib.contextmanager
    def said_on_interrupt(self):
        """Ctrl-C (SIGINT) becomes one line: the epoch interrupted, the checkpoint kept, how to resume.
        Whatever ends the epochs, the checkpoint being written lands first."""
        try:
            yield
        except KeyboardInterrupt:
            # Every rank of a DDP group gets the terminal's SIGINT: rank 0 says it.
            raise RefusedOnEveryRank(interrupted_line(self.epoch, self.epochs, self.saved(), self.checkpoint_path)) \
                from None
        except BaseException:
            self.saved()
            raise


def checkpoint_kept(p: Params, paths: TrainPaths) -> str:
    """What a stopped run leaves to resume from, read from the checkpoint file itself."""
    checkpoint_path = paths.checkpoint
    try:
        ck = resumable_checkpoint(checkpoint_path, run_fingerprint(p, paths.data), lambda *a, **k: None)
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
    # -s: -f alone would force every stage before train too (check-params, prepare-data).
    return (f"rerun the same command to resume after epoch {epoch} (`dvc repro` reruns train when its params or "
            "data changed; when they did not, `dvc repro -f -s train`, then `dvc repro` for the stages after it)")


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


def write_outputs(paths: TrainPaths, model: torch.nn.Module, metadata: dict, live, run: RunSummary,
                  kept_record: dict) -> None:
    """The stage's outputs, all at the very end, each written beside and renamed into place: the
    weights, then DVCLive's folder moved from its staging place into `metrics_dir` (the curves'
    folder swapped whole, so no curve of an older run survives), then run.json. dvc.yaml marks them
    `persist: true`: DVC leaves the last good ones in place, and only a run that completes replaces them.

    metrics.json's train and val values and its step are those of `kept_record`, the epoch whose weights are saved
    (with train.keep: best, not the last epoch's), so that `dvc exp show` puts them beside the test
    metrics of the same weights."""
    for name, value in curve_point(kept_record).items():
        live.log_metric(name, value, plot=False)  # the summary only: the curves keep every epoch
    for name in ("samples_per_second", "num_devices", "world_size"):
        live.log_metric(name, getattr(run, name), plot=False)
    # metrics.json's `step` is DVCLive's: that of the last `next_step`, the last epoch. The saved epoch's step
    # instead, so that `dvc exp show` puts it beside that epoch's values; `Live.end()` keeps a step set in the
    # summary (it reads it back before its last `make_summary`), and the curves keep every epoch's step.
    live.summary["step"] = live_step(kept_record["epoch"])
    live.end()
    save_model(paths.model, model, metadata)
    live_dir = Path(live.dir)
    for item in sorted(live_dir.iterdir()):
        install(item, paths.metrics / item.name)
    shutil.rmtree(live_dir, ignore_errors=True)
    run.write(paths.metrics / "run.json")


def log_epoch(live, record: dict) -> None:
    """One epoch's point of the curves, at step `live_step(epoch)` (`open_live` replays a resumed run's
    epochs from the first, so an epoch's step is the same after a resume)."""
    for name, value in curve_point(record).items():
        live.log_metric(name, value)
    live.next_step()


def live_step(epoch: int) -> int:
    """DVCLive's step of an epoch (its steps count from 0): the `step` column of the curves."""
    return epoch - 1


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
