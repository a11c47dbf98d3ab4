"""train.compile's modes, the compile time kept out of samples/s, fused optimizers on CUDA only,
and a progress readout that never waits for the device. All on the CPU: the modes compile there too
(inductor's C++ backend; reduce-overhead's CUDA graphs only apply on CUDA)."""

from __future__ import annotations

import json

import pytest
import torch

from stages.core.batches import place_split
from stages.core.devices import plan_devices
from stages.core.distributed import DistContext
from stages.core.loop import (
    COMPILE_WARMUP_STEPS,
    build_loop_state,
    compile_mode,
    make_optimizer,
    prepare_model,
    train_one_epoch,
)
from stages.core.models import build_model
from stages.core.readout import LatestValue
from stages.io import load_tensors
from stages.params import TrainParams
from stages.prepared import load_prepared

from .helpers import train_in_process

CPU = torch.device("cpu")


def test_compile_setting_names_torch_compile_mode():
    assert [compile_mode(v) for v in (False, True, "default", "reduce-overhead", "max-autotune")] == \
        [None, "default", "default", "reduce-overhead", "max-autotune"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_optimizer_on_cuda_only(optimizer):
    """The CPU keeps torch's default implementation (its runs keep their bytes); CUDA gets the fused one."""
    model = build_model("mlp", 1, 8, 10)
    cfg = TrainParams(optimizer=optimizer)
    assert not make_optimizer(model, cfg, CPU).defaults.get("fused")
    assert make_optimizer(model, cfg, torch.device("cuda")).defaults["fused"] is True


def test_latest_value_on_the_cpu_is_the_value_offered():
    latest = LatestValue(CPU)
    assert latest.value() != latest.value()  # NaN before anything arrived
    latest.offer(torch.tensor(0.25))
    assert latest.value() == 0.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_latest_value_on_cuda_arrives_without_a_sync():
    latest = LatestValue(torch.device("cuda"))
    latest.offer(torch.tensor(0.5, device="cuda"))
    latest.offer(torch.tensor(0.75, device="cuda"))  # ignored: a copy is in flight
    torch.cuda.synchronize()
    assert latest.value() == 0.5


def test_first_steps_are_timed_apart_when_the_model_compiles(prepared_digits):
    """The untimed steps (what a compiled model spends compiling) go to compile_seconds; the epoch's
    samples and seconds are the rest; the next epoch is timed whole."""
    images, labels, info = load_prepared(prepared_digits, "train")
    cfg = TrainParams(accelerator="cpu", batch_size=64)
    model = prepare_model(build_model("mlp", 1, 8, 10), cfg, plan_devices("cpu", 1, "dp"), DistContext(), CPU)
    st = build_loop_state(model, cfg, DistContext(), CPU, info, len(labels))
    assert st.untimed_steps == 0  # not compiled: every step counts
    st.untimed_steps = COMPILE_WARMUP_STEPS
    split = place_split(images, labels, CPU)
    steps = len(labels) // 64
    first = train_one_epoch(model, split, 1, st)
    assert first.samples == (steps - COMPILE_WARMUP_STEPS) * 64 and st.compile_seconds > 0 and st.untimed_steps == 0
    compiled = st.compile_seconds
    second = train_one_epoch(model, split, 2, st)
    assert second.samples == steps * 64 and st.compile_seconds == compiled


def test_train_stage_compiles_and_reports_the_compile_time_apart(tmp_path, prepared_digits):
    """reduce-overhead through the train stage: the same result as eager (within float reordering), the
    compile time in run.json and in the log, and not in samples/s."""
    common = dict(model={"name": "mlp"}, epochs=2)
    eager, result = train_in_process(tmp_path, "eager", prepared_digits, **common)
    assert result.exit_code == 0, result.output
    compiled, result = train_in_process(tmp_path, "compiled", prepared_digits, compile="reduce-overhead", **common)
    assert result.exit_code == 0, result.output
    assert "epoch 1: compiling (train.compile: reduce-overhead) took" in result.output
    assert "epoch 2: compiling" not in result.output  # compiled once
    run = json.loads((compiled / "metrics" / "run.json").read_text())
    assert run["compile"] == "reduce-overhead" and run["compile_seconds"] > 0
    assert json.loads((eager / "metrics" / "run.json").read_text())["compile_seconds"] == 0
    from stages.analyze.report import run_summary_section
    from stages.run_summary import read_run_summary

    info = json.loads((prepared_digits / "info.json").read_text())
    summary = "\n".join(run_summary_section(read_run_summary(compiled / "metrics" / "run.json"), info))
    assert f"(not counting {run['compile_seconds']:.1f} s of torch.compile, mode reduce-overhead)" in summary
    a, _ = load_tensors(eager / "model.safetensors")
    b, _ = load_tensors(compiled / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
