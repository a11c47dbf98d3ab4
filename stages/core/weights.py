"""The model file's tensors: `save_model` writes the unwrapped model's state dict with its metadata,
`load_model` rebuilds the model from the file alone. What the metadata holds and how every stage
checks it (without torch) is in stages/model_file.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io import load_tensors, save_tensors
from ..model_file import check_metadata
from .models import build_model


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
    check_metadata(meta, path)
    c, h, _ = meta["input_shape"]
    model = build_model(meta["model_name"], c, h, meta["num_classes"], meta.get("small_input_stem", True))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        # torch's first line only names the model class; the second names the first key that differs.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"{path} does not match model {meta['model_name']!r}: {' '.join(lines[:2])}") from None
    model.stages_metadata = meta
    return model.to(torch.device(device)).eval()
