"""DDP process groups: join one, bounded in time, and the collectives the loop needs.

Every DDP rank is started by torch's elastic launcher: torchrun for jobs started by hand (on one
machine or several), or `python -m stages train` itself (`launch.py`). Either way the rank joins
the group its launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...), and a rank
that never arrives becomes an error naming it, not a silent hang:

- every rank marks its arrival in the rendezvous store and waits for the others' marks, so after
  `timeout_s` the missing ranks are named;
- gloo's connect phase does not honour the group's timeout (measured: five times it), so a
  watchdog thread ends the rank with one line if creating the group takes longer;
- the group's timeout then bounds every collective, and `collective_errors` turns a collective
  that timed out, or lost its peer, into one line.

nccl on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import UserError, first_line


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


class PeerLost(UserError):
    """A collective failed because another rank died or was stopped: a consequence, not a cause."""


class RefusedOnEveryRank(UserError):
    """A refusal that every rank reaches alike, from the params and the data alone (a batch the
    processes cannot share, an image too small for the model): rank 0 says it, the others stay quiet."""


def under_launcher() -> bool:
    """True when torchrun (or our own launcher) started this process as one DDP rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(accelerator: str, timeout_s: float, on_give_up: Callable[[str], None] | None = None
                     ) -> DistContext:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a
    one-process group on a free port when no launcher set them). `on_give_up(message)` is called
    before the watchdog ends the process."""
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
    if dist.is_initialized():
        return ctx
    store = rendezvous_store(ctx, timeout_s)
    wait_for_ranks(store, ctx, timeout_s)
    message = (f"ddp rank {ctx.rank}: creating the {backend} process group took longer than {timeout_s:g} s "
               "(train.dist_timeout), although every rank had arrived; check that the machines can reach each "
               "other on all ports (firewalls), or raise train.dist_timeout")
    with watchdog(timeout_s + 5, message, on_give_up):
        dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return ctx


def rendezvous_store(ctx: DistContext, timeout_s: float):
    """A client of the launcher's rendezvous store: torchrun's agent hosts it, or (with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, and always under our own launcher) rank 0 does."""
    import torch.distributed as dist

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(addr, port, ctx.world_size, is_master=ctx.rank == 0 and not agent_store,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, ValueError) as exc:  # DistNetworkError / DistStoreError are RuntimeErrors
        host = "the torchrun agent" if agent_store else "rank 0"
        raise UserError(f"ddp rank {ctx.rank} could not reach the rendezvous store that {host} hosts at "
                        f"{addr}:{port} within {timeout_s:g} s (train.dist_timeout): {first_line(exc)}") from None
    if agent_store:
        # torchrun keeps one store, and the keys the ranks wrote in it, across restarts: a restarted
        # rank could read the last group's gloo addresses and fail or hang (pytorch/pytorch#135712).
        # A prefix per attempt keeps the attempts apart on one machine, where every rank has the same
        # restart count; across machines the counts differ (an agent whose ranks were fine does not
        # count a restart), so there only the environment variable helps.
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) == 1:
            store = dist.PrefixStore(f"stages/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        elif ctx.rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            print("warning: torchrun shares its rendezvous store with the ranks, which makes restarts across "
                  "machines fail or hang (pytorch/pytorch#135712); export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                  "before torchrun on every machine", flush=True)
    return store


def wait_for_ranks(store, ctx: DistContext, timeout_s: float) -> None:
    """Mark this rank's arrival and wait for every other rank's mark; name the ones that never came."""
    store.set(f"arrived/{ctx.rank}", "1")
    keys = [f"arrived/{r}" for r in range(ctx.world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except RuntimeError:  # DistStoreError: timed out
        try:
            missing = [r for r in range(ctx.world_size) if not store.check([f"arrived/{r}"])]
        except RuntimeError:
            missing = []
        who = f"rank(s) {', '.join(map(str, missing))}" if missing else "some ranks"
        raise UserError(f"ddp {who} of {ctx.world_size} did not arrive within {timeout_s:g} s "
                        f"(train.dist_timeout; seen from rank {ctx.rank}): check that every machine started its "
                        "ranks (torchrun on each one) and can reach MASTER_ADDR, or raise train.dist_timeout"
                        ) from None


@contextlib.contextmanager
def watchdog(seconds: float, message: str, on_give_up: Callable[[str], None] | None = None) -> Iterator[None]:
    """End this process with `message` if the block is still running after `seconds`: for calls
    that ignore their own timeout and cannot be interrupted from Python (they wait in C++)."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            if on_give_up is not None:
                on_give_up(message)
            print(f"error: {message}", file=sys.stderr, flush=True)
            os._exit(2)  # the main thread is stuck in C++; an exception could not reach it

    threading.Thread(target=watch, name="stages-watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


@contextlib.contextmanager
def collective_errors(ctx: DistContext, timeout_s: float) -> Iterator[None]:
    """Turn a failed collective into one line: another rank went away (PeerLost), or it waited
    longer than train.dist_timeout."""
    try:
        yield
    except RuntimeError as exc:  # gloo and nccl raise DistBackendError / RuntimeError
        text = str(exc)
        if not ctx.distributed or isinstance(exc, torch.OutOfMemoryError):
            raise
        if "Timed out" in text or "timed out" in text:
            raise UserError(f"ddp rank {ctx.rank} waited longer than train.dist_timeout = {timeout_s:g} s at a "
                            f"collective for the other ranks ({first_line(exc)}); raise train.dist_timeout if a rank "
                            "is just slow (rank 0 validates and checkpoints while the others wait)") from None
        lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
                "NCCL communicator was aborted", "remote process exited")
        found = next((s for s in lost if s in text), None)
        if found:
            raise PeerLost(f"ddp rank {ctx.rank} stopped: it lost its connection to another rank, which died or "
                           f"was stopped ({found})") from None
        raise


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --- collectives ---------------------------------------------------------------------------


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the current GPU for nccl, else the CPU."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def broadcast_bytes(data: bytes | None, ctx: DistContext) -> bytes | None:
    """Rank 0's bytes (or its None) on every rank: e.g. the checkpoint, which only rank 0's machine has."""
    if not ctx.distributed:
        return data
    import torch.distributed as dist

    device = collective_device()
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    n = int(size.item())
    if n < 0:
        return None
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if ctx.is_main
              else torch.empty(n, dtype=torch.uint8, device=device))
    if n:
        dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy().tobytes()


def all_gather_json(value, ctx: DistContext, device: torch.device | None = None) -> list:
    """Every rank's JSON-able value, in rank order (JSON over a byte tensor: nothing is pickled)."""
    if not ctx.distributed:
        return [value]
    import torch.distributed as dist

    device = device or collective_device()
    mine = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    sizes = [int(s) for s in all_gather_floats([float(len(mine))], ctx, device)]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: len(mine)] = mine
    out = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(out, padded)
    return [json.loads(bytes(t[:n].cpu().tolist()).decode()) for t, n in zip(out, sizes)]
