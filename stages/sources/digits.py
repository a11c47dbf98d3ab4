"""scikit-learn's bundled handwritten digits: the default dataset, on disk with scikit-learn itself."""

from __future__ import annotations

import torch

from . import Source


def load_digits_source() -> Source:
    """1,797 8x8 scans with values 0..16, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 -> 0..255 so every source shares the uint8 convention.
    pixels = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    images = pixels.unsqueeze(1).contiguous()  # (N, 1, 8, 8)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    return Source([str(c) for c in bunch.target_names], labels={"train": labels}, images={"train": images})
