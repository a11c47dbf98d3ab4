"""`python -m stages predict`: label new image files with a trained model, into a CSV.

Every file is prepared the way prepare-data prepared the training images, from the model
file's metadata alone: decoded by the same `decode_image` as image folders (EXIF orientation,
transparency flattened onto white, 16-bit scaled to 8 bits), converted to the model's
`image_mode` ("L" or "RGB"), resized to its input size as `resize` says, and normalised with
its mean and std. For datasets that are not files (digits, MNIST, Fashion-MNIST, CIFAR-10)
that is how a photo becomes pixels like theirs: 8-bit grey (or RGB for CIFAR-10) at the
model's size; nothing else (no inversion, no cropping to the object) is done.

Before any file is read, the model file is checked: a model of this project (else one line
says what the file is not), trained with the model.* and train.* params of the params file when
there is one (`check_model_params` in `stages/labelling.py`, the same rule for the ONNX path;
`--no-check-params` skips it).

The model runs on the first CUDA device when there is one; decoding, batching and the CSV are
`stages/labelling.py`'s, shared with the ONNX path.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from .core.transforms import normalize, stats_tensors
from .core.weights import load_model
from .errors import UserError
from .images import decode_image
from .labelling import check_model_params, label_files
from .model_file import read_metadata
from .params import RESIZE_MODES


def preprocessing(meta: dict, path: Path):
    """decode_image set up as prepare-data used it for this model's data: file -> uint8 (C, H, W) or a reason."""
    if "image_mode" not in meta or "resize" not in meta:
        raise UserError(f"{path} does not say how its images were prepared (no image_mode / resize in its "
                        "metadata: an older model file); retrain it with `dvc repro`")
    if meta["resize"] not in RESIZE_MODES:
        raise UserError(f"{path} was trained on images resized by {meta['resize']!r}; this version of predict "
                        f"knows {', '.join(RESIZE_MODES)}")
    _, height, _ = meta["input_shape"]
    return partial(decode_image, mode=meta["image_mode"], size=height, resize=meta["resize"])


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> softmax probabilities (N, classes), float32 on the CPU."""
    logits = model(normalize(images.to(device), mean, std))
    return torch.softmax(logits.float(), dim=1).cpu()


def predict(model_path: Path, paths: list[str], out: Path, top_k: int = 1, batch_size: int = 256,
            skip_bad_images: bool = False, params_path: Path | None = None, check_params: bool = True) -> dict:
    """Label the image files `paths` (the command found them and checked --out: stages/predict_checks.py);
    write one CSV row per readable image; return a summary."""
    meta = read_metadata(model_path)  # a model file of this project, before anything else
    if check_params:
        check_model_params(meta, model_path, params_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, device=device)
    meta = model.stages_metadata
    names = meta["class_names"]
    if top_k > len(names):
        raise UserError(f"--top-k {top_k} is more than the model's {len(names)} classes")
    decode = preprocessing(meta, model_path)
    mean, std = stats_tensors(meta["mean"], meta["std"], device)

    def top_classes(pixels: np.ndarray) -> tuple[list[list[int]], list[list[float]]]:
        top = class_probabilities(model, torch.from_numpy(pixels), mean, std, device).topk(top_k, dim=1)
        return top.indices.tolist(), top.values.tolist()

    summary = label_files(paths, decode, top_classes, names, out, top_k, batch_size, skip_bad_images)
    return {**summary, "device": device.type}
