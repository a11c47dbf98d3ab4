"""`python -m stages predict ... --model models/model.onnx`: label new images with ONNX Runtime, no torch.

The same CSV as predict with the weights file (`stages/predict.py`): every image decoded by the same
`decode_image` (`stages/images.py`), at the model's size, mode and resize, normalised with its mean
and std, one row per image with the top classes and their probabilities. Only the model runs
elsewhere: in ONNX Runtime on the CPU, from `models/model.onnx` (`stages/onnx_model.py`). Nothing
here imports torch, so the command starts in a fraction of a second and runs where torch is not
installed.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from .errors import UserError
from .images import cpu_count, decode_image, find_images, progress_bar, report_skipped
from .io import atomic_path
from .onnx_model import INPUT_NAME, normalized, open_onnx, softmax
from .params import RESIZE_MODES


def csv_header(top_k: int) -> list[str]:
    header = ["path", "predicted", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    return header


def predict(model_path: Path, inputs: list[Path], out: Path, top_k: int = 1, batch_size: int = 256,
            skip_bad_images: bool = False) -> dict:
    """Label every image in `inputs` with the ONNX model; one CSV row per readable image; a summary."""
    session, meta = open_onnx(model_path)
    names = meta["class_names"]
    if top_k > len(names):
        raise UserError(f"--top-k {top_k} is more than the model's {len(names)} classes")
    if meta["resize"] not in RESIZE_MODES:
        raise UserError(f"{model_path} was trained on images resized by {meta['resize']!r}; this version of predict "
                        f"knows {', '.join(RESIZE_MODES)}")
    _, height, _ = meta["input_shape"]
    decode = partial(decode_image, mode=meta["image_mode"], size=height, resize=meta["resize"])
    paths = find_images(inputs)

    skipped: list[tuple[str, str]] = []
    labelled = 0
    chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    # As in predict.py: threads decode the next batch while ONNX Runtime (which releases the GIL) runs this one.
    pool = ThreadPoolExecutor(min(cpu_count(), max(1, len(paths))))
    try:
        with atomic_path(out) as tmp, open(tmp, "w", newline="") as f, progress_bar(len(paths), "predict") as bar:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(csv_header(top_k))
            decoded = pool.map(decode, chunks[0])
            for i, chunk in enumerate(chunks):
                results = list(decoded)
                if i + 1 < len(chunks):
                    decoded = pool.map(decode, chunks[i + 1])
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
                    x = normalized(np.stack([pixels for _, pixels in good]), meta["mean"], meta["std"])
                    probs = softmax(session.run(None, {INPUT_NAME: x})[0])
                    # Highest first; among equal probabilities the lower class index first, as torch.topk gives.
                    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
                    for (path, _), classes, row_probs in zip(good, order, probs):
                        row = [path]
                        for c in classes:
                            row += [names[c], f"{row_probs[c]:.6f}"]
                        writer.writerow(row)
                    labelled += len(good)
                bar.update(len(chunk))
            if labelled == 0:
                raise UserError(f"none of the {len(paths)} files could be read as an image")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    report_skipped(skipped)
    return {"labelled": labelled, "skipped": len(skipped), "device": "cpu (ONNX Runtime)"}
