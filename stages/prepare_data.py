"""The prepare-data stage: a source -> seeded, stratified train/val/test splits on disk.

Reads the dataset that `data.dataset` names (`sources/`), chooses the rows of each split from
the labels alone (carving the splits the source does not have), then writes the prepared folder
(`prepared.py`) split file by split file, in chunks: arrays are copied row block by row block,
image files are decoded on every core straight into their rows. Then `info.json`, with class
names, shape, the train split's per-channel mean/std (counted on the way) and counts. The folder
is written beside the output folder and replaces it whole once complete (`staged_dir`), so a
refusal midway (an unreadable image, say) leaves the last prepared data as it was, and a
success leaves exactly the new files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .io import staged_dir
from .params import DataParams, listed
from .prepared import IMAGE_MODES, SPLITS, ChannelStats, PreparedWriter, copy_rows
from .sources import Source, count, load_source, warn


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


def choose_rows(source: Source, p: DataParams) -> dict[str, tuple[str, torch.Tensor]]:
    """split -> (the source's split it comes from, its rows there, ascending): the source's own
    splits as they are, test and then val carved out of train where the source has none.

    Chosen from the labels alone, before any image is decoded, so an image folder's files keep
    their split whether or not other files turn out unreadable."""
    if "train" not in source.labels:
        raise UserError(f"data.dataset = {p.dataset!r} gave no training images")
    rows = {name: (name, torch.arange(len(labels))) for name, labels in source.labels.items()}
    carved = []
    for split, fraction, seed in (("test", p.test_fraction, p.split_seed), ("val", p.val_fraction, p.split_seed + 1)):
        if split not in rows:
            train_rows = rows["train"][1]
            keep, take = stratified_split(source.labels["train"][train_rows], fraction, seed)
            rows["train"], rows[split] = ("train", train_rows[keep]), ("train", train_rows[take])
            carved.append(split)
    warn_classes_left_out(source, rows, carved)
    for name in SPLITS:
        if len(rows[name][1]) == 0:
            raise UserError(f"the {name} split is empty; use more images or change data.val_fraction / "
                            "data.test_fraction")
    return {name: rows[name] for name in SPLITS}


def warn_classes_left_out(source: Source, rows: dict[str, tuple[str, torch.Tensor]], carved: list[str]) -> None:
    """One warning naming the classes too small to give each carved split an image (a class of one
    image stays in train alone): val and test say nothing about them."""
    n = len(source.class_names)
    left_out: dict[int, list[str]] = {}
    for split in carved:
        native, idx = rows[split]
        for c in torch.nonzero(torch.bincount(source.labels[native][idx], minlength=n) == 0).flatten().tolist():
            left_out.setdefault(c, []).append(split)
    if not left_out:
        return
    totals = torch.bincount(source.labels["train"], minlength=n).tolist()
    named = [f"{source.class_names[c]} ({count(totals[c], 'image')}: no {' or '.join(splits)} image)"
             for c, splits in sorted(left_out.items())]
    warn(f"{count(len(named), 'class', 'classes')} too small to split: {listed(named, 10)}; "
         "val and test cannot measure them; add images to them")


def image_shape(source: Source, p: DataParams) -> tuple[int, int, int]:
    if source.files:
        return p.channels, p.image_size, p.image_size
    return tuple(source.images["train"].shape[1:])


def prepare_data(p: DataParams, out_dir: str | Path) -> dict:
    """Run the stage: read the source, split, write the splits and info.json; return the info."""
    source = load_source(p)
    rows = choose_rows(source, p)
    labels = {split: source.labels[native][idx].numpy() for split, (native, idx) in rows.items()}
    shape = image_shape(source, p)
    stats = ChannelStats(shape[0])  # of the train split, counted while it is written
    skipped: list[tuple[str, str]] = []
    with staged_dir(out_dir) as staged, PreparedWriter(staged, labels, shape) as out:
        if source.files:
            from .sources.imagefolder import decode_into, report_skipped

            files = {split: [source.files[native][i] for i in idx.tolist()] for split, (native, idx) in rows.items()}
            skipped = decode_into(out.splits, files, p.resize, p.skip_bad_images, stats)
            report_skipped(skipped)
        else:
            for split, (native, idx) in rows.items():
                copy_rows(out.splits[split], source.images[native], idx, stats if split == "train" else None)
        written = {split: torch.from_numpy(writer.labels) for split, writer in out.splits.items()}
        for split in SPLITS:
            if len(written[split]) == 0:  # every file of the split was unreadable
                raise UserError(f"no readable images in the {split} split under {p.root} "
                                f"({count(len(skipped), 'unreadable file')} skipped)")
        mean, std = stats.mean_std()
        num_classes = len(source.class_names)
        info = {
            "dataset": p.dataset,
            "class_names": source.class_names,
            "num_classes": num_classes,
            "shape": list(shape),
            "mean": mean,
            "std": std,
            "counts": {name: len(written[name]) for name in SPLITS},
            "class_counts": {name: torch.bincount(written[name], minlength=num_classes).tolist() for name in SPLITS},
            "skipped_bad_images": len(skipped),
            # How a new image file becomes pixels like these (`predict` reads it from the model file).
            # Only image folders are resized here; for the others it is how predict fits a photo.
            "image_mode": IMAGE_MODES[shape[0]],
            "resize": p.resize if source.files else "stretch",
        }
        out.commit(info)
    return info
