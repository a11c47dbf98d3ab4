"""Reading a run's evaluation as committed: at a git revision, an experiment, or in the workspace.

The evaluate stage's outputs are small files kept in git (`cache: false`), so they are read from git
objects through DVC's repo (which also resolves experiment names); nothing is re-run.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from ..errors import UserError

PREDICTIONS = "metrics/evaluate/predictions.csv"
PARAMS = "params.yaml"
LOCK = "dvc.lock"
WORKSPACE = "workspace"
COLUMNS = ("actual", "predicted", "image")


@dataclass
class Run:
    name: str  # as the user gave it (or the experiment's name)
    rev: str | None  # the commit, None for the workspace
    actual: list[str]
    predicted: list[str]
    images: list[str]  # per-image digests of the test split, in test-set order
    params: dict  # params.yaml flattened to dotted keys

    @property
    def correct(self) -> list[bool]:
        return [a == p for a, p in zip(self.actual, self.predicted)]


class Repository:
    """The DVC repository around the current folder, opened once for all the runs read."""

    def __init__(self, root: str | Path | None = None):
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo

        try:
            self.repo = Repo(root)
        except NotDvcRepoError:
            raise UserError("not in a DVC repository: run `stages compare` inside the project") from None
        self.root = Path(self.repo.root_dir)

    def resolve(self, name: str) -> str | None:
        """The commit `name` names (a git revision or an experiment name); None for the workspace."""
        from dvc.scm import SCMError, resolve_rev

        if name == WORKSPACE:
            return None
        try:
            rev = resolve_rev(self.repo.scm, name)
        except SCMError as exc:
            if "ambiguous" in str(exc):  # an experiment name used from two baselines
                raise UserError(f"'{name}' names experiments from several commits: give the commit that "
                                "`dvc exp show --all-commits` lists for the one you mean") from None
            rev = None
        # A failed experiment has no commit of its own, only the stash DVC queued it from (named by its
        # commit in `dvc exp show`): that holds the workspace's results at the time, not the experiment's.
        # Looked up only for names git does not know and for commit ids: other runs never read the queue.
        if rev is None or self.repo.scm.is_sha(name):
            if (rev is None and name in self.failed) or rev in self.failed.values():
                raise UserError(f"'{name}' is a failed experiment: it has no results to compare "
                                f"(`dvc queue logs {name}` shows why)")
        if rev is None:
            raise UserError(f"unknown revision or experiment '{name}': give a git revision (HEAD~1, a tag, "
                            "a branch), an experiment name from `dvc exp show`, or workspace")
        return rev

    @cached_property
    def failed(self) -> dict[str, str]:
        """{name: stash commit} of the queued experiments that failed, as `dvc queue status` and `dvc exp show`
        list them (State Failed)."""
        return {entry.name: entry.stash_rev for entry, _ in self.repo.experiments.celery_queue.iter_failed()}

    def read_file(self, rev: str | None, path: str) -> bytes | None:
        if rev is None:
            file = self.root / path
            return file.read_bytes() if file.is_file() else None
        fs = self.repo.scm.get_fs(rev)
        return fs.cat_file(path) if fs.isfile(path) else None

    def run(self, name: str, rev: str | None = None) -> Run:
        """The run `name` (resolved here unless its commit `rev` is given), checked against dvc.lock."""
        rev = rev if rev is not None else self.resolve(name)
        where = "the workspace" if rev is None else f"'{name}' ({rev[:7]})"
        raw = self.read_file(rev, PREDICTIONS)
        if raw is None:
            raise UserError(f"{where} has no {PREDICTIONS}: it was not evaluated (run `dvc repro` and commit "
                            "its outputs there)")
        recorded = lock_md5(self.read_file(rev, LOCK), PREDICTIONS)
        if recorded is None:
            raise UserError(f"{where}: dvc.lock records no {PREDICTIONS}; run `dvc repro` and commit dvc.lock")
        if hashlib.md5(raw).hexdigest() != recorded:
            raise UserError(f"{where}: {PREDICTIONS} differs from the file dvc.lock records (edited by hand?); "
                            "compare reads only predictions written by `dvc repro`")
        actual, predicted, images = read_predictions(raw, where)
        params = yaml.safe_load(self.read_file(rev, PARAMS) or b"") or {}
        return Run(name, rev, actual, predicted, images, flatten(params))

    def experiments(self, baseline: str = "HEAD") -> list[tuple[str, str]]:
        """(name, commit) of every finished experiment `dvc exp show` lists from `baseline`."""
        from dvc.repo.experiments.ls import ls

        found = ls(self.repo, rev=baseline)
        return sorted((name, rev) for runs in found.values() for name, rev in runs if rev)


def lock_md5(lock: bytes | None, path: str) -> str | None:
    """The md5 dvc.lock records for the out `path`, or None."""
    stages = (yaml.safe_load(lock) or {}).get("stages", {}) if lock else {}
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == path:
                return out.get("md5")
    return None


def read_predictions(raw: bytes, where: str) -> tuple[list[str], list[str], list[str]]:
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))))
    header = set(rows[0]) if rows else set()
    if not set(COLUMNS) <= header:
        raise UserError(f"{where}: {PREDICTIONS} has no columns {', '.join(sorted(set(COLUMNS) - header))}; "
                        "it was written by an older evaluate stage, so rerun `dvc repro` there")
    return [r["actual"] for r in rows], [r["predicted"] for r in rows], [r["image"] for r in rows]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
