"""The export stage: the trained weights -> `models/model.onnx`, checked against PyTorch before it is written.

Exported with torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which writes the graph
with onnxscript), as torch's documentation recommends; the batch dimension is free, the opset is
torch's recommended one unless `export.opset` names another. The preprocessing facts predict needs
go in the model's metadata_props (`stages/onnx_model.py`). Same weights, same torch and onnx ->
same bytes: the protobuf is serialised deterministically and nothing in it depends on the run.

The check: ONNX Runtime runs the exported model on the first `export.check_images` images of the
test split, and PyTorch runs the weights on them; the file is written only when every logit agrees
within `export.atol + export.rtol * |logit|` and the top-1 classes differ on at most
`export.label_mismatch` of the images. A model that does not export, or whose export does not
agree, is refused in one line by name, and the previous `models/model.onnx` stays as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .core.pretrained import file_sha256
from .core.transforms import normalize, stats_tensors
from .core.weights import load_model
from .errors import UserError, first_line, reraise_interrupt
from .io import atomic_path
from .model_file import check_weights_use, read_metadata
from .onnx_model import INPUT_NAME, OUTPUT_NAME, onnx_metadata
from .params import ExportParams, Params
from .prepared import check_prepared_with, load_prepared, read_info

CHECK_BATCH = 256  # images per forward pass of the check, so a large check_images needs little memory


def to_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int | None, name: str):
    """The model as an onnx.ModelProto with a free batch dimension, or a UserError naming the model."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, external_data=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # torch.export and the exporter raise many types for what they cannot convert
        reraise_interrupt(exc)  # the exporter wraps a Ctrl-C during tracing in its own error
        reason = first_line(exc)
        raise UserError(f"model.name {name!r} cannot be exported to ONNX by torch {torch.__version__}'s dynamo "
                        f"exporter ({type(exc).__name__}: {reason[:300]}); models/model.onnx was not written") from None
    return program.model_proto


def check_against_torch(model: torch.nn.Module, session, images: torch.Tensor, meta: dict,
                        p: ExportParams, name: str) -> dict:
    """Run both on the images (uint8, N x C x H x W) and compare; a UserError naming the largest difference."""
    mean, std = stats_tensors(meta["mean"], meta["std"], torch.device("cpu"))
    worst = {"excess": -np.inf}
    differ, largest = 0, 0.0
    for start in range(0, len(images), CHECK_BATCH):
        x = normalize(images[start : start + CHECK_BATCH], mean, std)
        with torch.no_grad():
            expected = model(x).float().numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        diff = np.abs(got.astype(np.float64) - expected)
        excess = diff - (p.atol + p.rtol * np.abs(expected))  # > 0: outside the tolerance
        i, c = np.unravel_index(int(np.argmax(excess)), excess.shape)
        if excess[i, c] > worst["excess"]:
            worst = {"excess": excess[i, c], "image": start + int(i), "class": int(c),
                     "onnx": float(got[i, c]), "torch": float(expected[i, c])}
        largest = max(largest, float(diff.max()))
        differ += int((got.argmax(1) != expected.argmax(1)).sum())
    n = len(images)
    if worst["excess"] > 0:
        w = worst
        raise UserError(f"{name}'s ONNX export does not match PyTorch: logit of class "
                        f"{meta['class_names'][w['class']]!r} on test image {w['image']} is {w['onnx']:.6g} in ONNX "
                        f"Runtime, {w['torch']:.6g} in PyTorch (difference {abs(w['onnx'] - w['torch']):.3g}, "
                        f"allowed export.atol {p.atol:g} + export.rtol {p.rtol:g} x |logit|); "
                        "models/model.onnx was not written")
    if differ > p.label_mismatch * n:
        raise UserError(f"{name}'s ONNX export does not match PyTorch: the top-1 class differs on {differ} of {n} "
                        f"test images ({differ / n:.2%}), more than export.label_mismatch {p.label_mismatch:g} allows "
                        f"(largest logit difference {largest:.3g}); models/model.onnx was not written")
    return {"images": n, "max_abs_diff": largest, "top1_differ": differ}


def export_stage(params: Params, params_path: str | Path, weights: str | Path, data_dir: str | Path,
                 out: str | Path) -> dict:
    import onnxruntime as ort

    p = params.export
    weights, out = Path(weights), Path(out)
    check_prepared_with(read_info(data_dir), params, params_path, data_dir)  # the data made with these params
    # Like every consumer of the weights: made with these params, and fit for this data (one line if not).
    check_weights_use(read_metadata(weights), weights, params=(params, params_path),
                      data=(read_info(data_dir), data_dir))
    model = load_model(weights)  # eval mode, on the CPU: the file is made and checked there
    meta = model.stages_metadata
    name = meta["model_name"]
    images, _, _ = load_prepared(data_dir, "test")
    images = images[: p.check_images]
    if len(images) == 0:
        raise UserError(f"the test split in {data_dir} is empty: nothing to check the ONNX export on")

    mean, std = stats_tensors(meta["mean"], meta["std"], torch.device("cpu"))
    # A batch of two to trace: with one, the exporter may take the batch size for a constant.
    example = normalize(images[:2] if len(images) >= 2 else images.expand(2, -1, -1, -1), mean, std)
    proto = to_onnx(model, example, None if p.opset == "default" else p.opset, name)
    del proto.metadata_props[:]
    for key, value in onnx_metadata(meta, file_sha256(weights)).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        data = proto.SerializeToString(deterministic=True)
    except ValueError as exc:  # protobuf's 2 GB limit: the weights would have to go to an external file
        raise UserError(f"model.name {name!r} is too large for one ONNX file ({exc}); models/model.onnx was not "
                        "written") from None

    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:
        reraise_interrupt(exc)
        reason = first_line(exc)
        raise UserError(f"model.name {name!r}: ONNX Runtime {ort.__version__} cannot run its ONNX export "
                        f"({reason[:300]}); models/model.onnx was not written") from None
    checked = check_against_torch(model, session, images, meta, p, name)

    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    print(f"exported {name} to {out} (opset {opset}, {len(data) / 1e6:.2f} MB); ONNX Runtime matches PyTorch on "
          f"{checked['images']} test images: largest logit difference {checked['max_abs_diff']:.2g}, top-1 class "
          f"differs on {checked['top1_differ']}")
    return {**checked, "opset": opset, "bytes": len(data)}
