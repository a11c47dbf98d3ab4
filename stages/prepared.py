"""The prepared data, the contract between prepare-data and every later stage.

A folder holding, per split ("train", "val", "test"), `<split>.safetensors` with uint8
`images` (N, C, H, W) and int64 `labels` (N,), and `info.json`:

    dataset, class_names, num_classes, shape [C, H, W], mean and std (per channel, in [0, 1]
    units, of the train split), counts and class_counts per split, skipped_bad_images,
    image_mode (the 8-bit PIL mode the pixels are in: "L" for 1 channel, "RGB" for 3) and
    resize (how an image file is brought to H x W: "stretch", both sides scaled to the size);
    the last two travel into the model file, so that `predict` prepares new images the same way
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .io import load_tensors, read_json, save_tensors, write_json

SPLITS = ("train", "val", "test")
IMAGE_MODES = {1: "L", 3: "RGB"}  # channels -> the PIL mode every source's uint8 pixels are in


def split_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.safetensors"


def write_split(data_dir: str | Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    save_tensors(split_path(data_dir, split), {"images": images, "labels": labels})


def write_info(data_dir: str | Path, info: dict) -> None:
    write_json(Path(data_dir) / "info.json", info)


def read_info(data_dir: str | Path) -> dict:
    return read_json(Path(data_dir) / "info.json")


def load_prepared(data_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One prepared split: (uint8 images, int64 labels, info). Damaged files are named in the error."""
    info = read_info(data_dir)
    path = split_path(data_dir, split)
    tensors, _ = load_tensors(path)
    images, labels = tensors.get("images"), tensors.get("labels")
    if (images is None or labels is None or images.dtype != torch.uint8 or images.ndim != 4
            or len(images) != len(labels)):
        raise UserError(f"{path} is damaged: expected uint8 'images' (N, C, H, W) and 'labels' of the same length")
    return images, labels, info
