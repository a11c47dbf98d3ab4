"""Where training runs: the device plan from train.accelerator / devices / strategy, the device
of each process, how many devices share a global batch, and the backend's global settings.

`dp`: one process; `nn.DataParallel` scatters each global batch over the planned CUDA
devices and gathers the outputs on the first. `ddp`: one process per device (see
`distributed.py`). Without CUDA, training runs on the CPU: one process for dp, `devices`
gloo processes for ddp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .distributed import DistContext


@dataclass(frozen=True)
class DevicePlan:
    accelerator: str  # "cuda" or "cpu"
    strategy: str  # "dp" or "ddp"
    device_ids: list[int] = field(default_factory=list)  # CUDA ids used (dp), or [] on the CPU
    world_size: int = 1  # processes to start on this machine (ddp); 1 for dp

    @property
    def use_data_parallel(self) -> bool:
        return self.strategy == "dp" and self.accelerator == "cuda" and len(self.device_ids) > 1

    def num_devices(self, ctx: DistContext) -> int:
        """Devices that share one global batch: DataParallel's GPUs in one process, or the DDP ranks."""
        return ctx.world_size if self.strategy == "ddp" else max(len(self.device_ids), 1)

    def per_device_batch(self, global_batch: int, ctx: DistContext) -> int:
        return global_batch // self.num_devices(ctx)

    def used_device_ids(self, ctx: DistContext) -> list[int]:
        """The device ids a run uses: the planned CUDA ids for dp ([] on the CPU), one per rank for ddp."""
        return list(self.device_ids) if self.strategy == "dp" else list(range(ctx.world_size))


def plan_devices(accelerator: str, devices, strategy: str) -> DevicePlan:
    """Decide where training runs from train.accelerator / train.devices / train.strategy."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator == "auto":
        accelerator = "cuda" if cuda_count > 0 else "cpu"
    if accelerator == "cuda":
        if cuda_count == 0:
            raise UserError("train.accelerator = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        if devices == "all":
            ids = list(range(cuda_count))
        elif isinstance(devices, int):
            if devices > cuda_count:
                raise UserError(f"train.devices = {devices} but only {cuda_count} CUDA device(s) are visible")
            ids = list(range(devices))
        else:
            bad = [i for i in devices if i >= cuda_count]
            if bad:
                raise UserError(f"train.devices = {devices} names device(s) {bad}; visible ids are 0..{cuda_count - 1}")
            ids = list(devices)
        world = len(ids) if strategy == "ddp" else 1
        return DevicePlan("cuda", strategy, ids, world)
    # CPU: one device for dp; `devices` worker processes for ddp (gloo).
    if strategy == "ddp":
        world = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
        return DevicePlan("cpu", "ddp", [], world)
    return DevicePlan("cpu", "dp", [], 1)


def process_device(plan: DevicePlan, ctx: DistContext) -> torch.device:
    """The device this process trains on: its local rank's GPU under ddp, the first planned GPU
    under dp, else the CPU, whose cores are shared out between the ranks on this machine."""
    if plan.accelerator == "cuda":
        return torch.device("cuda", ctx.local_rank if plan.strategy == "ddp" else plan.device_ids[0])
    if ctx.world_size > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return torch.device("cpu")


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels when asked (slower); otherwise cuDNN autotuning and TF32 matmuls."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True  # tensor cores for fp32 Linear layers, as cuDNN does for convs


def device_names(plan: DevicePlan, ctx: DistContext, device: torch.device) -> list[str]:
    """One name per device the run uses ("cpu" for each CPU process)."""
    if device.type != "cuda":
        return ["cpu"] * max(ctx.world_size, 1)
    if plan.strategy == "dp":
        return [torch.cuda.get_device_name(i) for i in plan.device_ids]
    return [torch.cuda.get_device_name(device)] * ctx.world_size


def peak_memory_mb(plan: DevicePlan, device: torch.device) -> list[float]:
    """Peak memory per device used by this process (CUDA) or of the process itself (CPU)."""
    import resource

    if device.type == "cuda":
        ids = plan.device_ids if plan.use_data_parallel else [device.index]
        return [round(torch.cuda.max_memory_allocated(i) / 2**20, 1) for i in ids]
    return [round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)]
