"""The command line: `python -m stages <command>`, one command per DVC stage.

Commands are thin: load and validate params, call the stage function. Heavy
imports (torch, DVCLive, matplotlib) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError
from .malloc import keep_freed_memory
from .usage_errors import OneLineUsageErrors

# MKL (torch's CPU BLAS here) may use fewer threads than asked when the machine is busy, which changes
# the order of its sums and so the last bits of a result: CPU runs would then depend on the load.
# Read when MKL starts, before any command imports torch; the ranks a command starts inherit it.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")


def cores_taken_by_others(cores: int, samples: int = 4) -> bool:
    """Whether other work keeps all `cores` busy now: the fewest threads running or ready to run besides
    this one, over a few samples 5 ms apart of /proc/loadavg's fourth field (an instant count). Not the
    load average: `dvc repro` runs stages back to back, and the 1-minute average still counts the stage
    that just ended, which made the next one wait passively on a quiet machine (its epochs 2.9x slower)."""
    try:
        fewest = None
        for i in range(samples):
            if i:
                time.sleep(0.005)
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1  # less this thread
            fewest = running if fewest is None else min(fewest, running)
        return fewest >= cores
    except (OSError, ValueError, IndexError):  # no /proc (macOS): OpenMP's default
        return False


def choose_omp_wait_policy() -> None:
    """GNU OpenMP's idle threads spin before they sleep. On a quiet machine that is fastest (passive
    waiting made the default digits run 2.3x slower here); beside busy processes each spinning thread
    takes a core from a thread with work, and 2 threads ran 3-90x slower than 1 (benchmarks/
    bench_threads.py). The wait policy changes speed only, never a result (same threads, same sums), so
    it follows the machine when a command starts: passive while other work takes every core this process
    may use. OpenMP reads it when torch loads it, so before a command imports torch (not for --help);
    the ranks a command starts inherit it."""
    if "OMP_WAIT_POLICY" not in os.environ and hasattr(os, "sched_getaffinity"):
        if cores_taken_by_others(len(os.sched_getaffinity(0))):
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

app = typer.Typer(cls=OneLineUsageErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Stages of the image-classification pipeline. Run them all with `dvc repro`.")

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file to read.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _run(fn, *args) -> None:
    """Run a stage; a UserError becomes one line on stderr and exit code 2, never a traceback."""
    choose_omp_wait_policy()
    keep_freed_memory()
    try:
        fn(*args)
    except UserError as exc:
        from .exp_workspace import kept_values_hint

        raise _fail(f"{exc}{kept_values_hint()}") from None
    except KeyboardInterrupt:
        raise _fail("interrupted") from None


@app.command("check-params")
def check_params(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Marker file written when the params are valid.")] = Path("data/params.ok"),
) -> None:
    """Validate every section of the params file; the first stage of the pipeline.

    DVC deletes a stage's old outputs just before it runs the stage, so a bad value must be
    refused here, before any other stage starts, for the last good artifacts to survive.
    """

    def stage() -> None:
        from .check_params import check_params as run
        from .check_params import show_changes_dvc_hid
        from .io import write_text
        from .params import load_params

        try:
            notes = run(load_params(params))
        finally:
            show_changes_dvc_hid()
        for note in notes:
            typer.echo(note)
        # Constant content: a valid change of params does not look like a change to later stages.
        write_text(out, "ok\n")
        typer.echo(f"{params}: ok")

    _run(stage)


@app.command("params")
def show_params(
    from_lock: Annotated[bool, typer.Option(
        "--from-lock", help="Each key at the value dvc.lock records, the one the workspace's outputs were made "
        "with, instead of its default: `python -m stages params --from-lock > params.yaml` puts params.yaml "
        "back after a refused `dvc exp run -S`.")] = False,
) -> None:
    """Print every params.yaml key at its default, with what it does: the repo's params.yaml is this."""

    def command() -> None:
        from .params import default_params_yaml, params_yaml

        if from_lock:
            from .exp_workspace import locked_params

            typer.echo(params_yaml(locked_params(Path("dvc.lock"))), nl=False)
        else:
            typer.echo(default_params_yaml(), nl=False)

    _run(command)


@app.command("models")
def show_models() -> None:
    """List the names model.name takes, each with the torchvision weights model.weights may name."""
    from torchvision import models

    from .params import BUILT_IN_MODELS, SMALL_STEM_BELOW, is_resnet, torchvision_model_names

    typer.echo("model.name           model.weights (besides none and a state-dict file; DEFAULT is the best)")
    for name in BUILT_IN_MODELS:
        typer.echo(f"{name:<20} (the project's own; no torchvision weights)")
    for name in torchvision_model_names():
        stem = f"  [small-image stem under {SMALL_STEM_BELOW} px: model.small_input_stem]" if is_resnet(name) else ""
        weights = ", ".join(w for w in models.get_model_weights(name).__members__ if w != "DEFAULT")
        typer.echo(f"{name:<20} DEFAULT, {weights}{stem}")


@app.command("prepare-data")
def prepare_data(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for the prepared splits and info.json.")] = Path("data/prepared"),
) -> None:
    """Read the dataset named by data.dataset and write seeded train/val/test splits as uint8 safetensors."""

    def stage() -> None:
        from .params import load_params
        from .prepare_data import prepare_data as run

        info = run(load_params(params).data, out)
        typer.echo(f"prepared {info['dataset']}: {info['counts']} images of shape {info['shape']}, "
                   f"{info['num_classes']} classes -> {out}")

    _run(stage)


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Folder of prepared data.")] = Path("data/prepared"),
    model: Annotated[Path, typer.Option(help="Where to write the weights.")] = Path("models/model.safetensors"),
    metrics: Annotated[Path, typer.Option(help="DVCLive folder for metrics and curves.")] = Path("metrics/train"),
    checkpoint: Annotated[Path, typer.Option(
        help="Per-epoch checkpoint: resumed after a kill, deleted once training completes.")] = Path(
        "checkpoints/train.safetensors"),
) -> None:
    """Train the model on every visible GPU (DataParallel or DDP) or on the CPU; write weights and metrics."""

    def stage() -> None:
        from contextlib import nullcontext

        from .core.distributed import under_launcher
        from .core.run_lock import one_run_per_checkpoint
        from .params import load_params
        from .train import TrainPaths, train_stage

        p = load_params(params)
        # The command a user or DVC starts holds the lock; the DDP ranks it (or torchrun) starts do not.
        with nullcontext() if under_launcher() else one_run_per_checkpoint(checkpoint):
            train_stage(p, TrainPaths(data, model, metrics, checkpoint, params), sys.argv[1:])

    _run(stage)


@app.command()
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Folder of prepared data.")] = Path("data/prepared"),
    model: Annotated[Path, typer.Option(help="The weights to evaluate.")] = Path("models/model.safetensors"),
    out: Annotated[Path, typer.Option(help="Folder for test metrics and predictions.")] = Path("metrics/evaluate"),
) -> None:
    """Score the trained model on the test split: accuracy, loss, per-class scores, confusion data."""

    def stage() -> None:
        from .evaluate import evaluate_stage
        from .params import load_params

        evaluate_stage(model, data, out, load_params(params), params)

    _run(stage)


@app.command()
def probe(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Folder of prepared data.")] = Path("data/prepared"),
    model: Annotated[Path, typer.Option(help="The trained weights.")] = Path("models/model.safetensors"),
    run: Annotated[Path, typer.Option(help="The train stage's run.json: how training ran.")] = Path(
        "metrics/train/run.json"),
    out: Annotated[Path, typer.Option(help="The JSON file to write.")] = Path("report/scaling.json"),
) -> None:
    """Time training steps of the trained model at 1, 2, 4, ... devices (the scaling probe), or say why not."""

    def stage() -> None:
        from .params import load_params
        from .probe_skip import reason_without_torch, write_not_run

        # A probe point's DDP ranks rerun this command under a launcher (WORLD_SIZE set), with no params
        # of their own: only a command started by hand or by DVC may say, without torch, why it times nothing.
        if "WORLD_SIZE" not in os.environ:
            p = load_params(params)
            reason = reason_without_torch(p)  # e.g. a CPU-only machine
            if reason:
                write_not_run(out, reason, gpus=[])
                return
        from .core.distributed import under_launcher
        from .core.launch import launched_plan
        from .probe import probe_rank, probe_stage

        if under_launcher():  # one DDP rank of a probe point that this command started
            probe_rank(launched_plan())
            return
        probe_stage(load_params(params), params, data, model, run, out)

    _run(stage)


@app.command()
def analyze(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option(help="Folder of prepared data.")] = Path("data/prepared"),
    model: Annotated[Path, typer.Option(help="The trained weights.")] = Path("models/model.safetensors"),
    train_metrics: Annotated[Path, typer.Option(help="The train stage's DVCLive folder.")] = Path("metrics/train"),
    eval_metrics: Annotated[Path, typer.Option(help="The evaluate stage's folder.")] = Path("metrics/evaluate"),
    scaling: Annotated[Path, typer.Option(help="The probe stage's JSON file.")] = Path("report/scaling.json"),
    out: Annotated[Path, typer.Option(help="Folder for the report and its figures.")] = Path("report"),
) -> None:
    """Write the report: how well the model did and how well the devices were used."""

    def stage() -> None:
        from .analyze.stage import analyze_stage
        from .params import load_params

        analyze_stage(load_params(params), params, data, model, train_metrics, eval_metrics, scaling, out)

    _run(stage)


@app.command()
def export(
    params: ParamsOption = Path("params.yaml"),
    model: Annotated[Path, typer.Option(help="The trained weights to export.")] = Path("models/model.safetensors"),
    data: Annotated[Path, typer.Option(help="Folder of prepared data (the check runs on its test split).")] = Path(
        "data/prepared"),
    out: Annotated[Path, typer.Option(help="The ONNX file to write.")] = Path("models/model.onnx"),
) -> None:
    """Export the trained model to ONNX, checked with ONNX Runtime against PyTorch on the test split."""

    def stage() -> None:
        from .export import export_stage
        from .params import load_params

        export_stage(load_params(params), params, model, data, out)

    _run(stage)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE_OR_FOLDER", show_default=False,
                                                 help="Image files, and folders searched recursively for images.")],
    model: Annotated[Path, typer.Option(help="The trained weights (.safetensors), or their ONNX export (.onnx: "
                                        "runs with ONNX Runtime, without torch).")] = Path("models/model.safetensors"),
    out: Annotated[Path, typer.Option(help="The CSV to write: path, predicted class, probability.")] = Path(
        "predictions.csv"),
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Also list the next most likely classes, "
                                       "up to this many in all.")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 256,
    skip_bad_images: Annotated[bool, typer.Option(help="Skip unreadable files with a warning instead of "
                                                  "stopping.")] = False,
    params: Annotated[Path | None, typer.Option(
        "--params", show_default=False, help="Refuse a model (.safetensors or .onnx) whose recorded model.* and "
        "train.* params differ from this file's. Default: ./params.yaml, where there is one, for the pipeline's "
        "own models/model.safetensors and models/model.onnx only; any other model file is not checked without "
        "--params.")] = None,
    check_params: Annotated[bool, typer.Option(help="Compare the model's params with the params file "
                                               "(see --params).")] = True,
) -> None:
    """Label new images with a trained model, prepared exactly as prepare-data prepared the training images."""

    def command() -> None:
        from .images import find_images
        from .params import plural
        from .predict_checks import check_model_path, check_out, torch_missing

        check_model_path(model)  # refusals of the arguments come before any model or image is read
        paths = find_images(images)
        check_out(out, paths)
        if model.suffix.lower() == ".onnx":
            from .predict_onnx import predict as run_onnx  # ONNX Runtime: torch is never imported on this path

            summary = run_onnx(model, paths, out, top_k, batch_size, skip_bad_images, params, check_params)
        else:
            try:
                from .predict import predict as run
            except ImportError as exc:
                refusal = torch_missing(model, exc)
                if refusal is None:
                    raise
                raise UserError(refusal) from None

            summary = run(model, paths, out, top_k, batch_size, skip_bad_images, params, check_params)
        skipped = f", {plural(summary['skipped'], 'unreadable file')} skipped" if summary["skipped"] else ""
        typer.echo(f"labelled {plural(summary['labelled'], 'image')} on the {summary['device']} -> {out}{skipped}")

    _run(command)


@app.command()
def compare(
    runs: Annotated[list[str] | None, typer.Argument(
        metavar="RUN", show_default=False,
        help="Runs to compare: git revisions (HEAD~1, a tag, a branch), experiment names from `dvc exp show`, "
             "or workspace. Two without --baseline.")] = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", metavar="RUN", help="Compare every run given with this one, in one table.")] = None,
    all_experiments: Annotated[bool, typer.Option(
        "--all-experiments", help="Add HEAD and every experiment `dvc exp show` lists (baseline: HEAD "
        "unless --baseline).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object, for scripts.")] = False,
) -> None:
    """Is the difference real? Test accuracy of runs on the same test images, with 95% intervals and
    McNemar's exact paired test; runs that differ only in train.seed grouped (mean, std, min, max)."""

    def command() -> None:
        from .compare.command import compare as run

        typer.echo(run(runs or [], baseline, all_experiments, as_json))

    _run(command)


@app.command("offline-plots")
def offline_plots() -> None:
    """Make `dvc plots show` / `dvc plots diff` draw every plot with no network; run once per clone.

    Writes .dvc/plots/offline.html (vega, vega-lite and vega-embed inline) and sets DVC's
    plots.html_template to it in .dvc/config.local; both stay out of git.
    """

    def command() -> None:
        from .offline_plots import set_up_offline_plots

        page = set_up_offline_plots()
        typer.echo(f"wrote {page} and set plots.html_template in .dvc/config.local: `dvc plots show` and "
                   "`dvc plots diff` now draw with no network")

    _run(command)
