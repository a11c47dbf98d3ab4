"""The prepare-data stage: a source -> seeded, stratified train/val/test splits on disk.

Reads the dataset that `data.dataset` names (`sources/`), carves the splits the source does
not have, and writes the prepared folder (`prepared.py`): one safetensors file per split and
`info.json` with class names, shape, the train split's per-channel mean/std and counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .params import DataParams
from .prepared import IMAGE_MODES, SPLITS, write_info, write_split
from .sources import Source, load_source


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, take): `take` holds about `fraction` of every class, chosen with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    keep, take = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_take = int(round(len(idx) * fraction))
        if len(idx) >= 2:  # leave at least one sample of each class on both sides
            n_take = min(max(n_take, 1), len(idx) - 1)
        take.append(idx[:n_take])
        keep.append(idx[n_take:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(take)).values


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, summed in chunks (no float copy of the whole set)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(max(v, 1e-3), 6) for v in std.tolist()]


def make_splits(source: Source, p: DataParams) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The source's splits, with test and then val carved out of train where the source has none."""
    splits = dict(source.splits)
    if "train" not in splits:
        raise UserError(f"data.dataset = {p.dataset!r} gave no training images")
    if "test" not in splits:
        images, labels = splits["train"]
        keep, take = stratified_split(labels, p.test_fraction, p.split_seed)
        splits["train"], splits["test"] = (images[keep], labels[keep]), (images[take], labels[take])
    if "val" not in splits:
        images, labels = splits["train"]
        keep, take = stratified_split(labels, p.val_fraction, p.split_seed + 1)
        splits["train"], splits["val"] = (images[keep], labels[keep]), (images[take], labels[take])
    for name in SPLITS:
        if len(splits[name][1]) == 0:
            raise UserError(f"the {name} split is empty; use more images or change data.val_fraction / "
                            "data.test_fraction")
    return splits


def prepare_data(p: DataParams, out_dir: str | Path) -> dict:
    """Run the stage: read the source, split, write the splits and info.json; return the info."""
    source = load_source(p)
    splits = make_splits(source, p)
    train_images = splits["train"][0]
    mean, std = channel_stats(train_images)
    num_classes = len(source.class_names)
    for name in SPLITS:
        write_split(out_dir, name, *splits[name])
    info = {
        "dataset": p.dataset,
        "class_names": source.class_names,
        "num_classes": num_classes,
        "shape": list(train_images.shape[1:]),
        "mean": mean,
        "std": std,
        "counts": {name: len(splits[name][1]) for name in SPLITS},
        "class_counts": {name: torch.bincount(splits[name][1], minlength=num_classes).tolist() for name in SPLITS},
        "skipped_bad_images": source.skipped_bad_images,
        # How a new image file becomes pixels like these (`predict` reads it from the model file).
        # Only image folders are resized here; for the others it is how predict fits a photo.
        "image_mode": IMAGE_MODES[train_images.shape[1]],
        "resize": "stretch",
    }
    write_info(out_dir, info)
    return info
