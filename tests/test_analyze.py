"""The analyze stage on a real (tiny) run: prepare-data, 2 epochs of train, evaluate, then analyze.

The report's numbers are checked against the files they come from, each figure is checked to
be a real, non-blank PNG, and the lessons logic is checked on synthetic measurements.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages import probe_skip
from stages.analyze import report as report_text
from stages.analyze.report import lessons
from stages.cli import app
from stages.probe import device_counts, planned_points
from stages.run_summary import RunSummary, read_run_summary

from .helpers import ROOT, run_summary

FIGURES = ("learning_curves.png", "per_class.png", "confusion.png", "misclassified.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_params(path: Path, probe: bool, probe_ddp: bool = False) -> Path:
    path.write_text(
        "data: {dataset: digits}\n"
        "model: {name: small-cnn}\n"
        "train: {epochs: 2, batch_size: 64}\n"
        f"analyze: {{probe: {str(probe).lower()}, probe_ddp: {str(probe_ddp).lower()}, probe_steps: 3}}\n"
    )
    return path


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def analyze(root: Path, params: Path, out: Path) -> str:
    """The probe stage, then the analyze stage, as `dvc repro` runs them: what they printed."""
    scaling = out / "scaling.json"
    return invoke("probe", "--params", str(params), "--data", str(root / "data"),
                  "--model", str(root / "model.safetensors"), "--run", str(root / "train" / "run.json"),
                  "--out", str(scaling)) + \
        invoke("analyze", "--params", str(params), "--data", str(root / "data"),
               "--model", str(root / "model.safetensors"), "--train-metrics", str(root / "train"),
               "--eval-metrics", str(root / "evaluate"), "--scaling", str(scaling), "--out", str(out))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished pipeline in a temp dir, analyzed three times: probe on with DDP (report/: on the CPU one
    process against two), probe off (report_off/), and analyze's defaults (report_default/, its log in
    report_default.log)."""
    root = tmp_path_factory.mktemp("pipeline")
    params = write_params(root / "params.yaml", probe=True, probe_ddp=True)
    invoke("prepare-data", "--params", str(params), "--out", str(root / "data"))
    invoke("train", "--params", str(params), "--data", str(root / "data"), "--model", str(root / "model.safetensors"),
           "--metrics", str(root / "train"), "--checkpoint", str(root / "checkpoint.safetensors"))
    invoke("evaluate", "--params", str(params), "--data", str(root / "data"),
           "--model", str(root / "model.safetensors"), "--out", str(root / "evaluate"))
    analyze(root, params, root / "report")
    # A scaling figure left over from an earlier probe must not survive a run without the probe.
    (root / "report_off" / "figures").mkdir(parents=True)
    shutil.copy(root / "report" / "figures" / "scaling.png", root / "report_off" / "figures" / "scaling.png")
    analyze(root, write_params(root / "params_off.yaml", probe=False), root / "report_off")
    defaults = root / "params_default.yaml"
    defaults.write_text("data: {dataset: digits}\nmodel: {name: small-cnn}\ntrain: {epochs: 2, batch_size: 64}\n")
    (root / "report_default.log").write_text(analyze(root, defaults, root / "report_default"))
    return root


def section(report: str, title: str) -> str:
    """The text of one '## title' section of the report."""
    assert f"## {title}\n" in report, f"no section {title!r}"
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def per_class_table(quality: str) -> str:
    """The per-class table of the Quality section (the most-confused pairs table also starts with names)."""
    return quality.split("### Per-class scores", 1)[1].split("###", 1)[0]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {first_cell} |")]


def test_report_numbers_match_the_inputs(run):
    report = (run / "report" / "report.md").read_text()
    test = json.loads((run / "evaluate" / "metrics.json").read_text())["test"]
    info = json.loads((run / "data" / "info.json").read_text())
    summary = json.loads((run / "train" / "run.json").read_text())
    per_class = json.loads((run / "evaluate" / "per_class.json").read_text())
    with (run / "evaluate" / "predictions.csv").open() as f:
        wrong = sum(r["actual"] != r["predicted"] for r in csv.DictReader(f))

    run_summary = section(report, "Run summary")
    assert f"{summary['parameters']:,} parameters" in run_summary
    assert f"{summary['samples_per_second']:,.0f} samples/s" in run_summary
    assert f"global {summary['global_batch']}, per device {summary['per_device_batch']}" in run_summary
    counts = info["counts"]
    assert f"{counts['train']} train / {counts['val']} val / {counts['test']} test" in run_summary
    assert f"over {summary['epochs']} epochs" in run_summary

    quality = section(report, "Quality")
    assert f"test accuracy: {test['accuracy']} " in quality
    assert f"test loss: {test['loss']}" in quality
    assert f"misclassified: {wrong} of {info['counts']['test']}" in quality
    for name, scores in per_class.items():
        [row] = table_rows(per_class_table(quality), name)
        expected = [scores["precision"], scores["recall"], scores["f1"]]
        assert [None if v == "n/a" else float(v) for v in row[1:4]] == pytest.approx(expected, abs=5e-5)
        assert int(row[4]) == scores["support"]
    assert "train loss" in quality and "val loss" in quality  # the learning-curve summary line

    lessons_text = section(report, "Lessons")
    assert lessons_text.count("\n- ") >= 1 and f"{summary['per_device_batch']} samples per device" in lessons_text
    with (run / "evaluate" / "predictions.csv").open() as f:
        predictions = list(csv.DictReader(f))
    summary_run = read_run_summary(run / "train" / "run.json")
    about_the_model = report_text.model_lessons(summary_run.curves(), per_class, predictions, summary_run,
                                                 info["counts"]["val"])
    assert about_the_model and all(f"- {line}\n" in lessons_text for line in about_the_model)


def test_figures_are_real_pngs_linked_from_the_report(run):
    from PIL import Image

    report = (run / "report" / "report.md").read_text()
    for name in (*FIGURES, "scaling.png"):
        path = run / "report" / "figures" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as image:
            image.load()
            low_high = image.convert("L").getextrema()
        assert low_high[0] < low_high[1], f"{name} is one flat colour"
        assert f"(figures/{name})" in report


def test_analyze_reads_files_without_importing_torch(run, tmp_path):
    """analyze only reads files: run as DVC runs it, in an interpreter where importing torch fails (1.4 s of
    its start-up otherwise), it writes the same report from the same files."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch was imported')\n")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "stages", "analyze", "--params", str(run / "params.yaml"),
                           "--data", str(run / "data"), "--model", str(run / "model.safetensors"),
                           "--train-metrics", str(run / "train"), "--eval-metrics", str(run / "evaluate"),
                           "--scaling", str(run / "report" / "scaling.json"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}"))
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").read_bytes() == (run / "report" / "report.md").read_bytes()
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted((*FIGURES, "scaling.png"))


def test_probe_table_has_one_row_per_device_count(run):
    import torch

    report = (run / "report" / "report.md").read_text()
    probe = section(report, "Scaling probe")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= 2:
        weak_rows = [r for r in table_rows(probe, "dp") if "weak" in r[1]]
        assert [int(r[2]) for r in weak_rows] == device_counts(visible)
    else:  # one process against two DDP processes on the CPU
        weak_rows = [r for r in table_rows(probe, "dp") + table_rows(probe, "ddp") if "weak" in r[1]]
        assert [(r[0], int(r[2])) for r in weak_rows] == [("dp", 1), ("ddp", 2)]
        assert "one process against 2 DDP processes" in probe
    assert all(float(r[5].replace(",", "")) > 0 for r in weak_rows)  # samples/s
    assert float(weak_rows[-1][6].rstrip("×")) > 0  # a speedup against the one-device point
    scaling = json.loads((run / "report" / "scaling.json").read_text())
    assert scaling["steps"] == 3 and scaling["points"][0]["samples_per_second"] > 0
    assert "The probe took" in probe


def test_default_probe_on_one_device_times_nothing_and_says_so_in_one_line(run):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("2 or more GPUs: the probe has devices to compare")
    probe = section((run / "report_default" / "report.md").read_text(), "Scaling probe")
    [line] = [line for line in probe.splitlines() if line]
    assert line.startswith("Not run: ") and "nothing to compare" in line
    log = (run / "report_default.log").read_text()
    assert "scaling probe not run: " in log and "nothing to compare" in log
    scaling = json.loads((run / "report_default" / "scaling.json").read_text())
    assert scaling == {"probe": "nothing to compare", "reason": line.removeprefix("Not run: "), "rows": [], "gpus": []}
    assert not (run / "report_default" / "figures" / "scaling.png").exists()


def test_probe_off_is_skipped_and_said(run):
    report = (run / "report_off" / "report.md").read_text()
    assert "Not run: `analyze.probe` is false" in section(report, "Scaling probe")
    assert json.loads((run / "report_off" / "scaling.json").read_text())["probe"] == "off"
    figures = sorted(p.name for p in (run / "report_off" / "figures").glob("*.png"))
    assert figures == sorted(FIGURES)  # the stale scaling.png is gone
    assert section(report, "Lessons").count("\n- ") >= 1


# --- the lessons logic on synthetic measurements -----------------------------------


def gpu_run(per_device_batch: int, devices: int = 2, strategy: str = "dp", **changes) -> RunSummary:
    return run_summary(**{"accelerator": "cuda", "num_devices": devices, "per_device_batch": per_device_batch,
                          "global_batch": per_device_batch * devices, "samples_per_second": 20000.0,
                          "strategy": strategy, **changes})


def row(strategy: str, devices: int, speedup: float, scaling: str = "weak") -> dict:
    return {"strategy": strategy, "scaling": scaling, "devices": devices, "global_batch": 64 * devices,
            "per_device_batch": 64, "samples_per_second": 10000.0 * speedup, "speedup": speedup,
            "efficiency": speedup / devices, "peak_memory_mb": [], "note": ""}


H100 = {"name": "NVIDIA H100", "memory_gib": 79.1, "multiprocessors": 132}


def test_low_dataparallel_efficiency_recommends_ddp():
    two_h100 = [{"id": 0, **H100}, {"id": 1, **H100}]
    lines = lessons(gpu_run(64), [row("dp", 1, 1.0), row("dp", 2, 1.0)], two_h100, True, True)
    [ddp] = [line for line in lines if "train.strategy: ddp" in line]
    assert "50% efficiency on 2 GPUs" in ddp


def test_small_per_device_batch_warns_about_batchnorm_only_with_batchnorm():
    assert any("BatchNorm" in line and " 8 samples" in line for line in lessons(gpu_run(8), [], [], True, True))
    assert not any("BatchNorm" in line for line in lessons(gpu_run(8), [], [], False, True))


def test_unequal_gpus_and_flat_throughput_are_flagged():
    small = {"id": 1, "name": "Tesla T4", "memory_gib": 14.6, "multiprocessors": 40}
    lines = lessons(gpu_run(64), [row("dp", 1, 1.0), row("dp", 4, 1.1)], [{"id": 0, **H100}, small], True, False)
    assert any("GPUs differ" in line and "14.6 GiB" in line for line in lines)
    assert any("flat" in line and "1.10× on 4 devices" in line and "host memory" in line for line in lines)


def test_flat_ddp_on_the_cpu_blames_the_shared_cores_not_the_input_pipeline():
    """The new user's 2-core run: ddp on the CPU at 0.79x; nothing is copied to a device there."""
    cpu_ddp = run_summary(strategy="ddp", num_devices=2, world_size=2, global_batch=128, samples_per_second=996.0)
    [flat] = [line for line in lessons(cpu_ddp, [row("dp", 1, 1.0), row("ddp", 2, 0.79)], [], True, False)
              if "flat" in line]
    assert "0.79× on 2 processes" in flat and "share the machine's cores" in flat
    assert "input pipeline" not in flat and "copied" not in flat


def test_healthy_scaling_gives_only_the_measured_line():
    two_h100 = [{"id": 0, **H100}, {"id": 1, **H100}]
    lines = lessons(gpu_run(64), [row("dp", 1, 1.0), row("dp", 2, 1.9)], two_h100, True, True)
    assert len(lines) == 1 and "20,000 samples/s" in lines[0]


def test_slow_first_epoch_is_explained():
    run = gpu_run(64, devices=1, samples_per_second=5504.0, epoch_seconds=[0.86, 0.07, 0.08, 0.08, 0.08])
    [line] = [line for line in lessons(run, [], [], True, True) if "first epoch" in line]
    assert "0.86 s against 0.08 s" in line and "16,099 samples/s" in line


def test_cpu_run_says_multi_gpu_lessons_need_gpus():
    cpu = run_summary(samples_per_second=9000.0)
    lines = lessons(cpu, [row("dp", 1, 1.0)], [], True, None)
    assert any("need a machine with 2 or more GPUs" in line and "10,000 samples/s" in line for line in lines)


def test_planned_points_cover_weak_and_strong_scaling():
    assert device_counts(1) == [1] and device_counts(6) == [1, 2, 4, 6]
    points = planned_points(["dp", "ddp"], [1, 2, 4], per_device_batch=16, global_batch=64)
    assert ("dp", 1, 16) in points and ("dp", 1, 64) in points  # weak and strong baselines
    assert ("dp", 4, 64) in points and points.count(("dp", 4, 64)) == 1  # where weak meets strong
    assert not any(s == "ddp" and k == 1 for s, k, _ in points)


def test_ddp_probe_point_runs_two_cpu_processes(run):
    """The DDP rank path (`python -m stages probe` under the elastic launcher, its point in the launch plan)
    on the CPU with gloo, as the tests of train do."""
    from stages.params import TrainParams
    from stages.probe import time_ddp_point

    point = time_ddp_point(run / "model.safetensors", run / "data", TrainParams(batch_size=32), "cpu",
                           world_size=2, global_batch=32, steps=2)
    assert point.note == "" and point.samples_per_second > 0 and len(point.peak_memory_mb) == 2


def train_and_evaluate_photos(tmp_path: Path, batch_size: int) -> Path:
    """prepare-data, train (mlp, 1 epoch) and evaluate on the 8x8 greyscale image folder tmp_path/photos, into
    tmp_path/data, train, evaluate and model.safetensors; the params file they read."""
    params = tmp_path / "params.yaml"
    params.write_text(f"data: {{dataset: imagefolder, root: '{tmp_path / 'photos'}', image_size: 8, channels: 1}}\n"
                      f"model: {{name: mlp}}\ntrain: {{epochs: 1, batch_size: {batch_size}}}\n")
    invoke("prepare-data", "--params", str(params), "--out", str(tmp_path / "data"))
    invoke("train", "--params", str(params), "--data", str(tmp_path / "data"),
           "--model", str(tmp_path / "model.safetensors"), "--metrics", str(tmp_path / "train"),
           "--checkpoint", str(tmp_path / "checkpoint.safetensors"))
    invoke("evaluate", "--params", str(params), "--data", str(tmp_path / "data"),
           "--model", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "evaluate"))
    return params


def test_a_200_class_folder_gets_pairs_not_an_unreadable_matrix(tmp_path):
    """A real image folder of 200 classes (one without a test image) through all four stages."""
    from PIL import Image

    for c in range(200):
        for split, count in (("train", 2), ("test", 0 if c == 7 else 1)):
            folder = tmp_path / "photos" / split / f"class{c:03d}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), color=(37 * c + 11 * i) % 256).save(folder / f"{i}.png")
    params = train_and_evaluate_photos(tmp_path, batch_size=64)
    analyze(tmp_path, params, tmp_path / "report")

    quality = section((tmp_path / "report" / "report.md").read_text(), "Quality")
    assert "confusion.png" not in quality and f"(over {report_text.MAX_CLASSES_IN_MATRIX}," in quality
    assert not (tmp_path / "report" / "figures" / "confusion.png").exists()
    pairs_table = quality.split("most-confused pairs", 1)[1].split("###", 1)[0]
    assert len([line for line in pairs_table.splitlines() if line.startswith("| class")]) == 20
    [empty] = table_rows(per_class_table(quality), "class007")
    assert empty[2] == "n/a" and empty[4] == "0"  # recall of a class with no test image


@pytest.mark.skipif(not probe_skip.no_gpu_driver(), reason="a GPU driver is here: the probe asks torch")
def test_the_probe_says_why_it_times_nothing_without_importing_torch(tmp_path):
    """On a machine with no GPU driver, the probe stage's 'nothing to compare' needs neither torch nor the
    core: written from params.yaml alone, in an interpreter where importing torch fails."""
    params = write_params(tmp_path / "params.yaml", probe=True)
    out = tmp_path / "scaling.json"
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch was imported')\n")
    proc = subprocess.run([sys.executable, "-m", "stages", "probe", "--params", str(params), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}"))
    assert proc.returncode == 0, proc.stderr
    scaling = json.loads(out.read_text())
    assert scaling == {"probe": "nothing to compare", "reason": probe_skip.nothing_to_compare(0, False), "rows": [],
                       "gpus": []}
    assert proc.stdout.startswith("scaling probe not run: no GPU is visible")


def test_a_class_without_test_images_scores_null_and_cjk_names_are_drawn_or_said(tmp_path):
    """A user's image folder: 'triangle' has one image (so none in test) and one class is named in Chinese.
    per_class.json has null, not 0, where a score is undefined; the report names the class with no test
    image; the figures draw the Chinese name with an installed CJK font, or the report says they cannot."""
    from PIL import Image

    from stages.analyze import figures

    for c, (name, count) in enumerate((("circle", 12), ("正方形", 12), ("triangle", 1), ("квадрат", 12))):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i in range(count):
            Image.new("L", (8, 8), color=(60 * c + 3 * i) % 256).save(folder / f"{i}.png")
    params = train_and_evaluate_photos(tmp_path, batch_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = analyze(tmp_path, params, tmp_path / "report")
    # matplotlib's warning per glyph, figure and layout pass: turned into one line below, or not needed
    assert not [w for w in caught if "missing from font" in str(w.message)]

    triangle = json.loads((tmp_path / "evaluate" / "per_class.json").read_text())["triangle"]
    assert triangle["support"] == 0 and triangle["recall"] is None
    assert triangle["f1"] is None if triangle["precision"] is None else triangle["precision"] == triangle["f1"] == 0
    report = (tmp_path / "report" / "report.md").read_text()
    [row] = table_rows(per_class_table(section(report, "Quality")), "triangle")
    assert row[2:] == ["n/a", "n/a" if triangle["f1"] is None else "0.0000", "0"]
    lessons_text = section(report, "Lessons")
    assert "1 class of 4 with no test image: 'triangle'" in lessons_text and "Nothing to flag" not in lessons_text
    if figures.installed_cjk_families():
        assert "empty boxes" not in report + log
    else:
        assert "**Note**: the figures draw 正, 方, 形 (in class names) as empty boxes" in report
        assert "warning: the figures draw 正, 方, 形" in log
