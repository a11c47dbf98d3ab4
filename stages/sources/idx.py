"""MNIST's and Fashion-MNIST's unpacked IDX files, read with numpy.

IDX (the format LeCun's MNIST files ship in) is a 4-byte magic (two zero bytes, the element type,
0x08 for unsigned bytes, and the number of dimensions), one big-endian int32 size per dimension,
then the elements in C order. torchvision's reader (`datasets.mnist.read_image_file`) returns torch
tensors, and importing torch and torchvision for it was about 3 s of every prepare-data run on
MNIST on a 2-core machine; numpy reads the format in a few lines. torchvision still downloads the
files (`data.download`, in torchvision_datasets.py), and tests/test_datasets.py checks that both
readers give the same arrays and that CLASSES are torchvision's `classes`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import UserError

# native split -> (images, labels) file names, as torchvision's MNIST and FashionMNIST name them unpacked.
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
UBYTE = 0x08

# torchvision's class -> its `classes` attribute: the class names prepare-data records for the dataset.
CLASSES = {
    "MNIST": ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
              "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


class DamagedFile(Exception):
    """What is wrong with one IDX file; the caller names the file and the dataset."""


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes with `ndim` dimensions -> a uint8 array of its sizes."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0":
            raise DamagedFile("it is not an IDX file (IDX files start with two zero bytes)")
        if magic[2] != UBYTE:
            raise DamagedFile(f"it holds elements of type 0x{magic[2]:02x}; MNIST's files hold unsigned bytes (0x08)")
        if magic[3] != ndim:
            raise DamagedFile(f"it has {magic[3]} dimensions where {ndim} are expected")
        header = f.read(4 * ndim)
        if len(header) < 4 * ndim:
            raise DamagedFile(f"it ends inside its header ({4 + len(header)} bytes)")
        sizes = [int(s) for s in np.frombuffer(header, dtype=">u4")]
        data = np.fromfile(f, dtype=np.uint8)
    expected = math.prod(sizes)
    if data.size != expected:
        what = "truncated" if data.size < expected else "longer than its header says"
        raise DamagedFile(f"it is {what}: {data.size} bytes of data for sizes "
                          f"{' x '.join(map(str, sizes))} ({expected} bytes)")
    return data.reshape(sizes)


def read_split(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One native split -> uint8 images (N, 1, H, W) and int64 labels (N,)."""
    image_file, label_file = (folder / name for name in FILES[split])
    images = read_file(image_file, 3)
    labels = read_file(label_file, 1)
    if len(images) != len(labels):
        raise UserError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels; "
                        "the two files must come from the same release of the dataset")
    if len(labels) and labels.max() >= num_classes:
        raise UserError(f"{label_file} is damaged: it holds label {labels.max()}, "
                        f"where labels are 0..{num_classes - 1}")
    return images[:, None], labels.astype(np.int64)  # a view (N, 1, H, W): one grey channel


def read_file(path: Path, ndim: int) -> np.ndarray:
    """read_idx, with any problem as one line naming the file."""
    try:
        return read_idx(path, ndim)
    except DamagedFile as exc:
        raise UserError(f"{path} is damaged: {exc}; replace it with the dataset's own unpacked file") from None
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or exc}") from None
