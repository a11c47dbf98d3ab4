"""The analyze stage: how well the model did and how well the devices were used.

Reads files only: the prepared data, the weights, the train stage's run.json, the probe stage's
report/scaling.json, and the evaluate stage's metrics, per-class scores and predictions. Writes

  report/report.md       run summary, quality, scaling probe, lessons (links the figures)
  report/figures/*.png   learning curves, per-class scores, confusion matrix (up to
                         MAX_CLASSES_IN_MATRIX classes), misclassified images, scaling (when the probe ran)

It trains nothing and times nothing (the probe stage does), so a change to the report's wording
reruns this stage alone. The weights are first checked against the data and params.yaml (the
check evaluate and predict make, too). Nothing here imports torch (1.4 s of start-up): the
weights' header and a few test images are read with safetensors' numpy reader. The figures are
drawn into a folder beside report/figures that replaces it whole once the report is complete,
then report.md is renamed into place: a refusal midway leaves the last report as it was.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError
from ..io import open_tensors, read_json, staged_dir, write_text
from ..model_file import check_weights_use, read_metadata
from ..params import Params
from ..prepared import check_prepared_with, read_images, read_info
from ..run_summary import read_run_summary
from . import figures
from .report import (
    FIGURES_DIR,
    LOW_EFFICIENCY,
    MAX_CLASSES_IN_MATRIX,
    lessons,
    lessons_section,
    missing_glyphs_note,
    model_lessons,
    probe_far_from_training,
    quality_section,
    run_summary_section,
    scaling_section,
)

MAX_MISCLASSIFIED_SHOWN = 32


# --- reading the inputs ------------------------------------------------------------


def read_predictions(path: Path) -> list[dict]:
    """predictions.csv rows (index, actual, predicted), in test-set order."""
    if not Path(path).is_file():
        raise UserError(f"file not found: {path} (run the evaluate stage first, e.g. `dvc repro`)")
    with Path(path).open(newline="") as f:
        return [{"index": int(r["index"]), "actual": r["actual"], "predicted": r["predicted"]}
                for r in csv.DictReader(f)]


def confusion_counts(predictions: list[dict], class_names: list[str]) -> list[list[int]]:
    """matrix[true][predicted] = number of test images."""
    position = {name: i for i, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    for row in predictions:
        matrix[position[row["actual"]]][position[row["predicted"]]] += 1
    return matrix


def has_batchnorm(model_path: Path) -> bool:
    """BatchNorm layers keep running statistics; their keys give them away without building the model."""
    with open_tensors(model_path, "numpy") as f:
        return any(key.endswith("running_mean") for key in f.keys())


# --- the stage ---------------------------------------------------------------------


def write_figures(figures_dir: Path, curves: dict, per_class: dict, predictions: list[dict], class_names: list[str],
                  data_dir: Path, rows: list[dict] | None) -> list[Path]:
    written = [
        figures.learning_curves(curves, figures_dir / "learning_curves.png"),
        figures.per_class_bars(per_class, figures_dir / "per_class.png", MAX_CLASSES_IN_MATRIX),
    ]
    if len(class_names) <= MAX_CLASSES_IN_MATRIX:  # beyond, the report lists the most-confused pairs instead
        written.append(figures.confusion_heatmap(confusion_counts(predictions, class_names), class_names,
                                                 figures_dir / "confusion.png"))
    wrong = [r for r in predictions if r["actual"] != r["predicted"]]
    shown = wrong[:MAX_MISCLASSIFIED_SHOWN]
    picked, count = read_images(data_dir, "test", [r["index"] for r in shown])
    if count != len(predictions):
        raise UserError(f"predictions.csv has {len(predictions)} rows but the test split has {count} images; "
                        "rerun the evaluate stage")
    labels = [(r["actual"], r["predicted"]) for r in shown]
    written.append(figures.misclassified_grid(picked, labels, len(wrong), len(predictions),
                                              figures_dir / "misclassified.png"))
    if rows is not None:
        written.append(figures.scaling_plot(rows, figures_dir / "scaling.png", LOW_EFFICIENCY))
    return written


def read_scaling(path: Path) -> dict:
    """The probe stage's file: what it measured, or that it did not run and why."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("probe") not in ("ran", "off", "nothing to compare") \
            or not {"rows", "gpus"} <= set(data):
        raise UserError(f"{path} was not written by this version's probe stage; rerun `dvc repro`")
    return data


def analyze_stage(p: Params, params_path: Path, data_dir: Path, model_path: Path, train_dir: Path, eval_dir: Path,
                  scaling_path: Path, out_dir: Path) -> None:
    data_dir, model_path, train_dir, eval_dir, out_dir = map(Path, (data_dir, model_path, train_dir, eval_dir, out_dir))
    info = read_info(data_dir)
    check_prepared_with(info, p, params_path, data_dir)
    check_weights_use(read_metadata(model_path), model_path, params=(p, params_path), data=(info, data_dir))
    run = read_run_summary(train_dir / "run.json")
    test = read_json(eval_dir / "metrics.json")["test"]
    per_class = read_json(eval_dir / "per_class.json")
    predictions = read_predictions(eval_dir / "predictions.csv")
    curves = run.curves()
    scaling = read_scaling(Path(scaling_path))
    probe = scaling if scaling["probe"] == "ran" else None
    rows, gpus, skipped = scaling["rows"], scaling["gpus"], scaling.get("reason", "")
    figures_dir = out_dir / FIGURES_DIR
    train_seconds = run.stage_seconds  # the train process's wall time, start-up included
    with staged_dir(figures_dir) as staged:  # holds exactly this run's figures once the block completes
        with figures.missing_glyphs() as missing:
            written = write_figures(staged, curves, per_class, predictions, info["class_names"], data_dir,
                                    rows if probe is not None else None)
        in_names = dict.fromkeys("".join(info["class_names"]))  # the characters in order of appearance
        glyphs = missing_glyphs_note([c for c in in_names if c in missing] + sorted(missing - in_names.keys()),
                                     figures.font_list_files())
        report = [
            f"# Run report: {run.model} on {info['dataset']}",
            "",
            *([f"**Note**: {glyphs}", ""] if glyphs else []),
            *run_summary_section(run, info),
            *quality_section(test, per_class, predictions, curves),
            *scaling_section(probe, rows, run, skipped),
            *lessons_section(model_lessons(curves, per_class, predictions, run, info["counts"]["val"])
                             + lessons(run, rows, gpus, has_batchnorm(model_path), probe and probe["data_on_device"])),
        ]
    write_text(out_dir / "report.md", "\n".join(report))
    if glyphs:
        print(f"warning: {glyphs}")
    if probe is not None and (far := probe_far_from_training(rows, run)):
        print(f"warning: {far}")
    cost = (f"; probe {probe['seconds']:.2f} s ({probe['step_seconds']:.2f} s of steps) vs {train_seconds:.2f} s "
            "the train stage took" if probe is not None else "")
    print(f"wrote {out_dir / 'report.md'}, {len(written)} figures in {figures_dir}{cost}")
