"""The model file: one `.safetensors` file of the unwrapped model's state dict, whose metadata
says what is needed to rebuild the model. Written by the train stage, read by `load_model`
(stages/core/weights.py) and checked here, without torch, by every stage that uses it.

Metadata: the format tag, an allow-listed model name, the number of classes, the input shape,
the class names, the normalisation (per-channel mean and std in [0, 1] units), the dataset,
how an image file becomes the model's input (`image_mode`, `resize`: see `stages/prepared.py`),
and `params`: the model.* and train.* params that made these weights ("train.lr": 0.002, ...;
those declared `affects_result=False` in stages/params.py, which only decide how a run is launched,
are left out).
Every consumer of the weights checks them against params.yaml (`check_trained_with`), since DVC
can be made to pair weights with params that did not make them (`dvc commit`, `dvc exp save`).
Written only where they apply:

  small_input_stem  false for a resnet with torchvision's ImageNet stem; absent, a resnet has the
                    small-image stem (what resnet18 files have always had)
  pretrained        where the starting weights came from: {"torchvision": "ResNet18_Weights.IMAGENET1K_V1"}
                    or {"file": name, "sha256": ..., "same_as": a torchvision entry when it is one}
  normalization     where mean and std came from when not the train split ("pretrained weights")

The architecture follows from model_name, input_shape (channels: a greyscale first conv; size: a
ViT's patch grid), num_classes and small_input_stem, so the file rebuilds without the pretrained one.
Nothing in it changes from run to run (no timestamps), so the same params on the same machine
give the same file; nothing in it is code, and nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError
from .io import load_tensors
from .params import NOT_SET, Params, first_difference, is_resnet, show_value

FORMAT = "stages.model/1"


# The metadata every model file of this project holds, and what each must be (more keys may be there).
REQUIRED = {"model_name": str, "num_classes": int, "input_shape": list, "class_names": list, "mean": list, "std": list}
# The params sections whose values made the weights, recorded in the file and checked by its consumers.
RECORDED_SECTIONS = ("model", "train")


def model_metadata(model_name: str, info: dict, small_stem: bool = True, pretrained: dict | None = None,
                   normalization: tuple[list[float], list[float], str] | None = None,
                   params: dict[str, Any] | None = None) -> dict:
    """What `load_model` needs to rebuild the model, from the prepared data's info.json; with
    `pretrained` (the weights' source) and `normalization` (mean, std, where they came from) when
    training did not start from scratch or normalise with the train split's statistics; and the
    params that made the weights ("section.key" -> value)."""
    meta = {
        "format": FORMAT,
        "model_name": model_name,
        "num_classes": info["num_classes"],
        "input_shape": info["shape"],
        "class_names": info["class_names"],
        "mean": info["mean"],
        "std": info["std"],
        "dataset": info["dataset"],
        "image_mode": info["image_mode"],
        "resize": info["resize"],
    }
    if is_resnet(model_name) and not small_stem:
        meta["small_input_stem"] = False
    if pretrained is not None:
        meta["pretrained"] = pretrained
    if normalization is not None:
        meta["mean"], meta["std"], meta["normalization"] = normalization
    if params is not None:
        meta["params"] = params
    return meta


def check_metadata(meta: dict, path: str | Path) -> dict:
    """`meta` if it is the metadata of a model file of this project, else a UserError naming the file."""
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a model weights file of this project (its metadata has format "
                        f"{meta.get('format')!r}, expected {FORMAT!r}); give the .safetensors file the train "
                        "stage wrote")
    shape = meta.get("input_shape")
    for key, kind in REQUIRED.items():
        if not isinstance(meta.get(key), kind) or (key == "input_shape" and (
                len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape))):
            raise UserError(f"{path} is a damaged model file: its metadata has no valid {key!r}; retrain with "
                            "`dvc repro`")
    return meta


def read_metadata(path: str | Path) -> dict:
    """The checked metadata of a model file, without reading its tensors."""
    _, meta = load_tensors(path, metadata_only=True)
    return check_metadata(meta, path)


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _classes(names: list[str]) -> str:
    shown = ", ".join(map(str, names[:6])) + (", ..." if len(names) > 6 else "")
    return f"{len(names)} classes ({shown})"


def check_fits(meta: dict, info: dict, path: str | Path, data_dir: str | Path) -> None:
    """Refuse a model whose input shape or classes are not the prepared data's, in one line that
    names both (the alternative is a shape error deep inside torch or scores under wrong names)."""
    model_shape, data_shape = list(meta["input_shape"]), list(info["shape"])
    if model_shape == data_shape and list(meta["class_names"]) == list(info["class_names"]):
        return
    raise UserError(f"{path} does not fit {data_dir}: the model takes {_shape(model_shape)} images and "
                    f"{_classes(meta['class_names'])}, the data has {_shape(data_shape)} images and "
                    f"{_classes(info['class_names'])}; retrain with `dvc repro`, or use a model and data "
                    "that belong together")


def trained_params(p: Params) -> dict[str, Any]:
    """The model.* and train.* params as recorded in a model file ("train.lr" -> 0.002), in
    declaration order, without those that do not change the weights (`affects_result=False`)."""
    return p.result_params(RECORDED_SECTIONS)


def check_trained_with(meta: dict, p: Params, params_path: str | Path, path: str | Path) -> None:
    """Refuse weights that other params made: the first recorded key whose value differs from
    `params_path`'s, with both values, and how to retrain."""
    recorded = meta.get("params")
    if not isinstance(recorded, dict):
        raise UserError(f"{path} does not record the params that trained it (an older model file); retrain it with "
                        "`dvc repro` (or `dvc exp run`)")
    difference = first_difference(recorded, p, RECORDED_SECTIONS)
    if difference is None:
        return
    key, made_with, has = difference
    if has is NOT_SET:
        raise UserError(f"{path} was trained with {key} = {show_value(made_with)}, a key {params_path} does "
                        "not have; retrain with `dvc repro` (or `dvc exp run`)")
    raise UserError(f"{path} was trained with {key} = {show_value(made_with)} but {params_path} has "
                    f"{key} = {show_value(has)}; retrain with `dvc repro` (or `dvc exp run`) "
                    "so that the weights match the params")


def check_weights_use(meta: dict, path: str | Path, params: tuple[Params, str | Path] | None = None,
                      data: tuple[dict, str | Path] | None = None) -> None:
    """The one check every consumer of a model file (evaluate, analyze, predict) makes before using
    it: the params that made it against `params` (the Params read from a file, and the file), then
    its input shape and classes against `data` (a prepared folder's info.json, and the folder)."""
    if params is not None:
        check_trained_with(meta, *params, path)
    if data is not None:
        check_fits(meta, data[0], path, data[1])
