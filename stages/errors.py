"""The one exception type for problems a user can fix (bad params, bad data, bad files).

The CLI turns it into a one-line message and a non-zero exit, with no traceback.
"""


class UserError(Exception):
    """A problem with the user's input: params, data, files or machine setup."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a library's
    error is quoted in a one-line refusal. A sentence's final period is dropped (an ellipsis kept), as
    the refusal goes on after it ("... DOS attack; fix or remove it", not "attack.; fix")."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].rstrip()
    return line[:-1] if line.endswith(".") and not line.endswith("..") else line
