"""A refusal in a DDP run is said once, whoever started the ranks: real processes, gloo on the CPU.

Every rank reaches the same refusal (the batch does not split over the processes, torchrun with
strategy dp); rank 0 alone says it, or our own launcher says the failed rank's line. torchrun's own
ChildFailedError summary after it is torch's, printed by the torchrun process
(docs/gpus-and-clusters.md, "On a cluster").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from stages.core.checkpoint import load_checkpoint

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
    # (a batch the processes cannot split is refused before any rank starts; one larger than the training
    # split only the ranks find, each of them)
    proc = subprocess.run([sys.executable, *train_args(tmp_path, prepared_digits, strategy="ddp", devices=2,
                                                       batch_size=2000)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: train.batch_size = 2000 is larger than the training split (1295 images); set train.batch_size to "
        "1295 or less"], proc.stderr


@pytest.mark.parametrize("train, said", [
    (dict(strategy="ddp", batch_size=63),
     "error: train.batch_size = 63 is not allowed with 2 ddp processes (WORLD_SIZE = 2, from torchrun): the batch "
     "must split into 2 equal parts; use a multiple of 2 such as 62 or 64, or another process count (torchrun's "
     "--nproc-per-node)"),
    (dict(strategy="dp"), "error: started by torchrun with WORLD_SIZE=2 but train.strategy = 'dp'; "
                          "set train.strategy: ddp"),
], ids=["batch not divisible", "strategy dp"])
def test_a_refusal_every_rank_reaches_under_torchrun_is_said_once(tmp_path, prepared_digits, train, said):
    proc = subprocess.run([*torchrun(2), *train_args(tmp_path, prepared_digits, **train)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [said], proc.stderr


def test_ctrl_c_of_a_self_launched_ddp_run_names_the_checkpoint_kept(tmp_path, prepared_digits):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground group: the command and its ranks."""
    argv = train_args(tmp_path, prepared_digits, strategy="ddp", devices=2, epochs=10_000)
    proc = subprocess.Popen([sys.executable, *argv], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/10000"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    kept = load_checkpoint(tmp_path / "checkpoint.safetensors").epoch
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: interrupted ") and f"; kept the checkpoint of epoch {kept} (" in lines[0], err
    assert f": rerun the same command to resume after epoch {kept} (" in lines[0], err
