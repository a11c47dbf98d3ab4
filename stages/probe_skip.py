"""Why the probe stage times nothing, where that can be told without importing torch.

On a machine with no GPU driver (the usual CPU-only laptop or CI runner) and no CPU DDP probe asked
for, the answer is known from params.yaml and the machine alone; importing torch (and the training
core) only to write "nothing to compare" cost the stage 1.6 s of every `dvc repro`
(benchmarks/bench_fixed_costs.py). Where a driver is there, stages/probe.py asks torch how many GPUs
it sees, with the same words from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import write_json
from .params import Params

PROBE_OFF = "`analyze.probe` is false, so no training steps were timed; set it to true to measure scaling."


def nothing_to_compare(n_gpus: int, with_ddp: bool) -> str | None:
    """Why the probe would time one device alone (with nothing to compare it with), or None."""
    if n_gpus >= 2 or (n_gpus == 0 and with_ddp):
        return None
    only = "one GPU is visible" if n_gpus == 1 else "no GPU is visible, only the CPU"
    on_cpu = "" if n_gpus == 1 else ", or 1 against 2 CPU processes with `analyze.probe_ddp: true`"
    return (f"{only}, so there is nothing to compare one device with (the train stage's samples/s is its rate); "
            f"the probe times 1, 2, 4, ... GPUs on a machine with 2 or more{on_cpu}.")


def no_gpu_driver() -> bool:
    """True where CUDA cannot see a GPU: no NVIDIA driver (/proc/driver/nvidia) and no ROCm one
    (/dev/kfd, which torch's ROCm builds reach through torch.cuda), or CUDA_VISIBLE_DEVICES hides all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not Path("/proc/driver/nvidia").exists() and not Path("/dev/kfd").exists()


def reason_without_torch(p: Params) -> str | None:
    """Why the probe times nothing, when params.yaml and the machine say so without torch; else None."""
    if not p.analyze.probe:
        return PROBE_OFF
    return nothing_to_compare(0, p.analyze.probe_ddp) if no_gpu_driver() else None


def write_not_run(out_path: Path, reason: str, gpus: list[dict]) -> None:
    """report/scaling.json for a probe that timed nothing: why, for the report."""
    write_json(out_path, {"probe": "off" if reason == PROBE_OFF else "nothing to compare", "reason": reason,
                          "rows": [], "gpus": gpus})
    print(f"scaling probe not run: {reason}")
