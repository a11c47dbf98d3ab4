"""The weights' consumers check what they are given, and outputs are replaced whole or not at all.

evaluate, analyze and predict make one check (`stages.model_file.check_weights_use`): the model
file is one of ours, it was trained with params.yaml's model.* and train.* values (recorded in its
metadata), and it fits the prepared data (input shape, classes). Each refusal is one line. A folder
written with `staged_dir` holds exactly the new files once complete and the old ones otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.core.weights import load_model, save_model
from stages.errors import UserError
from stages.io import save_tensors

from .helpers import error_line, write_params

runner = CliRunner()
TRAIN = {"epochs": 1, "accelerator": "cpu", "batch_size": 16}  # every model here: small enough for 21 photos


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def train_mlp(root: Path, data: Path, params: Path) -> Path:
    model = root / "model.safetensors"
    result = invoke("train", "--params", params, "--data", data, "--model", model, "--metrics", root / "train",
                    "--checkpoint", root / "ck.safetensors")
    assert result.exit_code == 0, result.output
    return model


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, prepared_digits) -> dict:
    """An mlp trained 1 epoch on the digits and evaluated: the files analyze reads."""
    root = tmp_path_factory.mktemp("digits_run")
    params = write_params(root / "params.yaml", model={"name": "mlp"}, train=TRAIN,
                          analyze={"probe": False})
    model = train_mlp(root, prepared_digits, params)
    result = invoke("evaluate", "--params", params, "--data", prepared_digits, "--model", model, "--out", root / "eval")
    assert result.exit_code == 0, result.output
    return {"root": root, "params": params, "model": model, "data": prepared_digits}


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory, digits_run) -> dict:
    """An mlp with the digits run's model and train params, trained on 3 classes of 12x12 RGB images."""
    root = tmp_path_factory.mktemp("photo_model")
    for name, colour in (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200))):
        (root / "photos" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12 + i, 12), tuple(c + 3 * i for c in colour)).save(root / "photos" / name / f"{i}.png")
    params = write_params(root / "params.yaml", data={"dataset": "imagefolder", "root": str(root / "photos"),
                                                      "image_size": 12, "channels": 3},
                          model={"name": "mlp"}, train=TRAIN)
    result = invoke("prepare-data", "--params", params, "--out", root / "data")
    assert result.exit_code == 0, result.output
    return {"model": train_mlp(root, root / "data", params), "params": params}


# --- a model that does not fit the data --------------------------------------------------------


def test_evaluate_refuses_a_model_that_does_not_fit_the_data_in_one_line(tmp_path, digits_run, photo_model):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("the last good metrics\n")
    line = error_line(invoke("evaluate", "--params", digits_run["params"], "--data", digits_run["data"],
                             "--model", photo_model["model"], "--out", out))
    assert f"{photo_model['model']} does not fit {digits_run['data']}" in line
    assert "takes 3x12x12 images and 3 classes (blue, green, red)" in line
    assert "has 1x8x8 images and 10 classes (0, 1, 2, 3, 4, 5, ...)" in line
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == \
        "the last good metrics\n"


def test_analyze_refuses_a_model_that_does_not_fit_the_data_in_one_line(tmp_path, digits_run, photo_model):
    root = digits_run["root"]
    line = error_line(invoke("analyze", "--params", digits_run["params"], "--data", digits_run["data"],
                             "--model", photo_model["model"], "--train-metrics", root / "train",
                             "--eval-metrics", root / "eval", "--out", tmp_path / "report"))
    assert "does not fit" in line and "3x12x12" in line and "1x8x8" in line
    assert not (tmp_path / "report").exists()


def test_a_file_that_is_not_a_model_of_ours_is_one_line_for_every_consumer(tmp_path, digits_run):
    half = tmp_path / "half.safetensors"  # the format tag, but not what a model file must say
    save_tensors(half, {"w": torch.zeros(2)}, {"format": "stages.model/1", "model_name": "mlp"})
    split = digits_run["data"] / "test.safetensors"  # a safetensors file, but prepared data
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8), 128).save(image)
    for path, message in ((half, "is a damaged model file: its metadata has no valid 'num_classes'"),
                          (split, "is not a model weights file of this project")):
        line = error_line(invoke("predict", image, "--model", path, "--out", tmp_path / "p.csv"))
        assert f"error: {path} {message}" in line
        line = error_line(invoke("evaluate", "--params", digits_run["params"], "--data", digits_run["data"],
                                 "--model", path, "--out", tmp_path / "eval"))
        assert f"error: {path} {message}" in line
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "eval").exists()


# --- weights made by other params --------------------------------------------------------------


def test_the_weights_record_the_params_that_made_them_and_nothing_else(digits_run):
    from stages.model_file import read_metadata

    recorded = read_metadata(digits_run["model"])["params"]
    assert recorded["model.name"] == "mlp" and recorded["train.epochs"] == 1 and recorded["train.lr"] == 0.002
    launch_only = {"train.max_restarts", "train.dist_timeout", "model.download", "train.data_placement"}
    assert not launch_only & set(recorded) and all(key.startswith(("model.", "train.")) for key in recorded)
    assert "train.threads" in recorded and "train.lr" in recorded
    assert json.loads(json.dumps(recorded)) == recorded  # plain JSON values: no timestamps, paths of this run


def test_every_consumer_refuses_weights_that_other_params_made(tmp_path, digits_run, monkeypatch):
    root, model = digits_run["root"], digits_run["model"]
    edited = write_params(tmp_path / "params.yaml", model={"name": "mlp"},
                          train={**TRAIN, "lr": 0.009}, analyze={"probe": False})
    expected = f"{model} was trained with train.lr = 0.002 but {edited} has train.lr = 0.009; retrain with `dvc repro`"
    line = error_line(invoke("evaluate", "--params", edited, "--data", digits_run["data"], "--model", model,
                             "--out", tmp_path / "eval"))
    assert expected in line
    line = error_line(invoke("analyze", "--params", edited, "--data", digits_run["data"], "--model", model,
                             "--train-metrics", root / "train", "--eval-metrics", root / "eval",
                             "--out", tmp_path / "report"))
    assert expected in line
    image = tmp_path / "digit.png"
    Image.new("L", (8, 8), 128).save(image)
    line = error_line(invoke("predict", image, "--model", model, "--params", edited, "--out", tmp_path / "p.csv"))
    assert expected in line and "--no-check-params" in line
    assert not any((tmp_path / name).exists() for name in ("eval", "report", "p.csv"))
    # Without --params, the pipeline's own weights are compared with params.yaml (here, the edited one);
    # another model file is its own record.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(model, tmp_path / "models" / "model.safetensors")
    assert "train.lr = 0.002" in error_line(invoke("predict", image, "--out", "p.csv"))
    assert invoke("predict", image, "--out", "p.csv", "--no-check-params").exit_code == 0
    assert invoke("predict", image, "--model", model, "--out", "p.csv").exit_code == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    result = invoke("predict", image, "--model", model, "--out", "p.csv")
    assert result.exit_code == 0 and (tmp_path / "sub" / "p.csv").is_file(), result.output


def test_a_launch_only_param_does_not_make_the_weights_someone_elses(tmp_path, digits_run):
    edited = write_params(tmp_path / "params.yaml", model={"name": "mlp"},
                          train={**TRAIN, "max_restarts": 3, "data_placement": "stream"})
    result = invoke("evaluate", "--params", edited, "--data", digits_run["data"], "--model", digits_run["model"],
                    "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output


def test_a_model_file_without_recorded_params_is_refused_with_how_to_retrain(tmp_path, digits_run):
    model = load_model(digits_run["model"])
    old = tmp_path / "old.safetensors"
    save_model(old, model, {k: v for k, v in model.stages_metadata.items() if k != "params"})
    line = error_line(invoke("evaluate", "--params", digits_run["params"], "--data", digits_run["data"],
                             "--model", old, "--out", tmp_path / "eval"))
    assert "does not record the params that trained it" in line and "dvc repro" in line


# --- folders replaced whole -----------------------------------------------------------------------


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    from stages.io import staged_dir

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    (folder / "kept.txt").write_text("old")
    with pytest.raises(UserError), staged_dir(folder) as staged:
        (staged / "kept.txt").write_text("new")
        raise UserError("refused midway")
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt", "old.txt"]
    assert (folder / "kept.txt").read_text() == "old"
    with staged_dir(folder) as staged:
        (staged / "kept.txt").write_text("new")
        (staged / "sub").mkdir()
        (staged / "sub" / "new.txt").write_text("new")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["kept.txt", "sub", "sub/new.txt"]
    assert (folder / "kept.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing staged or retired is left beside it
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_behind_keeps_the_order_and_raises_a_failed_write_on_the_callers_thread(tmp_path):
    import threading

    from stages.io import WriteBehind

    done, threads = [], set()

    def write(i):
        threads.add(threading.current_thread().name)
        done.append(i)

    behind = WriteBehind()
    for i in range(50):
        behind.submit(write, i)
    behind.wait()
    assert done == list(range(50)) and threads == {"write-behind"}

    gate = threading.Event()

    def fail():
        gate.wait()  # both submitted before it fails
        raise OSError(28, "No space left on device")

    behind.submit(fail)
    behind.submit(write, 50)  # dropped: a write after a failure waits for the failure to be raised
    gate.set()
    with pytest.raises(OSError, match="No space"):
        behind.wait()
    assert done == list(range(50))
    behind.submit(write, 51)  # raised once; writing goes on
    behind.wait()
    assert done[-1] == 51
