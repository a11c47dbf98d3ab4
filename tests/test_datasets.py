"""Real on-disk formats -> prepare-data -> one epoch of training; and every bad-data error.

The files are written here in the formats the datasets ship in: IDX for MNIST and
Fashion-MNIST, CIFAR-10's python pickle batches, PNG and JPEG folders mixing grey,
RGB and RGBA at odd sizes. Every image carries its label in its pixels, so the
tests can check that images and labels still line up after decoding and splitting.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stages.cli import app
from stages.console import MAX_WARNINGS
from stages.images import decode_image
from stages.prepared import load_prepared

from .helpers import run_stages, write_params

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LEVELS = {"dark": 40, "light": 220, "mid": 128}  # imagefolder classes: one grey level each


REAL_CONNECT, REAL_CREATE = socket.socket.connect, socket.create_connection


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing here may touch the network: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- writing the real formats ---


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: 0x0000, type 0x08 (ubyte), ndim, big-endian int32 sizes, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def labelled_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose first byte is 20 * label, labels cycling through 0..9."""
    labels = np.arange(n) % 10
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = labels * 20
    return images, labels


def write_mnist_like(root: Path, folder: str, n_train: int = 50, n_test: int = 20) -> None:
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = labelled_images(n, (28, 28), seed)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)


def write_cifar10(root: Path, per_batch: int = 10, dumps=lambda obj: pickle.dumps(obj, protocol=2)) -> None:
    """CIFAR-10's python version: pickled dicts of (n, 3072) uint8 rows (R, G, B planes) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        images, labels = labelled_images(per_batch, (3, 32, 32), seed)
        rows = images.reshape(per_batch, 3072)
        rows[:, 1024], rows[:, 2048] = labels * 20 + 1, labels * 20 + 2  # green and blue planes' first pixels
        batch = {"batch_label": name, "labels": labels.tolist(), "data": rows,
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(dumps(batch))
    meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(dumps(meta))


def py2_pickle(obj) -> bytes:
    """`obj` as Python 2's cPickle wrote the official CIFAR-10 files (protocol 2, numpy 1.x): dicts,
    lists, ints, str as byte strings, and uint8 arrays through numpy.core.multiarray._reconstruct."""

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(n: int) -> bytes:
        return b"K" + bytes([n]) if 0 <= n < 256 else b"J" + struct.pack("<i", n)

    def dump(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(dump(k) + dump(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(dump(v) for v in o) + b"e"
        if isinstance(o, str):
            return string(o.encode())
        if isinstance(o, int):
            return integer(o)
        assert isinstance(o, np.ndarray) and o.dtype == np.uint8
        dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R" \
            + b"(" + integer(3) + string(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + integer(0) + b"tb"
        shape = b"(" + b"".join(integer(n) for n in o.shape) + b"t"
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + integer(0) + b"\x85"
                + string(b"b") + b"\x87R" + b"(" + integer(1) + shape + dtype + b"\x89" + string(o.tobytes())
                + b"tb")

    return b"\x80\x02" + dump(obj) + b"."


def grey_image(level: int, kind: str, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """A uniform grey picture stored in one of several modes and formats: (image, file extension)."""
    w, h = size
    if kind == "L.png":
        return Image.new("L", size, level), ".png"
    if kind == "RGB.png":
        return Image.new("RGB", size, (level,) * 3), ".png"
    if kind == "RGBA.png":  # opaque alpha: must look like the RGB one
        return Image.new("RGBA", size, (level, level, level, 255)), ".png"
    if kind == "RGB.jpg":
        return Image.new("RGB", size, (level,) * 3), ".jpg"
    if kind == "L.jpeg":
        return Image.new("L", size, level), ".JPEG"  # upper-case extension on purpose
    raise ValueError(kind)


KINDS = ["L.png", "RGB.png", "RGBA.png", "RGB.jpg", "L.jpeg"]
SIZES = [(37, 23), (10, 50), (64, 64), (8, 9), (120, 80)]


def write_class(folder: Path, level: int, n: int, nested: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, ext = grey_image(level, KINDS[i % len(KINDS)], SIZES[i % len(SIZES)])
        where = folder / "sub" if nested and i % 2 else folder
        where.mkdir(exist_ok=True)
        img.save(where / f"img{i}{ext}")


def write_junk(folder: Path) -> None:
    """Files a real folder has that are not images: they must be ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "notes.txt").write_text("not an image")


# --- running the CLI ---


runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def prepare(tmp_path: Path, **data) -> tuple[Path, object]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp_path / "params.yaml", data=data,
                          train={"epochs": 1, "batch_size": 16, "accelerator": "cpu"})
    out = tmp_path / "prepared"
    return out, cli("prepare-data", "--params", str(params), "--out", str(out))


def prepare_ok(tmp_path: Path, **data) -> Path:
    out, result = prepare(tmp_path, **data)
    assert result.exit_code == 0, result.output
    return out


def train_one_epoch(tmp_path: Path, prepared: Path) -> None:
    result = cli("train", "--params", str(tmp_path / "params.yaml"), "--data", str(prepared),
                 "--model", str(tmp_path / "model.safetensors"), "--metrics", str(tmp_path / "metrics"),
                 "--checkpoint", str(tmp_path / "checkpoint.safetensors"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    assert "epoch 1/1" in result.output


def assert_user_error(result, *fragments: str) -> None:
    """Exit 2, one line starting 'error:', containing each fragment, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # handled by the CLI, not an uncaught exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def all_splits(prepared: Path) -> dict:
    return {split: load_prepared(prepared, split) for split in ("train", "val", "test")}


# --- torchvision datasets ---


@pytest.mark.parametrize("dataset, folder, classes", [
    ("mnist", "MNIST", ["0 - zero", "1 - one", "2 - two"]),
    ("fashion-mnist", "FashionMNIST", ["T-shirt/top", "Trouser", "Pullover"]),
])
def test_mnist_family_from_idx_files(tmp_path, dataset, folder, classes):
    write_mnist_like(tmp_path / "raw", folder)
    prepared = prepare_ok(tmp_path, dataset=dataset, root=str(tmp_path / "raw"))
    splits = all_splits(prepared)
    info = splits["train"][2]
    assert info["class_names"][:3] == classes and info["num_classes"] == 10
    assert info["shape"] == [1, 28, 28]
    assert info["resize"] == "stretch"  # nothing resized here, whatever data.resize says
    # The official test split stays the test split; val is carved from train (one per class here).
    assert info["counts"] == {"train": 40, "val": 10, "test": 20}
    for images, labels, _ in splits.values():
        assert tuple(images.shape[1:]) == (1, 28, 28)
        assert (images[:, 0, 0, 0].long() == labels * 20).all()  # images and labels still line up
    train_one_epoch(tmp_path, prepared)


CIFAR_WRITERS = {"python 2 cPickle (the official files)": py2_pickle,
                 **{f"python 3 protocol {n}": lambda obj, n=n: pickle.dumps(obj, protocol=n) for n in (2, 4, 5)}}


@pytest.mark.parametrize("dumps", CIFAR_WRITERS.values(), ids=CIFAR_WRITERS.keys())
def test_cifar10_from_python_batches(tmp_path, dumps):
    write_cifar10(tmp_path / "raw", dumps=dumps)
    prepared = prepare_ok(tmp_path, dataset="cifar10", root=str(tmp_path / "raw"))
    splits = all_splits(prepared)
    info = splits["train"][2]
    assert info["class_names"] == CIFAR_CLASSES and info["shape"] == [3, 32, 32]
    assert info["counts"] == {"train": 40, "val": 10, "test": 10}
    for images, labels, _ in splits.values():
        # Each plane's top-left pixel was written as 20 * label + channel: channels stay in R, G, B order.
        for channel in range(3):
            assert (images[:, channel, 0, 0].long() == labels * 20 + channel).all()
    train_one_epoch(tmp_path, prepared)


def test_missing_torchvision_dataset_names_the_folder_and_download(tmp_path):
    (tmp_path / "raw").mkdir()
    _, result = prepare(tmp_path, dataset="mnist", root=str(tmp_path / "raw"))
    assert_user_error(result, str(tmp_path / "raw" / "MNIST" / "raw"), "data.download: true")


def test_gzipped_idx_files_are_pointed_out(tmp_path):
    write_mnist_like(tmp_path / "raw", "MNIST")
    for path in (tmp_path / "raw" / "MNIST" / "raw").iterdir():
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    _, result = prepare(tmp_path, dataset="mnist", root=str(tmp_path / "raw"))
    assert_user_error(result, "still gzipped", "gunzip")


def test_py2_pickle_writes_what_python_reads_back():
    batch = {"labels": [0, 9, 300], "data": np.arange(6, dtype=np.uint8).reshape(2, 3), "name": "x" * 300}
    loaded = pickle.loads(py2_pickle(batch), encoding="latin1")
    assert loaded["labels"] == batch["labels"] and loaded["name"] == batch["name"]
    assert loaded["data"].dtype == np.uint8 and loaded["data"].tolist() == batch["data"].tolist()


class CreatesAFile:
    """Unpickling this calls open(path, "w"): what a crafted batch could do with any other function."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("name", ["data_batch_1", "test_batch", "batches.meta"])
def test_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, name):
    write_cifar10(tmp_path / "raw")
    marker = tmp_path / "pwned"
    crafted = tmp_path / "raw" / "cifar-10-batches-py" / name
    crafted.write_bytes(pickle.dumps({"data": CreatesAFile(marker), "labels": [0]}, protocol=2))
    _, result = prepare(tmp_path, dataset="cifar10", root=str(tmp_path / "raw"))
    assert_user_error(result, f"refusing to load {crafted}", "io.open")
    assert not marker.exists()
    assert not (tmp_path / "prepared").exists()


def test_missing_cifar_file_is_named(tmp_path):
    write_cifar10(tmp_path / "raw")
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").unlink()
    _, result = prepare(tmp_path, dataset="cifar10", root=str(tmp_path / "raw"))
    assert_user_error(result, "cifar-10-batches-py", "missing data_batch_3", "data.download: true")


def test_missing_root_is_named(tmp_path):
    for dataset in ("fashion-mnist", "imagefolder"):
        _, result = prepare(tmp_path, dataset=dataset, root=str(tmp_path / "nowhere"))
        assert_user_error(result, str(tmp_path / "nowhere"), "does not exist")


def test_damaged_idx_file_names_the_folder(tmp_path):
    write_mnist_like(tmp_path / "raw", "MNIST")
    images = tmp_path / "raw" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated download
    _, result = prepare(tmp_path, dataset="mnist", root=str(tmp_path / "raw"))
    assert_user_error(result, str(tmp_path / "raw" / "MNIST" / "raw"), "damaged")


def test_idx_reader_gives_torchvisions_arrays(tmp_path):
    """The project's IDX reader against torchvision's own reading of the same files."""
    from torchvision import datasets

    from stages.sources import idx

    write_mnist_like(tmp_path, "MNIST", n_train=37, n_test=11)
    for split, train in (("train", True), ("test", False)):
        images, labels = idx.read_split(tmp_path / "MNIST" / "raw", split, 10)
        theirs = datasets.MNIST(str(tmp_path), train=train)
        assert images.dtype == np.uint8 and images.shape == (len(theirs), 1, 28, 28)
        assert np.array_equal(images, theirs.data.unsqueeze(1).numpy())
        assert labels.dtype == np.int64 and np.array_equal(labels, theirs.targets.numpy())


def test_mnist_family_names_its_files_and_classes_as_torchvision_does():
    """Class names (written once, in stages/sources/idx.py) and file names are torchvision's own."""
    from torchvision import datasets

    from stages.params import DATASETS
    from stages.sources import idx
    from stages.sources.torchvision_datasets import torchvision_dataset

    for name, dataset in DATASETS.items():
        if dataset.torchvision is None:
            continue
        cls = getattr(datasets, dataset.torchvision[0])
        if hasattr(cls, "resources"):  # the MNIST family: "<name>.gz" downloads, read unpacked
            assert idx.CLASSES[dataset.torchvision[0]] == cls.classes, name
            expected = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
        else:
            expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        assert torchvision_dataset(name).file_names() == expected, name


@pytest.mark.parametrize("dataset, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_prepared_mnist_is_what_torchvisions_arrays_give(tmp_path, monkeypatch, dataset, folder):
    """The prepared files, byte for byte, against the same stage fed torchvision's reading of the files."""
    from torchvision import datasets

    import stages.prepare_data
    from stages.params import DataParams
    from stages.sources import array_source

    write_mnist_like(tmp_path / "raw", folder, n_train=73, n_test=29)
    params = DataParams(dataset=dataset, root=str(tmp_path / "raw"))
    stages.prepare_data.prepare_data(params, tmp_path / "ours")

    def torchvision_source(p):
        splits = {name: getattr(datasets, folder)(p.root, train=name == "train") for name in ("train", "test")}
        return array_source(list(splits["train"].classes), {n: s.targets.numpy() for n, s in splits.items()},
                            {n: s.data.unsqueeze(1).numpy() for n, s in splits.items()})

    monkeypatch.setattr(stages.prepare_data, "load_source", torchvision_source)
    stages.prepare_data.prepare_data(params, tmp_path / "theirs")
    files = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "ours").iterdir()) and "info.json" in files
    for name in files:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def damage_idx(folder: Path, name: str, change) -> Path:
    path = folder / name
    path.write_bytes(change(path.read_bytes()))
    return path


def relabel(data: bytes, labels: np.ndarray) -> bytes:
    return bytes([0, 0, 8, 1]) + struct.pack(">i", len(labels)) + labels.astype(np.uint8).tobytes()


IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
DAMAGES = {  # what happened to a file -> (file, change, what the refusal says)
    "a gzipped file under the unpacked name": (IMAGES, lambda b: gzip.compress(b), "not an IDX file"),
    "another element type (float)": (IMAGES, lambda b: b[:2] + b"\x0d" + b[3:], "type 0x0d"),
    "images where the labels belong": (LABELS, lambda b: b"\0\0\x08\x03" + b[4:], "3 dimensions where 1"),
    "a truncated download": (IMAGES, lambda b: b[:1000], "truncated: 984 bytes of data for sizes 50 x 28 x 28"),
    "a header cut short": (LABELS, lambda b: b[:6], "ends inside its header"),
    "bytes past the end": (IMAGES, lambda b: b + b"\0" * 5, "longer than its header says"),
    "labels of another release": (LABELS, lambda b: relabel(b, np.arange(49) % 10), "50 images but"),
    "a label past the classes": (LABELS, lambda b: relabel(b, np.arange(50) % 11), "label 10, where labels are 0..9"),
}


@pytest.mark.parametrize("change", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_idx_file_is_named_with_what_is_wrong_and_keeps_the_prepared_data(tmp_path, change):
    name, damage, says = change
    write_mnist_like(tmp_path / "raw", "MNIST")
    prepared = prepare_ok(tmp_path, dataset="mnist", root=str(tmp_path / "raw"))
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    path = damage_idx(tmp_path / "raw" / "MNIST" / "raw", name, damage)
    _, result = prepare(tmp_path, dataset="mnist", root=str(tmp_path / "raw"))
    assert_user_error(result, str(path), says)
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before


@contextlib.contextmanager
def local_mirror(monkeypatch, directory: Path, cls: str):
    """torchvision's `cls` downloads from an HTTP server on this machine serving `directory`, the only
    address a connection may be opened to."""
    import functools
    import http.server
    import threading

    from torchvision import datasets

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # not into the stderr the tests read
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = server.server_address

    def only_local(address):
        assert tuple(address[:2]) == local, f"a test tried to connect to {address}"

    monkeypatch.setattr(socket.socket, "connect", lambda self, a: only_local(a) or REAL_CONNECT(self, a))
    monkeypatch.setattr(socket, "create_connection", lambda a, *r, **k: only_local(a) or REAL_CREATE(a, *r, **k))
    monkeypatch.setattr(getattr(datasets, cls), "mirrors", [f"http://127.0.0.1:{local[1]}/"])
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def test_download_fetches_with_torchvision_and_reads_the_files(tmp_path, monkeypatch):
    """data.download: true goes through torchvision's download (its mirrors, md5 checks and gunzip), here
    from an HTTP server on this machine, and the files it unpacked are then read like any others."""
    import hashlib

    from torchvision import datasets

    write_mnist_like(tmp_path / "mirror", "FashionMNIST")
    mirror = tmp_path / "mirror" / "FashionMNIST" / "raw"
    resources = []
    for path in sorted(mirror.iterdir()):
        packed = path.with_name(path.name + ".gz")
        packed.write_bytes(gzip.compress(path.read_bytes()))
        resources.append((packed.name, hashlib.md5(packed.read_bytes()).hexdigest()))
    monkeypatch.setattr(datasets.FashionMNIST, "resources", resources)
    with local_mirror(monkeypatch, mirror, "FashionMNIST"):
        prepared = prepare_ok(tmp_path, dataset="fashion-mnist", root=str(tmp_path / "raw"), download=True)
    for path in mirror.glob("*-ubyte"):
        assert (tmp_path / "raw" / "FashionMNIST" / "raw" / path.name).read_bytes() == path.read_bytes()
    info = all_splits(prepared)["train"][2]
    assert info["counts"] == {"train": 40, "val": 10, "test": 20} and info["class_names"][0] == "T-shirt/top"


def test_a_failed_download_says_why_and_what_to_do_in_one_line(tmp_path, monkeypatch):
    """torchvision's reason spans lines (each mirror tried, what it answered): all of it is in the one line."""
    (tmp_path / "empty").mkdir()
    with local_mirror(monkeypatch, tmp_path / "empty", "MNIST"):  # every file: 404
        _, result = prepare(tmp_path, dataset="mnist", root=str(tmp_path / "raw"), download=True)
    assert_user_error(result, f"could not download mnist into {tmp_path / 'raw' / 'MNIST' / 'raw'} (Error downloading",
                      "HTTP Error 404", "put torchvision's files there by hand (expected train-images-idx3-ubyte, ")
    assert not (tmp_path / "prepared").exists()


# --- image folders ---


def check_grey_levels(splits: dict, class_names: list[str], tolerance: int = 4) -> None:
    """Every image is its class's grey level, whatever mode and format it was stored in."""
    for images, labels, _ in splits.values():
        for image, label in zip(images, labels):
            level = LEVELS[class_names[label]]
            assert (image.int() - level).abs().max() <= tolerance, (class_names[label], image.float().mean())


def test_imagefolder_with_train_and_test_folders(tmp_path):
    root = tmp_path / "photos"
    for name in ("dark", "mid", "light"):
        write_class(root / "train" / name, LEVELS[name], 10)
    for name in ("dark", "light"):  # no "mid" in test: fine
        write_class(root / "Test" / name, LEVELS[name], 4)  # split folder names in any case
    write_junk(root / "train" / "dark")
    prepared = prepare_ok(tmp_path, dataset="imagefolder", root=str(root), image_size=16, channels=3)
    splits = all_splits(prepared)
    info = splits["train"][2]
    assert info["class_names"] == ["dark", "light", "mid"]  # sorted folder names
    assert info["shape"] == [3, 16, 16]
    assert info["counts"] == {"train": 27, "val": 3, "test": 8}
    assert info["class_counts"]["test"] == [4, 4, 0]
    assert info["skipped_bad_images"] == 0
    assert info["resize"] == "crop"  # the default data.resize, recorded for predict
    check_grey_levels(splits, info["class_names"])
    train_one_epoch(tmp_path, prepared)


def test_imagefolder_of_class_folders_only_is_split_by_fractions(tmp_path):
    root = tmp_path / "photos"
    for name in LEVELS:
        write_class(root / name, LEVELS[name], 10, nested=True)  # images in a subfolder count too
    prepared = prepare_ok(tmp_path, dataset="imagefolder", root=str(root), image_size=12, channels=1)
    splits = all_splits(prepared)
    info = splits["train"][2]
    assert info["shape"] == [1, 12, 12]
    assert info["counts"] == {"train": 21, "val": 3, "test": 6}  # 10 per class: 2 test, 1 val, 7 train
    check_grey_levels(splits, info["class_names"])
    train_one_epoch(tmp_path, prepared)


def test_folder_links_in_an_image_folder_are_left_out_with_a_warning_and_file_links_read(tmp_path):
    """DVC tracks a linked file's content but not what a folder link points to (`dvc add` leaves it out): read,
    such images would train here and be missing from a queued run or a clone, with the same dvc.lock."""
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for name in LEVELS:
        write_class(root / name, LEVELS[name], 10)
    first = next(iter(LEVELS))
    write_class(elsewhere / "more", LEVELS[first], 5)
    (root / first / "more").symlink_to(elsewhere / "more")  # a folder link inside a class
    (root / "linked-class").symlink_to(elsewhere / "more")  # a class folder that is a link
    (root / first / "one.png").symlink_to(next((elsewhere / "more").iterdir()))  # a file link: read
    out, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=12, channels=1)
    assert result.exit_code == 0, result.output
    info = all_splits(out)["train"][2]
    assert info["class_names"] == list(LEVELS) and sum(info["counts"].values()) == 10 * len(LEVELS) + 1
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: ignored 2 folder links under {root} ({first}/more, linked-class): DVC does not "
                        "track what a folder link points to, so a queued run or a clone would train without those "
                        "images; copy them in"]


def test_imagefolder_with_val_folder_keeps_it_and_carves_test(tmp_path):
    root = tmp_path / "photos"
    for name in ("dark", "light"):
        write_class(root / "train" / name, LEVELS[name], 10)
        write_class(root / "val" / name, LEVELS[name], 3)
    prepared = prepare_ok(tmp_path, dataset="imagefolder", root=str(root), image_size=8)
    info = load_prepared(prepared, "val")[2]
    assert info["counts"] == {"train": 16, "val": 6, "test": 4}


def test_decoding_flattens_transparency_on_white_and_scales_16_bit(tmp_path):
    clear = Image.new("RGBA", (5, 7), (0, 0, 0, 0))  # transparent black -> white
    clear.save(tmp_path / "clear.png")
    half = Image.new("LA", (6, 6), (0, 128))  # half-transparent black -> mid grey
    half.save(tmp_path / "half.png")
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.save(tmp_path / "palette.png", transparency=0)  # palette entry 0 is transparent
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey, half way
    assert (decode_image(str(tmp_path / "clear.png"), "RGB", 4, "stretch") == 255).all()
    assert (decode_image(str(tmp_path / "palette.png"), "L", 4, "stretch") == 255).all()
    assert abs(int(decode_image(str(tmp_path / "half.png"), "L", 4, "stretch").mean()) - 127) <= 2
    assert decode_image(str(tmp_path / "deep.png"), "L", 4, "stretch").tolist() == np.full((1, 4, 4), 128).tolist()


def test_decoding_keeps_colours_in_rgb_order(tmp_path):
    Image.new("RGB", (30, 20), (200, 100, 50)).save(tmp_path / "orange.png")
    assert decode_image(str(tmp_path / "orange.png"), "RGB", 4, "stretch")[:, 0, 0].tolist() == [200, 100, 50]


def test_decoding_follows_exif_orientation(tmp_path):
    stored = np.zeros((20, 40), np.uint8)
    stored[:, 20:] = 255  # stored: left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = decode_image(str(tmp_path / "phone.jpg"), "L", 8, "stretch")[0]
    assert shown[:3].mean() < 30 and shown[-3:].mean() > 225  # displayed: black on top, white below


def bands(width: int, height: int, colours: list[tuple[int, int, int]], vertical: bool = True) -> Image.Image:
    """Equal bands of solid colour, left to right (vertical) or top to bottom."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate(colours):
        if vertical:
            pixels[:, i * width // len(colours) : (i + 1) * width // len(colours)] = colour
        else:
            pixels[i * height // len(colours) : (i + 1) * height // len(colours)] = colour
    return Image.fromarray(pixels)


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.mark.parametrize("vertical", [True, False])
def test_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path, vertical):
    # 90 x 20 (or 20 x 90): the centre square, 35..55, lies inside the middle band, 30..60, with a
    # margin for the filter's reach (bilinear at half size reads 2 pixels either side).
    size = (90, 20) if vertical else (20, 90)
    bands(*size, [RED, GREEN, BLUE], vertical).save(tmp_path / "wide.png")
    crop = decode_image(str(tmp_path / "wide.png"), "RGB", 10, "crop")
    assert crop.shape == (3, 10, 10)
    assert (crop.reshape(3, -1).T == GREEN).all()  # only the middle band is left
    stretch = decode_image(str(tmp_path / "wide.png"), "RGB", 12, "stretch")
    first, last = (stretch[:, :, 0], stretch[:, :, -1]) if vertical else (stretch[:, 0], stretch[:, -1])
    assert (first.T == RED).all() and (last.T == BLUE).all()  # squeezed: all three bands remain


@pytest.mark.parametrize("size", [(160, 120), (120, 160), (97, 61), (64, 64)])
def test_crop_matches_torchvisions_resize_and_center_crop(tmp_path, size):
    from torchvision.transforms import v2

    coarse = np.random.default_rng(0).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)  # smooth, like a photo
    photo.save(tmp_path / "photo.png")
    ours = decode_image(str(tmp_path / "photo.png"), "RGB", 32, "crop").astype(int)
    theirs = v2.CenterCrop(32)(v2.Resize(32, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)(photo))
    theirs = np.asarray(theirs).transpose(2, 0, 1).astype(int)
    assert np.abs(ours - theirs).max() <= 1  # the same window, resampled in one step instead of two


# --- bad image folders ---


def test_empty_root_has_no_class_folders(tmp_path):
    (tmp_path / "photos").mkdir()
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(tmp_path / "photos"))
    assert_user_error(result, f"no class folders in {tmp_path / 'photos'}")


def test_one_class_folder_is_refused(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "cats", 40, 12)
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, f"only one class folder in {root} (cats/)", "at least two")


def test_class_folder_without_images_is_named(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 3)
    write_junk(root / "light")
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, f"no images in {root / 'light'}")


def test_test_class_unknown_to_train_is_refused(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "train" / "dark", 40, 3)
    write_class(root / "train" / "mid", 120, 3)
    write_class(root / "test" / "dark", 40, 1)
    write_class(root / "test" / "light", 220, 1)
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, str(root / "test" / "light"), "train")


def test_classes_named_train_and_test_say_why_they_are_read_as_splits(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "train", 40, 5)  # classes of a flat layout that happen to be named like splits
    write_class(root / "test", 220, 5)
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, f"{root} has folders named test/, train/, which are read as a split layout "
                              "(data.root/train/<class>/...", f"{root / 'test'} holds no class folders",
                      "rename their folders", "or use the split layout")


def test_hidden_class_folders_are_left_out_with_one_warning(tmp_path):
    root = tmp_path / "photos"
    for name in ("dark", "light", ".mid", ".cache"):
        write_class(root / name, 100, 3)
    (root / ".DS_Store").write_bytes(b"junk")  # a hidden file: left out without a word
    (root / "dark" / ".DS_Store").write_bytes(b"junk")
    prepared, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: left out 2 hidden folders under {root} (.cache, .mid): folders whose name "
                        "starts with '.' are not read; rename any that is a class or a split"]
    assert load_prepared(prepared, "train")[2]["class_names"] == ["dark", "light"]


def test_split_folders_without_train_are_refused(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "test" / "dark", 40, 3)
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, "no train/ folder")


def write_fake_pngs(folder: Path, names: list[str]) -> list[Path]:
    """Text files posing as PNGs, one per name, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("not a PNG")
    return [folder / name for name in names]


def write_bad_images(folder: Path) -> list[Path]:
    """An empty file, a text file posing as a PNG, and a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    empty, garbage, truncated = folder / "empty.png", folder / "garbage.png", folder / "cut.jpg"
    empty.write_bytes(b"")
    garbage.write_text("this is not a PNG")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    return [empty, garbage, truncated]


@pytest.mark.parametrize("bad", ["empty.png", "garbage.png", "cut.jpg"])
def test_unreadable_image_is_named(tmp_path, bad):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 5)
    write_class(root / "light", 220, 5)
    for path in write_bad_images(root / "light"):
        if path.name != bad:
            path.unlink()
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, f"cannot read image {root / 'light' / bad}", "data.skip_bad_images: true")


def test_every_unreadable_image_is_named_in_one_refusal(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 5)
    write_class(root / "light", 220, 5)
    bad = write_bad_images(root / "dark") + write_bad_images(root / "light")
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, "cannot read 6 images", "data.skip_bad_images: true",
                      *(f"{path} (" for path in bad), "(the file is empty)")


def test_many_unreadable_images_are_counted_and_listed_in_a_file(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 5)
    write_class(root / "light", 220, 5)
    bad = write_fake_pngs(root / "dark", [f"bad{i:02d}.png" for i in range(12)])
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root))
    assert_user_error(result, "cannot read 12 images", *(str(path) for path in bad[:10]), "and 2 more (all 12 in ")
    line = result.stderr.strip()
    assert str(bad[10]) not in line
    full_list = Path(line.split("(all 12 in ")[1].split(")")[0])
    assert [row.split("\t")[0] for row in full_list.read_text().splitlines()] == [str(path) for path in bad]
    full_list.unlink()


def test_classes_too_small_for_val_and_test_are_named_in_one_warning(tmp_path):
    root = tmp_path / "photos"
    for name, n in (("dark", 10), ("light", 2), ("mid", 1)):
        write_class(root / name, LEVELS[name], n)
    prepared, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 2 classes too small to split: light (2 images: no val image), "
                        "mid (1 image: no test or val image); val and test cannot measure them; add images to them"]
    info = load_prepared(prepared, "train")[2]
    assert info["class_counts"] == {"train": [7, 1, 1], "val": [1, 0, 0], "test": [2, 1, 0]}


def test_data_messages_count_in_the_singular_for_one(tmp_path):
    root = tmp_path / "photos"
    for name in ("dark", "light"):
        write_class(root / name, LEVELS[name], 30)
    (root / "dark" / "notes.txt").write_text("not an image")
    write_fake_pngs(root / "light", [f"bad{i:02d}.png" for i in range(MAX_WARNINGS + 1)])
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8, skip_bad_images=True)
    assert result.exit_code == 0, result.output
    assert f"warning: ignored 1 file under {root} whose" in result.stderr
    assert "warning: ... and 1 more unreadable image skipped" in result.stderr


def test_skip_bad_images_counts_and_warns(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 10)
    write_class(root / "light", 220, 10)
    bad = write_bad_images(root / "light")
    prepared, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8, skip_bad_images=True)
    assert result.exit_code == 0, result.output
    for path in bad:
        assert f"warning: skipped unreadable image {path}" in result.stderr
    splits = all_splits(prepared)
    info = splits["train"][2]
    assert info["skipped_bad_images"] == 3
    assert sum(info["counts"].values()) == 20
    check_grey_levels(splits, info["class_names"])


def test_a_class_whose_files_are_all_unreadable_is_refused_like_an_empty_one(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 20)
    write_class(root / "light", 220, 20)
    write_fake_pngs(root / "mid", [f"scan{i}.png" for i in range(5)])
    prepared, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8, skip_bad_images=True)
    assert_user_error(result, f"no readable images in {root / 'mid'} (class mid): its 5 files were all skipped "
                              "as unreadable")
    assert not prepared.exists()
    (root / "mid" / "scan0.png").unlink()
    write_class(root / "mid", 128, 1)  # one readable image: a class of one image, kept in train
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8, skip_bad_images=True)
    assert result.exit_code == 0, result.output
    assert "warning: 1 class too small to split: mid (1 image: no test or val image)" in result.stderr


def test_a_class_that_loses_its_test_image_to_skipping_is_named_too_small(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 10)
    write_class(root / "light", 220, 10)
    (root / "mid").mkdir()
    for level in (100, 150):  # two images: one drawn into test, one left in train (no val image)
        Image.new("L", (8, 8), level).save(root / "mid" / f"{level}.png")
    prepared = prepare_ok(tmp_path, dataset="imagefolder", root=str(root), image_size=8)
    test_images, test_labels, info = load_prepared(prepared, "test")
    [in_test] = {int(img.max()) for img, label in zip(test_images, test_labels) if label == 2}
    (root / "mid" / f"{in_test}.png").write_text("not a PNG")
    prepared, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8, skip_bad_images=True)
    assert result.exit_code == 0, result.output
    assert "warning: 1 class too small to split: mid (1 image: no test or val image)" in result.stderr
    assert load_prepared(prepared, "test")[2]["class_counts"]["test"] == [2, 2, 0]


def test_skipped_files_are_warned_about_in_path_order_and_not_counted_as_decoded(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 20)
    write_class(root / "light", 220, 20)
    bad = write_fake_pngs(root / "dark", [f"scan{i}.png" for i in range(6)])
    _, result = prepare(tmp_path, dataset="imagefolder", root=str(root), image_size=8, skip_bad_images=True)
    assert result.exit_code == 0, result.output
    named = [line.split()[4].rstrip(":") for line in result.stderr.splitlines()
             if line.startswith("warning: skipped unreadable image ")]
    assert named == [str(path) for path in bad]  # spread over the three splits, named in path order
    [decoded] = [line for line in result.stdout.splitlines() if line.startswith("decoded ")]
    assert decoded.startswith("decoded 40 images in ") and decoded.endswith("; skipped 6 unreadable files")


def test_bad_image_through_python_m_stages_is_one_line_without_traceback(tmp_path):
    root = tmp_path / "photos"
    write_class(root / "dark", 40, 3)
    write_class(root / "light", 220, 3)
    write_bad_images(root / "dark")
    params = write_params(tmp_path / "params.yaml", data={"dataset": "imagefolder", "root": str(root)})
    proc = run_stages("prepare-data", "--params", str(params), "--out", str(tmp_path / "prepared"), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().count("\n") == 0 and "cannot read 3 images" in proc.stderr


# --- image folders larger than one decoder task: decoded in parallel into the split files ---


def write_numbered(root: Path, per_class: int) -> list[Path]:
    """16x16 grey PNGs whose first two pixels spell the file's number (in listing order) and whose
    other pixels are the class's grey level: any row out of place or mislabelled shows."""
    paths = []
    for label, name in enumerate(sorted(LEVELS)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            number = label * per_class + i
            pixels = np.full((16, 16), LEVELS[name], np.uint8)
            pixels[0, 0], pixels[0, 1] = number % 256, number // 256
            path = root / name / f"img{i:04d}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def numbers(images) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def check_numbered(splits: dict, class_names: list[str], per_class: int, missing: set[int] = frozenset()) -> dict:
    """Rows in listing order, each labelled with its file's class, every file in exactly one split."""
    seen = {}
    for split, (images, labels, _) in splits.items():
        found = numbers(images)
        assert found == sorted(found), f"{split}: rows out of order"
        assert [n // per_class for n in found] == labels.tolist(), f"{split}: a row has another file's label"
        assert (images[:, :, 1:].int() == torch.tensor([LEVELS[class_names[k]] for k in labels])
                .view(-1, 1, 1, 1).int()).all()
        seen[split] = set(found)
    everything = set.union(*seen.values())
    assert sum(len(v) for v in seen.values()) == len(everything) == 3 * per_class - len(missing)
    assert not everything & missing
    return seen


def test_parallel_decoders_write_the_bytes_one_process_writes(tmp_path, monkeypatch):
    import stages.fill as fill

    root = tmp_path / "photos"
    write_numbered(root, per_class=150)  # 450 files: 8 tasks, on every core
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "channels": 1}
    parallel, result = prepare(tmp_path / "parallel", **data)
    assert result.exit_code == 0, result.output
    if fill.cpu_count() > 1:
        assert f"images/s, {min(fill.cpu_count(), 8)} processes)" in result.stdout
    check_numbered(all_splits(parallel), ["dark", "light", "mid"], 150)
    monkeypatch.setattr(fill, "cpu_count", lambda: 1)  # decode in this process alone
    alone = prepare_ok(tmp_path / "alone", **data)
    for name in ("train.safetensors", "val.safetensors", "test.safetensors", "info.json"):
        assert (parallel / name).read_bytes() == (alone / name).read_bytes(), name


def test_decoder_threads_write_the_bytes_decoder_processes_write(tmp_path, monkeypatch):
    """Where fork is not the platform's way (macOS, Windows) the decoders are threads in one process:
    each keeps its own buffers, so they write what the forked decoders write."""
    import stages.fill as fill

    root = tmp_path / "photos"
    write_numbered(root, per_class=150)
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "channels": 3}
    processes = prepare_ok(tmp_path / "processes", **data)
    monkeypatch.setattr(fill.sys, "platform", "darwin")
    threads, result = prepare(tmp_path / "threads", **data)
    assert result.exit_code == 0, result.output
    if fill.cpu_count() > 1:
        assert " threads)" in result.stdout
    for name in ("train.safetensors", "val.safetensors", "test.safetensors", "info.json"):
        assert (processes / name).read_bytes() == (threads / name).read_bytes(), name


def test_unreadable_files_leave_every_other_file_in_its_split(tmp_path):
    root = tmp_path / "photos"
    paths = write_numbered(root, per_class=100)
    broken = {3, 64, 65, 150, 299}  # in several tasks and classes
    originals = {i: paths[i].read_bytes() for i in broken}
    for i in broken:
        paths[i].write_bytes(b"not a PNG")
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "channels": 1, "skip_bad_images": True}
    prepared, result = prepare(tmp_path / "skipped", **data)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: skipped unreadable image") == len(broken)
    info = load_prepared(prepared, "train")[2]
    assert info["skipped_bad_images"] == len(broken) and sum(info["counts"].values()) == 300 - len(broken)
    skipped = check_numbered(all_splits(prepared), info["class_names"], 100, missing=broken)
    for i, content in originals.items():  # the same files, readable this time
        paths[i].write_bytes(content)
    whole = check_numbered(all_splits(prepare_ok(tmp_path / "fixed", **data)), info["class_names"], 100)
    for split in skipped:
        assert skipped[split] == whole[split] - broken  # nobody moved to make room


def test_unreadable_file_in_a_large_folder_keeps_the_last_good_splits(tmp_path):
    root = tmp_path / "photos"
    paths = write_numbered(root, per_class=100)
    data = {"dataset": "imagefolder", "root": str(root), "image_size": 16, "channels": 1}
    prepared = prepare_ok(tmp_path, **data)
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    paths[250].write_bytes(paths[250].read_bytes()[:60])  # truncated PNG
    paths[40].write_bytes(b"")
    messages = set()
    for _ in range(2):
        _, result = prepare(tmp_path, **data)
        assert_user_error(result, "cannot read 2 images", "data.skip_bad_images: true")
        messages.add(result.stderr)
    assert len(messages) == 1  # the same line every time
    line = messages.pop()
    assert line.index(str(paths[40])) < line.index(str(paths[250]))  # both, in listing order
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before  # no temporary file left either


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "imagefolder"])
def test_the_digits_folder_as_root_of_another_dataset_says_to_set_data_root(tmp_path, monkeypatch, dataset):
    monkeypatch.chdir(tmp_path)  # the default data.root, data/raw/digits, relative to where the stage runs
    (tmp_path / "data" / "raw" / "digits").mkdir(parents=True)
    _, result = prepare(tmp_path, dataset=dataset)
    assert_user_error(result, "data.root is data/raw/digits", f"data/raw/{dataset}")


@pytest.mark.parametrize("channels", [1, 3])
def test_prepared_rows_are_the_files_decoded_one_by_one_and_the_stats_count_them(tmp_path, channels):
    """The writer copies a task's images together (one histogram and one copy per band for the task):
    each row is what decoding its file alone gives, and mean/std are those of the train rows."""
    from stages.prepared import ChannelStats, channel_histogram

    root, rng = tmp_path / "photos", np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(80):  # train gets more than one task's worth of files
            height, width = (int(v) for v in rng.integers(10, 40, 2))
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    prepared = prepare_ok(tmp_path / "out", dataset="imagefolder", root=str(root), image_size=12,
                          channels=channels)
    mode = "L" if channels == 1 else "RGB"
    decoded = sorted(decode_image(str(p), mode, 12, "crop").tobytes() for p in root.rglob("*.png"))
    splits = all_splits(prepared)
    rows = sorted(bytes(row.numpy().tobytes()) for images, _, _ in splits.values() for row in images)
    assert rows == decoded
    stats = ChannelStats(channels)
    stats.add(channel_histogram(splits["train"][0].numpy()))
    info = splits["train"][2]
    assert (info["mean"], info["std"]) == tuple(stats.mean_std())


def write_photos(root: Path) -> None:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / name / f"{i}.png")


WITHOUT_TORCH = {  # data params -> what writes its files under root
    "imagefolder": ({"dataset": "imagefolder"}, write_photos),
    "mnist": ({"dataset": "mnist"}, lambda root: write_mnist_like(root, "MNIST")),
    "fashion-mnist, download: true": ({"dataset": "fashion-mnist", "download": True},
                                      lambda root: write_mnist_like(root, "FashionMNIST")),
    "cifar10": ({"dataset": "cifar10"}, write_cifar10),
}


@pytest.mark.parametrize("data, write", WITHOUT_TORCH.values(), ids=WITHOUT_TORCH.keys())
def test_files_are_prepared_without_importing_torch(tmp_path, data, write):
    """Importing torch and torchvision is about 3 s of the stage's start on a 2-core machine, and nothing
    in reading these files needs them (torchvision downloads, when a file is missing)."""
    write(tmp_path / "raw")
    params = write_params(tmp_path / "params.yaml", data={**data, "root": str(tmp_path / "raw")})
    code = ("import sys\nfrom stages.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('imported:', sorted({'torch', 'torchvision'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, "prepare-data", "--params", str(params), "--out",
                           str(tmp_path / "prepared")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "imported: []"
    assert (tmp_path / "prepared" / "info.json").is_file()


def test_every_dataset_names_its_source_and_every_built_in_model_builds():
    """The names live in one place (stages.params); the sources and the model builder follow it."""
    from stages.core.models import build_model
    from stages.params import BUILT_IN_MODELS, DATASETS
    from stages.sources.torchvision_datasets import torchvision_dataset

    for name, dataset in DATASETS.items():
        assert dataset.source in ("digits", "torchvision", "imagefolder"), name
        if dataset.source == "torchvision":
            assert dataset.downloads and torchvision_dataset(name).file_names(), name
    for name in BUILT_IN_MODELS:
        assert build_model(name, 1, 8, 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10), name
