"""`python -m stages predict` on real image files: the labels evaluate gave, the CSV, bad files.

A model trained on the digits labels the test split again, this time from PNG and JPEG files
written here (at the digits' own 8x8 and at other sizes and modes); a model trained on an
image folder labels that folder's test files exactly as it labels the prepared test split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.core.transforms import normalize, stats_tensors
from stages.core.weights import load_model, save_model
from stages.prepared import load_prepared

from .helpers import run_stages, write_params
from .test_datasets import write_bad_images, write_class


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, prepared_digits) -> dict:
    """A small-cnn trained 4 epochs on the digits, and the evaluate stage's predictions for its test split."""
    root = tmp_path_factory.mktemp("digits_model")
    params = write_params(root / "params.yaml", train={"epochs": 4, "accelerator": "cpu"})
    model = root / "model.safetensors"
    run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model", str(model),
               "--metrics", str(root / "metrics"), "--checkpoint", str(root / "ck.safetensors"))
    run_stages("evaluate", "--params", str(params), "--data", str(prepared_digits), "--model", str(model),
               "--out", str(root / "eval"))
    with open(root / "eval" / "predictions.csv") as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)]
    images, labels, info = load_prepared(prepared_digits, "test")
    return {"model": model, "params": params, "evaluated": evaluated, "images": images, "labels": labels,
            "class_names": info["class_names"]}


def probabilities(model_path: Path, images: torch.Tensor) -> torch.Tensor:
    """The model's class probabilities for prepared uint8 images, computed here without predict."""
    model = load_model(model_path)
    mean, std = stats_tensors(model.stages_metadata["mean"], model.stages_metadata["std"], torch.device("cpu"))
    with torch.no_grad():
        return torch.softmax(model(normalize(images, mean, std)), dim=1)


def write_digit_files(folder: Path, images: torch.Tensor, size: int, mode: str, ext: str) -> list[Path]:
    """Each test digit as an image file, nested 100 to a folder: test image i is <folder>/<i // 100>/<i>.<ext>."""
    paths = []
    for i, pixels in enumerate(images[:, 0].numpy()):
        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST).convert(mode)
        path = folder / str(i // 100) / f"{i:04d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95) if ext == ".jpg" else img.save(path)
        paths.append(path)
    return paths


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_predict_labels_digit_files_as_evaluate_did(tmp_path, digits_model):
    images = digits_model["images"]
    paths = write_digit_files(tmp_path / "digits", images, size=8, mode="L", ext=".png")
    (tmp_path / "digits" / "README.txt").write_text("not an image: ignored with a warning")
    out = tmp_path / "predictions.csv"
    proc = run_stages("predict", str(tmp_path / "digits"), "--model", str(digits_model["model"]), "--out", str(out),
                      "--top-k", "3", "--batch-size", "100", "--params", str(digits_model["params"]))
    assert f"labelled {len(paths)} images on the cpu -> {out}" in proc.stdout
    assert "ignored 1 file under" in proc.stderr
    header, rows = read_csv(out)
    assert header == ["path", "predicted", "probability", "class_2", "probability_2", "class_3", "probability_3"]
    assert [row["path"] for row in rows] == [str(p) for p in paths]  # every file, folders walked in order
    # the same labels the evaluate stage gave the same images from the prepared split
    assert [row["predicted"] for row in rows] == digits_model["evaluated"]
    # and the same probabilities, to the CSV's 6 decimals
    expected = probabilities(digits_model["model"], images).topk(3, dim=1)
    names = digits_model["class_names"]
    for row, probs, classes in zip(rows, expected.values, expected.indices):
        assert [row["predicted"], row["class_2"], row["class_3"]] == [names[c] for c in classes]
        got = [float(row["probability"]), float(row["probability_2"]), float(row["probability_3"])]
        assert got == pytest.approx(probs.tolist(), abs=1e-6)
        assert got == sorted(got, reverse=True) and sum(got) <= 1 + 1e-5


@pytest.mark.parametrize("size, mode, ext", [(32, "RGB", ".png"), (24, "L", ".jpg")])
def test_predict_resizes_and_converts_other_files_like_prepare_data(tmp_path, digits_model, size, mode, ext):
    """Digits stored larger, in colour or as JPEG are brought back to 8x8 grey: nearly every label agrees."""
    images = digits_model["images"]
    write_digit_files(tmp_path / "digits", images, size=size, mode=mode, ext=ext)
    out = tmp_path / "p.csv"
    run_stages("predict", str(tmp_path / "digits"), "--model", str(digits_model["model"]), "--out", str(out),
               "--params", str(digits_model["params"]))
    header, rows = read_csv(out)
    assert header == ["path", "predicted", "probability"] and len(rows) == len(images)
    agree = np.mean([row["predicted"] == e for row, e in zip(rows, digits_model["evaluated"])])
    names = digits_model["class_names"]
    accuracy = np.mean([row["predicted"] == names[y] for row, y in zip(rows, digits_model["labels"].tolist())])
    assert agree >= 0.9 and accuracy >= 0.85, (agree, accuracy)
    assert all(0 < float(row["probability"]) <= 1 for row in rows)


def test_predict_gives_an_image_folder_model_its_prepared_inputs_exactly(tmp_path):
    """RGB model, files of mixed modes, formats and sizes: predict's inputs are prepare-data's, bit for bit."""
    root = tmp_path / "photos"
    for name, level in (("dark", 40), ("light", 220), ("mid", 128)):
        write_class(root / "train" / name, level, 8)
        write_class(root / "test" / name, level, 5, nested=True)
    params = write_params(tmp_path / "params.yaml", data={"dataset": "imagefolder", "root": str(root),
                                                         "image_size": 12, "channels": 3},
                          model={"name": "mlp"}, train={"epochs": 1, "batch_size": 8, "accelerator": "cpu"})
    prepared, model = tmp_path / "prepared", tmp_path / "model.safetensors"
    run_stages("prepare-data", "--params", str(params), "--out", str(prepared))
    run_stages("train", "--params", str(params), "--data", str(prepared), "--model", str(model),
               "--metrics", str(tmp_path / "m"), "--checkpoint", str(tmp_path / "ck.safetensors"))
    out = tmp_path / "p.csv"
    run_stages("predict", str(root / "test"), "--model", str(model), "--out", str(out), "--top-k", "3",
               "--params", str(params))
    _, rows = read_csv(out)
    images, labels, info = load_prepared(prepared, "test")
    assert len(rows) == len(labels) == 15
    expected = probabilities(model, images).topk(3, dim=1)
    for row, label, probs, classes in zip(rows, labels.tolist(), expected.values, expected.indices):
        assert Path(row["path"]).relative_to(root / "test").parts[0] == info["class_names"][label]  # same order
        got = [float(row["probability"]), float(row["probability_2"]), float(row["probability_3"])]
        assert got == pytest.approx(probs.tolist(), abs=1e-6)
        assert [row["predicted"], row["class_2"], row["class_3"]] == [info["class_names"][c] for c in classes]


def test_unreadable_files_are_refused_by_name_or_skipped_on_request(tmp_path, digits_model):
    folder = tmp_path / "mixed"
    write_digit_files(folder, digits_model["images"][:5], size=8, mode="L", ext=".png")
    bad = write_bad_images(folder / "bad")
    out = tmp_path / "p.csv"
    earlier = "path,predicted,probability\nold.png,3,0.500000\n"  # an earlier run's CSV
    out.write_text(earlier)
    refused = run_stages("predict", str(folder), "--model", str(digits_model["model"]), "--out", str(out),
                         "--params", str(digits_model["params"]), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: cannot read image {folder / 'bad'}")
    assert "--skip-bad-images" in refused.stderr
    assert out.read_text() == earlier  # nothing written over it
    skipped = run_stages("predict", str(folder), "--model", str(digits_model["model"]), "--out", str(out),
                         "--skip-bad-images", "--params", str(digits_model["params"]))
    for path in bad:
        assert f"warning: skipped unreadable image {path}" in skipped.stderr
    _, rows = read_csv(out)
    assert [row["predicted"] for row in rows] == digits_model["evaluated"][:5]
    assert "labelled 5 images" in skipped.stdout and "3 unreadable files skipped" in skipped.stdout


runner = CliRunner()


def test_bad_arguments_are_one_line_errors(tmp_path, digits_model):
    image = write_digit_files(tmp_path / "one", digits_model["images"][:1], size=8, mode="L", ext=".png")[0]
    cases = [
        ([str(tmp_path / "missing.png")], f"{tmp_path / 'missing.png'} does not exist"),
        ([str(image), "--top-k", "11"], "--top-k 11 is more than the model's 10 classes"),
        ([str(tmp_path / "one"), "--model", str(tmp_path / "none.safetensors")], "none.safetensors does not exist"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(([str(empty)], "no image files in"))
    old = tmp_path / "old.safetensors"  # a model file from before image_mode / resize were recorded
    model = load_model(digits_model["model"])
    meta = {k: v for k, v in model.stages_metadata.items() if k not in ("image_mode", "resize")}
    save_model(old, model, meta)
    cases.append(([str(image), "--model", str(old)], "does not say how its images were prepared"))
    for args, message in cases:
        if "--model" not in args:
            args = args + ["--model", str(digits_model["model"])]
        result = runner.invoke(app, ["predict", *args, "--out", str(tmp_path / "p.csv"),
                                     "--params", str(digits_model["params"])])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "p.csv").exists()
