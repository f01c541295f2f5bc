"""``relaymap ARGS`` run in this process, seen as a user's console would see it.

A fresh interpreter per command (``subprocess.run(["relaymap", ...])``) costs seconds of
imports (and a private Ray cluster when the command maps); most CLI tests check only what
the command prints, its exit code and its files, which are the same here: click's
``CliRunner`` calls the same ``main``, and this wrapper gives the command what a fresh
process has. No logging handler of the test session (``main``'s ``logging.basicConfig``
then writes to this command's stderr, as it does in its own process), Python's default
warning filters (a warning is printed, not recorded by pytest), and whatever reaches file
descriptor 2 from C or C++ code, all on the command's stderr; a crash is its traceback
there and exit code 1. The environment, working directory, logger levels and handlers
are restored afterwards.

Keep the console script (``subprocess``) where a test is about the process itself: the
entry point, signals, crashes, listeners, Ray's own start and worker processes."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

#: The loggers ``relaymap.flows.cli.main`` sets the level of.
MAIN_LOGGERS = ("ray", "ray.data", "ray.train", "prefect", "distributed", "urllib3", "relaymap")
#: A fresh interpreter's warning filters (``python -W`` unset), most recent first.
PYTHON_FILTERS = (
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


@dataclass(frozen=True)
class Run:
    """What the console showed: as :class:`subprocess.CompletedProcess` has it."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _fresh_logging() -> Iterator[None]:
    """No root handler (the test session's come back after), levels restored."""
    root = logging.getLogger()
    for name in MAIN_LOGGERS:
        logging.getLogger(name)
    loggers = [root, *(x for x in logging.Logger.manager.loggerDict.values())]
    levels = {lg: lg.level for lg in loggers if isinstance(lg, logging.Logger)}
    handlers = root.handlers[:]
    root.handlers[:] = []
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        for lg, level in levels.items():
            lg.setLevel(level)


@contextlib.contextmanager
def _python_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(PYTHON_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        warnings.showwarning = _print_warning  # not pytest's recorder
        yield


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """As a fresh interpreter shows a warning: on (this command's) stderr."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _fd2(into: list[str]) -> Iterator[None]:
    """What is written to file descriptor 2 meanwhile (C/C++ libraries), into ``into``."""
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            into.append(tmp.read().decode(errors="replace"))


@contextlib.contextmanager
def _restored_environ(cwd: str | os.PathLike | None) -> Iterator[None]:
    env, here = dict(os.environ), os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(env)


def relaymap(
    *args: str, cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None
) -> Run:
    """Run ``relaymap ARGS`` here, in ``cwd``, with ``env`` added to the environment."""
    from click.testing import CliRunner

    from relaymap.flows.cli import main

    native: list[str] = []
    with _restored_environ(cwd), _fresh_logging(), _python_warnings():
        os.environ.update(env or {})
        runner = CliRunner()
        with _fd2(native):
            result = runner.invoke(main, list(args), prog_name="relaymap")
    stderr = result.stderr + native[0]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return Run(list(args), result.exit_code, result.stdout, stderr)
