"""End to end: the real `dvc` CLI on a copy of the project in a temporary git repo.

The tests share one repo and run in file order, as a user's session would:
repro, no-op repro, a params change, commits and diffs, experiments, a queue,
a killed training run resumed, and a second clean copy reproducing the first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT, stage_processes
from .test_layout import command_modules, stage_command

pytestmark = pytest.mark.e2e

COPY = ["stages", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "data/raw/.gitkeep"]


def sh(repo: Path, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the copy's own stages/ must be what runs
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def new_project(path: Path) -> Path:
    path.mkdir(parents=True)
    for item in COPY:
        src, dst = ROOT / item, path / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    sh(path, "git", "init", "-q")
    sh(path, "git", "config", "user.email", "test@example.com")
    sh(path, "git", "config", "user.name", "Test")
    sh(path, "dvc", "init", "-q")
    sh(path, "dvc", "config", "core.analytics", "false")
    commit(path, "project")
    return path


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)


def set_param(repo: Path, section: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def metrics(repo: Path) -> dict:
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    files = shown[""]["data"]
    return {name: body["data"] for name, body in files.items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = new_project(tmp_path_factory.mktemp("e2e") / "project")
    started = time.perf_counter()
    out = sh(repo, "dvc", "repro").stdout
    repo_info = {"repo": repo, "first_output": out, "first_seconds": time.perf_counter() - started,
                 "first_weights": (repo / "models/model.safetensors").read_bytes()}
    commit(repo, "first run")
    return repo_info


def test_repro_runs_every_stage_and_learns(project):
    repo = project["repo"]
    assert ran(project["first_output"]) == ["check-params", "prepare-data", "train", "evaluate", "analyze"]
    m = metrics(repo)
    test = m["metrics/evaluate/metrics.json"]["test"]
    assert test["accuracy"] >= 0.97 and 0 < test["loss"] < 0.2
    train = m["metrics/train/metrics.json"]
    assert train["samples_per_second"] > 0 and train["num_devices"] == 1 and train["world_size"] == 1
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"check-params", "prepare-data", "train", "evaluate", "analyze"}
    assert set(lock["stages"]["prepare-data"]["params"]["params.yaml"]) == {"data"}
    artifacts = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]
    assert any(a["type"] == "model" and a["path"] == "models/model.safetensors" for a in artifacts.values())
    assert (repo / "report" / "report.md").is_file()


def test_second_repro_runs_nothing(project):
    out = sh(project["repo"], "dvc", "repro").stdout
    assert ran(out) == []
    assert out.count("didn't change, skipping") == 5


def test_epochs_change_reruns_train_not_prepare(project):
    repo = project["repo"]
    set_param(repo, "train", "epochs", 8)
    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == ["check-params", "train", "evaluate", "analyze"]
    assert "Stage 'prepare-data' didn't change, skipping" in out
    commit(repo, "8 epochs")


def test_metrics_params_and_plots_diff_across_commits(project, tmp_path):
    repo = project["repo"]
    mdiff = json.loads(sh(repo, "dvc", "metrics", "diff", "HEAD~1", "--all", "--json").stdout)
    acc = mdiff["metrics/evaluate/metrics.json"]["test.accuracy"]
    loss = mdiff["metrics/evaluate/metrics.json"]["test.loss"]
    assert set(acc) >= {"old", "new"} and set(loss) >= {"old", "new"}
    assert loss["old"] != loss["new"]  # 15 vs 8 epochs cannot end on the same loss
    pdiff = json.loads(sh(repo, "dvc", "params", "diff", "HEAD~1", "--json").stdout)
    assert list(pdiff["params.yaml"]) == ["train.epochs"]
    assert (pdiff["params.yaml"]["train.epochs"]["old"], pdiff["params.yaml"]["train.epochs"]["new"]) == (15, 8)
    out = tmp_path / "plots"
    sh(repo, "dvc", "plots", "diff", "HEAD~1", "-o", str(out))
    html = (out / "index.html").read_text()
    for name in ("Loss", "Accuracy", "predictions.csv", "confusion.png", "learning_curves.png", "scaling.png"):
        assert name in html
    assert "HEAD~1" in html and "workspace" in html


def test_an_edit_to_a_module_reruns_exactly_the_stages_that_import_it(project):
    """dvc status after touching one module names the stages whose commands import it, no more, no less."""
    repo = project["repo"]
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for module in ("stages/core/checkpoint.py", "stages/core/transforms.py", "stages/sources/imagefolder.py",
                   "stages/analyze/report.py", "stages/params.py"):
        name = module.removesuffix(".py").replace("/", ".")
        expected = {stage for stage, s in spec.items() if name in command_modules(stage_command(s["cmd"]))}
        assert expected, module
        path = repo / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            changed = set(json.loads(sh(repo, "dvc", "status", "--json").stdout))
        finally:
            path.write_text(original)
        assert changed == expected, \
            f"editing {module}: dvc reruns {sorted(changed)}, its importers are {sorted(expected)}"
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


def test_bad_params_keep_the_last_good_artifacts(project):
    repo = project["repo"]
    outputs = ["models/model.safetensors", "metrics/train/metrics.json", "metrics/evaluate/metrics.json",
               "report/report.md", "data/prepared/train.safetensors"]
    before = {name: (repo / name).read_bytes() for name in outputs}
    cases = [("train.epoch", 3, "repro"), ("data.val_fraction", 1.5, "repro"), ("train.lr", "fast", "exp")]
    for key, value, how in cases:
        if how == "repro":  # a typo or bad value typed into params.yaml
            set_param(repo, *key.split("."), value)
            proc = sh(repo, "dvc", "repro", check=False)
        else:
            proc = sh(repo, "dvc", "exp", "run", "-S", f"{key}={value}", check=False)
        assert proc.returncode != 0
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and key in errors[0] and "Traceback" not in proc.stdout + proc.stderr
        sh(repo, "git", "checkout", "HEAD", "--", "params.yaml")
        assert {name: (repo / name).read_bytes() for name in outputs} == before
    assert ran(sh(repo, "dvc", "repro").stdout) == ["check-params"]


def test_experiment_run_and_show(project):
    repo = project["repo"]
    sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.003")
    rows = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    found = []
    for exp in exps:
        for rev in exp.get("revs", []):
            data = rev.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            if params.get("train", {}).get("lr") == 0.003:
                found.append(data["metrics"]["metrics/evaluate/metrics.json"]["data"]["test"]["accuracy"])
    assert len(found) == 1 and found[0] >= 0.95


def test_queued_experiments_run_two_at_a_time(project):
    repo = project["repo"]
    for seed in (1, 2, 3):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.seed={seed}", "-S", "train.epochs=4")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, status
    assert status.count("Success") >= 3, status
    rows = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    seeds = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                train = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {})
                if train.get("epochs") == 4:
                    seeds[train["seed"]] = data["metrics"]["metrics/evaluate/metrics.json"]["data"]["test"]["loss"]
    assert set(seeds) == {1, 2, 3}
    assert len(set(seeds.values())) == 3  # each experiment has its own result


def test_killed_training_resumes_under_dvc(project):
    repo = project["repo"]
    set_param(repo, "train", "epochs", 30)
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    for line in dvc.stdout:
        if line.startswith("epoch 3/30"):
            # SIGKILL the training process itself, as the OOM killer or a lost node would: the one
            # this dvc started, found by its parent's id, never by name (other runs may be going on)
            [train] = stage_processes(dvc.pid, "train")
            os.kill(train, signal.SIGKILL)
            break
    rest = dvc.stdout.read()
    dvc.wait(timeout=120)
    assert dvc.returncode != 0 and "failed to reproduce 'train'" in rest
    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == ["train", "evaluate", "analyze"]
    resuming = [line for line in out.splitlines() if "Resuming" in line]
    assert len(resuming) == 1 and "of 30" in resuming[0]
    assert "epoch 1/30" not in out and "epoch 30/30" in out


def test_clean_copy_reproduces_weights_and_metrics(project, tmp_path):
    other = new_project(tmp_path / "again")
    sh(other, "dvc", "repro")
    assert (other / "models/model.safetensors").read_bytes() == project["first_weights"]
    first = json.loads(sh(project["repo"], "git", "show", "HEAD~1:metrics/evaluate/metrics.json").stdout)
    assert json.loads((other / "metrics/evaluate/metrics.json").read_text()) == first


def test_ddp_experiment_on_two_cpu_processes(project):
    repo = project["repo"]
    sh(repo, "git", "checkout", "-q", "HEAD", "--", "params.yaml")
    out = sh(repo, "dvc", "exp", "run", "-S", "train.strategy=ddp", "-S", "train.accelerator=cpu",
             "-S", "train.devices=2").stdout
    assert "strategy ddp (2 processes)" in out
    m = metrics(repo)
    assert m["metrics/train/metrics.json"]["world_size"] == 2
    assert m["metrics/evaluate/metrics.json"]["test"]["accuracy"] >= 0.97
