"""The error type of bad input.

A :class:`UserError` says the caller asked for something that cannot work, and its message names the problem and
the fix. Entry points (the scripts, ``main.py``, later the server) print it as one line and exit 2; every other
exception is a bug and keeps its traceback. It is a ``ValueError``, so code that catches those still catches it.
"""


class UserError(ValueError):
    """Bad input: the message names the problem and the fix."""
