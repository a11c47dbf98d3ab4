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
squeezes the whole image. `decode_image` is that one function; prediction uses it too.

The source lists the files only. prepare-data splits the list, and `decode_into` decodes the
files on every core straight into their rows of the split files: nothing holds the dataset.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..images import (  # decoding one file is shared with predict, which must not need torch
    cpu_count,
    decode_image,
    image_extensions,
    images_below,
    progress_bar,
    warn,
)
from ..images import report_skipped as report_skipped  # prepare-data and predict import it from here
from ..io import write_at
from ..params import DataParams, listed
from ..prepared import IMAGE_MODES, ChannelStats, SplitWriter, channel_histogram
from . import Source, count

# Folder names that mark a split (lower case) -> the split they hold.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_NAMED = 10  # unreadable files named in the one line that refuses them; all of them go to a file
# Files per task handed to a decoder process. Measured on 2 cores with 160x120 JPEGs: 16 files
# per task 2,450 images/s, 64 files 2,730, 256 files 2,530 (fewer: more messages; more: the
# last tasks leave a core idle).
FILES_PER_TASK = 64


@dataclass
class SplitFiles:
    paths: list[str]
    labels: list[int]


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
                        f"with other folders ({listed(others)}); move class folders into the split folders")
    if "train" not in by_split:
        raise UserError(f"{root} has {', '.join(f.name + '/' for f in splits.values())} but no train/ folder")
    return {split: by_split[split] for split in ("train", "val", "test") if split in by_split}


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
                                f"classes there: {listed(class_names, 10)}")
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


# --- decoding into the split files, on every core ------------------------------------------------


@dataclass(frozen=True)
class Task:
    """FILES_PER_TASK files for one decoder: where their rows go in which split file, and how to decode."""

    split: str
    start: int  # the first file's row in the split
    paths: list[str]
    file: str  # the split file being written
    images_offset: int  # where its image rows start
    shape: tuple[int, int, int]
    resize: str
    histogram: bool  # the train split's tasks count pixel values for mean/std

    @property
    def mode(self) -> str:
        return IMAGE_MODES[self.shape[0]]


_buffers = threading.local()  # one per decoder (process or thread)


def task_buffer(n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A decoder's rows buffer, reused from task to task: a fresh 3 MB array per task would cost
    page faults and zeroing on every image."""
    buffer = getattr(_buffers, "rows", None)
    if buffer is None or buffer.shape[1:] != shape or len(buffer) < n:
        buffer = _buffers.rows = np.empty((max(n, FILES_PER_TASK), *shape), dtype=np.uint8)
    return buffer[:n]


def decode_task(task: Task) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
    """Decode a task's files into their rows of the split file (one write for all of them).

    Returns the task's pixel-value counts per channel (train split) and its unreadable files as
    (row, reason); their rows stay zero, to be dropped or refused by the caller."""
    rows = task_buffer(len(task.paths), task.shape)
    bad = []
    for i, path in enumerate(task.paths):
        result = decode_image(path, task.mode, task.shape[1], task.resize)
        if isinstance(result, str):
            bad.append((i, result))
            rows[i] = 0
        else:
            rows[i] = result
    write_at(task.file, task.images_offset + task.start * rows[0].nbytes, rows)
    counts = None
    if task.histogram:
        counts = channel_histogram(np.delete(rows, [i for i, _ in bad], axis=0) if bad else rows)
    return counts, [(task.start + i, reason) for i, reason in bad]


def ignore_interrupts() -> None:
    """Decoder processes leave Ctrl-C to the stage, which stops them, and die of the SIGTERM it stops them
    with: a handler inherited from the parent that raises instead (torch's elastic agent installs one)
    would be caught as an unreadable image by the decoder, which would go on and never exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def parallel_map(workers: int):
    """An ordered imap over `workers` decoders.

    Processes, not threads: decoding is Pillow's C code, but the Python around each image
    (EXIF, alpha, the copy into the row) holds the GIL. Measured on this project's 2-core
    machine with 160x120 JPEGs written into the split file: 2,800 images/s on two processes
    against 2,100 on two threads. Forked, so a decoder starts in milliseconds with everything
    already imported (spawn or forkserver would import torch again, about 4 s each). Where fork
    is not the platform's way (macOS, Windows), threads; with one decoder, this process.
    """
    if workers <= 1:
        yield map
        return
    if sys.platform.startswith("linux"):
        with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process; the
            warnings.simplefilter("ignore", DeprecationWarning)  # decoders use no lock the threads hold
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=ignore_interrupts)
    else:
        pool = multiprocessing.pool.ThreadPool(workers)
    with pool:  # leaving it terminates the decoders: at once on an error
        yield pool.imap


def decode_into(writers: dict[str, SplitWriter], files: dict[str, list[str]], resize: str, skip_bad: bool,
                stats: ChannelStats) -> list[tuple[str, str]]:
    """Decode every split's files into its split file, in parallel; returns the skipped (path, reason).
    Without `skip_bad`, unreadable files are refused together once all files are decoded, so a
    folder's bad files are all named by one run.

    One stream of tasks covers all splits (train first), so the decoders never wait between
    splits; results come back in task order, so unreadable files are named in the same order
    every time. When a split's last task is in, its unreadable rows are dropped and the file is
    flushed on a background thread while the next split decodes. Pixel values of the train
    split are counted as they are decoded, for mean/std.
    """
    tasks = []
    for split, writer in writers.items():
        paths = files[split]
        tasks += [Task(split, start, paths[start : start + FILES_PER_TASK], str(writer.tmp), writer.images_offset,
                       writer.shape, resize, histogram=split == "train")
                  for start in range(0, len(paths), FILES_PER_TASK)]
    left = {split: sum(t.split == split for t in tasks) for split in writers}
    bad_rows: dict[str, list[int]] = {split: [] for split in writers}
    skipped: list[tuple[str, str]] = []
    total = sum(len(f) for f in files.values())
    workers = max(1, min(cpu_count(), len(tasks)))
    started = time.perf_counter()
    with parallel_map(workers) as imap, ThreadPoolExecutor(1) as finisher, progress_bar(total, "decode") as bar:
        finishing = []
        for task, (counts, bad) in zip(tasks, imap(decode_task, tasks)):
            bar.update(len(task.paths))
            for row, reason in bad:
                skipped.append((files[task.split][row], reason))
                bad_rows[task.split].append(row)
            if counts is not None:
                stats.add(counts)
            left[task.split] -= 1
            if left[task.split] == 0 and (skip_bad or not skipped):  # a refusal comes: nothing to finish
                finishing.append(finisher.submit(finish_split, writers[task.split], bad_rows[task.split]))
        for job in finishing:
            job.result()  # an error while flushing surfaces here
    if skipped and not skip_bad:
        refuse_unreadable(skipped)
    seconds = time.perf_counter() - started
    how = "1 process" if workers == 1 else f"{workers} {'processes' if sys.platform.startswith('linux') else 'threads'}"
    print(f"decoded {total:,} images in {seconds:.2f} s ({total / max(seconds, 1e-9):,.0f} images/s, {how})")
    return skipped


def finish_split(writer: SplitWriter, bad_rows: list[int]) -> None:
    writer.drop_rows(bad_rows)
    writer.sync()


def refuse_unreadable(bad: list[tuple[str, str]]) -> None:
    """One line for all the unreadable files, so that one run finds them all: each named with its
    reason up to MAX_NAMED, and beyond that the full list written to a file the line names. Sorted by
    path, so that files of one folder stand together whichever split they were drawn into."""
    bad = sorted(bad)
    if len(bad) == 1:
        path, reason = bad[0]
        raise UserError(f"cannot read image {path}: {reason}; fix or remove it, "
                        f"or set data.skip_bad_images: true to skip such files")
    named = ", ".join(f"{path} ({reason})" for path, reason in bad[:MAX_NAMED])
    if len(bad) > MAX_NAMED:
        fd, full_list = tempfile.mkstemp(prefix="unreadable-images-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in bad)
        named += f" and {len(bad) - MAX_NAMED:,} more (all {len(bad):,} in {full_list})"
    raise UserError(f"cannot read {count(len(bad), 'image')}: {named}; fix or remove them, "
                    f"or set data.skip_bad_images: true to skip such files")


def load_imagefolder_source(p: DataParams) -> Source:
    """List `data.root` as an image folder (see the module docstring for the layouts); nothing is decoded yet."""
    root = Path(p.root)
    class_names, splits, ignored = list_files(find_split_folders(root))
    if ignored:
        warn(f"ignored {count(ignored, 'file')} under {root} whose extension is not an image format")
    return Source(class_names, labels={name: torch.tensor(f.labels, dtype=torch.int64) for name, f in splits.items()},
                  files={name: f.paths for name, f in splits.items()})
