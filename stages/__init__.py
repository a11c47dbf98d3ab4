"""A reproducible multi-GPU image-classification pipeline on DVC.

`load_model(path)` rebuilds a trained model from its weights file alone. Importing
this package does not import torch; only calling a function does.
"""

from __future__ import annotations

__all__ = ["load_model"]


def load_model(path, device="cpu"):
    """Rebuild the model saved in a `.safetensors` weights file, in eval mode (see `stages.core.weights`)."""
    from .core.weights import load_model as load

    return load(path, device)
