"""Run a script file as ``python scripts/NAME.py ARGS`` would, inside the test process.

A fresh interpreter spends 8-12 s of this 2-core CPU importing torch, transformers and Lightning before a script's
first line. The tests that need a real process start one: signals and kills, DDP, imports in a fresh interpreter,
and one program's whole stderr (``test_scripts.py::test_a_bad_input_exits_2_with_one_line_and_no_output``). The
others run the file here, which is the same program but for the interpreter's start: the file's own ``__main__``
block, its ``sys.argv``, working directory, environment, exit code and output.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _as_program(argv: list[str], cwd: Path, env: Mapping[str, str]) -> Iterator[None]:
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    sys.argv = argv
    os.chdir(cwd)
    os.environ.update(env)
    try:
        yield
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_program(
    script: str | Path, *args: str, cwd: Path = ROOT, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``script`` (a path, or a name under ``scripts/``) run as ``__main__`` with ``args``; its exit code and what it
    printed, as ``subprocess.run(..., capture_output=True, text=True)`` gives them. An exception the program does not
    handle is raised here (a real process would print its traceback and exit 1)."""
    path = Path(script) if Path(script).is_absolute() else ROOT / "scripts" / script
    out, err = io.StringIO(), io.StringIO()
    argv = [str(path), *args]
    code: int = 0
    with _as_program(argv, cwd, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except SystemExit as exit:
            if exit.code is None or isinstance(exit.code, int):
                code = exit.code or 0
            else:  # sys.exit("message"): Python prints it and exits 1
                print(exit.code, file=sys.stderr)
                code = 1
    return subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())
