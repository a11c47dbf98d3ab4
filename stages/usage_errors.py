"""Usage errors (an unknown option or command, a missing argument, a bad value) as one line on stderr.

Typer prints a usage error as its usage line, a hint and a boxed panel; every other refusal of the project
is one line, `error: ...`, exit 2. The command group below runs Typer in non-standalone mode, where the
error is raised instead of printed, and prints it as a refusal. Typer has no setting for this (its
`rich_markup_mode=None` prints click's three-line form and changes `--help`).
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

# Typer runs on its own copy of click, whose exception classes are private and are not the `click`
# package's; it re-exports BadParameter only, and the others are its bases.
UsageError = typer.BadParameter.__mro__[1]
ClickException = UsageError.__mro__[1]


def offending_value(exc: BaseException) -> str:
    """` (got 'abc')` where a bad value's message leaves it out: Typer converts values with pydantic and
    quotes only pydantic's complaint ("Input should be a valid integer"), whose error carries the input."""
    cause = exc.__cause__
    try:
        value = cause.errors()[0]["input"]  # pydantic's ValidationError
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""
    return f" (got {value!r})" if isinstance(value, str) else ""


def one_line(exc: BaseException) -> str:
    """The refusal for a usage error: click's message, the bad value, and the help to read."""
    message = " ".join(exc.format_message().split()).rstrip(".") + offending_value(exc)
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    help_hint = f"see `{ctx.command_path} --help`"
    if message.endswith("?"):  # click's "Did you mean 'train'?"
        return f"{message} {help_hint[:1].upper()}{help_hint[1:]}"
    if isinstance(ctx.command, TyperGroup) and message.startswith("no such command"):
        message += f"; commands: {', '.join(ctx.command.list_commands(ctx))}"
    return f"{message}; {help_hint}"


class OneLineUsageErrors(TyperGroup):
    """The app's command group: usage errors of any command become one `error: ...` line, exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            # click's parser raises some errors ("option '--data' requires an argument") without a context:
            # the command's, made here as click makes it before parsing, names the help to read.
            if exc.ctx is None and ctx.invoked_subcommand:
                command = self.get_command(ctx, ctx.invoked_subcommand)
                exc.ctx = command.context_class(command, info_name=ctx.invoked_subcommand, parent=ctx)
            raise

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # the caller handles errors itself
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments: the help, printed as it is raised
                message = exc.format_message()  # empty where Typer's rich help printed itself already
                if message:
                    typer.echo(message, err=True)
            else:
                typer.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:  # e.g. a file option that cannot be opened
            typer.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # Non-standalone mode returns the command's return value (None here) or the code of an Exit raised.
        sys.exit(code if isinstance(code, int) else 0)
