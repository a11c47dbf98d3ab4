"""torchvision's models by name, and fine-tuning from pretrained weights: on the CPU, offline.

"Pretrained" files here are torchvision architectures at a seeded random init, written the way
users have them (torch.save of a state dict, or safetensors); the named-weights tests point
TORCH_HOME at a temporary folder, so nothing touches the network or the user's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision import models
from typer.testing import CliRunner

import stages
from stages.cli import app
from stages.core import pretrained
from stages.core.models import build_model, classifier_head, first_conv
from stages.core.pretrained import Pretrained, fit_pretrained, read_state_dict
from stages.errors import UserError
from stages.io import load_tensors
from stages.params import ModelParams

from .helpers import error_line, train_in_process, write_params


@pytest.fixture(scope="module")
def resnet18_imagenet_layout():
    """A resnet18 state dict as torchvision's ImageNet weights lay it out (1000 classes, RGB 7x7 stem)."""
    torch.manual_seed(123)
    return models.resnet18().state_dict()


@pytest.mark.parametrize("name, channels, size", [("mobilenet_v3_small", 1, 32), ("squeezenet1_1", 3, 32),
                                                  ("googlenet", 1, 64), ("efficientnet_b0", 3, 32)])
def test_torchvision_models_fit_the_data(name, channels, size):
    model = build_model(name, channels, size, 7).train()
    assert first_conv(model)[1].in_channels == channels
    assert model.get_submodule(classifier_head(model)).weight.shape[0] == 7
    out = model(torch.randn(2, channels, size, size))  # one tensor in training mode too (no auxiliary heads)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


def test_resnet_stem_follows_small_input_stem():
    def stem(size, setting="auto"):
        model = build_model("resnet18", 3, size, 10, setting)
        return model.conv1.kernel_size, type(model.maxpool).__name__

    small, imagenet = ((3, 3), "Identity"), ((7, 7), "MaxPool2d")
    assert stem(32) == small and stem(63) == small  # auto: the small-image stem under 64 px
    assert stem(64) == imagenet and stem(224, True) == small and stem(32, False) == imagenet
    assert build_model("small-cnn", 1, 8, 10, True)[0].kernel_size == (3, 3)  # not a resnet: ignored


def test_images_too_small_for_the_model_are_refused_before_training(tmp_path, prepared_digits):
    out, result = train_in_process(tmp_path, "inception", prepared_digits, model={"name": "inception_v3"}, epochs=1)
    line = error_line(result)
    assert "model.name = 'inception_v3' cannot take 8x8 images" in line and "75x75" in line
    assert "epoch 1" not in result.output and not (out / "model.safetensors").exists()
    with pytest.raises(UserError, match="'vit_b_16' cannot be built for 40x40 images"):
        build_model("vit_b_16", 3, 40, 10)  # 16-pixel patches do not tile 40 pixels


def test_a_torchvision_model_trains_on_the_stage_and_rebuilds_from_its_file(tmp_path, prepared_digits):
    out, result = train_in_process(tmp_path, "mnv3", prepared_digits, model={"name": "mobilenet_v3_small"},
                                   epochs=1, batch_size=256)
    assert result.exit_code == 0, result.output
    assert "model mobilenet_v3_small (" in result.output and "epoch 1/1" in result.output
    model = stages.load_model(out / "model.safetensors")
    assert first_conv(model)[1].in_channels == 1  # the digits are greyscale
    saved, _ = load_tensors(out / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    run = json.loads((out / "metrics" / "run.json").read_text())
    assert run["model"] == "mobilenet_v3_small" and run["pretrained"] is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fine_tuning_from_a_local_file_loads_every_backbone_tensor(tmp_path, prepared_digits,
                                                                   resnet18_imagenet_layout, suffix):
    """The head is new (10 classes), the RGB stem is summed for greyscale, every other tensor comes from
    the file; with the backbone frozen for the whole run, the backbone's parameters end as they started."""
    source = resnet18_imagenet_layout
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(source, path)
    else:
        save_file(source, str(path))
    # The backbone trains at 1e-6 x the lr, without weight decay: 6 AdamW steps move it by at most ~1e-8
    # (train.freeze_epochs must leave the backbone an epoch to train).
    out, result = train_in_process(tmp_path, "ft", prepared_digits, epochs=1, batch_size=256, backbone_lr=1e-6,
                                   weight_decay=0.0,
                                   model={"name": "resnet18", "weights": str(path), "small_input_stem": False})
    assert result.exit_code == 0, result.output
    [report] = [line for line in result.output.splitlines() if line.startswith("pretrained ")]
    assert "loaded 120 tensors; new: head fc for 10 classes; conv1 summed over RGB for 1-channel images" in report
    path.unlink()  # the fine-tuned model rebuilds from its own file alone
    model = stages.load_model(out / "model.safetensors")
    for name, param in model.named_parameters():
        if name.startswith("fc."):
            assert param.shape[0] == 10
        elif name == "conv1.weight":
            torch.testing.assert_close(param, source[name].sum(dim=1, keepdim=True))
        else:
            torch.testing.assert_close(param, source[name], atol=1e-7, rtol=0, msg=name)
    meta = model.stages_metadata
    assert meta["pretrained"]["file"] == path.name
    assert meta["small_input_stem"] is False and model.conv1.kernel_size == (7, 7)
    run = json.loads((out / "metrics" / "run.json").read_text())
    assert run["pretrained"] == meta["pretrained"] and run["normalization"] == "train split"
    if suffix == ".pth":
        torch.save(source, path)
        assert meta["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tensors_that_cannot_fit_are_named(resnet18_imagenet_layout):
    state = dict(resnet18_imagenet_layout)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer4.1.bn2.bias"]
    model = build_model("resnet18", 3, 64, 10)
    with pytest.raises(UserError) as err:
        fit_pretrained(model, Pretrained(state, {}, None, None, None, "'r18.pth'"), "resnet18", small_stem=False)
    assert str(err.value) == ("model.weights = 'r18.pth' does not fit model 'resnet18': 2 tensors cannot be loaded: "
                              "1 of another shape (layer1.0.conv1.weight [64, 64, 1, 1] vs [64, 64, 3, 3]); "
                              "1 missing from the file (layer4.1.bn2.bias)")


def test_another_architectures_weights_are_refused(tmp_path):
    """A resnet34 file shares resnet18's names for its first blocks, so those would load and the rest go
    unused; its extra tensors name it as another model's weights."""
    torch.manual_seed(0)
    path = tmp_path / "models" / "pretrained" / "r34.pth"
    path.parent.mkdir(parents=True)
    torch.save(models.resnet34().state_dict(), path)
    tensors, _ = read_state_dict(path)
    model = build_model("resnet18", 3, 32, 3)  # small-image stem and a 3-class head, as for CIFAR-like data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as err:
        fit_pretrained(model, Pretrained(tensors, {}, None, None, None, f"{str(path)!r}"), "resnet18", small_stem=True)
    extra = sorted(set(tensors) - set(before))
    assert len(extra) == 96 and len(tensors) == 218
    assert str(err.value) == (f"model.weights = {str(path)!r} does not fit model.name 'resnet18': 96 of its 218 "
                              f"tensors have no place in it ({', '.join(extra[:3])} and 93 more); "
                              "is it another model's weights?")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was loaded


def test_auxiliary_classifiers_the_model_is_built_without_may_go_unused():
    torch.manual_seed(0)
    source = models.googlenet(aux_logits=True, init_weights=True).state_dict()  # as torchvision's file has them
    model = build_model("googlenet", 3, 64, 5)
    report = fit_pretrained(model, Pretrained(source, {}, None, None, None, "'g.pth'"), "googlenet", False)
    assert "new: head fc for 5 classes" in report and "not used: aux1.conv.bn.bias" in report
    assert torch.equal(model.conv1.conv.weight, source["conv1.conv.weight"])


def test_checkpoint_wrappers_and_module_prefixes_are_unwrapped(tmp_path):
    state = {"module.fc.weight": torch.ones(2, 3), "module.fc.bias": torch.zeros(2)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ck.pth")
    tensors, _ = read_state_dict(tmp_path / "ck.pth")
    assert set(tensors) == {"fc.weight", "fc.bias"}
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="'.*bad.pth' cannot be read as a state dict") as err:
        read_state_dict(tmp_path / "bad.pth")
    assert "weights_only" not in str(err.value)  # torch's advice to load it with weights_only=False is not quoted


class RunsCode:
    """Unpickling this would run a command: the kind of .pth file that must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_holding_python_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    evil = {"fc.weight": torch.ones(2, 3), "hook": RunsCode(marker)}
    torch.save(evil, tmp_path / "evil.pth")
    torch.save(evil, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # torch's pre-1.6 format
    torch.save(nn.Linear(3, 2), tmp_path / "whole.pth")  # a whole model rather than its state dict
    for protocol in (0, 2, pickle.DEFAULT_PROTOCOL):  # a plain pickle.dump: no torch format at all
        with open(tmp_path / f"pickle{protocol}.pth", "wb") as f:
            pickle.dump(evil, f, protocol=protocol)
    named = {"evil.pth": "posix.system", "legacy.pth": "posix.system", "whole.pth": "torch.nn.modules.linear.Linear",
             "pickle2.pth": "torch.storage._load_from_bytes"}  # the first object torch refuses: the tensor's
    for name in [*named, "pickle0.pth", f"pickle{pickle.DEFAULT_PROTOCOL}.pth"]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's UserWarning about the pickle protocol is not shown either
            with pytest.raises(UserError) as err:
                read_state_dict(tmp_path / name)
        message = str(err.value)
        if name in named:
            what = f"holds a pickled Python object ({named[name]}), not only tensors"
        else:
            what = "is a plain pickle (torch's weights-only reader stops at its "
        assert message.startswith(f"model.weights = '{tmp_path / name}' {what}"), message
        assert "such a file is never loaded, since loading it could run code" in message
        assert "torch.save(model.state_dict(), path)" in message
        assert "weights_only" not in message and "\n" not in message  # not torch's advice to load it anyway
    assert not marker.exists()


def test_vit_position_embeddings_follow_the_image_size():
    torch.manual_seed(0)
    source = models.vit_b_32().state_dict()  # 224 px: 7x7 patches
    model = build_model("vit_b_32", 3, 64, 5)
    report = fit_pretrained(model, Pretrained(source, {}, None, None, None, "'vit.pth'"), "vit_b_32", False)
    assert "position embeddings interpolated from 49 to 4 patches" in report
    assert torch.equal(model.state_dict()["encoder.layers.encoder_layer_11.mlp.3.weight"],
                       source["encoder.layers.encoder_layer_11.mlp.3.weight"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


# --- torchvision's named weights, through its cache --------------------------------------------


def test_named_weights_missing_offline_is_one_line(tmp_path, monkeypatch, prepared_digits):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = write_params(tmp_path / "p.yaml", model={"name": "resnet18", "weights": "DEFAULT"})
    expected = str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    line = error_line(CliRunner().invoke(app, ["check-params", "--params", str(params), "--out", str(tmp_path / "ok")]))
    assert expected in line and "set model.download: true" in line and "ResNet18_Weights.IMAGENET1K_V1" in line
    _, result = train_in_process(tmp_path, "offline", prepared_digits, epochs=1,
                                 model={"name": "resnet18", "weights": "DEFAULT"})
    assert expected in error_line(result)
    assert not (tmp_path / "ok").exists()


def cache_as_torchvisions_file(tmp_path, monkeypatch, state) -> Path:
    """`state` in torchvision's cache as ResNet18_Weights.IMAGENET1K_V1's file. The real file cannot be
    made offline (its name pins its sha256), so the entry's URL names this file's digits instead."""
    path = tmp_path / "state.pth"
    torch.save(state, path)
    digits = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(models.ResNet18_Weights.IMAGENET1K_V1.value, "url",
                        f"https://download.pytorch.org/models/resnet18-{digits}.pth")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / f"resnet18-{digits}.pth"
    cached.parent.mkdir(parents=True)
    path.rename(cached)
    return cached


def test_a_cached_file_that_is_not_torchvisions_is_refused(tmp_path, monkeypatch, prepared_digits,
                                                          resnet18_imagenet_layout):
    """A file at torchvision's cache path whose sha256 does not begin with the digits in its name (random
    weights here) is not trained from as ImageNet weights; nothing is downloaded (model.download: false)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(resnet18_imagenet_layout, cached)
    out, result = train_in_process(tmp_path, "fake", prepared_digits, epochs=1,
                                   model={"name": "resnet18", "weights": "DEFAULT"})
    line = error_line(result)
    assert line.startswith(f"error: model.weights = 'DEFAULT' (ResNet18_Weights.IMAGENET1K_V1): {cached} is not "
                           "torchvision's file (its sha256 begins ")
    assert "its name says f37072fd); delete it, and fetch it again with model.download: true" in line
    assert "epoch 1" not in result.output and not (out / "model.safetensors").exists()
    assert cached.is_file()  # the user's file is left for them to look at


def counted_hashing(monkeypatch) -> list[Path]:
    """The files `file_sha256` hashes in this process, one entry per call (it still hashes them)."""
    hashed: list[Path] = []
    real = pretrained.file_sha256

    def counting(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(pretrained, "file_sha256", counting)
    return hashed


def test_a_wrong_cached_file_is_refused_once_before_any_ddp_rank_starts(tmp_path, monkeypatch, prepared_digits,
                                                                        resnet18_imagenet_layout):
    """The train command hashes the cached file once, before it starts the ranks: a wrong one is refused
    there, in this process (the ranks would be other processes), with the one line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(resnet18_imagenet_layout, cached)
    hashed = counted_hashing(monkeypatch)
    out = tmp_path / "ddp"
    # The ranks rerun the command line (sys.argv): this run's, as `python -m stages train` would have it.
    monkeypatch.setattr(sys, "argv", ["stages", "train", "--params", str(tmp_path / "ddp.yaml"), "--data",
                                      str(prepared_digits), "--model", str(out / "model.safetensors"), "--metrics",
                                      str(out / "metrics"), "--checkpoint", str(out / "checkpoint.safetensors")])
    _, result = train_in_process(tmp_path, "ddp", prepared_digits, epochs=1, strategy="ddp", devices=2,
                                   model={"name": "resnet18", "weights": "DEFAULT"})
    assert result.exit_code == 2
    assert result.output.count("is not torchvision's file") == 1
    assert error_line(result).startswith(f"error: model.weights = 'DEFAULT' (ResNet18_Weights.IMAGENET1K_V1): "
                                         f"{cached} is not torchvision's file (its sha256 begins ")
    assert hashed == [cached]  # here, once: no rank started to hash it again
    assert not (out / "model.safetensors").exists() and cached.is_file()


def test_fetching_checks_the_cached_digest_and_the_ranks_only_read(tmp_path, monkeypatch, resnet18_imagenet_layout):
    """`fetch_weights` (once per train command, before the ranks) hashes the cached file;
    `read_pretrained` (in every rank, and again after each restart) does not."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = cache_as_torchvisions_file(tmp_path, monkeypatch, resnet18_imagenet_layout)
    hashed = counted_hashing(monkeypatch)
    m = ModelParams(name="resnet18", weights="IMAGENET1K_V1")
    pretrained.fetch_weights(m)
    assert hashed == [cached]
    for _rank in range(2):
        assert pretrained.read_pretrained(m).source == {"torchvision": "ResNet18_Weights.IMAGENET1K_V1"}
    assert hashed == [cached]  # the ranks read the file without hashing it
    with open(cached, "r+b") as f:  # one byte changed: no longer the file its name names
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(UserError, match=r"is not torchvision's file .*; delete it, and fetch it again"):
        pretrained.fetch_weights(m)


def test_named_weights_from_the_cache_bring_their_normalisation(tmp_path, monkeypatch, prepared_digits,
                                                               resnet18_imagenet_layout):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache_as_torchvisions_file(tmp_path, monkeypatch, resnet18_imagenet_layout)
    out, result = train_in_process(tmp_path, "named", prepared_digits, epochs=1, batch_size=256,
                                   model={"name": "resnet18", "weights": "IMAGENET1K_V1", "small_input_stem": False})
    assert result.exit_code == 0, result.output
    assert "pretrained ResNet18_Weights.IMAGENET1K_V1: loaded 120 tensors; new: head fc for 10 classes; " \
           "conv1 summed over RGB" in result.output
    meta = stages.load_model(out / "model.safetensors").stages_metadata
    assert meta["pretrained"] == {"torchvision": "ResNet18_Weights.IMAGENET1K_V1"}
    assert meta["normalization"] == "pretrained weights: ResNet18_Weights.IMAGENET1K_V1"
    assert meta["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])  # RGB statistics, one grey channel
    assert meta["std"] == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    assert meta["small_input_stem"] is False


def test_the_small_image_stem_is_new_and_reported(resnet18_imagenet_layout):
    model = build_model("resnet18", 3, 32, 10)  # auto: the small-image stem at 32 px
    report = fit_pretrained(model, Pretrained(resnet18_imagenet_layout, {}, None, None, None, "'r18.pth'"),
                            "resnet18", small_stem=True)
    assert report == "pretrained 'r18.pth': loaded 119 tensors; new: head fc for 10 classes, small-image stem conv1"
    assert torch.equal(model.layer1[0].conv1.weight, resnet18_imagenet_layout["layer1.0.conv1.weight"])


def test_check_params_keeps_weights_files_in_the_train_stages_dep(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save({"fc.weight": torch.zeros(1)}, path)
    params = write_params(tmp_path / "p.yaml", model={"name": "resnet18", "weights": str(path)})
    line = error_line(CliRunner().invoke(app, ["check-params", "--params", str(params), "--out", str(tmp_path / "o")]))
    assert "put the file under models/pretrained/" in line


def test_models_command_lists_torchvision_models_and_their_weights():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert set(rows) == {"small-cnn", "mlp", *models.list_models(module=models)}
    assert "IMAGENET1K_V2" in rows["resnet50"] and "small_input_stem" in rows["resnet50"]
    assert "IMAGENET1K_V1" in rows["mobilenet_v3_small"] and "small_input_stem" not in rows["mobilenet_v3_small"]
