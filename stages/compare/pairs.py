"""Summaries of runs and of pairs of runs on the same test images, as plain dicts (the --json contract)."""

from __future__ import annotations

from collections import Counter

from ..errors import UserError
from ..params import listed
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


def how_test_sets_differ(a: Run, b: Run, reference: str | None = None) -> str:
    """How b's test set differs from a's, to follow "evaluated on" (`reference`: a's name, said when given).

    The digests tell whether the images are the same; their labels may still differ: renaming (or adding)
    a class folder of an image folder renumbers the classes and relabels the same files."""
    as_a = f" as {reference}" if reference else ""
    if Counter(a.images) != Counter(b.images):
        differ = max(sum((Counter(a.images) - Counter(b.images)).values()),
                     sum((Counter(b.images) - Counter(a.images)).values()))
        counts = (f"{len(b.images)} against {reference}'s {len(a.images)}" if reference
                  else f"{len(a.images)} and {len(b.images)} images")
        return f"different test images ({counts}; {differ} differ)"
    labels_a, labels_b = labels_by_image(a), labels_by_image(b)
    relabelled = sum(x != y for image in labels_a for x, y in zip(labels_a[image], labels_b[image]))
    if not relabelled:
        return f"the same {len(a.images)} test images{as_a}, in another order"
    only_a, only_b = sorted(set(a.actual) - set(b.actual)), sorted(set(b.actual) - set(a.actual))
    names = "; ".join([*([f"only in {a.name}: {listed([repr(n) for n in only_a], 10)}"] if only_a else []),
                       *([f"only in {b.name}: {listed([repr(n) for n in only_b], 10)}"] if only_b else [])])
    why = f"classes renamed or added: {names}" if names else "the same class names on other images"
    return f"the same {len(a.images)} test images{as_a}, but with other labels on {relabelled} of them ({why})"


def labels_by_image(run: Run) -> dict[str, list[str]]:
    """Each image's digest -> its labels, in test-set order (an image may be in the test split twice)."""
    found: dict[str, list[str]] = {}
    for image, label in zip(run.images, run.actual):
        found.setdefault(image, []).append(label)
    return found


def check_same_images(a: Run, b: Run) -> None:
    if not same_images(a, b):
        raise UserError(f"'{a.name}' and '{b.name}' were evaluated on {how_test_sets_differ(a, b)}; compare only "
                        "runs on the same test split, with the same classes")


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


def against_baseline(baseline: Run, others: list[Run], unreadable: list[dict] = ()) -> dict:
    """Every run against `baseline`: the runs sorted by accuracy, the pairs with Holm-adjusted p-values
    (as many comparisons make some small p-values by chance), and the groups of seeds.

    A run evaluated on other test images than the baseline's is left out, with the reason, so that one
    experiment on another split (say data.skip_bad_images) does not stop the comparison of all the others;
    so are the `unreadable` runs ({"name", "rev", "reason"}) the caller could not read."""
    left_out = [*unreadable, *({"name": run.name, "rev": run.rev,
                                "reason": f"evaluated on {how_test_sets_differ(baseline, run, baseline.name)}"}
                               for run in others if not same_images(baseline, run))]
    others = [run for run in others if same_images(baseline, run)]
    if not others:
        split = "; compare only runs on the same test split, with the same classes" if len(left_out) > len(
            unreadable) else ""
        why = "; ".join(f"{r['name']}: {r['reason']}" for r in left_out)
        raise UserError(f"nothing to compare with '{baseline.name}': every other run was left out ({why}){split}")
    pairs = [pair(baseline, run) for run in others]
    for p, adjusted in zip(pairs, holm([p["p_value"] for p in pairs])):
        p["p_value_holm"] = adjusted
    runs = [{**summary(baseline), "baseline": True}]
    runs += [{**summary(run), "baseline": False, "pair": i} for i, run in enumerate(others)]
    runs.sort(key=lambda s: -s["accuracy"])
    return {"baseline": baseline.name, "comparisons": len(pairs), "runs": runs, "pairs": pairs,
            "seed_groups": seed_groups([baseline, *others]), "left_out": left_out}


def seed_groups(runs: list[Run]) -> list[dict]:
    """Runs whose params are equal but for train.seed, grouped: the spread of their test accuracy over seeds.

    Each group is labelled by the params that differ between groups (all of them equal within one). Runs with
    the same params and the same seed (an experiment that reran HEAD's params) are one draw, not two: the
    first of them (the baseline, then the order given) is counted, and `same_seed` names the others."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run.params.items() if k != SEED))
        groups.setdefault(key, []).append(run)
    keys = sorted({k for run in runs for k in run.params} - {SEED})
    varying = [k for k in keys if len({repr(r.params.get(k)) for r in runs}) > 1]
    found = []
    for members in groups.values():
        by_seed: dict[str, list[Run]] = {}
        for run in members:
            by_seed.setdefault(repr(run.params.get(SEED)), []).append(run)
        counted = sorted((same[0] for same in by_seed.values()),
                         key=lambda r: r.params.get(SEED) if isinstance(r.params.get(SEED), int) else -1)
        accuracy = [summary(r)["accuracy"] for r in counted]
        found.append({"params": {k: counted[0].params.get(k) for k in varying}, "runs": [r.name for r in counted],
                      "seeds": [r.params.get(SEED) for r in counted], "n": len(counted),
                      "same_seed": {same[0].name: [r.name for r in same[1:]] for same in by_seed.values()
                                    if len(same) > 1}, **spread(accuracy)})
    return sorted(found, key=lambda g: -g["mean"])
