"""MNIST, Fashion-MNIST and CIFAR-10, read by torchvision from `data.root` in its own layout.

    <root>/MNIST/raw/        train-images-idx3-ubyte  train-labels-idx1-ubyte
                             t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
    <root>/FashionMNIST/raw/ the same four IDX files
    <root>/cifar-10-batches-py/  data_batch_1 .. data_batch_5  test_batch  batches.meta

With `data.download: true` torchvision fetches missing files into those folders; with it
false nothing touches the network. Each dataset's official test split becomes "test".
Images come from the datasets' in-memory arrays (`.data`, `.targets`), so no per-sample
Python loop runs.

CIFAR-10 is read without torchvision's per-file md5 check: the check only accepts the
exact official files, so it refuses any other copy in the same format (a subset, the
small files the tests write). A damaged file still fails while it is parsed, and that
failure is reported with the folder's name. The download itself is still checksummed.
CIFAR-10's batches are Python pickles, which can run code when torchvision loads them:
use copies from a source you trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import datasets

from ..errors import UserError
from ..params import DataParams
from . import Source


class CIFAR10AnyCopy(datasets.CIFAR10):
    """torchvision's CIFAR10, accepting any files in the CIFAR-10 python format (no md5 per file)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


@dataclass(frozen=True)
class TorchvisionDataset:
    cls: type
    folder: str  # below data.root, where torchvision reads the files

    def file_names(self) -> list[str]:
        """The files torchvision needs in `folder`, from its own class attributes."""
        if hasattr(self.cls, "resources"):  # MNIST family: "<name>.gz" downloads, read unpacked
            return [Path(url).name.removesuffix(".gz") for url, _ in self.cls.resources]
        return [name for name, _ in self.cls.train_list + self.cls.test_list] + [self.cls.meta["filename"]]


TORCHVISION_DATASETS = {
    "mnist": TorchvisionDataset(datasets.MNIST, "MNIST/raw"),
    "fashion-mnist": TorchvisionDataset(datasets.FashionMNIST, "FashionMNIST/raw"),
    "cifar10": TorchvisionDataset(CIFAR10AnyCopy, "cifar-10-batches-py"),
}


def check_files_present(name: str, kind: TorchvisionDataset, root: Path) -> None:
    """Without download, say exactly which folder and files are missing before torchvision looks."""
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist; create it and put {name} there, or set data.download: true")
    folder = root / kind.folder
    missing = [f for f in kind.file_names() if not (folder / f).is_file()]
    if not missing:
        return
    if all((folder / f"{f}.gz").is_file() for f in missing):  # torchvision reads the unpacked files only
        raise UserError(f"{name} in {folder} is still gzipped ({missing[0]}.gz, ...); gunzip the files there, "
                        f"or set data.download: true")
    what = "no files" if len(missing) == len(kind.file_names()) else "missing " + ", ".join(missing)
    raise UserError(f"{name} not found in {folder} ({what}); put torchvision's files there "
                    f"(expected {', '.join(kind.file_names())}) or set data.download: true")


def open_split(name: str, kind: TorchvisionDataset, root: Path, train: bool, download: bool):
    """torchvision's dataset object for one split; any failure is one line naming the folder."""
    folder = root / kind.folder
    try:
        return kind.cls(root=str(root), train=train, download=download)
    except Exception as exc:  # torchvision raises RuntimeError, ValueError, KeyError, pickle and URL errors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if download:
            raise UserError(f"could not download or read {name} in {folder}: {reason}") from None
        raise UserError(f"could not read {name} from {folder}, a file there is damaged: {reason}") from None


def as_tensors(ds, name: str, folder: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's arrays -> uint8 images (N, C, H, W) and int64 labels."""
    data = torch.as_tensor(ds.data)
    if data.dtype != torch.uint8 or data.ndim not in (3, 4):
        raise UserError(f"{name} in {folder} is damaged: expected uint8 images, got {data.dtype} {tuple(data.shape)}")
    # MNIST keeps (N, H, W); CIFAR keeps (N, H, W, C).
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    if len(labels) != len(images):
        raise UserError(f"{name} in {folder} is damaged: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{name} in {folder} is damaged: labels outside 0..{num_classes - 1}")
    return images.contiguous(), labels


def load_torchvision_source(p: DataParams) -> Source:
    """Read mnist, fashion-mnist or cifar10 from `data.root`; see the module docstring for the layout."""
    kind = TORCHVISION_DATASETS[p.dataset]
    root = Path(p.root)
    folder = root / kind.folder
    if not p.download:
        check_files_present(p.dataset, kind, root)
    train = open_split(p.dataset, kind, root, train=True, download=p.download)
    test = open_split(p.dataset, kind, root, train=False, download=False)  # the download above fetched both
    class_names = [str(c) for c in train.classes]
    splits = {"train": as_tensors(train, p.dataset, folder, len(class_names)),
              "test": as_tensors(test, p.dataset, folder, len(class_names))}
    return Source(class_names, labels={name: labels for name, (_, labels) in splits.items()},
                  images={name: images for name, (images, _) in splits.items()})
