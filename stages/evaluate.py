"""evaluate(): loss, accuracy and predictions of a model on a split — used by train (validation)
and by the evaluate stage (test). The stage adds per-class scores and the confusion data."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .transforms import normalize


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass when `dtype` is bf16/fp16; a no-op for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[float, float, torch.Tensor]:
    """Mean cross-entropy, accuracy (a fraction) and predicted labels (int64, on the CPU).

    images: uint8 (N, C, H, W) on any device; moved batch by batch if not on `device`.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    preds = []
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        y = labels[start : start + batch_size].to(device, non_blocking=True)
        x = normalize(x, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        preds.append(logits.argmax(dim=1))
    model.train(was_training)
    predicted = torch.cat(preds).cpu()
    accuracy = (predicted == labels.cpu()).double().mean().item()
    return loss_sum.item() / len(labels), accuracy, predicted


def stats_tensors(info: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared data's per-channel mean/std as (C, 1, 1) float tensors on `device`."""
    mean = torch.tensor(info["mean"], dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.tensor(info["std"], dtype=torch.float32, device=device).view(-1, 1, 1)
    return mean, std


def evaluate_stage(weights: str | Path, data_dir: str | Path, out_dir: str | Path, batch_size: int) -> dict:
    """The evaluate stage: test metrics, per-class precision/recall/F1, predictions for the confusion plot."""
    import csv
    import io

    from sklearn.metrics import precision_recall_fscore_support

    from . import load_model
    from .artifacts import write_json, write_text
    from .prepare_data import load_prepared

    out_dir = Path(out_dir)
    images, labels, info = load_prepared(data_dir, "test")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(weights, device=device)
    mean, std = stats_tensors(model.stages_metadata, device)
    loss, accuracy, predicted = evaluate(model, images, labels, mean, std, batch_size, device)

    names = model.stages_metadata["class_names"]
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), predicted.numpy(), labels=list(range(len(names))), zero_division=0
    )
    per_class = {
        name: {"precision": round(float(p), 6), "recall": round(float(r), 6), "f1": round(float(f), 6), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, support)
    }
    metrics = {"test": {"accuracy": round(accuracy, 6), "loss": round(loss, 6)}}
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "per_class.json", per_class)

    # One row per test image in test-set order: DVC's confusion template reads actual/predicted.
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "actual", "predicted"])
    for i, (a, p) in enumerate(zip(labels.tolist(), predicted.tolist())):
        writer.writerow([i, names[a], names[p]])
    write_text(out_dir / "predictions.csv", buf.getvalue())
    print(f"test accuracy {accuracy:.4f}  loss {loss:.4f}  on {len(labels)} images")
    return metrics
