"""The probe stage: time a few training steps of the trained model at 1, 2, 4, ... devices.

It answers "how does the speed scale with the number of GPUs?" by timing `analyze.probe_steps`
optimizer steps (after a short warm-up) of the trained architecture with the training core itself
(`prepare_model`, `build_loop_state`, `train_one_epoch`), at

  weak scaling:   the training run's per-device batch on every device (global batch grows),
  strong scaling: the training run's global batch split over the devices,

and writes what it measured to one JSON file (report/scaling.json), which the analyze stage
reads. It is a stage of its own because it times the hardware: a change to the report's wording
reruns analyze, never this.

DataParallel points run in this process; DDP points start their ranks with torch's elastic
launcher (`core.launch`), as the train stage does: each rank reruns `python -m stages probe` and
finds its point in the launch plan. It times only what it can compare: 2 or more GPUs, or on a
machine without CUDA (with `analyze.probe_ddp`) one process against several DDP processes. One
device alone is a single point, with no speedup to read, which the train stage's own samples/s
already gives; then the file records that the probe did not run, and why.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .core.batches import Split, place_split
from .core.devices import DevicePlan, configure_determinism, peak_memory_mb, process_device
from .core.distributed import DistContext, all_gather_floats
from .core.launch import launch_ranks, run_as_rank
from .core.loop import build_loop_state, prepare_model, train_one_epoch
from .core.weights import load_model
from .errors import UserError
from .io import read_json, write_json
from .model_file import check_weights_use, read_metadata
from .params import Params, TrainParams
from .prepared import check_prepared_with, load_prepared, read_info
from .probe_skip import PROBE_OFF, nothing_to_compare, write_not_run
from .run_summary import read_run_summary

WARMUP_STEPS = 2  # the first steps pay for CUDA context, cuDNN autotuning and DataParallel replicas


@dataclass
class ProbePoint:
    """One timed configuration: a strategy on `devices` devices at one global batch."""

    strategy: str  # "dp" (one process; DataParallel when devices > 1) or "ddp"
    devices: int
    global_batch: int
    samples_per_second: float | None = None  # None when it could not run (see note)
    seconds: float = 0.0  # the timed steps only
    warmup_seconds: float = 0.0  # the untimed first steps (CUDA context, cuDNN autotuning, replicas)
    peak_memory_mb: list[float] = field(default_factory=list)  # per GPU (CUDA) or the process (CPU)
    note: str = ""


@dataclass
class ProbeResult:
    accelerator: str  # "cuda" or "cpu"
    device_names: list[str]
    steps: int
    per_device_batch: int  # weak scaling keeps this per device
    global_batch: int  # strong scaling keeps this in total
    data_on_device: bool  # True when the probe's batches were indexed on the GPU (no host copies)
    points: list[ProbePoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why
    seconds: float = 0.0  # wall time of the whole probe, set-up and warm-up included

    @property
    def step_seconds(self) -> float:
        """Time spent in training steps (warm-up and timed); the rest of `seconds` is set-up."""
        return sum(p.seconds + p.warmup_seconds for p in self.points)


# --- what to measure ---------------------------------------------------------------


def device_counts(available: int) -> list[int]:
    """1, 2, 4, ... up to `available`, plus `available` itself when it is not a power of two."""
    counts, k = [], 1
    while k <= available:
        counts.append(k)
        k *= 2
    if available >= 1 and counts[-1] != available:
        counts.append(available)
    return counts


def scaling_batches(devices: int, per_device_batch: int, global_batch: int) -> dict[str, int | None]:
    """The global batch of each scaling mode at `devices` devices (None: strong batch does not split)."""
    strong = global_batch if global_batch % devices == 0 else None
    return {"weak": per_device_batch * devices, "strong": strong}


def planned_points(strategies: list[str], counts: list[int], per_device_batch: int,
                   global_batch: int) -> list[tuple[str, int, int]]:
    """Unique (strategy, devices, global batch) to time. Weak and strong share a point where they
    coincide (one device when training used one; the training run's own device count). DDP starts
    at 2 devices: with one device it is the single-device DP step plus a process group."""
    points: list[tuple[str, int, int]] = []
    for strategy in strategies:
        for k in counts:
            if strategy == "ddp" and k < 2:
                continue
            for batch in scaling_batches(k, per_device_batch, global_batch).values():
                if batch is not None and (strategy, k, batch) not in points:
                    points.append((strategy, k, batch))
    return points


# --- timing with the training core -------------------------------------------------


def probe_samples(images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n training samples (a view), repeated when the split holds fewer than n."""
    if len(labels) >= n:
        return images[:n], labels[:n]
    idx = torch.arange(n) % len(labels)
    return images[idx], labels[idx]


def head(split: Split, n: int) -> Split:
    """The first n samples of a split: `train_one_epoch` then runs exactly n // batch steps."""
    return replace(split, images=split.images[:n], labels=split.labels[:n])


def time_steps(model: torch.nn.Module, split: Split, st, steps: int) -> tuple[float, float]:
    """Seconds of WARMUP_STEPS untimed steps, then of `steps` timed optimizer steps. `train_one_epoch`
    synchronizes CUDA around its own timer, so its seconds are the steps' real cost."""
    batch = st.cfg.batch_size
    warmup = train_one_epoch(model, head(split, WARMUP_STEPS * batch), 0, st).seconds
    return warmup, train_one_epoch(model, head(split, steps * batch), 1, st).seconds


def build_probe_model(weights: Path, cfg: TrainParams, plan: DevicePlan, ctx: DistContext, device: torch.device,
                      info: dict, n_samples: int):
    """The trained architecture (rebuilt from the weights' metadata), wrapped and given an optimizer
    exactly as training does."""
    torch.manual_seed(cfg.seed)
    model = prepare_model(load_model(weights), cfg, plan, ctx, device)
    return model, build_loop_state(model, cfg, ctx, device, info, n_samples)


def reset_peak_memory(device_ids: list[int]) -> None:
    for i in device_ids:
        torch.cuda.reset_peak_memory_stats(i)


def time_dp_point(weights: Path, split: Split, info: dict, cfg: TrainParams, device_ids: list[int],
                  global_batch: int, steps: int) -> ProbePoint:
    """One process: the plain model on one device, nn.DataParallel over several (CUDA), or the CPU."""
    k = max(len(device_ids), 1)
    point = ProbePoint("dp", k, global_batch)
    cfg = replace(cfg, batch_size=global_batch)
    if device_ids:
        plan, device = DevicePlan("cuda", "dp", device_ids, 1), torch.device("cuda", device_ids[0])
        reset_peak_memory(device_ids)
    else:
        plan, device = DevicePlan("cpu", "dp", [], 1), torch.device("cpu")
    try:
        model, st = build_probe_model(weights, cfg, plan, DistContext(), device, info, steps * global_batch)
        point.warmup_seconds, point.seconds = time_steps(model, split, st, steps)
        point.samples_per_second = steps * global_batch / max(point.seconds, 1e-9)
        point.peak_memory_mb = peak_memory_mb(plan, device)
    except torch.OutOfMemoryError:
        point.note = f"out of memory at {global_batch // k} samples per device"
    finally:
        model = st = None
        if device_ids:
            torch.cuda.empty_cache()
    return point


def time_ddp_point(weights: Path, data_dir: Path, cfg: TrainParams, accelerator: str, world_size: int,
                   global_batch: int, steps: int) -> ProbePoint:
    """One process per device, started by torch's elastic launcher (no restarts) as `python -m stages
    probe` with this point as its plan (see `probe_rank`); rank 0 reports."""
    point = ProbePoint("ddp", world_size, global_batch)
    with tempfile.TemporaryDirectory(prefix="stages-probe-") as tmp:
        out = Path(tmp) / "result.json"
        plan = {"weights": str(weights), "data": str(data_dir),
                "train": asdict(replace(cfg, batch_size=global_batch)),
                "accelerator": accelerator, "steps": steps, "out": str(out)}
        try:
            launch_ranks("stages", ["probe"], world_size, max_restarts=0, timeout_s=cfg.dist_timeout, plan=plan)
        except UserError as exc:
            point.note = str(exc)
            return point
        result = read_json(out)
    point.seconds, point.warmup_seconds = result["seconds"], result["warmup_seconds"]
    point.samples_per_second = steps * global_batch / max(point.seconds, 1e-9)
    point.peak_memory_mb = result["peak_memory_mb"]
    point.note = result.get("note", "")
    return point


def probe_rank(request: dict | None) -> None:
    """One DDP rank of a probe point (`request`: the launch plan `time_ddp_point` made): same entry,
    placement, wrapping and steps as the train stage's ranks."""
    if request is None:
        raise UserError("the probe stage starts its own DDP ranks; run `python -m stages probe` (or `dvc repro "
                        "probe`) without torchrun")
    accelerator = request["accelerator"]
    cfg = TrainParams(**request["train"])
    run_as_rank(accelerator, cfg.dist_timeout, lambda ctx, restart: time_rank(request, cfg, ctx))


def time_rank(request: dict, cfg: TrainParams, ctx: DistContext) -> None:
    accelerator, steps = request["accelerator"], request["steps"]
    ids = list(range(ctx.world_size)) if accelerator == "cuda" else []
    plan = DevicePlan(accelerator, "ddp", ids, ctx.world_size)
    device = process_device(plan, ctx)
    images, labels, info = load_prepared(request["data"], "train")
    split = place_split(*probe_samples(images, labels, max(steps, WARMUP_STEPS) * cfg.batch_size), device,
                        cfg.data_placement)
    if accelerator == "cuda":
        reset_peak_memory([device.index])
    model, st = build_probe_model(Path(request["weights"]), cfg, plan, ctx, device, info, steps * cfg.batch_size)
    warmup, seconds = time_steps(model, split, st, steps)
    # Ranks step in lockstep; the slowest rank's time is the step time.
    slowest = max(all_gather_floats([seconds], ctx, device))
    peaks = all_gather_floats(peak_memory_mb(plan, device), ctx, device)
    if ctx.is_main:
        write_json(request["out"], {"seconds": slowest, "warmup_seconds": warmup, "peak_memory_mb": peaks})


# --- the probe ---------------------------------------------------------------------


def gpu_inventory() -> list[dict]:
    """Name, memory and multiprocessor count of every visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"id": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "multiprocessors": props.multi_processor_count})
    return gpus


def run_probe(weights: Path, data_dir: Path, cfg: TrainParams, per_device_batch: int, global_batch: int,
              steps: int, with_ddp: bool, cpu_processes: int = 2) -> ProbeResult:
    """Time every planned point on the visible GPUs, or on the CPU one process against `cpu_processes`
    DDP processes; never fails the stage for one point. The caller checks `nothing_to_compare` first."""
    start = time.perf_counter()
    configure_determinism(cfg.deterministic)  # cuDNN autotuning on, as in training
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    accelerator = "cuda" if n_gpus else "cpu"
    notes = []
    if n_gpus:
        strategies = ["dp", "ddp"] if with_ddp else ["dp"]
        counts = device_counts(n_gpus)
        plan = planned_points(strategies, counts, per_device_batch, global_batch)
    else:  # the processes share the CPU's cores: this measures DDP's overhead there, not added compute
        notes.append("no CUDA device is visible: timed one CPU process against DDP processes on the same cores; "
                     "DataParallel and GPU scaling need a machine with 2 or more GPUs")
        counts = [1, cpu_processes]
        plan = planned_points(["dp"], [1], per_device_batch, global_batch) + planned_points(
            ["ddp"], [cpu_processes], per_device_batch, global_batch)
    skipped = sorted({k for k in counts if scaling_batches(k, per_device_batch, global_batch)["strong"] is None})
    if skipped:
        notes.append(f"strong scaling skipped at {skipped} devices: the global batch {global_batch} "
                     "does not split evenly")

    images, labels, info = load_prepared(data_dir, "train")
    largest = max(batch for strategy, _, batch in plan if strategy == "dp")
    device = torch.device("cuda", 0) if n_gpus else torch.device("cpu")
    # Placed once, as training does: on the GPU when it fits, else streamed from the mapping.
    split = place_split(*probe_samples(images, labels, max(steps, WARMUP_STEPS) * largest), device,
                        cfg.data_placement)
    names = [torch.cuda.get_device_name(i) for i in range(n_gpus)] or ["cpu"]
    result = ProbeResult(accelerator, names, steps, per_device_batch, global_batch,
                         data_on_device=split.images.device.type == "cuda", notes=notes)
    for strategy, k, batch in plan:
        if strategy == "dp":
            point = time_dp_point(weights, split, info, cfg, list(range(k)) if n_gpus else [], batch, steps)
        else:
            point = time_ddp_point(weights, data_dir, cfg, accelerator, k, batch, steps)
        result.points.append(point)
    result.seconds = time.perf_counter() - start
    return result


# --- derived numbers ---------------------------------------------------------------


def scaling_rows(result: ProbeResult) -> list[dict]:
    """One row per (strategy, scaling mode, device count) with speedup and efficiency against the
    one-device point of the same mode (DDP is compared with the single-device step too)."""
    measured = {(p.strategy, p.devices, p.global_batch): p for p in result.points}
    rows = []
    strategies = list(dict.fromkeys(p.strategy for p in result.points))
    for strategy in strategies:
        for mode in ("weak", "strong"):
            base_batch = scaling_batches(1, result.per_device_batch, result.global_batch)[mode]
            base = measured.get(("dp", 1, base_batch))
            for k in sorted({p.devices for p in result.points if p.strategy == strategy}):
                batch = scaling_batches(k, result.per_device_batch, result.global_batch)[mode]
                point = measured.get((strategy, k, batch))
                if point is None:
                    continue
                speedup = None
                if point.samples_per_second and base is not None and base.samples_per_second:
                    speedup = point.samples_per_second / base.samples_per_second
                rows.append({
                    "strategy": strategy, "scaling": mode, "devices": k, "global_batch": batch,
                    "per_device_batch": batch // k, "samples_per_second": point.samples_per_second,
                    "speedup": speedup, "efficiency": None if speedup is None else speedup / k,
                    "peak_memory_mb": point.peak_memory_mb, "note": point.note,
                })
    return rows


def probe_json(result: ProbeResult, gpus: list[dict]) -> dict:
    """What report/scaling.json holds when the probe ran: the settings, every measured point, the
    derived rows, and this machine's GPUs (`gpu_inventory`)."""
    return {"probe": "ran", **asdict(result), "step_seconds": result.step_seconds, "warmup_steps": WARMUP_STEPS,
            "rows": scaling_rows(result), "gpus": gpus}


# --- the stage ---------------------------------------------------------------------

def probe_stage(p: Params, params_path: Path, data_dir: Path, model_path: Path, run_path: Path,
                out_path: Path) -> None:
    """Time the trained model as training ran it (run.json says how), or say why not; write `out_path`."""
    check_prepared_with(read_info(data_dir), p, params_path, data_dir)
    check_weights_use(read_metadata(model_path), model_path, params=(p, params_path),
                      data=(read_info(data_dir), data_dir))
    run = read_run_summary(run_path)
    gpus = gpu_inventory()
    reason = PROBE_OFF if not p.analyze.probe else nothing_to_compare(len(gpus), p.analyze.probe_ddp)
    if reason:
        write_not_run(out_path, reason, gpus)
        return
    # One forward pass per step (no accumulation): the probe times what each device computes per pass.
    cfg = replace(TrainParams(**run.train_params), accumulate=1)
    # On the CPU: as many DDP processes as training ran, or the smallest comparison, 2.
    processes = run.world_size if run.accelerator == "cpu" and run.world_size > 1 else 2
    result = run_probe(model_path, data_dir, cfg, run.per_device_batch, run.global_batch,
                       p.analyze.probe_steps, p.analyze.probe_ddp, processes)
    write_json(out_path, probe_json(result, gpus))
    print(f"wrote {out_path}: {len(result.points)} points timed in {result.seconds:.2f} s "
          f"({result.step_seconds:.2f} s of steps) vs {run.stage_seconds:.2f} s the train stage took")
