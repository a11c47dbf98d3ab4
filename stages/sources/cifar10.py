"""CIFAR-10's python-format batches, unpickled so that no file can run code.

The batches are Python pickles (cPickle, protocol 2, from Python 2 and numpy 1.x). A pickle names
the functions it calls while it loads, so a crafted `data_batch_1` could run anything as the user
who runs `dvc repro`. torchvision loads them with a plain `pickle.load`; here an unpickler admits
only the few globals a batch needs to rebuild its numpy array, and refuses every other one before
calling it. Everything else a batch holds (a dict, lists of ints, strings) needs no global at all.
The standard library's `pickle.Unpickler.find_class` is the documented place for this restriction
("Restricting Globals" in the pickle docs); no well-kept library does it for numpy arrays.

What the official files and copies written since reference (checked with `pickletools.dis`):

    numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype   the official files (numpy 1.x)
    numpy._core.multiarray._reconstruct                               copies pickled by numpy 2, protocol 2-4
    _codecs.encode (latin-1 only)                                     bytes pickled by Python 3, protocol 2
    numpy._core.numeric._frombuffer (and numpy.core.numeric's)        copies pickled with protocol 5
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line, reraise_interrupt

try:  # numpy 2 moved numpy.core to numpy._core; numpy.core still resolves, with a deprecation warning
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"


def latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 writes for bytes in protocol 2 (`_codecs.encode(text, "latin1")`), and nothing else."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): latin1_encode,
}


class BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED; any other name is refused before it is imported or called."""

    def find_class(self, module: str, name: str):
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which CIFAR-10 batches never do")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it references a persistent object, which CIFAR-10 batches never do")


def load_batch(path: Path) -> dict:
    """One batch file -> its dict (keys as str, as torchvision reads them with encoding="latin1")."""
    try:
        with open(path, "rb") as f:
            entry = BatchUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise UserError(f"refusing to load {path}: {exc}; only numpy arrays, lists, strings and numbers "
                        "are read from CIFAR-10's files (replace it with the official file)") from None
    except Exception as exc:  # truncated or garbage files raise EOFError, ValueError, UnicodeDecodeError, ...
        reraise_interrupt(exc)
        reason = first_line(exc)
        raise UserError(f"could not read cifar10 from {path}, the file is damaged: {reason}") from None
    if not isinstance(entry, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch: it holds a {type(entry).__name__}, not a dict")
    return entry


def read_split(folder: Path, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches of one split -> uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    images, labels = [], []
    for name in FILES[split]:
        path = folder / name
        entry = load_batch(path)
        data, targets = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"{path} is not a CIFAR-10 batch: 'data' must be uint8 rows of 3 x 32 x 32 pixels")
        if not isinstance(targets, list) or not all(isinstance(t, int) for t in targets):
            raise UserError(f"{path} is not a CIFAR-10 batch: 'labels' must be a list of ints")
        images.append(data)
        labels += targets
    count = sum(len(data) for data in images)
    if len(labels) != count:
        raise UserError(f"cifar10 in {folder} is damaged: {count} images but {len(labels)} labels")
    if labels and (min(labels) < 0 or max(labels) >= num_classes):
        raise UserError(f"cifar10 in {folder} is damaged: labels outside 0..{num_classes - 1}")
    # Each row holds the R, G and B planes one after the other: already (C, H, W).
    return np.vstack(images).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_classes(folder: Path) -> list[str]:
    path = folder / META
    names = load_batch(path).get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path} is not CIFAR-10's batches.meta: 'label_names' must be a list of strings")
    return names
