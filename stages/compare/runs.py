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

from ..errors import UserError, first_line
from ..params import listed, show_in_error

PREDICTIONS = "metrics/evaluate/predictions.csv"
PARAMS = "params.yaml"
LOCK = "dvc.lock"
WORKSPACE = "workspace"
COLUMNS = ("actual", "predicted", "image")
ABSENT = object()  # a key one params file has and the other lacks
# A queued experiment with no results, by its state in `dvc queue status`: what to say when it is named, and
# its one-line reason when it is left out of --all-experiments.
NO_RESULTS = {
    "queued": ("is a queued experiment: it has no results yet (`dvc queue start` runs it; `dvc queue status` "
               "shows it)", "still queued"),
    "running": ("is still running: it has no results yet (`dvc queue status` says when it is done)",
                "still running"),
    "failed": ("is a failed experiment: it has no results to compare (`dvc queue logs {name}` shows why)",
               "failed (see `dvc queue logs {name}`)"),
}


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
        if not name.strip():  # git would read an empty name as HEAD, shown under a blank label
            raise UserError(f"a run's name is empty ({name!r}): give a git revision (HEAD~1, a tag, a branch), an "
                            "experiment name from `dvc exp show`, or workspace")
        try:
            rev = resolve_rev(self.repo.scm, name)
        except SCMError as exc:
            if "ambiguous" in str(exc):  # an experiment name used from two baselines
                raise UserError(f"'{name}' names experiments from several commits: give the commit that "
                                "`dvc exp show --all-commits` lists for the one you mean") from None
            rev = None
        # A queued, running or failed experiment has no commit of its own, only the stash DVC queued it from
        # (named by its commit in `dvc exp show`): that holds the workspace's results at the time, not the
        # experiment's. Looked up only for names git does not know and for commit ids: other runs never read
        # the queue.
        if rev is None or self.repo.scm.is_sha(name):
            for queued_name, (state, stash_rev, _) in self.without_results.items():
                if (rev is None and name == queued_name) or rev == stash_rev:
                    raise UserError(f"'{name}' {NO_RESULTS[state][0].format(name=queued_name)}")
        if rev is None:
            raise UserError(f"unknown revision or experiment '{name}': give a git revision (HEAD~1, a tag, "
                            "a branch), an experiment name from `dvc exp show`, or workspace")
        kind = self.object_kind(rev)
        if kind != "commit":  # HEAD^{tree}, HEAD:README.md: git objects that hold no run
            what = {"tree": "a folder (git tree)", "blob": "a file (git blob)"}.get(kind, f"a git {kind}")
            raise UserError(f"'{name}' names {what}, not a commit: a run is a commit (HEAD~1, a tag, a branch), "
                            "an experiment name from `dvc exp show`, or workspace")
        return rev

    def object_kind(self, rev: str) -> str:
        """'commit', 'tree', 'blob' or 'tag': what the git object `rev` is (git resolves a tag to its commit)."""
        return type(self.repo.scm.pygit2.repo[rev]).__name__.lower()

    @cached_property
    def without_results(self) -> dict[str, tuple[str, str, str]]:
        """{name: (state, stash commit, baseline commit)} of the queued experiments that have no results, as
        `dvc queue status` and `dvc exp show` list them: queued, running, failed."""
        from dvc.exceptions import DvcException

        queue = self.repo.experiments.celery_queue
        found: dict[str, tuple[str, str, str]] = {}
        try:
            for state, in_state in (("running", queue.iter_active()), ("queued", queue.iter_queued()),
                                   ("failed", (entry for entry, _ in queue.iter_failed()))):
                for entry in in_state:
                    found.setdefault(entry.name or entry.stash_rev[:7], (state, entry.stash_rev, entry.baseline_rev))
        except DvcException as exc:  # a queue entry whose result DVC lost: `dvc queue status` fails on it too
            raise UserError(f"cannot read DVC's experiment queue ({first_line(exc)}); `dvc queue status` shows "
                            "it") from None
        return found

    def unfinished(self, baseline: str = "HEAD") -> list[dict]:
        """The experiments from `baseline` that `dvc exp show` lists with no results (queued, running, failed),
        each as left out: {"name", "rev" (the stash commit dvc exp show lists), "reason"}."""
        base = self.resolve(baseline)
        return [{"name": name, "rev": stash_rev, "reason": NO_RESULTS[state][1].format(name=name)}
                for name, (state, stash_rev, baseline_rev) in sorted(self.without_results.items())
                if baseline_rev == base]

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
        lock = read_yaml(self.read_file(rev, LOCK), LOCK, where)
        recorded = lock_md5(lock, PREDICTIONS)
        if recorded is None:
            raise Unreadable(where, f"has a {LOCK} that records no {PREDICTIONS}; run `dvc repro` and commit {LOCK}")
        if hashlib.md5(raw).hexdigest() != recorded:
            raise Unreadable(where, f"has a {PREDICTIONS} that differs from the file {LOCK} records (edited by "
                                    "hand?); compare reads only predictions written by `dvc repro`")
        actual, predicted, images = read_predictions(raw, where)
        params = flatten(read_yaml(self.read_file(rev, PARAMS), PARAMS, where))
        # The params shown beside a run's results must be the ones that made them: params.yaml edited after
        # `dvc repro` (in the workspace, or committed so) holds others.
        made = made_with(lock)
        differ = [key for key, value in made.items() if params.get(key, ABSENT) != value]
        if differ:
            shown = [f"{key} {show(params.get(key, ABSENT))} in {PARAMS}, {show(made[key])} in {LOCK}"
                     for key in differ]
            raise Unreadable(where, f"has a {PARAMS} that differs from the params its results were made with "
                                    f"({listed(shown)}); run `dvc repro` to make results with them"
                                    + ("" if rev is None else " and commit them"))
        return Run(name, rev, actual, predicted, images, params)

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
    """A YAML file of the run as a mapping ({} when absent); a damaged one is Unreadable. Read as DVC reads
    and writes params.yaml and dvc.lock (stages.params.read_params_file: YAML 1.2, so 1e-05 is a float)."""
    from ruamel.yaml import YAML, YAMLError

    try:
        tree = YAML(typ="safe", pure=True).load(raw) if raw else {}
    except YAMLError as exc:
        raise Unreadable(where, f"has a {path} that is not valid YAML ({first_line(exc)})") from None
    if not isinstance(tree, dict | None):
        raise Unreadable(where, f"has a {path} that is not a YAML mapping")
    return tree or {}


def lock_stages(lock: dict) -> dict[str, dict]:
    """dvc.lock's (parsed) stages, each a mapping; anything else in a damaged file is skipped."""
    stages = lock.get("stages") if isinstance(lock.get("stages"), dict) else {}
    return {name: stage for name, stage in stages.items() if isinstance(stage, dict)}


def entries(stage: dict, kind: str) -> list[dict]:
    """A locked stage's deps or outs: [{"path", "md5", ...}]."""
    found = stage.get(kind)
    return [entry for entry in found if isinstance(entry, dict)] if isinstance(found, list) else []


def producer(lock: dict, path: str, md5: str | None = None) -> str | None:
    """The stage dvc.lock records as writing the out `path` (with that md5, when given), or None."""
    for name, stage in lock_stages(lock).items():
        for out in entries(stage, "outs"):
            if out.get("path") == path and (md5 is None or out.get("md5") == md5):
                return name
    return None


def lock_md5(lock: dict, path: str) -> str | None:
    """The md5 dvc.lock (parsed) records for the out `path`, or None."""
    stage = producer(lock, path)
    outs = entries(lock_stages(lock)[stage], "outs") if stage else []
    return next((out.get("md5") for out in outs if out.get("path") == path), None)


def made_with(lock: dict) -> dict:
    """The params.yaml values the predictions were made with, as dvc.lock records them: the params of the
    stage that wrote them (evaluate) at its last run, and of each stage whose out it read (train's weights,
    prepare-data's data) as that stage last wrote it (one rerun since made other files, so its params say
    nothing of these results). Flattened to dotted keys; {} when the lock records none.

    Only the stages evaluate read from: check-params, further up, lists every section, analyze's too."""
    stages, evaluate = lock_stages(lock), producer(lock, PREDICTIONS)
    if evaluate is None:
        return {}
    found = {}
    read = [producer(lock, dep["path"], dep["md5"]) for dep in entries(stages[evaluate], "deps")
            if dep.get("path") and dep.get("md5")]
    for name in [*read, evaluate]:  # evaluate's own last, so that its values win
        recorded = stages[name].get("params") if name else None
        if isinstance(recorded, dict) and isinstance(recorded.get(PARAMS), dict):
            found.update(flatten(recorded[PARAMS]))
    return found


def show(value) -> str:
    return "absent" if value is ABSENT else show_in_error(value)


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
