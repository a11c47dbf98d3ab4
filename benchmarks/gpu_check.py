"""One-GPU check of the training core: wrappers give the same weights, and the loop is fast.

    python benchmarks/gpu_check.py                    # on a CUDA machine, from the repo root; < 4 minutes
    python benchmarks/gpu_check.py --json gpu.json    # also write the figures
    python benchmarks/gpu_check.py --smoke            # tiny sizes; runs on a CPU-only machine too

Sections (each runs on its own; a failure becomes an ERROR row and the rest still run; (viii) runs last):
  (i)   nn.DataParallel on one GPU vs the plain model: max |weight difference| after a few SGD steps
  (ii)  DDP with one process (in-process group) vs the plain model: weight difference and samples/s
  (iii) bf16 vs fp32 samples/s of the core loop, small-cnn and resnet18, 3x32x32, channels_last
  (iv)  data resident on the GPU (place_split) vs a per-sample DataLoader (pin_memory): samples/s
  (v)   the core loop vs a bare PyTorch loop on the GPU, same model, data and precision
  (vi)  the step's floor: the same step captured once as a CUDA graph and replayed, against the
        core's step, eager and with train.compile: reduce-overhead (small-cnn, batch 256)
  (vii) resnet18 on CIFAR-shaped data (50,000 x 3x32x32) at batch 512, bf16, channels_last, through
        the core as the train stage drives it, eager and compiled
  (viii) a peer side by side: airbench (--airbench PATH, a clone of KellerJordan/cifar10-airbench)
        on the same GPU, its samples/s next to the core's
  (ix)  a split streamed from its memory-mapped file (train.data_placement: stream) vs the same
        split resident on the GPU: resnet18 on 3x128x128 images

Needs only torch (+ torchvision for resnet18) and the training core: no DVC, DVCLive or pydantic.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root, so `stages` imports without being installed

import torch  # noqa: E402

from stages.core.precision import precision_name  # noqa: E402

FORBIDDEN_MODULES = ("dvc", "dvclive", "pydantic")
TARGET_CORE_VS_BARE = 0.95
TARGET_STREAMED_VS_RESIDENT = 0.9
TARGET_CORE_VS_DATALOADER = 3.0
TARGET_STEP_MS = 1.0  # (vi) small-cnn, batch 256: the train stage's step
TARGET_STEP_VS_FLOOR = 1.15  # (vi) the train stage's step against the captured-graph floor
TARGET_RESNET_CIFAR = 40_000  # (vii) samples/s
SAME_WEIGHTS_TOLERANCE = 1e-6  # fp32, same kernels, same order: expect exactly 0


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is. The timed epochs are cut to about `target_seconds` of the
    core loop, so the whole check stays within a few minutes whatever the GPU."""

    shape: tuple[int, int, int] = (3, 32, 32)
    pool_images: int = 50_000  # synthetic images made once; measurements take a prefix
    equivalence_batch: int = 64
    equivalence_steps: int = 5
    batch_small_cnn: int = 512  # (iii)
    batch_resnet: int = 256  # (iii), (v)
    batch_resnet_large: int = 1024  # (iii): big enough that the GPU, not the CPU, sets the pace
    loop_batch: int = 256  # (ii), (iv), (v)
    warmup_steps: int = 10  # untimed steps: CUDA context, cuDNN autotuning, allocator
    min_steps: int = 20
    target_seconds: float = 1.5
    repeats: int = 3
    loader_workers: int = 4  # the extra DataLoader row; 0 workers is the target row
    floor_batch: int = 256  # (vi)
    cifar_batch: int = 512  # (vii)
    stream_shape: tuple[int, int, int] = (3, 128, 128)  # (ix)
    stream_images: int = 8192  # (ix): 400 MB of uint8 images in the mapped file


SMOKE = Sizes(shape=(3, 8, 8), pool_images=256, equivalence_batch=16, equivalence_steps=3, batch_small_cnn=32,
              batch_resnet=8, batch_resnet_large=16, loop_batch=32, warmup_steps=1, min_steps=2, target_seconds=0.1,
              repeats=1, loader_workers=2, floor_batch=32, cifar_batch=32,
              stream_shape=(3, 8, 8), stream_images=256)


@dataclass
class Row:
    section: str
    measurement: str
    value: float | str | None = None
    unit: str = ""
    target: str = ""
    ok: bool | None = None  # None: no target
    peak_mib: float | None = None
    error: str = ""

    @property
    def status(self) -> str:
        if self.error:
            return "SKIPPED" if self.error.startswith("skipped") else "ERROR"
        return "" if self.ok is None else ("ok" if self.ok else "MISSED")


@dataclass
class Check:
    """What every section needs: the device, the sizes, the data pool, and the rows so far."""

    device: torch.device
    sizes: Sizes
    images: torch.Tensor | None = None  # uint8 pool on the CPU
    labels: torch.Tensor | None = None
    rows: list[Row] = field(default_factory=list)
    airbench: Path | None = None  # a clone of KellerJordan/cifar10-airbench, for (viii)
    airbench_timeout_s: float = 900.0
    resnet_cifar_rate: float | None = None  # (vii)'s best samples/s, shown beside airbench's

    def add(self, *args, **kwargs) -> None:
        kwargs.setdefault("peak_mib", peak_mib(self.device))
        self.rows.append(Row(*args, **kwargs))


# --- helpers ---------------------------------------------------------------------------------


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def workload(c: Check, model_name: str, batch: int, precision: str, n: int | None = None, **kw):
    from benchmarks.loops import Workload

    n = len(c.labels) if n is None else n
    return Workload(model_name, c.images[:n], c.labels[:n], 10, batch, kw.pop("lr", 0.002), c.device, precision, **kw)


def sized(c: Check, w):
    """The workload cut to about sizes.target_seconds of core-loop training, from a probe run."""
    from benchmarks.loops import CoreLoop, timed

    s = c.sizes
    probe = CoreLoop(w.subset(s.min_steps * w.batch_size))
    probe.warm_up(s.warmup_steps)
    rate = probe.samples / timed(probe.run_epoch, c.device)
    del probe
    n = int(rate * s.target_seconds) // w.batch_size * w.batch_size
    return w.subset(max(s.min_steps * w.batch_size, min(n, len(w.labels))))


def max_weight_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    from stages.core.loop import unwrap

    sa, sb = unwrap(a).state_dict(), unwrap(b).state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def sgd_no_momentum() -> dict:
    # Plain SGD: the update is a pure function of the gradient, so any wrapper difference shows.
    return dict(optimizer="sgd", momentum=0.0, weight_decay=0.0)


def same_weights_row(c: Check, section: str, what: str, diff: float) -> None:
    c.add(section, f"max |w - w_plain|, {what}", diff, "", f"<= {SAME_WEIGHTS_TOLERANCE:g}",
          diff <= SAME_WEIGHTS_TOLERANCE)


# --- the sections ----------------------------------------------------------------------------


def check_imports(c: Check) -> None:
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN_MODULES))
    c.add("setup", "dvc / dvclive / pydantic imported by the core", ", ".join(loaded) or "none", "", "none",
          not loaded, peak_mib=None)


def check_data_parallel(c: Check) -> None:
    """(i) One GPU: prepare_model's dp path and a forced nn.DataParallel both train exactly like the plain model."""
    from benchmarks.loops import CoreLoop
    from stages.core.devices import DevicePlan

    s, sec = c.sizes, "(i) dp vs single"
    w = workload(c, "mlp", s.equivalence_batch, "fp32", s.equivalence_steps * s.equivalence_batch, lr=0.05)
    ids = [c.device.index or 0] if c.device.type == "cuda" else []
    plain = CoreLoop(w, plan=DevicePlan(c.device.type, "dp", [], 1), **sgd_no_momentum())
    start = {k: v.clone() for k, v in plain.model.state_dict().items()}
    via_plan = CoreLoop(w, plan=DevicePlan(c.device.type, "dp", ids, 1), **sgd_no_momentum())
    forced = CoreLoop(w, plan=DevicePlan(c.device.type, "dp", ids, 1), force_data_parallel=True, **sgd_no_momentum())
    for loop in (plain, via_plan, forced):
        loop.run_epoch()
    moved = max((plain.model.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    c.add(sec, f"mlp, {w.steps} SGD steps: max |w - w_start| (must be > 0)", moved, "", "> 0", moved > 0)
    c.add(sec, f"prepare_model(dp, device_ids {ids}) returns", type(via_plan.model).__name__)
    same_weights_row(c, sec, "prepare_model(dp, 1 device)", max_weight_difference(via_plan.model, plain.model))
    same_weights_row(c, sec, f"nn.DataParallel(device_ids={[c.device.index or 0]})",
                     max_weight_difference(forced.model, plain.model))


def check_ddp(c: Check) -> None:
    """(ii) DDP in a one-process group (nccl on CUDA, gloo on the CPU), joined the way the train stage joins."""
    import torch.distributed as dist

    from benchmarks.loops import CoreLoop, race
    from stages.core.devices import DevicePlan
    from stages.core.distributed import free_port, init_distributed, shutdown_distributed

    s, sec = c.sizes, "(ii) ddp(1) vs single"
    w_eq = workload(c, "mlp", s.equivalence_batch, "fp32", s.equivalence_steps * s.equivalence_batch, lr=0.05)
    w_speed = sized(c, workload(c, "small-cnn", s.loop_batch, "auto"))
    # Build the single-device loops before the group exists: DistContext().distributed is True
    # whenever a process group is initialised, and prepare_model would then wrap them in DDP too.
    plain_eq = CoreLoop(w_eq, **sgd_no_momentum())
    plain_speed = CoreLoop(w_speed)
    plain_speed.name = "single"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = init_distributed(c.device.type, timeout_s=300)
        ids = [c.device.index or 0] if c.device.type == "cuda" else []
        plan = DevicePlan(c.device.type, "ddp", ids, 1)
        ddp_eq = CoreLoop(w_eq, plan=plan, ctx=ctx, **sgd_no_momentum())
        ddp_speed = CoreLoop(w_speed, plan=plan, ctx=ctx)
        ddp_speed.name = "ddp"
        c.add(sec, "backend / wrapper", f"{dist.get_backend()} / {type(ddp_eq.model).__name__}")
        plain_eq.run_epoch()
        ddp_eq.run_epoch()
        same_weights_row(c, sec, f"DDP world size 1, mlp, {w_eq.steps} SGD steps",
                         max_weight_difference(ddp_eq.model, plain_eq.model))
        t = race([plain_speed, ddp_speed], s.repeats, s.warmup_steps, c.device)
        label = f"small-cnn {precision_name(w_speed.amp_dtype)} batch {w_speed.batch_size}"
        c.add(sec, f"samples/s single, {label}", t["single"].best, "samples/s")
        c.add(sec, f"samples/s ddp(1), {label}", t["ddp"].best, "samples/s")
        c.add(sec, "ddp(1) / single", t["ddp"].best / t["single"].best, "x", "~1 (info)")
    finally:
        shutdown_distributed()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_precision(c: Check) -> None:
    """(iii) What bf16 autocast buys over fp32 in the core loop (channels_last on CUDA for conv nets)."""
    from benchmarks.loops import CoreLoop, race

    s, sec = c.sizes, "(iii) bf16 vs fp32"
    for model_name, batch in (("small-cnn", s.batch_small_cnn), ("resnet18", s.batch_resnet),
                              ("resnet18", s.batch_resnet_large)):
        rates = {}
        for precision in ("fp32", "bf16"):
            reset_peak(c.device)
            w = sized(c, workload(c, model_name, batch, precision))
            loop = CoreLoop(w)
            rates[precision] = race([loop], s.repeats, s.warmup_steps, c.device)["core"].best
            c.add(sec, f"core {model_name} {precision} batch {batch} ({batch / rates[precision] * 1e3:.2f} ms/step)",
                  rates[precision], "samples/s")
            del loop
        c.add(sec, f"{model_name} batch {batch}: bf16 / fp32", rates["bf16"] / rates["fp32"], "x", "> 1 (info)")


def check_loops_small_cnn(c: Check) -> None:
    """(iv) and (v) for small-cnn: the core with data on the GPU vs a DataLoader and vs a bare loop."""
    from benchmarks.loops import BareLoop, CoreLoop, DataLoaderLoop, race

    s = c.sizes
    w = sized(c, workload(c, "small-cnn", s.loop_batch, "auto"))
    label = f"small-cnn {precision_name(w.amp_dtype)} batch {w.batch_size}, {w.samples} samples/epoch"
    t = race([CoreLoop(w), BareLoop(w), DataLoaderLoop(w)], s.repeats, s.warmup_steps, c.device)
    core = t["core"].best
    c.add("(iv) gpu-resident vs DataLoader", f"core (place_split on {c.device.type}), {label}", core, "samples/s")
    c.add("(iv) gpu-resident vs DataLoader", "DataLoader, per-sample, 0 workers, pin_memory", t["dataloader"].best,
          "samples/s")
    c.add("(iv) gpu-resident vs DataLoader", "core / DataLoader", core / t["dataloader"].best, "x",
          f">= {TARGET_CORE_VS_DATALOADER:g}", core / t["dataloader"].best >= TARGET_CORE_VS_DATALOADER)
    c.add("(iv) gpu-resident vs DataLoader", "bare / DataLoader (the most an in-memory loop gains here)",
          t["bare"].best / t["dataloader"].best, "x", "(info)")
    c.add("(v) core vs bare", f"bare loop, {label}", t["bare"].best, "samples/s")
    c.add("(v) core vs bare", "core / bare, small-cnn", core / t["bare"].best, "x", f">= {TARGET_CORE_VS_BARE:g}",
          core / t["bare"].best >= TARGET_CORE_VS_BARE)
    # Worker processes are how tutorials hide the per-sample cost: shown, not a target.
    try:
        loader = DataLoaderLoop(w, workers=s.loader_workers)
        rate = race([loader], s.repeats, s.warmup_steps, c.device)[loader.name].best
        c.add("(iv) gpu-resident vs DataLoader", f"core / DataLoader with {s.loader_workers} workers", core / rate, "x",
              "(info)")
    except Exception as exc:  # noqa: BLE001 - one row's failure must not hide the rows above
        c.add("(iv) gpu-resident vs DataLoader", f"DataLoader with {s.loader_workers} workers", error=one_line(exc))


def check_loops_resnet(c: Check) -> None:
    """(v) for resnet18: heavier kernels, so the loop's own overhead should vanish."""
    from benchmarks.loops import BareLoop, CoreLoop, race

    s = c.sizes
    w = sized(c, workload(c, "resnet18", s.batch_resnet, "auto"))
    t = race([CoreLoop(w), BareLoop(w)], s.repeats, s.warmup_steps, c.device)
    label = f"resnet18 {precision_name(w.amp_dtype)} batch {w.batch_size}"
    c.add("(v) core vs bare", f"core, {label}", t["core"].best, "samples/s")
    c.add("(v) core vs bare", f"bare, {label}", t["bare"].best, "samples/s")
    c.add("(v) core vs bare", "core / bare, resnet18", t["core"].best / t["bare"].best, "x",
          f">= {TARGET_CORE_VS_BARE:g}", t["core"].best / t["bare"].best >= TARGET_CORE_VS_BARE)


def needs_cuda(c: Check, section: str) -> bool:
    if c.device.type != "cuda":
        c.add(section, "section", error="skipped: needs CUDA (a CUDA graph has no CPU form)", peak_mib=None)
        return False
    return True


def check_step_floor(c: Check) -> None:
    """(vi) How far the core's step is from the least a GPU can do for it: one captured graph."""
    from benchmarks.loops import CapturedStepLoop, CoreLoop, race

    sec = "(vi) step vs floor"
    if not needs_cuda(c, sec):
        return
    s = c.sizes
    w = sized(c, workload(c, "small-cnn", s.floor_batch, "auto"))
    eager = CoreLoop(w)
    compiled = CoreLoop(w, compile="reduce-overhead")
    compiled.name = "core reduce-overhead"
    floor = CapturedStepLoop(w)
    t = race([eager, compiled, floor], s.repeats, s.warmup_steps, c.device)
    step_ms = {name: 1e3 * min(timing.seconds) / w.steps for name, timing in t.items()}
    label = f"small-cnn {precision_name(w.amp_dtype)} batch {w.batch_size}"
    c.add(sec, f"floor: one CUDA graph replay per step, {label}", step_ms["graph"], "ms/step")
    c.add(sec, "core step, eager", step_ms["core"], "ms/step")
    best = min(step_ms["core"], step_ms["core reduce-overhead"])
    c.add(sec, "core step, train.compile: reduce-overhead", step_ms["core reduce-overhead"], "ms/step",
          f"<= {TARGET_STEP_MS:g}", step_ms["core reduce-overhead"] <= TARGET_STEP_MS)
    c.add(sec, "best core step / floor", best / step_ms["graph"], "x", f"<= {TARGET_STEP_VS_FLOOR:g}",
          best / step_ms["graph"] <= TARGET_STEP_VS_FLOOR)


def check_resnet_cifar(c: Check) -> None:
    """(vii) resnet18 on CIFAR-shaped data, batch 512, bf16, channels_last, through the core."""
    from benchmarks.loops import CoreLoop, race

    sec = "(vii) resnet18 cifar-shaped"
    s = c.sizes
    precision = "bf16" if c.device.type == "cuda" else "fp32"
    w = sized(c, workload(c, "resnet18", s.cifar_batch, precision))
    loops = [CoreLoop(w)]
    if c.device.type == "cuda":
        loops.append(CoreLoop(w, compile="reduce-overhead"))
        loops[-1].name = "core reduce-overhead"
    t = race(loops, s.repeats, s.warmup_steps, c.device)
    for name, timing in t.items():
        c.add(sec, f"{name}, {len(c.labels):,} images {tuple(c.sizes.shape)}, {precision} batch {w.batch_size}",
              timing.best, "samples/s")
    best = max(timing.best for timing in t.values())
    c.add(sec, "best", best, "samples/s", f">= {TARGET_RESNET_CIFAR:,}", best >= TARGET_RESNET_CIFAR)
    c.resnet_cifar_rate = best


def check_airbench(c: Check) -> None:
    """(viii) airbench on the same GPU, its samples/s beside the core's resnet18 on the same data shape."""
    from benchmarks.airbench_peer import run_airbench

    sec = "(viii) airbench peer"
    if c.airbench is None:
        c.add(sec, "section", error="skipped: no --airbench PATH (a clone of KellerJordan/cifar10-airbench)",
              peak_mib=None)
        return
    if not needs_cuda(c, sec):
        return
    result = run_airbench(c.airbench, timeout_s=c.airbench_timeout_s)
    c.add(sec, f"airbench94_muon, {result['epochs']} epochs x batch {result['batch']}, its own timer",
          result["samples_per_second"], "samples/s", peak_mib=None)
    if c.resnet_cifar_rate:
        c.add(sec, "core resnet18 (vii) / airbench", c.resnet_cifar_rate / result["samples_per_second"], "x",
              "(info)", peak_mib=None)
def check_streamed(c: Check) -> None:
    """(vi) resnet18 on 3x128x128 images from a split that stays in its memory-mapped file, its batches
    gathered by the background thread into pinned buffers and copied on a side stream, against the
    same split resident on the GPU. The file was just written, so its pages are in the page cache:
    this measures the streaming path itself, not the disk."""
    import tempfile

    from benchmarks.loops import CoreLoop, Workload, race, synthetic_images
    from stages.io import load_tensors, save_tensors

    s, sec = c.sizes, "(ix) streamed vs resident"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        path = Path(tmp) / "train.safetensors"
        images, labels = synthetic_images(s.stream_images, s.stream_shape, 10, seed=1)
        save_tensors(path, {"images": images, "labels": labels})
        del images, labels
        tensors, _ = load_tensors(path)  # memory-mapped, as the train stage loads a split
        w = sized(c, Workload("resnet18", tensors["images"], tensors["labels"], 10, s.batch_resnet, 0.002, c.device,
                              "auto"))
        resident, streamed = CoreLoop(w, data_placement="device"), CoreLoop(w, data_placement="stream")
        resident.name, streamed.name = "resident", "streamed"
        t = race([resident, streamed], s.repeats, s.warmup_steps, c.device)
        label = (f"resnet18 {precision_name(w.amp_dtype)} batch {w.batch_size}, {'x'.join(map(str, s.stream_shape))}, "
                 f"{w.samples} samples/epoch")
        c.add(sec, f"resident on {c.device.type}, {label}", t["resident"].best, "samples/s")
        how = " (pinned buffers, side stream)" if c.device.type == "cuda" else " (background thread)"
        c.add(sec, f"streamed from the mapped file{how}", t["streamed"].best, "samples/s")
        ratio = t["streamed"].best / t["resident"].best
        c.add(sec, "streamed / resident", ratio, "x", f">= {TARGET_STREAMED_VS_RESIDENT:g}",
              ratio >= TARGET_STREAMED_VS_RESIDENT)
        del resident, streamed, tensors


SECTIONS = [
    ("(i) dp vs single", check_data_parallel),
    ("(ii) ddp(1) vs single", check_ddp),
    ("(iii) bf16 vs fp32", check_precision),
    ("(iv)+(v) small-cnn loops", check_loops_small_cnn),
    ("(v) resnet18 loops", check_loops_resnet),
    ("(vi) step vs floor", check_step_floor),
    ("(vii) resnet18 cifar-shaped", check_resnet_cifar),
    ("(ix) streamed vs resident", check_streamed),
    # Last: airbench compiles with max-autotune, the longest wait of the check; under a time limit
    # every other row is in by then (the JSON is written after each section).
    ("(viii) airbench peer", check_airbench),
]


# --- running and reporting --------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def run_sections(c: Check, budget_s: float, started: float, after_each=lambda: None) -> None:
    for name, fn in SECTIONS:
        if time.perf_counter() - started > budget_s:
            c.add(name, "section", error=f"skipped: over the {budget_s:.0f} s budget", peak_mib=None)
            continue
        reset_peak(c.device)
        t0 = time.perf_counter()
        try:
            fn(c)
        except Exception as exc:  # noqa: BLE001 - report and go on: one failure must not hide the rest
            traceback.print_exc()
            c.add(name, "section failed", error=one_line(exc))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        after_each()


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if v != 0 else "0"
    return "" if v is None else str(v)


def print_table(rows: list[Row]) -> None:
    header = ("section", "measurement", "value", "unit", "target", "status", "peak MiB")
    table = [header] + [(r.section, r.measurement, fmt_value(r.value), r.unit, r.target, r.status,
                         "" if r.peak_mib is None else f"{r.peak_mib:,.0f}") for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) if j == 2 else cell.ljust(w)
                        for j, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for r in rows:
        if r.error:
            print(f"{r.status}: {r.section} / {r.measurement}: {r.error}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (and the CPU when there is no GPU): checks it runs")
    p.add_argument("--cpu", action="store_true", help="use the CPU even when CUDA is visible (with --smoke)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="skip sections that would start after this many seconds (default 420)")
    p.add_argument("--seconds", type=float, default=None, metavar="S",
                   help=f"timed seconds per epoch of each loop (default {Sizes.target_seconds})")
    p.add_argument("--airbench-timeout", type=float, default=900.0, metavar="S",
                   help="give up on airbench after this many seconds (its max-autotune compile is most of them)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the table and machine to PATH")
    p.add_argument("--airbench", type=Path, default=None, metavar="PATH",
                   help="a clone of github.com/KellerJordan/cifar10-airbench, run beside the core in (viii)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device visible; run with --smoke for a quick CPU run of the same code",
              file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the train stage sets it when not deterministic
    sizes = SMOKE if args.smoke else Sizes()
    if args.seconds is not None:
        sizes = replace(sizes, target_seconds=args.seconds)
    c = Check(device, sizes, airbench=args.airbench, airbench_timeout_s=args.airbench_timeout)
    try:
        from benchmarks.loops import describe, machine, synthetic_images
    except Exception as exc:  # noqa: BLE001 - the import chain itself is what broke: say so plainly
        traceback.print_exc()
        print(f"gpu_check: cannot import the training core: {one_line(exc)}")
        return 1
    info = machine(device)
    c.images, c.labels = synthetic_images(c.sizes.pool_images, c.sizes.shape, 10)
    print(f"gpu_check{' --smoke' if args.smoke else ''}: {c.sizes.pool_images} synthetic uint8 images "
          f"{c.sizes.shape}; best of {c.sizes.repeats} timed epochs per loop", file=sys.stderr, flush=True)
    run_sections(c, args.budget, started, after_each=lambda: write_json(args.json, c, info, args.smoke, started))
    check_imports(c)  # after the sections, so lazy imports (torchvision, torch.distributed) count too
    c.rows.insert(0, c.rows.pop())
    peaks = [r.peak_mib for r in c.rows if r.peak_mib is not None]
    if peaks:
        c.add("total", "peak GPU memory of any section (allocated)", max(peaks), "MiB", peak_mib=None)
    write_json(args.json, c, info, args.smoke, started)
    print()
    smoke = "  (SMOKE: tiny sizes; targets not meaningful)" if args.smoke else ""
    print(describe(info) + f"\nelapsed {info['elapsed_s']} s{smoke}")
    print_table(c.rows)
    if args.json:
        print(f"wrote {args.json}")
    return 1 if any(r.status == "ERROR" for r in c.rows) else 0


def write_json(path: Path | None, c: Check, info: dict, smoke: bool, started: float) -> None:
    """The rows so far: written after every section, so a run stopped by a time limit keeps them."""
    if path is None:
        return
    info["elapsed_s"] = round(time.perf_counter() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(vars(r), status=r.status) for r in c.rows]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"machine": info, "smoke": smoke, "rows": rows}, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
