"""The analyze stage: how well the model did and how well the devices were used.

Reads the prepared data, the weights, the train stage's run.json, metrics and DVCLive
curves, and the evaluate stage's metrics, per-class scores and predictions. Writes

  report/report.md       run summary, quality, scaling probe, lessons (links the figures)
  report/figures/*.png   learning curves, per-class scores, confusion matrix,
                         misclassified images, scaling (when the probe ran)
  report/scaling.json    the probe's settings, timed points and derived rows

Only the scaling probe needs torch; everything else is files in, files out.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .artifacts import read_json, write_json, write_text
from .errors import UserError
from .params import Params

FIGURES_DIR = "figures"
MAX_MISCLASSIFIED_SHOWN = 32
# Thresholds of the lessons; each lesson line quotes the number it was derived from.
LOW_EFFICIENCY = 0.70  # DataParallel below this on 2+ GPUs: DDP will do better
SMALL_BATCH_FOR_BATCHNORM = 16  # per-device samples below which BatchNorm statistics get noisy
FLAT_SPEEDUP = 1.25  # weak-scaling speedup at the most devices below this: throughput is flat
SLOW_FIRST_EPOCH = 2.0  # first epoch this many times the others' median: start-up skews the average


# --- reading the inputs ------------------------------------------------------------


def read_tsv_column(path: Path, column: str) -> list[float]:
    """One column of a DVCLive .tsv (step<TAB>value rows) as floats; [] when the file is missing."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f, delimiter="\t")]


def read_curves(train_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Per-epoch train/val loss and accuracy from the train stage's DVCLive plots."""
    base = Path(train_dir) / "plots" / "metrics"
    return {metric: {split: read_tsv_column(base / split / f"{metric}.tsv", metric) for split in ("train", "val")}
            for metric in ("loss", "accuracy")}


def read_predictions(path: Path) -> list[dict]:
    """predictions.csv rows (index, actual, predicted), in test-set order."""
    if not Path(path).is_file():
        raise UserError(f"file not found: {path} (run the evaluate stage first, e.g. `dvc repro`)")
    with Path(path).open(newline="") as f:
        return [{"index": int(r["index"]), "actual": r["actual"], "predicted": r["predicted"]} for r in csv.DictReader(f)]


def confusion_counts(predictions: list[dict], class_names: list[str]) -> list[list[int]]:
    """matrix[true][predicted] = number of test images."""
    position = {name: i for i, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    for row in predictions:
        matrix[position[row["actual"]]][position[row["predicted"]]] += 1
    return matrix


def has_batchnorm(model_path: Path) -> bool:
    """BatchNorm layers keep running statistics; their keys give them away without building the model."""
    from .artifacts import load_tensors

    tensors, _ = load_tensors(model_path)
    return any(key.endswith("running_mean") for key in tensors)


# --- Markdown helpers --------------------------------------------------------------


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def fmt_memory(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values) if values else "—"


def yaml_value(value) -> str:
    """A param as params.yaml spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


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
    params = ", ".join(f"{k} {yaml_value(train_params[k])}" for k in keys if k in train_params)
    devices = ", ".join(run["device_names"])
    resumed = run.get("resumed_from_epoch")
    ids = f" (ids {run['device_ids']})" if run.get("device_ids") else ""
    rows = [
        ["dataset", f"{info['dataset']}: {counts['train']} train / {counts['val']} val / {counts['test']} test images, "
                    f"shape {info['shape']}, {info['num_classes']} classes"],
        ["model", f"{run['model']}, {run['parameters']:,} parameters"],
        ["train params", params],
        ["precision", run.get("precision", "—")],
        ["accelerator", run["accelerator"]],
        ["devices", f"{run['num_devices']}: {devices}{ids}"],
        ["strategy", f"{run['strategy']}" + (" (nn.DataParallel)" if run.get("data_parallel") else "")
                     + (f", {run['world_size']} processes" if run.get("world_size", 1) > 1 else "")],
        ["batch", f"global {run['global_batch']}, per device {run['per_device_batch']}"],
        ["epochs", str(run["epochs"]) + (f" (resumed after epoch {resumed})" if resumed else "")],
        ["wall time per epoch", epoch_time],
        ["throughput", f"{fmt_rate(run['samples_per_second'])} samples/s"],
        ["peak memory (MiB)", f"{fmt_memory(run.get('peak_memory_mb', []))} ({run.get('peak_memory_kind', '')})"],
    ]
    return ["## Run summary", "", *md_table(["", ""], rows), ""]


def quality_section(test: dict, per_class: dict, predictions: list[dict], curves: dict) -> list[str]:
    n_wrong = sum(r["actual"] != r["predicted"] for r in predictions)
    rows = [[name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"]]
            for name, s in per_class.items()]
    lines = [
        "## Quality",
        "",
        f"- test accuracy: {test['accuracy']} ({100 * test['accuracy']:.2f}%)",
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
    return (f"The probe took {probe['seconds']:.2f} s{share}: {probe['step_seconds']:.2f} s of warm-up and timed steps, "
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
            probe = f"; the probe measured {fmt_rate(single['samples_per_second'])} samples/s at batch {single['global_batch']}"
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
            listing = "; ".join(f"{g['id']}: {g['name']} {g['memory_gib']} GiB, {g['multiprocessors']} SMs" for g in gpus)
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


# --- the stage ---------------------------------------------------------------------


def write_figures(figures_dir: Path, curves: dict, per_class: dict, predictions: list[dict], class_names: list[str],
                  data_dir: Path, rows: list[dict] | None) -> list[Path]:
    from . import figures
    from .prepare_data import load_prepared

    written = [
        figures.learning_curves(curves, figures_dir / "learning_curves.png"),
        figures.per_class_bars(per_class, figures_dir / "per_class.png"),
        figures.confusion_heatmap(confusion_counts(predictions, class_names), class_names, figures_dir / "confusion.png"),
    ]
    wrong = [r for r in predictions if r["actual"] != r["predicted"]]
    shown = wrong[:MAX_MISCLASSIFIED_SHOWN]
    images, _, _ = load_prepared(data_dir, "test")
    if len(images) != len(predictions):
        raise UserError(f"predictions.csv has {len(predictions)} rows but the test split has {len(images)} images; "
                        "rerun the evaluate stage")
    picked = images[[r["index"] for r in shown]] if shown else images[:0]
    labels = [(r["actual"], r["predicted"]) for r in shown]
    written.append(figures.misclassified_grid(picked, labels, len(wrong), len(predictions),
                                              figures_dir / "misclassified.png"))
    if rows is not None:
        written.append(figures.scaling_plot(rows, figures_dir / "scaling.png"))
    return written


def remove_stale_figures(figures_dir: Path, keep: list[Path]) -> None:
    """A figure left from an earlier run (say scaling.png after the probe was turned off) would be
    shown by `dvc plots` as if it were current."""
    for png in figures_dir.glob("*.png"):
        if png not in keep:
            png.unlink()


def probe_scaling(p: Params, model_path: Path, data_dir: Path, run: dict):
    from .params import TrainParams
    from .probe import gpu_inventory, probe_json, run_probe

    if not p.analyze.probe:
        return None, [], gpu_inventory()
    result = run_probe(model_path, data_dir, TrainParams(**run["train_params"]), run["per_device_batch"],
                       run["global_batch"], p.analyze.probe_steps, p.analyze.probe_ddp)
    data = probe_json(result)
    return data, data["rows"], gpu_inventory()


def analyze_stage(p: Params, data_dir: Path, model_path: Path, train_dir: Path, eval_dir: Path, out_dir: Path) -> None:
    data_dir, model_path, train_dir, eval_dir, out_dir = map(Path, (data_dir, model_path, train_dir, eval_dir, out_dir))
    info = read_json(data_dir / "info.json")
    run = read_json(train_dir / "run.json")
    test = read_json(eval_dir / "metrics.json")["test"]
    per_class = read_json(eval_dir / "per_class.json")
    predictions = read_predictions(eval_dir / "predictions.csv")
    curves = read_curves(train_dir)
    # The probe times steps with the params training used, which run.json records (a dep).
    train_params = run["train_params"]

    probe, rows, gpus = probe_scaling(p, model_path, data_dir, run)
    figures_dir = out_dir / FIGURES_DIR
    written = write_figures(figures_dir, curves, per_class, predictions, info["class_names"], data_dir,
                            rows if probe is not None else None)
    remove_stale_figures(figures_dir, written)

    train_seconds = run["stage_seconds"]  # the train process's wall time, start-up included
    skipped = "`analyze.probe` is false, so no training steps were timed; set it to true to measure scaling."
    write_json(out_dir / "scaling.json", probe if probe is not None else {"probe": "off", "reason": skipped, "rows": []})
    report = [
        f"# Run report: {run['model']} on {info['dataset']}",
        "",
        *run_summary_section(run, info, train_params),
        *quality_section(test, per_class, predictions, curves),
        *scaling_section(probe, rows, train_seconds, skipped),
        *lessons_section(lessons(run, rows, gpus, has_batchnorm(model_path), probe and probe["data_on_device"])),
    ]
    write_text(out_dir / "report.md", "\n".join(report))
    cost = (f"; probe {probe['seconds']:.2f} s ({probe['step_seconds']:.2f} s of steps) vs {train_seconds:.2f} s "
            "the train stage took" if probe is not None else "; probe off")
    print(f"wrote {out_dir / 'report.md'}, {len(written)} figures in {figures_dir}{cost}")
