"""Where training runs: the device plan from train.accelerator / devices / strategy, the device
of each process, how many devices share a global batch, and the backend's global settings.

`dp`: one process; `nn.DataParallel` scatters each global batch over the planned CUDA
devices and gathers the outputs on the first. `ddp`: one process per device (see
`distributed.py`). Without CUDA, training runs on the CPU: one process for dp, `devices`
gloo processes for ddp. `free` / `free:N` ask for GPUs no other run holds (`gpu_claims.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from ..errors import UserError
from ..params import TrainParams, free_gpu_count, multiples_near, plural, show_in_error
from .distributed import DistContext


@dataclass(frozen=True)
class DevicePlan:
    accelerator: str  # "cuda" or "cpu"
    strategy: str  # "dp" or "ddp"
    device_ids: list[int] = field(default_factory=list)  # CUDA ids used (one per rank for ddp), or [] on the CPU
    world_size: int = 1  # processes to start on this machine (ddp); 1 for dp
    claim: int = 0  # GPUs still to claim before training (train.devices: free / free:N); see gpu_claims.py

    @property
    def use_data_parallel(self) -> bool:
        return self.strategy == "dp" and self.accelerator == "cuda" and len(self.device_ids) > 1

    def num_devices(self, ctx: DistContext) -> int:
        """Devices that share one global batch: DataParallel's GPUs in one process, or the DDP ranks."""
        return ctx.world_size if self.strategy == "ddp" else max(len(self.device_ids), 1)

    def per_device_batch(self, global_batch: int, ctx: DistContext) -> int:
        return global_batch // self.num_devices(ctx)

    def used_device_ids(self, ctx: DistContext) -> list[int]:
        """The device ids a run uses: the planned CUDA ids for dp ([] on the CPU); for ddp the ids its
        launcher planned, or one per rank (local numbering) under torchrun."""
        if self.strategy == "dp":
            return list(self.device_ids)
        return list(self.device_ids) or list(range(ctx.world_size))


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_accelerator(accelerator: str) -> str:
    """train.accelerator with 'auto' decided: cuda when a GPU is visible, else cpu."""
    cuda_count = cuda_device_count()
    if accelerator == "auto":
        return "cuda" if cuda_count > 0 else "cpu"
    if accelerator == "cuda" and cuda_count == 0:
        raise UserError("train.accelerator = 'cuda' but no CUDA device is visible on this machine; use auto or cpu")
    return accelerator


def plan_devices(accelerator: str, devices, strategy: str) -> DevicePlan:
    """Decide where training runs from train.accelerator / train.devices / train.strategy."""
    resolved = resolve_accelerator(accelerator)
    claim = free_gpu_count(devices)
    if resolved == "cuda":
        cuda_count = cuda_device_count()
        if claim is not None:  # the ids are known once claimed
            return DevicePlan("cuda", strategy, [], claim if strategy == "ddp" else 1, claim=claim)
        if devices == "all":
            ids = list(range(cuda_count))
        elif isinstance(devices, int):
            if devices > cuda_count:
                raise UserError(f"train.devices = {devices} but only {plural(cuda_count, 'CUDA device')} "
                                f"{'is' if cuda_count == 1 else 'are'} visible; use all or at most {cuda_count}")
            ids = list(range(devices))
        else:
            bad = [i for i in devices if i >= cuda_count]
            if bad:
                raise UserError(f"train.devices = {devices} names {'device' if len(bad) == 1 else 'devices'} "
                                f"{', '.join(map(str, bad))}; visible ids are 0..{cuda_count - 1}")
            ids = list(devices)
        world = len(ids) if strategy == "ddp" else 1
        return DevicePlan("cuda", strategy, ids, world)
    # CPU: one process for dp; `devices` gloo processes for ddp (a count; free:N means N processes, so
    # a queue written for a GPU machine runs unchanged on a laptop). GPU ids and DataParallel over several
    # devices mean CUDA: refused, rather than silently training on one CPU.
    why = ("train.accelerator = 'cpu'" if accelerator == "cpu" else "no CUDA device is visible on this machine")
    if isinstance(devices, list):
        raise UserError(f"train.devices = {show_in_error(devices)} lists CUDA device ids, but {why}; on the cpu "
                        "use all, or train.strategy: ddp with a process count such as train.devices: 2")
    if strategy == "ddp":
        return DevicePlan("cpu", "ddp", [], claim or (devices if isinstance(devices, int) else 1))
    if isinstance(devices, int) and devices > 1:
        raise UserError(f"train.devices = {devices} with train.strategy = 'dp' needs CUDA GPUs, but {why}; on the "
                        f"cpu use all, or train.strategy: ddp for {devices} processes")
    return DevicePlan("cpu", "dp", [], 1)


def plan_training(cfg: TrainParams) -> DevicePlan:
    """The device plan of a run, with its global batch checked against the processes that share it:
    the train command refuses here once, before it starts any rank (and check-params before DVC
    removes the last model)."""
    plan = plan_devices(cfg.accelerator, cfg.devices, cfg.strategy)
    check_batch_split(cfg, plan.world_size)
    return plan


def check_batch_split(cfg: TrainParams, processes: int, under_torchrun: bool = False) -> None:
    """train.batch_size must split evenly into train.accumulate passes on each DDP process. The
    processes are train.devices' for a run this project starts, torchrun's WORLD_SIZE under torchrun."""
    parts = processes * cfg.accumulate
    if cfg.batch_size % parts == 0:
        return
    chosen = (f"WORLD_SIZE = {processes}, from torchrun" if under_torchrun
              else f"train.devices = {show_in_error(cfg.devices)}")
    how = (f"{plural(processes, 'ddp process', 'ddp processes')} ({chosen})"
           + (f" times train.accumulate = {cfg.accumulate}" if cfg.accumulate > 1 else ""))
    other = "another process count (torchrun's --nproc-per-node)" if under_torchrun else "another device count"
    raise UserError(f"train.batch_size = {cfg.batch_size} is not allowed with {how}: the batch must split into "
                    f"{parts} equal parts; use a multiple of {parts} such as "
                    f"{multiples_near(cfg.batch_size, parts)}, or {other}")


def with_claimed(plan: DevicePlan, ids: list[int]) -> DevicePlan:
    """The plan once its GPUs are claimed."""
    return replace(plan, device_ids=list(ids), claim=0)


def rank_plan(accelerator: str, world_size: int, launched: dict | None) -> DevicePlan:
    """The plan of one DDP rank started by a launcher, which chose the processes. Under our own
    launcher, `launched` says which GPUs the run planned (its ranks see only those: local rank i
    trains on visible GPU i); under torchrun, CUDA_VISIBLE_DEVICES and --nproc-per-node choose."""
    if launched is not None:
        return DevicePlan(launched["accelerator"], "ddp", list(launched["device_ids"]), world_size)
    return DevicePlan(resolve_accelerator(accelerator), "ddp", [], world_size)


def visible_devices_env(ids: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for child processes that must see exactly the GPUs `ids` of this one."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [n.strip() for n in parent.split(",")] if parent else [str(i) for i in range(torch.cuda.device_count())]
    return ",".join(names[i] for i in ids)


def process_device(plan: DevicePlan, ctx: DistContext) -> torch.device:
    """The device this process trains on: its local rank's GPU under ddp, the first planned GPU
    under dp, else the CPU, whose cores are shared out between the ranks on this machine."""
    if plan.accelerator == "cuda":
        device = torch.device("cuda", ctx.local_rank if plan.strategy == "ddp" else plan.device_ids[0])
        torch.cuda.set_device(device)  # work on "the current GPU" must not land on (another run's) GPU 0
        return device
    if ctx.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins (torch reads it)
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
