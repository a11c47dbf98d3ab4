"""Ctrl-C is an interruption, never a bad file: where a stage turns a library's errors into a one-line
refusal or a skipped file, a library's error raised from a KeyboardInterrupt (as torch's exporter raises
one) is the KeyboardInterrupt again, which the CLI reports as `error: interrupted`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import stages.images
import stages.sources
from stages.core.pretrained import read_state_dict
from stages.images import decode_image
from stages.io import load_tensors
from stages.onnx_model import open_onnx
from stages.sources import FileRows


def wrapped_interrupt(*args, **kwargs):
    """What a library does that catches everything: its own error, raised while handling a Ctrl-C."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        raise RuntimeError("the library's own error") from exc


def test_an_error_raised_from_or_during_an_interrupt_is_the_interrupt():
    from stages.errors import reraise_interrupt

    for link in ("__cause__", "__context__"):
        deep = ValueError("outer")
        middle = OSError("middle")
        setattr(deep, link, middle)
        setattr(middle, link, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            reraise_interrupt(deep)
    plain = ValueError("a damaged file")
    plain.__context__ = OSError("no interrupt here")
    reraise_interrupt(plain)  # nothing raised: a real error stays a real error


def png(path: Path) -> Path:
    Image.new("RGB", (12, 12), (200, 10, 10)).save(path)
    return path


def test_decoding_interrupted_is_not_a_bad_image(tmp_path, monkeypatch):
    """predict's decoder and prepare-data's (with skip_bad_images, a bad file is skipped and named)."""
    image = str(png(tmp_path / "a.png"))
    monkeypatch.setattr(stages.images, "open_resized", wrapped_interrupt)
    with pytest.raises(KeyboardInterrupt):
        decode_image(image, "RGB", 8, "crop")
    monkeypatch.setattr(stages.sources, "open_resized", wrapped_interrupt)
    rows = FileRows({"train": [image]}, "RGB", 8, "crop")
    with pytest.raises(KeyboardInterrupt):
        rows.fill("train", np.array([0]), np.zeros((1, 3, 8, 8), np.uint8), None)


def test_reading_pretrained_weights_interrupted_is_not_a_damaged_file(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "load", wrapped_interrupt)
    with pytest.raises(KeyboardInterrupt):
        read_state_dict(path)


def test_opening_model_files_interrupted_is_not_a_damaged_file(tmp_path, monkeypatch):
    import onnxruntime
    import safetensors

    (tmp_path / "model.onnx").write_bytes(b"any")
    monkeypatch.setattr(onnxruntime, "InferenceSession", wrapped_interrupt)
    with pytest.raises(KeyboardInterrupt):
        open_onnx(tmp_path / "model.onnx")
    (tmp_path / "model.safetensors").write_bytes(b"any")
    monkeypatch.setattr(safetensors, "safe_open", wrapped_interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_tensors(tmp_path / "model.safetensors")
