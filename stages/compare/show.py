"""What `stages compare` prints: a few lines for one pair, markdown tables for many runs."""

from __future__ import annotations

ALPHA = 0.05


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def interval(low: float, high: float) -> str:
    return f"{100 * low:.2f}–{100 * high:.2f}%"


def p_text(p: float) -> str:
    return f"{p:.3g}" if p >= 0.001 else f"{p:.1e}"


def images(n: int) -> str:
    return f"{n:+d} image{'' if abs(n) == 1 else 's'}"


def sentence(p: dict) -> str:
    """One plain sentence on a pair: who is better on how many images, and how likely by chance."""
    more = p["correct_b"] - p["correct_a"]
    if more == 0:
        return (f"A and B are right on as many images ({p['correct_a']} of {p['total']}); "
                f"they disagree on {p['a_only_correct'] + p['b_only_correct']} (p = {p_text(p['p_value'])}).")
    better, worse = ("B", "A") if more > 0 else ("A", "B")
    verdict = "" if p["p_value"] < ALPHA else " (no evidence of a real difference at the 0.05 level)"
    return (f"{better} is better than {worse} on {abs(more)} more image{'s' if abs(more) != 1 else ''}; "
            f"a difference this large would arise by chance with p = {p_text(p['p_value'])}{verdict}.")


def pair_lines(p: dict) -> list[str]:
    width = max(len(p["a"]), len(p["b"]))
    return [
        f"A  {p['a']:<{width}}  accuracy {pct(p['accuracy_a'])} (95% CI {interval(p['ci_low_a'], p['ci_high_a'])}), "
        f"{p['correct_a']} of {p['total']} test images right",
        f"B  {p['b']:<{width}}  accuracy {pct(p['accuracy_b'])} (95% CI {interval(p['ci_low_b'], p['ci_high_b'])}), "
        f"{p['correct_b']} of {p['total']} test images right",
        f"difference B - A: {100 * p['difference']:+.2f} points ({images(p['correct_b'] - p['correct_a'])})",
        f"right in A only: {p['a_only_correct']}, right in B only: {p['b_only_correct']}; "
        f"McNemar's exact test p = {p_text(p['p_value'])}",
        sentence(p),
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def baseline_lines(result: dict) -> list[str]:
    rows = []
    for run in result["runs"]:
        if run["baseline"]:
            rows.append([f"{run['name']} (baseline)", pct(run["accuracy"]), interval(run["ci_low"], run["ci_high"]),
                         "", "", "", ""])
        else:
            p = result["pairs"][run["pair"]]
            rows.append([run["name"], pct(run["accuracy"]), interval(run["ci_low"], run["ci_high"]),
                         f"{100 * p['difference']:+.2f} ({images(p['correct_b'] - p['correct_a'])})",
                         f"{p['b_only_correct']} / {p['a_only_correct']}", p_text(p["p_value"]),
                         p_text(p["p_value_holm"])])
    total = result["runs"][0]["total"]
    m = result["comparisons"]
    flagged = [p["b"] for p in result["pairs"] if p["p_value_holm"] < ALPHA]
    lines = [f"{len(result['runs'])} runs on the same {total} test images, against the baseline "
             f"{result['baseline']}; best first", "",
             *table(["run", "accuracy", "95% CI", "vs baseline (points)", "right only here / only in baseline",
                     "p (McNemar)", "p (Holm)"], rows), ""]
    lines += [f"left out {run['name']}: {run['reason']}" for run in result["left_out"]]
    if m > 1:
        lines.append(f"{m} comparisons: if no run differed from the baseline, chance alone would give about "
                     f"{m * ALPHA:.2g} of them p < {ALPHA}. Holm's p allows for that; below {ALPHA} after Holm: "
                     f"{', '.join(flagged) if flagged else 'none'}.")
    groups = result["seed_groups"]
    if any(g["n"] > 1 for g in groups):
        rows = [[", ".join(f"{k}={v}" for k, v in g["params"].items()) or "all runs", str(g["n"]),
                 ", ".join(str(s) for s in g["seeds"]), pct(g["mean"]),
                 "" if g["std"] is None else f"{100 * g['std']:.2f}", pct(g["min"]), pct(g["max"])] for g in groups]
        lines += ["", "Runs that differ only in train.seed, grouped (test accuracy; std in points):", "",
                  *table(["params", "runs", "seeds", "mean", "std", "min", "max"], rows)]
        merged = [f"{', '.join(others)} counted once with {first}: the same params and seed"
                  for g in groups for first, others in g["same_seed"].items()]
        lines += ["", *merged] if merged else []  # a blank line first: a line right after a table is one of its rows
    return lines
