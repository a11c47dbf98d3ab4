"""Reading and writing the project's files: safetensors with metadata, JSON, atomic writes.

Every write goes to a temporary file in the destination's folder and is renamed
into place, so a stage that fails or is killed never leaves a half-written
artifact, and the last good one stays until the new one is complete. A folder is
written the same way as a whole (`staged_dir`): filled beside, then swapped in,
so it holds exactly the new run's files. The stages' outputs are `persist: true`
in dvc.yaml (DVC does not delete them before a run), so this is what keeps the
last good outputs through a refusal, a crash or Ctrl-C.
Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError, first_line, reraise_interrupt

_UMASK = os.umask(0)
os.umask(_UMASK)


def temp_beside(path: str | Path) -> Path:
    """A new empty temporary file in `path`'s folder (created if missing), to be renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def replace_with(tmp: str | Path, path: str | Path) -> None:
    """Flush `tmp` to disk, give it the usual file mode and rename it onto `path` in one step."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files owner-only; give them the usual mode
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    tmp = temp_beside(path)
    try:
        yield tmp
        replace_with(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


STAGING = ".staging-"  # the folders staged_dir fills beside their destination
RETIRED = ".retired-"  # the folders a swap moves aside, deleted right after


def remove_leftovers(path: Path) -> None:
    """Staged or retired copies of `path` that a killed run left beside it."""
    for pattern in (f".{path.name}{STAGING}*", f".{path.name}{RETIRED}*"):
        for old in path.parent.glob(pattern):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def swap_in(new: Path, path: Path) -> None:
    """Put the folder `new` (on `path`'s file system) where `path` is, replacing what was there.

    Two renames, since POSIX has no atomic exchange of a non-empty folder: the old folder is
    moved aside, the new one takes its name, then the old one is deleted. Between the renames
    `path` is briefly absent, never half-written."""
    retired = None
    if path.is_dir() and not path.is_symlink():
        retired = Path(tempfile.mkdtemp(prefix=f".{path.name}{RETIRED}", dir=path.parent))
        os.replace(path, retired / path.name)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(new, path)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def install(src: str | Path, path: str | Path) -> None:
    """Move the complete file or folder `src` to `path` in one rename or swap (copied beside `path`
    first when `src` is on another file system)."""
    src, path = Path(src), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not src.is_dir():
        tmp = temp_beside(path)
        try:
            os.replace(src, tmp)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(src, tmp)
            src.unlink()
        replace_with(tmp, path)
        return
    beside = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGING}", dir=path.parent))
    try:
        os.replace(src, beside)  # onto the empty folder mkdtemp made
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copytree(src, beside, dirs_exist_ok=True)
        shutil.rmtree(src)
    os.chmod(beside, 0o777 & ~_UMASK)  # mkdtemp makes folders owner-only; give them the usual mode
    swap_in(beside, path)


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new empty folder beside `path`; when the block succeeds it replaces `path` whole
    (no file of an older run survives), and when it fails `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}{STAGING}", dir=path.parent))
    try:
        yield staged
        os.chmod(staged, 0o777 & ~_UMASK)
        swap_in(staged, path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # still there only when the block failed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path} (run the stage that writes it first, e.g. `dvc repro`)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is damaged: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, Any] | None = None) -> None:
    """Write tensors to a .safetensors file; metadata values are stored as JSON strings.

    The same tensors and metadata always give the same bytes: safetensors writes its
    metadata map in hash order, so the header is rewritten with sorted keys.
    """
    from safetensors.torch import save

    meta = {k: json.dumps(v, sort_keys=True) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = save(tensors, metadata=meta)
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > size:  # never expected (same content, other order); keep safetensors' own bytes
        text = blob[8 : 8 + size]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob[:8])
            f.write(text.ljust(size, b" "))  # safetensors pads its header with spaces, too
            f.write(memoryview(blob)[8 + size :])


# The dtypes a file written in chunks may hold, by safetensors' name, with their item size. safetensors
# lays tensors out by dtype, larger first, then by name; I64 and U8 are all the prepared splits need.
CHUNKED_DTYPES = {"I64": 8, "U8": 1}


def safetensors_layout(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, Any] | None = None
                       ) -> tuple[bytes, dict[str, int]]:
    """The bytes `save_tensors` writes before the tensor data, for tensors of these (dtype, shape),
    and the file offset where each tensor's data starts.

    Written by hand so that a file can be filled in chunks, row by row, without the tensors in
    memory (safetensors itself writes a whole file from memory). The header is what safetensors
    writes (compact JSON, metadata keys sorted as `save_tensors` sorts them, padded with spaces
    to a multiple of 8); tests/test_prepared.py checks the bytes against `save_tensors`.
    """
    header: dict[str, Any] = {"__metadata__": {k: json.dumps(v, sort_keys=True)
                                               for k, v in sorted((metadata or {}).items())}}
    order = sorted(tensors, key=lambda name: (-CHUNKED_DTYPES[tensors[name][0]], name))
    start = 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = CHUNKED_DTYPES[dtype]
        for size in shape:
            nbytes *= size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + nbytes]}
        start += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, {name: len(prefix) + header[name]["data_offsets"][0] for name in order}


def write_at(path: str | Path, offset: int, data) -> None:
    """Write a bytes-like object (a contiguous numpy array, say) into an existing file at `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(memoryview(data).cast("B"))


def open_tensors(path: str | Path, framework: str = "pt", device: str = "cpu"):
    """safetensors' reader of a file written by `save_tensors`, to use in a `with`: `f.keys()`,
    `f.metadata()`, `f.get_tensor(name)`, `f.get_slice(name)[a:b]` (those rows alone). With
    framework "numpy" it gives numpy arrays and never imports torch.

    A missing, truncated or garbled file is a UserError naming the file (safetensors checks the
    header against the file's size when it opens it).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path} (run the stage that writes it first, e.g. `dvc repro`)")
    try:
        return safe_open(str(path), framework=framework, device=device)
    except Exception as exc:  # safetensors raises several types for damaged files
        reraise_interrupt(exc)
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: Exception) -> UserError:
    return UserError(f"{path} is damaged or not a safetensors file: {first_line(exc)}")


def load_tensors(path: str | Path, device: str = "cpu", metadata_only: bool = False) -> tuple[dict, dict[str, Any]]:
    """Read a .safetensors file written by `save_tensors`: (tensors, metadata); with `metadata_only`,
    the header alone ({}, metadata), without importing torch.

    A missing, truncated or garbled file is a UserError naming the file.
    """
    path = Path(path)
    # The header needs no tensor library: numpy's reader keeps torch unimported for a metadata check.
    framework, device = ("numpy", "cpu") if metadata_only else ("pt", device)
    with open_tensors(path, framework, device) as f:
        try:
            raw_meta = f.metadata() or {}
            tensors = {} if metadata_only else {k: f.get_tensor(k) for k in f.keys()}
            metadata = {k: json.loads(v) for k, v in raw_meta.items()}
        except Exception as exc:  # safetensors raises several types for damaged files
            reraise_interrupt(exc)
            raise _damaged(path, exc) from None
    return tensors, metadata


class WriteBehind:
    """File writes run in order on one background thread while the caller goes on (training's
    per-epoch checkpoint and metrics: 5 to 12 ms an epoch that need not hold up the next one).

    Whatever `submit` is given must already be a copy the caller will not change. `wait()` returns
    once everything submitted is written and raises the first error a write hit; `submit` raises it
    too, so a failing disk stops training at the next epoch, not at the end."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self._raise_error()
        if self._thread is None:
            # A daemon: a process that ends without wait() (a kill, an error already being raised) does
            # not hang on it; every write lands by a rename, whole or not at all.
            self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
            self._thread.start()
        self._queue.put((write, args))

    def wait(self) -> None:
        self._queue.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            write, args = self._queue.get()
            try:
                if self._error is None:  # after a failure, later writes are dropped until it is raised
                    write(*args)
            except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread by wait/submit
                self._error = exc
            finally:
                self._queue.task_done()

