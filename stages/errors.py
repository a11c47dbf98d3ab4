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


def reraise_interrupt(exc: BaseException) -> None:
    """Raise KeyboardInterrupt when `exc` was caused by one, anywhere in its __cause__ / __context__ chain.

    Some libraries catch everything their callee raises, Ctrl-C included, and raise their own error
    from it (torch's dynamo ONNX exporter raises a TorchExportError); a stage that turns a library's
    errors into a refusal calls this first, so that Ctrl-C is reported as an interruption, never as a
    bad file or a model that cannot be exported."""
    pending, seen = [exc], set()
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        if isinstance(link, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        seen.add(id(link))
        pending += [link.__cause__, link.__context__]
