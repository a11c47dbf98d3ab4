"""A bare PyTorch training loop on a prepared split: the reference the train stage is timed against.

    python benchmarks/bare_train.py data/prepared --epochs 62      # from the repo root

The same model (`small-cnn` unless --model), global batch, AdamW settings and normalisation as the
default train stage, on the prepared train split held in memory; nothing else: no validation,
checkpoint, logging, schedule or output. bench_fixed_costs.py times it from outside at two epoch
counts, as it times the stage, so start-up cancels out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from stages.core.models import build_model  # noqa: E402 - the same model, not a look-alike


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", type=Path)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--weight-decay", type=float, default=0.0005)
    args = p.parse_args()
    info = json.loads((args.prepared / "info.json").read_text())
    split = load_file(args.prepared / "train.safetensors")
    images, labels = split["images"], split["labels"]
    channels, size = images.shape[1], images.shape[2]
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    torch.manual_seed(0)
    model = build_model(args.model, channels, size, info["num_classes"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    for _ in range(args.epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels) - args.batch + 1, args.batch):  # full batches, as the stage
            idx = order[start:start + args.batch]
            x = (images[idx].float() / 255.0 - mean) / std
            loss = F.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
