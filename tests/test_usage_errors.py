"""A usage error (unknown option or command, missing argument, bad value) of any command is one line on
stderr, `error: ...`, exit 2, naming what is wrong and where to read what is allowed: like every other
refusal, with no boxed panel and no traceback. `--help` is left as Typer prints it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import typer

from stages.cli import app

from .helpers import ROOT

BOX_DRAWING = re.compile("[\u2500-\u257f]")
COMMANDS = list(typer.main.get_command(app).commands)  # those `python -m stages --help` lists


def run_all(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """`python -m stages ARGV` for each argv, started together (each spends its time importing Typer)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80")
    procs = [subprocess.Popen([sys.executable, "-m", "stages", *argv], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    outputs = [proc.communicate(timeout=120) for proc in procs]  # sets each returncode
    return [subprocess.CompletedProcess(proc.args, proc.returncode, *output) for proc, output in zip(procs, outputs)]


def refusal(proc: subprocess.CompletedProcess) -> str:
    """The one line a usage error prints, after checking that it is the only output, on stderr, exit 2."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and not proc.stdout.strip(), (proc.args, proc.stderr)
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and not BOX_DRAWING.search(proc.stderr), proc.stderr
    return lines[0]


def test_the_usage_errors_users_make_are_one_line_naming_the_problem_and_what_is_allowed():
    topk, missing, bad_int, too_small, typo, unknown, needs_value = run_all(
        ["predict", "--topk", "3", "x.png"], ["predict"], ["predict", "x.png", "--top-k", "abc"],
        ["predict", "x.png", "--top-k", "0"], ["trian"], ["fit"], ["train", "--params"])
    assert refusal(topk) == ("error: no such option: --topk (Possible options: --top-k); "
                             "see `python -m stages predict --help`")
    assert refusal(missing) == "error: missing argument 'IMAGE_OR_FOLDER'; see `python -m stages predict --help`"
    line = refusal(bad_int)
    assert "'--top-k'" in line and "valid integer" in line and "(got 'abc')" in line
    assert line.endswith("; see `python -m stages predict --help`")
    assert "'--top-k'" in refusal(too_small) and "greater than or equal to 1 (got '0')" in refusal(too_small)
    assert refusal(typo) == "error: no such command 'trian'. Did you mean 'train'? See `python -m stages --help`"
    assert refusal(unknown) == (f"error: no such command 'fit'; commands: {', '.join(COMMANDS)}; "
                                "see `python -m stages --help`")
    # click's parser raises this one without the command's context: the line still names the command's help
    assert refusal(needs_value) == ("error: option '--params' requires an argument; "
                                    "see `python -m stages train --help`")


def test_every_command_refuses_an_unknown_option_in_one_line():
    assert {"check-params", "train", "predict", "compare"} <= set(COMMANDS)
    procs = run_all(*([command, "--no-such-option"] for command in COMMANDS), ["--no-such-option"])
    for command, proc in zip([*COMMANDS, None], procs, strict=True):
        where = f"python -m stages {command}" if command else "python -m stages"
        assert refusal(proc) == f"error: no such option: --no-such-option; see `{where} --help`"


def test_help_and_no_arguments_still_print_the_help():
    help_page, no_args, predict_help = run_all(["--help"], [], ["predict", "--help"])
    assert help_page.returncode == 0 and "Usage: python -m stages" in help_page.stdout
    assert all(command in help_page.stdout for command in COMMANDS)
    assert no_args.returncode == 2 and no_args.stdout.strip() == help_page.stdout.strip()
    assert predict_help.returncode == 0 and "--top-k" in predict_help.stdout and not predict_help.stderr


def test_click_exception_classes_are_found_through_typers_public_bad_parameter():
    # usage_errors.py takes them from typer.BadParameter's bases: a Typer that moves them fails here
    from stages.usage_errors import ClickException, UsageError

    assert (UsageError.__name__, ClickException.__name__) == ("UsageError", "ClickException")
    assert UsageError.exit_code == 2
