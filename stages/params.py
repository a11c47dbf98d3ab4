"""The typed schema of params.yaml: load, validate, refuse bad values by name.

Every key is declared once here, with its type and what is allowed. Validation
runs before any work starts, so a typo never costs a training run, and each error
is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
MODELS = ("small-cnn", "resnet18", "mlp")
ACCELERATORS = ("auto", "cuda", "cpu")
STRATEGIES = ("dp", "ddp")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "sgd")


# --- value checks: each returns None when the value is allowed, else what is allowed ---


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], str | None]:
    if hi is None:
        allowed = "an integer" + (f" >= {lo}" if lo is not None else "")
    else:
        allowed = f"an integer from {lo} to {hi}"

    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool)
        ok = ok and (lo is None or v >= lo) and (hi is None or v <= hi)
        return None if ok else allowed

    return check


def _float(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], str | None]:
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    allowed = f"a number in {left}{lo}, {hi}{right}"

    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return allowed
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            return allowed
        return None

    return check


def _choice(options: tuple) -> Callable[[Any], str | None]:
    allowed = "one of " + ", ".join(str(o) for o in options)
    return lambda v: None if isinstance(v, (str, int)) and not isinstance(v, bool) and v in options else allowed


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def _devices(v: Any) -> str | None:
    allowed = "'all', a device count >= 1, or a list of distinct device ids >= 0"
    if v == "all":
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return None if v >= 1 else allowed
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return None if len(set(v)) == len(v) else allowed
    return allowed


# --- the schema: one dataclass per section; the check for each field sits beside it ---


@dataclass(frozen=True)
class DataParams:
    dataset: str = "digits"
    root: str = "data/raw"
    download: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    image_size: int = 32
    channels: int = 3
    skip_bad_images: bool = False


@dataclass(frozen=True)
class ModelParams:
    name: str = "small-cnn"


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.002
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0005
    seed: int = 0
    accelerator: str = "auto"
    devices: Any = "all"
    strategy: str = "dp"
    precision: str = "auto"
    compile: bool = False
    augment: bool = False
    deterministic: bool = False


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 512


@dataclass(frozen=True)
class AnalyzeParams:
    probe: bool = True
    probe_steps: int = 10
    probe_ddp: bool = False


CHECKS: dict[str, dict[str, Callable[[Any], str | None]]] = {
    "data": {
        "dataset": _choice(DATASETS),
        "root": _str,
        "download": _bool,
        "val_fraction": _float(0.0, 1.0, lo_open=True, hi_open=True),
        "test_fraction": _float(0.0, 1.0, lo_open=True, hi_open=True),
        "split_seed": _int(0),
        "image_size": _int(4, 1024),
        "channels": _choice((1, 3)),
        "skip_bad_images": _bool,
    },
    "model": {"name": _choice(MODELS)},
    "train": {
        "epochs": _int(1, 100_000),
        "batch_size": _int(1),
        "lr": _float(0.0, 10.0, lo_open=True),
        "optimizer": _choice(OPTIMIZERS),
        "momentum": _float(0.0, 1.0, hi_open=True),
        "weight_decay": _float(0.0, 1.0),
        "seed": _int(0),
        "accelerator": _choice(ACCELERATORS),
        "devices": _devices,
        "strategy": _choice(STRATEGIES),
        "precision": _choice(PRECISIONS),
        "compile": _bool,
        "augment": _bool,
        "deterministic": _bool,
    },
    "evaluate": {"batch_size": _int(1)},
    "analyze": {"probe": _bool, "probe_steps": _int(1, 10_000), "probe_ddp": _bool},
}

SECTIONS = {
    "data": DataParams,
    "model": ModelParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "analyze": AnalyzeParams,
}


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    analyze: AnalyzeParams

    def section_dict(self, name: str) -> dict[str, Any]:
        section = getattr(self, name)
        return {f.name: getattr(section, f.name) for f in fields(section)}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def validate(raw: Any, source: str = "params.yaml") -> Params:
    """Check a parsed params mapping against the schema; missing keys take their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            raise UserError(f"{source}: unknown section '{name}'; allowed sections: {', '.join(SECTIONS)}")
    built = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{name}' must be a mapping of keys, got {_show(values)}")
        for key, value in values.items():
            if key not in CHECKS[name]:
                allowed = ", ".join(f"{name}.{k}" for k in CHECKS[name])
                raise UserError(f"{source}: unknown key '{name}.{key}'; allowed keys: {allowed}")
            problem = CHECKS[name][key](value)
            if problem:
                raise UserError(f"{source}: {name}.{key} = {_show(value)} is not allowed; expected {problem}")
        built[name] = cls(**{k: (float(v) if isinstance(getattr(cls, k, None), float) and isinstance(v, int) else v) for k, v in values.items()})
    return Params(**built)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is a UserError naming the key or the line."""
    import yaml  # imported here so that `--help` stays light

    path = Path(path)
    if not path.exists() or path.is_dir():
        raise UserError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where} is not valid YAML: {problem}") from None
    return validate(raw, source=str(path))
