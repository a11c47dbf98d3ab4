"""Shared fixtures: a prepared copy of the digits."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from .helpers import run_stages, write_params

# The Ctrl-C tests send SIGINT to the commands they start, which inherit an ignored SIGINT from this process. A
# shell starts a background job (`.ci/run &`) with SIGINT ignored: Python's own handler back, so that they see it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """The digits, prepared once per test session with the default data params."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    params = write_params(out.parent / "params.yaml")
    run_stages("prepare-data", "--params", str(params), "--out", str(out))
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every end-to-end run of the real dvc is slow: `pytest -m "not slow"` (the fast lane) leaves them out."""
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(pytest.mark.slow)
