"""Label image files into predict's CSV, whichever runs the model: the part of `python -m stages
predict` that PyTorch (stages/predict.py) and ONNX Runtime (stages/predict_onnx.py) share.

Files are decoded on a thread pool, one batch ahead of the model (threads, not prepare-data's forked
decoders: they hand the arrays over without pickling, and the model's runtime releases the GIL). One
CSV row per readable image: its path and its top classes with their probabilities, highest first.
The CSV is written to a temporary file and renamed into place, so a refusal leaves the previous
CSV as it was. No torch here: the ONNX path must run where torch is not installed.

Before any image is read, both paths check the model against a params file with the same rule
(`check_model_params`): the params record that the train stage writes into the weights file and the
export stage copies into the ONNX file's metadata_props, compared with `--params`, or by default,
for the pipeline's own models/model.safetensors and models/model.onnx, with ./params.yaml.
An ONNX file that fails it is named as the stale one when the weights file beside it passes (an
export that failed or did not run after a retraining).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .console import cpu_count, progress_bar, report_skipped
from .errors import UserError
from .io import atomic_path
from .model_file import RECORDED_SECTIONS, check_trained_with, read_metadata
from .onnx_model import FORMAT as ONNX_FORMAT
from .params import NOT_SET, Params, first_difference, load_params, show_value

# The pipeline's own model files (the train and export stages' outs in dvc.yaml): without --params,
# these are checked against ./params.yaml; any other file (an artifact fetched from elsewhere, a copy)
# is its own record.
PIPELINE_MODELS = ("models/model.safetensors", "models/model.onnx")

# uint8 images (N, C, H, W) -> for each image, its top classes and their probabilities, highest first
TopClasses = Callable[[np.ndarray], tuple[list[list[int]], list[list[float]]]]


def check_model_params(meta: dict, model_path: Path, params_path: Path | None) -> None:
    """Refuse a model (the metadata of a weights or ONNX file) that other model.* / train.* params trained
    than `params_path`'s, in one line. Without `params_path`: ./params.yaml where there is one, for the
    pipeline's own model files only (PIPELINE_MODELS, relative to the current folder)."""
    if params_path is None:
        params_path = Path("params.yaml")
        own = {Path(path).resolve() for path in PIPELINE_MODELS}
        if not params_path.is_file() or Path(model_path).resolve() not in own:
            return
    try:
        if meta.get("format") == ONNX_FORMAT:
            check_exported_with(meta, load_params(params_path), params_path, Path(model_path))
        else:
            check_trained_with(meta, load_params(params_path), params_path, model_path)
    except UserError as exc:
        raise UserError(f"{exc}; or pass --no-check-params to label with it anyway") from None


def recorded_params(weights: Path) -> dict | None:
    """The params record of a weights file, or None where there is no readable one."""
    try:
        return read_metadata(weights).get("params") if weights.is_file() else None
    except (UserError, ImportError):  # damaged, or no safetensors where only the ONNX path is installed
        return None


def check_exported_with(meta: dict, p: Params, params_path: Path, path: Path) -> None:
    """Refuse an ONNX export (its metadata_props) of weights that other params trained, naming which file is
    out of date: the export alone, when the weights file beside it (model.onnx -> model.safetensors) has
    `p`'s values (a failed or skipped export after a retraining), or the weights it came from too."""
    recorded = meta.get("params")
    if not isinstance(recorded, dict):
        raise UserError(f"{path} does not record the params that trained its weights (an older export); export it "
                        "again with `dvc repro`")
    difference = first_difference(recorded, p, RECORDED_SECTIONS)
    if difference is None:
        return
    key, made_with, has = difference
    now = f"no {key}" if has is NOT_SET else f"{key} = {show_value(has)}"
    exported = f"{path} was exported from weights trained with {key} = {show_value(made_with)}"
    weights = path.with_suffix(".safetensors")
    weights_params = recorded_params(weights)
    if isinstance(weights_params, dict) and first_difference(weights_params, p, RECORDED_SECTIONS) is None:
        raise UserError(f"{exported}, but {weights} and {params_path} have {now}: the ONNX export is older than "
                        "the weights (the export stage failed or has not run since they were trained); export "
                        "again with `dvc repro`, which reruns the export stage")
    raise UserError(f"{exported} but {params_path} has {now}; retrain and export again with `dvc repro` "
                    "(or `dvc exp run`) so that the model matches the params")


def csv_header(top_k: int) -> list[str]:
    header = ["path", "predicted", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    return header


def label_files(paths: list[str], decode: Callable[[str], np.ndarray | str], top_classes: TopClasses,
                names: list[str], out: Path, top_k: int, batch_size: int, skip_bad_images: bool) -> dict:
    """Decode, label and write every file of `paths`; (labelled, skipped) counts. `decode` gives a file's
    uint8 (C, H, W) pixels or the reason it cannot be read."""
    skipped: list[tuple[str, str]] = []
    labelled = 0
    chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    pool = ThreadPoolExecutor(min(cpu_count(), max(1, len(paths))))
    try:
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f, progress_bar(len(paths), "predict") as bar:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(csv_header(top_k))
            decoded = pool.map(decode, chunks[0])
            for i, chunk in enumerate(chunks):
                results = list(decoded)
                if i + 1 < len(chunks):
                    decoded = pool.map(decode, chunks[i + 1])  # the next batch decodes while the model runs
                good = []
                for path, result in zip(chunk, results):
                    if isinstance(result, str):
                        if not skip_bad_images:
                            raise UserError(f"cannot read image {path}: {result}; fix or remove it, "
                                            "or pass --skip-bad-images to skip such files")
                        skipped.append((path, result))
                    else:
                        good.append((path, result))
                if good:
                    classes, probs = top_classes(np.stack([pixels for _, pixels in good]))
                    for (path, _), row_classes, row_probs in zip(good, classes, probs):
                        row = [path]
                        for c, p in zip(row_classes, row_probs):
                            row += [names[c], f"{p:.6f}"]
                        writer.writerow(row)
                    labelled += len(good)
                bar.update(len(chunk))
            if labelled == 0:  # every file skipped: say why here, as no CSV is written
                path, reason = skipped[0]
                if len(paths) == 1:
                    raise UserError(f"{path}, the only file to label, could not be read as an image: {reason}")
                raise UserError(f"none of the {len(paths):,} files could be read as an image (the first, {path}: "
                                f"{reason})")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report_skipped(skipped)
    return {"labelled": labelled, "skipped": len(skipped)}
