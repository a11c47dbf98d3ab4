"""Data sources -> int64 labels, and uint8 images (N, C, H, W) or the image files to decode.

Each source returns the splits it has natively ("train", and "test" where the source has
an official test split); prepare-data carves out the rest. Small datasets that ship as arrays
(digits, MNIST, CIFAR-10) come as tensors in memory; an image folder comes as its list of
files, decoded only while prepare-data writes the splits, so it is never held in memory.

    digits.py                 scikit-learn's bundled 8x8 digits (the offline default)
    torchvision_datasets.py   MNIST, Fashion-MNIST, CIFAR-10 in torchvision's on-disk layout
    imagefolder.py            the user's own images, one folder per class
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..images import warn as warn  # one "warning: ..." line on stderr, for every source
from ..params import DATASETS, DataParams
from ..params import plural as count  # noqa: F401 - "1 file", "2 files": one helper for the whole package


@dataclass
class Source:
    class_names: list[str]
    labels: dict[str, torch.Tensor]  # native split -> int64 labels (N,)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # arrays: split -> uint8 (N, C, H, W)
    files: dict[str, list[str]] = field(default_factory=dict)  # image folders: split -> files, in label order


def load_source(p: DataParams) -> Source:
    """Read the dataset that `data.dataset` names, from `data.root` in its usual on-disk layout."""
    if p.dataset == "digits":
        from .digits import load_digits_source

        return load_digits_source()
    digits_root = DataParams().root  # the default: a folder that holds nothing, so the digits depend on nothing
    if Path(p.root).resolve() == Path(digits_root).resolve():
        raise UserError(f"data.root is {p.root}, the digits' folder, which holds no {p.dataset} data; "
                        f"set data.root to the folder of its own that holds it (e.g. data/raw/{p.dataset})")
    elif p.dataset in ("mnist", "fashion-mnist", "cifar10"):
        from .torchvision_datasets import load_torchvision_source

        return load_torchvision_source(p)
    elif p.dataset == "imagefolder":
        from .imagefolder import load_imagefolder_source

        return load_imagefolder_source(p)
    raise ValueError(f"data.dataset {p.dataset!r} has no source; the schema allows {DATASETS}")
