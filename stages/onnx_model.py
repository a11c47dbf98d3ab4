"""The ONNX model file (`models/model.onnx`, written by the export stage): its metadata and how it is opened.

The graph maps normalised float32 images (N, C, H, W), N free, to logits (N, classes). What a
user needs to prepare an image and name the result is in the model's `metadata_props`, one JSON
value a key, as in the weights file's metadata (`stages/model_file.py`): the format tag, the
model name, the class names, the input shape, `image_mode`, `resize`, mean and std (in [0, 1]
units), the dataset, `params` (the model.* and train.* params that trained the weights, the weights
file's own record, so that predict checks an ONNX file against params.yaml as it checks the weights),
and the sha256 of the weights file it was exported from.

This module imports no torch: predict's ONNX path opens the file with ONNX Runtime alone, so it
starts fast and runs where torch is not installed (onnxruntime, numpy and Pillow suffice).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError, first_line, reraise_interrupt

FORMAT = "stages.onnx/1"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# The weights file's metadata that predict needs, copied into metadata_props (and nothing that varies per run).
COPIED_KEYS = ("model_name", "num_classes", "input_shape", "class_names", "mean", "std", "dataset", "image_mode",
               "resize", "params")


def onnx_metadata(weights_meta: dict, weights_sha256: str) -> dict[str, str]:
    """metadata_props for a model exported from a weights file with this metadata: key -> JSON text, sorted."""
    meta = {"format": FORMAT, "weights_sha256": weights_sha256}
    meta.update({key: weights_meta[key] for key in COPIED_KEYS if key in weights_meta})
    return {key: json.dumps(meta[key], sort_keys=True) for key in sorted(meta)}


def open_onnx(path: str | Path, threads: int = 0):
    """(an onnxruntime InferenceSession, the metadata) for an ONNX file the export stage wrote.

    A damaged file, or an ONNX model this project did not export, is a UserError of one line.
    threads: ONNX Runtime's intra-op threads (0: its default, one per core).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path} (run the export stage first: `dvc repro export`)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers on stderr
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises InvalidProtobuf, Fail, InvalidGraph, ... for damaged files
        reraise_interrupt(exc)
        reason = first_line(exc)
        raise UserError(f"{path} is damaged or not an ONNX model: {reason}") from None
    raw = session.get_modelmeta().custom_metadata_map
    if raw.get("format") != json.dumps(FORMAT):
        raise UserError(f"{path} is an ONNX model but not one this project's export stage wrote (no format "
                        f"{FORMAT!r} in its metadata_props); export one with `dvc repro export`")
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError:
        raise UserError(f"{path} is damaged: its metadata_props are not JSON") from None
    missing = [key for key in ("class_names", "input_shape", "mean", "std", "image_mode", "resize") if key not in meta]
    inputs = [i.name for i in session.get_inputs()]
    if missing or inputs != [INPUT_NAME]:
        what = f"no {', '.join(missing)} in its metadata_props" if missing else f"inputs {inputs}, not [{INPUT_NAME!r}]"
        raise UserError(f"{path} is damaged: {what}; export it again with `dvc repro export`")
    return session, meta


def normalized(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 standardised per channel: the same operations, in the same float32
    order, as the core's `normalize` (`stages/core/transforms.py`), so both paths see the same inputs."""
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - m) / s


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, classes) logits -> probabilities, float32."""
    shifted = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
