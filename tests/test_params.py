"""params.yaml is validated before any work: one line naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stages.cli import app
from stages.errors import UserError
from stages.params import default_params_yaml, load_params, plural, read_params_file, validate

from .helpers import ROOT, run_stages, write_params


def test_defaults_load_and_match_the_schema():
    p = load_params(ROOT / "params.yaml")
    assert p.data.dataset == "digits"
    assert p.model.name == "small-cnn"
    assert (p.train.strategy, p.train.accelerator, p.train.devices) == ("dp", "auto", "all")
    # every key in params.yaml is one the schema knows, and vice versa
    raw = read_params_file(ROOT / "params.yaml")
    for section, values in raw.items():
        assert set(values) == set(p.section_dict(section)), section


def test_params_yaml_is_the_schema_rendered():
    """Each key is declared once, in stages/params.py: the repo's params.yaml (values and comments) is
    exactly what `python -m stages params` prints, and it parses back to the schema's defaults."""
    text = default_params_yaml()
    assert (ROOT / "params.yaml").read_text() == text, "regenerate it: python -m stages params > params.yaml"
    assert load_params(ROOT / "params.yaml") == validate({})
    assert CliRunner().invoke(app, ["params"]).output == text
    assert "  lr: 0.002" in text and "# peak learning rate, decayed to 0 on a cosine" in text


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("train", "epoch", 3, "unknown key 'train.epoch' (did you mean train.epochs?)"),
        ("train", "weightdecay", 3, "unknown key 'train.weightdecay' (did you mean train.weight_decay?)"),
        ("train", "dataset", "mnist", "unknown key 'train.dataset' (did you mean data.dataset?)"),
        ("train", "zzz", 3, "unknown key 'train.zzz'; `python -m stages params` lists every key with what it does"),
        ("train", "lr", "fast", "train.lr = 'fast' is not allowed; expected a number in (0.0, 10.0]"),
        ("train", "epochs", -1, "train.epochs = -1 is not allowed; expected an integer from 1 to 100000"),
        ("train", "batch_size", 0, "train.batch_size = 0 is not allowed; expected an integer >= 1"),
        ("train", "seed", 2**32, "train.seed = 4294967296 is not allowed; expected an integer from 0 to 4294967295"),
        ("data", "val_fraction", 1.5, "data.val_fraction = 1.5 is not allowed; expected a number in (0.0, 1.0)"),
        ("train", "strategy", "fsdp", "train.strategy = 'fsdp' is not allowed; expected one of dp, ddp"),
        ("train", "devices", "seven", "train.devices = 'seven' is not allowed; expected 'all', a device count"),
        ("train", "devices", [0, 0], "train.devices = [0, 0] is not allowed"),
        ("model", "name", "vgg", "model.name = 'vgg' is not allowed; expected small-cnn, mlp or one of torchvision's "
                                 "classification models such as resnet18 (`python -m stages models` lists them)"),
        ("model", "weights", "imagenet", "model.weights = 'imagenet' is not allowed; expected none, a torchvision "
                                         "weights name such as DEFAULT or IMAGENET1K_V1, or a state-dict file"),
        ("model", "small_input_stem", "yes", "model.small_input_stem = 'yes' is not allowed; expected one of auto, "
                                             "true, false"),
        ("train", "ema", 1.0, "train.ema = 1.0 is not allowed; expected a number in [0.0, 1.0)"),
        ("train", "keep", "worst", "train.keep = 'worst' is not allowed; expected one of last, best"),
        ("train", "accumulate", 0, "train.accumulate = 0 is not allowed; expected an integer from 1 to 1024"),
        ("train", "backbone_lr", 0, "train.backbone_lr = 0 is not allowed; expected a number in (0.0, 1.0]"),
        ("data", "dataset", "imagenet", "data.dataset = 'imagenet' is not allowed; expected one of digits, mnist"),
        ("train", "compile", "fast",
         "train.compile = 'fast' is not allowed; expected one of false, true, default, reduce-overhead, max-autotune"),
        ("train", "epochs", 2.5, "train.epochs = 2.5 is not allowed"),
    ],
)
def test_bad_values_are_refused_by_name(section, key, value, expected):
    with pytest.raises(UserError) as err:
        validate({section: {key: value}})
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"model": {"name": "small-cnn", "weights": "DEFAULT"}},
         "model.weights = 'DEFAULT' is not allowed with model.name = 'small-cnn': torchvision has no weights for it"),
        ({"model": {"name": "resnet18", "weights": "IMAGENET1K_V2"}},
         "model.weights = 'IMAGENET1K_V2' is not allowed with model.name = 'resnet18'; expected none, a state-dict "
         "file, or one of IMAGENET1K_V1, DEFAULT"),
        ({"model": {"name": "vgg11", "small_input_stem": True}},
         "model.small_input_stem = true is not allowed with model.name = 'vgg11'"),
        ({"train": {"epochs": 5, "warmup_epochs": 5}},
         "train.warmup_epochs = 5 is not allowed with train.epochs = 5"),
        ({"train": {"epochs": 3, "freeze_epochs": 3}},
         "train.freeze_epochs = 3 is not allowed with train.epochs = 3; the backbone would never train"),
        ({"train": {"epochs": 3, "freeze_epochs": 5}},
         "train.freeze_epochs = 5 is not allowed with train.epochs = 3; the backbone would never train"),
        ({"train": {"batch_size": 64, "accumulate": 3}},
         "train.batch_size = 64 is not allowed with train.accumulate = 3; the batch must split into 3 equal forward "
         "passes: use a multiple of 3 such as 63 or 66"),
        ({"train": {"batch_size": 2, "accumulate": 3}}, "use a multiple of 3 such as 3"),
    ],
)
def test_combinations_are_refused_naming_both_keys(raw, expected):
    with pytest.raises(UserError) as err:
        validate(raw)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_torchvision_models_and_weights_are_accepted():
    p = validate({"model": {"name": "mobilenet_v3_small", "weights": "IMAGENET1K_V1"},
                  "train": {"accumulate": 4, "ema": 0.999, "keep": "best", "mixup_alpha": 0.2}})
    assert (p.model.name, p.model.weights, p.train.accumulate) == ("mobilenet_v3_small", "IMAGENET1K_V1", 4)
    assert validate({"model": {"name": "resnet50", "small_input_stem": False}}).model.small_input_stem is False
    assert validate({"model": {"weights": "models/pretrained/r18.pth"}}).model.weights.endswith(".pth")


def test_default_params_do_not_import_torchvision():
    import subprocess
    import sys

    code = ("import sys; from stages.params import load_params; load_params('params.yaml')\n"
            "assert 'torchvision' not in sys.modules and 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "raw, guess",
    [
        ({"train": {"lR": 0.1}}, "unknown key 'train.lR' (did you mean train.lr?)"),  # case only
        ({"train": {"Epochs": 3}}, "unknown key 'train.Epochs' (did you mean train.epochs?)"),
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch' (did you mean train.epochs?)"),
        ({"train": {"learning_rate": 0.1}}, "unknown key 'train.learning_rate' (did you mean train.lr?)"),  # synonym
        ({"train": {"batch": 32}}, "unknown key 'train.batch' (did you mean train.batch_size?)"),
        ({"data": {"batch_size": 32}}, "(did you mean train.batch_size or evaluate.batch_size?)"),
        ({"model": {"name": "ResNet18"}}, "model.name = 'ResNet18' is not allowed (did you mean resnet18?); expected"),
        ({"data": {"dataset": "MNIST"}}, "data.dataset = 'MNIST' is not allowed (did you mean mnist?); expected"),
        ({"train": {"zzz": 3}}, None),
        ({"extra": {}}, None),  # an unknown section: train is not close (difflib's ratio 0.6)
        ({"model": {"name": "vgg"}}, None),  # as close to vgg11 as to vgg19: no guess
    ],
)
def test_typos_get_one_close_guess_or_none_and_a_short_line(raw, guess):
    """A suggestion is the same name in another case, a well-known synonym or a close name, never a far
    guess; without one the line names where the keys are listed rather than listing train's 30 keys."""
    with pytest.raises(UserError) as err:
        validate(raw)
    message = str(err.value)
    if guess is None:
        assert "did you mean" not in message
    else:
        assert guess in message
    assert len(message) < 240 and "\n" not in message and "train.batch_size, " not in message


def test_an_empty_value_is_named_empty():
    for value in (None, ""):  # `epochs:` with nothing after it is null
        with pytest.raises(UserError) as err:
            validate({"train": {"epochs": value}})
        assert "None" not in str(err.value) and "expected an integer from 1 to 100000" in str(err.value)
    with pytest.raises(UserError, match=r"^params.yaml: train.epochs is empty \(null\); expected an integer"):
        validate({"train": {"epochs": None}})


def test_a_section_or_key_written_twice_names_both_lines(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 3\n\ndata:\n  dataset: digits\ntrain:\n  lr: 0.1\n")
    with pytest.raises(UserError) as err:
        load_params(params)
    assert str(err.value) == f"{params} has two `train:` sections (lines 1 and 6): merge them into one"
    params.write_text("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 4\n")
    with pytest.raises(UserError) as err:
        load_params(params)
    assert str(err.value) == f"{params} has two `train.epochs` keys (lines 2 and 4): keep one"


def test_each_key_that_retrains_outside_model_and_train_says_so():
    """dvc.yaml's train stage depends on more than model.* and train.*: each key it reads elsewhere
    (evaluate.batch_size, its validation batch) reruns training when changed, and params.yaml's comment
    for it says so rather than leaving a user to find out from an hour's retraining."""
    entries = [entry.partition(".") for entry in read_params_file(ROOT / "dvc.yaml")["stages"]["train"]["params"]]
    others = [(section, key) for section, _, key in entries if section not in ("model", "train")]
    assert others, "train reads only model.* and train.*: nothing to check"
    text = default_params_yaml()
    for section, key in others:  # a whole section (evaluate) or one key of it (evaluate.batch_size)
        lines = text.split(f"\n{section}:\n")[1].split("\n\n")[0].splitlines()
        for line in lines if not key else [line for line in lines if line.startswith(f"  {key}:")]:
            assert "reruns train" in line, line


def test_unknown_section_and_valid_values():
    with pytest.raises(UserError, match=r"unknown section 'trian' \(did you mean train\?\); allowed sections: data,"):
        validate({"trian": {}})
    assert validate({"train": {"epochs": 3, "freeze_epochs": 2}}).train.freeze_epochs == 2
    p = validate({"train": {"devices": [0, 2], "lr": 1}, "data": {"channels": 1}})
    assert p.train.devices == [0, 2]
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(UserError) as err:
        load_params(bad)
    assert str(bad) in str(err.value) and "line" in str(err.value) and "not valid YAML" in str(err.value)


def test_cli_refuses_bad_params_in_one_line_and_keeps_artifacts(tmp_path):
    out = tmp_path / "prepared"
    out.mkdir()
    marker = out / "info.json"
    marker.write_text('{"earlier": "artifact"}')
    params = write_params(tmp_path / "params.yaml", train={"epochs": -1})
    for command in (["prepare-data", "--out", str(out)], ["train", "--data", str(out)]):
        result = CliRunner().invoke(app, [command[0], "--params", str(params), *command[1:]])
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == ["error: params.yaml: train.epochs = -1 is not allowed; expected an integer from 1 to 100000"
                         .replace("params.yaml", str(params))]
    assert marker.read_text() == '{"earlier": "artifact"}'


def test_real_process_exit_code_and_no_traceback(tmp_path):
    params = write_params(tmp_path / "params.yaml", train={"strategy": "fsdp"})
    proc = run_stages("train", "--params", str(params), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: {params}: train.strategy = 'fsdp' is not allowed; expected one of dp, ddp"]


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, runpy; sys.argv=['stages','--help']\n"
            "try: runpy.run_module('stages', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
            "assert 'matplotlib' not in sys.modules and 'dvclive' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "prepare-data" in proc.stdout and "analyze" in proc.stdout


# --- params.yaml is read as DVC reads and writes it (YAML 1.2) -------------------------------


def test_small_numbers_in_exponent_form_are_numbers(tmp_path):
    """What DVC writes for `-S train.lr=3e-5` (3e-05) and what users type (1e-4) are floats in YAML 1.2,
    which DVC reads and writes; PyYAML (YAML 1.1) read them as strings, and the params were refused."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5e-05\n  momentum: 0.00003\n  clip_grad_norm: 1e3\n"
                    "  epochs: 1e1\n  batch_size: 6.4e1\ndata:\n  val_fraction: 1.5e-1\n  channels: 1e0\n")
    p = load_params(path)
    assert (p.train.lr, p.train.weight_decay, p.train.momentum, p.train.clip_grad_norm) == (1e-4, 5e-5, 3e-5, 1e3)
    assert (p.data.val_fraction, p.data.channels) == (0.15, 1)
    # a whole number written as a float (-S train.epochs=1e1 writes 10.0) is the integer the key declares
    assert (p.train.epochs, p.train.batch_size) == (10, 64)
    assert all(isinstance(v, int) for v in (p.train.epochs, p.train.batch_size, p.data.channels))
    assert isinstance(p.train.lr, float)


def test_yaml_1_2_reads_yes_as_a_word_as_dvc_does(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  augment: yes\n")
    with pytest.raises(UserError, match="train.augment = 'yes' is not allowed; expected true or false"):
        load_params(path)


@pytest.mark.parametrize("text, where", [
    ("train:\n  epochs: 3\n  lr: [0.1\n", "line 3, column 7"),  # a bracket never closed: the parser stops at the end
    ("train:\n  epochs: 3\n  lr 0.1\n  seed: 1\n", "line 3, column 3"),  # no colon: noticed on the next line
    ("train:\n  epochs: 3\n  strategy: 'ddp\n  seed: 1\n", "line 3, column 13"),  # a quote never closed
    ("train:\n  epochs: 3\n lr: 0.1\n", "line 3, column 2"),
    ("train:\n  epochs:3\n  seed: 1\n", "lines 2-3"),  # no space after the colon: a value that runs on
])
def test_a_yaml_syntax_error_names_the_line_where_it_is(tmp_path, where, text):
    bad = tmp_path / "params.yaml"
    bad.write_text(text)
    with pytest.raises(UserError) as err:
        load_params(bad)
    message = str(err.value)
    assert message.startswith(f"{bad}: not valid YAML at {where}: ") and "\n" not in message


def test_plural():
    assert [plural(1, "file"), plural(2, "file"), plural(1, "process", "processes"), plural(3, "process", "processes")
            ] == ["1 file", "2 files", "1 process", "3 processes"]
