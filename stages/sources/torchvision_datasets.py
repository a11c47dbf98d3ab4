"""MNIST, Fashion-MNIST and CIFAR-10 from `data.root`, in torchvision's layout.

    <root>/MNIST/raw/        train-images-idx3-ubyte  train-labels-idx1-ubyte
                             t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
    <root>/FashionMNIST/raw/ the same four IDX files
    <root>/cifar-10-batches-py/  data_batch_1 .. data_batch_5  test_batch  batches.meta

With `data.download: true` torchvision fetches missing files into those folders (its checksummed
downloads); with it false nothing touches the network. Each dataset's official test split becomes
"test". The files are read by the project's own readers into arrays, with no per-sample Python
loop and without importing torch or torchvision (about 3 s of every run on a 2-core machine):
torchvision is imported only to download.

`idx.py` reads the MNIST family's IDX files with numpy, and holds their class names (torchvision's
`classes`). `cifar10.py` reads CIFAR-10's batches, which are Python pickles: torchvision loads them
with a plain `pickle.load` that runs whatever a crafted file names; that module's unpickler admits
only what the batches hold. Any copy in either format loads (a subset, the small files the tests
write), as torchvision's per-file md5 check would not allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, reraise_interrupt
from ..params import DATASETS, DataParams
from . import Source, array_source, cifar10, idx

CIFAR10 = "CIFAR10"


@dataclass(frozen=True)
class TorchvisionDataset:
    cls: str  # torchvision's class, which downloads it (data.download)
    folder: str  # below data.root, where the files are read

    def file_names(self) -> list[str]:
        """The files the dataset needs in `folder`, as torchvision names them."""
        if self.cls == CIFAR10:
            return [*cifar10.FILES["train"], *cifar10.FILES["test"], cifar10.META]
        return [name for names in idx.FILES.values() for name in names]


def torchvision_dataset(name: str) -> TorchvisionDataset:
    """data.dataset -> torchvision's class and folder, as DATASETS names them."""
    return TorchvisionDataset(*DATASETS[name].torchvision)


def check_files_present(name: str, kind: TorchvisionDataset, root: Path) -> None:
    """Without download, say exactly which folder and files are missing before anything is read."""
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist; create it and put {name} there, or set data.download: true")
    folder = root / kind.folder
    missing = [f for f in kind.file_names() if not (folder / f).is_file()]
    if not missing:
        return
    if all((folder / f"{f}.gz").is_file() for f in missing):  # the files are read unpacked only
        raise UserError(f"{name} in {folder} is still gzipped ({missing[0]}.gz, ...); gunzip the files there, "
                        f"or set data.download: true")
    what = "no files" if len(missing) == len(kind.file_names()) else "missing " + ", ".join(missing)
    raise UserError(f"{name} not found in {folder} ({what}); put torchvision's files there "
                    f"(expected {', '.join(kind.file_names())}) or set data.download: true")


def download(name: str, kind: TorchvisionDataset, root: Path) -> None:
    """Fetch the dataset with torchvision where a file is missing; any failure is one line naming the folder."""
    folder = root / kind.folder
    if all((folder / f).is_file() for f in kind.file_names()):
        return
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    cls = getattr(datasets, kind.cls)
    try:
        if kind.cls == CIFAR10:  # the archive, checked against its md5, unpacked into root
            download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
        else:  # the four gzipped files from torchvision's mirrors, each checked and unpacked
            cls(root=str(root), train=True, download=True)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, OSError, ...
        reraise_interrupt(exc)  # a Ctrl-C during the download is not a network failure
        # torchvision's message for MNIST's mirrors spans lines, the reason (no network, a 404) on the last
        # ones: all of it, on one line.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"could not download {name} into {folder} ({reason[:500]}); put torchvision's files there "
                        f"by hand (expected {', '.join(kind.file_names())}), or try again where the network is "
                        "reachable") from None


def load_torchvision_source(p: DataParams) -> Source:
    """Read mnist, fashion-mnist or cifar10 from `data.root`; see the module docstring for the layout."""
    kind = torchvision_dataset(p.dataset)
    root = Path(p.root)
    folder = root / kind.folder
    if p.download:
        download(p.dataset, kind, root)
    check_files_present(p.dataset, kind, root)
    if kind.cls == CIFAR10:
        class_names = cifar10.read_classes(folder)
        splits = {split: cifar10.read_split(folder, split, len(class_names)) for split in cifar10.FILES}
    else:
        class_names = idx.CLASSES[kind.cls]
        splits = {split: idx.read_split(folder, split, len(class_names)) for split in idx.FILES}
    return array_source(list(class_names), {name: labels for name, (_, labels) in splits.items()},
                        {name: images for name, (images, _) in splits.items()})
