"""The compare command: which runs to read, then one pair or many runs against a baseline."""

from __future__ import annotations

import json

from ..errors import UserError
from .pairs import against_baseline, pair
from .runs import Repository, Run, Unreadable
from .show import baseline_lines, pair_lines


def compare(names: list[str], baseline: str | None, all_experiments: bool, as_json: bool) -> str:
    """The text to print: markdown-ish lines for people, one JSON object for scripts."""
    repo = Repository()
    if baseline is None and not all_experiments:
        if len(names) != 2:
            raise UserError(f"compare takes two runs (A B), got {len(names)}; for more, name a baseline with "
                            "--baseline REV, or add --all-experiments")
        revs = [repo.resolve(name) for name in names]  # both names checked before either run is read
        result = {"pairs": [pair(repo.run(names[0], revs[0]), repo.run(names[1], revs[1]))]}
        return json.dumps(result, indent=2) if as_json else "\n".join(pair_lines(result["pairs"][0]))

    base = repo.run(baseline if baseline is not None else "HEAD")  # --baseline "" is refused, not HEAD
    others, left_out = gather(repo, names, all_experiments, base.rev)
    if not others and not left_out:
        raise UserError("nothing to compare with the baseline: name runs after --baseline REV, or add "
                        "--all-experiments (with experiments made from HEAD)")
    result = against_baseline(base, others, left_out)
    return json.dumps(result, indent=2) if as_json else "\n".join(baseline_lines(result))


def gather(repo: Repository, names: list[str], all_experiments: bool, baseline_rev: str | None
           ) -> tuple[list[Run], list[dict]]:
    """The runs to compare with the baseline, and those left out: the runs named, then with all_experiments
    what `dvc exp show` lists (the experiments' commit HEAD and every experiment made from it) once each;
    those it lists with no results (queued, running, failed) are left out, one line each.

    A name that names nothing is refused, but a run whose files cannot be read (never evaluated, committed
    before predictions existed, a damaged or hand-edited file) is left out with the reason, so that one such
    experiment does not stop the comparison of all the others."""
    candidates = [(name, repo.resolve(name)) for name in names]
    if all_experiments:
        seen = {baseline_rev, *(rev for _, rev in candidates)}
        for name, rev in [("HEAD", repo.resolve("HEAD")), *repo.experiments("HEAD")]:
            if rev not in seen:
                candidates.append((name, rev))
                seen.add(rev)
    runs, left_out = [], []
    for name, rev in candidates:
        try:
            runs.append(repo.run(name, rev))
        except Unreadable as exc:
            left_out.append({"name": name, "rev": rev, "reason": exc.why})
    if all_experiments:
        named = {name for name, _ in candidates}
        left_out += [entry for entry in repo.unfinished("HEAD") if entry["name"] not in named]
    return runs, left_out
