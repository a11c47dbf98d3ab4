"""`stages compare` end to end: the real pipeline and `dvc` in a temporary git repo, as a user runs it.

Two commits with different train.lr, then a queue of three seeds from the second; compare reads the
predictions each run committed, and every number it prints is recomputed here from those files."""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys

import pytest
import yaml

from stages.stats import holm

from .test_pipeline_e2e import commit, new_project, restore_params, run_queue, set_param, sh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PREDICTIONS = "metrics/evaluate/predictions.csv"


def correct_at(repo, rev: str) -> list[bool]:
    text = sh(repo, "git", "show", f"{rev}:{PREDICTIONS}").stdout
    return [r["actual"] == r["predicted"] for r in csv.DictReader(io.StringIO(text))]


def paired(a: list[bool], b: list[bool]) -> dict:
    return {"accuracy_a": sum(a) / len(a), "accuracy_b": sum(b) / len(b),
            "a_only_correct": sum(x and not y for x, y in zip(a, b)),
            "b_only_correct": sum(y and not x for x, y in zip(a, b))}


def exact_mcnemar(b: int, c: int) -> float:
    from statsmodels.stats.contingency_tables import mcnemar

    return mcnemar([[0, b], [c, 0]], exact=True).pvalue


def compare(repo, *args: str, check: bool = True):
    return sh(repo, sys.executable, "-m", "stages", "compare", *args, check=check)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    repo = new_project(tmp_path_factory.mktemp("compare") / "project")
    set_param(repo, "train", "epochs", 2)
    sh(repo, "dvc", "repro")
    commit(repo, "lr 0.002")
    set_param(repo, "train", "lr", 0.01)
    sh(repo, "dvc", "repro")
    commit(repo, "lr 0.01")
    # Three seeds through the queue (up to evaluate: analyze adds nothing compare reads).
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "train.seed=1,2,3", "evaluate")
    queue = run_queue(repo, jobs=2, timeout=900)
    assert "Failed" not in queue, queue
    exps = {}
    for row in json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                exps[rev["name"]] = {"rev": rev["rev"], "seed": rev["data"]["params"]["params.yaml"]["data"]
                                     ["train"]["seed"]}
    assert sorted(e["seed"] for e in exps.values()) == [1, 2, 3], exps
    return {"repo": repo, "exps": exps}


def test_evaluate_writes_the_interval_that_metrics_diff_and_the_report_show(runs):
    from statsmodels.stats.proportion import proportion_confint

    repo = runs["repo"]
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "HEAD~1", "--all", "--json").stdout)
    test = {k.removeprefix("test."): v["new"] for k, v in diff["metrics/evaluate/metrics.json"].items()}
    assert {"accuracy_ci_low", "accuracy_ci_high", "top5_accuracy_ci_low", "top5_accuracy_ci_high"} <= set(test)
    correct = correct_at(repo, "HEAD")
    low, high = proportion_confint(sum(correct), len(correct), method="wilson")
    assert (test["accuracy_ci_low"], test["accuracy_ci_high"]) == (round(low, 6), round(high, 6))
    assert test["accuracy_ci_low"] < test["accuracy"] <= test["accuracy_ci_high"]
    report = (repo / "report/report.md").read_text()
    assert (f"{100 * low:.2f}–{100 * high:.2f}%, Wilson score, on {len(correct)} test images" in report), report


def test_compare_two_commits_prints_what_the_prediction_files_give(runs):
    repo = runs["repo"]
    expected = paired(correct_at(repo, "HEAD~1"), correct_at(repo, "HEAD"))
    expected["p_value"] = exact_mcnemar(expected["a_only_correct"], expected["b_only_correct"])
    (got,) = json.loads(compare(repo, "HEAD~1", "HEAD", "--json").stdout)["pairs"]
    assert (got["a"], got["b"]) == ("HEAD~1", "HEAD")
    assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    text = compare(repo, "HEAD~1", "HEAD").stdout
    assert f"A  HEAD~1  accuracy {100 * expected['accuracy_a']:.2f}%" in text
    assert (f"right in A only: {expected['a_only_correct']}, right in B only: {expected['b_only_correct']}; "
            f"McNemar's exact test p =") in text
    assert "would arise by chance with p =" in text


def test_compare_all_experiments_against_a_baseline_with_seeds_grouped(runs):
    repo, exps = runs["repo"], runs["exps"]
    result = json.loads(compare(repo, "--baseline", "HEAD~1", "--all-experiments", "--json").stdout)
    base = correct_at(repo, "HEAD~1")
    others = {"HEAD": sh(repo, "git", "rev-parse", "HEAD").stdout.strip(), **{n: e["rev"] for n, e in exps.items()}}
    assert result["baseline"] == "HEAD~1" and sorted(p["b"] for p in result["pairs"]) == sorted(others)
    for p in result["pairs"]:
        expected = paired(base, correct_at(repo, others[p["b"]]))
        expected["p_value"] = exact_mcnemar(expected["a_only_correct"], expected["b_only_correct"])
        assert {k: p[k] for k in expected} == pytest.approx(expected, rel=1e-12), p["b"]
    assert [p["p_value_holm"] for p in result["pairs"]] == pytest.approx(holm([p["p_value"] for p in result["pairs"]]))
    accuracy = [r["accuracy"] for r in result["runs"]]
    assert accuracy == sorted(accuracy, reverse=True) and len(accuracy) == 5

    # HEAD (seed 0) and the three queued seeds share lr 0.01; HEAD~1 (lr 0.002) is a group of one.
    groups = {g["params"]["train.lr"]: g for g in result["seed_groups"]}
    seeds = [sum(c) / len(c) for c in (correct_at(repo, rev) for rev in others.values())]
    assert groups[0.01]["seeds"] == [0, 1, 2, 3] and groups[0.002]["n"] == 1
    assert groups[0.01]["mean"] == pytest.approx(statistics.fmean(seeds))
    assert groups[0.01]["std"] == pytest.approx(statistics.stdev(seeds))
    assert (groups[0.01]["min"], groups[0.01]["max"]) == (min(seeds), max(seeds))

    text = compare(repo, "--baseline", "HEAD~1", "--all-experiments").stdout
    assert "| HEAD~1 (baseline) |" in text and "4 comparisons" in text and "Holm" in text
    assert f"| train.lr=0.01 | 4 | 0, 1, 2, 3 | {100 * groups[0.01]['mean']:.2f}% |" in text


def test_compare_refuses_with_one_line(runs):
    repo = runs["repo"]
    for args, expected in [(("HEAD", "no-such-exp"), "unknown revision or experiment 'no-such-exp'"),
                           (("HEAD~2", "HEAD"), "has no metrics/evaluate/predictions.csv")]:
        proc = compare(repo, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    # Another test split: a new data.split_seed, evaluated in the workspace.
    set_param(repo, "data", "split_seed", 1)
    sh(repo, "dvc", "repro", "evaluate")
    proc = compare(repo, "HEAD", "workspace", check=False)
    assert proc.returncode == 2 and "different test images" in proc.stderr, proc.stderr
    restore_params(repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["data"]["split_seed"] == 0
    # params.yaml back to HEAD's by hand, with no `dvc repro`: the workspace's results were made with the
    # other split_seed (prepare-data's params in dvc.lock), and are not shown beside these params.
    proc = compare(repo, "HEAD", "workspace", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: the workspace has a params.yaml that differs from the params its results were made with "
        "(data.split_seed 0 in params.yaml, 1 in dvc.lock); run `dvc repro` to make results with them"), proc.stderr
