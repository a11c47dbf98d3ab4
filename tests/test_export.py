"""The export stage and predict from ONNX: real models exported by torch's dynamo exporter and run in
ONNX Runtime, compared with PyTorch on the digits' test split; predict's CSV from the ONNX file against
the one from the weights file; damaged and foreign ONNX files; predict in a Python without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from stages.core.models import build_model
from stages.core.transforms import normalize, stats_tensors
from stages.core.weights import load_model, save_model
from stages.model_file import model_metadata, read_metadata, trained_params
from stages.onnx_model import FORMAT
from stages.params import validate
from stages.prepared import load_prepared

from .helpers import ROOT, error_line, run_stages, write_params
from .test_predict import read_csv, write_digit_files

runner = CliRunner()


def train(root: Path, prepared: Path, name: str, epochs: int) -> Path:
    """`python -m stages train` of model `name` on the prepared digits, on the CPU: the weights file."""
    params = write_params(root / f"{name}.yaml", model={"name": name}, train={"epochs": epochs, "accelerator": "cpu"})
    model = root / f"{name}.safetensors"
    run_stages("train", "--params", str(params), "--data", str(prepared), "--model", str(model),
               "--metrics", str(root / f"{name}-metrics"), "--checkpoint", str(root / f"{name}-ck.safetensors"))
    return model


def export(tmp_path: Path, weights: Path, prepared: Path, out: Path, **export_params):
    """`python -m stages export` with the model.* and train.* params the weights record, as in the pipeline
    (export, like every consumer of the weights, refuses weights that other params made)."""
    sections: dict[str, dict] = {"model": {}, "train": {}}
    for key, value in read_metadata(weights)["params"].items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    params = write_params(tmp_path / "export-params.yaml", export=export_params, **sections)
    return runner.invoke(app, ["export", "--params", str(params), "--model", str(weights), "--data", str(prepared),
                               "--out", str(out)])


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory, prepared_digits) -> dict:
    """The default model (small-cnn) trained 2 epochs on the digits, and its export."""
    root = tmp_path_factory.mktemp("export")
    weights = train(root, prepared_digits, "small-cnn", epochs=2)
    result = export(root, weights, prepared_digits, root / "model.onnx")
    assert result.exit_code == 0, result.output
    return {"root": root, "weights": weights, "onnx": root / "model.onnx", "stdout": result.stdout}


def torch_and_onnx_logits(weights: Path, onnx_file: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The logits of the weights in PyTorch and of the ONNX file in ONNX Runtime, for prepared uint8 images."""
    model = load_model(weights)
    mean, std = stats_tensors(model.stages_metadata["mean"], model.stages_metadata["std"], torch.device("cpu"))
    x = normalize(images, mean, std)
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    return expected, session.run(None, {"images": x.numpy()})[0]


def assert_agree(expected: np.ndarray, got: np.ndarray, scale: float = 0.5) -> None:
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)  # the stage's default tolerance
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert np.abs(expected).max() > scale  # logits of a working model, not the near-zeros of a dead one


def test_default_model_exports_and_agrees_with_pytorch_on_the_test_split(digits_onnx, prepared_digits):
    images, _, info = load_prepared(prepared_digits, "test")
    assert f"ONNX Runtime matches PyTorch on {len(images)} test images" in digits_onnx["stdout"]
    expected, got = torch_and_onnx_logits(digits_onnx["weights"], digits_onnx["onnx"], images)
    assert_agree(expected, got)

    proto = onnx.load(str(digits_onnx["onnx"]))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["format"] == FORMAT and meta["model_name"] == "small-cnn"
    assert meta["class_names"] == info["class_names"] and meta["input_shape"] == info["shape"]
    assert (meta["image_mode"], meta["resize"], meta["mean"], meta["std"]) == (
        info["image_mode"], info["resize"], info["mean"], info["std"])
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # a named, free batch dimension
    # and ONNX Runtime takes any batch: one image, and an odd number
    session = ort.InferenceSession(str(digits_onnx["onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        assert session.run(None, {"images": np.zeros((n, 1, 8, 8), np.float32)})[0].shape == (n, 10)


def test_same_weights_give_the_same_bytes(digits_onnx, prepared_digits, tmp_path):
    again = export(tmp_path, digits_onnx["weights"], prepared_digits, tmp_path / "again.onnx")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.onnx").read_bytes() == digits_onnx["onnx"].read_bytes()


def initialised_model(path: Path, name: str, prepared: Path) -> Path:
    """A weights file of torchvision model `name` for the digits, initialised (not trained: what is compared is
    ONNX Runtime against PyTorch on the same weights), its BatchNorm statistics those of the train split, so
    that activations and logits have the scale of a trained model's rather than an initialisation's."""
    images, _, info = load_prepared(prepared, "train")
    torch.manual_seed(0)
    model = build_model(name, 1, 8, info["num_classes"])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    mean, std = stats_tensors(info["mean"], info["std"], torch.device("cpu"))
    model.train()
    with torch.no_grad():
        for start in range(0, 1024, 256):
            model(normalize(images[start : start + 256], mean, std))
    recorded = trained_params(validate({"model": {"name": name}}))  # as if trained with defaults
    save_model(path, model.eval(), model_metadata(name, info, params=recorded))
    return path


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_families_export_and_agree_with_pytorch(tmp_path, prepared_digits, name):
    weights = initialised_model(tmp_path / f"{name}.safetensors", name, prepared_digits)
    result = export(tmp_path, weights, prepared_digits, tmp_path / "model.onnx")
    assert result.exit_code == 0, result.output
    images, _, _ = load_prepared(prepared_digits, "test")
    expected, got = torch_and_onnx_logits(weights, tmp_path / "model.onnx", images)
    assert_agree(expected, got, scale=0.1)
    assert len(set(expected.argmax(1).tolist())) > 1  # the images are told apart, not given one answer


def test_a_disagreement_is_one_line_naming_the_largest_difference_and_writes_nothing(
        digits_onnx, prepared_digits, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the last good export")
    # No tolerance at all: float rounding between ONNX Runtime's and PyTorch's kernels is then a difference.
    result = export(tmp_path, digits_onnx["weights"], prepared_digits, out, atol=0.0, rtol=0.0)
    line = error_line(result)
    assert "small-cnn's ONNX export does not match PyTorch: logit of class" in line
    assert "on test image" in line and "allowed export.atol 0 + export.rtol 0" in line, line
    assert "models/model.onnx was not written" in line
    assert out.read_bytes() == b"the last good export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.onnx")] == []  # no temporary left


def test_predict_from_onnx_gives_the_csv_of_the_weights_file(digits_onnx, prepared_digits, tmp_path):
    images, _, _ = load_prepared(prepared_digits, "test")
    paths = write_digit_files(tmp_path / "digits", images, size=24, mode="RGB", ext=".png")
    csvs = {}
    for model in (digits_onnx["weights"], digits_onnx["onnx"]):
        out = tmp_path / f"{model.suffix[1:]}.csv"
        result = runner.invoke(app, ["predict", str(tmp_path / "digits"), "--model", str(model), "--out", str(out),
                                     "--top-k", "3", "--batch-size", "100"])
        assert result.exit_code == 0, result.output
        csvs[model.suffix] = read_csv(out)
    (header, rows), (onnx_header, onnx_rows) = csvs[".safetensors"], csvs[".onnx"]
    assert onnx_header == header and len(onnx_rows) == len(rows) == len(paths)
    for row, onnx_row in zip(rows, onnx_rows):
        # paths and classes equal; probabilities equal to the CSV's 6 decimals, give or take the last digit's
        # rounding (softmax in numpy, not torch)
        assert {k: v for k, v in onnx_row.items() if "probability" not in k} == \
               {k: v for k, v in row.items() if "probability" not in k}
        for key in ("probability", "probability_2", "probability_3"):
            assert float(onnx_row[key]) == pytest.approx(float(row[key]), abs=2e-6)


def test_predict_from_onnx_runs_in_a_python_where_torch_cannot_be_imported(digits_onnx, prepared_digits, tmp_path):
    images, _, _ = load_prepared(prepared_digits, "test")
    write_digit_files(tmp_path / "digits", images[:20], size=8, mode="L", ext=".png")
    out = tmp_path / "p.csv"
    code = f"""
import sys
for name in ("torch", "torchvision", "safetensors"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
from stages.cli import app
try:
    app(["predict", {str(tmp_path / "digits")!r}, "--model", {str(digits_onnx["onnx"])!r}, "--out", {str(out)!r}])
except SystemExit as exc:
    assert not exc.code, exc.code
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"labelled 20 images on the cpu (ONNX Runtime) -> {out}" in proc.stdout
    with_torch = tmp_path / "with-torch.csv"
    run_stages("predict", str(tmp_path / "digits"), "--model", str(digits_onnx["onnx"]), "--out", str(with_torch))
    assert out.read_text() == with_torch.read_text()


def params_of(weights: Path, path: Path, **changed) -> Path:
    """A params file with the model.* and train.* values the weights record, `changed` ("train.epochs": 3) put in."""
    sections: dict[str, dict] = {"model": {}, "train": {}}
    for key, value in {**read_metadata(weights)["params"], **changed}.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    return write_params(path, **sections)


def test_the_onnx_file_is_checked_against_the_params_as_the_weights_file_is(digits_onnx, tmp_path, monkeypatch):
    weights, model = digits_onnx["weights"], digits_onnx["onnx"]
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(model)).metadata_props}
    assert meta["params"] == read_metadata(weights)["params"]  # the weights' record, in the same form
    image = write_digit_files(tmp_path / "one", torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 8, "L", ".png")[0]
    same = params_of(weights, tmp_path / "same.yaml")
    other = params_of(weights, tmp_path / "other.yaml", **{"train.epochs": 3})

    def predict(model_file: Path, *args: str):
        return runner.invoke(app, ["predict", str(image), "--model", str(model_file), "--out", "p.csv", *args])

    monkeypatch.chdir(tmp_path)
    for model_file, made in ((weights, "was trained"), (model, "was exported from weights trained")):
        line = error_line(predict(model_file, "--params", str(other)))  # the same rule for both formats
        fix = "retrain" if model_file == weights else "retrain and export again"
        what = "weights match" if model_file == weights else "model matches"
        assert line == (f"error: {model_file} {made} with train.epochs = 2 but {other} has train.epochs = 3; "
                        f"{fix} with `dvc repro` (or `dvc exp run`) so that the {what} the params; "
                        "or pass --no-check-params to label with it anyway")
        assert not Path("p.csv").exists()  # refused before anything is written
        assert predict(model_file, "--params", str(other), "--no-check-params").exit_code == 0
        result = predict(model_file, "--params", str(same))
        assert result.exit_code == 0 and "labelled 1 image" in result.stdout, result.output
        Path("p.csv").unlink()

    # Without --params: the pipeline's own model files beside a params.yaml are checked, by the same rule for
    # both formats; a copy under another name is its own record.
    shutil.copy(other, "params.yaml")
    Path("models").mkdir()
    for model_file, own in ((weights, "models/model.safetensors"), (model, "models/model.onnx")):
        shutil.copy(model_file, own)
        shutil.copy(model_file, f"copy{model_file.suffix}")
        assert "train.epochs = 2 but params.yaml has train.epochs = 3" in error_line(predict(Path(own)))
        assert predict(Path(f"copy{model_file.suffix}")).exit_code == 0
    shutil.copy(same, "params.yaml")
    assert predict(Path("models/model.onnx")).exit_code == 0


def test_damaged_and_foreign_onnx_files_are_refused_in_one_line(digits_onnx, tmp_path):
    image = write_digit_files(tmp_path / "one", torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 8, "L", ".png")[0]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(digits_onnx["onnx"].read_bytes()[:5000])
    text = tmp_path / "text.onnx"
    text.write_text("not a model\n")
    # A valid ONNX model this project did not write: y = x, no metadata of ours.
    foreign = tmp_path / "foreign.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, 8, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 1, 8, 8])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), foreign)
    cases = [(truncated, "is damaged or not an ONNX model"), (text, "is damaged or not an ONNX model"),
             (foreign, f"is an ONNX model but not one this project's export stage wrote (no format '{FORMAT}'")]
    for model, message in cases:
        out = tmp_path / "p.csv"
        result = runner.invoke(app, ["predict", str(image), "--model", str(model), "--out", str(out)])
        line = error_line(result)
        assert line.startswith(f"error: {model} {message}"), line
        assert not out.exists()


def test_the_serve_requirements_are_the_serve_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    listed = [line.strip() for line in (ROOT / "requirements-serve.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == extra


def test_ctrl_c_during_the_export_is_an_interruption_not_a_refused_model(digits_onnx, prepared_digits, tmp_path,
                                                                         monkeypatch):
    """torch's dynamo exporter catches a KeyboardInterrupt while it traces and raises its own error from it."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the last good export")

    def interrupted_export(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # as torch.export wraps it: raised from, inside a handler
            raise RuntimeError("Failed to export the model with torch.export. This is step 1/3") from exc

    monkeypatch.setattr(torch.onnx, "export", interrupted_export)
    result = export(tmp_path, digits_onnx["weights"], prepared_digits, out)
    assert error_line(result) == "error: interrupted"
    assert out.read_bytes() == b"the last good export"
