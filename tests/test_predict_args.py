"""What `python -m stages predict` refuses before any work, in one line: an --out it must not write, a
--model that is a folder or does not exist, a weights file where torch cannot be imported, an ONNX export
older than the weights beside it; and how unreadable files are reported.

The models are small, untrained (what is checked is the command's refusals, not its labels): a small-cnn
weights file for the digits' 8x8 grey images, and a real ONNX model built with onnx.helper (one Gemm)
with the metadata_props the export stage writes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.core.models import build_model
from stages.core.weights import save_model
from stages.model_file import model_metadata, trained_params
from stages.onnx_model import INPUT_NAME, OUTPUT_NAME, onnx_metadata
from stages.params import validate

from .helpers import ROOT, error_line, write_params

runner = CliRunner()

INFO = {"num_classes": 10, "shape": [1, 8, 8], "class_names": [str(i) for i in range(10)], "mean": [0.3],
        "std": [0.35], "dataset": "digits", "image_mode": "L", "resize": "stretch"}


def weights_file(path: Path, epochs: int = 1) -> Path:
    """An untrained small-cnn weights file that records train.epochs = `epochs` (the other params: defaults)."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 8, 10).eval()
    recorded = trained_params(validate({"train": {"epochs": epochs}}))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, model, model_metadata("small-cnn", INFO, params=recorded))
    return path


def onnx_file(path: Path, epochs: int = 1) -> Path:
    """An ONNX model (flatten, one Gemm to 10 logits) with the metadata_props of an export of weights that
    recorded train.epochs = `epochs`."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(64, 10)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(10, np.float32), "bias")
    images = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["n", 1, 8, 8])
    logits = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["n", 10])
    nodes = [helper.make_node("Flatten", [INPUT_NAME], ["flat"]),
             helper.make_node("Gemm", ["flat", "weight", "bias"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, "gemm", [images], [logits], initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = model_metadata("small-cnn", INFO, params=trained_params(validate({"train": {"epochs": epochs}})))
    for key, value in onnx_metadata(meta, hashlib.sha256(b"weights").hexdigest()).items():
        model.metadata_props.add(key=key, value=value)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def image_folder(folder: Path, n: int = 3) -> list[Path]:
    """`n` small grey PNG files and one JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / (f"{i}.png" if i else "rgb.jpg")
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").convert("RGB" if not i else "L").save(path)
        paths.append(path)
    return paths


def predict(*args: str):
    return runner.invoke(app, ["predict", *args])


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A folder to run predict in: imgs/ of images and a weights file w.safetensors (not the pipeline's own)."""
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "imgs")
    weights_file(tmp_path / "w.safetensors")
    return tmp_path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_an_out_that_is_a_folder_is_refused_before_any_work(workspace):
    for out, shown in (("imgs", "imgs"), ("", "."), (str(workspace / "imgs"), str(workspace / "imgs"))):
        result = predict("imgs", "--model", "w.safetensors", "--out", out)
        line = error_line(result)
        assert line == (f"error: --out {shown} is a folder; give the CSV file to write, e.g. --out "
                        f"{Path(shown) / 'predictions.csv'}"), line
        assert "labelled" not in result.stdout and leftovers(workspace) == []
    assert predict("imgs", "--model", "w.safetensors", "--out", "imgs.csv").exit_code == 0  # the fix it names


def test_an_out_that_is_an_input_image_or_a_file_predict_did_not_write_is_left_alone(workspace):
    gray, rgb = workspace / "imgs" / "1.png", workspace / "imgs" / "rgb.jpg"
    notes = workspace / "notes.txt"
    notes.write_text("the user's own notes\n")
    before = {path: path.read_bytes() for path in (gray, rgb, notes)}
    os.mkfifo(workspace / "pipe")
    (workspace / "link.csv").symlink_to(gray)
    cases = [
        ([str(gray)], str(rgb), "has an image file's extension; the output is a CSV: give a .csv file"),
        ([str(gray), str(rgb)], str(rgb), "is one of the images to label; give another file for the CSV"),
        (["imgs"], "link.csv", "is one of the images to label"),  # a link to one of them
        (["imgs"], "imgs/0.png", "has an image file's extension"),  # would be read as an image next time
        (["imgs"], str(notes), "exists and is not a CSV that predict wrote (its first line is not "
                               "path,predicted,probability,...); predict overwrites only its own CSVs"),
        (["imgs"], "pipe", "exists and is not a regular file"),  # a named pipe (as /dev/null is a device)
        (["imgs"], "notes.txt/p.csv", "cannot be written: notes.txt is a file, not a folder"),
    ]
    for inputs, out, message in cases:
        line = error_line(predict(*inputs, "--model", "w.safetensors", "--out", out))
        assert line.startswith(f"error: --out {out} ") and message in line, line
    assert {path: path.read_bytes() for path in before} == before
    assert not (workspace / "imgs" / "0.png").exists() and leftovers(workspace) == []
    # An earlier predictions CSV, and an empty file, are overwritten as before.
    out = workspace / "p.csv"
    for earlier in ("path,predicted,probability\nold.png,3,0.5\n", ""):
        out.write_text(earlier)
        result = predict("imgs", "--model", "w.safetensors", "--out", str(out))
        assert result.exit_code == 0 and "labelled 3 images" in result.stdout, result.output
        assert len(out.read_text().splitlines()) == 4


def test_a_model_folder_or_missing_model_file_says_what_to_give(workspace):
    Path("models").mkdir()
    onnx_file(Path("models/model.onnx"))
    line = error_line(predict("imgs", "--model", "models", "--out", "p.csv"))
    assert line == ("error: --model models is a folder holding model.onnx; give a model file: the .safetensors "
                    "weights the train stage wrote or their .onnx export, e.g. --model models/model.onnx")
    empty = Path("empty")
    empty.mkdir()
    line = error_line(predict("imgs", "--model", "empty", "--out", "p.csv"))
    assert line.endswith("is a folder; give a model file: the .safetensors weights the train stage wrote or their "
                         ".onnx export, e.g. --model empty/model.safetensors"), line
    line = error_line(predict("imgs", "--model", "models/model.onx", "--out", "p.csv"))
    assert line == "error: --model models/model.onx does not exist; did you mean models/model.onnx?"
    line = error_line(predict("imgs", "--model", "elsewhere.safetensors", "--out", "p.csv"))
    assert line == ("error: --model elsewhere.safetensors does not exist; give a model file: the .safetensors "
                    "weights the train stage wrote or their .onnx export")
    # The pipeline's own weights, not there yet (a fresh clone): both ways to get them.
    for args in ((), ("--model", "models/model.safetensors"), ("--model", str(workspace / "models/model.safetensors"))):
        line = error_line(predict("imgs", *args, "--out", "p.csv"))
        assert "models/model.safetensors does not exist yet: fetch it with `dvc pull` (if your team shares a DVC " \
               "remote) or make it with `dvc repro`" in line, line
    assert not Path("p.csv").exists()
    weights_file(Path("models/model.safetensors"))
    line = error_line(predict("imgs", "--model", "models", "--out", "p.csv"))
    assert "models is a folder holding model.safetensors, model.onnx;" in line and \
           line.endswith("e.g. --model models/model.safetensors"), line  # the default model first


SHIM = """import sys
for name in ("torch", "torchvision"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
"""


def test_a_weights_file_where_torch_cannot_be_imported_is_one_line_naming_the_onnx_way(workspace):
    (workspace / "shim").mkdir()
    (workspace / "shim" / "sitecustomize.py").write_text(SHIM)
    onnx_file(workspace / "w.onnx")
    env = {"PYTHONPATH": f"{workspace / 'shim'}{os.pathsep}{ROOT}", "PATH": os.environ["PATH"]}

    def run(model: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stages", "predict", "imgs", "--model", model, "--out", "p.csv"],
                              cwd=workspace, env=env, capture_output=True, text=True, timeout=120)

    refused = run("w.safetensors")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: w.safetensors is a PyTorch weights file, and torch cannot be imported "
                                     "here (")
    assert "or label with the ONNX export, which needs no torch: --model w.onnx (pip install -r " \
           "requirements-serve.txt" in refused.stderr
    assert not (workspace / "p.csv").exists()
    works = run("w.onnx")  # the way it names works in the same Python
    assert works.returncode == 0 and "labelled 3 images" in works.stdout, works.stderr


def test_a_stale_onnx_export_is_named_as_the_stale_file(workspace):
    """After `dvc exp run -S train.epochs=2 -S export.atol=0 ...`: the weights were retrained, the export refused."""
    write_params(Path("params.yaml"), train={"epochs": 2})
    onnx_file(Path("models/model.onnx"), epochs=1)
    weights_file(Path("models/model.safetensors"), epochs=2)
    line = error_line(predict("imgs", "--model", "models/model.onnx", "--out", "p.csv"))
    assert line == ("error: models/model.onnx was exported from weights trained with train.epochs = 1, but "
                    "models/model.safetensors and params.yaml have train.epochs = 2: the ONNX export is older than "
                    "the weights (the export stage failed or has not run since they were trained); export again "
                    "with `dvc repro`, which reruns the export stage; or pass --no-check-params to label with it "
                    "anyway"), line
    # Weights and export both from other params: both are remade.
    weights_file(Path("models/model.safetensors"), epochs=1)
    line = error_line(predict("imgs", "--model", "models/model.onnx", "--out", "p.csv"))
    assert line == ("error: models/model.onnx was exported from weights trained with train.epochs = 1 but "
                    "params.yaml has train.epochs = 2; retrain and export again with `dvc repro` (or `dvc exp run`) "
                    "so that the model matches the params; or pass --no-check-params to label with it anyway"), line
    line = error_line(predict("imgs", "--out", "p.csv"))  # the weights themselves: retraining is the fix
    assert line.startswith("error: models/model.safetensors was trained with train.epochs = 1 but params.yaml has "
                           "train.epochs = 2; retrain with `dvc repro`"), line
    assert not Path("p.csv").exists()


def test_unreadable_files_are_named_with_their_reason_in_one_sentence(workspace, monkeypatch):
    bad = workspace / "bad.png"
    bad.write_bytes(b"not a png")
    line = error_line(predict(str(bad), "--model", "w.safetensors", "--out", "p.csv", "--skip-bad-images"))
    assert line.startswith(f"error: {bad}, the only file to label, could not be read as an image: "), line
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 images are then over twice the limit
    line = error_line(predict("imgs", "--model", "w.safetensors", "--out", "p.csv"))
    assert line.startswith(f"error: cannot read image {Path('imgs/1.png')}: Image size (64 pixels) exceeds limit"), line
    assert "decompression bomb DOS attack; fix or remove it" in line, line
    line = error_line(predict("imgs", "--model", "w.safetensors", "--out", "p.csv", "--skip-bad-images"))
    assert line.startswith("error: none of the 3 files could be read as an image (the first, imgs/1.png: Image "
                           "size (64 pixels) exceeds limit"), line
