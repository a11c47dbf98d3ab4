"""The evaluate stage: test metrics, per-class precision/recall/F1, predictions for the confusion plot.

The test pass is the core's `evaluate()`, the same function training validates with; the model
is rebuilt from its weights file alone, normalised with the statistics it was trained with, once
it is known to fit the data and to have been trained with params.yaml's model and train params.
The outputs are written only once all of them are computed, each renamed into place.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path

import torch

from .core.batches import Split
from .core.loop import evaluate
from .core.transforms import stats_tensors
from .core.weights import load_model
from .io import write_json, write_text
from .model_file import check_weights_use, read_metadata
from .params import Params
from .prepared import check_prepared_with, load_prepared
from .stats import per_class_scores, wilson_interval


def evaluate_stage(weights: str | Path, data_dir: str | Path, out_dir: str | Path, p: Params,
                   params_path: str | Path) -> dict:
    out_dir = Path(out_dir)
    batch_size = p.evaluate.batch_size
    images, labels, info = load_prepared(data_dir, "test")
    check_prepared_with(info, p, params_path, data_dir)
    check_weights_use(read_metadata(weights), weights, params=(p, params_path), data=(info, data_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(weights, device=device)
    meta = model.stages_metadata
    mean, std = stats_tensors(meta["mean"], meta["std"], device)
    # Streamed from the mapping: one pass needs no copy of the split on the GPU or in memory.
    split = Split(images, labels, streamed=device.type == "cuda")
    loss, accuracy, predicted, top5 = evaluate(model, split, mean, std, batch_size, device)

    names = meta["class_names"]
    scores = per_class_scores(labels.numpy(), predicted.numpy(), len(names))
    # An undefined score (NaN) is JSON null: dvc metrics show/diff leave it out rather than show a 0.
    per_class = {
        name: {"precision": score(p), "recall": score(r), "f1": score(f), "support": int(s)}
        for name, p, r, f, s in zip(names, scores["precision"], scores["recall"], scores["f1"], scores["support"])
    }
    n = len(labels)
    metrics = {"test": {"accuracy": round(accuracy, 6),
                        **interval_metrics("accuracy", int((predicted == labels).sum()), n), "loss": round(loss, 6)}}
    if top5 is not None:  # more than 5 classes
        metrics["test"]["top5_accuracy"] = round(top5, 6)
        metrics["test"].update(interval_metrics("top5_accuracy", round(top5 * n), n))

    # One row per test image in test-set order: DVC's confusion template reads actual/predicted; `image`
    # (a digest of the image's pixels) lets `stages compare` pair two runs' rows and refuse different splits.
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "actual", "predicted", "image"])
    for i, (a, b) in enumerate(zip(labels.tolist(), predicted.tolist())):
        writer.writerow([i, names[a], names[b], image_digest(images[i])])
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "per_class.json", per_class)
    write_text(out_dir / "predictions.csv", buf.getvalue())
    top5_text = f"  top-5 accuracy {top5:.4f}" if top5 is not None else ""
    t = metrics["test"]
    print(f"test accuracy {accuracy:.4f} (95% CI {t['accuracy_ci_low']:.4f}-{t['accuracy_ci_high']:.4f})"
          f"{top5_text}  loss {loss:.4f}  on {len(labels)} images")
    return metrics


def score(value: float) -> float | None:
    """A per-class score rounded for per_class.json; None (null) where it is undefined (NaN)."""
    return None if math.isnan(value) else round(float(value), 6)


def interval_metrics(name: str, correct: int, total: int) -> dict[str, float]:
    """`<name>_ci_low` / `<name>_ci_high`: the 95% Wilson score interval of `correct` of `total`."""
    low, high = wilson_interval(correct, total)
    return {f"{name}_ci_low": round(low, 6), f"{name}_ci_high": round(high, 6)}


def image_digest(image: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of one image's shape and uint8 pixels (C, H, W)."""
    pixels = image.contiguous().numpy()
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()[:16]
