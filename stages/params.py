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

import difflib
import functools
import json
import math
import os
import re
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
        # A whole float is that integer: `dvc exp run -S train.epochs=1e1` writes 10.0 (YAML 1.2 reads 1e1 as a float).
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return (isinstance(v, int) and not isinstance(v, bool) and (self.lo is None or v >= self.lo)
                and (self.hi is None or v <= self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return "an integer" + (f" >= {self.lo}" if self.lo is not None else "")
        return f"an integer from {self.lo} to {self.hi}"


# Seeds fit in 32 bits: torch's generators take seeds below 2**64, and the training loop derives each
# epoch's seeds from train.seed times a constant of about a million (stages/core/loop.py).
SEED = Int(0, 2**32 - 1)


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


# train.compile: off, torch.compile's default mode, or one of its named modes.
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class OneOf:
    options: tuple

    def allows(self, v: Any) -> bool:
        if isinstance(v, bool):  # true/false only where the options name them (True == 1 otherwise)
            return any(o is v for o in self.options)
        if isinstance(v, float) and v.is_integer():  # 1e0, as -S writes 1.0, is the integer 1
            v = int(v)
        if isinstance(v, int):  # an integer only where the options name it (1 == True otherwise)
            return any(type(o) is int and o == v for o in self.options)
        return isinstance(v, str) and v in self.options

    def __str__(self) -> str:
        return "one of " + ", ".join(show_value(o) for o in self.options)

    def names(self) -> list[str]:
        """The options a misspelled string may mean (did you mean ...?)."""
        return [o for o in self.options if isinstance(o, str)]


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
        if isinstance(v, float) and v.is_integer():  # a count written as 2e0 (-S writes 2.0)
            v = int(v)
        if isinstance(v, str):
            return free_gpu_count(v) is not None
        if isinstance(v, int) and not isinstance(v, bool):
            return v >= 1
        return (isinstance(v, list) and bool(v) and len(set(v)) == len(v)
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))

    def __str__(self) -> str:
        return ("'all', a device count >= 1, a list of distinct device ids >= 0, or 'free' / 'free:N' "
                "(N >= 1 GPUs that no other run on this machine holds)")


def free_gpu_count(devices: Any) -> int | None:
    """How many GPUs `train.devices` asks to claim ('free' -> 1, 'free:N' -> N); None for anything else."""
    if not isinstance(devices, str):
        return None
    if devices == "free":
        return 1
    name, _, count = devices.partition(":")
    if name == "free" and count.isdigit() and int(count) >= 1 and count == str(int(count)):
        return int(count)
    return None


@dataclass(frozen=True)
class AutoOrCount:
    """auto, or a whole number >= 1 (train.threads)."""

    def allows(self, v: Any) -> bool:
        if isinstance(v, float) and v.is_integer():  # a count written as 2e0 (-S writes 2.0), as Int allows it
            v = int(v)
        return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)

    def __str__(self) -> str:
        return "auto or an integer >= 1"


@dataclass(frozen=True)
class ModelName:
    """A built-in model, or any classification model torchvision ships (its list is read only when the
    name is not a built-in one, so the default params never import torchvision here)."""

    def allows(self, v: Any) -> bool:
        return isinstance(v, str) and (v in BUILT_IN_MODELS or v in torchvision_model_names())

    def __str__(self) -> str:
        return (f"{', '.join(BUILT_IN_MODELS)} or one of torchvision's classification models such as resnet18 "
                "(`python -m stages models` lists them)")

    def names(self) -> list[str]:
        """The names a misspelled one may mean (did you mean ...?): read only for a name that is refused."""
        return [*BUILT_IN_MODELS, *torchvision_model_names()]


@dataclass(frozen=True)
class Weights:
    """none, a torchvision weights name (upper case, as in ResNet18_Weights.IMAGENET1K_V1), or a state-dict file."""

    def allows(self, v: Any) -> bool:
        return isinstance(v, str) and weights_kind(v) is not None

    def __str__(self) -> str:
        return ("none, a torchvision weights name such as DEFAULT or IMAGENET1K_V1, "
                f"or a state-dict file ({' or '.join(WEIGHTS_FILE_SUFFIXES)})")


def param(default: Any, allowed: Any, help: str, affects_result: bool = True) -> Any:
    """Declare one key: its default, what is allowed, the comment params.yaml shows for it, and whether
    it changes what a run computes. A key with `affects_result=False` only decides how a run is kept
    going, whether a file may be fetched, or how the data reaches the device: the weights and the prepared
    data do not record it and a checkpoint made with another value is still resumed (`result_params`)."""
    return field(default=default, metadata={"allowed": allowed, "help": help, "affects_result": affects_result})


# --- the schema: one dataclass per section of params.yaml ---------------------------------



@dataclass(frozen=True)
class Dataset:
    """What the project knows of one `data.dataset` value; every module asks DATASETS, none spells the names."""

    source: str  # the module of stages/sources that reads it: "digits", "torchvision" or "imagefolder"
    image_shape: tuple[int, int] | None = None  # (channels, pixels a side); None: data.channels, data.image_size
    photos: bool = False  # natural photos, where a mirror image is the same class (train.hflip: auto flips them)
    torchvision: tuple[str, str] | None = None  # torchvision's class, and the folder below data.root it reads

    @property
    def downloads(self) -> bool:
        """Whether torchvision can fetch it (data.download)."""
        return self.torchvision is not None

    @property
    def sized_by_params(self) -> bool:
        """Whether data.image_size and data.channels decide its images' shape (the others have one size)."""
        return self.image_shape is None


IMAGE_FOLDER = "imagefolder"  # the one dataset read from files that prepare-data decodes
DATASETS = {
    "digits": Dataset("digits", (1, 8)),  # scikit-learn's bundled 8x8 scans: the offline default
    "mnist": Dataset("torchvision", (1, 28), torchvision=("MNIST", "MNIST/raw")),
    "fashion-mnist": Dataset("torchvision", (1, 28), torchvision=("FashionMNIST", "FashionMNIST/raw")),
    "cifar10": Dataset("torchvision", (3, 32), photos=True, torchvision=("CIFAR10", "cifar-10-batches-py")),
    IMAGE_FOLDER: Dataset("imagefolder"),  # the user's own images, one folder per class
}
# The project's own models; every other name is one of torchvision's (resnet18 among them, which, like
# every resnet, gets a small-image stem for images under SMALL_STEM_BELOW px: model.small_input_stem).
SMALL_CNN, MLP = "small-cnn", "mlp"
BUILT_IN_MODELS = (SMALL_CNN, MLP)  # the default first
# model.small_input_stem: auto gives resnets the small-image stem for images under this many pixels a side.
SMALL_STEM_BELOW = 64
IMAGE_SIDES = Int(4, 1024)  # data.image_size: the image sides a model is built for
WEIGHTS_FILE_SUFFIXES = (".safetensors", ".pth", ".pt")
# Local weights files for the pipeline live here: the folder is a dep of the train stage in dvc.yaml.
PRETRAINED_DIR = "models/pretrained"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RESIZE_MODES = ("crop", "stretch")
PLACEMENTS = ("auto", "device", "stream")


@dataclass(frozen=True)
class DataParams:
    dataset: str = param("digits", OneOf(tuple(DATASETS)),
                         f"{' | '.join(DATASETS)} (digits: embedded, offline)")
    root: str = param("data/raw/digits", Text(),
                      "the dataset's folder, a dep of prepare-data: data/raw/<name> (digits read nothing in theirs)")
    download: bool = param(False, Bool(), "let torchvision fetch "
                           f"{' / '.join(name for name, d in DATASETS.items() if d.downloads)} into root",
                           affects_result=False)  # fetched or copied there by hand, the files are the same
    val_fraction: float = param(0.1, Float(0.0, 1.0, lo_open=True, hi_open=True),
                                "share of the training images held out for validation (stratified)")
    test_fraction: float = param(0.2, Float(0.0, 1.0, lo_open=True, hi_open=True),
                                 "share held out for testing when the source has no test split (digits, imagefolder)")
    split_seed: int = param(0, SEED, "seed of the train/val/test split")
    image_size: int = param(32, IMAGE_SIDES, "imagefolder only: images are resized to image_size x image_size")
    resize: str = param("crop", OneOf(RESIZE_MODES),
                        "imagefolder only: crop (shorter side to image_size, then the centre) | stretch")
    channels: int = param(3, OneOf((1, 3)), "imagefolder only: 1 (grayscale) or 3 (RGB)")
    skip_bad_images: bool = param(False, Bool(),
                                  "imagefolder only: skip unreadable images with a warning instead of failing")

    @property
    def image_shape(self) -> tuple[int, int]:
        """(channels, pixels a side) of the prepared images, known from the params alone."""
        return DATASETS[self.dataset].image_shape or (self.channels, self.image_size)

    @property
    def reads_root(self) -> bool:
        """Whether the dataset is read from data.root (every one but the embedded digits)."""
        return DATASETS[self.dataset].source != "digits"


@dataclass(frozen=True)
class ModelParams:
    name: str = param(SMALL_CNN, ModelName(),
                      f"{' | '.join(BUILT_IN_MODELS)} | any torchvision classification model such as resnet18 "
                      "(python -m stages models)")
    small_input_stem: Any = param("auto", OneOf(("auto", True, False)),
                                  f"resnets: auto (3x3 stride-1 stem, no max-pool, under {SMALL_STEM_BELOW} px) "
                                  "| true | false (torchvision's ImageNet stem)")
    weights: str = param("none", Weights(),
                         f"none | torchvision weights (DEFAULT, IMAGENET1K_V1, ...) | a state dict in "
                         f"{PRETRAINED_DIR}/")
    download: bool = param(False, Bool(), "let torchvision download named weights into its cache ($TORCH_HOME)",
                           affects_result=False)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = param(15, Int(1, 100_000), "passes over the training split")
    batch_size: int = param(64, Int(1), "the global batch, split across GPUs / processes")
    lr: float = param(0.002, Float(0.0, 10.0, lo_open=True), "peak learning rate, decayed to 0 on a cosine")
    optimizer: str = param("adamw", OneOf(("adamw", "sgd")), "adamw | sgd")
    momentum: float = param(0.9, Float(0.0, 1.0, hi_open=True), "sgd only")
    weight_decay: float = param(0.0005, Float(0.0, 1.0), "decoupled (adamw) or L2 (sgd)")
    seed: int = param(0, SEED, "model init, batch order and augmentation")
    accelerator: str = param("auto", OneOf(("auto", "cuda", "cpu")),
                             "auto (cuda when visible, else cpu) | cuda | cpu")
    devices: Any = param("all", Devices(),
                         "all | a count | a list of CUDA ids | free | free:N (GPUs no other run holds); "
                         "ddp on the cpu: the process count")
    strategy: str = param("dp", OneOf(("dp", "ddp")),
                          "dp = nn.DataParallel in one process | ddp = one process per device")
    precision: str = param("auto", OneOf(PRECISIONS),
                           "auto (bf16 on GPUs that support it, fp32 on the cpu) | bf16 | fp16 (CUDA only) | fp32")
    compile: bool | str = param(False, OneOf(COMPILE_MODES),
                                "torch.compile: false | true | reduce-overhead (CUDA graphs) | max-autotune")
    augment: bool = param(False, Bool(), "random crop with padding (+ horizontal flip: train.hflip), on the device")
    hflip: Any = param("auto", OneOf(("auto", True, False)),
                       "with augment, flip half the images left-right: auto (cifar10 only) | true (photos) "
                       "| false (digits, text: a mirror image is another class)")
    deterministic: bool = param(False, Bool(), "deterministic GPU kernels (slower); CPU runs are deterministic anyway")
    max_restarts: int = param(0, Int(0, 100), "ddp: restart the group this often when a rank dies, from the last epoch",
                              affects_result=False)
    dist_timeout: int = param(600, Int(1, 86_400),
                              "ddp: seconds a rank waits for the others to join or at a collective before failing",
                              affects_result=False)
    # The fine-tuning recipe: each key is off (or neutral) by default.
    label_smoothing: float = param(0.0, Float(0.0, 1.0, hi_open=True),
                                   "share of each target spread evenly over all classes (0 = off)")
    warmup_epochs: int = param(0, Int(0, 100_000), "epochs of linear lr warm-up before the cosine decay")
    ema: float = param(0.0, Float(0.0, 1.0, hi_open=True),
                       "decay of an average of the weights per step, e.g. 0.999; validated and saved (0 = off)")
    mixup_alpha: float = param(0.0, Float(0.0, 100.0),
                               "MixUp with Beta(alpha, alpha) (0 = off); with cutmix, one of them per batch")
    cutmix_alpha: float = param(0.0, Float(0.0, 100.0), "CutMix with Beta(alpha, alpha) (0 = off)")
    clip_grad_norm: float = param(0.0, Float(0.0, 1e6), "clip the gradients' total norm to this (0 = off)")
    accumulate: int = param(1, Int(1, 1024), "forward passes per optimizer step; batch_size stays the batch per step")
    keep: str = param("last", OneOf(("last", "best")), "weights to save: last | best (the best val accuracy)")
    patience: int = param(0, Int(0, 100_000), "stop after this many epochs without a better val accuracy (0 = off)")
    freeze_epochs: int = param(0, Int(0, 100_000), "first epochs train the head only, the backbone frozen")
    backbone_lr: float = param(1.0, Float(0.0, 1.0, lo_open=True), "the backbone's lr as a fraction of lr")
    data_placement: str = param("auto", OneOf(PLACEMENTS),
                                "auto (on the GPU if the split fits, else streamed) | device | stream",
                                affects_result=False)
    threads: Any = param("auto", AutoOrCount(),
                         "CPU threads per process: auto (usable cores / ranks on this machine; OMP_NUM_THREADS wins) "
                         "| a count (at most 4 per usable core); results are byte-identical for the same count")

    @property
    def pass_batch(self) -> int:
        """Samples per forward pass, all devices together: batch_size split into train.accumulate passes."""
        return self.batch_size // self.accumulate


@dataclass(frozen=True)
class EvaluateParams:
    # The train stage validates each epoch with this batch too (its val loss and accuracy are train's
    # metrics, and pick the weights with keep: best), so it is one of train's params in dvc.yaml.
    batch_size: int = param(512, Int(1),
                            "batch of the test pass and of train's validation: changing it reruns train too")


@dataclass(frozen=True)
class AnalyzeParams:
    probe: bool = param(True, Bool(), "time training steps at 1, 2, 4, ... GPUs (scaling probe); skipped on one device")
    probe_steps: int = param(10, Int(1, 10_000), "timed steps per probe point")
    probe_ddp: bool = param(False, Bool(), "also probe DDP (one process per GPU); without GPUs: 1 vs 2 CPU processes")


# export.opset: torch's recommended opset, or one the dynamo exporter writes (18 is its lowest).
ONNX_OPSETS = ("default", 18, 19, 20, 21, 22, 23)


@dataclass(frozen=True)
class ExportParams:
    opset: Any = param("default", OneOf(ONNX_OPSETS), "ONNX opset of models/model.onnx: default (torch's "
                       "recommended one) or 18-23")
    check_images: int = param(512, Int(1, 1_000_000), "test-split images run through ONNX Runtime and PyTorch "
                              "to check the file (fewer when the split is smaller)")
    atol: float = param(1e-4, Float(0.0, 1.0), "the ONNX logits may differ from PyTorch's by atol + rtol * |logit|")
    rtol: float = param(1e-3, Float(0.0, 1.0), "see atol")
    label_mismatch: float = param(0.01, Float(0.0, 1.0), "share of checked images whose top-1 class may differ")


SECTIONS = {
    "data": DataParams,
    "model": ModelParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "analyze": AnalyzeParams,
    "export": ExportParams,
}


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    analyze: AnalyzeParams
    export: ExportParams

    def section_dict(self, name: str) -> dict[str, Any]:
        section = getattr(self, name)
        return {f.name: getattr(section, f.name) for f in fields(section)}

    def result_params(self, sections: tuple[str, ...]) -> dict[str, Any]:
        """The keys of `sections` that change what a run computes ("train.lr" -> 0.002), in declaration
        order: those declared `affects_result=False` are left out."""
        return {key: value for name in sections
                for key, value in section_result_params(name, getattr(self, name)).items()}


def section_result_params(name: str, section: Any) -> dict[str, Any]:
    """`Params.result_params` of one section (a DataParams, say, named "data"), for a stage given that
    section alone (prepare-data)."""
    return {f"{name}.{f.name}": getattr(section, f.name) for f in fields(section) if f.metadata["affects_result"]}


NOT_SET = object()  # first_difference: the params file has no such key


def first_difference(recorded: dict[str, Any], p: Params, sections: tuple[str, ...]) -> tuple[str, Any, Any] | None:
    """Where a file's record of the params that made it ("train.lr" -> 0.002, as the weights file and
    info.json hold them) first differs from `p`'s `sections`: (key, recorded value, p's value or NOT_SET),
    or None. Every key counts, those declared `affects_result=False` too: a file that recorded one (made
    before it was declared so) is still checked against it rather than refused for having it."""
    every = {f"{name}.{key}": value for name in sections for key, value in p.section_dict(name).items()}
    current = json.loads(json.dumps(every))  # as the file holds them: lists, not tuples
    for key in [key for key in current if key in recorded] + [key for key in recorded if key not in current]:
        if key not in current:
            return key, recorded[key], NOT_SET
        if recorded[key] != current[key]:
            return key, recorded[key], current[key]
    return None


def show_value(value: Any) -> str:
    """A value as params.yaml spells it: true/false, not True/False; strings quoted where YAML needs it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value.replace("-", "").replace("_", "").replace("/", "").replace(".", "").isalnum() \
            else repr(value)
    return str(value)


def show_in_error(value: Any) -> str:
    """A value in an error message: strings quoted, so that 'free:3' or '' read as what was typed."""
    return repr(value) if isinstance(value, str) else show_value(value)


def validate(raw: Any, source: str = "params.yaml") -> Params:
    """Check a parsed params mapping against the schema; missing keys take their defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    for name in raw:
        if name not in SECTIONS:
            guess = closest(str(name), list(SECTIONS))
            raise UserError(f"{source}: unknown section '{name}'{did_you_mean(guess)}; "
                            f"allowed sections: {', '.join(SECTIONS)}")
    built = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{name}' must be a mapping of keys, got {show_in_error(values)}")
        declared = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            if key not in declared:
                # The list of keys is long (train has 30): the line names where it is instead.
                raise UserError(f"{source}: unknown key '{name}.{key}'{did_you_mean(closest_key(name, str(key)))}; "
                                "`python -m stages params` lists every key with what it does")
            allowed = declared[key].metadata["allowed"]
            if value is None:  # `epochs:` with nothing after it, or `epochs: null`
                raise UserError(f"{source}: {name}.{key} is empty (null); expected {allowed}")
            if not allowed.allows(value):
                named = isinstance(value, str) and hasattr(allowed, "names")  # OneOf, ModelName
                guess = closest(value, allowed.names()) if named else None
                raise UserError(f"{source}: {name}.{key} = {show_in_error(value)} is not allowed{did_you_mean(guess)}; "
                                f"expected {allowed}")
        built[name] = cls(**{k: same_value_declared_type(v, declared[k]) for k, v in values.items()})
    params = Params(**built)
    check_combinations(params, source)
    return params


def same_value_declared_type(value: Any, declared) -> Any:
    """An allowed value in the type its key declares: an integer where a number is declared (lr: 1) is
    that float, and a whole float anywhere else (epochs: 10.0, as `-S train.epochs=1e1` writes it; its
    kind allowed it as the integer) that integer: the same value, one type."""
    number = isinstance(declared.metadata["allowed"], Float)
    if number and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not number and isinstance(value, float):
        return int(value)
    return value


def did_you_mean(guess: str | None) -> str:
    return f" (did you mean {guess}?)" if guess else ""


# Names users bring from other tools, for the keys they mean (difflib finds none of them: too far).
KEY_SYNONYMS = {
    "learning_rate": "train.lr", "learningrate": "train.lr", "lr_rate": "train.lr", "batch": "train.batch_size",
    "bs": "train.batch_size", "num_epochs": "train.epochs", "n_epochs": "train.epochs", "max_epochs": "train.epochs",
    "wd": "train.weight_decay", "gpus": "train.devices", "model": "model.name", "arch": "model.name",
    "architecture": "model.name", "dataset_name": "data.dataset", "eval_batch_size": "evaluate.batch_size",
    "augmentation": "train.augment",
}
# difflib's similarity (2 * matching characters / both lengths) from which a name counts as a typo of
# another: `epoch`, `btach_size`, `devcies`, `trian` are above it, `extra` -> train (0.6) is not.
CLOSE = 0.75


def closest(name: str, allowed: list[str]) -> str | None:
    """The allowed name a misspelled one means, or None when none is close: the same name in another case
    (`lR` -> lr, `ResNet18` -> resnet18), else the one most like it (difflib, case ignored) at CLOSE or
    above, and only where no other is as close (`vgg` is as close to vgg11 as to vgg19: no guess)."""
    lower = {a.lower(): a for a in reversed(allowed)}  # the first of names that differ only in case
    if name.lower() in lower:
        return lower[name.lower()]
    scores = sorted(((difflib.SequenceMatcher(None, name.lower(), a).ratio(), a) for a in lower), reverse=True)
    if not scores or scores[0][0] < CLOSE or (len(scores) > 1 and scores[1][0] == scores[0][0]):
        return None
    return lower[scores[0][1]]


def closest_key(section: str, key: str) -> str | None:
    """The declared key ('train.lr') an unknown one under `section` means (or keys: 'data.download or
    model.download'), or None: a key of the same
    section first, then a well-known synonym, then the same key in another section (`dataset` under
    train: data.dataset). Each step tries the same name in another case before a close one."""
    keys = {name: [f.name for f in fields(cls)] for name, cls in SECTIONS.items()}
    if section in keys and (same_section := closest(key, keys[section])):
        return f"{section}.{same_section}"
    if key.lower() in KEY_SYNONYMS:
        return KEY_SYNONYMS[key.lower()]
    others = {name: names for name, names in keys.items() if name != section}
    meant = closest(key, [k for names in others.values() for k in names])
    found = [f"{name}.{meant}" for name, names in others.items() if meant in names]
    return " or ".join(found) or None  # batch_size: train.batch_size or evaluate.batch_size


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 file', '2 files', '1,000 files', '3 classes' ('es' after an s; `nouns` where neither fits)."""
    return f"{count:,} {noun if count == 1 else nouns or noun + ('es' if noun.endswith('s') else 's')}"


def multiples_near(value: int, step: int) -> str:
    """The multiples of `step` nearest to `value`, for a refusal: '14 or 16' (only '16' below `step`)."""
    lower, upper = value // step * step, (value // step + 1) * step
    return f"{lower} or {upper}" if lower else str(upper)


def listed(items: list[str], shown: int = 3) -> str:
    """A few names, then a count: 'a, b, c and 7 more'."""
    more = f" and {len(items) - shown:,} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def check_combinations(p: Params, source: str) -> None:
    """Values that are allowed alone but not together; one line naming both keys."""
    m, t = p.model, p.train
    if weights_kind(m.weights) == "name":
        torchvision_weights(m.name, m.weights, source)  # raises when the model has no such weights
    if m.small_input_stem != "auto" and not is_resnet(m.name):
        raise UserError(f"{source}: model.small_input_stem = {show_value(m.small_input_stem)} is not allowed with "
                        f"model.name = {m.name!r}; the stem choice applies to resnets (resnet*, resnext*, "
                        "wide_resnet*): use auto")
    if t.warmup_epochs and t.warmup_epochs >= t.epochs:
        raise UserError(f"{source}: train.warmup_epochs = {t.warmup_epochs} is not allowed with train.epochs = "
                        f"{t.epochs}; the warm-up must end before the last epoch")
    if t.freeze_epochs and t.freeze_epochs >= t.epochs:
        raise UserError(f"{source}: train.freeze_epochs = {t.freeze_epochs} is not allowed with train.epochs = "
                        f"{t.epochs}; the backbone would never train: use fewer frozen epochs than train.epochs")
    if t.batch_size % t.accumulate:
        raise UserError(f"{source}: train.batch_size = {t.batch_size} is not allowed with train.accumulate = "
                        f"{t.accumulate}; the batch must split into {t.accumulate} equal forward passes: use a "
                        f"multiple of {t.accumulate} such as {multiples_near(t.batch_size, t.accumulate)}")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is a UserError naming the key or the line."""
    return validate(read_params_file(path), source=str(path))


def read_params_file(path: str | Path) -> Any:
    """params.yaml as DVC reads it (dvc/utils/serialize/_yaml.py: ruamel.yaml's safe loader, YAML 1.2), so
    that every value `dvc exp run -S` writes reads back as the same value: 3e-05 is a float, not a string
    (YAML 1.1, PyYAML's, needs a dot), and `yes` is a string, not true. Every reader of params.yaml in the
    project goes through here. A syntax error is one line naming the line where it is."""
    from ruamel.yaml import YAML, YAMLError  # imported here so that `--help` stays light
    from ruamel.yaml.constructor import DuplicateKeyError

    path = Path(path)
    if not path.exists() or path.is_dir():
        raise UserError(f"params file not found: {path}")
    text = path.read_text()
    try:
        # DVC's loader and resolver; the pure-Python parser (the one DVC gets where ruamel's C parser is not
        # installed) for the same error marks everywhere, and for `scan`, which error_lines reads.
        return YAML(typ="safe", pure=True).load(text)
    except DuplicateKeyError as exc:
        raise UserError(duplicate_key_message(path, exc, text)) from None
    except YAMLError as exc:
        where = error_lines(exc, text)
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        if getattr(exc, "context", None) and getattr(exc, "context_mark", None):
            problem += f" ({exc.context})"  # what the parser was reading: a quoted scalar, a flow sequence, ...
        raise UserError(f"{path}: not valid YAML at{where}: {problem}") from None


def duplicate_key_message(path: Path, exc: Exception, text: str) -> str:
    """A key written twice in one mapping, as the user sees it: "has two `train:` sections (lines 1 and 9):
    merge them" (ruamel's own words show both sections as "{}" and give only the second one's line). The
    file is composed again (composing keeps duplicates) to find the key's lines and its section."""
    from ruamel.yaml import YAML
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    def find(node, keys: tuple[str, ...]) -> tuple[tuple[str, ...], list[int]] | None:
        """(the key's path, its lines) in the mapping where the error is, searched for from `node` down."""
        if isinstance(node, SequenceNode):
            return next((found for child in node.value if (found := find(child, keys))), None)
        if not isinstance(node, MappingNode):
            return None
        if (node.start_mark.line, node.start_mark.column) == (exc.context_mark.line, exc.context_mark.column):
            lines: dict[str, list[int]] = {}
            for key, _ in node.value:
                lines.setdefault(str(key.value), []).append(key.start_mark.line + 1)
            second = exc.problem_mark.line + 1
            return next((((*keys, k), at) for k, at in lines.items() if second in at and len(at) > 1), None)
        return next((found for key, value in node.value if (found := find(value, (*keys, str(key.value))))), None)

    found = find(YAML(typ="safe", pure=True).compose(text), ())
    if found is None:  # not where the error says: ruamel's words, with the line
        return f"{path}: not valid YAML at{error_lines(exc, text)}: {exc.problem}"
    keys, lines = found
    twice = "two" if len(lines) == 2 else str(len(lines))
    distinct = sorted(set(lines))
    at = f"line {lines[0]}" if len(distinct) == 1 else f"lines {', '.join(map(str, distinct[:-1]))} and {distinct[-1]}"
    if len(keys) == 1:
        return f"{path} has {twice} `{keys[0]}:` sections ({at}): merge them into one"
    return f"{path} has {twice} `{'.'.join(keys)}` keys ({at}): keep one"


def error_lines(exc: Exception, text: str) -> str:
    """' line N, column M' where a YAML error is. The parser marks where it noticed the error: often
    the next token, on the line after the real one (past the end of a file whose last bracket or quote is
    never closed, or after a key with no colon). Where it names the construct it was reading (a quoted
    scalar, a flow sequence, a simple key: its context mark), that is where the error is; a plain value
    that runs on from an earlier line (`epochs:3` with no space) is named by both lines."""
    mark = getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None) or "", getattr(exc, "context_mark", None)
    named_by_context = context_mark is not None and context.startswith(("while scanning", "while parsing a flow"))
    if named_by_context:
        mark = context_mark
    if mark is None:
        return ""
    lines = text.splitlines()
    line, column = mark.line, mark.column
    last = max((i for i, t in enumerate(lines) if t.strip()), default=0)
    if line > last:  # the end of the file: the last line with anything on it
        return f" line {last + 1}"
    start = None if named_by_context else plain_value_start(text, mark)
    if start is not None and start < line:
        return f" lines {start + 1}-{line + 1}"
    return f" line {line + 1}, column {column + 1}"


def plain_value_start(text: str, mark) -> int | None:
    """The line where a plain value that runs on into the error's line starts (0-based), or None."""
    from ruamel.yaml import YAML, YAMLError
    from ruamel.yaml.tokens import ScalarToken

    last = None
    try:
        for token in YAML(typ="safe", pure=True).scan(text):
            if (token.start_mark.line, token.start_mark.column) >= (mark.line, mark.column):
                break
            last = token
    except YAMLError:
        pass
    if isinstance(last, ScalarToken) and last.plain and last.end_mark.line >= mark.line:
        return last.start_mark.line
    return None


def default_params_yaml() -> str:
    """params.yaml with every key at its default and its help as the comment: the repo's params.yaml
    is exactly this (a test keeps it so), and `python -m stages params` prints it."""
    return params_yaml({})


def params_yaml(values: dict[str, dict[str, Any]]) -> str:
    """params.yaml in the layout of the repo's, with `values` ({section: {key: value}}) in place of the
    defaults where given (`python -m stages params --from-lock`)."""
    sections = {name: [(f"  {f.name}: {show_value(values.get(name, {}).get(f.name, f.default))}", f.metadata["help"])
                       for f in fields(cls)]
                for name, cls in SECTIONS.items()}
    width = max(len(text) for entries in sections.values() for text, _ in entries)
    blocks = ["\n".join([f"{name}:", *(f"{text.ljust(width)}  # {help}" for text, help in entries)])
              for name, entries in sections.items()]
    return "\n\n".join(blocks) + "\n"


# --- what model.name and model.weights may name ------------------------------------------
# torchvision is imported only for names that are not built in, so the default params are
# checked without it (and `--help` never imports it).


@functools.lru_cache(maxsize=1)
def torchvision_model_names() -> tuple[str, ...]:
    """Every classification model torchvision ships (not its detection or video models)."""
    from torchvision import models

    return tuple(models.list_models(module=models))


def is_resnet(name: str) -> bool:
    """torchvision's ResNet family (a conv1 + max-pool stem), where model.small_input_stem applies."""
    return name.startswith(("resnet", "resnext", "wide_resnet"))


def weights_kind(value: str) -> str | None:
    """'none', 'file' (a state-dict path), 'name' (a torchvision weights name), or None: not allowed."""
    if value == "none":
        return "none"
    if value.endswith(WEIGHTS_FILE_SUFFIXES):
        return "file"
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", value):
        return "name"
    return None


def torchvision_weights(model_name: str, weights_name: str, source: str = "params"):
    """torchvision's weights entry (a `WeightsEnum` member; DEFAULT resolved) for a model, or a UserError."""
    from torchvision import models

    if model_name not in torchvision_model_names():
        raise UserError(f"{source}: model.weights = {weights_name!r} is not allowed with model.name = "
                        f"{model_name!r}: torchvision has no weights for it; use none or a state-dict file")
    enum = models.get_model_weights(model_name)
    names = [*enum.__members__]
    if weights_name not in names:
        raise UserError(f"{source}: model.weights = {weights_name!r} is not allowed with model.name = "
                        f"{model_name!r}; expected none, a state-dict file, or one of {', '.join(names)}")
    return enum[weights_name]


def weights_cache_file(weights) -> Path:
    """Where torchvision keeps a weights entry's file: $TORCH_HOME/hub/checkpoints/<file name of its url>."""
    from urllib.parse import urlparse

    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def check_weights_available(m: ModelParams, pipeline: bool = False) -> None:
    """The weights model.weights names are there to read: in torchvision's cache (or may be downloaded),
    or a file that exists. With `pipeline` (the check-params stage), a file must also lie under
    PRETRAINED_DIR, the train stage's dep, so that DVC reruns training when it changes."""
    kind = weights_kind(m.weights)
    if kind == "name":
        weights = torchvision_weights(m.name, m.weights)
        cached = weights_cache_file(weights)
        if not cached.is_file() and not m.download:
            raise UserError(f"model.weights = {m.weights!r} ({weights}) is not in torchvision's cache: {cached} is "
                            "missing; set model.download: true to fetch it (or copy the file there)")
    elif kind == "file":
        path = Path(os.path.normpath(m.weights))
        if pipeline and (path.is_absolute() or Path(PRETRAINED_DIR) not in path.parents):
            raise UserError(f"model.weights = {m.weights!r} is not allowed in the pipeline: put the file under "
                            f"{PRETRAINED_DIR}/ (a dep of the train stage, so DVC retrains when it changes)")
        if not path.is_file():
            raise UserError(f"model.weights = {m.weights!r}: file not found")
