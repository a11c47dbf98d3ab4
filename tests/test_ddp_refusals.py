"""A refusal in a DDP run is said once, whoever started the ranks: real processes, gloo on the CPU.

Every rank reaches the same refusal (the batch does not split over the processes, torchrun with
strategy dp); rank 0 alone says it, or our own launcher says the failed rank's line. torchrun's own
ChildFailedError summary after it is torch's, printed by the torchrun process (see README).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .helpers import ROOT, write_params

pytestmark = pytest.mark.slow

ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def train_args(tmp_path, prepared, **train) -> list[str]:
    params = write_params(tmp_path / "params.yaml", model={"name": "mlp"},
                          train={"accelerator": "cpu", "epochs": 1, **train})
    return ["-m", "stages", "train", "--params", str(params), "--data", str(prepared),
            "--model", str(tmp_path / "model.safetensors"), "--metrics", str(tmp_path / "metrics"),
            "--checkpoint", str(tmp_path / "checkpoint.safetensors")]


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def test_batch_not_divisible_by_the_self_launched_ranks_is_one_line(tmp_path, prepared_digits):
    proc = subprocess.run([sys.executable, *train_args(tmp_path, prepared_digits, strategy="ddp", devices=3)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: train.batch_size = 64 must be divisible by the 3 ddp processes times train.accumulate = 1"], proc.stderr


def test_batch_not_divisible_under_torchrun_is_said_by_rank_0_only(tmp_path, prepared_digits):
    proc = subprocess.run([*torchrun(2), *train_args(tmp_path, prepared_digits, strategy="ddp", batch_size=63)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: train.batch_size = 63 must be divisible by the 2 ddp processes times "
                    "train.accumulate = 1"], proc.stderr


def test_torchrun_with_strategy_dp_is_refused_once(tmp_path, prepared_digits):
    proc = subprocess.run([*torchrun(2), *train_args(tmp_path, prepared_digits, strategy="dp")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: started by torchrun with WORLD_SIZE=2 but train.strategy = 'dp'; "
                    "set train.strategy: ddp"], proc.stderr
