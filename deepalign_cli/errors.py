"""The one error type users see.

Raise `DeepAlignError` with a single line that names the file and the problem; `main.py`
catches it, prints it in red to stderr and exits 1. Any other exception is a bug and keeps its
traceback.
"""


class DeepAlignError(Exception):
    """A user-facing error: bad input, missing stage output, refused overwrite."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line
