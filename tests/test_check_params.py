"""check-params refuses, in one line and before DVC removes any output, what a later stage would refuse:
device settings this machine cannot run, a batch the DDP processes cannot split, a model too large for the
data's images, a missing data.root. The train stage's own planning refuses the same."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from stages.core.devices import plan_devices, plan_training
from stages.core.models import build_model, check_input_size
from stages.errors import UserError
from stages.params import validate

from .helpers import ROOT, run_stages, write_params

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def check(tmp_path, **sections) -> tuple[int, list[str]]:
    """`python -m stages check-params` on the defaults with `sections` merged in: exit code, output lines."""
    params = write_params(tmp_path / "params.yaml", **sections)
    marker = tmp_path / "params.ok"
    result = CliRunner().invoke(app, ["check-params", "--params", str(params), "--out", str(marker)])
    assert "Traceback" not in result.output
    assert marker.exists() == (result.exit_code == 0)
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def refused(tmp_path, **sections) -> str:
    code, lines = check(tmp_path, **sections)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_ddp_processes_must_split_the_batch(tmp_path):
    line = refused(tmp_path, train={"strategy": "ddp", "accelerator": "cpu", "devices": 3})
    assert line == ("error: train.batch_size = 64 is not allowed with 3 ddp processes (train.devices = 3): the batch "
                    "must split into 3 equal parts; use a multiple of 3 such as 63 or 66, or another device count")
    line = refused(tmp_path, train={"strategy": "ddp", "accelerator": "cpu", "devices": 2, "batch_size": 12,
                                    "accumulate": 4})
    assert "with 2 ddp processes (train.devices = 2) times train.accumulate = 4: the batch must split into 8" in line
    assert check(tmp_path, train={"strategy": "ddp", "accelerator": "cpu", "devices": 2})[0] == 0


def test_the_train_command_refuses_an_unsplittable_batch_once_before_starting_ranks(tmp_path, prepared_digits):
    params = write_params(tmp_path / "p.yaml", train={"strategy": "ddp", "accelerator": "cpu", "devices": 3,
                                                      "epochs": 1})
    proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model",
                      str(tmp_path / "m.safetensors"), "--metrics", str(tmp_path / "metrics"), "--checkpoint",
                      str(tmp_path / "ck.safetensors"), check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines == ["error: train.batch_size = 64 is not allowed with 3 ddp processes (train.devices = 3): the "
                     "batch must split into 3 equal parts; use a multiple of 3 such as 63 or 66, or another device "
                     "count"]


@no_cuda
def test_cuda_settings_on_a_machine_without_cuda_are_refused(tmp_path):
    assert refused(tmp_path, train={"accelerator": "cuda"}) == (
        "error: train.accelerator = 'cuda' but no CUDA device is visible on this machine; use auto or cpu")
    for strategy in ("dp", "ddp"):
        line = refused(tmp_path, train={"devices": [0, 1], "strategy": strategy})
        assert line == ("error: train.devices = [0, 1] lists CUDA device ids, but no CUDA device is visible on this "
                        "machine; on the cpu use all, or train.strategy: ddp with a process count such as "
                        "train.devices: 2")
        # the train stage's own planning refuses the same, so `python -m stages train` is safe too
        with pytest.raises(UserError, match="no CUDA device is visible"):
            plan_devices("auto", [0, 1], strategy)
    # free / free:N claim GPUs where there are some; without CUDA they train on the CPU (docs/gpus-and-clusters.md,
    # "A queue of experiments on a multi-GPU machine"), free:N with ddp as N processes, whose batch split is checked
    assert plan_devices("auto", "free:2", "ddp").world_size == 2
    line = refused(tmp_path, train={"devices": "free:3", "strategy": "ddp"})
    assert "train.batch_size = 64 is not allowed with 3 ddp processes (train.devices = 'free:3')" in line
    line = refused(tmp_path, train={"devices": 2})  # DataParallel over 2 devices needs 2 GPUs
    assert "train.devices = 2 with train.strategy = 'dp' needs CUDA GPUs" in line
    assert "train.strategy: ddp for 2 processes" in line


def test_a_list_of_cuda_ids_is_refused_on_the_cpu_accelerator(tmp_path):
    line = refused(tmp_path, train={"devices": [0, 1], "accelerator": "cpu", "strategy": "ddp"})
    assert "train.devices = [0, 1] lists CUDA device ids, but train.accelerator = 'cpu'" in line


def test_plurals_in_device_messages(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"train.devices = 2 but only 1 CUDA device is visible; use all or at most 1"):
        plan_devices("cuda", 2, "dp")
    with pytest.raises(UserError, match=r"train.devices = \[0, 3\] names device 3; visible ids are 0..0"):
        plan_devices("cuda", [0, 3], "dp")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"only 2 CUDA devices are visible"):
        plan_devices("cuda", 3, "ddp")
    with pytest.raises(UserError, match=r"4 ddp processes \(train.devices = 'all'\)"):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
        plan_training(validate({"train": {"strategy": "ddp", "batch_size": 30}}).train)


@pytest.mark.parametrize("data, advice, not_advised", [
    ({}, "data.dataset = 'digits' has images of one size: choose a model that fits small images, such as "
         "small-cnn, mlp or resnet18", "data.image_size"),
    ({"dataset": "imagefolder", "image_size": 32}, "set data.image_size to at least 75, or choose a model that "
                                                   "fits small images, such as small-cnn, mlp or resnet18", None),
])
def test_a_model_too_large_for_the_images_is_refused_with_advice_for_the_dataset(tmp_path, data, advice,
                                                                                  not_advised):
    if data.get("dataset") == "imagefolder":
        (tmp_path / "photos").mkdir()
        data = {**data, "root": str(tmp_path / "photos")}
    size = data.get("image_size", 8)
    line = refused(tmp_path, data=data, model={"name": "inception_v3"})
    assert line.startswith(f"error: model.name = 'inception_v3' cannot take {size}x{size} images (")
    assert "torchvision gives 75x75 as its smallest input" in line and line.endswith(advice)
    assert not_advised is None or not_advised not in line
    # the train stage's check (given the model it builds, for real) says the same
    model = build_model("inception_v3", 1 if size == 8 else 3, size, 10)
    with pytest.raises(UserError) as err:
        check_input_size(model, "inception_v3", 1 if size == 8 else 3, size, data.get("dataset", "digits"))
    assert str(err.value) == line.removeprefix("error: ")


@pytest.mark.parametrize("name, size, rule, sides", [
    ("vit_b_16", 24, "its 16x16 patches must tile the image, so a side must be a multiple of 16", "16 or 32"),
    ("vit_b_16", 8, "its 16x16 patches must tile the image, so a side must be a multiple of 16", "16"),
    ("vit_b_32", 40, "its 32x32 patches must tile the image, so a side must be a multiple of 32", "32 or 64"),
    ("maxvit_t", 230, "Input size (58, 58) of block 0 is not divisible by partition size 7; the nearest sides it "
                      "builds for: 224 and 445", "224 or 445"),
])
def test_a_size_a_model_cannot_be_built_for_is_refused_with_the_rule_and_the_nearest_sizes(tmp_path, name, size,
                                                                                            rule, sides):
    (tmp_path / "photos").mkdir()
    data = {"dataset": "imagefolder", "root": str(tmp_path / "photos"), "image_size": size}
    line = refused(tmp_path, data=data, model={"name": name})
    assert line == (f"error: model.name = '{name}' cannot be built for {size}x{size} images ({rule}): set "
                    f"data.image_size to {sides}, or choose a model that fits small images, such as small-cnn, "
                    "mlp or resnet18")
    for side in sides.split(" or "):  # the sizes named pass
        assert check(tmp_path, data={**data, "image_size": int(side)}, model={"name": name})[0] == 0


def test_a_vit_on_a_dataset_of_one_size_its_patches_do_not_tile_is_told_to_choose_another_model(tmp_path):
    line = refused(tmp_path, data={"dataset": "digits"}, model={"name": "vit_b_16"})
    assert line == ("error: model.name = 'vit_b_16' cannot be built for 8x8 images (its 16x16 patches must tile "
                    "the image, so a side must be a multiple of 16): data.dataset = 'digits' has images of one "
                    "size: choose a model that fits small images, such as small-cnn, mlp or resnet18")


def test_models_that_fit_pass(tmp_path):
    assert check(tmp_path, model={"name": "resnet18"})[0] == 0
    assert check(tmp_path, model={"name": "regnet_x_400mf"})[0] == 0  # whose builder cannot run on the meta device


@pytest.mark.parametrize("dataset", ["imagefolder", "mnist", "cifar10", "digits"])
def test_a_missing_data_root_is_refused_naming_the_key_the_path_and_what_to_do(tmp_path, dataset):
    root = tmp_path / "raw" / "nothing-here"
    line = refused(tmp_path, data={"dataset": dataset, "root": str(root)})
    assert line.startswith(f"error: data.root = '{root}' does not exist: ")
    if dataset == "imagefolder":
        assert line.endswith("put your images there, one folder per class, or set data.root to the folder that "
                             "holds them")
    elif dataset == "digits":  # read from nowhere, but prepare-data's dep: DVC would refuse it with an Errno line
        assert line.endswith("digits read nothing from it, but it is prepare-data's dependency in dvc.yaml; set "
                             "data.root to a folder that exists, such as data/raw/digits")
    else:
        assert line.endswith(f"put {dataset}'s files there, or set data.download: true to fetch them")
    assert not root.exists()


@pytest.mark.parametrize("dataset, holds", [("imagefolder", "your images, one subfolder per class"),
                                            ("mnist", "mnist's files")])
def test_a_data_root_that_is_a_file_says_what_folder_to_name(tmp_path, dataset, holds):
    root = tmp_path / "photos.zip"
    root.write_bytes(b"PK")
    line = refused(tmp_path, data={"dataset": dataset, "root": str(root)})
    assert line == f"error: data.root = '{root}' is a file; set data.root to the folder that holds {holds}"


def test_a_missing_data_root_to_download_into_is_created(tmp_path):
    root = tmp_path / "raw" / "mnist"
    code, lines = check(tmp_path, data={"dataset": "mnist", "root": str(root), "download": True})
    assert code == 0 and root.is_dir()
    assert lines[0] == f"created data.root {root} for torchvision to download mnist into"


def test_default_params_are_checked_without_torch(tmp_path):
    code = ("import sys, runpy; sys.argv = ['stages', 'check-params', '--out', sys.argv[1]]\n"
            "try: runpy.run_module('stages', run_name='__main__')\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'check-params imported torch for the default params'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ok")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_fp16_is_refused_where_training_runs_on_the_cpu(tmp_path, prepared_digits):
    """fp16 autocast on the CPU trained the digits 10 to 70 times slower than fp32, without gradient scaling."""
    line = refused(tmp_path, train={"precision": "fp16", "accelerator": "cpu"})
    assert line == ("error: train.precision = 'fp16' is not allowed when training runs on the cpu (train.accelerator "
                    "= cpu): fp16 is for CUDA GPUs, and runs many times slower than fp32 on a CPU; use auto (fp32 on "
                    "the cpu), fp32 or bf16")
    if not torch.cuda.is_available():  # auto trains on the cpu here
        assert "(no CUDA device is visible here)" in refused(tmp_path, train={"precision": "fp16"})
    for allowed in ("bf16", "fp32", "auto"):
        assert check(tmp_path, train={"precision": allowed, "accelerator": "cpu"})[0] == 0
    # the train command refuses the same before it trains (and before it starts any rank)
    params = write_params(tmp_path / "p.yaml", train={"precision": "fp16", "accelerator": "cpu", "epochs": 1})
    proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model",
                      str(tmp_path / "m.safetensors"), "--metrics", str(tmp_path / "metrics"), "--checkpoint",
                      str(tmp_path / "ck.safetensors"), check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip() == line
    assert not (tmp_path / "m.safetensors").exists()
