"""The analyze stage: a Markdown report of the run (a fuller report comes with the analyze issue)."""

from __future__ import annotations

from pathlib import Path

from .artifacts import read_json, write_text
from .params import Params


def analyze_stage(p: Params, data_dir: Path, model_path: Path, train_dir: Path, eval_dir: Path, out_dir: Path) -> None:
    info = read_json(Path(data_dir) / "info.json")
    run = read_json(Path(train_dir) / "run.json")
    test = read_json(Path(eval_dir) / "metrics.json")["test"]
    lines = [
        "# Run report",
        "",
        f"- dataset: {info['dataset']} ({info['counts']['train']} train / {info['counts']['val']} val / "
        f"{info['counts']['test']} test images, shape {info['shape']}, {info['num_classes']} classes)",
        f"- model: {run['model']} ({run['parameters']:,} parameters)",
        f"- devices: {run['accelerator']} {run['device_names']}, strategy {run['strategy']}",
        f"- batch: global {run['global_batch']}, per device {run['per_device_batch']}",
        f"- speed: {run['samples_per_second']:,.0f} samples/s",
        f"- test accuracy: {test['accuracy']:.4f}, loss {test['loss']:.4f}",
        "",
    ]
    write_text(Path(out_dir) / "report.md", "\n".join(lines))
    print(f"wrote {Path(out_dir) / 'report.md'}")
