"""Your own data under data/raw with the real git and dvc, as docs/own-data.md says to keep and track it.

The tests share one repo and run in file order, as a user's session would: the digits pipeline
prepared and committed, a photo folder added beside it and tracked with that page's own commands,
then a teammate's clone of it all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from .helpers import ROOT
from .test_pipeline_e2e import commit, new_project, ran, sh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


OWN_DATA = ROOT / "docs" / "own-data.md"


def docs_block(containing: str) -> str:
    """The one ```bash block of docs/own-data.md that contains `containing`."""
    blocks = re.findall(r"```bash\n(.*?)```", OWN_DATA.read_text(), re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"{len(found)} blocks of {OWN_DATA.name} contain {containing!r}"
    return found[0]


def write_photos(folder: Path) -> None:
    for name, colour in (("cat", (200, 120, 40)), ("dog", (40, 90, 200))):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40 + i, 30), colour).save(folder / name / f"{name}{i}.jpg")


def prepare_status(repo: Path) -> dict:
    """`dvc status prepare-data` (and check-params before it) as JSON: {} when both are up to date."""
    return json.loads(sh(repo, "dvc", "status", "prepare-data", "--json").stdout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The project with the digits prepared and committed, and a local-folder DVC remote."""
    repo = new_project(tmp_path_factory.mktemp("data-tracking") / "project")
    sh(repo, "dvc", "remote", "add", "-d", "store", str(repo.parent / "dvc-store"))
    assert ran(sh(repo, "dvc", "repro", "prepare-data").stdout) == ["check-params", "prepare-data"]
    commit(repo, "digits prepared")
    return repo


def test_the_docs_commands_track_a_photo_folder_with_dvc(repo):
    write_photos(repo / "data" / "raw" / "photos")  # where docs/own-data.md suggests keeping them
    sh(repo, "bash", "-euo", "pipefail", "-c", docs_block("dvc add data/raw/"))
    tracked = sh(repo, "git", "ls-files", "data/raw").stdout.split()
    assert "data/raw/photos.dvc" in tracked
    assert not [path for path in tracked if path.startswith("data/raw/photos/")]  # the images are DVC's, not git's
    assert sh(repo, "git", "status", "--porcelain").stdout == ""  # the page's commands committed everything


def test_a_photo_folder_beside_the_digits_leaves_their_pipeline_up_to_date(repo):
    assert prepare_status(repo) == {}
    assert ran(sh(repo, "dvc", "repro", "prepare-data").stdout) == []
    # A teammate: a fresh clone at that commit plus `dvc pull` is up to date as well.
    sh(repo, "dvc", "push")
    clone = repo.parent / "clone"
    sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "pull", "prepare-data", "data/raw/photos.dvc")  # the stages run so far, and the photos
    assert (clone / "data" / "raw" / "photos" / "cat" / "cat0.jpg").is_file()
    assert prepare_status(clone) == {}
    assert ran(sh(clone, "dvc", "repro", "prepare-data").stdout) == []
