"""The report's text: the Markdown sections and the lessons drawn from the measurements.

Plain data in (run.json's `RunSummary`, info.json, metrics, the probe's file), Markdown lines
out; the stage (`stage.py`) reads the files and writes report.md.
"""

from __future__ import annotations

from dataclasses import fields

from ..params import TrainParams, listed, plural, show_value
from ..run_summary import RunSummary
from ..stats import wilson_interval

FIGURES_DIR = "figures"
# Thresholds of the lessons; each lesson line quotes the number it was derived from.
LOW_EFFICIENCY = 0.70  # DataParallel below this on 2+ GPUs: DDP will do better
SMALL_BATCH_FOR_BATCHNORM = 16  # per-device samples below which BatchNorm statistics get noisy
FLAT_SPEEDUP = 1.25  # weak-scaling speedup at the most devices below this: throughput is flat
SLOW_FIRST_EPOCH = 2.0  # first epoch this many times the others' median: start-up skews the average
MIN_START_UP_SECONDS = 0.5  # and at least this much longer: a few ms of start-up on tiny epochs say nothing
# The probe times the same steps as training, so its rate and training's steady rate (start-up left out) agree
# within run-to-run noise on a quiet machine; a factor of 2 either way means one of them shared the machine.
FAR_FROM_TRAINING = 2.0
# Up to this many classes the confusion matrix is a heatmap with every count written in its cell (a 24-inch
# figure still gives each cell ~60 px); beyond it the counts no longer fit and the names overlap, so the
# report lists the most-confused pairs as a table instead.
MAX_CLASSES_IN_MATRIX = 30
MOST_CONFUSED_PAIRS = 20  # rows of that table
# Lessons about the model.
LARGE_GAP = 0.10  # train minus val accuracy at the last epoch; a few points are normal (train batches are
#                   measured while the weights change, with augmentation and dropout on), ten are overfitting
#                   when the curves or the number of validation images back it (overfitting_evidence)
DIVERGED_EPOCHS = 2  # epochs validation loss must have stayed above its best (one uptick on a small split is noise)
ONE_CLASS_SHARE = 0.90  # one class predicted for this share of the test images (and more than it holds): collapse
LOW_RECALL = 0.10  # a class found in under 1 of 10 of its test images
MAX_NAMED_CLASSES = 10  # classes named in one lesson line; the per-class table has them all
RISING_EPOCHS = 3  # the last epochs over which the val curve must still be climbing
RISING_PER_EPOCH = 0.005  # half a point of val accuracy per epoch, about 1 image per epoch on digits' 143


# --- Markdown helpers --------------------------------------------------------------


def md_cell(value: object) -> str:
    """A table cell that shows `value` as it is: class names are folder names, which may hold '|' (a column
    break in a GitHub table) or a backslash (which would escape the character after it), or even a newline
    (which would end the row)."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.splitlines())


def md_table(headers: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(map(md_cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(map(md_cell, row)) + " |" for row in rows]


def fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def fmt_memory(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values) if values else "—"


def figure_link(title: str, name: str) -> str:
    return f"![{title}]({FIGURES_DIR}/{name})"


# --- the sections ------------------------------------------------------------------


def missing_glyphs_note(characters: list[str], font_list: str) -> str | None:
    """What to do when the figures drew some characters of the class names as empty boxes.

    font_list: matplotlib's cached list of fonts, which it does not refresh when a font is installed."""
    if not characters:
        return None
    them = "it" if len(characters) == 1 else "them"
    return (f"the figures draw {listed(characters, 10)} (in class names) as empty boxes: no font matplotlib knows "
            f"has {them}; the tables spell the names out. Install a font that has {them} (for Chinese, Japanese "
            f"and Korean on Debian or Ubuntu: `apt install fonts-noto-cjk`), delete matplotlib's list of fonts "
            f"(`rm {font_list}`) and run `dvc repro -f -s analyze` (-s: that stage alone, without retraining).")


def run_summary_section(run: RunSummary, info: dict) -> list[str]:
    """What ran: data, model, the params that shape the run, devices, batches, speed, memory."""
    epochs = run.epoch_seconds
    mean_epoch = sum(epochs) / len(epochs) if epochs else 0.0
    epoch_time = (f"{mean_epoch:.3f} s mean over {len(epochs)} epochs (first {epochs[0]:.3f} s, "
                  f"min {min(epochs):.3f} s, max {max(epochs):.3f} s; {sum(epochs):.2f} s in all)") if epochs else "—"
    if len(epochs) == 1:  # one number: its mean, first, min and max would all repeat it
        epoch_time = f"{epochs[0]:.3f} s (1 epoch)"
    counts = info["counts"]
    train_params = run.train_params
    keys = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "precision", "augment", "compile", "seed")
    params = ", ".join(f"{k} {show_value(train_params[k])}" for k in keys if k in train_params)
    devices = ", ".join(run.device_names)
    ids = f" (ids {run.device_ids})" if run.device_ids else ""
    rows = [
        ["dataset", f"{info['dataset']}: {counts['train']} train / {counts['val']} val / {counts['test']} test images, "
                    f"shape {info['shape']}, {info['num_classes']} classes"],
        ["model", model_description(run)],
        ["normalisation", f"mean and std of the {run.normalization}"],
        ["train params", params],
        ["recipe", recipe_description(train_params)],
        ["precision", run.precision],
        ["accelerator", run.accelerator],
        ["devices", f"{run.num_devices}: {devices}{ids}"],
        ["strategy", f"{run.strategy}" + (" (nn.DataParallel)" if run.data_parallel else "")
                     + (f", {run.world_size} processes" if run.world_size > 1 else "")],
        ["batch", f"global {run.global_batch}, per device {run.per_device_batch}"
                  + (f" ({run.accumulate} passes per step)" if run.accumulate > 1 else "")],
        ["epochs", epochs_description(run)],
        ["wall time per epoch", epoch_time],
        ["throughput", f"{fmt_rate(run.samples_per_second)} samples/s"
                       + (f" (not counting {run.compile_seconds:.1f} s of torch.compile, mode {run.compile})"
                          if run.compile else "")],
        ["peak memory (MiB)", f"{fmt_memory(run.peak_memory_mb)} ({run.peak_memory_kind})"],
    ]
    return ["## Run summary", "", *md_table(["", ""], rows), ""]


def model_description(run: RunSummary) -> str:
    """The model, its size, its stem and where its starting weights came from."""
    text = f"{run.model}, {run.parameters:,} parameters"
    if run.small_input_stem is not None:
        text += ", small-image stem" if run.small_input_stem else ", ImageNet stem"
    source = run.pretrained
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


def epochs_description(run: RunSummary) -> str:
    resumed = run.resumed_from_epoch
    text = str(run.epochs) + (f" (resumed after epoch {resumed})" if resumed else "")
    if run.stopped_early:
        text += f"; stopped early after epoch {run.epochs_run} (train.patience)"
    return text + (f"; best val accuracy {run.best_val_accuracy:.4f} at epoch {run.best_epoch}; "
                   f"weights kept: {run.kept}")


def predicted_counts(predictions: list[dict]) -> dict[str, int]:
    """How many test images were predicted as each class."""
    counts: dict[str, int] = {}
    for row in predictions:
        counts[row["predicted"]] = counts.get(row["predicted"], 0) + 1
    return counts


def score_cells(scores: dict) -> list[str]:
    """Precision, recall and F1 as table cells; n/a where evaluate found the score undefined (null)."""
    return ["n/a" if scores[key] is None else f"{scores[key]:.4f}" for key in ("precision", "recall", "f1")]


def confused_pairs(predictions: list[dict], limit: int = MOST_CONFUSED_PAIRS) -> list[tuple[str, str, int]]:
    """The (true, predicted, count) pairs of wrong predictions, most frequent first (ties by name)."""
    counts: dict[tuple[str, str], int] = {}
    for row in predictions:
        if row["actual"] != row["predicted"]:
            pair = (row["actual"], row["predicted"])
            counts[pair] = counts.get(pair, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [(true, predicted, count) for (true, predicted), count in ranked[:limit]]


def confused_pairs_section(predictions: list[dict], per_class: dict) -> list[str]:
    pairs = confused_pairs(predictions)
    if not pairs:
        return ["No test image was misclassified.", ""]
    rows = [[true, predicted, count, f"{100 * count / per_class[true]['support']:.0f}% of {per_class[true]['support']}"]
            for true, predicted, count in pairs]
    wrong_pairs = len(confused_pairs(predictions, limit=len(predictions)))
    shown = f"the {len(pairs)} most frequent of {wrong_pairs}" if wrong_pairs > len(pairs) else f"all {len(pairs)}"
    return [f"Pairs of (true class, predicted class) among the misclassified test images, {shown}:", "",
            *md_table(["true class", "predicted as", "test images", "share of the true class"], rows), ""]


def quality_section(test: dict, per_class: dict, predictions: list[dict], curves: dict) -> list[str]:
    n_wrong = sum(r["actual"] != r["predicted"] for r in predictions)
    rows = [[name, *score_cells(s), s["support"]] for name, s in per_class.items()]
    if len(per_class) <= MAX_CLASSES_IN_MATRIX:
        confusion = [figure_link("Confusion matrix", "confusion.png"), ""]
    else:
        confusion = [f"{len(per_class)} classes are too many for a readable matrix (over {MAX_CLASSES_IN_MATRIX}, "
                     "the counts no longer fit in the cells), so here are the most-confused pairs.", ""]
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
        *(["n/a: no test image of the class (recall), or none predicted as it (precision); F1 needs either.", ""]
          if any("n/a" in row for row in rows) else []),
        figure_link("Per-class precision, recall and F1", "per_class.png"),
        "",
        "### Confusion matrix",
        "",
        *confusion,
        *confused_pairs_section(predictions, per_class),
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


def later_epochs_median(epochs: list[float]) -> float:
    """The median time of the epochs after the first (the first pays for start-up)."""
    return sorted(epochs[1:])[len(epochs[1:]) // 2]


def steady_rate(run: RunSummary) -> tuple[float, str]:
    """Training's samples/s without the first epoch's start-up, and how it was taken."""
    epochs = run.epoch_seconds
    if len(epochs) < 2:
        return run.samples_per_second, "over its one epoch"
    mean = sum(epochs) / len(epochs)
    return run.samples_per_second * mean / later_epochs_median(epochs), "its median epoch after the first"


def probe_far_from_training(rows: list[dict], run: RunSummary) -> str | None:
    """A warning when the probe's point in training's own configuration ran at a rate far from training's.

    The two time the same steps of the same model, so a large factor says the machine was shared
    while one of them ran, and the probe's other numbers are suspect too."""
    if run.accumulate > 1:  # training made several passes per step; the probe makes one
        return None
    same = [r for r in rows if r["samples_per_second"] and r["devices"] == run.num_devices
            and r["global_batch"] == run.global_batch]
    point = next((r for r in same if r["strategy"] == run.strategy), same[0] if same else None)
    if point is None:
        return None
    trained, how = steady_rate(run)
    probed = point["samples_per_second"]
    factor = max(probed, trained) / max(min(probed, trained), 1e-9)
    if factor < FAR_FROM_TRAINING:
        return None
    return (f"the probe ran at {fmt_rate(probed)} samples/s in training's own configuration ({point['strategy']}, "
            f"{plural(point['devices'], 'device')}, global batch {point['global_batch']}), "
            f"{factor:.1f}× {'slower' if probed < trained else 'faster'} than training's {fmt_rate(trained)} "
            f"samples/s ({how}). The same steps should run at about the same rate: the machine may have been busy "
            "with other work while one of them ran; rerun `dvc repro -f -s probe` (-s: that stage alone, without "
            "retraining), then `dvc repro`, on a quiet machine before trusting these numbers.")


def merge_identical_modes(rows: list[dict]) -> list[dict]:
    """Weak and strong rows that are the same measurement (same strategy, devices and batch) as one
    row labelled 'weak = strong' — on one device with one-device training they always are."""
    merged: list[dict] = []
    for row in rows:
        twin = next((m for m in merged if m["strategy"] == row["strategy"] and m["devices"] == row["devices"]
                     and m["global_batch"] == row["global_batch"]), None)
        if twin is not None and twin["speedup"] == row["speedup"]:
            twin["scaling"] = "weak = strong"
        else:
            merged.append(dict(row))
    return merged


def scaling_section(probe: dict | None, rows: list[dict], run: RunSummary, skipped_reason: str) -> list[str]:
    lines = ["## Scaling probe", ""]
    if probe is None:
        return lines + [f"Not run: {skipped_reason}", ""]
    names = probe["device_names"]
    if probe["accelerator"] == "cpu":
        ddp = max((r["devices"] for r in rows if r["strategy"] == "ddp"), default=1)
        device = f"the CPU, one process against {ddp} DDP processes (gloo) that share its cores"
    else:
        device = f"{plural(len(names), 'visible GPU')} ({', '.join(names)})"
    lines += [
        f"Timed {probe['steps']} training steps (after {probe['warmup_steps']} warm-up steps) of the trained model on "
        f"{device}: "
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
    far = probe_far_from_training(rows, run)
    if far:
        lines += ["", f"**Far from training's rate**: {far}"]
    lines += ["", figure_link("Scaling", "scaling.png"), ""]
    lines += [probe_cost_line(probe, run.stage_seconds), ""]
    if probe["notes"]:
        lines += ["Not measured:", "", *[f"- {note}" for note in probe["notes"]], ""]
    return lines


def lessons(run: RunSummary, rows: list[dict], gpus: list[dict], batchnorm: bool,
            data_on_device: bool | None) -> list[str]:
    """Advice that follows from the measurements; every line carries the number behind it.

    rows: the probe's derived rows (may be empty); gpus: `probe.gpu_inventory()` of this machine.
    """
    devices = plural(run.num_devices, run.accelerator + " device")
    out = [f"Training ran at {fmt_rate(run.samples_per_second)} samples/s on {devices} with "
           f"{run.per_device_batch} samples per device (global batch {run.global_batch})."]
    measured = [r for r in rows if r["samples_per_second"]]
    if run.accelerator == "cpu" and not gpus:
        single = next((r for r in measured if r["devices"] == 1), None)
        probe = ""
        if single:
            probe = (f"; the probe measured {fmt_rate(single['samples_per_second'])} samples/s "
                     f"at batch {single['global_batch']}")
        out.append(f"No GPU here: training ran on the CPU{probe}. The multi-GPU lessons (DataParallel "
                   "efficiency, DDP, GPU balance) need a machine with 2 or more GPUs.")
    elif run.accelerator == "cpu":
        out.append(f"Training ran on the CPU with {plural(len(gpus), 'GPU')} visible here: "
                   "set `train.accelerator: auto` (or cuda) to use them.")
    epochs = run.epoch_seconds
    if len(epochs) >= 2:
        rest = later_epochs_median(epochs)
        if epochs[0] > SLOW_FIRST_EPOCH * rest and epochs[0] - rest >= MIN_START_UP_SECONDS:
            start_up = epochs[0] - rest
            steady, _ = steady_rate(run)
            causes = ("lazy imports, first allocations, other work on the machine" if run.accelerator == "cpu"
                      else "CUDA context, cuDNN autotuning, lazy imports")
            out.append(f"The first epoch took {epochs[0]:.2f} s against {rest:.2f} s for the others: start-up "
                       f"({causes}) is {100 * start_up / sum(epochs):.0f}% of the "
                       f"{sum(epochs):.2f} s of training, so the run's {fmt_rate(run.samples_per_second)} samples/s "
                       f"understates the steady rate of about {fmt_rate(steady)} samples/s; train longer for a truer "
                       "average.")
    dp_weak = [r for r in measured if r["strategy"] == "dp" and r["scaling"] == "weak" and r["devices"] > 1]
    if dp_weak:
        widest = max(dp_weak, key=lambda r: r["devices"])
        if widest["efficiency"] is not None and widest["efficiency"] < LOW_EFFICIENCY:
            advice = "set `train.strategy: ddp`" if run.strategy == "dp" else "keep `train.strategy: ddp`"
            out.append(f"DataParallel reached {100 * widest['efficiency']:.0f}% efficiency on {widest['devices']} GPUs "
                       f"(below {100 * LOW_EFFICIENCY:.0f}%): one process scatters inputs and gathers outputs every "
                       f"step; {advice} (one process per GPU).")
    if batchnorm and run.per_device_batch < SMALL_BATCH_FOR_BATCHNORM:
        out.append(f"Each device sees only {run.per_device_batch} samples per step (< {SMALL_BATCH_FOR_BATCHNORM}): "
                   f"BatchNorm statistics are computed per device and get noisy; raise `train.batch_size` to "
                   f"{SMALL_BATCH_FOR_BATCHNORM * run.num_devices} or more.")
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
            flat = (f"Throughput is flat with {strategy}: {widest['speedup']:.2f}× on {widest['devices']} "
                    f"{'processes' if not gpus else 'devices'} ({fmt_rate(widest['samples_per_second'])} samples/s)")
            if not gpus:  # the probe ran on the CPU (it uses the GPUs whenever it sees any): nothing is copied
                out.append(f"{flat}: on the CPU the DDP processes share the machine's cores, each with its own "
                           "threads, so more processes add an all-reduce per step but no compute; on the CPU, ddp "
                           "checks a distributed set-up, it does not train faster.")
                continue
            where = ("the batches already come from GPU memory, so look at per-step overhead (a model too small "
                     "for the GPUs)" if data_on_device else "the data sits in host memory and every batch is copied")
            out.append(f"{flat}: the devices wait on the input pipeline; {where}.")
    return out


def overfitting_remedies(train_params: dict) -> str:
    """What to try against overfitting, leaving out the remedies the run already used."""
    settings = {f.name: f.default for f in fields(TrainParams)} | train_params
    toggles = []
    if not settings["augment"]:
        toggles.append("`train.augment: true`")
    keep_best, patience = settings["keep"] == "best", settings["patience"]
    if not keep_best and not patience:
        toggles.append("`train.keep: best` with `train.patience`")
    elif not patience:
        toggles.append("`train.patience` (early stopping)")
    elif not keep_best:
        toggles.append("`train.keep: best` (the best epoch's weights)")
    decay = f"a larger `train.weight_decay` (now {show_value(settings['weight_decay'])})"
    if toggles:
        return f"Try {', '.join(toggles)}, {decay}, or more data."
    return (f"Augmentation and early stopping with the best epoch's weights are already on (train.augment, "
            f"train.keep: best, train.patience {patience}): try more data, a smaller model, or {decay}.")


def kept_epoch_note(run: RunSummary, train_acc: list[float], val_acc: list[float]) -> str:
    """With train.keep: best the saved weights are not the last epoch's: which they are, and their gap."""
    best = run.best_epoch
    if not run.kept.startswith("best") or best == len(val_acc) or not 1 <= best <= len(val_acc):
        return ""
    return (f"; the saved weights are epoch {best}'s (train.keep: best), train {train_acc[best - 1]:.3f} against "
            f"validation {val_acc[best - 1]:.3f} there")


def overfitting_evidence(curves: dict, val_images: int, ema: float) -> tuple[str, str]:
    """Whether a train/val accuracy gap over LARGE_GAP at the last epoch shows overfitting: (evidence, doubt).

    A gap alone does not: after an epoch or two on a few dozen validation images (BatchNorm's running
    statistics still settling), train accuracy leads while both curves still improve. Evidence is the curves
    diverging (validation loss above its best for DIVERGED_EPOCHS epochs or more while train loss fell), or a gap
    over LARGE_GAP even at the top of validation accuracy's 95% interval (enough images that it is not noise).
    With train.ema, validation runs on the average of the weights and train accuracy on the live ones, and
    run.json has no train accuracy of the average to compare like with like: the gap holds the average's
    lag, so only the diverging curves count, and the line says so. evidence is "" when there is none; doubt
    says why a large gap is no evidence, or what it includes."""
    train_acc, val_acc = curves["accuracy"]["train"], curves["accuracy"]["val"]
    train_loss, val_loss = curves["loss"]["train"], curves["loss"]["val"]
    gap = train_acc[-1] - val_acc[-1]
    lag = (f"the gap includes the lag of train.ema's moving average ({ema:g}): validation runs on the average of "
           "the weights, train accuracy on the live weights" if ema else "")
    evidence = []
    if len(val_loss) == len(train_loss) == len(val_acc) >= 2:
        best = min(range(len(val_loss)), key=val_loss.__getitem__)
        if len(val_loss) - 1 - best >= DIVERGED_EPOCHS and train_loss[-1] < train_loss[best]:
            evidence.append(f"validation loss rose from its best {val_loss[best]:.3f} (epoch {best + 1}) to "
                            f"{val_loss[-1]:.3f} while train loss fell from {train_loss[best]:.3f} to "
                            f"{train_loss[-1]:.3f}")
    low, high = wilson_interval(round(val_acc[-1] * val_images), val_images) if val_images else (0.0, 1.0)
    beyond_noise = train_acc[-1] - high > LARGE_GAP
    if beyond_noise and not ema:
        evidence.append(f"on {val_images} validation images the 95% interval of validation accuracy reaches only "
                        f"{high:.3f}")
    if evidence:
        return "; ".join(evidence), lag
    if gap <= LARGE_GAP:
        return "", ""
    reasons = ["validation loss fell to its lowest at the last epoch" if val_loss and val_loss[-1] <= min(val_loss)
               else f"validation loss was not above its best for {DIVERGED_EPOCHS} epochs while train loss fell"]
    if not beyond_noise:
        reasons.append(f"{val_images} validation images put validation accuracy anywhere in {low:.3f}–{high:.3f}")
    if lag:
        reasons.append(lag)
    return "", "; ".join(reasons)


def model_lessons(curves: dict, per_class: dict, predictions: list[dict], run: RunSummary,
                  val_images: int) -> list[str]:
    """What the curves and the test predictions say about the model; every line quotes its numbers.

    curves: per-epoch {"loss"|"accuracy": {"train"|"val": [...]}}; per_class: evaluate's per_class.json;
    predictions: predictions.csv rows; run: run.json (the train params, which epoch's weights were kept);
    val_images: the size of the validation split (info.json), which sets the noise of validation accuracy."""
    out = []
    train_acc, val_acc = curves["accuracy"]["train"], curves["accuracy"]["val"]
    doubt = ""
    if train_acc and val_acc and train_acc[-1] - val_acc[-1] > LARGE_GAP:
        gap = train_acc[-1] - val_acc[-1]
        evidence, doubt = overfitting_evidence(curves, val_images, run.train_params.get("ema", 0.0))
        if evidence:
            out.append(f"Train accuracy {train_acc[-1]:.3f} against validation {val_acc[-1]:.3f} at the last epoch "
                       f"({len(val_acc)}){kept_epoch_note(run, train_acc, val_acc)}. A gap of {100 * gap:.0f} points "
                       f"(over {100 * LARGE_GAP:.0f}), and {evidence}: the model fits its training images much "
                       f"better than new ones (overfitting).{f' {doubt[0].upper()}{doubt[1:]}.' if doubt else ''} "
                       f"{overfitting_remedies(run.train_params)}")
            doubt = ""
    total = len(predictions)
    counts = predicted_counts(predictions)
    top = max(counts, key=counts.get, default=None)
    classes_present = sum(s["support"] > 0 for s in per_class.values())
    if top is not None and classes_present > 1:
        share, true_share = counts[top] / total, per_class[top]["support"] / total
        if share >= ONE_CLASS_SHARE > true_share:
            out.append(f"The model predicts {top!r} for {counts[top]} of the {total} test images ({100 * share:.0f}%), "
                       f"though {100 * true_share:.0f}% of them are {top!r}: it has collapsed onto one class. Usual "
                       "causes: a `train.lr` too high (try 10× lower), too few epochs, or labels that do not match "
                       "the images.")
    absent = [name for name, s in per_class.items() if s["support"] == 0]
    if absent:
        it = "it" if len(absent) == 1 else "them"
        out.append(f"{plural(len(absent), 'class')} of {len(per_class)} with no test image: "
                   f"{listed([repr(name) for name in absent], MAX_NAMED_CLASSES)}. The test scores say nothing "
                   f"about {it} (recall n/a); usually a class too small to split (prepare-data warns about "
                   f"those): add images to {it}.")
    low = [(name, s) for name, s in per_class.items() if s["support"] > 0 and s["recall"] < LOW_RECALL]
    if low:
        low.sort(key=lambda item: (item[1]["recall"], item[0]))
        named = listed([f"{name!r} {s['recall']:.2f} of {s['support']}" for name, s in low], MAX_NAMED_CLASSES)
        out.append(f"{plural(len(low), 'class')} of {classes_present} with recall under {LOW_RECALL:.2f} (the model "
                   f"almost never recognises them): {named}. See what they are taken for under Confusion "
                   "matrix, and check their training images: too few, or mislabelled.")
    # Still rising: over the last RISING_EPOCHS epochs val accuracy gained at least RISING_PER_EPOCH an epoch,
    # the last epoch improved on the one before and is the best, and val loss fell too (accuracy up with
    # loss up is overconfidence, not learning). The window is short so an early climb does not count.
    if len(val_acc) >= 2 and val_acc[-1] > val_acc[-2] and val_acc[-1] >= max(val_acc):
        first = max(len(val_acc) - RISING_EPOCHS, 0)  # index of the window's first epoch
        per_epoch = (val_acc[-1] - val_acc[first]) / (len(val_acc) - 1 - first)
        val_loss = curves["loss"]["val"]
        loss_fell = len(val_loss) < len(val_acc) or val_loss[-1] < val_loss[first]
        if per_epoch >= RISING_PER_EPOCH and loss_fell:
            out.append(f"Validation accuracy was still rising at the last epoch: {val_acc[first]:.3f} at epoch "
                       f"{first + 1}, {val_acc[-1]:.3f} at epoch {len(val_acc)} (+{100 * per_epoch:.1f} points an "
                       f"epoch, over {100 * RISING_PER_EPOCH:.1f}), its best; more `train.epochs` would likely help.")
    # One epoch is one point, no curve: neither "still rising" nor "flat" can be told, so say that rather than
    # "Nothing to flag" (a 1-epoch run is usually under-trained, and a new user's first quick try).
    if len(val_acc) == 1:
        val_loss = curves["loss"]["val"]
        loss = f", validation loss {val_loss[0]:.3f}" if val_loss else ""
        default = {f.name: f.default for f in fields(TrainParams)}["epochs"]
        out.append(f"Trained for 1 epoch (validation accuracy {val_acc[0]:.3f}{loss}): one epoch gives no learning "
                   "curve to judge whether more epochs would help. Train for more and compare: "
                   f"`dvc exp run -S train.epochs={default}` (the default).")
    if not out and predictions:
        gap = (f"train/val accuracy gap {100 * (train_acc[-1] - val_acc[-1]):.1f} points at the last epoch"
               f"{f' (not overfitting on this evidence: {doubt})' if doubt else ''}, " if train_acc and val_acc else "")
        present = [(name, s) for name, s in per_class.items() if s["support"] > 0]
        worst = min(present, key=lambda item: item[1]["recall"])
        out.append(f"Nothing to flag in the model: {gap}lowest recall {worst[1]['recall']:.2f} ({worst[0]!r}), "
                   f"most predicted class {top!r} on {100 * counts[top] / total:.0f}% of the test images.")
    return out


def lessons_section(lines: list[str]) -> list[str]:
    return ["## Lessons", "", *[f"- {line}" for line in lines], ""]
