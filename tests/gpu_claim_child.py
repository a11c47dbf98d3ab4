"""A run that claims GPUs from a patched list of fake ones, for tests/test_gpu_claims.py.

`python tests/gpu_claim_child.py GPUS COUNT`: pretends this machine has GPUS CUDA devices (with
fixed UUIDs; GPUS = 0: the real ones), claims COUNT of them with the real fcntl locks, prints
`claimed [ids]`, and holds them until its stdin closes (or it is killed).
"""

from __future__ import annotations

import sys
import types
import uuid

import torch

from stages.core.gpu_claims import claim_gpus

gpus, count = int(sys.argv[1]), int(sys.argv[2])
if gpus:
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: gpus
    torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(uuid=uuid.UUID(int=1000 + i), name=f"fake {i}")

claim = claim_gpus(count, log=lambda message: print(message, flush=True), poll_seconds=0.1)
print(f"claimed {claim.ids}", flush=True)
sys.stdin.read()
claim.release()
