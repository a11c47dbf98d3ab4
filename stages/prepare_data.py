"""The prepare-data stage: a source -> seeded, stratified train/val/test splits on disk.

Reads the dataset that `data.dataset` names (`sources/`), chooses the rows of each split from
the labels alone (carving the splits the source does not have), then writes the prepared folder
(`prepared.py`) with the one writer every source goes through (`fill.py`), in chunks: arrays are
copied row block by row block, image files are decoded on every core straight into their rows.
No torch: an image folder is prepared without paying for its import. Then `info.json`, with class
names, shape, the train split's per-channel mean/std (counted on the way), counts and the data.*
params that made it. The folder is written beside the output folder and replaces it whole once
complete (`staged_dir`), so a refusal midway (an unreadable image, say) leaves the last prepared
data as it was, and a success leaves exactly the new files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .console import report_skipped, warn
from .errors import UserError
from .fill import fill_splits
from .io import staged_dir
from .params import DataParams, listed, plural
from .prepared import SPLITS, ChannelStats, PreparedWriter, prepared_params
from .sources import Source, load_source


def randperm(n: int, random: np.random.RandomState) -> np.ndarray:
    """torch.randperm(n, generator=g) for a CPU generator g seeded as `random` is, without importing torch
    (about 1 s of this stage's start for an image folder): torch draws one 32-bit Mersenne Twister output
    per swap (ATen's randperm_cpu for n under 2^32 / 20: z = random() % (n - i), swap r[i] and r[i + z])
    from the generator that manual_seed(seed) starts like MT19937's init_genrand(seed), which is what
    numpy's RandomState(seed) is. tests/test_helpers.py checks it against torch itself."""
    perm = np.arange(n, dtype=np.int64)
    if n > 1:
        draws = random.randint(0, 2**32, size=n - 1, dtype=np.uint32).astype(np.int64)  # the raw outputs
        for i, z in enumerate((draws % np.arange(n, 1, -1)).tolist()):
            perm[i], perm[i + z] = perm[i + z], perm[i]
    return perm


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, take): `take` holds about `fraction` of every class, chosen with `seed`."""
    random = np.random.RandomState(seed & 0xFFFFFFFF)  # torch.manual_seed keeps the low 32 bits too
    keep, take = [], []
    for cls in np.unique(labels).tolist():
        idx = np.flatnonzero(labels == cls)
        idx = idx[randperm(len(idx), random)]
        n_take = int(round(len(idx) * fraction))
        if len(idx) >= 2:  # leave at least one sample of each class on both sides
            n_take = min(max(n_take, 1), len(idx) - 1)
        take.append(idx[:n_take])
        keep.append(idx[n_take:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


def choose_rows(source: Source, p: DataParams) -> dict[str, tuple[str, np.ndarray]]:
    """split -> (the source's split it comes from, its rows there, ascending): the source's own
    splits as they are, test and then val carved out of train where the source has none.

    Chosen from the labels alone, before any image is decoded, so an image folder's files keep
    their split whether or not other files turn out unreadable."""
    if "train" not in source.labels:
        raise UserError(f"data.dataset = {p.dataset!r} gave no training images")
    rows = {name: (name, np.arange(len(labels))) for name, labels in source.labels.items()}
    for split, fraction, seed in (("test", p.test_fraction, p.split_seed), ("val", p.val_fraction, p.split_seed + 1)):
        if split not in rows:
            train_rows = rows["train"][1]
            keep, take = stratified_split(source.labels["train"][train_rows], fraction, seed)
            rows["train"], rows[split] = ("train", train_rows[keep]), ("train", train_rows[take])
    for name in SPLITS:
        if len(rows[name][1]) == 0:
            raise UserError(f"the {name} split is empty; use more images or change data.val_fraction / "
                            "data.test_fraction")
    return {name: rows[name] for name in SPLITS}


def from_train(rows: dict[str, tuple[str, np.ndarray]]) -> list[str]:
    """The splits drawn from the source's train split: train, and test and val where they were carved from it."""
    return [split for split in ("train", "test", "val") if rows[split][0] == "train"]


def refuse_classes_left_unreadable(source: Source, rows: dict[str, tuple[str, np.ndarray]],
                                   written: dict[str, np.ndarray], skipped: int) -> None:
    """With data.skip_bad_images, a class whose training files were all unreadable would be trained as a
    class without an image; refused as a class folder without images is (sources/imagefolder.py)."""
    if not skipped:
        return
    n = len(source.class_names)
    listed_files = np.bincount(source.labels["train"], minlength=n)
    readable = sum(np.bincount(written[split], minlength=n) for split in from_train(rows))
    empty = np.flatnonzero((readable == 0) & (listed_files > 0)).tolist()
    if not empty:
        return
    root = Path(source.class_root) if source.class_root else None

    def where(c: int) -> str:
        name = source.class_names[c]
        return f"{root / name} (class {name})" if root else f"class {name}"

    if len(empty) == 1:
        c = empty[0]
        files = "its one file was" if listed_files[c] == 1 else f"its {listed_files[c]:,} files were all"
        raise UserError(f"no readable images in {where(c)}: {files} skipped as unreadable "
                        "(data.skip_bad_images); fix or replace them, or remove the class folder")
    named = listed([f"{where(c)}: {plural(int(listed_files[c]), 'file')}" for c in empty], 10)
    raise UserError(f"no readable images in {len(empty)} classes, whose files were all skipped as unreadable "
                    f"(data.skip_bad_images): {named}; fix or replace them, or remove those class folders")


def warn_classes_left_out(source: Source, rows: dict[str, tuple[str, np.ndarray]],
                          written: dict[str, np.ndarray]) -> None:
    """One warning naming the classes too small to give each carved split an image (a class of one
    image stays in train alone): val and test say nothing about them. Counted on the images written,
    so a class whose only test image was skipped as unreadable is named too."""
    n = len(source.class_names)
    left_out: dict[int, list[str]] = {}
    for split in from_train(rows)[1:]:
        for c in np.flatnonzero(np.bincount(written[split], minlength=n) == 0).tolist():
            left_out.setdefault(c, []).append(split)
    if not left_out:
        return
    totals = sum(np.bincount(written[split], minlength=n) for split in from_train(rows)).tolist()
    named = [f"{source.class_names[c]} ({plural(totals[c], 'image')}: no {' or '.join(splits)} image)"
             for c, splits in sorted(left_out.items())]
    warn(f"{plural(len(named), 'class', 'classes')} too small to split: {listed(named, 10)}; "
         "val and test cannot measure them; add images to them")


def prepare_data(p: DataParams, out_dir: str | Path) -> dict:
    """Run the stage: read the source, split, write the splits and info.json; return the info."""
    source = load_source(p)
    rows = choose_rows(source, p)
    labels = {split: source.labels[native][idx] for split, (native, idx) in rows.items()}
    stats = ChannelStats(source.shape[0])  # of the train split, counted while it is written
    with staged_dir(out_dir) as staged, PreparedWriter(staged, labels, source.shape) as out:
        skipped = fill_splits(out.splits, source.rows, rows, p.skip_bad_images, stats)
        written = {split: writer.labels for split, writer in out.splits.items()}
        for split in SPLITS:
            if len(written[split]) == 0:  # every file of the split was unreadable
                raise UserError(f"no readable images in the {split} split under {p.root} "
                                f"({plural(len(skipped), 'unreadable file')} skipped)")
        refuse_classes_left_unreadable(source, rows, written, len(skipped))
        report_skipped(skipped)  # after the refusals, which are one line each
        warn_classes_left_out(source, rows, written)
        mean, std = stats.mean_std()
        num_classes = len(source.class_names)
        info = {
            "dataset": p.dataset,
            "class_names": source.class_names,
            "num_classes": num_classes,
            "shape": list(source.shape),
            "mean": mean,
            "std": std,
            "counts": {name: len(written[name]) for name in SPLITS},
            "class_counts": {name: np.bincount(written[name], minlength=num_classes).tolist() for name in SPLITS},
            "skipped_bad_images": len(skipped),
            # How a new image file becomes pixels like these (`predict` reads it from the model file).
            "image_mode": source.image_mode,
            "resize": source.resize,
            "params": prepared_params(p),  # checked by every stage that reads the folder
        }
        out.commit(info)
    return info
