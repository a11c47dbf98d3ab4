"""The check-params stage: refuse, before DVC removes any output, params that a later stage would refuse.

DVC deletes a stage's outputs just before it runs the stage, so a value the train stage refuses would
cost the last good model. Everything that params.yaml and this machine decide is checked here, each
refusal one line: the schema (stages/params.py, while loading), the weights to read, data.root, the
device plan with the global batch split over its processes, the precision and CPU thread count against
where training runs, and that the model takes the data's images.

torch is imported only by the checks that need it: a torchvision model (built on the meta device, no
memory, for one shape-only forward pass), or device settings other than the default's (auto, all, dp,
threads auto, no fp16: one process on whatever is there, which nothing can refuse). The default params
need neither.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .exp_workspace import in_queue_copy, in_workspace_exp_run, show_hidden_changes
from .params import BUILT_IN_MODELS, DATASETS, IMAGE_FOLDER, DataParams, Params, TrainParams, check_weights_available


def check_params(p: Params) -> list[str]:
    """Refuse what a later stage would refuse; return notes on what was done (a folder created)."""
    # Named weights must be in torchvision's cache (or model.download on); a weights file must be
    # under models/pretrained/, the train stage's dep, so that DVC retrains when it changes.
    check_weights_available(p.model, pipeline=True)
    notes = check_data_root(p.data)
    check_devices(p.train)
    check_model_takes_images(p)
    return notes


def check_data_root(d: DataParams) -> list[str]:
    """data.root must be a folder for every dataset read from it. With data.download, torchvision fills
    it: a missing one is created here, so that it exists when prepare-data (whose dep it is) runs."""
    root = Path(d.root)
    if root.is_dir() or (root.exists() and not d.reads_root):
        return []
    where = repr(d.root) if root.is_absolute() else f"{d.root!r} ({root.resolve()})"  # in a queue: a temp copy
    if not d.reads_root:  # DVC refuses a missing dep of prepare-data, with its own Errno line, if not here
        raise UserError(f"data.root = {where} does not exist: {d.dataset} read nothing from it, but it is "
                        f"prepare-data's dependency in dvc.yaml; set data.root to a folder that exists, such as "
                        f"{DataParams.root}{in_queue_hint()}")
    if root.exists():
        holds = "your images, one subfolder per class" if d.dataset == IMAGE_FOLDER else f"{d.dataset}'s files"
        raise UserError(f"data.root = {where} is a file; set data.root to the folder that holds {holds}")
    if d.download and DATASETS[d.dataset].downloads:
        root.mkdir(parents=True)
        return [f"created data.root {d.root} for torchvision to download {d.dataset} into"]
    if d.dataset == IMAGE_FOLDER:
        what = "put your images there, one folder per class, or set data.root to the folder that holds them"
    else:
        what = f"put {d.dataset}'s files there, or set data.download: true to fetch them"
    raise UserError(f"data.root = {where} does not exist: {what}{in_queue_hint()}")


def in_queue_hint() -> str:
    """Queued experiments run in a temporary copy of the repo (.dvc/tmp/exps/...) that holds only what git
    and DVC track: a folder that is in the workspace only is missing there."""
    if in_queue_copy():
        return " (queued experiments see only what git and DVC track: `dvc add` the folder and commit its .dvc file)"
    return ""


def show_changes_dvc_hid() -> None:
    """In a workspace `dvc exp run`, make `git status` true again after DVC's stash (stages/exp_workspace.py):
    done by check-params, the first stage, so that a refusal here or in a later stage leaves it true."""
    if in_workspace_exp_run():
        show_hidden_changes(Path.cwd())


def check_devices(t: TrainParams) -> None:
    """The train stage's own device plan (core/devices.py), refused here as it would be refused there:
    cuda without CUDA, CUDA ids or GPU claims on the cpu, a batch the DDP processes cannot split, fp16 on the
    cpu, more CPU threads than this machine's cores can run."""
    if (t.devices == "all" and t.strategy == "dp" and t.accelerator != "cuda" and t.precision != "fp16"
            and t.threads == "auto"):
        return  # one process on whatever this machine has: nothing to refuse, and no torch to import
    from .core.devices import plan_training
    from .core.precision import check_precision
    from .core.threads import check_thread_count

    plan = plan_training(t)
    check_precision(t.precision, t.accelerator, plan.accelerator)
    check_thread_count(t.threads, plan.world_size)  # the processes train starts on this machine


def check_model_takes_images(p: Params) -> None:
    """The model's one forward pass on the data's image size, as the train stage checks it (core/models.py);
    the size is known from the params (data.dataset, or data.image_size for an image folder)."""
    name = p.model.name
    if name in BUILT_IN_MODELS:
        return  # both fit any size the params allow
    import torch

    from .core.models import build_model, check_input_size

    channels, size = p.data.image_shape
    try:
        with torch.device("meta"):  # parameters without memory: shapes are all the check needs
            model = build_model(name, channels, size, 10, p.model.small_input_stem, p.data.dataset)
    except (NotImplementedError, RuntimeError):  # a builder whose init reads values (regnet): built for real
        model = build_model(name, channels, size, 10, p.model.small_input_stem, p.data.dataset)
    check_input_size(model, name, channels, size, p.data.dataset)
