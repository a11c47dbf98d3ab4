"""Where a split's images live during training, and how a batch is gathered from them.

Batches are built by indexing whole uint8 tensors with a permutation: no per-sample Python
`__getitem__`, no collate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Split:
    """One split's uint8 images (N, C, H, W) and int64 labels, on `device` or pinned on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def place_split(images: torch.Tensor, labels: torch.Tensor, device: torch.device, max_fraction: float = 0.4) -> Split:
    """Put a whole split on the GPU once when it fits in `max_fraction` of free memory
    (batches are then built by indexing on the device); otherwise pin it on the CPU so
    batch copies can be non-blocking."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.numel() + labels.numel() * 8 < max_fraction * free:
            return Split(images.to(device), labels.to(device))
        return Split(images.pin_memory(), labels.pin_memory())
    return Split(images, labels)


def gather_batch(split: Split, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index a batch out of the split and bring it to `device` (a no-op copy when it lives there)."""
    if split.images.device.type == device.type:  # placed there by place_split: index in place
        return split.images[idx], split.labels[idx]
    idx = idx.cpu()
    x = torch.empty((len(idx), *split.images.shape[1:]), dtype=torch.uint8, pin_memory=device.type == "cuda")
    torch.index_select(split.images, 0, idx, out=x)
    return x.to(device, non_blocking=True), split.labels[idx].to(device, non_blocking=True)
