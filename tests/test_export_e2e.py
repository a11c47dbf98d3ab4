"""The export stage under the real `dvc` CLI, in a temporary git repo with a local-folder remote: repro
writes and checks models/model.onnx, a second repro runs nothing, a change to export.* reruns export
alone, and `dvc artifacts get` fetches the ONNX model, which predict then uses with nothing else."""

from __future__ import annotations

import json

import onnx
import pytest

from .test_pipeline_e2e import commit, new_project, ran, set_param, sh
from .test_predict import read_csv, write_digit_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_repro_exports_and_reruns_export_only_for_its_params(tmp_path):
    repo = new_project(tmp_path / "project")
    set_param(repo, "train", "epochs", 2)  # a short run: the export is what is tested here
    set_param(repo, "analyze", "probe", False)
    sh(repo, "dvc", "remote", "add", "-d", "store", str(tmp_path / "dvc-store"))
    commit(repo, "short run")

    out = sh(repo, "dvc", "repro").stdout
    assert ran(out) == ["check-params", "prepare-data", "train", "evaluate", "probe", "analyze", "export"]
    assert "ONNX Runtime matches PyTorch on 359 test images" in out  # the digits' whole test split (< 512)
    first = (repo / "models/model.onnx").read_bytes()
    meta = {p.key: json.loads(p.value) for p in onnx.load_from_string(first).metadata_props}
    assert meta["model_name"] == "small-cnn" and len(meta["class_names"]) == 10
    commit(repo, "first run")

    second = sh(repo, "dvc", "repro").stdout
    assert ran(second) == [] and "Stage 'export' didn't change, skipping" in second

    set_param(repo, "export", "check_images", 100)
    third = sh(repo, "dvc", "repro").stdout
    # check-params reads every section, so it reruns for any params change; its output is unchanged, so
    # of the stages after it only export, whose params changed, runs
    assert ran(third) == ["check-params", "export"], third
    assert "ONNX Runtime matches PyTorch on 100 test images" in third
    assert (repo / "models/model.onnx").read_bytes() == first  # same weights, same bytes
    commit(repo, "check 100 images")
    sh(repo, "dvc", "push")

    # A user with neither the repo nor torch's weights: fetch the ONNX artifact (a version registered as an
    # annotated tag, GTO's format), then predict with it alone. Each artifact has versions of its own: the
    # weights' tag (the README's) does not register the ONNX file (docs/onnx.md gives it its own tag).
    sh(repo, "git", "tag", "-a", "image-classifier@v1.0.0", "-m", "image-classifier v1.0.0")
    user = tmp_path / "user"
    user.mkdir()
    missing = sh(user, "dvc", "artifacts", "get", str(repo), "image-classifier-onnx", "--rev", "v1.0.0",
                 "-o", "model.onnx", check=False)
    assert missing.returncode != 0 and "Unable to find artifact 'image-classifier-onnx @ v1.0.0'" in missing.stderr
    sh(repo, "git", "tag", "-a", "image-classifier-onnx@v1.0.0", "-m", "image-classifier-onnx v1.0.0")
    sh(user, "dvc", "artifacts", "get", str(repo), "image-classifier-onnx", "--rev", "v1.0.0", "-o", "model.onnx")
    assert (user / "model.onnx").read_bytes() == first
    from stages.prepared import load_prepared

    images, _, _ = load_prepared(repo / "data/prepared", "test")
    write_digit_files(user / "digits", images[:10], size=8, mode="L", ext=".png")
    # (run in the repo copy only so that its stages/ is the package that runs)
    env_out = sh(repo, "python", "-m", "stages", "predict", str(user / "digits"), "--model", str(user / "model.onnx"),
                 "--out", str(user / "p.csv"))
    assert "labelled 10 images on the cpu (ONNX Runtime)" in env_out.stdout
    _, rows = read_csv(user / "p.csv")
    assert len(rows) == 10 and all(row["predicted"] in meta["class_names"] for row in rows)

    # In the project, the pipeline's own ONNX file is checked against params.yaml, as its weights are.
    set_param(repo, "train", "epochs", 3)
    refused = sh(repo, "python", "-m", "stages", "predict", str(user / "digits"), "--model", "models/model.onnx",
                 "--out", str(user / "p.csv"), check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "error: models/model.onnx was exported from weights trained with train.epochs = 2 but params.yaml has "
        "train.epochs = 3; retrain and export again with `dvc repro` (or `dvc exp run`) so that the model matches "
        "the params; or pass --no-check-params to label with it anyway")
