"""What every command-line entry point shares: a user's mistake printed as one line, and an output
directory that a run failing before its first round does not leave behind.

Which errors are the user's (printed as ``error: <message>`` on stderr, exit code 2, no traceback):

- ``UserError`` and its subclasses: ``ConfigError`` (a config key, value, type or file content that
  is not accepted; raised by every validation of ``recipes.config``, ``recipes.analysis.compare`` and
  ``data_prep.config``) and ``MissingFileError`` (a file or directory the user named does not exist);
- ``FileNotFoundError`` and ``FileExistsError``: every one the code raises names the path the user
  chose (no shards at ``data_dir``, no checkpoint to resume, an ``output_dir`` holding a finished run).

Everything else is an internal error and keeps its traceback. ``--debug`` anywhere on the command
line, or ``HELOCO_DEBUG=1`` in the environment, shows the traceback of a user error too.

This module imports only the standard library: ``data_prep`` raises ``ConfigError`` from here
without loading any of the recipes.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TypeVar

__all__ = [
    "DEBUG_ENV",
    "ConfigError",
    "MissingFileError",
    "OutputDirGuard",
    "UserError",
    "fail",
    "removed_if_failed_early",
    "run_cli",
]

DEBUG_ENV = "HELOCO_DEBUG"
DEBUG_FLAG = "--debug"
USER_ERROR_EXIT = 2  # what argparse uses for a usage error

T = TypeVar("T")


class UserError(Exception):
    """A mistake in what the user asked for; its message names the field or file and what is accepted."""


class ConfigError(UserError, ValueError):
    """A config key, value, type or file content that is not accepted (a ValueError, for callers that
    catch those)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError)


def debug_requested(argv: list[str]) -> bool:
    """``--debug`` on the command line or ``HELOCO_DEBUG`` set to anything but ``""``/``0``."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(error: BaseException) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with code 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(USER_ERROR_EXIT)


def run_cli(main: Callable[[list[str]], T], argv: list[str] | None = None) -> T:
    """Run an entry point's ``main(argv)`` (``argv`` defaults to ``sys.argv[1:]``, less ``--debug``)
    so that a user error ends the process with one line and exit code 2 instead of a traceback.

    Why here and not inside ``main``: tests and other code call ``main`` and want the exception.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        return main(args)
    except USER_ERRORS as error:
        if debug:
            raise
        fail(error)


class OutputDirGuard:
    """What ``removed_if_failed_early`` yields; call ``started()`` once the first round has run, from
    then on a failure leaves the directory in place (its logs and checkpoints matter)."""

    def __init__(
        self, path: Path, started_when: Callable[[Path], bool] | None = None, owner: bool = True
    ) -> None:
        self.path = path
        self.created = owner and not path.exists()
        self._started = False
        self._started_when = started_when

    def started(self) -> None:
        """The run got past its first round."""
        self._started = True

    @property
    def is_started(self) -> bool:
        """``started()`` was called, or the directory shows a round (``started_when``)."""
        if self._started:
            return True
        return self._started_when is not None and self.path.exists() and self._started_when(self.path)


@contextmanager
def removed_if_failed_early(
    path: str | Path, started_when: Callable[[Path], bool] | None = None, owner: bool | None = None
) -> Iterator[OutputDirGuard]:
    """Remove ``path`` if the body raises before the run's first round and ``path`` did not exist
    when the body began (a directory the user made, or a run to resume, is never touched).

    Why: a run refused at setup (bad data, a wrong model name) would otherwise leave an output
    directory that looks like a run. ``started_when(path)`` tells from the directory's content that
    a round ran, for code that cannot call ``OutputDirGuard.started()`` itself. ``owner``: whether
    this process may remove it; default: only rank 0 of a launched job (``RANK`` unset or 0), so a
    worker failing at setup never removes the directory rank 0 is writing.
    """
    if owner is None:
        owner = os.environ.get("RANK", "0") == "0"
    guard = OutputDirGuard(Path(path), started_when, owner)
    try:
        yield guard
    except BaseException:
        if guard.created and not guard.is_started:
            shutil.rmtree(guard.path, ignore_errors=True)
        raise
