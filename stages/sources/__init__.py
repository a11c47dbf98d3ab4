"""Data sources -> class names, int64 labels per split, and what fills uint8 rows (N, C, H, W).

Every source gives prepare-data the same thing, a `Source`: the splits it has natively ("train",
and "test" where the source has an official test split) as labels, the shape of its images, and
`rows`, which fills any of a split's items into a buffer of rows. prepare-data chooses each
split's items from the labels alone and one writer (`stages/fill.py`) streams them, task by
task, into the split files; nothing holds a whole split.

    digits.py                 scikit-learn's bundled 8x8 digits (the offline default)  -> ArrayRows
    torchvision_datasets.py   MNIST, Fashion-MNIST, CIFAR-10 in torchvision's layout    -> ArrayRows
      idx.py, cifar10.py      their files' own readers (numpy; torchvision only downloads)
    imagefolder.py            the user's own images, one folder per class (listed)     -> FileRows

Small datasets that ship as arrays are copied row block by row block, in this process (a copy
gains nothing from more cores); an image folder's files are decoded on every core (`images.py`
decodes one file, as predict does).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import UserError, first_line, reraise_interrupt
from ..images import channels_first, open_resized
from ..params import DATASETS, DataParams
from ..prepared import CHUNK_BYTES, IMAGE_MODES, channel_histogram


class Rows(Protocol):
    """Fills rows of a source's splits; run by the writer in this process or in forked decoders."""

    per_task: int  # items one task fills: a few MB of rows, or fewer where each item costs a decode
    parallel: bool  # whether a decoder per core pays (decoding files) or not (copying arrays)

    def fill(self, split: str, items: np.ndarray, out: np.ndarray, counts: np.ndarray | None) -> list[tuple[int, str]]:
        """Write the rows of `items` (indices into the native `split`) into `out` (len(items), C, H, W);
        add their pixel-value counts per channel to `counts` (C, 256) when given. Returns the unreadable
        items as (position in `items`, reason); their rows are left to the caller."""

    def name(self, split: str, item: int) -> str:
        """What an error message calls the item (its file)."""


@dataclass
class ArrayRows:
    """Images already in memory: native split -> uint8 (N, C, H, W)."""

    images: dict[str, np.ndarray]
    parallel = False

    @property
    def per_task(self) -> int:
        row_bytes = int(np.prod(next(iter(self.images.values())).shape[1:]))
        return max(1, CHUNK_BYTES // row_bytes)

    def fill(self, split: str, items: np.ndarray, out: np.ndarray, counts: np.ndarray | None) -> list[tuple[int, str]]:
        np.take(self.images[split], items, axis=0, out=out)
        if counts is not None:
            counts += channel_histogram(out)
        return []

    def name(self, split: str, item: int) -> str:
        return f"{split} image {item}"


# Files per task handed to a decoder process. Measured on 2 cores with 160x120 JPEGs: 16 files
# per task 2,450 images/s, 64 files 2,730, 256 files 2,530 (fewer: more messages; more: the
# last tasks leave a core idle). Fewer for large images, so a decoder's buffers stay small.
FILES_PER_TASK = 64
TASK_BYTES = 16 << 20


@dataclass
class FileRows:
    """Image files (native split -> paths, in label order), decoded as `images.open_resized` prepares them."""

    files: dict[str, list[str]]
    mode: str  # "L" or "RGB"
    size: int
    resize: str  # data.resize
    parallel = True

    @property
    def per_task(self) -> int:
        return max(1, min(FILES_PER_TASK, TASK_BYTES // (Image.getmodebands(self.mode) * self.size * self.size)))

    def fill(self, split: str, items: np.ndarray, out: np.ndarray, counts: np.ndarray | None) -> list[tuple[int, str]]:
        paths = self.files[split]
        bad, counted = [], 0
        canvas = task_canvas(self.mode, self.size, len(items)) if counts is not None else None
        for i, item in enumerate(items.tolist()):
            try:
                img = open_resized(paths[item], self.mode, self.size, self.resize)
            except Exception as exc:  # any damage a file can have: named, with its reason, by the writer
                reraise_interrupt(exc)  # a Ctrl-C while decoding is not a damaged file
                bad.append((i, first_line(exc)))
                continue
            channels_first(img, out[i])
            if canvas is not None:
                canvas.paste(img, (0, counted * self.size))
                counted += 1
        if counted:  # one call into Pillow's C loop for the task's images: 256 counts per band
            height = counted * self.size
            stacked = canvas if canvas.height == height else canvas.crop((0, 0, self.size, height))
            counts += np.array(stacked.histogram(), dtype=np.int64).reshape(counts.shape)
        return bad

    def name(self, split: str, item: int) -> str:
        return self.files[split][item]


_canvas = threading.local()  # each decoder's task canvas (process or thread), reused from task to task


def task_canvas(mode: str, size: int, n: int) -> Image.Image:
    """A tall image that holds a task's n images one under another, so that their histogram is one call
    into Pillow, not one per image and a sum of lists (a third of the time here). One per decoder, reused."""
    canvas = getattr(_canvas, "image", None)
    if canvas is None or (canvas.mode, canvas.width) != (mode, size) or canvas.height < n * size:
        canvas = _canvas.image = Image.new(mode, (size, n * size))
    return canvas


@dataclass
class Source:
    class_names: list[str]
    labels: dict[str, np.ndarray]  # native split -> int64 labels (N,)
    shape: tuple[int, int, int]  # (C, H, W) of the rows `rows` fills
    rows: Rows
    # How a new image file is brought to `shape` (predict reads it from the model file): data.resize for
    # an image folder; for arrays, how predict fits a photo to them.
    resize: str = "stretch"
    # An image folder's folder of train class folders (class c's images are under class_root/c): what a
    # refusal of a class names.
    class_root: str | None = None

    @property
    def image_mode(self) -> str:
        return IMAGE_MODES[self.shape[0]]


def array_source(class_names: list[str], labels: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> Source:
    """A source whose images are uint8 arrays (N, C, H, W) in memory."""
    shape = tuple(int(v) for v in next(iter(images.values())).shape[1:])
    return Source(class_names, {name: np.asarray(v, dtype=np.int64) for name, v in labels.items()}, shape,
                  ArrayRows(images))


def load_source(p: DataParams) -> Source:
    """Read the dataset that `data.dataset` names, from `data.root` in its usual on-disk layout."""
    kind = DATASETS[p.dataset].source
    if kind == "digits":
        from .digits import load_digits_source

        return load_digits_source()
    digits_root = DataParams().root  # the default: a folder that holds nothing, so the digits depend on nothing
    if Path(p.root).resolve() == Path(digits_root).resolve():
        raise UserError(f"data.root is {p.root}, the digits' folder, which holds no {p.dataset} data; "
                        f"set data.root to the folder of its own that holds it (e.g. data/raw/{p.dataset})")
    elif kind == "torchvision":
        from .torchvision_datasets import load_torchvision_source

        return load_torchvision_source(p)
    elif kind == "imagefolder":
        from .imagefolder import load_imagefolder_source

        return load_imagefolder_source(p)
    raise ValueError(f"data.dataset {p.dataset!r} has no source; the schema allows {', '.join(DATASETS)}")
