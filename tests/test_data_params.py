"""The prepared data against params.yaml's data.* params: prepare-data records the params that made the
folder in its info.json, and every stage that reads the folder refuses one that other data params made
(or one that does not say), in one line, before it touches any output. `dvc repro` keeps the two
together through the stages' deps; a stage run by hand, `dvc commit` or `dvc exp save` does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from stages.params import validate

from .helpers import run_stages, write_params

TRAIN = {"epochs": 1, "accelerator": "cpu"}
MODEL = {"name": "mlp"}
OLD_OUTPUT = b"the last good output\n"


def refusal(proc) -> str:
    """The one `error: ...` line of a stage refused as a UserError: exit 2, nothing else on stderr."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stdout, proc.stderr
    return lines[0]


def mismatch_line(data: Path, params: Path, key: str, recorded: str, current: str) -> str:
    return (f"error: {data} was prepared with {key} = {recorded} but {params} has {key} = {current}; run `dvc repro` "
            "(or `python -m stages prepare-data`) so that the data matches the params")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared_digits) -> Path:
    """An mlp trained one epoch on the digits as prepared with the default data params."""
    root = tmp_path_factory.mktemp("data_params")
    params = write_params(root / "params.yaml", model=MODEL, train=TRAIN)
    model = root / "model.safetensors"
    run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model", str(model),
               "--metrics", str(root / "metrics"), "--checkpoint", str(root / "ck.safetensors"))
    return model


def test_train_refuses_data_prepared_with_other_params_and_keeps_the_model(tmp_path, prepared_digits, trained):
    model = tmp_path / "model.safetensors"
    shutil.copy(trained, model)
    before = model.read_bytes()
    params = write_params(tmp_path / "params.yaml", data={"val_fraction": 0.2}, model=MODEL, train=TRAIN)
    proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model", str(model),
                      "--metrics", str(tmp_path / "metrics"), "--checkpoint", str(tmp_path / "ck.safetensors"),
                      check=False)
    assert refusal(proc) == mismatch_line(prepared_digits, params, "data.val_fraction", "0.1", "0.2")
    assert model.read_bytes() == before
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "ck.safetensors").exists()


@pytest.mark.parametrize("stage", ["evaluate", "export"])
def test_consumers_of_the_weights_refuse_data_prepared_with_other_params(tmp_path, prepared_digits, trained, stage):
    """The weights match the params (same model.* and train.*); the prepared data does not."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    last_good = out_dir / ("metrics.json" if stage == "evaluate" else "model.onnx")
    last_good.write_bytes(OLD_OUTPUT)
    params = write_params(tmp_path / "params.yaml", data={"split_seed": 7}, model=MODEL, train=TRAIN)
    out = out_dir if stage == "evaluate" else last_good  # evaluate writes a folder, export a file
    proc = run_stages(stage, "--params", str(params), "--data", str(prepared_digits), "--model", str(trained),
                      "--out", str(out), check=False)
    assert refusal(proc) == mismatch_line(prepared_digits, params, "data.split_seed", "0", "7")
    assert [p.name for p in out_dir.iterdir()] == [last_good.name] and last_good.read_bytes() == OLD_OUTPUT


def test_prepared_data_without_the_record_is_refused_with_how_to_prepare_it_again(tmp_path, prepared_digits):
    info = json.loads((prepared_digits / "info.json").read_text())
    # The record: every data.* param that changes the prepared files, as the weights record theirs.
    assert info["params"] == validate({}).result_params(("data",))
    assert "data.dataset" in info["params"] and "data.download" not in info["params"]
    old = tmp_path / "prepared"
    shutil.copytree(prepared_digits, old)
    del info["params"]  # as an older version wrote it
    (old / "info.json").write_text(json.dumps(info))
    params = write_params(tmp_path / "params.yaml", model=MODEL, train=TRAIN)
    proc = run_stages("train", "--params", str(params), "--data", str(old), "--model", str(tmp_path / "m.safetensors"),
                      "--metrics", str(tmp_path / "metrics"), "--checkpoint", str(tmp_path / "ck.safetensors"),
                      check=False)
    assert refusal(proc) == (f"error: {old} does not record the data params that prepared it (prepared by an older "
                             "version); prepare it again with `python -m stages prepare-data` (or `dvc repro -f -s "
                             "prepare-data`)")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "metrics").exists()
