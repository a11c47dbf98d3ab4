"""`train.devices: free`: GPUs claimed with fcntl locks that the kernel releases when the holder
dies. Real processes and real locks, on a patched list of fake GPUs (no CUDA needed)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
import torch

from stages.core.devices import plan_devices, with_claimed
from stages.core.gpu_claims import LOCK_DIR_ENV
from stages.errors import UserError
from stages.params import validate

from .helpers import ROOT, write_params

CHILD = str(ROOT / "tests" / "gpu_claim_child.py")


class Claimer:
    """One `gpu_claim_child.py` process: claims `count` of `gpus` fake GPUs, holds them until `done()`."""

    def __init__(self, lock_dir, gpus: int = 2, count: int = 1):
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **{LOCK_DIR_ENV: str(lock_dir)})
        self.proc = subprocess.Popen([sys.executable, CHILD, str(gpus), str(count)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []

    def read_until(self, prefix: str, timeout: float = 60) -> str | None:
        """The first output line starting with `prefix` within `timeout` seconds, else None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if line.startswith(prefix)), None)
            if found:
                return found
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return None  # it ended
                self.lines.append(line.rstrip("\n"))
        return None

    def claimed(self, timeout: float = 60) -> list[int] | None:
        line = self.read_until("claimed", timeout)
        return None if line is None else json.loads(line.removeprefix("claimed "))

    def done(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.mark.slow
def test_three_runs_on_two_gpus_take_turns_and_a_killed_holder_frees_its_gpu(tmp_path):
    a, b = Claimer(tmp_path), Claimer(tmp_path)
    try:
        got_a, got_b = a.claimed(), b.claimed()
        assert sorted(got_a + got_b) == [0, 1]  # two runs, two distinct GPUs
        holders = {int(p.read_text()) for p in tmp_path.glob("GPU-*.lock")}
        assert holders == {a.proc.pid, b.proc.pid}  # each lock file names its holder

        c = Claimer(tmp_path)
        waiting = c.read_until("waiting for 1 free GPU")
        assert waiting is not None and "0 of 2 free" in waiting and f"by pid {a.proc.pid}" in waiting
        assert c.claimed(timeout=2) is None  # it waits while both are held
        a.done()  # the first run ends: its GPU goes to the one that waited
        assert c.claimed() == got_a

        os.kill(b.proc.pid, signal.SIGKILL)  # killed, as by the OOM killer: the kernel drops its lock
        b.proc.wait(timeout=30)
        started = time.monotonic()
        d = Claimer(tmp_path)
        assert d.claimed() == got_b and not any(line.startswith("waiting") for line in d.lines)
        assert time.monotonic() - started < 30
        c.done()
        d.done()
    finally:
        for run in (a, b, locals().get("c"), locals().get("d")):
            if run is not None and run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def test_a_run_wanting_two_gpus_holds_none_while_it_waits(tmp_path):
    """All or nothing: a run that kept the one free GPU while waiting for a second could starve others."""
    holder = Claimer(tmp_path)
    runs = [holder]
    try:
        assert holder.claimed() is not None
        pair = Claimer(tmp_path, count=2)
        runs.append(pair)
        assert pair.read_until("waiting for 2 free GPUs") is not None
        single = Claimer(tmp_path)
        runs.append(single)
        assert single.claimed(timeout=30) is not None  # the second GPU was not kept by the waiting pair
        holder.done()
        single.done()
        assert sorted(pair.claimed()) == [0, 1]
        pair.done()
    finally:
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


@pytest.mark.parametrize("value, count", [("free", 1), ("free:1", 1), ("free:3", 3)])
def test_free_devices_are_allowed(value, count, monkeypatch):
    assert validate({"train": {"devices": value}}).train.devices == value
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    dp = plan_devices("auto", value, "dp")
    assert (dp.accelerator, dp.claim, dp.device_ids, dp.world_size) == ("cuda", count, [], 1)
    ddp = plan_devices("cuda", value, "ddp")
    assert (ddp.claim, ddp.world_size) == (count, count)
    claimed = with_claimed(ddp, list(range(count)))
    assert (claimed.claim, claimed.device_ids, claimed.world_size) == (0, list(range(count)), count)


@pytest.mark.parametrize("value", ["free:0", "free:", "free:x", "free:02", "frei", "free:-1"])
def test_bad_free_devices_are_refused_with_what_is_allowed(value):
    with pytest.raises(UserError) as err:
        validate({"train": {"devices": value}})
    assert f"train.devices = {value!r} is not allowed" in str(err.value)
    assert "'free' / 'free:N' (N >= 1 GPUs that no other run on this machine holds)" in str(err.value)


def test_free_on_a_machine_without_gpus_trains_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_devices("auto", "free", "dp").claim == 0
    assert plan_devices("cpu", "free:2", "ddp").world_size == 2  # the process count, as a count would be
    with pytest.raises(UserError, match=r"train.devices = \[0, 1\] lists CUDA device ids, but no CUDA device"):
        plan_devices("auto", [0, 1], "dp")


def test_asking_for_more_gpus_than_visible_is_refused(monkeypatch, tmp_path):
    from stages.core.gpu_claims import claim_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"asks for 2 free GPU\(s\) but only 0 CUDA device\(s\) are visible"):
        claim_gpus(2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_stage_waits_for_a_free_gpu_then_trains_on_it(tmp_path, prepared_digits):
    """On a real GPU: while another process holds GPU 0, `train.devices: free` waits; once it is
    released, the stage trains on it and run.json records the claim."""
    locks = tmp_path / "locks"
    holder = Claimer(locks, gpus=0)  # the real GPUs
    try:
        assert holder.claimed() == [0]
        params = write_params(tmp_path / "p.yaml", train={"devices": "free", "epochs": 2})
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="0",
                   **{LOCK_DIR_ENV: str(locks)})
        train = subprocess.Popen([sys.executable, "-m", "stages", "train", "--params", str(params), "--data",
                                  str(prepared_digits), "--model", str(tmp_path / "m.safetensors"), "--metrics",
                                  str(tmp_path / "metrics"), "--checkpoint", str(tmp_path / "c.safetensors")],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = train.stdout.readline()
        assert first.startswith("waiting for 1 free GPU: 0 of 1 free"), first
        holder.done()
        rest = train.communicate(timeout=600)[0]
        assert train.returncode == 0, rest
        assert "claimed GPU 0 (GPU-" in rest and "accelerator cuda" in rest
        run = json.loads((tmp_path / "metrics" / "run.json").read_text())
        [gpu] = run["gpu_claim"]["gpus"]
        assert gpu["id"] == 0 and (locks / f"{gpu['uuid']}.lock").is_file() and run["device_ids"] == [0]
        assert run["gpu_claim"]["waited_seconds"] > 0
    finally:
        if holder.proc.poll() is None:
            holder.proc.kill()
            holder.proc.wait()
