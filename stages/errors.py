"""The one exception type for problems a user can fix (bad params, bad data, bad files).

The CLI turns it into a one-line message and a non-zero exit, with no traceback.
"""


class UserError(Exception):
    """A problem with the user's input: params, data, files or machine setup."""
