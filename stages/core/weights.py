"""The model file: one `.safetensors` file of the unwrapped model's state dict, whose metadata
says what is needed to rebuild the model. Written by the train stage, read by `load_model`.

Metadata: the format tag, an allow-listed model name, the number of classes, the input shape,
the class names, the normalisation (per-channel mean and std in [0, 1] units), the dataset, and
how an image file becomes the model's input (`image_mode`, `resize`: see `stages/prepared.py`).
Written only where they apply, so that files of the project's first models keep their bytes:

  small_input_stem  false for a resnet with torchvision's ImageNet stem; absent, a resnet has the
                    small-image stem (what resnet18 files have always had)
  pretrained        where the starting weights came from: {"torchvision": "ResNet18_Weights.IMAGENET1K_V1"}
                    or {"file": name, "sha256": ..., "same_as": a torchvision entry when it is one}
  normalization     where mean and std came from when not the train split ("pretrained weights")

The architecture follows from model_name, input_shape (channels: a greyscale first conv; size: a
ViT's patch grid), num_classes and small_input_stem, so the file rebuilds without the pretrained one.
Nothing in it changes from run to run (no timestamps), so the same params on the same machine
give the same file; nothing in it is code, and nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import load_tensors, save_tensors
from ..params import is_resnet
from .models import build_model

FORMAT = "stages.model/1"


def model_metadata(model_name: str, info: dict, small_stem: bool = True, pretrained: dict | None = None,
                   normalization: tuple[list[float], list[float], str] | None = None) -> dict:
    """What `load_model` needs to rebuild the model, from the prepared data's info.json; with
    `pretrained` (the weights' source) and `normalization` (mean, std, where they came from) when
    training did not start from scratch or normalise with the train split's statistics."""
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": info["num_classes"],
        "input_shape": info["shape"],
        "class_names": info["class_names"],
        "mean": info["mean"],
        "std": info["std"],
        "dataset": info["dataset"],
        "image_mode": info["image_mode"],
        "resize": info["resize"],
    }
    if is_resnet(model_name) and not small_stem:
        meta["small_input_stem"] = False
    if pretrained is not None:
        meta["pretrained"] = pretrained
    if normalization is not None:
        meta["mean"], meta["std"], meta["normalization"] = normalization
    return meta


def save_model(path: str | Path, model: nn.Module, metadata: dict) -> None:
    """Write the plain (unwrapped) model's weights: keys have no `module.` prefix."""
    save_tensors(path, model.state_dict(), metadata)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved in a `.safetensors` weights file and return it in eval mode.

    The architecture comes from the file's metadata; no code is read from the file. The
    metadata is kept on the model as `model.stages_metadata` (class names, mean, std) so
    inputs can be normalised the way training did: `(uint8_images / 255 - mean) / std`,
    per channel.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a model weights file of this project (format {meta.get('format')!r})")
    c, h, _ = meta["input_shape"]
    model = build_model(meta["model_name"], c, h, meta["num_classes"], meta.get("small_input_stem", True))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not match model {meta['model_name']!r}: {str(exc).splitlines()[0]}") from None
    model.stages_metadata = meta
    return model.to(torch.device(device)).eval()
