"""Pretrained weights (model.weights): read them, fit them into a model, and say where they came from.

Two sources:
  - a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...): the file in torchvision's cache
    ($TORCH_HOME/hub/checkpoints), downloaded there only with model.download: true;
  - a local state dict in torchvision's key layout: `.safetensors`, or `.pth` / `.pt` read with
    `torch.load(..., weights_only=True)` (tensors only, nothing unpickled beyond them).

Fitting loads every tensor the model shares with the file. The classifier head always starts
afresh for the data's classes; a resnet's small-image stem is new too; an RGB first conv is
summed over its colours for greyscale data; a ViT's position embeddings are interpolated to the
image size. Anything else that does not fit is an error naming the tensors, and so is a tensor of
the file that has no place in the model (another architecture's weights), except the auxiliary
classifiers GoogLeNet and Inception-v3 are built without.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError, first_line, reraise_interrupt
from ..params import (
    ModelParams,
    check_weights_available,
    listed,
    plural,
    torchvision_model_names,
    torchvision_weights,
    weights_cache_file,
    weights_kind,
)
from .models import classifier_head, first_conv

# The original GoogLeNet and Inception-v3 weights expect (x - 0.5) / 0.5, which torchvision's
# `transform_input` rebuilds from ImageNet-normalised input; normalising so directly is the same.
HALF_NORMALISED = ("googlenet", "inception_v3")


@dataclass
class Pretrained:
    tensors: dict[str, torch.Tensor]
    source: dict  # for the model file's metadata: {"torchvision": ...} or {"file": ..., "sha256": ...}
    mean: list[float] | None  # the normalisation the weights were trained with, when known
    std: list[float] | None
    stats_from: str | None  # where mean and std come from: a torchvision entry, or the file's metadata
    described: str  # "ResNet18_Weights.IMAGENET1K_V1" or "'models/pretrained/r18.pth' (sha256 f37072fd...)"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_stats(model_name: str, weights) -> tuple[list[float], list[float]]:
    """The mean and std a torchvision weights entry was trained with (from its `transforms()`)."""
    if model_name in HALF_NORMALISED:
        return [0.5] * 3, [0.5] * 3
    preset = weights.transforms()
    return list(preset.mean), list(preset.std)


def url_hash_prefix(url: str) -> str:
    """The first hex digits of the file's sha256, which torchvision puts in its file names
    (resnet18-f37072fd.pth); torch.hub checks a download against them."""
    return Path(url).stem.rsplit("-", 1)[-1]


def torchvision_twin(model_name: str, sha256: str):
    """The torchvision weights entry whose file this is, or None."""
    from torchvision import models

    if model_name not in torchvision_model_names():
        return None
    for weights in models.get_model_weights(model_name):
        digits = url_hash_prefix(weights.url)
        if len(digits) >= 8 and sha256.startswith(digits):
            return weights
    return None


def fetch_weights(m: ModelParams, progress: bool = False) -> None:
    """Make sure the weights model.weights names can be read: download named ones into torchvision's
    cache when they are missing and model.download allows it, or check the cached file against the
    digits in its name; otherwise one line saying what is missing or wrong.

    The train command calls it once, before it starts any rank (torchrun's ranks, which no command of
    ours precedes, each call it): hashing a multi-GB file (vit_h_14's) takes seconds, so the ranks and
    their restarts only read the file (`read_pretrained`)."""
    check_weights_available(m)
    if weights_kind(m.weights) != "name":
        return
    weights = torchvision_weights(m.name, m.weights)
    cached = weights_cache_file(weights)
    if cached.is_file():
        check_cached_hash(cached, weights, m.weights)
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary file and moved into place, and checked against the name's hash digits.
    try:
        torch.hub.download_url_to_file(weights.url, str(cached), hash_prefix=url_hash_prefix(weights.url),
                                       progress=progress)
    except OSError as exc:  # URLError, HTTPError, a refused or reset connection, a timeout: all OSErrors
        raise UserError(download_failure(weights.url, cached, exc)) from None


def check_cached_hash(cached: Path, weights, name: str) -> None:
    """The cached file is the one torchvision's entry names: its sha256 begins with the hex digits in
    its file name (resnet18-f37072fd.pth). torch.hub checks them only while downloading
    (`download_url_to_file(hash_prefix=...)`; `load_state_dict_from_url` reads an existing file
    unchecked), so a file copied or left there by hand is checked here, with its HASH_REGEX."""
    found = torch.hub.HASH_REGEX.search(cached.name)
    if found is None or not found.group(1):
        return  # no digest in the name to check against
    digits, actual = found.group(1), file_sha256(cached)
    if not actual.startswith(digits):
        raise UserError(f"model.weights = {name!r} ({weights}): {cached} is not torchvision's file (its sha256 "
                        f"begins {actual[:len(digits)]}, its name says {digits}); delete it, and fetch it again "
                        "with model.download: true or copy the right file there")


def download_failure(url: str, cached: Path, exc: OSError) -> str:
    """One line for a download that failed: the host that could not be reached (or what it answered),
    where the file belongs, and how to put it there by hand."""
    from urllib.error import HTTPError, URLError
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if isinstance(exc, HTTPError):
        what = f"{host} answered HTTP {exc.code} ({exc.reason})"
    else:
        reason = exc.reason if isinstance(exc, URLError) else exc
        what = f"{host} is unreachable ({getattr(reason, 'strerror', None) or reason})"
    return (f"model.download: cannot fetch {url}: {what}; on a machine with network, download that URL and "
            f"place the file at {cached} (the cache of $TORCH_HOME), then rerun")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A local weights file's tensors, and its safetensors metadata ({} for .pth)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        with warnings.catch_warnings():  # a plain pickle.dump file: torch warns of its protocol, then refuses it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch.load raise many types for damaged or foreign files
        reraise_interrupt(exc)  # a Ctrl-C while reading is not a damaged file
        refused = weights_only_refusal(exc)
        if refused:
            raise UserError(f"model.weights = {str(path)!r} {refused}; save the weights alone, "
                            "torch.save(model.state_dict(), path) or a .safetensors file") from None
        reason = first_line(exc)
        raise UserError(f"model.weights = {str(path)!r} cannot be read as a state dict: {reason}") from None
    for wrapper in ("state_dict", "model"):  # a training checkpoint around the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"model.weights = {str(path)!r} is not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DataParallel / DDP wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, {}


def weights_only_refusal(exc: Exception) -> str | None:
    """What torch.load(weights_only=True) refused in a file, for our own one line ("holds ..."); None for
    any other error.

    torch's message advises loading with weights_only=False, which would run the file's code, so it is
    never quoted: it is recognised by its first words (torch has no exception type of its own for it;
    its UnpicklingError is matched by name: no pickle import here), and what it names is kept: the object
    (a GLOBAL, from a torch.save or a pickle.dump of protocols 1-3), or the pickle instruction its reader
    does not take (a plain pickle.dump of protocol 0, 4 or 5), named by pickletools' table of opcodes, which
    reads and runs nothing."""
    import pickletools

    text = str(exc)
    if type(exc).__name__ != "UnpicklingError" or "Weights only load failed" not in text:
        return None
    never = "such a file is never loaded, since loading it could run code"
    named = re.search(r"GLOBAL ([\w.]+)", text)
    if named:
        return f"holds a pickled Python object ({named[1]}), not only tensors: {never}"
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode and chr(int(opcode[1])) in pickletools.code2op:
        name = pickletools.code2op[chr(int(opcode[1]))].name
        return (f"is a plain pickle (torch's weights-only reader stops at its {name} instruction), not torch.save's "
                f"tensors: {never}")
    return "cannot be read as a state dict: it is not a file torch.save wrote (nor pickled tensors)"


def file_stats(meta: dict) -> tuple[list[float] | None, list[float] | None]:
    """mean and std from a safetensors file's metadata (this project's model files carry them)."""
    import json

    try:
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    except (KeyError, ValueError, TypeError):
        return None, None
    return mean, std


def read_pretrained(m: ModelParams) -> Pretrained | None:
    """The weights model.weights names (None for `none`), read on the CPU; `fetch_weights` first (it
    checks a cached torchvision file's digest once per command; this runs in every rank)."""
    kind = weights_kind(m.weights)
    if kind == "none":
        return None
    check_weights_available(m)  # one line naming the cache file and model.download when it is missing
    if kind == "name":
        weights = torchvision_weights(m.name, m.weights)
        tensors, _ = read_state_dict(weights_cache_file(weights))
        mean, std = weights_stats(m.name, weights)
        return Pretrained(tensors, {"torchvision": str(weights)}, mean, std, str(weights), str(weights))
    path = Path(m.weights)
    sha256 = file_sha256(path)
    tensors, meta = read_state_dict(path)
    source = {"file": path.name, "sha256": sha256}
    mean, std = file_stats(meta)
    stats_from = f"the metadata of {path.name}" if mean is not None else None
    twin = torchvision_twin(m.name, sha256) if mean is None else None
    if twin is not None:
        source["same_as"] = str(twin)
        mean, std = weights_stats(m.name, twin)
        stats_from = str(twin)
    return Pretrained(tensors, source, mean, std, stats_from, f"{str(path)!r} (sha256 {sha256[:12]}...)")


def for_channels(values: list[float], channels: int) -> list[float]:
    """RGB statistics for greyscale data: their average (the first conv sums its RGB kernels)."""
    return values if len(values) == channels else [sum(values) / len(values)] * channels


def built_without(model: nn.Module, key: str) -> bool:
    """Whether a file's tensor belongs to a submodule the model was built without (set to None),
    such as GoogLeNet's aux1 or Inception-v3's AuxLogits with aux_logits=False."""
    top = key.split(".", 1)[0]
    return top in model.__dict__ and model.__dict__[top] is None  # nn.Module keeps a None submodule there


def fit_pretrained(model: nn.Module, pretrained: Pretrained, model_name: str, small_stem: bool) -> str:
    """Copy the pretrained tensors into `model` (built for the data); return the one-line report.

    Raises a UserError naming the tensors that cannot fit (a few, then a count)."""
    tensors = pretrained.tensors
    own = model.state_dict()
    head = classifier_head(model)
    conv_name, _ = first_conv(model)
    conv_key = f"{conv_name}.weight"
    notes: list[str] = []
    position = "encoder.pos_embedding"
    if hasattr(model, "patch_size") and position in tensors and tensors[position].shape != own[position].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        before = tensors[position].shape[1] - 1  # patches, without the class token
        tensors = interpolate_embeddings(model.image_size, model.patch_size, tensors)
        notes.append(f"position embeddings interpolated from {before} to {tensors[position].shape[1] - 1} patches")
    fitted: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    misfit: list[str] = []
    new_stem = False
    for key, target in own.items():
        if key.startswith(f"{head}."):
            continue  # the head is new: sized for the data's classes
        source = tensors.get(key)
        if source is None:
            if not key.endswith("num_batches_tracked"):  # older files lack BatchNorm's step counter
                missing.append(key)
            continue
        if key == conv_key and small_stem and source.shape[2:] != target.shape[2:]:
            new_stem = True  # the small-image stem is new too: a 3x3 kernel where the file has the 7x7 one
            continue
        if key == conv_key and source.shape[1] == 3 and target.shape[1] == 1 and source.shape[2:] == target.shape[2:]:
            source = source.sum(dim=1, keepdim=True)  # greyscale x through RGB kernels: (x, x, x) summed
            notes.append(f"{conv_name} summed over RGB for 1-channel images")
        if source.shape != target.shape:
            misfit.append(f"{key} {list(source.shape)} vs {list(target.shape)}")
            continue
        fitted[key] = source
    # Tensors of the file with no place in the model: only the auxiliary classifiers of GoogLeNet and
    # Inception-v3 may be left out (the model is built without them: its attribute is None); any other
    # means the file is another architecture's, whose shared first blocks would load silently.
    unused = sorted(k for k in tensors if k not in own)
    foreign = [k for k in unused if not built_without(model, k)]
    if foreign:
        raise UserError(f"model.weights = {pretrained.described} does not fit model.name {model_name!r}: "
                        f"{len(foreign)} of its {plural(len(tensors), 'tensor')} have no place in it "
                        f"({listed(foreign)}); is it another model's weights?")
    if missing or misfit:
        parts = ([f"{len(misfit)} of another shape ({listed(misfit)})"] if misfit else []) + \
                ([f"{len(missing)} missing from the file ({listed(missing)})"] if missing else [])
        raise UserError(f"model.weights = {pretrained.described} does not fit model {model_name!r}: "
                        f"{plural(len(misfit) + len(missing), 'tensor')} cannot be loaded: {'; '.join(parts)}")
    with torch.no_grad():
        for key, value in fitted.items():
            own[key].copy_(value)  # state_dict tensors share storage with the model's
    new = [f"head {head} for {own[f'{head}.weight'].shape[0]} classes"]
    if new_stem:
        new.append(f"small-image stem {conv_name}")
    line = f"pretrained {pretrained.described}: loaded {plural(len(fitted), 'tensor')}; new: {', '.join(new)}"
    if notes:
        line += f"; {'; '.join(notes)}"
    if unused:
        line += f"; not used: {listed(unused)}"
    return line


def pretrained_normalization(pretrained: Pretrained | None, channels: int) -> tuple[list, list, str] | None:
    """The mean and std the pretrained weights were trained with, and where they came from, when known
    (torchvision weights, a file identical to them, or a model file of this project); None: normalise
    with the train split's statistics."""
    if pretrained is None or pretrained.mean is None:
        return None
    return (for_channels(pretrained.mean, channels), for_channels(pretrained.std, channels),
            f"pretrained weights: {pretrained.stats_from}")
