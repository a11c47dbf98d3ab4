"""The user's own images: one folder per class, optionally under train/, val/ and test/.

Layouts under `data.root` (folder names are matched case-insensitively):

    root/train/<class>/...   root/test/<class>/...   root/val/<class>/...   the splits as given
    root/<class>/...                                                       prepare_data carves val and test

Class names are the train folder's class folders, sorted. A class may be missing from
val/ or test/; a class folder there that train/ lacks is an error. Images may sit in
nested folders below their class folder. Hidden files and folders (".name") are skipped,
and so are files whose extension is not one PIL can open here (README.md, Thumbs.db, ...).

Each image is decoded (JPEGs in Pillow's draft mode, which shrinks large photos while
decoding), turned upright by its EXIF orientation, flattened onto white where it has
transparency, converted to `data.channels` (1 -> "L", 3 -> "RGB") and brought to
`data.image_size` square by `data.resize` (bilinear, antialiased): `crop` scales the shorter
side to the size and keeps the centre, as torchvision's Resize + CenterCrop do; `stretch`
squeezes the whole image. `images.open_resized` is that one function; predict uses it too.

This module lists the files only. prepare-data splits the list, and the writer (`stages/fill.py`)
has `FileRows` decode them on every core straight into their rows of the split files: nothing
holds the dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..console import warn
from ..errors import UserError
from ..images import image_extensions, images_below
from ..params import DataParams, listed, plural
from ..prepared import IMAGE_MODES
from . import FileRows, Source

# Folder names that mark a split (lower case) -> the split they hold.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class SplitFiles:
    paths: list[str]
    labels: list[int]


def visible(path: Path) -> bool:
    return not path.name.startswith(".")


def subfolders(folder: Path, links: list[str] | None = None) -> list[Path]:
    """The visible folders in `folder`, by name; folder links are left out and listed in `links` (DVC does not
    track what they point to: a queued run or a teammate's clone would not have their images)."""
    found = []
    for p in folder.iterdir():
        if p.is_dir() and visible(p):
            if p.is_symlink() and links is not None:
                links.append(str(p))
            else:
                found.append(p)
    return sorted(found, key=lambda p: p.name)


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
                        f"with other folders ({listed(others)}); move class folders into the split folders")
    if "train" not in by_split:
        raise UserError(f"{root} has {', '.join(f.name + '/' for f in splits.values())} but no train/ folder")
    return {split: by_split[split] for split in ("train", "val", "test") if split in by_split}


def list_files(split_folders: dict[str, Path], links: list[str]) -> tuple[list[str], dict[str, SplitFiles], int]:
    """(class names, split -> files and labels, count of ignored non-image files); folder links left out are
    added to `links`."""
    extensions = image_extensions()
    class_names = [f.name for f in subfolders(split_folders["train"], links)]
    if not class_names:
        raise UserError(f"no class folders in {split_folders['train']}: expected one folder per class")
    if len(class_names) == 1:  # a classifier of one class learns nothing, and every score would be 1.0
        raise UserError(f"only one class folder in {split_folders['train']} ({class_names[0]}/); a classifier needs "
                        "at least two: put one folder of images per class there")
    index = {name: i for i, name in enumerate(class_names)}
    splits, ignored = {}, 0
    for split, folder in split_folders.items():
        files = SplitFiles([], [])
        for class_folder in subfolders(folder, [] if split == "train" else links):  # train's: listed above
            if class_folder.name not in index:
                raise UserError(f"{class_folder} is a class that {split_folders['train']} does not have; "
                                f"classes there: {listed(class_names, 10)}")
            paths, n_ignored = images_below(class_folder, extensions, links)
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


def load_imagefolder_source(p: DataParams) -> Source:
    """List `data.root` as an image folder (see the module docstring for the layouts); nothing is decoded yet."""
    root = Path(p.root)
    links: list[str] = []
    class_names, splits, ignored = list_files(find_split_folders(root), links)
    if ignored:
        warn(f"ignored {plural(ignored, 'file')} under {root} whose extension is not an image format")
    if links:
        named = listed([os.path.relpath(link, root) for link in sorted(links)])
        warn(f"ignored {plural(len(links), 'folder link')} under {root} ({named}): DVC does not track what a "
             "folder link points to, so a queued run or a clone would train without those images; copy them in")
    shape = (p.channels, p.image_size, p.image_size)
    rows = FileRows({name: f.paths for name, f in splits.items()}, IMAGE_MODES[p.channels], p.image_size, p.resize)
    return Source(class_names, {name: np.array(f.labels, dtype=np.int64) for name, f in splits.items()}, shape,
                  rows, resize=p.resize)
