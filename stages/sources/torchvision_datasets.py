"""MNIST, Fashion-MNIST and CIFAR-10, read by torchvision from `data.root` in its own layout.

    <root>/MNIST/raw/        train-images-idx3-ubyte  train-labels-idx1-ubyte
                             t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
    <root>/FashionMNIST/raw/ the same four IDX files
    <root>/cifar-10-batches-py/  data_batch_1 .. data_batch_5  test_batch  batches.meta

With `data.download: true` torchvision fetches missing files into those folders; with it
false nothing touches the network. Each dataset's official test split becomes "test".
Images come from the datasets' in-memory arrays (`.data`, `.targets`), so no per-sample
Python loop runs.

CIFAR-10 is read by `cifar10.py`, not by torchvision: its batches are Python pickles, which
torchvision loads with a plain `pickle.load` that runs whatever a crafted file names; that module's
unpickler admits only what the batches hold. Any copy in the format loads (a subset, the small
files the tests write), as torchvision's per-file md5 check would not allow. The download itself
is checksummed (torchvision's archive md5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from ..errors import UserError, first_line
from ..params import DATASETS, DataParams
from . import Source, array_source


@dataclass(frozen=True)
class CIFAR10Split:
    """One CIFAR-10 split read by `cifar10.py`, with the attributes `as_arrays` reads from torchvision's."""

    data: np.ndarray  # uint8 (N, 32, 32, 3)
    targets: list[int]
    classes: list[str]


@dataclass(frozen=True)
class TorchvisionDataset:
    cls: type
    folder: str  # below data.root, where torchvision reads the files

    def file_names(self) -> list[str]:
        """The files torchvision needs in `folder`, from its own class attributes."""
        if hasattr(self.cls, "resources"):  # MNIST family: "<name>.gz" downloads, read unpacked
            return [Path(url).name.removesuffix(".gz") for url, _ in self.cls.resources]
        return [name for name, _ in self.cls.train_list + self.cls.test_list] + [self.cls.meta["filename"]]


def torchvision_dataset(name: str) -> TorchvisionDataset:
    """data.dataset -> torchvision's class and folder, as DATASETS names them."""
    class_name, folder = DATASETS[name].torchvision
    return TorchvisionDataset(getattr(datasets, class_name), folder)


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
        if kind.cls is datasets.CIFAR10:
            return open_cifar10(kind, root, train, download)
        return kind.cls(root=str(root), train=train, download=download)
    except UserError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError, ValueError, KeyError, pickle and URL errors
        reason = first_line(exc)
        if download:
            raise UserError(f"could not download or read {name} in {folder}: {reason}") from None
        raise UserError(f"could not read {name} from {folder}, a file there is damaged: {reason}") from None


def open_cifar10(kind: TorchvisionDataset, root: Path, train: bool, download: bool) -> CIFAR10Split:
    """CIFAR-10 from its python batches without unpickling code (see `cifar10.py`); with `download`,
    torchvision's checksummed archive is fetched and unpacked first where a file is missing."""
    from torchvision.datasets.utils import download_and_extract_archive

    from .cifar10 import read_classes, read_split

    folder = root / kind.folder
    if download and not all((folder / f).is_file() for f in kind.file_names()):
        cls = datasets.CIFAR10
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    images, labels = read_split(folder, "train" if train else "test")
    return CIFAR10Split(images, labels, read_classes(folder))


def as_arrays(ds, name: str, folder: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
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
    return images.contiguous().numpy(), labels.numpy()


def load_torchvision_source(p: DataParams) -> Source:
    """Read mnist, fashion-mnist or cifar10 from `data.root`; see the module docstring for the layout."""
    kind = torchvision_dataset(p.dataset)
    root = Path(p.root)
    folder = root / kind.folder
    if not p.download:
        check_files_present(p.dataset, kind, root)
    train = open_split(p.dataset, kind, root, train=True, download=p.download)
    test = open_split(p.dataset, kind, root, train=False, download=False)  # the download above fetched both
    class_names = [str(c) for c in train.classes]
    splits = {"train": as_arrays(train, p.dataset, folder, len(class_names)),
              "test": as_arrays(test, p.dataset, folder, len(class_names))}
    return array_source(class_names, {name: labels for name, (_, labels) in splits.items()},
                        {name: images for name, (images, _) in splits.items()})
