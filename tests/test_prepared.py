"""The prepared split files: written in place in chunks with the bytes safetensors writes, read
memory-mapped, and refused by name when damaged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.errors import UserError
from stages.io import save_tensors
from stages.prepared import SplitWriter, load_prepared, split_path, write_info

from .helpers import ROOT


def random_split(n: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def written_at_once(path: Path, images: np.ndarray, labels: np.ndarray) -> bytes:
    """What safetensors itself writes for the whole split in memory (today's `save_tensors`)."""
    save_tensors(path, {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)})
    return path.read_bytes()


@pytest.mark.parametrize("n, shape", [(0, (1, 8, 8)), (1, (3, 4, 4)), (7, (1, 28, 28)), (999, (3, 5, 7)),
                                      (1000, (1, 8, 8)), (2345, (3, 16, 16))])
@pytest.mark.parametrize("chunk", [1, 97, None])
def test_split_written_in_chunks_is_byte_identical_to_one_written_at_once(tmp_path, n, shape, chunk):
    images, labels = random_split(n, shape)
    writer = SplitWriter(tmp_path / "chunked", "train", labels, shape)
    chunk = chunk or max(n, 1)
    starts = list(range(0, n, chunk))
    for start in reversed(starts):  # any order: each chunk lands at its own offset
        writer.write_rows(start, images[start : start + chunk])
    writer.commit()
    assert not list((tmp_path / "chunked").glob("*.tmp"))
    assert split_path(tmp_path / "chunked", "train").read_bytes() == written_at_once(tmp_path / "once", images, labels)


def test_dropped_rows_leave_the_file_of_the_rows_kept(tmp_path):
    images, labels = random_split(300, (3, 6, 6), seed=1)
    writer = SplitWriter(tmp_path, "val", labels, (3, 6, 6))
    bad = [0, 17, 18, 150, 299]
    for start in range(0, 300, 64):
        block = images[start : start + 64].copy()
        block[[i - start for i in bad if start <= i < start + 64]] = 0  # a decoder leaves unreadable rows zero
        writer.write_rows(start, block)
    writer.drop_rows(bad)
    writer.commit()
    keep = np.setdiff1d(np.arange(300), bad)
    assert writer.labels.tolist() == labels[keep].tolist()
    assert split_path(tmp_path, "val").read_bytes() == written_at_once(tmp_path / "x", images[keep], labels[keep])
    assert not list(tmp_path.glob(".*.tmp"))


def prepared_folder(path: Path, n: int, shape: tuple[int, int, int]) -> Path:
    images, labels = random_split(n, shape)
    for split in ("train", "val", "test"):
        writer = SplitWriter(path, split, labels, shape)
        writer.write_rows(0, images)
        writer.commit()
    write_info(path, {"shape": list(shape)})
    return path


def test_splits_are_memory_mapped_not_read_into_memory(tmp_path):
    """Loading a 48 MB split and reading every pixel of it leaves the process's private memory
    (RssAnon) where it was: the pages are the file's, in the page cache."""
    data = prepared_folder(tmp_path / "data", 4096, (3, 64, 64))  # 48 MiB of images
    code = f"""
import torch
from stages.prepared import load_prepared

def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) // 1024

images, labels, _ = load_prepared({str(data)!r}, 'train')
before = rss('RssAnon'), rss('RssFile')
total = int(images.sum(dtype=torch.int64))  # touches every page of the split
after = rss('RssAnon'), rss('RssFile')
address = images.data_ptr()
mapped = next(line.split()[-1] for line in open('/proc/self/maps')
              if int(line.split()[0].split('-')[0], 16) <= address < int(line.split()[0].split('-')[1], 16))
print(after[0] - before[0], after[1] - before[1], mapped, total > 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    anon_growth, file_growth, mapped, touched = proc.stdout.split()
    assert mapped == str(split_path(data, "train").resolve())  # the tensor's memory is a mapping of the file
    assert touched == "True"
    assert int(anon_growth) < 8, f"RssAnon grew by {anon_growth} MB reading a 48 MB split"
    assert int(file_growth) >= 40, f"RssFile grew by only {file_growth} MB: were the pages read at all?"


@pytest.mark.parametrize("cut", [4, 100, -1, -4096])
def test_truncated_split_is_refused_by_name(tmp_path, cut):
    data = prepared_folder(tmp_path / "data", 64, (1, 8, 8))
    path = split_path(data, "val")
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(UserError, match=f"^{path} is damaged"):
        load_prepared(data, "val")
    images, _, _ = load_prepared(data, "train")  # the other splits still load
    assert images.shape == (64, 1, 8, 8)
