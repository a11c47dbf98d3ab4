"""What the train stage says to a user: a download with no network, Ctrl-C, the saved line, plurals.

Each runs the real `python -m stages train` in a subprocess; no test touches the network (the
download goes through a proxy on a local port that nothing listens on).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core.checkpoint import load_checkpoint

from .helpers import ROOT, train_in_process, write_params


def stages_train(tmp_path: Path, prepared: Path, **sections) -> list[str]:
    """The argv of `python -m stages train` on `prepared` with params from `sections`."""
    params = write_params(tmp_path / "params.yaml", **sections)
    return [sys.executable, "-m", "stages", "train", "--params", str(params), "--data", str(prepared),
            "--model", str(tmp_path / "model.safetensors"), "--metrics", str(tmp_path / "metrics"),
            "--checkpoint", str(tmp_path / "checkpoint.safetensors")]


def closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_without_network_is_one_line_naming_host_cache_and_what_to_do(tmp_path, prepared_digits):
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_HOME=str(tmp_path / "torch"), https_proxy=proxy,
               HTTPS_PROXY=proxy, http_proxy=proxy, HTTP_PROXY=proxy, no_proxy="", NO_PROXY="")
    argv = stages_train(tmp_path, prepared_digits,
                        model={"name": "resnet18", "weights": "IMAGENET1K_V1", "download": True},
                        train={"accelerator": "cpu", "epochs": 1})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "download.pytorch.org is unreachable" in lines[0], lines[0]
    assert str(cached) in lines[0] and "place the file" in lines[0], lines[0]
    assert not cached.exists() and not (tmp_path / "model.safetensors").exists()


def test_ctrl_c_says_which_epochs_checkpoint_was_kept_and_that_dvc_repro_resumes(tmp_path, prepared_digits):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    argv = stages_train(tmp_path, prepared_digits, model={"name": "mlp"},
                        train={"accelerator": "cpu", "epochs": 10_000})
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait for the second epoch's line: two checkpoints written by then
            if line.startswith("epoch 2/10000"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    kept = load_checkpoint(tmp_path / "checkpoint.safetensors").epoch
    assert kept >= 2
    assert proc.returncode == 2 and "Traceback" not in err, err
    # Between epochs (the epoch's line printed, its checkpoint written) or during the next one.
    where = (f"in epoch {kept + 1}", f"after epoch {kept}")
    assert err.strip() in (f"error: interrupted {w} of 10000; kept the checkpoint of epoch {kept} "
                           f"({tmp_path / 'checkpoint.safetensors'}): rerun the same command to resume after "
                           f"epoch {kept} (`dvc repro` reruns train when its params or data changed; when they "
                           "did not, `dvc repro -f -s train`, then `dvc repro` for the stages after it)"
                           for w in where), err


@pytest.mark.parametrize("keep", ["best", "last"])
def test_saved_line_says_which_epochs_weights_were_kept(tmp_path, prepared_digits, keep):
    out, result = train_in_process(tmp_path, keep, prepared_digits, model={"name": "mlp"}, epochs=3, keep=keep,
                                   lr=0.05)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "metrics" / "run.json").read_text())
    saved = next(line for line in result.stdout.splitlines() if line.startswith("saved "))
    if keep == "best":
        assert f": epoch {run['best_epoch']}'s weights (train.keep: best; val accuracy " \
               f"{run['best_val_accuracy']:.4f})" in saved, saved
    else:
        assert ": the last epoch's weights (epoch 3)" in saved, saved
    assert saved.endswith("over 3 epochs)"), saved


def test_counts_of_one_are_singular(tmp_path, prepared_digits):
    out, result = train_in_process(tmp_path, "one", prepared_digits, model={"name": "mlp"}, epochs=1)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].endswith("over 1 epoch)"), result.stdout
