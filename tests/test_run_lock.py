"""One train run per checkpoint: the orphan left by `kill -9` of dvc and a new run never write it together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from .helpers import ROOT, run_stages, write_params


@pytest.mark.slow
def test_a_second_train_run_on_the_same_checkpoint_is_refused_and_the_first_goes_on(tmp_path, prepared_digits):
    params = write_params(tmp_path / "params.yaml", train={"epochs": 400, "accelerator": "cpu"})
    args = ["train", "--params", str(params), "--data", str(prepared_digits),
            "--model", str(tmp_path / "m.safetensors"), "--metrics", str(tmp_path / "metrics"),
            "--checkpoint", str(tmp_path / "ck" / "train.safetensors")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "stages", *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("epoch 1/"):
                break
        second = run_stages(*args, check=False)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "Traceback" not in second.stderr
        assert first.poll() is None, "the refusal must not stop the run that holds the checkpoint"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the kernel dropped the dead run's lock: the next run takes it (and resumes its checkpoint)
    third = run_stages(*args[:2], str(write_params(tmp_path / "short.yaml", train={"epochs": 1})), *args[3:],
                       check=False)
    assert third.returncode == 0 and "another train run" not in third.stderr
