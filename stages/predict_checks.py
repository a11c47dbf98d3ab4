"""What `python -m stages predict` refuses before it opens a model or decodes an image: a --model path
that is a folder or does not exist, and an --out path it must not write. Each refusal is one line that
names what is wrong and what is allowed; nothing has been read or written when it comes.

--out is written by renaming a temporary file onto it (stages/io.py), which replaces whatever is there.
So predict writes only a CSV path that is none of the images it labels, has no image file's extension
(a rerun over the same folder would read it as an image), and, where a file already exists, only over
an empty file or a CSV that predict wrote (its header line): an earlier predictions CSV is overwritten,
anything else a user points --out at by mistake (an image, params.yaml, the weights, /dev/null) stays.
No torch here: the ONNX path runs without it.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .errors import UserError
from .images import image_extensions
from .labelling import PIPELINE_MODELS, csv_header

MODEL_SUFFIXES = (".safetensors", ".onnx")
MODEL_FILES = "the .safetensors weights the train stage wrote or their .onnx export"


def is_pipeline_model(path: Path) -> bool:
    """Whether `path` is one of the pipeline's own model files (a stage's out in dvc.yaml), from the current folder."""
    return path.resolve() in {Path(own).resolve() for own in PIPELINE_MODELS}


def similar_file(path: Path) -> Path | None:
    """A file beside `path` whose name is close to its name (a typo: model.onx -> model.onnx), or None."""
    folder = path.parent
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir() if p.is_file()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.85)
    return folder / close[0] if close else None


def check_model_path(path: Path) -> None:
    """Refuse a --model that is a folder or does not exist, saying what to give instead."""
    if path.is_dir():
        inside = sorted((p.name for p in path.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file()),
                        key=lambda name: (MODEL_SUFFIXES.index(Path(name).suffix.lower()), name))  # weights first
        holds = f" holding {', '.join(inside)}" if inside else ""
        raise UserError(f"--model {path} is a folder{holds}; give a model file: {MODEL_FILES}, "
                        f"e.g. --model {path / (inside[0] if inside else 'model.safetensors')}")
    if path.is_file():
        return
    if is_pipeline_model(path):  # a fresh clone: the file is a DVC out, in the remote's cache or not made yet
        raise UserError(f"{path} does not exist yet: fetch it with `dvc pull` (if your team shares a DVC remote) "
                        "or make it with `dvc repro`")
    near = similar_file(path)
    hint = f"did you mean {near}?" if near else f"give a model file: {MODEL_FILES}"
    raise UserError(f"--model {path} does not exist; {hint}")


def first_bytes(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def same_file(a: Path, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_out(out: Path, images: list[str]) -> None:
    """Refuse an --out that predict must not write (see the module's docstring), before any work."""
    example = "e.g. --out predictions.csv"
    if out.is_dir():  # `--out ''` is the current folder
        raise UserError(f"--out {out} is a folder; give the CSV file to write, e.g. --out {out / 'predictions.csv'}")
    if out.exists() and any(same_file(out, image) for image in images):  # under any name: links too
        raise UserError(f"--out {out} is one of the images to label; give another file for the CSV, {example}")
    if out.suffix.lower() in image_extensions():
        raise UserError(f"--out {out} has an image file's extension; the output is a CSV: give a .csv file, "
                        f"e.g. --out {out.with_suffix('.csv')}")
    if out.exists() or out.is_symlink():
        if not out.is_file():
            raise UserError(f"--out {out} exists and is not a regular file; give a CSV file to write, {example}")
        header = ",".join(csv_header(1)).encode()
        if out.stat().st_size and not first_bytes(out, len(header)) == header:
            raise UserError(f"--out {out} exists and is not a CSV that predict wrote (its first line is not "
                            f"{header.decode()},...); predict overwrites only its own CSVs: move it away or give "
                            f"another file, {example}")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"--out {out} cannot be written: {folder} is a file, not a folder; {example}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out} cannot be written: no permission to write in {folder}; {example}")


def torch_missing(model: Path, exc: ImportError) -> str | None:
    """The one-line refusal of a weights file where PyTorch cannot be imported (the ONNX path needs none),
    or None for an ImportError of anything else (a bug, to be raised as it is)."""
    if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
        return None
    return (f"{model} is a PyTorch weights file, and torch cannot be imported here ({exc}); install it "
            "(pip install -r requirements.lock -e .), or label with the ONNX export, which needs no torch: "
            f"--model {model.with_suffix('.onnx')} (pip install -r requirements-serve.txt, see docs/onnx.md)")
