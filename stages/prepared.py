"""The prepared data, the contract between prepare-data and every later stage.

A folder holding, per split ("train", "val", "test"), `<split>.safetensors` with uint8
`images` (N, C, H, W) and int64 `labels` (N,), and `info.json`:

    dataset, class_names, num_classes, shape [C, H, W], mean and std (per channel, in [0, 1]
    units, of the train split), counts and class_counts per split, skipped_bad_images,
    image_mode (the 8-bit PIL mode the pixels are in: "L" for 1 channel, "RGB" for 3) and
    resize (how an image file is brought to H x W: "crop" or "stretch", data.resize);
    the last two travel into the model file, so that `predict` prepares new images the same way;
    and `params`: the data.* params that prepared it ("data.val_fraction": 0.1, ...; as the weights
    record model.* and train.*, leaving out those declared `affects_result=False`)

Every stage that reads the folder checks `params` against params.yaml (`check_prepared_with`): DVC's
deps keep the two together under `dvc repro`, but nothing does for a stage run by hand, after `dvc
commit` or `dvc exp save`, or after checking out another prepared folder.

The split files are written in place, chunk by chunk (`SplitWriter`): the layout is known once
the labels are, so no stage ever holds a whole split in memory to write it. They are read
memory-mapped (`load_prepared`): the pages live in the page cache, shared by every process on
the machine that reads the same file, and only the batches a stage gathers become its own memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError
from .io import open_tensors, read_json, replace_with, safetensors_layout, temp_beside, write_at, write_json
from .params import NOT_SET, DataParams, Params, first_difference, section_result_params, show_value

if TYPE_CHECKING:  # torch only for load_prepared's tensors: prepare-data and analyze never import it
    import torch

SPLITS = ("train", "val", "test")
RECORDED_SECTION = "data"  # the params section whose values made the prepared data, recorded in info.json
IMAGE_MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode every source's uint8 pixels are in
CHUNK_BYTES = 32 << 20  # image rows copied per write when rows are copied (from arrays, or by drop_rows)


def split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.safetensors"


# --- writing ---------------------------------------------------------------------------------


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate the file's blocks for the rows before they are written. Writing into a hole makes the
    filesystem reserve blocks page by page, under the file's lock: two decoders writing one split file
    spent 0.15-0.8 s of system time on 786 MB that way here, and 0.1 s into allocated blocks. Where the
    filesystem cannot (or the platform has no posix_fallocate), the rows fill the hole as before."""
    if length and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError:
            pass


class SplitWriter:
    """One split file, written in place beside its final path and renamed onto it at `commit`.

    The header and the labels are written at once; the images area is left to be filled row by
    row with `write_rows`, by this process or by the decoder processes it forks (each writes its
    own rows in place; `stages/fill.py`). Rows that could not be filled (unreadable images) are dropped by `drop_rows`,
    which writes the file again without them. The bytes are those `save_tensors` writes for the
    same tensors.
    """

    def __init__(self, data_dir: str | Path, split: str, labels: np.ndarray, shape: tuple[int, int, int]):
        self.split, self.final = split, split_path(data_dir, split)
        self.shape = tuple(int(v) for v in shape)
        self.row_bytes = int(np.prod(self.shape))
        self.tmp = temp_beside(self.final)
        self.labels = self._create(self.tmp, np.ascontiguousarray(labels, dtype=np.int64))

    def _create(self, path: Path, labels: np.ndarray) -> np.ndarray:
        n = len(labels)
        prefix, offsets = safetensors_layout({"labels": ("I64", (n,)), "images": ("U8", (n, *self.shape))},
                                             metadata={})
        self.images_offset = offsets["images"]
        with open(path, "wb") as f:
            f.write(prefix)
            f.write(labels.astype("<i8").tobytes())
            f.truncate(self.images_offset + n * self.row_bytes)  # the image rows: a hole, filled by writers
            reserve(f.fileno(), self.images_offset, n * self.row_bytes)
        return labels

    def __len__(self) -> int:
        return len(self.labels)

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Write uint8 rows (n, C, H, W) at row `start`."""
        write_at(self.tmp, self.images_offset + start * self.row_bytes, np.ascontiguousarray(rows, dtype=np.uint8))

    def drop_rows(self, rows: list[int]) -> None:
        """Write the file again without `rows` (their images could not be read), copying the rest in chunks."""
        if not rows:
            return
        keep = np.ones(len(self.labels), dtype=bool)
        keep[rows] = False
        old, old_offset = self.tmp, self.images_offset
        self.tmp = temp_beside(self.final)
        self.labels = self._create(self.tmp, self.labels[keep])
        kept = np.flatnonzero(keep)
        chunk = max(1, CHUNK_BYTES // self.row_bytes)
        with open(old, "rb") as src:
            for start in range(0, len(kept), chunk):
                block = np.empty((min(chunk, len(kept) - start), self.row_bytes), dtype=np.uint8)
                for i, row in enumerate(kept[start : start + chunk]):
                    src.seek(old_offset + int(row) * self.row_bytes)
                    src.readinto(memoryview(block[i]))
                self.write_rows(start, block)
        old.unlink()

    def commit(self) -> None:
        """Flush the file and rename it onto its final path."""
        replace_with(self.tmp, self.final)

    def discard(self) -> None:
        if self.tmp.exists():
            self.tmp.unlink()


class PreparedWriter:
    """The split files of one prepared folder, renamed into place together with info.json only
    when all of them are complete; on an error none of them replaces what was there."""

    def __init__(self, data_dir: str | Path, labels: dict[str, np.ndarray], shape: tuple[int, int, int]):
        self.data_dir = Path(data_dir)
        self.splits: dict[str, SplitWriter] = {}
        try:
            for name, split_labels in labels.items():
                self.splits[name] = SplitWriter(data_dir, name, split_labels, shape)
        except BaseException:
            self.discard()
            raise

    def __enter__(self) -> PreparedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()  # after commit there is nothing left to discard

    def commit(self, info: dict) -> None:
        for writer in self.splits.values():
            writer.commit()
        write_info(self.data_dir, info)

    def discard(self) -> None:
        for writer in self.splits.values():
            writer.discard()


# --- per-channel statistics of the train split --------------------------------------------------


def channel_histogram(images: np.ndarray) -> np.ndarray:
    """(C, 256) int64 counts of each value per channel of uint8 images (n, C, H, W).

    Pillow's histogram is a tight C loop, about 6x numpy.bincount here, which matters when it
    runs on every decoded image."""
    from PIL import Image

    n, c, h, w = images.shape
    counts = np.zeros((c, 256), dtype=np.int64)
    if n == 0:
        return counts
    for k in range(c):
        plane = np.ascontiguousarray(images[:, k]).reshape(n * h, w)
        counts[k] = Image.fromarray(plane, mode="L").histogram()
    return counts


class ChannelStats:
    """Per-channel mean and std of uint8 images from exact integer histograms: the same numbers
    whatever the chunking, the order or the number of decoder processes."""

    def __init__(self, channels: int):
        self.counts = np.zeros((channels, 256), dtype=np.int64)

    def add(self, counts: np.ndarray) -> None:
        self.counts += counts

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Mean and std in [0, 1] units, rounded to 6 digits (std at least 0.001)."""
        values = np.arange(256, dtype=np.int64)
        pixels = self.counts.sum(axis=1)
        total = (self.counts * values).sum(axis=1)  # exact: int64 holds 255^2 x 10^13 pixels
        total_sq = (self.counts * values * values).sum(axis=1)
        mean = total / (255.0 * np.maximum(pixels, 1))
        var = total_sq / (255.0**2 * np.maximum(pixels, 1)) - mean * mean
        std = np.sqrt(np.maximum(var, 1e-24))
        return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]


# --- reading ---------------------------------------------------------------------------------


def write_info(data_dir: str | Path, info: dict) -> None:
    write_json(Path(data_dir) / "info.json", info)


def read_info(data_dir: str | Path) -> dict:
    return read_json(Path(data_dir) / "info.json")


@contextlib.contextmanager
def open_split(data_dir: str | Path, split: str, framework: str = "pt") -> Iterator:
    """A prepared split's file opened with safetensors (`stages.io.open_tensors`), checked to hold
    uint8 'images' (N, C, H, W) and int64 'labels' (N,): a UserError naming the file otherwise."""
    path = split_path(data_dir, split)
    with open_tensors(path, framework) as f:
        images, labels = (f.get_slice(name) if name in f.keys() else None for name in ("images", "labels"))
        if (images is None or labels is None or images.get_dtype() != "U8" or len(images.get_shape()) != 4
                or labels.get_dtype() != "I64" or images.get_shape()[:1] != labels.get_shape()):
            raise UserError(f"{path} is damaged: expected uint8 'images' (N, C, H, W) and 'labels' of the same "
                            "length")
        yield f


def prepared_params(p: DataParams) -> dict[str, Any]:
    """The data.* params as info.json records them ("data.val_fraction" -> 0.1), in declaration order,
    without those that do not change the prepared files (`affects_result=False`)."""
    return section_result_params(RECORDED_SECTION, p)


def check_prepared_with(info: dict, p: Params, params_path: str | Path, data_dir: str | Path) -> None:
    """Refuse prepared data that other data.* params made: the first recorded key whose value differs
    from `params_path`'s, with both values, and how to prepare it again (as `check_trained_with` does
    for the weights)."""
    again = "run `dvc repro` (or `python -m stages prepare-data`) so that the data matches the params"
    recorded = info.get("params")
    if not isinstance(recorded, dict):
        raise UserError(f"{data_dir} does not record the data params that prepared it (prepared by an older "
                        "version); prepare it again with `python -m stages prepare-data` (or `dvc repro -f -s "
                        "prepare-data`)")
    difference = first_difference(recorded, p, (RECORDED_SECTION,))
    if difference is None:
        return
    key, made_with, has = difference
    if has is NOT_SET:
        raise UserError(f"{data_dir} was prepared with {key} = {show_value(made_with)}, a key {params_path} "
                        f"does not have; {again}")
    raise UserError(f"{data_dir} was prepared with {key} = {show_value(made_with)} but {params_path} "
                    f"has {key} = {show_value(has)}; {again}")


def load_prepared(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One prepared split: (uint8 images, int64 labels, info), memory-mapped, not read into memory.

    safetensors maps the file (copy-on-write, so nothing can change it) and its tensors are views
    of the mapping; a missing, truncated or damaged file is a UserError naming it."""
    info = read_info(data_dir)
    with open_split(data_dir, split) as f:
        return f.get_tensor("images"), f.get_tensor("labels"), info


def read_images(data_dir: str | Path, split: str, rows: list[int]) -> tuple[np.ndarray, int]:
    """Some images of a prepared split, (len(rows), C, H, W) uint8 numpy, and how many the split
    holds: those rows alone are read, and torch is not imported (the report shows a few images)."""
    with open_split(data_dir, split, "numpy") as f:
        images = f.get_slice("images")
        shape = images.get_shape()
        if outside := [i for i in rows if not 0 <= i < shape[0]]:
            raise UserError(f"{split_path(data_dir, split)} has {shape[0]} images: there is no image {outside[0]}")
        picked = [images[i : i + 1] for i in rows]
    return np.concatenate(picked) if picked else np.zeros((0, *shape[1:]), dtype=np.uint8), shape[0]
