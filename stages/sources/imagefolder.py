"""The user's own images: one folder per class, optionally under train/, val/ and test/.

Layouts under `data.root` (folder names are matched case-insensitively):

    root/train/<class>/...   root/test/<class>/...   root/val/<class>/...   the splits as given
    root/<class>/...                                                       prepare_data carves val and test

Class names are the train folder's class folders, sorted. A class may be missing from
val/ or test/; a class folder there that train/ lacks is an error. Images may sit in
nested folders below their class folder. Hidden files and folders (".name") are skipped (a hidden
folder where classes or splits are looked for, such as ".cats", with a warning), and so are files
whose extension is not one PIL can open here (README.md, Thumbs.db, ...). Folders named like a split
(train, test, ...) directly under the root make it the split layout, whatever they hold.

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


def subfolders(folder: Path, links: list[str] | None = None, hidden: list[str] | None = None) -> list[Path]:
    """The visible folders in `folder`, by name; folder links are left out and listed in `links` (DVC does not
    track what they point to: a queued run or a teammate's clone would not have their images), and hidden
    folders (".name") are left out and listed in `hidden` when given."""
    found = []
    for p in folder.iterdir():
        if not p.is_dir():
            continue
        if not visible(p):
            if hidden is not None:
                hidden.append(str(p))
        elif p.is_symlink() and links is not None:
            links.append(str(p))
        else:
            found.append(p)
    return sorted(found, key=lambda p: p.name)


def find_split_folders(root: Path, hidden: list[str] | None = None) -> dict[str, Path]:
    """split name -> the folder holding its class folders; only "train" when root holds class folders.
    Hidden folders in root are listed in `hidden`."""
    if not root.is_dir():
        raise UserError(f"data.root {root} does not exist or is not a folder; put one folder per class there")
    folders = subfolders(root, hidden=hidden)
    if not folders:
        raise UserError(f"no class folders in {root}: expected one folder per class, "
                        f"or train/ (and test/ or val/) folders that hold them")
    splits = {f.name.lower(): f for f in folders if f.name.lower() in SPLIT_FOLDERS}
    if not splits:
        return {"train": root}
    named = ", ".join(f.name + "/" for f in splits.values())
    # Class folders named like splits (a flat layout with classes "train" and "test") hold images, not classes:
    # say why they were read as splits, or the user only sees "no class folders in .../train".
    for folder in splits.values():
        if not subfolders(folder):
            raise UserError(f"{root} has folders named {named}, which are read as a split layout "
                            f"(data.root/train/<class>/..., data.root/test/<class>/...), but {folder} holds no class "
                            "folders; if those are classes, rename their folders (a class folder directly under "
                            f"data.root may not be named {', '.join(SPLIT_FOLDERS)}), or use the split layout")
    by_split: dict[str, Path] = {}
    for name, folder in splits.items():
        split = SPLIT_FOLDERS[name]
        if split in by_split:
            raise UserError(f"{root} has both {by_split[split].name}/ and {folder.name}/; keep one folder per split")
        by_split[split] = folder
    others = [f.name for f in folders if f.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise UserError(f"{root} mixes split folders ({named}) with other folders ({listed(others)}); move class "
                        f"folders into the split folders, or rename class folders named like a split "
                        f"({', '.join(SPLIT_FOLDERS)})")
    if "train" not in by_split:
        raise UserError(f"{root} has {named} but no train/ folder")
    return {split: by_split[split] for split in ("train", "val", "test") if split in by_split}


def list_files(split_folders: dict[str, Path], links: list[str],
               hidden: list[str]) -> tuple[list[str], dict[str, SplitFiles], int]:
    """(class names, split -> files and labels, count of ignored non-image files); folder links left out are
    added to `links`, hidden class folders to `hidden`."""
    extensions = image_extensions()
    class_names = [f.name for f in subfolders(split_folders["train"], links, hidden)]
    if not class_names:
        raise UserError(f"no class folders in {split_folders['train']}: expected one folder per class")
    if len(class_names) == 1:  # a classifier of one class learns nothing, and every score would be 1.0
        raise UserError(f"only one class folder in {split_folders['train']} ({class_names[0]}/); a classifier needs "
                        "at least two: put one folder of images per class there")
    index = {name: i for i, name in enumerate(class_names)}
    splits, ignored = {}, 0
    for split, folder in split_folders.items():
        files = SplitFiles([], [])
        train = split == "train"  # train's links and hidden folders: listed above
        for class_folder in subfolders(folder, [] if train else links, [] if train else hidden):
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
    hidden: list[str] = []
    split_folders = find_split_folders(root, hidden)
    class_names, splits, ignored = list_files(split_folders, links, hidden)
    if ignored:
        warn(f"ignored {plural(ignored, 'file')} under {root} whose extension is not an image format")
    if links:
        named = listed([os.path.relpath(link, root) for link in sorted(links)])
        warn(f"ignored {plural(len(links), 'folder link')} under {root} ({named}): DVC does not track what a "
             "folder link points to, so a queued run or a clone would train without those images; copy them in")
    if hidden:  # a class folder named ".cats" is left out like .git or .ipynb_checkpoints: say so
        named = listed([os.path.relpath(folder, root) for folder in sorted(set(hidden))])
        warn(f"left out {plural(len(set(hidden)), 'hidden folder')} under {root} ({named}): folders whose name "
             "starts with '.' are not read; rename any that is a class or a split")
    shape = (p.channels, p.image_size, p.image_size)
    rows = FileRows({name: f.paths for name, f in splits.items()}, IMAGE_MODES[p.channels], p.image_size, p.resize)
    return Source(class_names, {name: np.array(f.labels, dtype=np.int64) for name, f in splits.items()}, shape,
                  rows, resize=p.resize, class_root=str(split_folders["train"]))
