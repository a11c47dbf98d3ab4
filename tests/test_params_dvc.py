"""Every value `dvc exp run -S` writes into params.yaml reads back as that value: the real dvc CLI in a
temporary git repo whose pipeline is the check-params stage alone (what reads params.yaml first)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from stages.params import SECTIONS, Float, load_params

from .helpers import ROOT, start_queue, stop_queue

pytestmark = pytest.mark.slow

# Every numeric key, set in exponent form; each value is allowed, and allowed with the others.
EXPONENT_FORM = {
    "data.val_fraction": "1.5e-1", "data.test_fraction": "2.5e-1", "data.split_seed": "3e0",
    "data.image_size": "6.4e1", "data.channels": "1e0",
    "train.epochs": "4e0", "train.batch_size": "3.2e1", "train.lr": "3e-5", "train.momentum": "9.5e-1",
    "train.weight_decay": "5e-5", "train.seed": "7e0", "train.devices": "1e0", "train.max_restarts": "1e0",
    "train.dist_timeout": "6e2", "train.label_smoothing": "1e-1", "train.warmup_epochs": "1e0",
    "train.ema": "9.99e-1", "train.mixup_alpha": "2e-1", "train.cutmix_alpha": "1e0", "train.clip_grad_norm": "1e3",
    "train.accumulate": "2e0", "train.patience": "3e0", "train.freeze_epochs": "2e0", "train.backbone_lr": "1e-1",
    "evaluate.batch_size": "5.12e2", "analyze.probe_steps": "1e1",
    "export.check_images": "2.56e2", "export.atol": "1e-5", "export.rtol": "1e-4", "export.label_mismatch": "5e-2",
}


def sh(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("PYTHONPATH", None)  # the copy's own stages/ runs
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git + dvc repo holding the project's stages/ and params.yaml, and dvc.yaml's check-params stage."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["check-params"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"check-params": stage}}, sort_keys=False))
    # data.root's default folder, as the project has it (check-params refuses a data.root that is not there)
    shutil.copytree(ROOT / "data" / "raw" / "digits", repo / "data" / "raw" / "digits")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "T"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "project"]):
        sh(repo, *cmd)
    return repo


def test_the_schema_lists_every_numeric_key():
    numeric = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in cls.__dataclass_fields__.values()
               if f.type in ("int", "float") or isinstance(f.metadata["allowed"], Float)}
    assert numeric <= set(EXPONENT_FORM), sorted(numeric - set(EXPONENT_FORM))


def test_every_numeric_key_set_in_exponent_form_reads_back_as_set(repo):
    settings = [arg for key, value in EXPONENT_FORM.items() for arg in ("-S", f"{key}={value}")]
    sh(repo, "dvc", "exp", "run", *settings)
    written = (repo / "params.yaml").read_text()
    assert "lr: 3e-05" in written and "weight_decay: 5e-05" in written  # as DVC writes them (YAML 1.2)
    p = load_params(repo / "params.yaml")
    for key, value in EXPONENT_FORM.items():
        section, name = key.split(".")
        read = getattr(getattr(p, section), name)
        assert read == float(value), (key, value, read)
        declared = type(getattr(p, section)).__dataclass_fields__[name]
        assert isinstance(read, float) == isinstance(declared.metadata["allowed"], Float), (key, read)
    # the other spellings users type: plain decimals and a hand-typed exponent
    sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.00003", "-S", "train.weight_decay=0.00005")
    assert (load_params(repo / "params.yaml").train.lr, load_params(repo / "params.yaml").train.weight_decay) == (
        3e-5, 5e-5)
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("lr: 3e-05", "lr: 1e-4"))
    sh(repo, "dvc", "exp", "run")
    assert load_params(repo / "params.yaml").train.lr == 1e-4


def test_a_queued_grid_of_small_learning_rates_runs(repo):
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "train.lr=1e-5,3e-5")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env.pop("PYTHONPATH", None)
    start_queue(repo, env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            queue = sh(repo, "dvc", "queue", "status").stdout
            if "Queued" not in queue and "Running" not in queue:
                break
            time.sleep(2)
    finally:
        stop_queue(repo, env)
    assert queue.count("Success") == 2 and "Failed" not in queue, queue
