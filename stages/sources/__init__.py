"""Data sources -> uint8 image tensors (N, C, H, W) and int64 labels.

Each source returns the splits it has natively ("train", and "test" where the source has
an official test split); prepare-data carves out the rest.

    digits.py                 scikit-learn's bundled 8x8 digits (the offline default)
    torchvision_datasets.py   MNIST, Fashion-MNIST, CIFAR-10 in torchvision's on-disk layout
    imagefolder.py            the user's own images, one folder per class
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import DATASETS, DataParams


@dataclass
class Source:
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (uint8 images NCHW, int64 labels)
    class_names: list[str]
    skipped_bad_images: int = 0


def load_source(p: DataParams) -> Source:
    """Read the dataset that `data.dataset` names, from `data.root` in its usual on-disk layout."""
    if p.dataset == "digits":
        from .digits import load_digits_source

        return load_digits_source()
    elif p.dataset in ("mnist", "fashion-mnist", "cifar10"):
        from .torchvision_datasets import load_torchvision_source

        return load_torchvision_source(p)
    elif p.dataset == "imagefolder":
        from .imagefolder import load_imagefolder_source

        return load_imagefolder_source(p)
    raise ValueError(f"data.dataset {p.dataset!r} has no source; the schema allows {DATASETS}")
