"""The user's own images: one folder per class, optionally under train/, val/ and test/.

Layouts under `data.root` (folder names are matched case-insensitively):

    root/train/<class>/...   root/test/<class>/...   root/val/<class>/...   the splits as given
    root/<class>/...                                                       prepare_data carves val and test

Class names are the train folder's class folders, sorted. A class may be missing from
val/ or test/; a class folder there that train/ lacks is an error. Images may sit in
nested folders below their class folder. Hidden files and folders (".name") are skipped,
and so are files whose extension is not one PIL can open here (README.md, Thumbs.db, ...).

Each image is decoded, turned upright by its EXIF orientation, flattened onto white where
it has transparency, converted to `data.channels` (1 -> "L", 3 -> "RGB") and resized to
`data.image_size` square (bilinear, antialiased; not cropped, so non-square images are
stretched). Decoding runs on a thread pool and every image is written into one
preallocated uint8 array per split: no list of per-image tensors, no float copy.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UserError
from ..params import DataParams
from ..prepared import IMAGE_MODES
from . import Source

# Folder names that mark a split (lower case) -> the split they hold.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_WARNINGS = 20  # skipped files named one per line; the rest are counted
BATCH_FILES = 1024  # files handed to the pool at a time


@dataclass
class SplitFiles:
    paths: list[str]
    labels: list[int]


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats this PIL can open, not only save."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def visible(path: Path) -> bool:
    return not path.name.startswith(".")


def subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and visible(p)), key=lambda p: p.name)


def find_split_folders(root: Path) -> dict[str, Path]:
    """split name -> the folder holding its class folders; only "train" when root holds class folders."""
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder; put one folder per class there")
    folders = subfolders(root)
    if not folders:
        raise UserError(f"no class folders in {root}: expected one folder per class, "
                        f"or train/ (and test/ or val/) folders that hold them")
    splits = {f.name.lower(): f for f in folders if f.name.lower() in SPLIT_FOLDERS}
    if not splits:
        return {"train": root}
    by_split: dict[str, Path] = {}
    for name, folder in splits.items():
        split = SPLIT_FOLDERS[name]
        if split in by_split:
            raise UserError(f"{root} has both {by_split[split].name}/ and {folder.name}/; keep one folder per split")
        by_split[split] = folder
    others = [f.name for f in folders if f.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise UserError(f"{root} mixes split folders ({', '.join(f.name + '/' for f in splits.values())}) "
                        f"with other folders ({listing(others, 3)}); move class folders into the split folders")
    if "train" not in by_split:
        raise UserError(f"{root} has {', '.join(f.name + '/' for f in splits.values())} but no train/ folder")
    return {split: by_split[split] for split in ("train", "val", "test") if split in by_split}


def images_below(folder: Path, extensions: frozenset[str]) -> tuple[list[str], int]:
    """Image files under `folder` (recursive, sorted) and how many other visible files were ignored."""
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # do not descend into hidden folders
        for name in filenames:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in extensions:
                images.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return sorted(images), ignored


def list_files(split_folders: dict[str, Path]) -> tuple[list[str], dict[str, SplitFiles], int]:
    """(class names, split -> files and labels, count of ignored non-image files)."""
    extensions = image_extensions()
    class_names = [f.name for f in subfolders(split_folders["train"])]
    if not class_names:
        raise UserError(f"no class folders in {split_folders['train']}: expected one folder per class")
    index = {name: i for i, name in enumerate(class_names)}
    splits, ignored = {}, 0
    for split, folder in split_folders.items():
        files = SplitFiles([], [])
        for class_folder in subfolders(folder):
            if class_folder.name not in index:
                raise UserError(f"{class_folder} is a class that {split_folders['train']} does not have; "
                                f"classes there: {listing(class_names)}")
            paths, n_ignored = images_below(class_folder, extensions)
            if not paths and split == "train":
                raise UserError(f"no images in {class_folder}: expected files PIL can open "
                                "(.png, .jpg, .bmp, .webp, ...)")
            files.paths += paths
            files.labels += [index[class_folder.name]] * len(paths)
            ignored += n_ignored
        if not files.paths:
            raise UserError(f"no images in {folder}: expected one folder of images per class")
        splits[split] = files
    return class_names, splits, ignored


# --- decoding one file (runs on the pool's threads) ---


def eight_bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit by scaling; PIL's own convert clips everything above 255 to white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(img).astype(np.int64).clip(0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8))  # 2-D uint8 -> mode "L"
    return img


def flatten_on_white(img: Image.Image) -> Image.Image:
    """Composite images with transparency onto white.

    A plain convert drops alpha and shows whatever colour the encoder left under the
    transparent pixels (often black), so the same picture would look different
    depending on how it was saved; white is what viewers and most documents show.
    """
    if not img.has_transparency_data:
        return img
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def decode_image(path: str, mode: str, size: int) -> np.ndarray | str:
    """One file -> uint8 (C, size, size), or the reason it cannot be read (for the error message)."""
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty"
        with Image.open(path) as img:
            img.draft(mode, (size, size))  # JPEG: the decoder shrinks by 1/2..1/8 itself; far faster for photos
            ImageOps.exif_transpose(img, in_place=True)  # photos: upright as viewers show them
            img = flatten_on_white(eight_bit(img)).convert(mode)
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for damaged files
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# --- decoding a split into one array ---


def worker_count(n_files: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, n_files // 64))


def make_pool(n_files: int) -> Executor:
    """Threads, not processes: PIL releases the GIL while it decodes and resizes, threads
    start at once and hand back arrays without pickling. Measured on this project's 2-core
    machine, 1,800 32x32 PNGs: 0.17 s on two threads, 0.19 s on one, 0.48 s on two forked
    processes, about 3 s with spawn or forkserver (each worker imports torch again)."""
    return ThreadPoolExecutor(worker_count(n_files))


def progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def decode_split(pool: Executor, files: SplitFiles, mode: str, size: int, skip_bad: bool, desc: str
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode every file into one preallocated uint8 array (N, C, size, size).

    Results come back in file order; good images fill the rows from the top, so skipped
    files leave no gaps and the result is a view, never a copy. Files go to the pool in
    batches so that a huge folder does not queue a million futures, and a bad file stops
    the work within one batch. Returns (images, labels, skipped (path, reason) pairs).
    """
    channels = 1 if mode == "L" else 3
    images = np.empty((len(files.paths), channels, size, size), dtype=np.uint8)
    labels = np.empty(len(files.paths), dtype=np.int64)
    skipped: list[tuple[str, str]] = []
    row = 0
    decode = partial(decode_image, mode=mode, size=size)
    with progress_bar(len(files.paths), desc) as bar:
        for start in range(0, len(files.paths), BATCH_FILES):
            paths = files.paths[start : start + BATCH_FILES]
            for path, label, result in zip(paths, files.labels[start : start + BATCH_FILES], pool.map(decode, paths)):
                bar.update(1)
                if isinstance(result, str):
                    if not skip_bad:
                        raise UserError(f"cannot read image {path}: {result}; fix or remove it, "
                                        f"or set data.skip_bad_images: true to skip such files")
                    skipped.append((path, result))
                    continue
                images[row], labels[row] = result, label
                row += 1
    return images[:row], labels[:row], skipped


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped[:MAX_WARNINGS]:
        warn(f"skipped unreadable image {path}: {reason}")
    if len(skipped) > MAX_WARNINGS:
        warn(f"... and {len(skipped) - MAX_WARNINGS} more unreadable images skipped")


def load_imagefolder_source(p: DataParams) -> Source:
    """Read `data.root` as an image folder; see the module docstring for the layouts."""
    root = Path(p.root)
    class_names, splits, ignored = list_files(find_split_folders(root))
    if ignored:
        warn(f"ignored {ignored} files under {root} whose extension is not an image format")
    mode = IMAGE_MODES[p.channels]
    tensors, skipped = {}, []
    pool = make_pool(sum(len(f.paths) for f in splits.values()))
    try:
        for split, files in splits.items():
            images, labels, bad = decode_split(pool, files, mode, p.image_size, p.skip_bad_images, f"decode {split}")
            if len(labels) == 0:
                raise UserError(f"no readable images in the {split} split under {root} "
                                f"({len(bad)} unreadable files skipped)")
            tensors[split] = (torch.from_numpy(images), torch.from_numpy(labels))
            skipped += bad
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, do not decode the rest first
    report_skipped(skipped)
    return Source(splits=tensors, class_names=class_names, skipped_bad_images=len(skipped))
