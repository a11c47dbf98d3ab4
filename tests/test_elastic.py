"""DDP under torch's elastic launcher, with real processes (gloo on the CPU): the self-launched
path and torchrun, a rank killed mid-run and the group restarted from the last checkpoint,
the one-line failure report, two torchrun agents forming one group, and the join timeout.

Every run here trains the same small job (2 ranks, 6 epochs), so each must end with the
bytes of one uninterrupted 2-rank run. OMP_NUM_THREADS=1 everywhere: float sums can depend on
the thread count, and the runs must match on any machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.core.distributed import free_port

from .helpers import ROOT, rank_process, write_params

EPOCHS = 6
DDP = {"strategy": "ddp", "accelerator": "cpu", "devices": 2, "epochs": EPOCHS}
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def train_args(out: Path, params: Path, data: Path) -> list[str]:
    return ["-m", "stages", "train", "--params", str(params), "--data", str(data),
            "--model", str(out / "model.safetensors"), "--metrics", str(out / "metrics"),
            "--checkpoint", str(out / "checkpoint.safetensors")]


def start(cmd: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_rank_after_epoch(proc: subprocess.Popen, rank: int, epoch: int) -> tuple[list[str], int]:
    """Read the run's output; when rank 0 reports `epoch`, SIGKILL rank `rank` (a child of the
    launcher we started, found by its RANK, never by name). Returns all output lines and the pid."""
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if killed is None and line.startswith(f"epoch {epoch}/"):
            killed = rank_process(proc.pid, rank)
            os.kill(killed, signal.SIGKILL)
    proc.wait(timeout=300)
    assert killed is not None, "\n".join(lines)
    return lines, killed


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared_digits) -> bytes:
    """The weights of an uninterrupted 2-rank run, self-launched."""
    tmp = tmp_path_factory.mktemp("reference")
    params = write_params(tmp / "params.yaml", train=DDP)
    proc = subprocess.run([sys.executable, *train_args(tmp, params, prepared_digits)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"epoch {EPOCHS}/{EPOCHS}" in proc.stdout
    return (tmp / "model.safetensors").read_bytes()


def check_restarted(lines: list[str], killed: int, out: Path, reference: bytes, how: str) -> None:
    text = "\n".join(lines)
    [death] = [line for line in lines if line.startswith(f"ddp rank 1 (pid {killed}) ")]
    assert how in death and re.search(r"it had [\d,]+ MiB resident \(peak [\d,]+ MiB\) when last sampled", death)
    [restart] = [line for line in lines if line.startswith("restarted after")]
    resumed = int(re.fullmatch(r"restarted after rank 1 died \(attempt 1 of 1\); resuming after epoch (\d)",
                               restart).group(1))
    before = lines[: lines.index(restart)]
    # the checkpoint it resumed from is the last epoch rank 0 finished before the group went down
    assert 1 <= resumed < EPOCHS and f"epoch {resumed}/{EPOCHS}" in "\n".join(before)
    after = lines[lines.index(restart):]
    assert [int(m) for m in re.findall(rf"^epoch (\d)/{EPOCHS}", "\n".join(after), re.M)] == \
        list(range(resumed + 1, EPOCHS + 1)), text
    assert (out / "model.safetensors").read_bytes() == reference, text
    run = json.loads((out / "metrics" / "run.json").read_text())
    assert run["restarts"] == 1 and run["resumed_from_epoch"] == resumed


@pytest.mark.slow
def test_self_launched_run_survives_a_killed_rank(tmp_path, prepared_digits, reference):
    params = write_params(tmp_path / "params.yaml", train=dict(DDP, max_restarts=1))
    proc = start([sys.executable, *train_args(tmp_path, params, prepared_digits)])
    lines, killed = kill_rank_after_epoch(proc, 1, 2)
    assert proc.returncode == 0, "\n".join(lines)
    check_restarted(lines, killed, tmp_path, reference,
                    "was killed by signal 9 (SIGKILL, as the kernel's out-of-memory killer does)")
    run = json.loads((tmp_path / "metrics" / "run.json").read_text())
    assert run["launcher"] == "stages (torch elastic)"


@pytest.mark.slow
def test_torchrun_job_survives_a_killed_rank(tmp_path, prepared_digits, reference):
    """torchrun started by hand, without TORCH_DISABLE_SHARE_RDZV_TCP_STORE: the ranks keep the
    attempts apart in torchrun's shared store themselves (pytorch/pytorch#135712)."""
    params = write_params(tmp_path / "params.yaml", train=DDP)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "1", "--log-dir", str(tmp_path / "torchrun")]
    env = {k: v for k, v in ENV.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    proc = subprocess.Popen([*torchrun, *train_args(tmp_path, params, prepared_digits)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = kill_rank_after_epoch(proc, 1, 2)
    assert proc.returncode == 0, "\n".join(lines)
    # A torchrun rank cannot see its sibling's exit status; it knows the rank left no word.
    check_restarted(lines, killed, tmp_path, reference, "died without a word")
    run = json.loads((tmp_path / "metrics" / "run.json").read_text())
    assert run["launcher"] == "torchrun"


def test_a_killed_rank_without_restarts_is_one_line(tmp_path, prepared_digits):
    params = write_params(tmp_path / "params.yaml", train=DDP)
    proc = start([sys.executable, *train_args(tmp_path, params, prepared_digits)])
    lines, killed = kill_rank_after_epoch(proc, 1, 1)
    assert proc.returncode == 2
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), "\n".join(lines)
    assert errors[0].startswith(f"error: ddp rank 1 (pid {killed}) was killed by signal 9 (SIGKILL, as the "
                                "kernel's out-of-memory killer does); it had ")
    assert "lower train.batch_size" in errors[0] and "train.max_restarts: 1" in errors[0]
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
def test_two_torchrun_agents_make_one_group(tmp_path, prepared_digits, reference):
    """The two-machine recipe of docs/gpus-and-clusters.md on loopback: two agents, --nnodes 2, one rank each."""
    params = write_params(tmp_path / "params.yaml", train=DDP)
    port = free_port()
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-{os.getpid()}",
              "--max-restarts", "0", "--log-dir", str(tmp_path / "torchrun")]
    agents = [start([*common, "--rdzv-conf", f"is_host={host}", *train_args(tmp_path, params, prepared_digits)],
                    TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1") for host in (1, 0)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    assert "strategy ddp (2 processes)" in outputs[0] and f"epoch {EPOCHS}/{EPOCHS}" in outputs[0]
    assert "epoch 1/" not in outputs[1]  # only rank 0 logs
    assert (tmp_path / "model.safetensors").read_bytes() == reference


def test_a_rank_that_never_arrives_is_named(tmp_path, prepared_digits):
    """Rank 0 of a 2-rank group whose rank 1 never starts: one line after train.dist_timeout."""
    params = write_params(tmp_path / "params.yaml", train=dict(DDP, dist_timeout=3))
    env = dict(ENV, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, *train_args(tmp_path, params, prepared_digits)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and errors[0].startswith(
        "error: ddp rank(s) 1 of 2 did not arrive within 3 s (train.dist_timeout"), proc.stderr
    assert time.monotonic() - started < 60


def test_launching_in_this_process_leaves_its_signal_handlers_as_they_were():
    """torch's agent makes SIGTERM raise in the launching process and never restores it: a caller that
    goes on (the probe stage, a test) and the processes it forks later must not inherit that."""
    from stages.core.launch import launch_ranks

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    launch_ranks("platform", [], 1, 0, 60)  # `python -m platform` as one rank: prints and exits 0
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_decoders_die_of_sigterm_whatever_handler_they_inherit():
    """prepare-data stops its forked decoders with SIGTERM; a handler that raises (torch's agent's) would be
    caught as an unreadable image, and the decoder would never exit."""
    from stages.fill import ignore_interrupts

    def raising(signum, frame):
        raise RuntimeError("inherited")

    previous = signal.signal(signal.SIGTERM, raising)
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        ignore_interrupts()  # what each decoder runs first
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def test_watchdog_ends_a_call_stuck_in_cpp():
    """gloo's connect ignores the group's timeout; the watchdog ends the process with one line."""
    code = ("import time; from stages.core.distributed import watchdog\n"
            "with watchdog(0.5, 'creating the gloo process group took too long'):\n    time.sleep(60)")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and time.monotonic() - started < 30
    assert proc.stderr.strip() == "error: creating the gloo process group took too long"


@pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                    reason="needs root and Debian's slurm-wlm (apt-get install slurm-wlm)")
@pytest.mark.slow
def test_slurm_job_trains_under_srun_torchrun(tmp_path, prepared_digits, reference):
    """examples/slurm/train.sbatch on a real one-node Slurm (slurmctld, slurmd and munged started
    here by examples/slurm/one-node-cluster.sh): two torchrun agents as two Slurm tasks."""
    folder = tmp_path / "slurm"
    log = tmp_path / "cluster.log"
    env = dict(os.environ, SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()))
    with open(log, "w") as out:
        cluster = subprocess.Popen([str(ROOT / "examples" / "slurm" / "one-node-cluster.sh"), str(folder)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    job = None
    try:
        deadline = time.monotonic() + 90
        while "slurm is up" not in log.read_text():
            assert cluster.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        project = tmp_path / "project"
        (project / "data").mkdir(parents=True)
        (project / "data" / "prepared").symlink_to(prepared_digits)
        write_params(project / "params.yaml", train=DDP)
        (tmp_path / "tmp").mkdir()  # torchrun's logs and the rank records go there, not to /tmp
        job_env = dict(ENV, SLURM_CONF=str(folder / "slurm.conf"), NPROC_PER_NODE="1", TMPDIR=str(tmp_path / "tmp"))
        submit = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
                                 str(ROOT / "examples" / "slurm" / "train.sbatch")],
                                cwd=project, env=job_env, capture_output=True, text=True, timeout=60)
        assert submit.returncode == 0, submit.stderr
        job = submit.stdout.strip().split(";")[0]
        state = wait_for_job(job, job_env, timeout=300)  # sooner than `sbatch --wait`, which polls slowly
        text = (project / f"slurm-{job}.out").read_text()
        assert state == "COMPLETED", state + "\n" + text
        assert "2 agent(s) on [" in text and "1 rank(s) each" in text and f"epoch {EPOCHS}/{EPOCHS}" in text
        assert (project / "models" / "model.safetensors").read_bytes() == reference
    finally:
        if job is not None:  # a job still running must not outlive its cluster
            subprocess.run(["scancel", job], env=dict(os.environ, SLURM_CONF=str(folder / "slurm.conf")),
                           capture_output=True, timeout=30)
        cluster.terminate()  # the script stops the daemons it started
        cluster.wait(timeout=60)


def wait_for_job(job: str, env: dict, timeout: float) -> str:
    """A Slurm job's final state (COMPLETED, FAILED, ...), polled twice a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True)
        state = re.search(r"JobState=(\w+)", shown.stdout)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state.group(1)
        time.sleep(0.5)
    raise AssertionError(f"Slurm job {job} did not end within {timeout:.0f} s")
