"""Per-epoch training checkpoints: one safetensors file, so a kill can never leave half of one.

Tensors: the unwrapped model's state (`model.*`), the optimizer's per-parameter state
(`optim.<index>.<name>`), the RNG states (`rng.*`), and where the recipe keeps more state, the
weights' moving average (`ema.*`, train.ema) and the kept weights of the best epoch so far
(`best.*`, train.keep: best). The rest — epoch, step, history (whose validation accuracies give
the best epoch and the patience count), optimizer hyper-parameters, grad-scaler state and the
fingerprint of the params and data the run depends on — is JSON in the file's metadata.
Nothing is pickled.

Resuming: a run resumes only from a checkpoint of this very run (`run_fingerprint`: the params
that change the result and the data's content); rank 0 reads it and every rank resumes from its
bytes (`shared_checkpoint`), and `restore_loop_state` puts the loop's state back.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io import WriteBehind, load_tensors, save_tensors
from ..model_file import trained_params
from ..params import Params, weights_kind
from .distributed import DistContext, broadcast_bytes

FORMAT = "stages.checkpoint/1"


@dataclass
class Checkpoint:
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    history: list[dict]
    fingerprint: dict
    model_state: dict[str, torch.Tensor]
    optim_state: dict
    scaler_state: dict | None
    rng: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None  # the AveragedModel's state_dict (train.ema)
    best_state: dict[str, torch.Tensor] | None = None  # the kept weights at the best epoch (train.keep: best)


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as (tensors for safetensors, JSON-able rest): per-parameter tensors
    become `optim.<index>.<name>`; per-parameter scalars and the param groups go to the JSON."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of `flatten_optimizer_state`: a state_dict `optimizer.load_state_dict` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["rng.cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def prefixed(prefix: str, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in (state or {}).items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The tensors saved under `prefix.`, or None when there are none."""
    found = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
    return found or None


def checkpoint_contents(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, epoch: int, step: int,
                        history: list[dict], fingerprint: dict, ema: nn.Module | None = None,
                        best_state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's tensors and metadata, copied to the CPU: training may change the originals in place
    the moment this returns, while the copy is being written."""
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer.state_dict())
    tensors = prefixed("model", model.state_dict())
    tensors.update(optim_tensors)
    tensors.update(rng_states())
    tensors.update(prefixed("ema", ema.state_dict() if ema is not None else None))
    tensors.update(prefixed("best", best_state))
    meta = {
        "format": FORMAT,
        "epoch": epoch,
        "step": step,
        "history": history,
        "fingerprint": fingerprint,
        "optimizer": optim_meta,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    # JSON out and back: the same text save_tensors writes, and no list or dict shared with the caller.
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}, json.loads(json.dumps(meta))


class CheckpointWriter:
    """Writes each epoch's checkpoint behind the training thread, while the next epoch trains.

    Serialising and fsyncing the file took 5 to 12 ms an epoch on the training thread (2-core CPU,
    digits), about a tenth of an epoch. The state is copied when `save` is called, so the file holds
    exactly what a synchronous save would have, and it still appears by a rename, whole or not at
    all. `saved` is the epoch whose checkpoint is on disk; `wait()` (before saying which epoch was
    kept, and before the file is deleted) lets the writes finish and raises a write's error."""

    def __init__(self, path: Path, saved: int | None = None, behind: WriteBehind | None = None):
        self.path, self.saved = path, saved
        self.behind = behind or WriteBehind()

    def save(self, epoch: int, *state, **named_state) -> None:
        self.behind.submit(self._write, epoch, *checkpoint_contents(*state, **named_state))

    def _write(self, epoch: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        save_tensors(self.path, tensors, meta)
        self.saved = epoch

    def wait(self) -> int | None:
        self.behind.wait()
        return self.saved


def restore_loop_state(st, ck: Checkpoint | None) -> tuple[list[dict], dict[str, torch.Tensor] | None]:
    """Put a resumed run's optimizer, grad-scaler, moving-average, RNG and step state back into the
    loop's state `st` (core.loop.LoopState); return its history and the kept weights of its best epoch.
    ([], None) for a run that starts afresh. (The model's weights are loaded where it is built.)"""
    if ck is None:
        return [], None
    st.optimizer.load_state_dict(ck.optim_state)
    if st.scaler is not None and ck.scaler_state:
        st.scaler.load_state_dict(ck.scaler_state)
    if st.ema is not None:
        st.ema.load_state_dict(ck.ema_state)
    restore_rng(ck.rng)
    st.step = ck.step
    return ck.history, ck.best_state


def load_checkpoint(path: Path) -> Checkpoint:
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a training checkpoint of this project (format {meta.get('format')!r})")
    return Checkpoint(
        epoch=meta["epoch"],
        step=meta["step"],
        history=meta["history"],
        fingerprint=meta["fingerprint"],
        model_state=unprefixed("model", tensors) or {},
        optim_state=unflatten_optimizer_state(tensors, meta["optimizer"]),
        scaler_state=meta["scaler"],
        rng={k: v for k, v in tensors.items() if k.startswith("rng.")},
        ema_state=unprefixed("ema", tensors),
        best_state=unprefixed("best", tensors),
    )


def run_fingerprint(p: Params, data_dir: Path) -> dict:
    """What the weights depend on, so that a run resumes only from a checkpoint of this very run: the
    params that change the result (`trained_params`), the content of a local weights file, and the
    prepared training data."""
    fingerprint = trained_params(p)
    if weights_kind(p.model.weights) == "file":
        fingerprint["model.weights sha256"] = file_digest([Path(p.model.weights)])[:16]
    fingerprint["prepared data sha256"] = file_digest(
        [data_dir / "info.json", data_dir / "train.safetensors", data_dir / "val.safetensors"])[:16]
    return fingerprint


def shared_checkpoint(path: Path, fingerprint: dict, ctx: DistContext, log) -> Checkpoint | None:
    """Rank 0's resumable checkpoint, on every rank: rank 0 reads it and sends its bytes, since on
    several machines only rank 0's has the file, and all ranks must resume from the same state."""
    resume = resumable_checkpoint(path, fingerprint, log) if ctx.is_main else None
    if not ctx.distributed:
        return resume
    blob = broadcast_bytes(path.read_bytes() if resume is not None else None, ctx)
    if blob is None or ctx.is_main:
        return resume
    with tempfile.TemporaryDirectory(prefix="stages-resume-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(blob)
        return load_checkpoint(copy)


def resumable_checkpoint(path: Path, fingerprint: dict, log) -> Checkpoint | None:
    """The checkpoint at `path` if it belongs to this run; says why not otherwise.

    A completed run deletes its checkpoint, so one that is here was left by a run that was
    killed: mid-way, or after its last epoch but before its outputs were all written (then
    resuming runs no epoch and only writes the outputs)."""
    if not path.exists():
        return None
    try:
        ck = load_checkpoint(path)
    except UserError as exc:  # damaged, or another program's file: the run cannot resume from it
        raise UserError(f"{exc}; it only serves to resume a killed run: delete it (rm {path}) to train from "
                        "the first epoch") from None
    why = fingerprint_difference(ck.fingerprint, fingerprint)
    if why is not None:
        log(f"Not resuming from {path}: it was made with other params or data: {why}")
        return None
    return ck


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """What differs between two flat fingerprints, in words ("train.lr 0.002 -> 0.001"); None if nothing."""
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    return ", ".join(changed) if changed else None
