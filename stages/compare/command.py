"""The compare command: which runs to read, then one pair or many runs against a baseline."""

from __future__ import annotations

import json

from ..errors import UserError
from .pairs import against_baseline, pair
from .runs import Repository
from .show import baseline_lines, pair_lines


def compare(names: list[str], baseline: str | None, all_experiments: bool, as_json: bool) -> str:
    """The text to print: markdown-ish lines for people, one JSON object for scripts."""
    repo = Repository()
    if baseline is None and not all_experiments:
        if len(names) != 2:
            raise UserError(f"compare takes two runs (A B), got {len(names)}; for more, name a baseline with "
                            "--baseline REV, or add --all-experiments")
        result = {"pairs": [pair(repo.run(names[0]), repo.run(names[1]))]}
        return json.dumps(result, indent=2) if as_json else "\n".join(pair_lines(result["pairs"][0]))

    base = repo.run(baseline or "HEAD")
    others = [repo.run(name) for name in names]
    if all_experiments:
        # What `dvc exp show` lists: the experiments' commit (HEAD) and every experiment made from it.
        seen = {base.rev, *(run.rev for run in others)}
        head = repo.resolve("HEAD")
        if head not in seen:
            others.append(repo.run("HEAD", head))
            seen.add(head)
        others += [repo.run(name, rev) for name, rev in repo.experiments("HEAD") if rev not in seen]
    if not others:
        raise UserError("nothing to compare with the baseline: name runs after --baseline REV, or add "
                        "--all-experiments (with experiments made from HEAD)")
    result = against_baseline(base, others)
    return json.dumps(result, indent=2) if as_json else "\n".join(baseline_lines(result))
