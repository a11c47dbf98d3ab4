"""`stages compare` and its statistics: checked against statsmodels and published worked examples, and
run on prediction files recorded by the real `dvc` in a temporary git repo (a stage that copies them,
so that no training is needed to test reading, pairing and the refusals)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.compare.pairs import against_baseline, pair, seed_groups
from stages.compare.runs import Run
from stages.stats import holm, mcnemar_exact, per_class_scores, spread, wilson_interval

from .helpers import ROOT, train_in_process

# --- the statistics ----------------------------------------------------------------------------


# Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score, no continuity correction).
NEWCOMBE = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
            (29, 29, 0.8830, 1.0)]


@pytest.mark.parametrize(("k", "n", "low", "high"), NEWCOMBE)
def test_wilson_interval_matches_newcombes_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert round(got[0], 4) == low and round(got[1], 4) == high


@pytest.mark.parametrize(("k", "n"), [(358, 359), (350, 359), (9932, 10000), (0, 1), (5, 7)])
def test_wilson_interval_matches_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_per_class_scores_match_scikit_learn(seed):
    """Random labels over 8 classes: one never true, one never predicted, one neither; their undefined
    scores are NaN (scikit-learn's zero_division=np.nan), not 0."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    actual = rng.choice([0, 1, 2, 3, 4, 6], size=300)
    predicted = np.where(rng.random(300) < 0.6, actual, rng.choice([0, 1, 2, 4, 5, 6], size=300))
    predicted[predicted == 3] = 2  # class 3 is never predicted; class 5 never true; class 7 neither
    got = per_class_scores(actual, predicted, 8)
    want = precision_recall_fscore_support(actual, predicted, labels=list(range(8)), zero_division=np.nan)
    for name, expected in zip(("precision", "recall", "f1", "support"), want):
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-12, err_msg=name)
    assert np.isnan(got["precision"][3]) and got["recall"][3] == 0 and got["f1"][3] == 0  # 3 missed every time
    assert np.isnan(got["recall"][5]) and got["precision"][5] == 0 and got["support"][5] == 0
    assert np.isnan([got["precision"][7], got["recall"][7], got["f1"][7]]).all()


@pytest.mark.parametrize(("b", "c"), [(0, 3), (3, 0), (7, 2), (41, 18), (100, 130), (5, 5), (1, 0)])
def test_mcnemar_exact_matches_statsmodels_and_the_binomial_sum(b, c):
    from statsmodels.stats.contingency_tables import mcnemar

    expected = mcnemar([[50, b], [c, 50]], exact=True).pvalue
    # By hand: twice the smaller tail of Binomial(b + c, 1/2), capped at 1.
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, 2 * tail), rel=1e-12)


def test_mcnemar_with_no_discordant_images_is_one():
    assert mcnemar_exact(0, 0) == 1.0


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.2], [0.5], [0.001, 0.001, 0.9, 0.02, 0.04], [0.3, 0.2, 0.1]])
def test_holm_matches_statsmodels(p):
    from statsmodels.stats.multitest import multipletests

    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]), abs=1e-12)


def test_spread_of_one_and_of_several_values():
    assert spread([0.5]) == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5}
    s = spread([0.97, 0.98, 0.99])
    assert s["mean"] == pytest.approx(0.98) and s["std"] == pytest.approx(0.01) and (s["min"], s["max"]) == (0.97, 0.99)


def test_evaluate_writes_the_interval_and_a_digest_of_each_test_image(tmp_path, prepared_digits):
    import hashlib

    from statsmodels.stats.proportion import proportion_confint
    from typer.testing import CliRunner

    from stages.cli import app
    from stages.prepared import load_prepared

    out, result = train_in_process(tmp_path, "run", prepared_digits, epochs=1)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["evaluate", "--params", str(tmp_path / "run.yaml"), "--data",
                                      str(prepared_digits), "--model", str(out / "model.safetensors"),
                                      "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "eval/metrics.json").read_text())["test"]
    rows = list(csv.DictReader((tmp_path / "eval/predictions.csv").open()))
    correct = sum(r["actual"] == r["predicted"] for r in rows)
    low, high = proportion_confint(correct, len(rows), method="wilson")
    assert (test["accuracy_ci_low"], test["accuracy_ci_high"]) == (round(low, 6), round(high, 6))
    assert test["accuracy_ci_low"] < test["accuracy"] < test["accuracy_ci_high"]
    assert test["top5_accuracy_ci_low"] <= test["top5_accuracy"] <= test["top5_accuracy_ci_high"]
    images, _, _ = load_prepared(prepared_digits, "test")
    pixels = images.numpy()
    assert [r["image"] for r in rows] == [
        hashlib.sha256(repr(pixels[i].shape).encode() + pixels[i].tobytes()).hexdigest()[:16] for i in range(len(rows))]


# --- pairs and groups of runs --------------------------------------------------------------------


def make_run(name: str, correct: list[bool], seed: int = 0, lr: float = 0.002, images: list[str] | None = None) -> Run:
    actual = [str(i % 10) for i in range(len(correct))]
    predicted = [a if ok else str((int(a) + 1) % 10) for a, ok in zip(actual, correct)]
    return Run(name, None, actual, predicted, images or [f"img{i}" for i in range(len(correct))],
               {"train.lr": lr, "train.seed": seed, "data.dataset": "digits"})


def test_identical_runs_differ_by_zero_with_p_one():
    a = make_run("a", [True] * 90 + [False] * 10)
    p = pair(a, make_run("b", [True] * 90 + [False] * 10))
    assert (p["difference"], p["a_only_correct"], p["b_only_correct"], p["p_value"]) == (0, 0, 0, 1.0)
    assert p["accuracy_a"] == p["accuracy_b"] == 0.9


def test_pair_counts_discordant_images():
    a = [True] * 50 + [False] * 10 + [True] * 3 + [False] * 2
    b = [True] * 50 + [True] * 10 + [False] * 3 + [False] * 2
    p = pair(make_run("a", a), make_run("b", b))
    assert (p["a_only_correct"], p["b_only_correct"], p["correct_a"], p["correct_b"]) == (3, 10, 53, 60)
    assert p["p_value"] == pytest.approx(mcnemar_exact(3, 10))
    assert p["difference"] == pytest.approx((60 - 53) / 65)


def test_runs_on_different_images_are_refused():
    from stages.errors import UserError

    a = make_run("a", [True] * 5)
    with pytest.raises(UserError, match="different test images"):
        pair(a, make_run("b", [True] * 5, images=["x"] * 5))
    with pytest.raises(UserError, match="different test images"):
        pair(a, make_run("b", [True] * 6))


def renamed(run: Run, old: str, new: str, name: str) -> Run:
    """`run` as prepare-data makes it after the class folder `old` is renamed `new`: the same files, relabelled."""
    relabel = {old: new}
    return Run(name, None, [relabel.get(a, a) for a in run.actual], [relabel.get(p, p) for p in run.predicted],
               run.images, run.params)


def test_the_same_images_with_other_labels_are_not_called_different_images():
    """A class folder renamed: the same files, each of that class relabelled (in place when the class keeps its
    place in the sorted list; moved when it does not, as an image folder's test/ split lists images by class)."""
    from stages.errors import UserError

    a = make_run("a", [True] * 18 + [False] * 2)
    b = renamed(a, "3", "cat", "b")
    with pytest.raises(UserError) as refused:
        pair(a, b)
    assert str(refused.value) == ("'a' and 'b' were evaluated on the same 20 test images, but with other labels on 2 "
                                  "of them (classes renamed or added: only in a: '3'; only in b: 'cat'); compare only "
                                  "runs on the same test split, with the same classes")
    order = [*(i for i in range(20) if i % 10 != 3), 3, 13]  # class '3' now sorts last
    b_moved = Run("b", None, [b.actual[i] for i in order], [b.predicted[i] for i in order],
                  [b.images[i] for i in order], b.params)
    with pytest.raises(UserError, match="the same 20 test images, but with other labels on 2 of them") as refused:
        pair(a, b_moved)
    assert "different test images" not in str(refused.value)
    shuffled = Run("c", None, [a.actual[i] for i in order], [a.predicted[i] for i in order],
                   [a.images[i] for i in order], a.params)
    with pytest.raises(UserError, match="evaluated on the same 20 test images, in another order"):
        pair(a, shuffled)

    result = against_baseline(a, [make_run("seed1", [True] * 20, seed=1), b])
    assert result["left_out"] == [{"name": "b", "rev": None, "reason": (
        "evaluated on the same 20 test images as a, but with other labels on 2 of them (classes renamed or added: "
        "only in a: '3'; only in b: 'cat')")}]
    assert [p["b"] for p in result["pairs"]] == ["seed1"]
    with pytest.raises(UserError, match="every other run was left out .b: evaluated on the same 20 test images as a"):
        against_baseline(a, [b])


def test_seeds_are_grouped_by_the_other_params():
    runs = [make_run("s0", [True] * 9 + [False], seed=0), make_run("s1", [True] * 8 + [False] * 2, seed=1),
            make_run("other", [True] * 10, seed=0, lr=0.01), make_run("s2", [True] * 7 + [False] * 3, seed=2)]
    groups = {g["params"]["train.lr"]: g for g in seed_groups(runs)}
    assert groups[0.002]["runs"] == ["s0", "s1", "s2"] and groups[0.002]["seeds"] == [0, 1, 2]
    assert groups[0.002]["mean"] == pytest.approx(0.8) and groups[0.002]["std"] == pytest.approx(0.1)
    assert groups[0.01]["n"] == 1 and groups[0.01]["std"] is None
    assert list(groups[0.002]["params"]) == ["train.lr"]  # only what differs between groups labels them


def test_a_run_with_the_same_params_and_seed_as_another_is_one_draw_not_two():
    """An experiment that reran HEAD's params and seed: one run for the seed statistics, named as merged."""
    from stages.compare.show import baseline_lines

    base = make_run("HEAD~1", [True] * 95 + [False] * 5, lr=0.002)
    head = make_run("HEAD", [True] * 90 + [False] * 10, lr=0.003)
    again = make_run("exp-again", [True] * 90 + [False] * 10, lr=0.003)
    seed1 = make_run("exp-seed1", [True] * 80 + [False] * 20, lr=0.003, seed=1)
    (group,) = [g for g in seed_groups([base, head, again, seed1]) if g["params"]["train.lr"] == 0.003]
    assert (group["n"], group["seeds"], group["runs"]) == (2, [0, 1], ["HEAD", "exp-seed1"])
    assert group["mean"] == pytest.approx(0.85) and group["same_seed"] == {"HEAD": ["exp-again"]}
    lines = baseline_lines(against_baseline(base, [head, again, seed1]))
    assert "| train.lr=0.003 | 2 | 0, 1 | 85.00% | 7.07 | 80.00% | 90.00% |" in lines
    assert "exp-again counted once with HEAD: the same params and seed" in lines
    (alone,) = [g for g in seed_groups([base, head, again]) if g["params"]["train.lr"] == 0.003]
    assert (alone["n"], alone["seeds"], alone["std"]) == (1, [0], None)


def test_against_baseline_sorts_by_accuracy_and_adjusts_for_many_comparisons():
    base = make_run("base", [True] * 80 + [False] * 20)
    others = [make_run("worse", [True] * 70 + [False] * 30), make_run("better", [True] * 95 + [False] * 5, seed=1)]
    result = against_baseline(base, others)
    assert [r["name"] for r in result["runs"]] == ["better", "base", "worse"]
    raw = [p["p_value"] for p in result["pairs"]]
    assert [p["p_value_holm"] for p in result["pairs"]] == pytest.approx(holm(raw))
    assert result["comparisons"] == 2


# --- the command, on files recorded by the real dvc --------------------------------------------------


def sh(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def compare(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, sys.executable, "-m", "stages", "compare", *args, check=check)


def refusal(repo: Path, *args: str) -> str:
    proc = compare(repo, *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def predictions_csv(correct: list[bool], images: list[str] | None = None, header=("index", "actual", "predicted",
                                                                                   "image")) -> str:
    rows = [",".join(header)]
    for i, ok in enumerate(correct):
        actual = str(i % 10)
        row = [str(i), actual, actual if ok else str((i + 1) % 10), (images or [f"{i:016x}"] * len(correct))[i]]
        rows.append(",".join(row[: len(header)]))
    return "\n".join(rows) + "\n"


@pytest.fixture
def toy(tmp_path):
    """A git + DVC repo whose one stage records made/predictions.csv as the evaluate stage's output."""
    repo = tmp_path / "toy"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "t@example.com")
    sh(repo, "git", "config", "user.name", "T")
    sh(repo, "dvc", "init", "-q")
    (repo / "made").mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {
        "cmd": "mkdir -p metrics/evaluate && cp made/predictions.csv metrics/evaluate/predictions.csv",
        "deps": ["made/predictions.csv"], "params": ["train"],
        "plots": [{"metrics/evaluate/predictions.csv": {"cache": False}}]}}}))
    (repo / "made/predictions.csv").write_text(predictions_csv([]))
    (repo / "params.yaml").write_text("train:\n  lr: 0.002\n  seed: 0\n")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "no evaluation yet")
    return repo


def record(repo: Path, text: str, message: str, **train) -> None:
    (repo / "made/predictions.csv").write_text(text)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.002, "seed": 0, **train}}))
    sh(repo, "dvc", "repro", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)


def recount(text_a: str, text_b: str) -> tuple[int, int, int, int]:
    rows_a, rows_b = (list(csv.DictReader(io.StringIO(t))) for t in (text_a, text_b))
    ok_a = [r["actual"] == r["predicted"] for r in rows_a]
    ok_b = [r["actual"] == r["predicted"] for r in rows_b]
    return (sum(ok_a), sum(ok_b), sum(x and not y for x, y in zip(ok_a, ok_b)),
            sum(y and not x for x, y in zip(ok_a, ok_b)))


def commit_evaluation(repo: Path, tag: str, predictions: str | None, lock: str | None = None) -> None:
    """Commit (and tag) the files compare reads as evaluate and `dvc repro` leave them: predictions.csv and a
    dvc.lock recording its md5 (`lock` instead, when given); predictions None removes the file."""
    import hashlib

    file = repo / "metrics/evaluate/predictions.csv"
    if predictions is None:
        file.unlink(missing_ok=True)
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(predictions)
    md5 = hashlib.md5(predictions.encode()).hexdigest() if predictions is not None else "0"
    (repo / "dvc.lock").write_text(lock if lock is not None else yaml.safe_dump(
        {"schema": "2.0", "stages": {"evaluate": {"cmd": "evaluate", "outs": [
            {"path": "metrics/evaluate/predictions.csv", "md5": md5}]}}}))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", tag)
    sh(repo, "git", "tag", tag)


def test_runs_that_cannot_be_read_are_left_out_against_a_baseline_and_refused_as_a_pair(tmp_path, monkeypatch):
    """Commits of a git + DVC repo (no stage run): a baseline, a run to compare, and runs whose files cannot be
    read: one from before evaluate wrote predictions, one with a damaged dvc.lock, one edited by hand, one in
    an older format. Against the baseline each is left out with one line; as one of two runs, it is refused."""
    from typer.testing import CliRunner

    from stages.cli import app
    from stages.compare.runs import Repository

    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (("git", "init", "-q"), ("git", "config", "user.email", "t@example.com"),
                ("git", "config", "user.name", "T"), ("dvc", "init", "-q")):
        sh(repo, *cmd)
    (repo / "params.yaml").write_text("train:\n  seed: 0\n")
    good, other = predictions_csv([True] * 30 + [False] * 10), predictions_csv([True] * 35 + [False] * 5)
    commit_evaluation(repo, "before-predictions", None)
    commit_evaluation(repo, "base", good)
    commit_evaluation(repo, "damaged-lock", other, lock="stages: {evaluate: [unclosed\n")
    commit_evaluation(repo, "old-format", predictions_csv([True] * 40, header=("index", "actual", "predicted")))
    commit_evaluation(repo, "other", other)
    (repo / "metrics/evaluate/predictions.csv").write_text(other.replace("\n0,0,0,", "\n0,0,1,", 1))  # by hand
    monkeypatch.chdir(repo)

    names = ["before-predictions", "damaged-lock", "old-format", "other", "workspace"]
    result = CliRunner().invoke(app, ["compare", "--baseline", "base", *names, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert [p["b"] for p in shown["pairs"]] == ["other"] and shown["pairs"][0]["b_only_correct"] == 5
    reasons = {r["name"]: r["reason"] for r in shown["left_out"]}
    assert list(reasons) == ["before-predictions", "damaged-lock", "old-format", "workspace"]
    assert reasons["before-predictions"].startswith("has no metrics/evaluate/predictions.csv: it was not evaluated")
    assert reasons["damaged-lock"].startswith("has a dvc.lock that is not valid YAML (")
    assert reasons["old-format"].startswith("has a metrics/evaluate/predictions.csv written by an older evaluate "
                                            "stage: it has no columns image")
    assert "differs from the file dvc.lock records (edited by hand?)" in reasons["workspace"]
    lines = CliRunner().invoke(app, ["compare", "--baseline", "base", *names]).output.splitlines()
    assert "2 runs on the same 40 test images, against the baseline base; best first" in lines
    assert [line for line in lines if line.startswith("left out ")] == [
        f"left out {name}: {reason}" for name, reason in reasons.items()]
    from stages.compare.command import gather  # the function the command reads the runs with

    runs, left_out = gather(Repository(), names, False, None)
    assert [run.name for run in runs] == ["other"] and left_out == shown["left_out"]

    for name in ("before-predictions", "damaged-lock", "old-format", "workspace"):
        refused = CliRunner().invoke(app, ["compare", "base", name])
        assert refused.exit_code == 2 and refused.output.count("\n") == 1, refused.output
        assert refused.output.startswith("error: ") and reasons[name].split(" (")[0] in refused.output
    refused = CliRunner().invoke(app, ["compare", "--baseline", "base", "damaged-lock"])
    assert refused.exit_code == 2 and refused.output.startswith(
        "error: nothing to compare with 'base': every other run was left out (damaged-lock: has a dvc.lock"), (
        refused.output)
    refused = CliRunner().invoke(app, ["compare", "--baseline", "old-format", "other"])  # the baseline must be read
    assert refused.exit_code == 2 and "'old-format' (" in refused.output and "older evaluate stage" in refused.output


def commit_run(repo: Path, tag: str, predictions: str, lr: float, seed: int = 0, train_lr: float | None = None,
               weights: str = "w1") -> None:
    """Commit (and tag) a run as `dvc repro` leaves it: params.yaml, predictions.csv, and a dvc.lock whose train
    stage records the params it trained the weights `weights` with (train_lr, when not lr) and whose evaluate
    stage records the weights it read, its params and the predictions' md5."""
    import hashlib

    params = {"train": {"lr": lr, "seed": seed}, "evaluate": {"batch_size": 256}}
    trained = {"train": {"lr": lr if train_lr is None else train_lr, "seed": seed}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    lock = {"schema": "2.0", "stages": {
        "train": {"cmd": "train", "params": {"params.yaml": trained},
                  "outs": [{"path": "models/model.safetensors", "md5": weights}]},
        "evaluate": {"cmd": "evaluate", "deps": [{"path": "models/model.safetensors", "md5": "w1"}],
                     "params": {"params.yaml": {"evaluate": {"batch_size": 256}}},
                     "outs": [{"path": "metrics/evaluate/predictions.csv",
                               "md5": hashlib.md5(predictions.encode()).hexdigest()}]}}}
    commit_evaluation(repo, tag, predictions, lock=yaml.safe_dump(lock))


def test_a_run_is_shown_only_with_the_params_its_results_were_made_with(tmp_path, monkeypatch):
    """params.yaml edited after `dvc repro` (in the workspace, or committed so) is not what made the results
    dvc.lock records: that run is left out against a baseline, refused as one of two, naming the keys. The
    params of a stage rerun since evaluate read its out (weights made again) say nothing of the results."""
    from typer.testing import CliRunner

    from stages.cli import app

    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (("git", "init", "-q"), ("git", "config", "user.email", "t@example.com"),
                ("git", "config", "user.name", "T"), ("dvc", "init", "-q")):
        sh(repo, *cmd)
    base, other = predictions_csv([True] * 30 + [False] * 10), predictions_csv([True] * 35 + [False] * 5)
    commit_run(repo, "base", base, lr=0.002)
    commit_run(repo, "retrained", other, lr=0.01, train_lr=0.5, weights="w2")  # train reran, evaluate did not
    commit_run(repo, "stale-commit", other, lr=0.01, train_lr=0.003)  # lr edited, then committed with no repro
    commit_run(repo, "other", other, lr=0.003)
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.05, "seed": 0}}))  # by hand, no repro
    monkeypatch.chdir(repo)

    shown = CliRunner().invoke(app, ["compare", "--baseline", "base", "retrained", "stale-commit", "other",
                                     "workspace", "--json"])
    assert shown.exit_code == 0, shown.output
    result = json.loads(shown.output)
    assert [p["b"] for p in result["pairs"]] == ["retrained", "other"]
    reasons = {r["name"]: r["reason"] for r in result["left_out"]}
    assert reasons == {
        "stale-commit": "has a params.yaml that differs from the params its results were made with (train.lr 0.01 "
                        "in params.yaml, 0.003 in dvc.lock); run `dvc repro` to make results with them and commit them",
        "workspace": "has a params.yaml that differs from the params its results were made with (train.lr 0.05 in "
                     "params.yaml, 0.003 in dvc.lock, evaluate.batch_size absent in params.yaml, 256 in dvc.lock); "
                     "run `dvc repro` to make results with them"}
    lines = CliRunner().invoke(app, ["compare", "--baseline", "base", "other", "workspace"]).output.splitlines()
    assert f"left out workspace: {reasons['workspace']}" in lines and not any("0.05" in line for line in lines
                                                                               if line.startswith("|"))
    refused = CliRunner().invoke(app, ["compare", "other", "workspace"])
    assert refused.exit_code == 2 and refused.output == f"error: the workspace {reasons['workspace']}\n"
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.003, "seed": 0}, "evaluate": {
        "batch_size": 256}}))  # back as `dvc repro` left it: compared
    same = CliRunner().invoke(app, ["compare", "other", "workspace", "--json"])
    assert same.exit_code == 0 and json.loads(same.output)["pairs"][0]["p_value"] == 1.0, same.output


def test_a_run_must_be_named_by_a_commit_an_experiment_or_workspace(tmp_path, monkeypatch):
    """Git objects that are no commit (a tree, a file), an empty name, and a queued experiment, which
    `dvc exp show` lists with no results yet: each refused in one line; --all-experiments leaves it out."""
    from typer.testing import CliRunner

    from stages.cli import app

    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (("git", "init", "-q"), ("git", "config", "user.email", "t@example.com"),
                ("git", "config", "user.name", "T"), ("dvc", "init", "-q")):
        sh(repo, *cmd)
    commit_run(repo, "base", predictions_csv([True] * 30 + [False] * 10), lr=0.002)
    commit_run(repo, "other", predictions_csv([True] * 35 + [False] * 5), lr=0.003)
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "waiting", "-S", "train.seed=5")
    monkeypatch.chdir(repo)

    def refused(*args: str) -> str:
        result = CliRunner().invoke(app, ["compare", *args])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error: ") and "Traceback" not in result.output
        return result.output.strip()

    allowed = "a run is a commit (HEAD~1, a tag, a branch), an experiment name from `dvc exp show`, or workspace"
    assert refused("HEAD^{tree}", "HEAD") == (
        f"error: 'HEAD^{{tree}}' names a folder (git tree), not a commit: {allowed}")
    assert refused("HEAD:params.yaml", "HEAD") == (
        f"error: 'HEAD:params.yaml' names a file (git blob), not a commit: {allowed}")
    assert refused("--baseline", "base", "HEAD^{tree}").startswith("error: 'HEAD^{tree}' names a folder")
    empty = ("error: a run's name is empty (''): give a git revision (HEAD~1, a tag, a branch), an experiment name "
             "from `dvc exp show`, or workspace")
    assert refused("", "base") == refused("base", "") == refused("--baseline", "", "base") == empty
    assert refused("base", "waiting") == ("error: 'waiting' is a queued experiment: it has no results yet (`dvc "
                                          "queue start` runs it; `dvc queue status` shows it)")
    result = CliRunner().invoke(app, ["compare", "--baseline", "base", "--all-experiments"])
    assert result.exit_code == 0 and "2 runs on the same 40 test images" in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("left out")] == [
        "left out waiting: still queued"]
    result = CliRunner().invoke(app, ["compare", "--baseline", "base", "--all-experiments", "--json"])
    listed = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)[1]["experiments"][0]["revs"][0]
    assert json.loads(result.output)["left_out"] == [
        {"name": "waiting", "rev": listed["rev"], "reason": "still queued"}]


@pytest.mark.slow
def test_compare_reads_revisions_recorded_by_dvc_and_refuses_bad_input(toy):
    a = predictions_csv([True] * 300 + [False] * 40 + [True] * 4 + [False] * 15)
    b = predictions_csv([True] * 300 + [True] * 40 + [False] * 4 + [False] * 15)
    record(toy, a, "a")
    record(toy, b, "b", lr=0.01)

    shown = json.loads(compare(toy, "HEAD~1", "HEAD", "--json").stdout)["pairs"]
    correct_a, correct_b, a_only, b_only = recount(a, b)
    assert len(shown) == 1
    p = shown[0]
    assert (p["a"], p["b"], p["a_only_correct"], p["b_only_correct"]) == ("HEAD~1", "HEAD", a_only, b_only) == (
        "HEAD~1", "HEAD", 4, 40)
    assert (p["accuracy_a"], p["accuracy_b"]) == (correct_a / 359, correct_b / 359)
    assert p["p_value"] == pytest.approx(2 * sum(math.comb(44, i) for i in range(5)) / 2**44, rel=1e-9)
    text = compare(toy, "HEAD~1", "HEAD").stdout
    assert "B is better than A on 36 more images" in text and f"p = {p['p_value']:.1e}" in text
    assert "95% CI" in text

    same = json.loads(compare(toy, "HEAD", "workspace", "--json").stdout)["pairs"][0]
    assert (same["difference"], same["p_value"]) == (0, 1.0)

    assert "unknown revision or experiment 'nope'" in refusal(toy, "HEAD", "nope")
    assert "has no metrics/evaluate/predictions.csv" in refusal(toy, "HEAD~2", "HEAD")
    assert "compare takes two runs" in refusal(toy, "HEAD")

    # Another test split: the same number of images, other pixels.
    record(toy, predictions_csv([True] * 359, images=[f"{i + 1:016x}" for i in range(359)]), "other split")
    assert "different test images" in refusal(toy, "HEAD~1", "HEAD")
    # An older evaluate stage's file has no image digests.
    record(toy, predictions_csv([True] * 359, header=("index", "actual", "predicted")), "old format")
    assert "has no columns image" in refusal(toy, "HEAD", "HEAD~2")

    # A hand edit after `dvc repro`: one prediction changed in the workspace.
    record(toy, b, "b again")
    edited = toy / "metrics/evaluate/predictions.csv"
    edited.write_text(edited.read_text().replace("\n0,0,0,", "\n0,0,1,", 1))
    assert "differs from the file dvc.lock records" in refusal(toy, "HEAD", "workspace")
    assert compare(toy, "HEAD", "HEAD~4").returncode == 0  # the committed files are still fine
    # params.yaml edited by hand after `dvc repro`: dvc.lock, as dvc wrote it, says what made the results.
    sh(toy, "git", "checkout", "--", "metrics/evaluate/predictions.csv")
    (toy / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.05, "seed": 0}}))
    assert refusal(toy, "HEAD", "workspace") == (
        "error: the workspace has a params.yaml that differs from the params its results were made with (train.lr "
        "0.05 in params.yaml, 0.002 in dvc.lock); run `dvc repro` to make results with them")


@pytest.mark.slow
def test_all_experiments_leaves_out_each_run_on_another_test_split_and_compares_the_rest(toy):
    base = [True] * 30 + [False] * 10
    record(toy, predictions_csv(base), "baseline")
    # Two experiments made by `dvc exp run`: one on the baseline's images, one on a split of 35 of them
    # with 5 others (as data.skip_bad_images makes).
    same = [True] * 36 + [False] * 4
    (toy / "made/predictions.csv").write_text(predictions_csv(same))
    sh(toy, "dvc", "exp", "run", "-q", "-n", "same-split", "-S", "train.seed=1")
    other = [f"{i:016x}" for i in range(35)] + [f"{i + 100:016x}" for i in range(5)]
    (toy / "made/predictions.csv").write_text(predictions_csv([True] * 40, images=other))
    sh(toy, "dvc", "exp", "run", "-q", "-n", "other-split", "-S", "train.seed=2")

    proc = compare(toy, "--baseline", "HEAD", "--all-experiments")
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    assert "left out other-split: evaluated on different test images (40 against HEAD's 40; 5 differ)" in (
        proc.stdout.splitlines())
    assert "2 runs on the same 40 test images" in proc.stdout and "| same-split |" in proc.stdout
    assert "| other-split |" not in proc.stdout
    shown = json.loads(compare(toy, "--baseline", "HEAD", "--all-experiments", "--json").stdout)
    correct_a, correct_b, a_only, b_only = recount(predictions_csv(base), predictions_csv(same))
    assert [(p["b"], p["a_only_correct"], p["b_only_correct"]) for p in shown["pairs"]] == [
        ("same-split", a_only, b_only)]
    assert [r["name"] for r in shown["left_out"]] == ["other-split"]

    # Two runs named: the one-line refusal; a baseline with nothing comparable: one line too.
    assert "'HEAD' and 'other-split' were evaluated on different test images" in refusal(toy, "HEAD", "other-split")
    assert ("nothing to compare with 'HEAD': every other run was left out (other-split: evaluated on different test "
            "images (40 against HEAD's 40; 5 differ)); compare only runs on the same test split") in refusal(
        toy, "--baseline", "HEAD", "other-split")

    # A commit from before evaluate wrote predictions (the toy's first): left out with the others, one line.
    proc = compare(toy, "--baseline", "HEAD", "--all-experiments", "HEAD~1")
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    assert "2 runs on the same 40 test images" in proc.stdout and "| same-split |" in proc.stdout
    assert [line for line in proc.stdout.splitlines() if line.startswith("left out")] == [
        "left out HEAD~1: has no metrics/evaluate/predictions.csv: it was not evaluated (run `dvc repro` and commit "
        "its outputs there)", "left out other-split: evaluated on different test images (40 against HEAD's 40; 5 "
        "differ)"]


@pytest.mark.slow
def test_a_failed_queued_experiment_is_named_as_failed(toy):
    from .test_pipeline_e2e import run_queue

    record(toy, predictions_csv([True] * 30 + [False] * 10), "baseline")
    # Queued with its stage's dep missing, so that it fails; the workspace is restored after.
    (toy / "made/predictions.csv").unlink()
    sh(toy, "dvc", "exp", "run", "--queue", "-n", "balky-hate", "-S", "train.seed=3")
    sh(toy, "git", "checkout", "--", "made/predictions.csv")
    assert "Failed" in run_queue(toy, jobs=1, timeout=180)
    (failed,) = [rev for row in json.loads(sh(toy, "dvc", "exp", "show", "--json").stdout)
                 for exp in row.get("experiments") or [] for rev in exp["revs"] if rev["name"] == "balky-hate"]

    assert refusal(toy, "HEAD", "balky-hate") == ("error: 'balky-hate' is a failed experiment: it has no results "
                                                  "to compare (`dvc queue logs balky-hate` shows why)")
    # By the commit `dvc exp show` lists for it: DVC's stash of the workspace, not results of its own.
    assert "is a failed experiment" in refusal(toy, "HEAD", failed["rev"][:7])
    assert "unknown revision or experiment 'nope'" in refusal(toy, "HEAD", "nope")
    # --all-experiments: each experiment `dvc exp show` lists with no results left out, one line each.
    sh(toy, "dvc", "exp", "run", "--queue", "-n", "waiting", "-S", "train.seed=4")
    assert refusal(toy, "--baseline", "HEAD", "--all-experiments") == (
        "error: nothing to compare with 'HEAD': every other run was left out (balky-hate: failed (see `dvc queue "
        "logs balky-hate`); waiting: still queued)")
    assert "error: 'waiting' is a queued experiment: it has no results yet" in refusal(toy, "HEAD", "waiting")
