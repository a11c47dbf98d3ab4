"""`python -m stages predict ... --model models/model.onnx`: label new images with ONNX Runtime, no torch.

The same CSV as predict with the weights file (`stages/predict.py`): every image decoded by the same
`decode_image` (`stages/images.py`), at the model's size, mode and resize, normalised with its mean
and std, one row per image with the top classes and their probabilities. Only the model runs
elsewhere: in ONNX Runtime on the CPU, from `models/model.onnx` (`stages/onnx_model.py`). The file is
checked against the params file by the same rule and with the same one-line refusal as the weights
file (`check_model_params`: its metadata_props carry the weights' record of their params). Nothing
here imports torch, so the command starts in a fraction of a second and runs where torch is not
installed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from .errors import UserError
from .images import decode_image
from .labelling import check_model_params, label_files
from .onnx_model import INPUT_NAME, normalized, open_onnx, softmax
from .params import RESIZE_MODES


def predict(model_path: Path, paths: list[str], out: Path, top_k: int = 1, batch_size: int = 256,
            skip_bad_images: bool = False, params_path: Path | None = None, check_params: bool = True) -> dict:
    """Label every image file of `paths` with the ONNX model; one CSV row per readable image; a summary."""
    session, meta = open_onnx(model_path)
    if check_params:
        check_model_params(meta, model_path, params_path)
    names = meta["class_names"]
    if top_k > len(names):
        raise UserError(f"--top-k {top_k} is more than the model's {len(names)} classes")
    if meta["resize"] not in RESIZE_MODES:
        raise UserError(f"{model_path} was trained on images resized by {meta['resize']!r}; this version of predict "
                        f"knows {', '.join(RESIZE_MODES)}")
    _, height, _ = meta["input_shape"]
    decode = partial(decode_image, mode=meta["image_mode"], size=height, resize=meta["resize"])

    def top_classes(pixels: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
        probs = softmax(session.run(None, {INPUT_NAME: normalized(pixels, meta["mean"], meta["std"])})[0])
        # Highest first; among equal probabilities the lower class index first, as torch.topk gives.
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        return order.tolist(), np.take_along_axis(probs, order, axis=1).tolist()

    summary = label_files(paths, decode, top_classes, names, out, top_k, batch_size, skip_bad_images)
    return {**summary, "device": "cpu (ONNX Runtime)"}
