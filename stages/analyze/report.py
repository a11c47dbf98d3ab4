"""The report's text: the Markdown sections and the lessons drawn from the measurements.

Plain data in (run.json, info.json, metrics, the probe's rows), Markdown lines out; the
stage (`stage.py`) reads the files and writes report.md.
"""

from __future__ import annotations

from dataclasses import fields

from ..params import TrainParams, show_value

FIGURES_DIR = "figures"
# Thresholds of the lessons; each lesson line quotes the number it was derived from.
LOW_EFFICIENCY = 0.70  # DataParallel below this on 2+ GPUs: DDP will do better
SMALL_BATCH_FOR_BATCHNORM = 16  # per-device samples below which BatchNorm statistics get noisy
FLAT_SPEEDUP = 1.25  # weak-scaling speedup at the most devices below this: throughput is flat
SLOW_FIRST_EPOCH = 2.0  # first epoch this many times the others' median: start-up skews the average


# --- Markdown helpers --------------------------------------------------------------


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def fmt_memory(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values) if values else "—"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def figure_link(title: str, name: str) -> str:
    return f"![{title}]({FIGURES_DIR}/{name})"


# --- the sections ------------------------------------------------------------------


def run_summary_section(run: dict, info: dict, train_params: dict) -> list[str]:
    """What ran: data, model, the params that shape the run, devices, batches, speed, memory."""
    epochs = run.get("epoch_seconds") or []
    mean_epoch = sum(epochs) / len(epochs) if epochs else 0.0
    epoch_time = (f"{mean_epoch:.3f} s mean over {len(epochs)} epochs (first {epochs[0]:.3f} s, "
                  f"min {min(epochs):.3f} s, max {max(epochs):.3f} s; {sum(epochs):.2f} s in all)") if epochs else "—"
    counts = info["counts"]
    keys = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "precision", "augment", "compile", "seed")
    params = ", ".join(f"{k} {show_value(train_params[k])}" for k in keys if k in train_params)
    devices = ", ".join(run["device_names"])
    resumed = run.get("resumed_from_epoch")
    ids = f" (ids {run['device_ids']})" if run.get("device_ids") else ""
    rows = [
        ["dataset", f"{info['dataset']}: {counts['train']} train / {counts['val']} val / {counts['test']} test images, "
                    f"shape {info['shape']}, {info['num_classes']} classes"],
        ["model", model_description(run)],
        ["normalisation", f"mean and std of the {run.get('normalization', 'train split')}"],
        ["train params", params],
        ["recipe", recipe_description(train_params)],
        ["precision", run.get("precision", "—")],
        ["accelerator", run["accelerator"]],
        ["devices", f"{run['num_devices']}: {devices}{ids}"],
        ["strategy", f"{run['strategy']}" + (" (nn.DataParallel)" if run.get("data_parallel") else "")
                     + (f", {run['world_size']} processes" if run.get("world_size", 1) > 1 else "")],
        ["batch", f"global {run['global_batch']}, per device {run['per_device_batch']}"
                  + (f" ({run['accumulate']} passes per step)" if run.get("accumulate", 1) > 1 else "")],
        ["epochs", epochs_description(run, resumed)],
        ["wall time per epoch", epoch_time],
        ["throughput", f"{fmt_rate(run['samples_per_second'])} samples/s"
                       + (f" (not counting {run['compile_seconds']:.1f} s of torch.compile, mode {run['compile']})"
                          if run.get("compile") else "")],
        ["peak memory (MiB)", f"{fmt_memory(run.get('peak_memory_mb', []))} ({run.get('peak_memory_kind', '')})"],
    ]
    return ["## Run summary", "", *md_table(["", ""], rows), ""]


def model_description(run: dict) -> str:
    """The model, its size, its stem and where its starting weights came from."""
    text = f"{run['model']}, {run['parameters']:,} parameters"
    if run.get("small_input_stem") is not None:
        text += ", small-image stem" if run["small_input_stem"] else ", ImageNet stem"
    source = run.get("pretrained")
    if source is None:
        return text + ", trained from scratch"
    if "torchvision" in source:
        return text + f", fine-tuned from torchvision's {source['torchvision']}"
    twin = f", the same as {source['same_as']}" if source.get("same_as") else ""
    return text + f", fine-tuned from {source['file']} (sha256 {source['sha256'][:16]}...{twin})"


def recipe_description(train_params: dict) -> str:
    """The recipe keys that are not at their defaults (label smoothing, EMA, MixUp, ...)."""
    recipe = ("label_smoothing", "warmup_epochs", "ema", "mixup_alpha", "cutmix_alpha", "clip_grad_norm",
              "accumulate", "keep", "patience", "freeze_epochs", "backbone_lr")
    defaults = {f.name: f.default for f in fields(TrainParams)}
    changed = [f"{k} {show_value(train_params[k])}" for k in recipe if train_params.get(k, defaults[k]) != defaults[k]]
    return ", ".join(changed) if changed else "none (all recipe keys at their defaults)"


def epochs_description(run: dict, resumed: int | None) -> str:
    text = str(run["epochs"]) + (f" (resumed after epoch {resumed})" if resumed else "")
    if run.get("stopped_early"):
        text += f"; stopped early after epoch {run['epochs_run']} (train.patience)"
    if "best_epoch" in run:
        text += (f"; best val accuracy {run['best_val_accuracy']:.4f} at epoch {run['best_epoch']}; "
                 f"weights kept: {run['kept']}")
    return text


def quality_section(test: dict, per_class: dict, predictions: list[dict], curves: dict) -> list[str]:
    n_wrong = sum(r["actual"] != r["predicted"] for r in predictions)
    rows = [[name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"]]
            for name, s in per_class.items()]
    lines = [
        "## Quality",
        "",
        f"- test accuracy: {test['accuracy']} ({100 * test['accuracy']:.2f}%"
        + (f"; 95% CI {100 * test['accuracy_ci_low']:.2f}–{100 * test['accuracy_ci_high']:.2f}%, Wilson score, "
           f"on {len(predictions):,} test images)" if "accuracy_ci_low" in test else ")"),
        *([f"- test top-5 accuracy: {test['top5_accuracy']} ({100 * test['top5_accuracy']:.2f}%)"]
          if "top5_accuracy" in test else []),
        f"- test loss: {test['loss']}",
        f"- misclassified: {n_wrong} of {len(predictions)} test images",
        "",
        "### Per-class scores",
        "",
        *md_table(["class", "precision", "recall", "F1", "support"], rows),
        "",
        figure_link("Per-class precision, recall and F1", "per_class.png"),
        "",
        "### Confusion matrix",
        "",
        figure_link("Confusion matrix", "confusion.png"),
        "",
        "### Misclassified test images",
        "",
        figure_link("Misclassified test images", "misclassified.png"),
        "",
        "### Learning curves",
        "",
    ]
    val_acc = curves["accuracy"]["val"]
    if val_acc:
        best = max(range(len(val_acc)), key=val_acc.__getitem__)
        lines += [f"Best validation accuracy {val_acc[best]} at epoch {best + 1} of {len(val_acc)}; "
                  f"last epoch: train loss {curves['loss']['train'][-1]}, val loss {curves['loss']['val'][-1]}.", ""]
    return lines + [figure_link("Learning curves", "learning_curves.png"), ""]


def probe_cost_line(probe: dict, train_seconds: float) -> str:
    """What the probe cost, split into training steps and one-time set-up, against training's time."""
    share = ""
    if train_seconds:
        share = f", {100 * probe['seconds'] / train_seconds:.0f}% of the {train_seconds:.2f} s the train stage took"
    setup = probe["seconds"] - probe["step_seconds"]
    return (f"The probe took {probe['seconds']:.2f} s{share}: {probe['step_seconds']:.2f} s of warm-up and timed "
            "steps, "
            f"{setup:.2f} s of set-up (data, model, worker processes, and torch's one-time import of torch._dynamo "
            f"when the first optimizer is built, which training pays too).")


def scaling_section(probe: dict | None, rows: list[dict], train_seconds: float,
                    skipped_reason: str) -> list[str]:
    from .probe import WARMUP_STEPS, merge_identical_modes

    lines = ["## Scaling probe", ""]
    if probe is None:
        return lines + [f"Not run: {skipped_reason}", ""]
    names = probe["device_names"]
    device = "the CPU" if probe["accelerator"] == "cpu" else f"{plural(len(names), 'visible GPU')} ({', '.join(names)})"
    lines += [
        f"Timed {probe['steps']} training steps (after {WARMUP_STEPS} warm-up steps) of the trained model on {device}: "
        f"weak scaling keeps {probe['per_device_batch']} samples per device, strong scaling splits the global "
        f"batch of {probe['global_batch']}. Speedup and efficiency are against one device in the same mode.",
        "",
    ]
    table = []
    for row in merge_identical_modes(rows):
        table.append([row["strategy"], row["scaling"], row["devices"], row["global_batch"], row["per_device_batch"],
                      fmt_rate(row["samples_per_second"]),
                      "—" if row["speedup"] is None else f"{row['speedup']:.2f}×",
                      "—" if row["efficiency"] is None else f"{100 * row['efficiency']:.0f}%",
                      fmt_memory(row["peak_memory_mb"]) + (f" ({row['note']})" if row["note"] else "")])
    memory = "peak memory per GPU (MiB)" if probe["accelerator"] == "cuda" else "process peak RSS (MiB)"
    lines += md_table(["strategy", "scaling", "devices", "global batch", "per-device batch", "samples/s", "speedup",
                       "efficiency", memory], table)
    lines += ["", figure_link("Scaling", "scaling.png"), ""]
    lines += [probe_cost_line(probe, train_seconds), ""]
    if probe["notes"]:
        lines += ["Not measured:", "", *[f"- {note}" for note in probe["notes"]], ""]
    return lines


def lessons(run: dict, rows: list[dict], gpus: list[dict], batchnorm: bool, data_on_device: bool | None) -> list[str]:
    """Advice that follows from the measurements; every line carries the number behind it.

    rows: the probe's derived rows (may be empty); gpus: `probe.gpu_inventory()` of this machine.
    """
    devices = plural(run["num_devices"], run["accelerator"] + " device")
    out = [f"Training ran at {fmt_rate(run['samples_per_second'])} samples/s on {devices} with "
           f"{run['per_device_batch']} samples per device (global batch {run['global_batch']})."]
    measured = [r for r in rows if r["samples_per_second"]]
    if run["accelerator"] == "cpu" and not gpus:
        single = next((r for r in measured if r["devices"] == 1), None)
        probe = ""
        if single:
            probe = (f"; the probe measured {fmt_rate(single['samples_per_second'])} samples/s "
                     f"at batch {single['global_batch']}")
        out.append(f"No GPU here: training ran on the CPU{probe}. The multi-GPU lessons (DataParallel "
                   "efficiency, DDP, GPU balance) need a machine with 2 or more GPUs.")
    elif run["accelerator"] == "cpu":
        out.append(f"Training ran on the CPU with {plural(len(gpus), 'GPU')} visible here: "
                   "set `train.accelerator: auto` (or cuda) to use them.")
    epochs = run.get("epoch_seconds") or []
    if len(epochs) >= 2:
        rest = sorted(epochs[1:])[len(epochs[1:]) // 2]  # the median of the later epochs
        if epochs[0] > SLOW_FIRST_EPOCH * rest:
            start_up = epochs[0] - rest
            steady = run["samples_per_second"] * sum(epochs) / len(epochs) / rest
            out.append(f"The first epoch took {epochs[0]:.2f} s against {rest:.2f} s for the others: start-up (CUDA "
                       f"context, cuDNN autotuning, lazy imports) is {100 * start_up / sum(epochs):.0f}% of the "
                       f"{sum(epochs):.2f} s of training, so the run's {fmt_rate(run['samples_per_second'])} samples/s "
                       f"understates the steady rate of about {fmt_rate(steady)} samples/s; train longer or compare "
                       f"the probe's numbers.")
    dp_weak = [r for r in measured if r["strategy"] == "dp" and r["scaling"] == "weak" and r["devices"] > 1]
    if dp_weak:
        widest = max(dp_weak, key=lambda r: r["devices"])
        if widest["efficiency"] is not None and widest["efficiency"] < LOW_EFFICIENCY:
            advice = "set `train.strategy: ddp`" if run["strategy"] == "dp" else "keep `train.strategy: ddp`"
            out.append(f"DataParallel reached {100 * widest['efficiency']:.0f}% efficiency on {widest['devices']} GPUs "
                       f"(below {100 * LOW_EFFICIENCY:.0f}%): one process scatters inputs and gathers outputs every "
                       f"step; {advice} (one process per GPU).")
    if batchnorm and run["per_device_batch"] < SMALL_BATCH_FOR_BATCHNORM:
        out.append(f"Each device sees only {run['per_device_batch']} samples per step (< {SMALL_BATCH_FOR_BATCHNORM}): "
                   f"BatchNorm statistics are computed per device and get noisy; raise `train.batch_size` to "
                   f"{SMALL_BATCH_FOR_BATCHNORM * run['num_devices']} or more.")
    if len(gpus) > 1:
        kinds = {(g["name"], g["memory_gib"], g["multiprocessors"]) for g in gpus}
        if len(kinds) > 1:
            listing = "; ".join(f"{g['id']}: {g['name']} {g['memory_gib']} GiB, {g['multiprocessors']} SMs"
                                for g in gpus)
            smallest = min(g["memory_gib"] for g in gpus)
            out.append(f"The GPUs differ ({listing}): every step waits for the slowest, and the batch per GPU must "
                       f"fit the smallest ({smallest} GiB); use `train.devices` to pick equal ones.")
    for strategy in ("dp", "ddp"):
        weak = [r for r in measured if r["strategy"] == strategy and r["scaling"] == "weak" and r["speedup"]]
        widest = max(weak, key=lambda r: r["devices"], default=None)
        if widest is not None and widest["devices"] > 1 and widest["speedup"] < FLAT_SPEEDUP:
            where = ("the batches already come from GPU memory, so look at per-step overhead (a model too small "
                     "for the GPUs)" if data_on_device else "the data sits in host memory and every batch is copied")
            out.append(f"Throughput is flat with {strategy}: {widest['speedup']:.2f}× on {widest['devices']} devices "
                       f"({fmt_rate(widest['samples_per_second'])} samples/s): the devices wait on the input "
                       f"pipeline; {where}.")
    return out


def lessons_section(lines: list[str]) -> list[str]:
    return ["## Lessons", "", *[f"- {line}" for line in lines], ""]
