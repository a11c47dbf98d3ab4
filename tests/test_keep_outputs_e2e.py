"""End to end, real dvc: a stage that refuses, crashes or is stopped keeps its last good outputs,
and weights are never paired with params that did not make them.

DVC deletes a stage's outs before it runs the stage unless they are `persist: true`; every stage's
outs are, and each stage writes them beside and renames (or swaps) them into place at its very end.
Each test makes one stage refuse after check-params passed, with the command a user would type,
and compares every output file byte for byte.
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
from PIL import Image

from .test_pipeline_e2e import commit, new_project, ran, restore_params, set_param, sh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTPUT_ROOTS = ["data/prepared", "models/model.safetensors", "metrics", "report"]


def outputs(repo: Path) -> dict[str, bytes]:
    """Every output file of the pipeline (DVC's own .gitignore files aside), by path."""
    found = {}
    for root in OUTPUT_ROOTS:
        path = repo / root
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            if file.name != ".gitignore":
                found[str(file.relative_to(repo))] = file.read_bytes()
    return found


def refused(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused command (non-zero exit, no traceback)."""
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


def trained_lr(repo: Path) -> float:
    from safetensors import safe_open

    with safe_open(str(repo / "models" / "model.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["params"])["train.lr"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A good run of the whole pipeline (2 epochs, no probe), committed."""
    repo = new_project(tmp_path_factory.mktemp("keep") / "project")
    set_param(repo, "train", "epochs", 2)
    set_param(repo, "analyze", "probe", False)
    commit(repo, "short runs")
    sh(repo, "dvc", "repro")
    commit(repo, "a good run")
    good = outputs(repo)
    assert {"models/model.safetensors", "metrics/train/metrics.json", "metrics/train/run.json",
            "metrics/evaluate/metrics.json", "report/report.md", "data/prepared/info.json"} <= set(good)
    assert any(name.startswith("metrics/train/plots/") for name in good)
    assert any(name.startswith("report/figures/") for name in good)
    return {"repo": repo, "good": good}


@pytest.fixture
def repo(project):
    """The project at its good run; put back after each test."""
    repo = project["repo"]
    assert outputs(repo) == project["good"]
    yield repo
    restore_params(repo)
    sh(repo, "git", "checkout", "HEAD", "--", "dvc.lock", "metrics", "report")  # outs in git
    sh(repo, "dvc", "checkout", "--force")  # outs in DVC's cache
    assert outputs(repo) == project["good"]


def test_prepare_data_refusing_an_unreadable_image_keeps_the_prepared_data(repo, project):
    photos = repo / "data" / "raw" / "photos"
    for name, level in (("dark", 40), ("light", 220)):
        (photos / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (10, 10), (level, level, level + i)).save(photos / name / f"{i}.png")
    (photos / "dark" / "broken.png").write_bytes(b"not a png")
    set_param(repo, "data", "dataset", "imagefolder")
    set_param(repo, "data", "root", "data/raw/photos")
    try:
        proc = sh(repo, "dvc", "repro", check=False)
        assert ran(proc.stdout) == ["check-params", "prepare-data"]
        assert "broken.png" in refused(proc)
        assert outputs(repo) == project["good"]
    finally:
        shutil.rmtree(photos)


def test_train_refusing_a_batch_keeps_the_weights_and_metrics_and_checkout_restores_them(repo, project):
    set_param(repo, "train", "batch_size", 2000)  # allowed by check-params; the digits have 1,295 training images
    proc = sh(repo, "dvc", "repro", check=False)
    assert ran(proc.stdout) == ["check-params", "train"]
    assert "train.batch_size = 2000 is larger than the training split (1295 images)" in refused(proc)
    assert outputs(repo) == project["good"]
    # The train stage's metrics are in DVC's cache: `dvc checkout` brings them back like the weights.
    for name in ("metrics/train/metrics.json", "metrics/train/run.json", "models/model.safetensors"):
        (repo / name).unlink()
    sh(repo, "rm", "-r", "metrics/train/plots")
    restore_params(repo)
    sh(repo, "dvc", "checkout")
    assert outputs(repo) == project["good"]


def test_a_refused_exp_run_value_keeps_the_outputs_and_the_command_it_names_restores_their_params(repo, project):
    # The workspace holds results made with other params than the commit's, as after a successful `dvc exp run`
    # (made here by hand), and every changed file kept its size: git's index cannot tell them by their stat data.
    for name, old, new in (("params.yaml", "lr: 0.002", "lr: 0.003"), ("dvc.lock", "lr: 0.002", "lr: 0.003"),
                           ("metrics/evaluate/predictions.csv", "\n0,", "\n9,")):
        text = (repo / name).read_text()
        assert old in text
        (repo / name).write_text(text.replace(old, new, 1 if name.endswith(".csv") else -1))
    workspace = outputs(repo)
    proc = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0", check=False)
    line = refused(proc)
    restore = "python -m stages params --from-lock > params.yaml"
    assert "train.lr = 0 is not allowed" in line and line.endswith(f"`{restore}` puts back those the workspace's "
                                                                   "outputs were made with)")
    assert outputs(repo) == workspace
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0  # DVC leaves the value there
    # DVC's stash wrote the files back in the same second as git's index; check-params made git look again.
    changed = sh(repo, "git", "status", "--porcelain").stdout
    assert {" M params.yaml", " M dvc.lock", " M metrics/evaluate/predictions.csv"} <= set(changed.splitlines())
    sh(repo, "sh", "-c", restore)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.003
    assert "train.lr" not in sh(repo, "dvc", "status").stdout  # the params are those dvc.lock records
    assert restore in (Path(__file__).parents[1] / "README.md").read_text()
    # A refusal of `dvc repro` (no -S values written by DVC) has no such hint.
    set_param(repo, "train", "lr", 0)
    assert refused(sh(repo, "dvc", "repro", check=False)).endswith("expected a number in (0.0, 10.0]")


def test_train_stopped_by_ctrl_c_keeps_the_weights_and_metrics(repo, project):
    set_param(repo, "train", "epochs", 200)
    checkpoint = repo / "checkpoints" / "train.safetensors"
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("PYTHONPATH", None)
    dvc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and dvc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert checkpoint.exists(), "training never finished an epoch"
    os.killpg(dvc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to dvc and the stage
    output, _ = dvc.communicate(timeout=120)
    assert dvc.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert outputs(repo) == project["good"]
    checkpoint.unlink()


@pytest.fixture(scope="module")
def other_model(project, tmp_path_factory) -> bytes:
    """Weights trained with the project's code, model and train params on 3 classes of 12x12 RGB images."""
    repo, tmp = project["repo"], tmp_path_factory.mktemp("other_model")
    os.symlink(repo / "stages", tmp / "stages")  # `python -m stages` runs the project's code here
    photos = tmp / "photos"
    for name, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
        (photos / name).mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (12, 12), tuple(c + 2 * i for c in colour)).save(photos / name / f"{i}.png")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(dataset="imagefolder", root=str(photos), image_size=12, channels=3)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(tmp, "python", "-m", "stages", "prepare-data", "--out", "prepared")
    sh(tmp, "python", "-m", "stages", "train", "--data", "prepared", "--model", "model.safetensors",
       "--metrics", "m", "--checkpoint", "ck.safetensors")
    return (tmp / "model.safetensors").read_bytes()


@pytest.mark.parametrize("stage", ["evaluate", "analyze"])
def test_a_stage_refusing_a_model_that_does_not_fit_keeps_its_outputs(repo, project, other_model, stage):
    (repo / "models" / "model.safetensors").write_bytes(other_model)  # say, copied from another project
    proc = sh(repo, "dvc", "repro", "--single-item", stage, check=False)
    assert ran(proc.stdout) == [stage]
    line = refused(proc)
    assert "models/model.safetensors does not fit data/prepared" in line
    assert "takes 3x12x12 images and 3 classes" in line and "has 1x8x8 images and 10 classes" in line
    good = dict(project["good"])
    good["models/model.safetensors"] = other_model
    assert outputs(repo) == good


def test_weights_saved_with_params_that_did_not_make_them_are_never_reused_or_used(repo, project, tmp_path):
    """`dvc exp save` of an edit that was never reproduced records params that did not make the weights."""
    good_weights = project["good"]["models/model.safetensors"]
    set_param(repo, "train", "lr", 0.009)
    sh(repo, "dvc", "exp", "save", "-n", "unreproduced")
    # Every consumer of the weights notices the pairing and says how to retrain.
    digit = tmp_path / "digit.png"
    Image.new("L", (8, 8), 100).save(digit)
    for command in (["evaluate"], ["analyze"], ["predict", str(digit), "--out", str(tmp_path / "p.csv")]):
        line = refused(sh(repo, "python", "-m", "stages", *command, check=False))
        assert "models/model.safetensors was trained with train.lr = 0.002 but params.yaml has train.lr = 0.009" \
            in line and "dvc repro" in line
    assert outputs(repo) == project["good"]
    # The saved pairing is not in DVC's run cache: an experiment with lr 0.009 trains with it.
    restore_params(repo)
    sh(repo, "git", "checkout", "HEAD", "--", "dvc.lock")
    proc = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.009")
    assert "train" in ran(proc.stdout) and "is cached" not in proc.stdout + proc.stderr
    assert (repo / "models" / "model.safetensors").read_bytes() != good_weights and trained_lr(repo) == 0.009
