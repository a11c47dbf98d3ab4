"""The README and docs/ hold together: every relative link reaches a file and, with #anchor, a heading.

Anchors follow GitHub's rule for headings (lower case; punctuation other than `-` and `_` dropped;
spaces to `-`; a repeated heading gets `-1`, `-2`, ...). A section that moves to another page breaks
its old links, and the code's references such as (docs/reliability.md, "When a stage fails"); this
test names each one. README stays short enough that its first screen is the one a newcomer needs.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .helpers import ROOT

PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# The code points at a section as (README, "Title"), (docs/page.md, "Title") or (benchmarks/README.md, "Title");
# a comment may go on after the comma on its next line.
SECTION_REF = re.compile(r"\((README|README\.md|docs/[\w-]+\.md|benchmarks/README\.md),\s*(?:#\s*)?\"([^\"]+)\"\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in FENCE.sub("", page.read_text()).splitlines()
            if re.match(r"#{1,6} ", line)]


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in headings(page):
        base = slug(heading)
        found.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return found


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # code shows brackets, not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_slug_follows_githubs_rule():
    assert slug("Why the checkpoint is not a DVC output") == "why-the-checkpoint-is-not-a-dvc-output"
    assert slug("`bench_predict.py`") == "bench_predictpy"
    assert slug("Sharing: remotes, clones, experiments and the model") == \
        "sharing-remotes-clones-experiments-and-the-model"
    assert slug("Is the difference real?") == "is-the-difference-real"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_codes_references_to_doc_sections_name_headings_that_exist():
    files = [ROOT / "dvc.yaml", *(ROOT / "stages").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py")]
    missing = []
    for file in files:
        if file == Path(__file__):
            continue  # its docstring's examples
        for page, title in SECTION_REF.findall(file.read_text()):
            target = ROOT / ("README.md" if page == "README" else page)
            if not target.is_file() or title not in headings(target):
                missing.append(f'{file.relative_to(ROOT)}: ({page}, "{title}")')
    assert not missing, "sections that do not exist: " + "; ".join(missing)


def test_readme_is_short_and_its_first_screen_sets_up_runs_and_tests():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail to docs/"
    first_screen = "\n".join(lines[:30])
    for command in ("pip install -r requirements.lock -e .", "dvc repro", 'pytest -m "not slow"', "\npytest "):
        assert command in first_screen, f"README's first screen lacks {command.strip()!r}"


def test_what_the_readme_writes_into_the_repo_root_is_git_ignored(tmp_path):
    """README's commands that write a file into the repo root (`> grid.csv`, `--out predictions.csv`) and predict's
    default --out: README's `git add -A` must not commit them. Evaluate's predictions.csv stays tracked."""
    from stages import cli

    readme = "\n".join(FENCE.findall((ROOT / "README.md").read_text()))
    written = set(re.findall(r"(?:> |--out )([\w.-]+\.csv)\b", readme))
    written.add(str(inspect.signature(cli.predict).parameters["out"].default))
    assert {"grid.csv", "predictions.csv"} <= written, written
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    tracked = "metrics/evaluate/predictions.csv"
    for name in [*written, tracked]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x\n")
    check = subprocess.run(["git", "check-ignore", *sorted(written), tracked], cwd=tmp_path, capture_output=True,
                           text=True)
    assert set(check.stdout.split()) == written, check.stdout


def test_advice_to_rerun_one_stage_forces_that_stage_alone():
    """`dvc repro -f <stage>` forces every stage before it too (train: a new training run); the advice to
    rerun one stage is `dvc repro -f -s <stage>`, in the docs and in every message the code prints."""
    texts = [*PAGES, *sorted((ROOT / "stages").rglob("*.py"))]
    # After -f: spaces, a line break, or the end of one string literal and the start of the next.
    forced_stage = re.compile(r'repro\s+(?:-f|--force)(?:\s|"\s*")+(?!-s\b|--single-item\b)[\w-]+')
    forced = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in texts
              for match in forced_stage.finditer(path.read_text())]
    assert forced == []
