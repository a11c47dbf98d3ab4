"""The benchmarks run where CI runs, on the CPU: the GPU check's --smoke mode goes through every
section with tiny sizes (its timings mean nothing there; the equivalence rows do)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .helpers import ROOT

CUDA_ONLY = {"(vi) step vs floor", "(viii) airbench peer"}


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["smoke"] and report["machine"]["device"] == "cpu"
    assert not [r for r in rows if r["status"] == "ERROR"], [r for r in rows if r["status"] == "ERROR"]
    sections = {r["section"].split()[0] for r in rows}
    assert {"(i)", "(ii)", "(iii)", "(iv)", "(v)", "(vi)", "(vii)", "(viii)", "(ix)"} <= sections
    skipped = {r["section"] for r in rows if r["status"] == "SKIPPED"}
    assert skipped == CUDA_ONLY, skipped  # everything else runs on the CPU, the same code as on a GPU
    # The wrappers must not change what is learned: DataParallel on one device, DDP in a one-process
    # group and the plain model end with the same weights (exactly, in fp32 on the CPU).
    same = [r for r in rows if r["measurement"].startswith("max |w - w_plain|")]
    assert len(same) == 3 and all(r["value"] == 0 for r in same), same
    moved = next(r for r in rows if "max |w - w_start|" in r["measurement"])
    assert moved["value"] > 0  # and they did learn something
    imports = next(r for r in rows if r["section"] == "setup")
    assert imports["value"] == "none"  # no dvc, dvclive or pydantic behind the core


def test_fixed_costs_parts_read_real_formats_and_real_import_times(tmp_path):
    """bench_fixed_costs' MNIST-sized data is MNIST's own IDX format (torchvision reads it back), and
    its import accounting finds a package a command imports."""
    from torchvision.datasets import MNIST

    from benchmarks.bench_fixed_costs import import_seconds, write_mnist_sized

    write_mnist_sized(tmp_path, n_train=30, n_test=10)
    train, test = MNIST(str(tmp_path), train=True), MNIST(str(tmp_path), train=False)
    assert tuple(train.data.shape) == (30, 28, 28) and len(test) == 10
    assert int(train.data[0].max()) == 220 and 0 <= int(train.targets.min()) and int(train.targets.max()) <= 9
    seconds = import_seconds(["-c", "import email.mime.text"], tmp_path, at_least=0)
    assert seconds["email"] > 0 and "torch" not in seconds


def test_prepare_benchmark_measures_the_three_side_by_side(tmp_path):
    """bench_prepare.py on a tiny folder: the bare loop, prepare-data's decode loop and the whole stage,
    each round, and their ratios (the figures themselves mean nothing at this size)."""
    out = tmp_path / "prepare.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_prepare.py", "--photos", "300", "--rounds", "1",
                           "--work", str(tmp_path), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    (measured,) = figures["rounds"]["this"]
    assert 0 < measured["bare_s"] and 0 < measured["decode_s"] < measured["stage_s"]
    assert measured["bare_cpu_s"] > 0 and measured["stage_cpu_s"] > 0
    assert set(figures["ratios"]["this"]) == {"decode", "stage", "stage_cpu"}
    assert "decode loop" in proc.stdout and "whole stage" in proc.stdout
