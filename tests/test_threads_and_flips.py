"""train.threads (CPU threads per process, recorded in run.json) and train.hflip (flips a choice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from stages.core.distributed import DistContext
from stages.core.loop import build_loop_state
from stages.core.models import build_model
from stages.core.threads import choose_threads, usable_cores
from stages.errors import UserError
from stages.params import TrainParams, validate

from .helpers import ROOT, error_line, run_stages, write_params

CPU = torch.device("cpu")
runner = CliRunner()


def test_auto_shares_the_usable_cores_between_the_ranks_and_omp_num_threads_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert usable_cores() == cores
    assert choose_threads("auto", 1)[0] == cores
    assert choose_threads("auto", 2)[0] == max(1, cores // 2)
    assert choose_threads("auto", 10 * cores)[0] == 1  # never 0
    assert choose_threads(3, 2) == (3, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto", 1) == (1, "OMP_NUM_THREADS")


@pytest.mark.parametrize("value", [0, -1, "two", 1.5, True])
def test_threads_refuses_what_is_not_auto_or_a_count(value):
    with pytest.raises(UserError, match=r"train.threads = .* is not allowed; expected auto or an integer >= 1"):
        validate({"train": {"threads": value}})


def test_threads_takes_a_count_written_as_a_whole_float_like_every_integer_param():
    """`dvc exp run -S train.threads=2e0` writes 2.0, as -S train.epochs=1e1 writes 10.0."""
    p = validate({"train": {"threads": 2.0, "epochs": 10.0}})
    assert (p.train.threads, p.train.epochs) == (2, 10)
    assert type(p.train.threads) is int


def test_threads_far_beyond_the_usable_cores_are_refused_by_check_params_and_train(tmp_path, prepared_digits):
    """1000 threads on 2 cores did not finish an epoch of 0.1 s in 5 minutes: refused, naming the cores and auto."""
    from stages.core.threads import MAX_THREADS_PER_CORE

    cores = usable_cores()
    most = MAX_THREADS_PER_CORE * cores
    assert check_params(tmp_path, train={"threads": most, "accelerator": "cpu"}).exit_code == 0
    result = check_params(tmp_path, train={"threads": most + 1, "accelerator": "cpu"})
    assert error_line(result) == (
        f"error: train.threads = {most + 1} is not allowed on this machine: {most + 1} CPU threads on {cores} "
        "usable cores would wait for one another at every step, and training would seem to hang; use auto "
        f"({cores} here; each machine's own cores elsewhere) or at most {most}")
    # DDP ranks on this machine share its cores: the bound is per process
    ddp = {"threads": most, "accelerator": "cpu", "strategy": "ddp", "devices": 2}
    assert f"{most} CPU threads x 2 processes on {cores} usable cores" in error_line(check_params(tmp_path, train=ddp))
    params = write_params(tmp_path / "train.yaml", train={"threads": 1000, "accelerator": "cpu", "epochs": 1})
    proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model",
                      str(tmp_path / "m.safetensors"), "--metrics", str(tmp_path / "metrics"), "--checkpoint",
                      str(tmp_path / "ck.safetensors"), check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("error: train.threads = 1000 is not allowed on this machine")
    assert not (tmp_path / "m.safetensors").exists()


def check_params(tmp_path, **sections):
    params = write_params(tmp_path / "params.yaml", **sections)
    return runner.invoke(app, ["check-params", "--params", str(params), "--out", str(tmp_path / "params.ok")])


def test_the_thread_count_is_set_recorded_in_run_json_and_gives_the_same_bytes(tmp_path, prepared_digits):
    files = []
    for name in ("a", "b"):
        params = write_params(tmp_path / f"{name}.yaml", model={"name": "mlp"},
                              train={"accelerator": "cpu", "epochs": 1, "threads": 1})
        out = tmp_path / name
        proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits),
                          "--model", str(out / "model.safetensors"), "--metrics", str(out / "metrics"),
                          "--checkpoint", str(out / "ck.safetensors"))
        run = json.loads((out / "metrics" / "run.json").read_text())
        assert (run["threads"], run["threads_from"]) == (1, "train.threads")
        assert ", 1 CPU thread" in proc.stdout and "warning" not in proc.stderr
        files.append((out / "model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_more_threads_than_usable_cores_are_warned_of_but_train(tmp_path, prepared_digits):
    cores = usable_cores()
    params = write_params(tmp_path / "p.yaml", model={"name": "mlp"},
                          train={"accelerator": "cpu", "epochs": 1, "threads": cores + 1})
    proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits),
                      "--model", str(tmp_path / "model.safetensors"), "--metrics", str(tmp_path / "metrics"),
                      "--checkpoint", str(tmp_path / "ck.safetensors"))
    assert proc.stderr.splitlines()[0] == (
        f"warning: {cores + 1} CPU threads (train.threads) on {cores} usable cores: the threads wait for one "
        f"another and training runs far slower than with {cores} per process")
    assert (tmp_path / "model.safetensors").exists()


# --- train.hflip ---------------------------------------------------------------------------------

INFO = {"mean": [0.5], "std": [0.25], "shape": [1, 8, 8], "num_classes": 10}


@pytest.mark.parametrize(("dataset", "hflip", "flips"), [
    ("imagefolder", "auto", False),  # digits-like folders lost a third of their accuracy to flips
    ("imagefolder", True, True),
    ("cifar10", "auto", True),
    ("cifar10", False, False),
    ("digits", "auto", False),
    ("digits", True, True),
])
def test_flips_are_a_choice(dataset, hflip, flips):
    cfg = TrainParams(accelerator="cpu", augment=True, hflip=hflip)
    st = build_loop_state(build_model("mlp", 1, 8, 10), cfg, DistContext(), CPU, dict(INFO, dataset=dataset), 640)
    assert st.augment_flip is flips and st.augment_pad == 1


def test_the_log_says_which_augmentations_ran(tmp_path, prepared_digits):
    for hflip, said in (("auto", "augmentation: random crop (padding 1); no horizontal flip (train.hflip: auto, "
                                 "dataset digits)"),
                        (True, "augmentation: random crop (padding 1), horizontal flip")):
        params = write_params(tmp_path / "p.yaml", model={"name": "mlp"},
                              train={"accelerator": "cpu", "epochs": 1, "augment": True, "hflip": hflip})
        out = tmp_path / str(hflip)
        proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits),
                          "--model", str(out / "model.safetensors"), "--metrics", str(out / "metrics"),
                          "--checkpoint", str(out / "ck.safetensors"))
        assert said in proc.stdout.splitlines(), proc.stdout


@pytest.mark.slow
def test_ddp_ranks_share_the_usable_cores(tmp_path, prepared_digits):
    """Two self-launched ranks on the CPU: each takes usable cores / 2 threads (at least 1)."""
    params = write_params(tmp_path / "p.yaml", model={"name": "mlp"},
                          train={"accelerator": "cpu", "epochs": 1, "strategy": "ddp", "devices": 2})
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-m", "stages", "train", "--params", str(params), "--data",
                           str(prepared_digits), "--model", str(tmp_path / "m.safetensors"), "--metrics",
                           str(tmp_path / "metrics"), "--checkpoint", str(tmp_path / "ck.safetensors")],
                          env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "metrics" / "run.json").read_text())
    cores = len(os.sched_getaffinity(0))
    assert (run["threads"], run["threads_from"]) == (max(1, cores // 2),
                                                     f"auto: {cores} usable cores / 2 ranks on this machine")
    assert f", {max(1, cores // 2)} CPU thread" in proc.stdout and " per process" in proc.stdout


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="needs /proc/loadavg (Linux)")
def test_busy_cores_are_told_from_what_runs_now_not_from_the_load_average():
    """Two busy processes take two cores now; once they end, the cores are free at once, though the
    1-minute load average still counts them (the stage `dvc repro` ran just before)."""
    from stages.cli import cores_taken_by_others

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.3)
        assert cores_taken_by_others(2)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert cores_taken_by_others(64) is False  # no machine here runs 64 threads besides the tests
