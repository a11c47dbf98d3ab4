"""Fast unit tests of the pure helpers: the split, the channel statistics, the lr schedule, the
checkpoint's optimizer state and fingerprint, and the probe's derived scaling rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.analyze.report import merge_identical_modes
from stages.core.checkpoint import fingerprint_difference, flatten_optimizer_state, unflatten_optimizer_state
from stages.core.loop import cosine_lr, epoch_permutation
from stages.io import load_tensors, save_tensors
from stages.prepare_data import randperm, stratified_split
from stages.prepared import ChannelStats, channel_histogram
from stages.probe import ProbePoint, ProbeResult, scaling_rows

# --- prepare-data ------------------------------------------------------------------------------


def test_stratified_split_takes_the_fraction_of_every_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 2 + [3] * 1)
    keep, take = stratified_split(labels, 0.2, seed=0)
    assert sorted(keep.tolist() + take.tolist()) == list(range(len(labels)))  # a partition
    assert keep.tolist() == sorted(keep.tolist()) and take.tolist() == sorted(take.tolist())
    taken = np.bincount(labels[take], minlength=4).tolist()
    assert taken == [10, 6, 1, 0]  # 20% of 50 and 30; a pair keeps one each side; a single stays in keep
    again_keep, again_take = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(take, again_take) and np.array_equal(keep, again_keep)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], take)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**32 - 1, 2**32 + 5])
def test_randperm_draws_torchs_permutations_without_torch(seed):
    """prepare-data shuffles with numpy (no torch import) the way torch.randperm did: one generator per
    split call, several permutations drawn from it in turn, so the prepared splits keep their files."""
    gen, random = torch.Generator().manual_seed(seed), np.random.RandomState(seed & 0xFFFFFFFF)
    for n in (0, 1, 2, 3, 10, 179, 1000, 30_000, 5):
        assert np.array_equal(randperm(n, random), torch.randperm(n, generator=gen).numpy()), n


def test_channel_stats_match_numpy_whatever_the_chunks():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 5, 4), dtype=torch.uint8, generator=gen).numpy()
    images[:, 2] = 77  # a constant channel: its std is floored, never 0 (it divides)
    chunked, whole = ChannelStats(3), ChannelStats(3)
    for start in (28, 0, 21, 49, 7, 14, 42, 35):  # any order and chunking: the same exact counts
        chunked.add(channel_histogram(images[start : start + 7]))
    whole.add(channel_histogram(images))
    assert np.array_equal(chunked.counts, whole.counts) and whole.counts.sum() == images.size
    mean, std = chunked.mean_std()
    assert (mean, std) == whole.mean_std()
    x = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(std[:2], x.std(axis=(0, 2, 3))[:2], atol=1e-6)
    assert std[2] == 1e-3


# --- the training loop's schedule and order ----------------------------------------------------


def test_cosine_schedule_from_peak_to_zero():
    assert cosine_lr(0.1, 0, 100) == 0.1
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 25, 100) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.1, 150, 100) == pytest.approx(0.0, abs=1e-12)  # never negative past the end
    values = [cosine_lr(1.0, s, 40) for s in range(41)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(100, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(100))
    assert torch.equal(a, epoch_permutation(100, seed=3, epoch=2))
    assert not torch.equal(a, epoch_permutation(100, seed=3, epoch=3))
    assert not torch.equal(a, epoch_permutation(100, seed=4, epoch=2))


# --- the checkpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
])
def test_optimizer_state_survives_flattening(make, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = make(model.parameters())
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def step(m, opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    for _ in range(3):
        step(model, optimizer)
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    assert tensors and all(k.startswith("optim.") for k in tensors)
    save_tensors(tmp_path / "opt.safetensors", tensors, {"optimizer": meta})  # as the checkpoint stores it
    tensors, meta = load_tensors(tmp_path / "opt.safetensors")
    meta = meta["optimizer"]

    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = make(twin.parameters())
    twin_optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    step(model, optimizer)
    step(twin, twin_optimizer)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)  # the restored optimizer takes exactly the same next step


def test_fingerprint_difference_names_each_change():
    old = {"train.lr": 0.002, "train.epochs": 15, "model.name": "small-cnn"}
    assert fingerprint_difference(old, dict(old)) is None
    new = dict(old, **{"train.lr": 0.001, "train.seed": 1})
    del new["model.name"]
    assert fingerprint_difference(old, new) == ("model.name 'small-cnn' -> None, train.lr 0.002 -> 0.001, "
                                                "train.seed None -> 1")


# --- the scaling probe's derived rows ------------------------------------------------------------


def probe_result(points: list[ProbePoint]) -> ProbeResult:
    return ProbeResult("cuda", ["gpu"] * 4, 10, per_device_batch=32, global_batch=128, data_on_device=True,
                       points=points)


def test_scaling_rows_speedup_and_efficiency_against_one_device():
    points = [
        ProbePoint("dp", 1, 32, samples_per_second=1000.0),   # weak base: the per-device batch
        ProbePoint("dp", 1, 128, samples_per_second=1200.0),  # strong base: the global batch
        ProbePoint("dp", 2, 64, samples_per_second=1800.0),
        ProbePoint("dp", 4, 128, samples_per_second=3000.0),  # weak and strong coincide at 4 devices
        ProbePoint("dp", 2, 128, samples_per_second=None, note="out of memory"),
    ]
    rows = {(r["scaling"], r["devices"]): r for r in scaling_rows(probe_result(points))}
    assert rows[("weak", 2)]["speedup"] == pytest.approx(1.8) and rows[("weak", 2)]["efficiency"] == pytest.approx(0.9)
    assert rows[("weak", 4)]["speedup"] == pytest.approx(3.0) and rows[("weak", 4)]["efficiency"] == pytest.approx(0.75)
    assert rows[("strong", 4)]["speedup"] == pytest.approx(2.5)
    assert rows[("strong", 2)]["speedup"] is None and rows[("strong", 2)]["note"] == "out of memory"
    assert rows[("weak", 2)]["per_device_batch"] == 32 and rows[("strong", 2)]["per_device_batch"] == 64


def test_identical_weak_and_strong_rows_merge():
    points = [ProbePoint("dp", 1, 64, samples_per_second=500.0)]
    result = ProbeResult("cpu", ["cpu"], 10, per_device_batch=64, global_batch=64, data_on_device=False, points=points)
    rows = scaling_rows(result)
    assert [r["scaling"] for r in rows] == ["weak", "strong"]
    assert [r["scaling"] for r in merge_identical_modes(rows)] == ["weak = strong"]
