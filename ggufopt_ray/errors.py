"""The one exception type that reaches users as a one-line message.

Anything raised as ``UserError`` is a problem with the user's input (a missing file, a bad
setting) and carries its own fix; the CLI prints it on one line and exits non-zero instead of
showing a traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and how to fix it, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
