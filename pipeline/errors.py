"""Errors that the CLI turns into exit codes.

`InputError` is bad input (a file, column, value or config key the user can fix): the CLI prints its
one-line message and exits with 2. Anything else that escapes a command is a failed run (exit 1).
"""


class InputError(Exception):
    """Bad input the user can fix. The message is one line naming the file/column/value and the fix."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
