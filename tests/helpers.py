"""Helpers for the tests: the project root, params files, running `python -m stages`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from stages.params import read_params_file

ROOT = Path(__file__).resolve().parents[1]


def write_params(path: Path, **sections) -> Path:
    """params.yaml from the project's defaults with `sections` merged in, e.g. train={"epochs": 1}."""
    params = read_params_file(ROOT / "params.yaml")  # as the stages read it (YAML 1.2, as DVC does)
    for name, values in sections.items():
        params[name].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stages(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m stages ...` in a subprocess, the way dvc runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"stages {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def descendants(pid: int) -> list[int]:
    """The ids of every process below `pid` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> list[str]:
    """A process's argv ([] once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def stage_processes(pid: int, command: str) -> list[int]:
    """The `python -m stages <command>` processes started below `pid` (not the shell that started them)."""
    return [p for p in descendants(pid) if command_line(p)[1:4] == ["-m", "stages", command]]


def environment_of(pid: int) -> dict[str, str]:
    """A process's environment ({} once it has ended)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def rank_process(launcher: int, rank: int) -> int:
    """The pid of DDP rank `rank` started by the launcher process `launcher` (torchrun's agent or
    `python -m stages train`): one of its children, whose RANK says which rank it is."""
    found = [p for p in descendants(launcher)
             if parent_of(p) == launcher and environment_of(p).get("RANK") == str(rank)]
    if len(found) != 1:
        raise AssertionError(f"expected one rank {rank} started by pid {launcher}, found {found}")
    return found[0]
def train_in_process(tmp_path: Path, name: str, prepared: Path, model: dict | None = None, **train):
    """`python -m stages train` in this process (typer's CliRunner) on the CPU, with `model` and `train`
    merged into the default params: (the run's output folder, the CliRunner result)."""
    from typer.testing import CliRunner

    from stages.cli import app

    out = tmp_path / name
    params = write_params(tmp_path / f"{name}.yaml", model=model or {}, train={"accelerator": "cpu", **train})
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--data", str(prepared),
                                      "--model", str(out / "model.safetensors"), "--metrics", str(out / "metrics"),
                                      "--checkpoint", str(out / "checkpoint.safetensors")])
    return out, result


def run_summary(**changes):
    """The RunSummary (run.json) of a small one-process CPU run with `changes`: for tests of what reads it."""
    from stages.run_summary import RunSummary

    base = dict(accelerator="cpu", strategy="dp", data_parallel=False, device_ids=[], device_names=["cpu"],
                num_devices=1, world_size=1, global_batch=64, accumulate=1, per_device_batch=64, precision="fp32",
                model="small-cnn", parameters=1000, small_input_stem=None, pretrained=None,
                normalization="train split", dataset="digits", epochs=2, epochs_run=2, stopped_early=False,
                best_epoch=2, best_val_accuracy=0.9, kept="last (epoch 2)", resumed_from_epoch=None, epoch_seconds=[],
                compile=None, compile_seconds=0.0, stage_seconds=3.0, data_on_device=False, data_streamed=False,
                torch_version="2.14.1", versions={}, train_params={}, samples_per_second=3000.0, peak_memory_mb=[],
                peak_memory_kind="process max RSS per process", launcher=None, restarts=0, gpu_claim=None,
                threads=1, threads_from="train.threads", omp_wait_policy="default", history=[])
    return RunSummary(**{**base, **changes})


def error_line(result) -> str:
    """The one `error: ...` line of a CliRunner result that failed as a UserError (exit 2, no traceback)."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    return lines[0]


# models/model.safetensors from the repo's params.yaml on the CPU: its tensors are byte-identical to those
# of every release since the restructure (checked against eb6b180's file); the metadata records the
# model.* and train.* params that made it, so a new param changes this digest, not the tensors. New params
# are off by default, and the defaults must keep giving these tensors. torch 2.14.1 (requirements.lock,
# what CI installs) and 2.15.0 give the same bytes on this 2-core machine.
DEFAULT_WEIGHTS_SHA256 = "1fd163ec66be0021cf3b274d396d47d7f38ef6ad0382acf04e07a29dffaaa573"
REFERENCE_TORCH = ("2.14.1", "2.15.0")


def skip_unless_reference_torch() -> None:
    import pytest
    import torch

    if torch.__version__.split("+")[0] not in REFERENCE_TORCH:
        pytest.skip(f"the reference digest was made with torch {' and '.join(REFERENCE_TORCH)}, "
                    f"this is {torch.__version__}")


def start_queue(repo: Path, env: dict, *args: str) -> None:
    """`dvc queue start [args]`. Its workers are daemons that keep the stdout and stderr they are given, so
    they get a file, not a pipe: a test that waited for a pipe to close hung when one of DVC's temporary
    workers stayed on, idle, after its queue was done (DVC 3.67, seen once in CI)."""
    log = repo.parent / f"{repo.name}-queue.log"
    with open(log, "a") as out:
        proc = subprocess.run(["dvc", "queue", "start", *args], cwd=repo, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, f"dvc queue start failed:\n{log.read_text()[-3000:]}"


def stop_queue(repo: Path, env: dict) -> None:
    """Stop the queue's workers, so none outlives the test (see start_queue)."""
    subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=120)
