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
from stages.exp_workspace import kept_values_hint, locked_params, show_hidden_changes
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


def test_a_refusal_under_a_workspace_exp_run_names_the_command_when_params_differ_from_the_lock(tmp_path,
                                                                                                monkeypatch):
    (tmp_path / "params.yaml").write_text(params_yaml({"train": {"lr": 0.5}}))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"train": {"cmd": "x", "params": {
        "params.yaml": {"train": {"lr": 0.003}}}}}}))
    hint = ("(params.yaml keeps the values `dvc exp run -S` wrote: `python -m stages params --from-lock > "
            "params.yaml` puts back those the workspace's outputs were made with)")
    # Through a stage's command, as DVC runs it: the refusal's one line ends with the hint.
    proc = subprocess.run(["python", "-m", "stages", "evaluate", "--params", "params.yaml", "--data", "data/prepared",
                           "--model", "models/model.safetensors", "--out", "metrics/evaluate"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), DVC_EXP_NAME="exp-1"), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.strip().endswith(hint)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert kept_values_hint() == ""  # `dvc repro`: the user's own params.yaml
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    assert kept_values_hint() == f" {hint}"
    queue_copy = tmp_path / ".dvc" / "tmp" / "exps" / "run1"
    queue_copy.mkdir(parents=True)
    for name in ("params.yaml", "dvc.lock"):
        (queue_copy / name).write_text((tmp_path / name).read_text())
    monkeypatch.chdir(queue_copy)
    assert kept_values_hint() == ""  # a queue's copy is thrown away
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params_yaml({"train": {"lr": 0.003}}))
    assert kept_values_hint() == ""  # nothing to put back
    (tmp_path / "dvc.lock").unlink()
    assert kept_values_hint().endswith("`git checkout params.yaml` puts back the commit's)")
