"""Data sources -> uint8 image tensors (N, C, H, W) and int64 labels.

Each source returns the splits it has natively ("train", and "test" where the
source has an official test split); prepare_data carves out the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .params import DataParams


@dataclass
class Source:
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (uint8 images NCHW, int64 labels)
    class_names: list[str]
    skipped_bad_images: int = 0


def load_digits_source() -> Source:
    """scikit-learn's bundled handwritten digits: 1,797 8x8 scans with values 0..16, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 -> 0..255 so every source shares the uint8 convention.
    pixels = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    images = pixels.unsqueeze(1).contiguous()  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    return Source(splits={"train": (images, labels)}, class_names=[str(c) for c in bunch.target_names])


def load_source(p: DataParams) -> Source:
    """Read the dataset that `data.dataset` names, from `data.root` in its usual on-disk layout."""
    if p.dataset == "digits":
        return load_digits_source()
    elif p.dataset in ("mnist", "fashion-mnist", "cifar10"):
        from .torchvision_sources import load_torchvision_source

        return load_torchvision_source(p)
    elif p.dataset == "imagefolder":
        from .imagefolder import load_imagefolder_source

        return load_imagefolder_source(p)
    raise UserError(f"data.dataset = {p.dataset!r} is not allowed; expected one of digits, mnist, fashion-mnist, cifar10, imagefolder")
