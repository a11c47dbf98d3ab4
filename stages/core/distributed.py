"""DDP process groups: join one, start one on this machine, and the collectives the loop needs.

`python -m stages train` with `train.strategy: ddp` starts one worker per device itself
(`launch_workers`) unless `torchrun` already did (RANK and WORLD_SIZE set), in which case
each process just joins the group (`init_distributed`). Either way the workers run the same
code. nccl on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one rank: only then do gradients need DDP's all-reduce."""
        return self.world_size > 1


def under_launcher() -> bool:
    """True when torchrun (or our own launcher) started this process as one DDP rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port nobody listens on now, so parallel experiments never share a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(accelerator: str) -> DistContext:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if accelerator == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if accelerator == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    return ctx


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def launch_workers(argv: list[str], world_size: int, module: str = "stages", timeout_s: float | None = None) -> None:
    """Start `world_size` copies of `python -m MODULE ARGV` as DDP ranks on this machine and wait.

    Same environment contract as torchrun, so the workers run exactly the code path a
    multi-machine torchrun job runs. If one fails (or `timeout_s` passes), the others are
    stopped and a UserError names the rank.
    """
    port = free_port()  # a fresh port per launch: parallel experiments never share a rendezvous
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failure = None
    try:
        while failure is None:
            codes = [p.poll() for p in procs]
            bad = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
            if bad:
                failure = f"ddp worker rank {bad[0][0]} failed with exit code {bad[0][1]}"
            elif all(code == 0 for code in codes):
                return
            elif deadline is not None and time.monotonic() > deadline:
                failure = f"ddp workers did not finish within {timeout_s:.0f} s"
            else:
                time.sleep(0.05)
    finally:
        for p in procs:  # a rank left waiting at a collective after another one died
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    raise UserError(f"{failure}; see its output above")


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor across ranks (a no-op in one process)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_floats(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Every rank's list of floats, concatenated in rank order (one list in one process)."""
    if not ctx.distributed:
        return list(values)
    import torch.distributed as dist

    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine)
    return [v for t in out for v in t.tolist()]
