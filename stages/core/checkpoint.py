"""Per-epoch training checkpoints: one safetensors file, so a kill can never leave half of one.

Tensors: the unwrapped model's state (`model.*`), the optimizer's per-parameter state
(`optim.<index>.<name>`), the RNG states (`rng.*`), and where the recipe keeps more state, the
weights' moving average (`ema.*`, train.ema) and the kept weights of the best epoch so far
(`best.*`, train.keep: best). The rest — epoch, step, history (whose validation accuracies give
the best epoch and the patience count), optimizer hyper-parameters, grad-scaler state and the
fingerprint of the params and data the run depends on — is JSON in the file's metadata.
Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io import WriteBehind, load_tensors, save_tensors

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


def save_checkpoint(path: Path, *state, **named_state) -> None:
    """Write a checkpoint now (the arguments are checkpoint_contents')."""
    save_tensors(path, *checkpoint_contents(*state, **named_state))


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


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """What differs between two flat fingerprints, in words ("train.lr 0.002 -> 0.001"); None if nothing."""
    changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)]
    return ", ".join(changed) if changed else None
