"""A reproducible multi-GPU image-classification pipeline on DVC.

`load_model(path)` rebuilds a trained model from its weights file alone. Importing
this package does not import torch; only calling a function does.
"""

from __future__ import annotations

__all__ = ["load_model"]


def load_model(path, device="cpu"):
    """Rebuild the model saved in a `.safetensors` weights file and return it in eval mode.

    The architecture comes from the file's metadata (an allow-listed model name, the
    input shape and the number of classes); no code is read from the file. The
    metadata is kept on the model as `model.stages_metadata` (class names, mean, std)
    so inputs can be normalised the way training did:
    `(uint8_images / 255 - mean) / std`, per channel.
    """
    import torch

    from .artifacts import load_tensors
    from .errors import UserError
    from .models import build_model

    tensors, meta = load_tensors(path)
    if meta.get("format") != "stages.model/1":
        raise UserError(f"{path} is not a model weights file of this project (format {meta.get('format')!r})")
    c, h, _ = meta["input_shape"]
    model = build_model(meta["model_name"], c, h, meta["num_classes"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not match model {meta['model_name']!r}: {str(exc).splitlines()[0]}") from None
    model.stages_metadata = meta
    return model.to(torch.device(device)).eval()
