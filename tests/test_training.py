"""The training core and the train stage: device plans, wrapping, weights files, DDP, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

import stages
from stages.core.devices import plan_devices
from stages.core.loop import unwrap
from stages.core.models import build_model
from stages.core.weights import save_model
from stages.errors import UserError
from stages.model_file import model_metadata
from stages.params import SEED

from .helpers import DEFAULT_WEIGHTS_SHA256, ROOT, run_stages, skip_unless_reference_torch, write_params

INFO = {"num_classes": 10, "shape": [1, 8, 8], "class_names": [str(i) for i in range(10)],
        "mean": [0.3], "std": [0.4], "dataset": "digits", "image_mode": "L", "resize": "stretch"}


@pytest.mark.parametrize("name", ["small-cnn", "resnet18", "mlp"])
@pytest.mark.parametrize("shape", [(1, 8), (1, 28), (3, 32)])
def test_models_fit_the_data(name, shape):
    c, s = shape
    model = build_model(name, c, s, 7).eval()
    assert model(torch.zeros(3, c, s, s)).shape == (3, 7)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(UserError, match=r"expected small-cnn, mlp or one of torchvision's classification models .*"
                                        r"python -m stages models"):
        build_model("vgg", 3, 32, 10)


def test_data_parallel_decision_with_patched_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    plan = plan_devices("auto", "all", "dp")
    assert (plan.accelerator, plan.device_ids, plan.use_data_parallel, plan.world_size) == (
        "cuda", [0, 1, 2, 3], True, 1)
    assert plan_devices("cuda", 2, "dp").device_ids == [0, 1]
    assert plan_devices("cuda", [1, 3], "dp").device_ids == [1, 3]
    assert not plan_devices("cuda", 1, "dp").use_data_parallel  # one GPU: no wrapper
    assert plan_devices("cuda", "all", "ddp").world_size == 4
    assert not plan_devices("cuda", "all", "ddp").use_data_parallel
    assert not plan_devices("cpu", "all", "dp").use_data_parallel
    with pytest.raises(UserError, match="train.devices = 5 but only 4 CUDA device"):
        plan_devices("cuda", 5, "dp")
    with pytest.raises(UserError, match=r"names device 7; visible ids are 0..3"):
        plan_devices("cuda", [0, 7], "dp")


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        plan_devices("cuda", "all", "dp")
    assert plan_devices("auto", "all", "dp").accelerator == "cpu"
    assert plan_devices("cpu", 3, "ddp").world_size == 3


def test_unwrap_removes_the_module_prefix(tmp_path):
    model = build_model("small-cnn", 1, 8, 10)
    wrapped = nn.DataParallel(model)
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    assert unwrap(wrapped) is model
    assert unwrap(nn.DataParallel(nn.DataParallel(model))) is model


def test_load_model_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_model("small-cnn", 1, 8, 10)
    with torch.no_grad():  # make BatchNorm running stats non-trivial so they must travel too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    path = tmp_path / "model.safetensors"
    save_model(path, unwrap(nn.DataParallel(model)), model_metadata("small-cnn", INFO))
    loaded = stages.load_model(path)
    assert not loaded.training
    assert loaded.stages_metadata["class_names"] == INFO["class_names"]
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


def _weights(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _train(tmp_path, name, prepared, **train):
    out = tmp_path / name
    params = write_params(tmp_path / f"{name}.yaml", train=train, model=train.pop("model", {"name": "small-cnn"}))
    proc = run_stages("train", "--params", str(params), "--data", str(prepared),
                      "--model", str(out / "model.safetensors"), "--metrics", str(out / "metrics"),
                      "--checkpoint", str(out / "ck.safetensors"))
    return out, proc


def test_train_stage_writes_weights_without_prefix_and_deterministic_metadata(tmp_path, prepared_digits):
    out, proc = _train(tmp_path, "a", prepared_digits, epochs=2, accelerator="cpu")
    assert "accelerator cpu (no CUDA device; training on the CPU)" in proc.stdout
    assert "global batch 64, per-device batch 64" in proc.stdout
    tensors, meta = _weights(out / "model.safetensors")
    assert tensors and not any(k.startswith("module.") for k in tensors)
    assert set(meta) == {"format", "model_name", "num_classes", "input_shape", "class_names", "mean", "std", "dataset",
                         "image_mode", "resize", "params"}
    assert (json.loads(meta["image_mode"]), json.loads(meta["resize"])) == ("L", "stretch")
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    assert metrics["samples_per_second"] > 0 and metrics["num_devices"] == 1 and metrics["world_size"] == 1
    # the same params on the same machine give the same bytes
    out_b, _ = _train(tmp_path, "b", prepared_digits, epochs=2, accelerator="cpu")
    assert (out / "model.safetensors").read_bytes() == (out_b / "model.safetensors").read_bytes()


def test_ddp_two_processes_match_one_process(tmp_path, prepared_digits):
    """Two gloo ranks, each with half of every global batch, plain SGD and no BatchNorm or
    dropout, end with the weights of one process that sees the whole batch."""
    common = dict(model={"name": "mlp"}, epochs=2, batch_size=64, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                  lr=0.05, accelerator="cpu")
    single, _ = _train(tmp_path, "single", prepared_digits, **dict(common, strategy="dp"))
    ddp, proc = _train(tmp_path, "ddp", prepared_digits, **dict(common, strategy="ddp", devices=2))
    assert "strategy ddp (2 processes)" in proc.stdout and "per-device batch 32" in proc.stdout
    a, _ = _weights(single / "model.safetensors")
    b, _ = _weights(ddp / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max((a[k] - stages.load_model(single / "model.safetensors").state_dict()[k]).abs().max() for k in a)
    assert moved == 0  # sanity: load_model gives back exactly what was saved
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    metrics = json.loads((ddp / "metrics" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


@pytest.mark.slow
def test_ddp_accumulation_and_a_frozen_epoch_match_one_process(tmp_path, prepared_digits):
    """Two gloo ranks, each step in two passes of 16 per rank (DDP's all-reduce only on the second),
    the backbone frozen for the first epoch (the wrapper rebuilt when it thaws), end with the weights
    of one process that takes each batch of 64 in one pass."""
    common = dict(model={"name": "mlp"}, epochs=2, batch_size=64, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                  lr=0.05, accelerator="cpu", freeze_epochs=1)
    single, _ = _train(tmp_path, "single", prepared_digits, **dict(common, strategy="dp"))
    ddp, proc = _train(tmp_path, "ddp", prepared_digits, **dict(common, strategy="ddp", devices=2, accumulate=2))
    assert "global batch 64 in 2 passes of 32, per-device batch 16" in proc.stdout
    assert "epoch 2: the backbone trains from now on" in proc.stdout
    a, _ = _weights(single / "model.safetensors")
    b, _ = _weights(ddp / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_accumulation_all_reduces_once_per_step(prepared_digits):
    """Under DDP the passes before a step's last run in `no_sync`: gradients are all-reduced once a step."""
    import torch.distributed as dist

    from stages.core.batches import place_split
    from stages.core.distributed import DistContext, free_port
    from stages.core.loop import build_loop_state, train_one_epoch
    from stages.params import TrainParams
    from stages.prepared import load_prepared

    images, labels, info = load_prepared(prepared_digits, "train")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(build_model("mlp", 1, 8, 10))
        syncing = []
        wrapped.module.register_forward_pre_hook(lambda m, x: syncing.append(wrapped.require_backward_grad_sync))
        cfg = TrainParams(batch_size=64, accumulate=4, accelerator="cpu")
        st = build_loop_state(wrapped, cfg, DistContext(), torch.device("cpu"), info, 256)
        train_one_epoch(wrapped, place_split(images[:256], labels[:256], torch.device("cpu")), 1, st)
    finally:
        dist.destroy_process_group()
    assert syncing == [False, False, False, True] * 4


def _train_args(tmp_path, name, prepared, **train) -> list[str]:
    """`python -m stages train` writing into tmp_path/name, with its checkpoint at tmp_path/name/ck.safetensors."""
    out = tmp_path / name
    params = write_params(tmp_path / f"{name}.yaml", train=train)
    return [sys.executable, "-m", "stages", "train", "--params", str(params), "--data", str(prepared),
            "--model", str(out / "model.safetensors"), "--metrics", str(out / "metrics"),
            "--checkpoint", str(out / "ck.safetensors")]


def _kill_after_epoch(args: list[str], epoch: int) -> None:
    """Start a training run and SIGKILL it (as the OOM killer would) once it has logged `epoch`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(f"epoch {epoch}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# The recipe's state (EMA, best weights so far, patience, MixUp's draws, the frozen backbone) must
# resume too: killed after epoch 3, the backbone still frozen until epoch 4.
RECIPE = dict(epochs=6, ema=0.9, keep="best", patience=3, mixup_alpha=0.2, label_smoothing=0.1, warmup_epochs=1,
              accumulate=2, clip_grad_norm=1.0, freeze_epochs=4, backbone_lr=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("train", [dict(epochs=40), RECIPE], ids=["defaults", "recipe"])
def test_killed_run_resumes_to_identical_weights_and_deletes_its_checkpoint(tmp_path, prepared_digits, train):
    epochs = train["epochs"]
    reference, _ = _train(tmp_path, "reference", prepared_digits, accelerator="cpu", **train)
    assert not (reference / "ck.safetensors").exists(), "a completed run deletes its checkpoint"

    out = tmp_path / "killed"
    args = _train_args(tmp_path, "killed", prepared_digits, accelerator="cpu", **train)
    _kill_after_epoch(args, 3)
    assert (out / "ck.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    assert not [p for p in out.rglob("*.tmp")], "a killed run must leave no half-written file"
    assert not (out / "metrics").exists(), "a killed run writes no metrics: they move into place at its end"

    resumed = run_stages(*args[3:])
    resume_lines = [line for line in resumed.stdout.splitlines() if "Resuming" in line]
    assert len(resume_lines) == 1 and f"after epoch 3 of {epochs}" in resume_lines[0]
    assert "epoch 1/" not in resumed.stdout and "epoch 4/" in resumed.stdout
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert not (out / "ck.safetensors").exists()
    # the learning curves hold every epoch once, rebuilt from the checkpoint's history
    tsv = (out / "metrics" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    ref_tsv = (reference / "metrics" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    run = json.loads((reference / "metrics" / "run.json").read_text())
    assert tsv == ref_tsv and len(tsv) == run["epochs_run"] + 1
    resumed_run = json.loads((out / "metrics" / "run.json").read_text())
    keys = ("epochs_run", "best_epoch", "best_val_accuracy", "stopped_early", "kept")
    assert {k: resumed_run[k] for k in keys} == {k: run[k] for k in keys}


def test_checkpoint_from_other_params_is_not_resumed(tmp_path, prepared_digits):
    # the checkpoint of a killed 40-epoch run with lr 0.002, offered to a 3-epoch run with lr 0.001
    out = tmp_path / "x"
    _kill_after_epoch(_train_args(tmp_path, "x", prepared_digits, epochs=40, accelerator="cpu"), 1)
    assert (out / "ck.safetensors").is_file()
    args = _train_args(tmp_path, "x", prepared_digits, epochs=3, lr=0.001, accelerator="cpu")
    proc = run_stages(*args[3:])
    assert "Resuming" not in proc.stdout
    assert "Not resuming" in proc.stdout and "train.lr 0.002 -> 0.001" in proc.stdout
    assert "train.epochs 40 -> 3" in proc.stdout and "epoch 1/3" in proc.stdout
    assert not (out / "ck.safetensors").exists()  # replaced by this run's own, then deleted at its end


@pytest.mark.slow
def test_run_that_failed_after_its_last_epoch_only_writes_its_outputs(tmp_path, prepared_digits):
    """Training ends, then writing the weights fails (here: their folder is a file): the checkpoint of
    the last epoch stays, and the next run writes the outputs from it without training again."""
    reference, _ = _train(tmp_path, "reference", prepared_digits, epochs=3, accelerator="cpu")
    args = _train_args(tmp_path, "w", prepared_digits, epochs=3, accelerator="cpu")
    out = tmp_path / "w"
    out.mkdir()
    (out / "blocked").write_text("a file where a folder should be\n")
    blocked = list(args)
    blocked[blocked.index("--model") + 1] = str(out / "blocked" / "model.safetensors")
    failed = run_stages(*blocked[3:], check=False)
    assert failed.returncode != 0 and "epoch 3/3" in failed.stdout
    assert (out / "ck.safetensors").is_file()
    again = run_stages(*args[3:])
    assert "after epoch 3 of 3" in again.stdout and "epoch 1/3" not in again.stdout
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert not (out / "ck.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_damaged_files_are_refused_by_name(tmp_path, prepared_digits, damage):
    data = tmp_path / "data"
    shutil.copytree(prepared_digits, data)
    out, _ = _train(tmp_path, "w", data, epochs=1, accelerator="cpu")
    for path in (out / "model.safetensors", data / "test.safetensors"):
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2] if damage == "truncate" else b"\x07" * 64 + original[64:])
        proc = run_stages("evaluate", "--params", str(ROOT / "params.yaml"), "--data", str(data),
                          "--model", str(out / "model.safetensors"), "--out", str(tmp_path / "eval"), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith(f"error: {path} is damaged") and len(proc.stderr.strip().splitlines()) == 1
        path.write_bytes(original)
    ck = out / "ck.safetensors"  # a completed run deleted its checkpoint: put a truncated file there
    ck.write_bytes((out / "model.safetensors").read_bytes()[:100])
    params = write_params(tmp_path / "p.yaml", train={"epochs": 1, "accelerator": "cpu"})
    proc = run_stages("train", "--params", str(params), "--data", str(data), "--model", str(out / "m.safetensors"),
                      "--metrics", str(out / "m"), "--checkpoint", str(ck), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {ck} is damaged")
    assert proc.stderr.strip().endswith(f"delete it (rm {ck}) to train from the first epoch")
    ck.unlink()  # as the line says: the next run trains from the first epoch
    assert "epoch 1/1" in run_stages("train", "--params", str(params), "--data", str(data), "--model",
                                     str(out / "m.safetensors"), "--metrics", str(out / "m"),
                                     "--checkpoint", str(ck)).stdout


def test_the_largest_seed_check_params_allows_trains(tmp_path, prepared_digits):
    # Every seed the params allow must seed torch's generators (model init, each epoch's batch order,
    # augmentation), which take seeds below 2**64 only.
    largest = SEED.hi
    assert not SEED.allows(largest + 1)
    out, proc = _train(tmp_path, "a", prepared_digits, epochs=2, accelerator="cpu", seed=largest, augment=True)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stdout and (out / "model.safetensors").exists()


def test_batch_larger_than_the_data_is_refused(tmp_path, prepared_digits):
    params = write_params(tmp_path / "p.yaml", train={"batch_size": 100000, "accelerator": "cpu"})
    proc = run_stages("train", "--params", str(params), "--data", str(prepared_digits), "--model",
                      str(tmp_path / "m.safetensors"), "--metrics", str(tmp_path / "m"), "--checkpoint",
                      str(tmp_path / "c.safetensors"), check=False)
    assert proc.returncode == 2
    assert "train.batch_size = 100000 is larger than the training split" in proc.stderr
    assert "set train.batch_size to " in proc.stderr  # and what to do


def test_out_of_memory_names_the_per_device_batch(monkeypatch, tmp_path, prepared_digits):
    import stages.train as ts
    from stages.params import validate

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ts, "train", oom)
    p = validate({"train": {"batch_size": 512, "accelerator": "cpu"}})
    with pytest.raises(UserError, match="per-device batch of 512 .* try train.batch_size = 256"):
        ts.train_stage(p, ts.TrainPaths(prepared_digits, tmp_path / "m", tmp_path / "x", tmp_path / "c"), [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dp_matches_single_device_on_cuda():
    """nn.DataParallel over the visible GPUs (up to 2) and one GPU end with the same weights."""
    from stages.core.batches import place_split
    from stages.core.devices import DevicePlan
    from stages.core.distributed import DistContext
    from stages.core.loop import build_loop_state, prepare_model, train_one_epoch
    from stages.params import TrainParams

    torch.manual_seed(0)
    images = torch.randint(0, 256, (512, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (512,))
    cfg = TrainParams(epochs=1, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                      precision="fp32", accelerator="cuda")
    device = torch.device("cuda", 0)
    ids = list(range(min(2, torch.cuda.device_count())))
    results = []
    for plan in (DevicePlan("cuda", "dp", [0], 1), DevicePlan("cuda", "dp", ids, 1)):
        torch.manual_seed(cfg.seed)
        model = build_model("mlp", 1, 8, 10)
        wrapped = prepare_model(model, cfg, plan, DistContext(), device)
        if len(plan.device_ids) == 1:  # exercise the real wrapper even on a one-GPU machine
            wrapped = nn.DataParallel(wrapped, device_ids=plan.device_ids)
        st = build_loop_state(wrapped, cfg, DistContext(), device, INFO, len(labels))
        train_one_epoch(wrapped, place_split(images, labels, device), 1, st)
        results.append({k: v.detach().cpu() for k, v in unwrap(wrapped).state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-5)


def test_random_crop_flip_shifts_and_mirrors_each_image():
    from stages.core.transforms import random_crop_flip

    n, c, h, w, pad = 64, 3, 6, 6, 2
    x = torch.randn(n, c, h, w)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, pad, flip=True, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    shifts, flips = set(), 0
    for i in range(n):
        def crop(dy: int, dx: int, flip: bool, i: int = i) -> torch.Tensor:
            c = padded[i, :, dy:dy + h, dx:dx + w]
            return c.flip(2) if flip else c

        matches = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)
                   if torch.equal(out[i], crop(dy, dx, f))]
        assert matches, f"image {i} is not a crop of its padded self"
        shifts.add(matches[0][:2])
        flips += matches[0][2]
    assert len(shifts) > 5 and 10 < flips < 54  # offsets and flips really vary across the batch
    again = random_crop_flip(x, pad, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded: a resumed epoch augments exactly as before


def test_augmented_training_runs_on_the_stage(tmp_path, prepared_digits):
    out, proc = _train(tmp_path, "aug", prepared_digits, epochs=2, accelerator="cpu", augment=True)
    plain, _ = _train(tmp_path, "plain", prepared_digits, epochs=2, accelerator="cpu")
    assert (out / "model.safetensors").read_bytes() != (plain / "model.safetensors").read_bytes()


# --- where batches come from: resident or streamed from the mapped split ---------------------


def _core_run(prepared, placement: str, model_name: str = "small-cnn", epochs: int = 2):
    """Train the core directly on the prepared digits with a given train.data_placement; the
    final weights, the batches of epoch 1 and the validation results."""
    from stages.core.batches import batch_stream, place_split
    from stages.core.distributed import DistContext
    from stages.core.loop import (
        build_loop_state,
        epoch_permutation,
        evaluate,
        prepare_model,
        rank_batches,
        train_one_epoch,
    )
    from stages.params import TrainParams
    from stages.prepared import load_prepared

    images, labels, info = load_prepared(prepared, "train")
    val_images, val_labels, _ = load_prepared(prepared, "val")
    cfg = TrainParams(epochs=epochs, batch_size=32, accelerator="cpu", data_placement=placement, augment=True)
    device, ctx = torch.device("cpu"), DistContext()
    split = place_split(images, labels, device, placement)
    assert split.streamed == (placement == "stream")
    batches = rank_batches(epoch_permutation(len(split), cfg.seed, 1), cfg.batch_size, ctx)
    with batch_stream(split, batches, device) as stream:
        seen = [(x.clone(), y.clone()) for x, y in stream]
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(model_name, 1, 8, 10), cfg, plan_devices("cpu", 1, "dp"), ctx, device)
    st = build_loop_state(model, cfg, ctx, device, info, len(labels))
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, split, epoch, st)
    val = evaluate(model, place_split(val_images, val_labels, device, placement), st.mean, st.std, 50, device)
    return {k: v.clone() for k, v in unwrap(model).state_dict().items()}, seen, val


def test_streamed_split_gives_the_batches_and_weights_of_the_resident_one(prepared_digits):
    resident_weights, resident_batches, resident_val = _core_run(prepared_digits, "auto")
    streamed_weights, streamed_batches, streamed_val = _core_run(prepared_digits, "stream")
    assert len(resident_batches) == 1295 // 32
    for (x_a, y_a), (x_b, y_b) in zip(resident_batches, streamed_batches, strict=True):
        assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)
    assert all(torch.equal(resident_weights[k], streamed_weights[k]) for k in resident_weights)
    assert resident_val[:2] == streamed_val[:2] and torch.equal(resident_val[2], streamed_val[2])


def test_ranks_together_take_the_single_process_batches():
    from stages.core.distributed import DistContext
    from stages.core.loop import epoch_permutation, rank_batches

    perm = epoch_permutation(1000, 0, 3)
    single = rank_batches(perm, 64, DistContext())
    assert len(single) == 1000 // 64 and all(len(b) == 64 for b in single)
    assert torch.equal(torch.cat(single), perm[: 15 * 64])  # the permutation in order, last partial batch dropped
    for world in (2, 4):
        ranks = [rank_batches(perm, 64, DistContext(rank=r, world_size=world)) for r in range(world)]
        for step, batch in enumerate(single):
            assert torch.equal(torch.cat([ranks[r][step] for r in range(world)]), batch)


def test_batch_stream_raises_the_threads_error_and_stops_when_left(prepared_digits):
    import threading

    from stages.core.batches import Split, batch_stream
    from stages.prepared import load_prepared

    images, labels, _ = load_prepared(prepared_digits, "train")
    split = Split(images, labels, streamed=True)
    bad = [torch.arange(4), torch.tensor([0, 10**6])]  # the second batch names a row that is not there
    with pytest.raises(IndexError), batch_stream(split, bad, torch.device("cpu")) as stream:
        for _ in stream:
            pass
    many = [torch.arange(i, i + 8) for i in range(0, 1200, 8)]
    with batch_stream(split, many, torch.device("cpu")) as stream:
        x, y = next(iter(stream))  # leave after one batch, with the thread ahead and blocked on the queue
        assert torch.equal(x, images[:8]) and torch.equal(y, labels[:8])
    assert not [t for t in threading.enumerate() if t.name == "batch-stream"]


def test_train_stage_streamed_and_resident_write_the_same_weights(tmp_path, prepared_digits):
    resident, _ = _train(tmp_path, "resident", prepared_digits, epochs=2, accelerator="cpu")
    streamed, proc = _train(tmp_path, "streamed", prepared_digits, epochs=2, accelerator="cpu",
                            data_placement="stream")
    assert "streamed from the memory-mapped split" in proc.stdout
    assert (resident / "model.safetensors").read_bytes() == (streamed / "model.safetensors").read_bytes()
    run = __import__("json").loads((streamed / "metrics" / "run.json").read_text())
    assert run["data_streamed"] is True and run["data_on_device"] is False


@pytest.mark.slow
def test_ddp_ranks_streaming_their_batches_match_one_process(tmp_path, prepared_digits):
    common = dict(model={"name": "mlp"}, epochs=1, batch_size=64, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                  lr=0.05, accelerator="cpu")
    single, _ = _train(tmp_path, "single", prepared_digits, **common)
    ddp, proc = _train(tmp_path, "ddp", prepared_digits, **dict(common, strategy="ddp", devices=2,
                                                                 data_placement="stream"))
    assert "strategy ddp (2 processes)" in proc.stdout
    a, _ = _weights(single / "model.safetensors")
    b, _ = _weights(ddp / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_default_run_writes_the_reference_weights(tmp_path, prepared_digits):
    """The repo's params.yaml, prepared and trained on the CPU, reads the mapped split and gives the same
    weights file as ever."""
    import hashlib

    skip_unless_reference_torch()
    proc = run_stages("train", "--params", str(ROOT / "params.yaml"), "--data", str(prepared_digits),
                      "--model", str(tmp_path / "model.safetensors"), "--metrics", str(tmp_path / "metrics"),
                      "--checkpoint", str(tmp_path / "ck.safetensors"))
    assert "indexed in the memory-mapped split" in proc.stdout
    assert hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest() == DEFAULT_WEIGHTS_SHA256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_split_on_cuda_gives_the_resident_batches_and_weights():
    """Pinned buffers, the side stream and its events deliver every batch intact and in order."""
    from stages.core.batches import Split, batch_stream, place_split
    from stages.core.devices import DevicePlan
    from stages.core.distributed import DistContext
    from stages.core.loop import build_loop_state, prepare_model, train_one_epoch
    from stages.params import TrainParams

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2048, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (2048,), generator=gen)
    device = torch.device("cuda", 0)
    batches = [torch.randperm(2048, generator=gen)[:100] for _ in range(50)]
    resident = place_split(images, labels, device, "device")
    with batch_stream(Split(images, labels, streamed=True), batches, device) as stream:
        for (x, y), idx in zip(stream, batches, strict=True):
            assert x.device == device and torch.equal(x, resident.images[idx.to(device)])
            assert torch.equal(y, resident.labels[idx.to(device)])
    cfg = TrainParams(epochs=1, batch_size=64, lr=0.05, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                      precision="fp32", accelerator="cuda", deterministic=True)
    results = []
    for placement in ("device", "stream"):
        torch.manual_seed(cfg.seed)
        model = prepare_model(build_model("mlp", 3, 16, 10), cfg, DevicePlan("cuda", "dp", [0], 1), DistContext(),
                              device)
        st = build_loop_state(model, cfg, DistContext(), device, dict(INFO, shape=[3, 16, 16], mean=[0.5] * 3,
                                                                     std=[0.25] * 3), len(labels))
        train_one_epoch(model, place_split(images, labels, device, placement), 1, st)
        results.append({k: v.detach().cpu() for k, v in model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_stream_to_cuda_without_an_index_streams_to_the_current_gpu():
    """evaluate passes torch.device("cuda"); the stream's thread set it as its current device, which
    CUDA refuses without an index (every evaluate on a GPU failed so, found on an H200)."""
    from stages.core.batches import Split, batch_stream

    images = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    batches = [slice(i, i + 128) for i in range(0, 300, 128)]
    with batch_stream(Split(images, labels, streamed=True), batches, torch.device("cuda")) as stream:
        got = [(x, y) for x, y in stream]
    assert {x.device for x, _ in got} == {torch.device("cuda", torch.cuda.current_device())}
    assert torch.equal(torch.cat([x.cpu() for x, _ in got]), images)
    assert torch.equal(torch.cat([y.cpu() for _, y in got]), labels)


def test_a_background_checkpoint_holds_the_state_when_saved_not_what_training_did_next(tmp_path):
    """The writer copies the state when asked: the file it writes is byte for byte the one a synchronous
    save writes at that moment, though the model and optimizer change at once, while it writes."""
    from stages.core.checkpoint import CheckpointWriter, checkpoint_contents, load_checkpoint
    from stages.io import save_tensors

    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 8, 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.randn(16, 1, 8, 8)), torch.randint(0, 10, (16,))).backward()
        optimizer.step()

    step()
    history = [{"epoch": 1, "val_accuracy": 0.5}]
    save_tensors(tmp_path / "sync.safetensors", *checkpoint_contents(model, optimizer, None, 1, 1, history, {"k": "v"}))
    writer = CheckpointWriter(tmp_path / "background.safetensors")
    writer.save(1, model, optimizer, None, 1, 1, history, {"k": "v"})
    for _ in range(3):  # training goes on, in place, while the writer writes
        step()
    history.append({"epoch": 2, "val_accuracy": 0.6})
    assert writer.wait() == 1
    assert (tmp_path / "background.safetensors").read_bytes() == (tmp_path / "sync.safetensors").read_bytes()
    assert load_checkpoint(tmp_path / "background.safetensors").history == [{"epoch": 1, "val_accuracy": 0.5}]


def test_a_failed_background_checkpoint_write_is_raised_on_the_training_thread(tmp_path):
    from stages.core.checkpoint import CheckpointWriter

    model = build_model("mlp", 1, 8, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "ck.safetensors").mkdir()  # a folder where the file should go: the rename fails
    writer = CheckpointWriter(tmp_path / "ck.safetensors")
    writer.save(1, model, optimizer, None, 1, 0, [], {})
    with pytest.raises(OSError):
        writer.wait()
    assert writer.saved is None
