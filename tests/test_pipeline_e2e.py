"""End to end: the real `dvc` CLI on a copy of the project in a temporary git repo.

The tests share one repo and run in file order, as a user's session would:
repro, no-op repro, a params change, commits and diffs, plots drawn offline, a
teammate's clone through a local-folder remote, experiments, a grid through the
queue shared with that clone, a killed training run resumed, and a second clean
copy reproducing the first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stages.params import read_params_file

from .browser import drawn_vega_plots
from .helpers import DEFAULT_WEIGHTS_SHA256, ROOT, skip_unless_reference_torch, stage_processes, start_queue, stop_queue
from .test_layout import command_modules, stage_command

pytestmark = pytest.mark.e2e

COPY = ["stages", "dvc.yaml", "params.yaml", "requirements.lock", ".gitignore", ".dvcignore", "data/raw/.gitkeep",
        "data/raw/digits", "models/.gitignore", "metrics/train/.gitignore", "models/pretrained/.gitkeep"]


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


def restore_params(repo: Path) -> None:
    """params.yaml as committed. Not by `git checkout`, which can miss DVC's rewrite of the file after a
    refused `dvc exp run -S` (docs/experiments.md)."""
    (repo / "params.yaml").write_text(sh(repo, "git", "show", "HEAD:params.yaml").stdout)


def set_param(repo: Path, section: str, key: str, value) -> None:
    path = repo / "params.yaml"
    params = read_params_file(path)
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_queue(repo: Path, jobs: int, timeout: int) -> str:
    """`dvc queue start -j <jobs>`, then wait until nothing is queued or running: the last `dvc queue status`."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # as sh(): the copy's own stages/ must be what runs
    start_queue(repo, env, "-j", str(jobs))
    deadline = time.time() + timeout
    try:
        while True:
            queue = sh(repo, "dvc", "queue", "status").stdout
            if ("Queued" not in queue and "Running" not in queue) or time.time() > deadline:
                return queue
            time.sleep(3)
    finally:
        stop_queue(repo, env)


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def metrics(repo: Path) -> dict:
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    files = shown[""]["data"]
    return {name: body["data"] for name, body in files.items()}


def status(repo: Path) -> dict:
    """`dvc status` as JSON: {} when every stage is up to date."""
    return json.loads(sh(repo, "dvc", "status", "--json").stdout)


def experiments(repo: Path) -> list[dict]:
    """Every experiment `dvc exp show` lists: its name, params.yaml's values and its metrics files."""
    found = []
    for row in json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                found.append({"name": rev.get("name"),
                              "params": data.get("params", {}).get("params.yaml", {}).get("data", {}),
                              "metrics": {f: body.get("data", {}) for f, body in data.get("metrics", {}).items()}})
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = new_project(tmp_path_factory.mktemp("e2e") / "project")
    # The team's DVC remote, a local folder, committed with the project as a team would.
    sh(repo, "dvc", "remote", "add", "-d", "store", str(repo.parent / "dvc-store"))
    commit(repo, "team remote")
    started = time.perf_counter()
    out = sh(repo, "dvc", "repro").stdout
    repo_info = {"repo": repo, "first_output": out, "first_seconds": time.perf_counter() - started,
                 "first_weights": (repo / "models/model.safetensors").read_bytes()}
    commit(repo, "first run")
    return repo_info


def test_repro_runs_every_stage_and_learns(project):
    repo = project["repo"]
    assert ran(project["first_output"]) == ["check-params", "prepare-data", "train", "evaluate", "probe", "analyze",
                                            "export"]
    m = metrics(repo)
    test = m["metrics/evaluate/metrics.json"]["test"]
    assert test["accuracy"] >= 0.97 and 0 < test["loss"] < 0.2
    assert 1.0 >= test["top5_accuracy"] >= test["accuracy"]  # 10 classes: top-5 beside top-1
    train = m["metrics/train/metrics.json"]
    assert train["samples_per_second"] > 0 and train["num_devices"] == 1 and train["world_size"] == 1
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"check-params", "prepare-data", "train", "evaluate", "probe", "analyze", "export"}
    assert set(lock["stages"]["prepare-data"]["params"]["params.yaml"]) == {"data"}
    artifacts = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]
    assert any(a["type"] == "model" and a["path"] == "models/model.safetensors" for a in artifacts.values())
    assert (repo / "report" / "report.md").is_file()


def test_default_params_still_give_the_reference_weights(project):
    skip_unless_reference_torch()
    assert hashlib.sha256(project["first_weights"]).hexdigest() == DEFAULT_WEIGHTS_SHA256


def test_second_repro_runs_nothing(project):
    out = sh(project["repo"], "dvc", "repro").stdout
    assert ran(out) == []
    assert out.count("didn't change, skipping") == 7


def test_a_report_wording_change_reruns_analyze_alone_and_a_probe_change_probe_and_analyze(project):
    """analyze only reads files: a sentence of the report reruns it alone, never the probe that times the
    hardware; a change to the probe reruns the probe and then analyze, which reads its file."""
    repo = project["repo"]
    report, probe = repo / "stages/analyze/report.py", repo / "stages/probe_skip.py"
    report_text, probe_text = report.read_text(), probe.read_text()
    assert '"## Lessons"' in report_text and "so there is nothing to compare one device with" in probe_text
    try:
        report.write_text(report_text.replace('"## Lessons"', '"## What this run teaches"'))
        assert set(status(repo)) == {"analyze"}
        out = sh(repo, "dvc", "repro").stdout
        assert ran(out) == ["analyze"]
        assert "## What this run teaches" in (repo / "report/report.md").read_text()
        # Without GPUs (probe_ddp off), the default probe says in its file why it did not run: its words are in
        # probe_skip.py, one of the probe stage's modules.
        probe.write_text(probe_text.replace("so there is nothing to compare one device with",
                                            "so there is nothing to set one device against"))
        assert set(status(repo)) == {"probe"}
        out = sh(repo, "dvc", "repro").stdout
        assert ran(out) == ["probe", "analyze"]
        assert "nothing to set one device against" in (repo / "report/report.md").read_text()
    finally:
        report.write_text(report_text)
        probe.write_text(probe_text)
    sh(repo, "dvc", "repro")
    assert status(repo) == {}


def test_epochs_change_reruns_train_not_prepare(project):
    repo = project["repo"]
    set_param(repo, "train", "epochs", 8)
    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == ["check-params", "train", "evaluate", "probe", "analyze", "export"]
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
    # no scaling.png: on one device (as here, without GPUs) the probe has nothing to compare and draws nothing
    # the confusion matrix by its title in dvc.yaml, not its file's path, with its axes named
    for name in ("Loss", "Accuracy", "Confusion matrix (test split)", "predicted class", "actual class",
                 "confusion.png", "learning_curves.png"):
        assert name in html
    assert "HEAD~1" in html and "workspace" in html


def vega_plots(repo: Path, *command: str) -> int:
    """How many vega plots `dvc plots <command>` puts on its page."""
    shown = json.loads(sh(repo, "dvc", "plots", *command, "--json").stdout)["data"]
    return sum(plot["type"] == "vega" for plots in shown.values() for plot in plots)


def test_plots_draw_offline_in_a_browser(project, tmp_path):
    """Headless Chromium with every host lookup refused: DVC's own page draws nothing; after
    `python -m stages offline-plots` both `dvc plots show` and `dvc plots diff` draw every vega plot."""
    repo = project["repo"]
    commands = {"show": ["show"], "diff": ["diff", "HEAD~1"]}
    # the loss and accuracy curves (dvc.yaml's top-level plots) and the confusion matrix; the report's PNGs are <img>s
    assert {name: vega_plots(repo, *cmd) for name, cmd in commands.items()} == {"show": 3, "diff": 3}
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "cdn"))
    assert drawn_vega_plots(tmp_path / "cdn" / "index.html") == 0  # DVC's page fetches vega from a CDN
    sh(repo, "python", "-m", "stages", "offline-plots")
    assert sh(repo, "git", "status", "--porcelain").stdout == ""  # the page and the setting stay out of git
    for name, cmd in commands.items():
        sh(repo, "dvc", "plots", *cmd, "-o", str(tmp_path / name))
        page = tmp_path / name / "index.html"
        assert "cdn.jsdelivr.net" not in page.read_text()
        assert drawn_vega_plots(page) == 3, f"dvc plots {name}: not every vega plot was drawn offline"


def test_a_teammates_clone_after_dvc_pull_runs_nothing(project, tmp_path):
    """Push to a git remote and the local-folder DVC remote; a fresh clone plus `dvc pull` is up to date,
    an older commit plus `dvc pull` too, and the model comes by name with `dvc artifacts get`."""
    repo = project["repo"]
    origin = repo.parent / "origin.git"
    sh(repo.parent, "git", "init", "-q", "--bare", str(origin))
    sh(repo, "git", "remote", "add", "origin", str(origin))
    branch = sh(repo, "git", "branch", "--show-current").stdout.strip()
    sh(repo, "git", "push", "-q", "origin", branch)
    sh(repo, "dvc", "push", "--all-commits")  # as if each commit had been pushed when it was made
    assert not (repo / "checkpoints" / "train.safetensors").exists()  # completed runs leave no checkpoint

    clone = repo.parent / "clone"
    sh(repo.parent, "git", "clone", "-q", "-b", branch, str(origin), str(clone))
    sh(clone, "dvc", "pull")
    assert status(clone) == {}
    assert ran(sh(clone, "dvc", "repro").stdout) == []
    weights = "models/model.safetensors"
    assert (clone / weights).read_bytes() == (repo / weights).read_bytes()
    assert not (clone / ".dvc" / "config.local").exists()
    sh(clone, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))  # DVC's own page there: no setting, no error

    sh(clone, "git", "checkout", "-q", "HEAD~1")  # the first run's commit
    sh(clone, "dvc", "pull")
    assert status(clone) == {}
    assert ran(sh(clone, "dvc", "repro").stdout) == []
    assert (clone / weights).read_bytes() == project["first_weights"]
    sh(clone, "git", "checkout", "-q", branch)
    sh(clone, "dvc", "pull")
    assert status(clone) == {}

    # The model by name, from outside any repo: a version registered as an annotated git tag (GTO's format).
    sh(repo, "git", "tag", "-a", "image-classifier@v1.0.0", "-m", "image-classifier v1.0.0")
    sh(repo, "git", "push", "-q", "origin", "image-classifier@v1.0.0")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    sh(outside, "dvc", "artifacts", "get", str(origin), "image-classifier", "--rev", "v1.0.0")
    assert (outside / "model.safetensors").read_bytes() == (repo / weights).read_bytes()
    project.update(origin=origin, clone=clone)


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
        restore_params(repo)
        assert {name: (repo / name).read_bytes() for name in outputs} == before
    # check-params' marker is a persistent out: the refusals left it and its lock entry as they were.
    assert ran(sh(repo, "dvc", "repro").stdout) == []


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


def test_a_grid_of_queued_experiments_runs_and_compares(project, tmp_path):
    """A 2x1 grid through the queue, two at a time; then sorted by accuracy and plotted side by side."""
    repo = project["repo"]
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "train.lr=0.001,0.004", "-S", "train.epochs=4")
    queue = run_queue(repo, jobs=2, timeout=600)
    assert "Failed" not in queue, queue
    grid = {e["params"]["train"]["lr"]: e for e in experiments(repo) if e["params"]["train"]["epochs"] == 4}
    assert set(grid) == {0.001, 0.004}
    loss = {lr: e["metrics"]["metrics/evaluate/metrics.json"]["test"]["loss"] for lr, e in grid.items()}
    assert loss[0.001] != loss[0.004]  # each experiment has its own result
    table = sh(repo, "dvc", "exp", "show", "--csv", "--sort-by", "test.accuracy", "--sort-order", "desc").stdout
    rows = [row for row in csv.DictReader(io.StringIO(table)) if row["Experiment"]]
    accuracy = [float(row["test.accuracy"]) for row in rows]
    assert len(rows) >= 2 and accuracy == sorted(accuracy, reverse=True)
    # README's grid table, as written there: it keeps the State column, which tells a failed experiment
    # (listed with its baseline's metrics) from one that ran, and rev, which names the rows that are no experiment
    recipe = next(line for line in (ROOT / "README.md").read_text().splitlines()
                  if line.startswith("dvc exp show --drop '.*' --keep") and "--csv" in line)
    table = sh(repo, *shlex.split(recipe.split(" > ")[0])).stdout
    header = next(csv.reader(io.StringIO(table)))
    assert header[:3] == ["Experiment", "rev", "State"] and {"train.lr", "test.accuracy", "test.loss"} <= set(header)
    rows = list(csv.DictReader(io.StringIO(table)))
    states = {row["Experiment"]: row["State"] for row in rows if row["Experiment"]}
    assert {states[grid[lr]["name"]] for lr in grid} == {"Success"}
    assert "workspace" in {row["rev"] for row in rows if not row["Experiment"]} and all(row["rev"] for row in rows)
    names = [grid[lr]["name"] for lr in sorted(grid)]
    shown = json.loads(sh(repo, "dvc", "plots", "diff", *names, "--json").stdout)["data"]
    assert shown["Loss"][0]["revisions"] == names  # one chart, a curve per experiment
    project["grid"] = grid


def test_an_experiment_pushed_is_pulled_and_applied_in_the_clone_without_rerunning(project):
    repo, clone = project["repo"], project["clone"]
    exp = project["grid"][0.004]
    sh(repo, "dvc", "exp", "push", "origin", exp["name"])  # its git ref, and its outputs to the DVC remote
    sh(clone, "dvc", "exp", "pull", "origin", exp["name"])
    sh(clone, "dvc", "exp", "apply", exp["name"])
    assert read_params_file(clone / "params.yaml")["train"]["lr"] == 0.004
    assert status(clone) == {}
    assert ran(sh(clone, "dvc", "repro").stdout) == []
    applied = json.loads((clone / "metrics/evaluate/metrics.json").read_text())
    assert applied == exp["metrics"]["metrics/evaluate/metrics.json"]


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
    assert (repo / "checkpoints" / "train.safetensors").is_file()
    assert status(repo) != {}
    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == ["train", "evaluate", "probe", "analyze", "export"]
    resuming = [line for line in out.splitlines() if "Resuming" in line]
    assert len(resuming) == 1 and "of 30" in resuming[0]
    assert "epoch 1/30" not in out and "epoch 30/30" in out
    # the resumed run wrote the curves whole, from the checkpoint's history
    assert len((repo / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()) == 30 + 1
    assert not (repo / "checkpoints" / "train.safetensors").exists()
    assert status(repo) == {}


def test_clean_copy_reproduces_weights_and_metrics(project, tmp_path):
    other = new_project(tmp_path / "again")
    sh(other, "dvc", "repro")
    assert (other / "models/model.safetensors").read_bytes() == project["first_weights"]
    first = json.loads(sh(project["repo"], "git", "show", "HEAD~1:metrics/evaluate/metrics.json").stdout)
    assert json.loads((other / "metrics/evaluate/metrics.json").read_text()) == first


def test_ddp_experiment_on_two_cpu_processes(project):
    repo = project["repo"]
    restore_params(repo)
    out = sh(repo, "dvc", "exp", "run", "-S", "train.strategy=ddp", "-S", "train.accelerator=cpu",
             "-S", "train.devices=2").stdout
    assert "strategy ddp (2 processes)" in out
    run = json.loads((repo / "metrics/train/run.json").read_text())
    assert run["launcher"] == "stages (torch elastic)" and run["restarts"] == 0  # torch's elastic agent started it
    m = metrics(repo)
    assert m["metrics/train/metrics.json"]["world_size"] == 2
    assert m["metrics/evaluate/metrics.json"]["test"]["accuracy"] >= 0.97


def test_fine_tuning_a_weights_file_with_the_recipe_through_dvc(project):
    """A weights file under models/pretrained (this project's first model), fine-tuned with every recipe key
    set by `dvc exp run -S`; then a change to the file's content makes DVC retrain."""
    import stages

    repo = project["repo"]
    restore_params(repo)
    start = repo / "models" / "pretrained" / "start.safetensors"
    start.write_bytes(project["first_weights"])
    sh(repo, "dvc", "add", "-q", "models/pretrained/start.safetensors")
    commit(repo, "starting weights")
    recipe = {"epochs": 3, "ema": 0.9, "keep": "best", "patience": 5, "label_smoothing": 0.1, "mixup_alpha": 0.2,
              "cutmix_alpha": 1.0, "warmup_epochs": 1, "accumulate": 2, "clip_grad_norm": 1.0, "freeze_epochs": 1,
              "backbone_lr": 0.5}
    sets = [arg for key, value in recipe.items() for arg in ("-S", f"train.{key}={value}")]
    out = sh(repo, "dvc", "exp", "run", "-S", "model.weights=models/pretrained/start.safetensors", *sets).stdout
    assert "pretrained 'models/pretrained/start.safetensors'" in out and "new: head 15 for 10 classes" in out
    assert "global batch 64 in 2 passes of 32" in out and "epoch 2: the backbone trains" in out
    meta = stages.load_model(repo / "models" / "model.safetensors").stages_metadata
    assert meta["pretrained"] == {"file": "start.safetensors", "sha256": hashlib.sha256(start.read_bytes()).hexdigest()}
    assert meta["normalization"] == "pretrained weights: the metadata of start.safetensors"
    m = metrics(repo)["metrics/evaluate/metrics.json"]["test"]
    assert m["accuracy"] >= 0.95 and m["top5_accuracy"] >= m["accuracy"]
    run = json.loads((repo / "metrics" / "train" / "run.json").read_text())
    assert {k: run["train_params"][k] for k in recipe} == recipe
    report = (repo / "report" / "report.md").read_text()
    assert "fine-tuned from start.safetensors" in report and "ema 0.9" in report and "test top-5 accuracy" in report
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    start.write_bytes((repo / "models" / "model.safetensors").read_bytes())  # other starting weights
    changed = set(json.loads(sh(repo, "dvc", "status", "--json").stdout))
    assert "train" in changed and not {"check-params", "prepare-data"} & changed
