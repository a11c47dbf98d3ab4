"""The training recipe: each knob does what it says, in the core loop and through the train stage.

Core tests train the mlp on the prepared digits in this process (milliseconds an epoch); stage
tests run `stages train` in this process too. That each knob's absence changes nothing is kept
by the default run's weights digest (tests/test_pipeline_e2e.py) and the resnet/mlp runs there.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import stages
from stages.core.batches import Split, place_split
from stages.core.devices import plan_devices
from stages.core.distributed import DistContext
from stages.core.loop import (
    build_loop_state,
    cosine_lr,
    ema_decay,
    evaluate,
    make_mix,
    prepare_model,
    scheduled_lr,
    train_one_epoch,
    unwrap,
)
from stages.core.models import build_model, classifier_head, set_backbone_trainable
from stages.core.transforms import stats_tensors
from stages.io import load_tensors
from stages.params import TrainParams
from stages.prepared import load_prepared

from .helpers import train_in_process, write_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(prepared_digits):
    return load_prepared(prepared_digits, "train")


def core_run(digits, epochs: int = 1, model=None, n: int | None = None, progress=None, **train):
    """Train the mlp (or `model`) with the core loop for `epochs` on the first `n` training digits."""
    images, labels, info = digits
    images, labels = images[:n], labels[:n]
    cfg = TrainParams(accelerator="cpu", **train)
    torch.manual_seed(cfg.seed)
    model = model if model is not None else build_model("mlp", 1, 8, 10)
    wrapped = prepare_model(model, cfg, plan_devices("cpu", 1, "dp"), DistContext(), CPU)
    st = build_loop_state(wrapped, cfg, DistContext(), CPU, info, len(labels))
    split = place_split(images, labels, CPU)
    stats = [train_one_epoch(wrapped, split, epoch, st, progress) for epoch in range(1, epochs + 1)]
    return unwrap(wrapped), st, stats


SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0)


def test_label_smoothing_raises_the_loss_floor(digits):
    """With smoothing e over K classes the target is q = (1 - e + e/K on the label, e/K elsewhere), so the
    training loss can never fall below q's entropy; without it the loss goes far below that."""
    e, k = 0.2, 10
    q = [1 - e + e / k] + [e / k] * (k - 1)
    floor = -sum(p * math.log(p) for p in q)
    *_, plain = core_run(digits, epochs=3, lr=0.01)
    *_, smooth = core_run(digits, epochs=3, lr=0.01, label_smoothing=e)
    assert plain[-1].loss < 0.3 * floor
    assert floor <= smooth[-1].loss < floor + 0.3  # at the floor, never under it
    assert smooth[-1].accuracy > 0.95  # it still learns the labels


def test_ema_is_the_moving_average_of_the_weights_after_each_step(digits):
    decay, seen = 0.7, []

    def record(step, steps, loss):
        seen.append([p.detach().clone() for p in model_ref[0].parameters()])

    model_ref = [build_model("mlp", 1, 8, 10)]
    model, st, _ = core_run(digits, model=model_ref[0], progress=record, ema=decay)
    assert len(seen) == len(digits[1]) // 64
    expected = seen[0]  # the first update copies the weights
    for n, weights in enumerate(seen[1:], start=1):
        d = min(decay, (1 + n) / (10 + n))  # warmed up: 2/11, 3/12, ... until it reaches the decay
        expected = [d * a + (1 - d) * w for a, w in zip(expected, weights)]
    averaged = list(st.ema.module.parameters())
    for a, b in zip(averaged, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged[0], next(model.parameters()))  # the average is not the last weights


def test_ema_decay_warms_up_to_the_set_decay():
    assert ema_decay(0.999, 0) == 0.1 and ema_decay(0.999, 1) == 2 / 11
    assert ema_decay(0.999, 315) == 316 / 325  # the end of the default run: about the last 35 steps
    assert ema_decay(0.7, 100) == 0.7


@pytest.mark.slow
def test_ema_on_the_default_run_is_not_worse_than_without(tmp_path, prepared_digits):
    """The default run (small-cnn, 15 epochs, 315 steps) with train.ema = 0.999, the value its help
    suggests, keeps the accuracy of the run without it (a fixed 0.999 kept 73% of the first weights)."""
    accuracy = {}
    for name, ema in (("plain", 0.0), ("ema", 0.999)):
        out, result = train_in_process(tmp_path, name, prepared_digits, ema=ema)
        assert result.exit_code == 0, result.output
        model = stages.load_model(out / "model.safetensors")
        images, labels, _ = load_prepared(prepared_digits, "test")
        mean, std = stats_tensors(model.stages_metadata["mean"], model.stages_metadata["std"], CPU)
        accuracy[name] = evaluate(model, place_split(images, labels, CPU), mean, std, 512, CPU).accuracy
        run = json.loads((out / "metrics" / "run.json").read_text())
        accuracy[name + " val"] = run["best_val_accuracy"]
    assert accuracy["ema"] >= accuracy["plain"] - 0.01, accuracy
    assert accuracy["ema val"] >= accuracy["plain val"] - 0.01, accuracy


def test_accumulated_passes_match_one_step_of_the_whole_batch(digits):
    """accumulate = 4 at batch_size 64 (4 passes of 16) takes the same optimizer steps as 1 pass of 64,
    for a model without BatchNorm: the same weights up to float rounding."""
    one, _, one_stats = core_run(digits, epochs=2, lr=0.05, batch_size=64, **SGD)
    four, st, four_stats = core_run(digits, epochs=2, lr=0.05, batch_size=64, accumulate=4, **SGD)
    assert st.step == 2 * (len(digits[1]) // 64)
    for a, b in zip(one.state_dict().values(), four.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert four_stats[-1].loss == pytest.approx(one_stats[-1].loss, rel=1e-5)
    sixteen, *_ = core_run(digits, epochs=2, lr=0.05, batch_size=16, **SGD)  # 4x the steps: another run
    assert not torch.allclose(next(sixteen.parameters()), next(one.parameters()), atol=1e-4)


def test_clip_grad_norm_bounds_each_step(digits):
    torch.manual_seed(0)
    start = build_model("mlp", 1, 8, 10)
    before = torch.cat([p.detach().flatten() for p in start.parameters()]).clone()

    def step_size(**train):
        torch.manual_seed(0)
        model, *_ = core_run(digits, model=build_model("mlp", 1, 8, 10), n=64, lr=1.0, **SGD, **train)
        return (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()

    assert step_size() > 0.5  # plain SGD at lr 1 moves far ...
    assert step_size(clip_grad_norm=0.05) == pytest.approx(0.05, rel=1e-4)  # ... clipped: lr x 0.05


def test_warmup_ramps_linearly_then_decays_on_the_cosine():
    assert [scheduled_lr(0.1, s, 100, 10) for s in (0, 4, 9)] == pytest.approx([0.01, 0.05, 0.1])
    assert scheduled_lr(0.1, 10, 100, 10) == pytest.approx(0.1)
    assert scheduled_lr(0.1, 55, 100, 10) == pytest.approx(cosine_lr(0.1, 45, 90))
    assert scheduled_lr(0.1, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert all(scheduled_lr(0.1, s, 100, 0) == cosine_lr(0.1, s, 100) for s in range(101))  # off: unchanged


def test_frozen_backbone_trains_the_head_only_then_at_backbone_lr(digits):
    model = build_model("small-cnn", 1, 8, 10)
    head = classifier_head(model)
    assert tuple(model.get_submodule(head).weight.shape) == (10, 256)  # the last Linear
    set_backbone_trainable(model, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, st, _ = core_run(digits, model=model, n=256, backbone_lr=0.25)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    params = {n for n, _ in model.named_parameters()}
    assert changed & params == {f"{head}.weight", f"{head}.bias"}  # BatchNorm statistics still follow the data
    backbone, head_group = st.optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.25 * head_group["lr"]) and head_group["lr"] > 0
    set_backbone_trainable(model, True)
    train_one_epoch(model, place_split(*digits[:2], CPU), 2, st)
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])


def test_mixup_and_cutmix_mix_pairs_of_the_batch_on_its_device(digits):
    images, labels, _ = digits
    x = images[:32].float() / 255
    y = labels[:32]
    for train in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}):
        torch.manual_seed(0)
        mixed, target = make_mix(TrainParams(**train), 10)(x.clone(), y)
        assert mixed.shape == x.shape and target.shape == (32, 10) and not torch.equal(mixed, x)
        torch.testing.assert_close(target.sum(1), torch.ones(32))
        # each row mixes its own label with its neighbour's (torchvision pairs image i with image i - 1)
        assert (target.gather(1, y[:, None]).squeeze(1) > 0).all()
        assert (target.gather(1, y.roll(1)[:, None]).squeeze(1) > 0).all()
    assert make_mix(TrainParams(), 10) is None


def test_top5_accuracy_counts_the_label_among_the_five_highest_scores():
    # Each image's 7 pixels are its 7 logits (flatten, mean 0, std 1/255): the label ranks 1st, 3rd, 6th, 7th.
    scores = torch.tensor([[70, 60, 50, 40, 30, 20, 10]] * 4, dtype=torch.uint8).view(4, 1, 1, 7)
    labels = torch.tensor([0, 2, 5, 6])
    mean, std = torch.zeros(1, 1, 1), torch.full((1, 1, 1), 1 / 255)
    result = evaluate(torch.nn.Flatten(), Split(scores, labels), mean, std, batch_size=3, device=CPU)
    assert (result.accuracy, result.top5_accuracy) == (0.25, 0.5)
    five = evaluate(torch.nn.Flatten(), Split(scores[..., :5], labels.clamp(max=4)), mean, std, 3, CPU)
    assert five.top5_accuracy is None  # 5 classes or fewer: every label is in the top 5


# --- through the train stage -----------------------------------------------------------------


def val_evaluation(model_file, prepared):
    """The validation loss and accuracy of a saved model file, with its own normalisation."""
    import stages

    model = stages.load_model(model_file)
    meta = model.stages_metadata
    mean, std = torch.tensor(meta["mean"]).view(-1, 1, 1), torch.tensor(meta["std"]).view(-1, 1, 1)
    images, labels, _ = load_prepared(prepared, "val")
    return evaluate(model, Split(images, labels), mean, std, 512, CPU)


def test_saved_weights_are_the_moving_average(tmp_path, prepared_digits):
    """The average does not steer training (the same run without it has the same train loss), yet the
    saved weights are not the trained ones, and what was validated is what was saved."""
    out, result = train_in_process(tmp_path, "ema", prepared_digits, model={"name": "mlp"}, epochs=2, ema=0.9)
    assert result.exit_code == 0, result.output
    plain, result = train_in_process(tmp_path, "plain", prepared_digits, model={"name": "mlp"}, epochs=2)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    plain_metrics = json.loads((plain / "metrics" / "metrics.json").read_text())
    assert metrics["train"] == plain_metrics["train"]
    saved, _ = load_tensors(out / "model.safetensors")
    trained, _ = load_tensors(plain / "model.safetensors")
    assert saved.keys() == trained.keys() and any(not torch.equal(saved[k], trained[k]) for k in saved)
    val = val_evaluation(out / "model.safetensors", prepared_digits)
    assert (round(val.loss, 6), round(val.accuracy, 6)) == (metrics["val"]["loss"], metrics["val"]["accuracy"])
    assert round(val_evaluation(plain / "model.safetensors", prepared_digits).loss, 6) != metrics["val"]["loss"]


def digits_train(prepared):
    return load_prepared(prepared, "train")[1]


def test_patience_stops_early_and_keep_best_saves_the_best_epoch(tmp_path, prepared_digits):
    out, result = train_in_process(tmp_path, "best", prepared_digits, model={"name": "mlp"}, epochs=60, lr=0.01,
                                   keep="best", patience=2)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "metrics" / "run.json").read_text())
    stopped, best = run["epochs_run"], run["best_epoch"]
    assert run["stopped_early"] and stopped < 60 and best == stopped - 2
    assert f"early stop after epoch {stopped}:" in result.output
    assert f"of epoch {best} was not bettered in 2 epochs (train.patience)" in result.output
    assert f"epoch {stopped + 1}/" not in result.output
    tsv = (out / "metrics" / "plots" / "metrics" / "val" / "accuracy.tsv").read_text().splitlines()
    accuracies = [float(line.split("\t")[1]) for line in tsv[1:]]
    assert len(accuracies) == stopped and accuracies[best - 1] == max(accuracies)
    assert all(a < accuracies[best - 1] for a in accuracies[: best - 1])  # the first of equals
    assert round(val_evaluation(out / "model.safetensors", prepared_digits).accuracy, 6) == accuracies[best - 1]
    # metrics.json (what `dvc exp show` lists beside the test metrics) describes the saved weights: the best epoch
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())
    losses = [float(line.split("\t")[1]) for line in
              (out / "metrics" / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()[1:]]
    assert metrics["val"] == {"accuracy": accuracies[best - 1], "loss": losses[best - 1]}
    assert losses[best - 1] != losses[-1]
    # and its step (DVCLive's, `dvc exp show`'s column) is the best epoch's row in the curves, not the last's
    steps = [int(line.split("\t")[0]) for line in tsv[1:]]
    assert tsv[0].split("\t")[0] == "step" and steps == list(range(stopped))
    assert metrics["step"] == steps[best - 1] != steps[-1]
    # the same run keeping the last epoch saves other weights: the best epoch's were kept, not the last's
    last, result = train_in_process(tmp_path, "last", prepared_digits, model={"name": "mlp"}, epochs=60, lr=0.01,
                                    keep="last", patience=2)
    assert result.exit_code == 0, result.output
    last_run = json.loads((last / "metrics" / "run.json").read_text())
    assert json.loads((last / "metrics" / "metrics.json").read_text())["step"] == last_run["epochs_run"] - 1
    saved, _ = load_tensors(out / "model.safetensors")
    last_saved, _ = load_tensors(last / "model.safetensors")
    assert any(not torch.equal(v, last_saved[k]) for k, v in saved.items())
    assert run["kept"] == f"best (epoch {best})"
    tsv = (out / "metrics" / "plots" / "metrics" / "val" / "accuracy.tsv").read_text().splitlines()
    assert len(tsv) == stopped + 1  # the curves end where training stopped
    assert not (out / "checkpoint.safetensors").exists(), "a completed run deletes its checkpoint"


def test_a_run_killed_after_it_stopped_early_only_writes_its_outputs(tmp_path, prepared_digits):
    """Writing the outputs fails (the model's folder is a file): the checkpoint of the stopped run stays,
    and the next run resumes it with no epoch to train, and writes the same weights as a run never stopped."""
    from typer.testing import CliRunner

    from stages.cli import app

    recipe = dict(epochs=60, lr=0.01, keep="best", patience=2)
    reference, result = train_in_process(tmp_path, "reference", prepared_digits, model={"name": "mlp"}, **recipe)
    assert result.exit_code == 0, result.output
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the model's folder should be")
    params = write_params(tmp_path / "run.yaml", model={"name": "mlp"}, train={"accelerator": "cpu", **recipe})
    args = ["train", "--params", str(params), "--data", str(prepared_digits), "--metrics", str(tmp_path / "metrics"),
            "--checkpoint", str(tmp_path / "ck.safetensors")]
    failed = CliRunner().invoke(app, [*args, "--model", str(blocked / "model.safetensors")])
    assert failed.exit_code != 0 and (tmp_path / "ck.safetensors").is_file()
    resumed = CliRunner().invoke(app, [*args, "--model", str(tmp_path / "model.safetensors")])
    assert resumed.exit_code == 0, resumed.output
    stopped = json.loads((reference / "metrics" / "run.json").read_text())["epochs_run"]
    assert f"after epoch {stopped} of 60" in resumed.output and f"epoch {stopped + 1}/" not in resumed.output
    assert (tmp_path / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    kept = [json.loads((folder / "metrics.json").read_text())["step"]
            for folder in (reference / "metrics", tmp_path / "metrics")]
    assert kept[0] == kept[1] < stopped - 1  # the best epoch's step, after a resume too
    assert not (tmp_path / "ck.safetensors").exists()
