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

from ..errors import UserError, first_line

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
        """The run `name` (resolved here unless its commit `rev` is given), checked against dvc.lock.

        A run that names nothing raises UserError; one whose files cannot be read, Unreadable."""
        rev = rev if rev is not None else self.resolve(name)
        where = "the workspace" if rev is None else f"'{name}' ({rev[:7]})"
        raw = self.read_file(rev, PREDICTIONS)
        if raw is None:
            raise Unreadable(where, f"has no {PREDICTIONS}: it was not evaluated (run `dvc repro` and commit its "
                                    "outputs there)")
        recorded = lock_md5(read_yaml(self.read_file(rev, LOCK), LOCK, where), PREDICTIONS)
        if recorded is None:
            raise Unreadable(where, f"has a {LOCK} that records no {PREDICTIONS}; run `dvc repro` and commit {LOCK}")
        if hashlib.md5(raw).hexdigest() != recorded:
            raise Unreadable(where, f"has a {PREDICTIONS} that differs from the file {LOCK} records (edited by "
                                    "hand?); compare reads only predictions written by `dvc repro`")
        actual, predicted, images = read_predictions(raw, where)
        params = read_yaml(self.read_file(rev, PARAMS), PARAMS, where)
        return Run(name, rev, actual, predicted, images, flatten(params))

    def experiments(self, baseline: str = "HEAD") -> list[tuple[str, str]]:
        """(name, commit) of every finished experiment `dvc exp show` lists from `baseline`."""
        from dvc.repo.experiments.ls import ls

        found = ls(self.repo, rev=baseline)
        return sorted((name, rev) for runs in found.values() for name, rev in runs if rev)


class Unreadable(UserError):
    """A run whose evaluation cannot be read: no predictions, a damaged or hand-edited file. Against a
    baseline it is left out with `why`; named as one of two runs, it is refused."""

    def __init__(self, where: str, why: str):
        super().__init__(f"{where} {why}")
        self.why = why


def read_yaml(raw: bytes | None, path: str, where: str) -> dict:
    """A YAML file of the run as a mapping ({} when absent); a damaged one is Unreadable."""
    try:
        tree = yaml.safe_load(raw) if raw else {}
    except yaml.YAMLError as exc:
        raise Unreadable(where, f"has a {path} that is not valid YAML ({first_line(exc)})") from None
    if not isinstance(tree, dict | None):
        raise Unreadable(where, f"has a {path} that is not a YAML mapping")
    return tree or {}


def lock_md5(lock: dict, path: str) -> str | None:
    """The md5 dvc.lock (parsed) records for the out `path`, or None."""
    stages = lock.get("stages") if isinstance(lock.get("stages"), dict) else {}
    for stage in stages.values():
        outs = stage.get("outs") if isinstance(stage, dict) else None
        for out in outs if isinstance(outs, list) else []:
            if isinstance(out, dict) and out.get("path") == path:
                return out.get("md5")
    return None


def read_predictions(raw: bytes, where: str) -> tuple[list[str], list[str], list[str]]:
    try:
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))))
    except csv.Error as exc:  # a damaged file: a field over csv's size limit, say
        raise Unreadable(where, f"has a {PREDICTIONS} that is not a CSV file ({exc})") from None
    if not rows:
        raise Unreadable(where, f"has a {PREDICTIONS} that lists no test images; rerun `dvc repro` there")
    header = set(rows[0])
    if not set(COLUMNS) <= header:
        raise Unreadable(where, f"has a {PREDICTIONS} written by an older evaluate stage: it has no columns "
                                f"{', '.join(sorted(set(COLUMNS) - header))}; rerun `dvc repro` there")
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
