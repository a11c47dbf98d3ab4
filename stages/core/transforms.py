"""Batched, on-device image transforms: uint8 -> normalised float, random crop and flip.

They run on whole batches where the data lives (the GPU when it is there), so
there is no per-sample Python work anywhere in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import DATASETS

# Horizontal flips change the meaning of digits and letters; they suit photos. An image folder may hold
# either (digits-like folders lost a third of their accuracy to flips), so there they are asked for
# (train.hflip: true); auto flips only the datasets known to be photos (DATASETS' `photos`).


def use_hflip(setting: bool | str, dataset: str) -> bool:
    """Whether augmentation flips images horizontally: train.hflip, with auto deciding by the dataset."""
    if setting == "auto":
        known = DATASETS.get(dataset)
        return known is not None and known.photos
    return bool(setting)


def augmentations(pad: int, flip: bool, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> str:
    """What the log says of the augmentations that run (empty when none does)."""
    ran = ([f"random crop (padding {pad})"] if pad else []) + (["horizontal flip"] if flip else []) + \
        ([f"mixup (alpha {mixup_alpha:g})"] if mixup_alpha else []) + \
        ([f"cutmix (alpha {cutmix_alpha:g})"] if cutmix_alpha else [])
    return ", ".join(ran)


def stats_tensors(mean: list[float], std: list[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (lists, in [0, 1] units, as info.json and the model file hold them)
    as (C, 1, 1) float32 tensors on `device`, the shape `normalize` broadcasts."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32, scaled to [0, 1], then standardised per channel.

    mean, std: float32 tensors of shape (C, 1, 1) on the images' device.
    """
    return (images.float().div_(255.0) - mean) / std


def random_crop_flip(
    x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Pad by `pad` (zeros after normalisation = the mean colour), crop back at random offsets,
    and flip half of the batch horizontally when `flip`. x: float (N, C, H, W)."""
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
        rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]  # (N, 1, H, 1)
        cols = (torch.arange(w, device=dev)[None, :] + dx[:, None])[:, None, None, :]  # (N, 1, 1, W)
        batch_idx = torch.arange(n, device=dev)[:, None, None, None]
        chan_idx = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[batch_idx, chan_idx, rows, cols]
    if flip:
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def crop_padding(image_size: int) -> int:
    """4 pixels on 32x32 (the usual CIFAR setting), scaled to the image size, at least 1."""
    return max(1, image_size // 8)
