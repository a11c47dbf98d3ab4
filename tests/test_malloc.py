"""stages/malloc.py: glibc keeps the large blocks torch frees, so a batch's tensors do not page-fault anew.

Counted in page faults (getrusage's minor faults), not time: each test process allocates and frees
a 64 MB tensor twenty times, as a forward pass does with its activations batch after batch, and
counts the faults of the last ten (the heap settles in the first few: torch asks for aligned blocks,
which glibc carves from a slightly larger free one, so the first freed blocks need a neighbour).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from .helpers import ROOT

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                                reason="glibc's malloc only")

ALLOCATE_TEN_TIMES = """
import resource, sys, torch
from stages.malloc import keep_freed_memory
done = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(1).add_(1)  # torch's own first-use allocations, before counting
for i in range(20):
    if i == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)  # 64 MB, as a batch's activations
    t.fill_(1.0)
    del t
print(done, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", ALLOCATE_TEN_TIMES, mode], env={**clean, **env,
                         "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_instead_of_mapped_again():
    _, default_faults = page_faults("default")
    done, kept_faults = page_faults("keep")
    assert done == "True"
    # 64 MB is 16,384 pages: glibc's default maps (and faults in) the block again every time.
    assert default_faults > 5 * 16_384
    assert kept_faults < 16_384, f"{kept_faults} page faults for ten 64 MB tensors: the block is not reused"


def test_the_users_own_malloc_settings_stay():
    done, faults = page_faults("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert done == "False"
    assert faults > 5 * 16_384  # their setting (trim at 128 KB) is what ran
