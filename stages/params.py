"""The schema of params.yaml: load, validate, refuse bad values by name.

Every key is declared once, in the section dataclasses below: its type and default (the
field), what is allowed and its help (the field's metadata, through `param`). Validation,
the error messages and the commented default params.yaml (`python -m stages params`) are
all derived from that one declaration. Validation runs before any work starts, so a typo
never costs a training run, and each error is one line naming the key, the value and what
is allowed.

(A library such as pydantic could validate too; plain dataclasses keep this module free of
dependencies, so the torch-only core that imports it runs on a bare GPU machine.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UserError

# --- what a value may be: each kind says whether a value is allowed, and what is --------


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None

    def allows(self, v: Any) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool) and (self.lo is None or v >= self.lo)
                and (self.hi is None or v <= self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return "an integer" + (f" >= {self.lo}" if self.lo is not None else "")
        return f"an integer from {self.lo} to {self.hi}"


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return not (v < self.lo or (self.lo_open and v == self.lo) or v > self.hi or (self.hi_open and v == self.hi))

    def __str__(self) -> str:
        return f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class OneOf:
    options: tuple

    def allows(self, v: Any) -> bool:
        return isinstance(v, (str, int)) and not isinstance(v, bool) and v in self.options

    def __str__(self) -> str:
        return "one of " + ", ".join(str(o) for o in self.options)


@dataclass(frozen=True)
class Bool:
    def allows(self, v: Any) -> bool:
        return isinstance(v, bool)

    def __str__(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Text:
    def allows(self, v: Any) -> bool:
        return isinstance(v, str) and bool(v.strip())

    def __str__(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class Devices:
    def allows(self, v: Any) -> bool:
        if v == "all":
            return True
        if isinstance(v, int) and not isinstance(v, bool):
            return v >= 1
        return (isinstance(v, list) and bool(v) and len(set(v)) == len(v)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))

    def __str__(self) -> str:
        return "'all', a device count >= 1, or a list of distinct device ids >= 0"


def param(default: Any, allowed: Any, help: str) -> Any:
    """Declare one key: its default, what is allowed, and the comment params.yaml shows for it."""
    return field(default=default, metadata={"allowed": allowed, "help": help})


# --- the schema: one dataclass per section of params.yaml ---------------------------------

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")
MODELS = ("small-cnn", "resnet18", "mlp")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RESIZE_MODES = ("crop", "stretch")
PLACEMENTS = ("auto", "device", "stream")


@dataclass(frozen=True)
class DataParams:
    dataset: str = param("digits", OneOf(DATASETS),
                         "digits (embedded, offline) | mnist | fashion-mnist | cifar10 | imagefolder")
    root: str = param("data/raw", Text(), "where torchvision datasets and image folders live (a dep of prepare-data)")
    download: bool = param(False, Bool(), "let torchvision fetch mnist / fashion-mnist / cifar10 into root")
    val_fraction: float = param(0.1, Float(0.0, 1.0, lo_open=True, hi_open=True),
                                "share of the training images held out for validation (stratified)")
    test_fraction: float = param(0.2, Float(0.0, 1.0, lo_open=True, hi_open=True),
                                 "share held out for testing when the source has no test split (digits, imagefolder)")
    split_seed: int = param(0, Int(0), "seed of the train/val/test split")
    image_size: int = param(32, Int(4, 1024), "imagefolder only: images are resized to image_size x image_size")
    resize: str = param("crop", OneOf(RESIZE_MODES),
                        "imagefolder only: crop (shorter side to image_size, then the centre) | stretch")
    channels: int = param(3, OneOf((1, 3)), "imagefolder only: 1 (grayscale) or 3 (RGB)")
    skip_bad_images: bool = param(False, Bool(),
                                  "imagefolder only: skip unreadable images with a warning instead of failing")


@dataclass(frozen=True)
class ModelParams:
    name: str = param("small-cnn", OneOf(MODELS), "small-cnn | resnet18 | mlp")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = param(15, Int(1, 100_000), "passes over the training split")
    batch_size: int = param(64, Int(1), "the global batch, split across GPUs / processes")
    lr: float = param(0.002, Float(0.0, 10.0, lo_open=True), "peak learning rate, decayed to 0 on a cosine")
    optimizer: str = param("adamw", OneOf(("adamw", "sgd")), "adamw | sgd")
    momentum: float = param(0.9, Float(0.0, 1.0, hi_open=True), "sgd only")
    weight_decay: float = param(0.0005, Float(0.0, 1.0), "decoupled (adamw) or L2 (sgd)")
    seed: int = param(0, Int(0), "model init, batch order and augmentation")
    accelerator: str = param("auto", OneOf(("auto", "cuda", "cpu")),
                             "auto (cuda when visible, else cpu) | cuda | cpu")
    devices: Any = param("all", Devices(),
                         "all | a count | a list of CUDA ids; with ddp on the cpu: the process count")
    strategy: str = param("dp", OneOf(("dp", "ddp")),
                          "dp = nn.DataParallel in one process | ddp = one process per device")
    precision: str = param("auto", OneOf(PRECISIONS),
                           "auto (bf16 on GPUs that support it, fp32 on the cpu) | bf16 | fp16 | fp32")
    compile: bool = param(False, Bool(), "torch.compile the model")
    augment: bool = param(False, Bool(), "random crop with padding (+ horizontal flip for photos), on the device")
    deterministic: bool = param(False, Bool(), "deterministic GPU kernels (slower); CPU runs are deterministic anyway")
    data_placement: str = param("auto", OneOf(PLACEMENTS),
                                "auto (on the GPU if the split fits, else streamed) | device | stream")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = param(512, Int(1), "batch for the test pass")


@dataclass(frozen=True)
class AnalyzeParams:
    probe: bool = param(True, Bool(), "time training steps at 1, 2, 4, ... devices (the scaling probe)")
    probe_steps: int = param(10, Int(1, 10_000), "timed steps per probe point")
    probe_ddp: bool = param(False, Bool(), "also probe DDP (one process per device)")


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


def show_value(value: Any) -> str:
    """A value as params.yaml spells it: true/false, not True/False; strings quoted where YAML needs it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value.replace("-", "").replace("_", "").replace("/", "").replace(".", "").isalnum() \
            else repr(value)
    return str(value)


def _show_in_error(value: Any) -> str:
    return repr(value) if isinstance(value, str) else show_value(value)


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
            raise UserError(f"{source}: section '{name}' must be a mapping of keys, got {_show_in_error(values)}")
        declared = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            if key not in declared:
                allowed = ", ".join(f"{name}.{k}" for k in declared)
                raise UserError(f"{source}: unknown key '{name}.{key}'; allowed keys: {allowed}")
            allowed = declared[key].metadata["allowed"]
            if not allowed.allows(value):
                raise UserError(f"{source}: {name}.{key} = {_show_in_error(value)} is not allowed; expected {allowed}")
        # An integer where a float is declared (lr: 1) is that float: the same value, one type.
        built[name] = cls(**{k: float(v) if declared[k].type == "float" and isinstance(v, int) else v
                             for k, v in values.items()})
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


def default_params_yaml() -> str:
    """params.yaml with every key at its default and its help as the comment: the repo's params.yaml
    is exactly this (a test keeps it so), and `python -m stages params` prints it."""
    sections = {name: [(f"  {f.name}: {show_value(f.default)}", f.metadata["help"]) for f in fields(cls)]
                for name, cls in SECTIONS.items()}
    width = max(len(text) for entries in sections.values() for text, _ in entries)
    blocks = ["\n".join([f"{name}:", *(f"{text.ljust(width)}  # {help}" for text, help in entries)])
              for name, entries in sections.items()]
    return "\n\n".join(blocks) + "\n"
