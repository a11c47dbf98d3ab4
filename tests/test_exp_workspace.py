"""What a refused workspace `dvc exp run` leaves (stages/exp_workspace.py): git's index shown the changed files
again, and params.yaml rebuilt from the values dvc.lock records. Real git; the e2e test with real DVC is in
tests/test_keep_outputs_e2e.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.errors import UserError
from stages.exp_workspace import locked_params, show_hidden_changes
from stages.params import params_yaml, read_params_file

from .helpers import ROOT


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def test_a_changed_file_with_the_index_stat_data_is_shown_to_git_again(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "predictions.csv").write_text("0,cat\n")
    (tmp_path / "kept.txt").write_text("same\n")
    # An mtime seconds before the index is written: git then trusts the stat data (no "racily clean" check).
    before = (tmp_path / "predictions.csv").stat().st_mtime_ns - 10**10
    os.utime(tmp_path / "predictions.csv", ns=(before, before))
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    # What DVC's stash leaves: new content of the same size, with the mtime git's index recorded.
    (tmp_path / "predictions.csv").write_text("9,dog\n")
    os.utime(tmp_path / "predictions.csv", ns=(before, before))
    assert git(tmp_path, "status", "--porcelain") == ""  # git takes it for unchanged
    assert show_hidden_changes(tmp_path) == ["predictions.csv"]
    assert git(tmp_path, "status", "--porcelain") == " M predictions.csv\n"
    assert show_hidden_changes(tmp_path.parent / "nowhere") == []  # no work tree: nothing, quietly


def test_params_from_the_lock_are_those_of_the_last_stage_that_records_them(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "check-params": {"cmd": "x", "params": {"params.yaml": {"train": {"lr": 3e-05, "epochs": 9}}}},
        "train": {"cmd": "y", "params": {"params.yaml": {"train": {"lr": 0.003, "epochs": 4}}}},
        "evaluate": {"cmd": "z", "params": {"params.yaml": {"evaluate.batch_size": 7}}},
        "probe": {"cmd": "w"}}}))
    values = locked_params(lock)
    assert values == {"train": {"lr": 0.003, "epochs": 4}, "evaluate": {"batch_size": 7}}
    out = tmp_path / "params.yaml"
    out.write_text(params_yaml(values))
    read = read_params_file(out)
    assert read["train"]["lr"] == 0.003 and read["train"]["epochs"] == 4 and read["evaluate"]["batch_size"] == 7
    defaults = read_params_file(ROOT / "params.yaml")
    assert read["model"] == defaults["model"]  # keys the lock does not record keep their defaults
    with pytest.raises(UserError, match="does not exist: no stage has run here yet"):
        locked_params(tmp_path / "nothing.lock")


def test_params_from_lock_command_prints_a_params_file_that_check_params_accepts(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  train:\n    cmd: x\n    params:\n      params.yaml:\n"
                    "        train:\n          lr: 3e-05\n")  # as DVC writes it: YAML 1.2, where 3e-05 is a float
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(["python", "-m", "stages", "params", "--from-lock"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "params.yaml").write_text(proc.stdout)
    assert read_params_file(tmp_path / "params.yaml")["train"]["lr"] == 3e-05
    lock.unlink()
    proc = subprocess.run(["python", "-m", "stages", "params", "--from-lock"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: dvc.lock does not exist: no stage has run " \
                                                           "here yet (dvc repro)"


def test_a_refusal_under_a_workspace_exp_run_names_the_command_when_params_differ_from_the_lock(tmp_path):
    (tmp_path / "params.yaml").write_text(params_yaml({"train": {"lr": 0.5}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"train": {"cmd": "x", "params": {
        "params.yaml": {"train": {"lr": 0.003}}}}}}))
    refuse = ["python", "-m", "stages", "evaluate", "--params", "params.yaml", "--data", "data/prepared",
              "--model", "models/model.safetensors", "--out", "metrics/evaluate"]

    def refusal(cwd: Path, **env: str) -> str:
        proc = subprocess.run(refuse, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                              capture_output=True, text=True)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        return proc.stderr.strip()

    hint = ("(params.yaml keeps the values `dvc exp run -S` wrote: `python -m stages params --from-lock > "
            "params.yaml` puts back those the workspace's outputs were made with)")
    assert refusal(tmp_path, DVC_EXP_NAME="exp-1").endswith(hint)
    assert "params.yaml keeps" not in refusal(tmp_path)  # `dvc repro`: the user's own params.yaml
    queue_copy = tmp_path / ".dvc" / "tmp" / "exps" / "run1"
    queue_copy.mkdir(parents=True)
    for name in ("params.yaml", "dvc.lock"):
        (queue_copy / name).write_text((tmp_path / name).read_text())
    assert "params.yaml keeps" not in refusal(queue_copy, DVC_EXP_NAME="exp-1")  # a queue's copy is thrown away
    (tmp_path / "params.yaml").write_text(params_yaml({"train": {"lr": 0.003}}))
    assert "params.yaml keeps" not in refusal(tmp_path, DVC_EXP_NAME="exp-1")  # nothing to put back
    (tmp_path / "dvc.lock").unlink()
    assert refusal(tmp_path, DVC_EXP_NAME="exp-1").endswith("`git checkout params.yaml` puts back the commit's)")
