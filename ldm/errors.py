"""Bad input, and how every command line of the project reports it.

A :class:`UserError` says the caller asked for something that cannot work, and its message names the problem and
the fix. Entry points (``main.py``, the sampling scripts, the tools in ``scripts/``, later the server) print it as one
line ``error: ...`` on stderr and exit 2; every other exception is a bug and keeps its traceback. It is a
``ValueError``, so code that catches those still catches it. Usage errors from argparse read the same.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

# The exit code of a run stopped by bad input (a usage error, a bad config, a missing file ...), as argparse's.
EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad input: the message names the problem and the fix."""


def print_error(message: object, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``error: <message>`` on stderr as one line and return ``code``, the exit code for ``main`` to return.

    Messages from OmegaConf, PIL and the datasets can span lines; the command lines promise one.
    """
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


class ScriptParser(argparse.ArgumentParser):
    """argparse whose usage errors are one :func:`print_error` line, like every other error of a command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(print_error(f"{message} (see {self.prog} --help)"))


def run_script(
    parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], None], argv: Sequence[str] | None = None
) -> int:
    """A command line's exit code: ``parser``'s for ``--help`` and usage errors (already one line), 2 after one
    :func:`print_error` line when ``body(args)`` meets bad input (UserError, OSError), else 0."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        body(args)
    except (UserError, OSError) as err:
        return print_error(err)
    return 0
