"""What a `dvc exp run` in the workspace leaves behind when one of its stages refuses, and how to undo it.

Before it runs the stages, DVC stashes the workspace's changes (git resets the files to the commit and
records their stat data in its index), writes them back within the same second, then writes the `-S`
values into params.yaml. A file whose content changed but whose size did not (predictions.csv, dvc.lock,
params.yaml with `lr: 0` for `lr: 0.002`) then matches the index's mtime and size, so `git status` shows
it clean and `git add -A` leaves it out: a commit that mixes one run's metrics with another's params.
After a refusal nothing rewrites those files again, so check-params gives git a fresh look at them.

params.yaml keeps the `-S` values after a refusal; the values the workspace's outputs were made with are
those dvc.lock records (`python -m stages params --from-lock`), which need not be the commit's when the
workspace holds an experiment's results.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from .errors import UserError
from .params import read_params_file

RECENT_SECONDS = 600  # files DVC's stash wrote are this recent when check-params starts


def in_queue_copy() -> bool:
    """Run in the temporary copy of the repo where DVC runs a queued experiment (.dvc/tmp/exps/...)."""
    parts = Path.cwd().parts
    return any(parts[i:i + 3] == (".dvc", "tmp", "exps") for i in range(len(parts)))


def in_workspace_exp_run() -> bool:
    """Run by `dvc exp run` in the workspace, not in a queue's copy."""
    return bool(os.environ.get("DVC_EXP_NAME")) and not in_queue_copy()


def kept_values_hint() -> str:
    """Under `dvc exp run` in the workspace, DVC has written the `-S` values into params.yaml, and they stay
    there after this refusal: the next run starts from them. The hint names the command that puts back the
    values the workspace's outputs were made with (dvc.lock's, which are the commit's only when the workspace
    holds the commit's results; the module docstring); every stage's refusal ends with it."""
    if not in_workspace_exp_run():
        return ""
    if not Path("dvc.lock").is_file():
        return " (params.yaml keeps the values `dvc exp run -S` wrote: `git checkout params.yaml` puts back the " \
               "commit's)"
    if not differs_from_lock(Path("params.yaml"), Path("dvc.lock")):
        return ""  # e.g. a refused image under a plain `dvc exp run`: nothing to put back
    return " (params.yaml keeps the values `dvc exp run -S` wrote: `python -m stages params --from-lock > " \
           "params.yaml` puts back those the workspace's outputs were made with)"


def differs_from_lock(params: Path, lock: Path) -> bool:
    """Whether a value in `params` differs from the one `lock` records (True where either cannot be read)."""
    try:
        current = read_params_file(params)
        return any(not isinstance(current.get(section), dict) or current[section].get(key, object()) != value
                   for section, values in locked_params(lock).items() for key, value in values.items())
    except (UserError, AttributeError):
        return True


def show_hidden_changes(root: Path) -> list[str]:
    """Give every tracked file whose content differs from git's index a new mtime, so that git compares
    its content again instead of trusting the stat data DVC's stash left (module docstring); return them.

    git has no command for this: `update-index --really-refresh` still trusts a matching mtime and size.
    Quietly does nothing where git is missing or `root` is no git work tree."""
    try:
        listed = run_git(root, "ls-files", "--stage", "-z").split("\0")
        entries = [line.split("\t", 1) for line in listed if line]
        # Only files written in the last minutes (DVC's stash writes them just before the stages run): hashing
        # every tracked file would cost seconds in a repo that keeps large files in git.
        since = time.time() - RECENT_SECONDS
        tracked = [(path, info.split()[1]) for info, path in entries
                   if info.startswith(("100644", "100755")) and "\n" not in path and (root / path).is_file()
                   and (root / path).stat().st_mtime > since]
        if not tracked:
            return []
        digests = run_git(root, "hash-object", "--stdin-paths", stdin="\n".join(path for path, _ in tracked))
    except (OSError, subprocess.CalledProcessError):
        return []
    changed = [path for (path, blob), digest in zip(tracked, digests.split()) if blob != digest]
    # The next whole second, not now: git compares whole seconds, and DVC's stash may have written the file
    # and git's index in this very second, which a new mtime of now would leave looking unchanged.
    next_second = math.floor(time.time()) + 1
    for path in changed:
        os.utime(root / path, (next_second, next_second))
    return changed


def run_git(root: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(["git", *args], cwd=root, input=stdin, capture_output=True, text=True,
                          check=True).stdout


def locked_params(lock: Path) -> dict[str, dict[str, Any]]:
    """The params values dvc.lock records ({section: {key: value}}): for each section, those of the last
    stage in the file that records it, whose outputs are the last made with them."""
    if not lock.is_file():
        raise UserError(f"{lock} does not exist: no stage has run here yet (dvc repro)")
    lock_file = read_params_file(lock)  # YAML 1.2 as DVC writes it: PyYAML would read 3e-05 as a string
    try:
        records = [stage["params"]["params.yaml"] for stage in lock_file["stages"].values()
                   if "params.yaml" in stage.get("params", {})]
    except (KeyError, AttributeError, TypeError):
        raise UserError(f"{lock} is not DVC's lock file (no stages with their params)") from None
    values: dict[str, dict[str, Any]] = {}
    for record in records:
        for name, value in record.items():
            section, _, key = name.partition(".")
            if key:  # a single key listed in dvc.yaml, e.g. train.lr
                values.setdefault(section, {})[key] = value
            elif isinstance(value, dict):
                values[section] = {**values.get(section, {}), **value}
    if not values:
        raise UserError(f"{lock} records no params.yaml values: no stage that reads them has run (dvc repro)")
    return values
