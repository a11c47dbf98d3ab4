"""scikit-learn's bundled handwritten digits: the default dataset, on disk with scikit-learn itself."""

from __future__ import annotations

import numpy as np

from . import Source, array_source


def load_digits_source() -> Source:
    """1,797 8x8 scans with values 0..16, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 -> 0..255 so every source shares the uint8 convention (float64 x 255/16, rounded half to even).
    pixels = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.ascontiguousarray(pixels[:, None])  # (N, 1, 8, 8)
    return array_source([str(c) for c in bunch.target_names], {"train": bunch.target}, {"train": images})
