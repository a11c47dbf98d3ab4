"""A real browser for the tests: Debian's Chromium, headless, with every host lookup refused.

`drawn_vega_plots(page)` opens an HTML file, lets its scripts run, and counts the vega views
that were drawn: vega-embed renders each into an <svg> or <canvas> of class "marks", and a
view whose libraries did not load leaves an empty <div>.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: a page that needs a CDN gets nothing
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "Chromium is not installed: `apt-get install -y chromium` (.ci/run installs it)"
        if os.environ.get("CI"):  # CI must check the pages; a developer's machine may lack a browser
            pytest.fail(message)
        pytest.skip(message)
    return found


def rendered_dom(page: Path, budget_ms: int = 20000) -> str:
    """The page's DOM once its scripts have run (virtual time, so a page that waits forever still ends)."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


class MarksCounter(HTMLParser):
    def __init__(self):
        super().__init__()
        self.marks = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("svg", "canvas") and "marks" in (dict(attrs).get("class") or "").split():
            self.marks += 1


def drawn_vega_plots(page: Path) -> int:
    counter = MarksCounter()
    counter.feed(rendered_dom(page))
    return counter.marks
