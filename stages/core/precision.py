"""Mixed precision: train.precision's names, the dtype each stands for, and the autocast around
the forward pass. The one place these names meet torch dtypes."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

# train.precision -> the autocast dtype (None: plain fp32, no autocast). "auto" is resolved per device.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on GPUs that support it, fp32 elsewhere. None means plain fp32."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return DTYPES[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """The train.precision name of a resolved dtype: bf16, fp16 or fp32."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass when `dtype` is bf16/fp16; a no-op for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(precision: str, accelerator_setting: str, accelerator: str) -> None:
    """fp16 is for CUDA, refused where training runs on the CPU, as `accelerator: cuda` is refused without
    CUDA: there its autocast has no fast kernels (the digits trained 10 to 70 times slower than in fp32 on
    this project's CPUs; bf16, which CPUs with AVX-512 run natively, about as fast) and no gradient scaling
    (torch's GradScaler is CUDA's), so small gradients vanish. `accelerator` is the resolved "cpu" or "cuda"."""
    if precision == "fp16" and accelerator == "cpu":
        why = "train.accelerator = cpu" if accelerator_setting == "cpu" else "no CUDA device is visible here"
        raise UserError(f"train.precision = 'fp16' is not allowed when training runs on the cpu ({why}): fp16 is "
                        "for CUDA GPUs, and runs many times slower than fp32 on a CPU; use auto (fp32 on the cpu), "
                        "fp32 or bf16")
