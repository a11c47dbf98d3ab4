"""Summaries of runs and of pairs of runs on the same test images, as plain dicts (the --json contract)."""

from __future__ import annotations

from ..errors import UserError
from ..stats import holm, mcnemar_exact, spread, wilson_interval
from .runs import Run

SEED = "train.seed"


def summary(run: Run) -> dict:
    """A run's test accuracy with its 95% Wilson interval."""
    correct, total = sum(run.correct), len(run.actual)
    if total == 0:
        raise UserError(f"'{run.name}': its predictions list no test images")
    low, high = wilson_interval(correct, total)
    return {"name": run.name, "rev": run.rev, "accuracy": correct / total, "ci_low": low, "ci_high": high,
            "correct": correct, "total": total}


def same_images(a: Run, b: Run) -> bool:
    return a.images == b.images and a.actual == b.actual


def images_differing(a: Run, b: Run) -> int:
    return sum(x != y for x, y in zip(a.images, b.images)) + abs(len(a.images) - len(b.images))


def check_same_images(a: Run, b: Run) -> None:
    if not same_images(a, b):
        raise UserError(f"'{a.name}' and '{b.name}' were evaluated on different test images ({len(a.images)} and "
                        f"{len(b.images)} images, {images_differing(a, b)} differ): compare only runs on the same "
                        "test split")


def pair(a: Run, b: Run) -> dict:
    """Accuracy of each, the difference B - A, the discordant images and McNemar's exact p-value."""
    check_same_images(a, b)
    sa, sb = summary(a), summary(b)
    a_only = sum(x and not y for x, y in zip(a.correct, b.correct))
    b_only = sum(y and not x for x, y in zip(a.correct, b.correct))
    return {"a": a.name, "b": b.name, "rev_a": a.rev, "rev_b": b.rev, "total": sa["total"],
            "accuracy_a": sa["accuracy"], "accuracy_b": sb["accuracy"],
            "ci_low_a": sa["ci_low"], "ci_high_a": sa["ci_high"], "ci_low_b": sb["ci_low"], "ci_high_b": sb["ci_high"],
            "correct_a": sa["correct"], "correct_b": sb["correct"], "difference": sb["accuracy"] - sa["accuracy"],
            "a_only_correct": a_only, "b_only_correct": b_only, "p_value": mcnemar_exact(a_only, b_only)}


def against_baseline(baseline: Run, others: list[Run]) -> dict:
    """Every run against `baseline`: the runs sorted by accuracy, the pairs with Holm-adjusted p-values
    (as many comparisons make some small p-values by chance), and the groups of seeds.

    A run evaluated on other test images than the baseline's is left out, with the reason, so that one
    experiment on another split (say data.skip_bad_images) does not stop the comparison of all the others."""
    left_out = [{"name": run.name, "rev": run.rev,
                 "reason": f"evaluated on different test images ({len(run.images)} against {baseline.name}'s "
                           f"{len(baseline.images)}; {images_differing(baseline, run)} differ)"}
                for run in others if not same_images(baseline, run)]
    others = [run for run in others if same_images(baseline, run)]
    if not others:
        raise UserError(f"nothing to compare with '{baseline.name}': "
                        f"{', '.join(r['name'] for r in left_out)} {'was' if len(left_out) == 1 else 'were'} "
                        "evaluated on different test images; compare only runs on the same test split")
    pairs = [pair(baseline, run) for run in others]
    for p, adjusted in zip(pairs, holm([p["p_value"] for p in pairs])):
        p["p_value_holm"] = adjusted
    runs = [{**summary(baseline), "baseline": True}]
    runs += [{**summary(run), "baseline": False, "pair": i} for i, run in enumerate(others)]
    runs.sort(key=lambda s: -s["accuracy"])
    return {"baseline": baseline.name, "comparisons": len(pairs), "runs": runs, "pairs": pairs,
            "seed_groups": seed_groups([baseline, *others]), "left_out": left_out}


def seed_groups(runs: list[Run]) -> list[dict]:
    """Runs whose params are equal but for train.seed, grouped: the spread of their test accuracy.

    Each group is labelled by the params that differ between groups (all of them equal within one)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run.params.items() if k != SEED))
        groups.setdefault(key, []).append(run)
    keys = sorted({k for run in runs for k in run.params} - {SEED})
    varying = [k for k in keys if len({repr(r.params.get(k)) for r in runs}) > 1]
    found = []
    for members in groups.values():
        members.sort(key=lambda r: r.params.get(SEED) if isinstance(r.params.get(SEED), int) else -1)
        accuracy = [summary(r)["accuracy"] for r in members]
        found.append({"params": {k: members[0].params.get(k) for k in varying}, "runs": [r.name for r in members],
                      "seeds": [r.params.get(SEED) for r in members], "n": len(members), **spread(accuracy)})
    return sorted(found, key=lambda g: -g["mean"])
