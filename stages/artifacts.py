"""Reading and writing the project's files: safetensors with metadata, JSON, atomic writes.

Every write goes to a temporary file in the destination's folder and is renamed
into place, so a stage that fails or is killed never leaves a half-written
artifact, and the last good one stays until the new one is complete.
Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    """Write tensors to a .safetensors file; metadata values are stored as JSON strings."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path: str | Path, device: str = "cpu") -> tuple[dict, dict[str, Any]]:
    """Read a .safetensors file written by `save_tensors`: (tensors, metadata).

    A missing, truncated or garbled file is a UserError naming the file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path} (run the stage that writes it first, e.g. `dvc repro`)")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: json.loads(v) for k, v in raw_meta.items()}
    except Exception as exc:  # safetensors raises several types for damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is damaged or not a safetensors file: {reason}") from None
    return tensors, metadata
