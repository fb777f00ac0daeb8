"""One error path for nbjax's command-line programs: one line, an exit status, no traceback.

A mistake the user can fix (a config key or value, a data file, a busy or mismatched work
directory) raises a :class:`UserError` carrying what is wrong and how to fix it; a program
run through :func:`run_cli` prints it as ``error: <what> — <how to fix>`` and exits 2. A
training failure (a non-finite loss, a checkpoint that cannot be written) is a
:class:`TrainingError` and exits 1; a run stopped by a signal after saving exits 128 + the
signal, as a shell reports it. The traceback is printed only with ``--verbose`` (taken off
the command line here) or ``NBJAX_VERBOSE=1``. Any CLI adopts it in one line::

    if __name__ == "__main__":
        errors.run_cli(main)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

EXIT_FAILURE = 1  # the run failed (a non-finite loss, an unwritable checkpoint, an OS error)
EXIT_USAGE = 2  # the user asked for something impossible (a key, a value, a file, a workdir)
# A path the user gave that is missing or unusable; other OS errors (a full disk) are failures.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "NBJAX_VERBOSE"


class UserError(Exception):
    """An error the user can fix: ``what`` is wrong and ``fix`` says how to fix it."""

    exit_code = EXIT_USAGE

    def __init__(self, what: str, fix: str = "") -> None:
        super().__init__(what)
        self.what, self.fix = what, fix

    def __str__(self) -> str:
        return f"{self.what} — {self.fix}" if self.fix else self.what


class ConfigError(UserError, ValueError):
    """A config key, value or file that cannot be used."""


class DataError(UserError, ValueError):
    """A data file that exists but cannot be read as what it should be."""


class NotFoundError(UserError, FileNotFoundError):
    """A file or directory the command needs is not there (a run's config, a checkpoint)."""


class DataNotFoundError(NotFoundError):
    """A dataset that is not where the config says."""


class WorkdirError(UserError):
    """A work directory that cannot be used for this run (busy, a file, another config)."""


class TrainingError(UserError):
    """The run failed while training; what is on disk is the last good state."""

    exit_code = EXIT_FAILURE


class NonFiniteError(TrainingError, FloatingPointError):
    """The loss or the gradient norm stopped being finite."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written, or none of the stored ones can be restored."""


class Stopped(KeyboardInterrupt):
    """Training stopped by a signal (SIGTERM, Ctrl-C), after saving what it says."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.message, self.signum = message, int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, so a message stays one line."""
    return " ".join(str(text).split())


def verbose() -> bool:
    """Whether tracebacks were asked for (``--verbose`` or ``NBJAX_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def _take_verbose_flag(argv: list[str]) -> None:
    """Removes ``--verbose`` from ``argv`` (so no parser sees it) and records it."""
    if VERBOSE_FLAG in argv:
        argv[:] = [arg for arg in argv if arg != VERBOSE_FLAG]
        os.environ[VERBOSE_ENV] = "1"


def quiet_library_logs() -> None:
    """Hides the libraries' absl logs unless ``--verbose``: Orbax logs every save, and a failed
    save as tracebacks from its threads, while the failure reaches the user as one line.
    absl's ``app.run`` sets the level when it parses flags, so its mains call this after."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING if verbose() else absl_logging.FATAL)


def _fail(line: str, code: int) -> None:
    if verbose():
        traceback.print_exc()
    else:  # background threads winding down (Orbax's writers) add nothing to the one line
        threading.excepthook = lambda args: None
        sys.unraisablehook = lambda args: None
    print(one_line(line), file=sys.stderr, flush=True)
    sys.exit(code)


def _is_path_error(err: OSError) -> bool:
    # Some libraries re-raise a missing file as a bare OSError that only names it in its text.
    return isinstance(err, _PATH_ERRORS) or "No such file or directory" in str(err)


def run_cli(main: Callable[..., Any], *args: Any) -> Any:
    """Calls ``main(*args)``; an error the user can act on becomes one line and an exit status.

    :class:`UserError` prints ``error: what — fix`` (exit 2, or 1 for a
    :class:`TrainingError`); :class:`Stopped` prints its message (exit 128 + signal); a bare
    interrupt and an ``OSError`` (a full disk, a permission) are one line each. Anything else
    is a bug and keeps its traceback.
    """
    _take_verbose_flag(sys.argv)
    quiet_library_logs()
    try:
        return main(*args)
    except Stopped as stop:
        _fail(stop.message, stop.exit_code)
    except KeyboardInterrupt:
        _fail("stopped: interrupted; nothing more was saved (a re-run resumes from the newest "
              "checkpoint, if there is one)", 128 + signal.SIGINT)
    except UserError as err:
        _fail(f"error: {err}", err.exit_code)
    except OSError as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        _fail(f"error: {err.strerror or err}{where} — check the path, its permissions and "
              f"the free space ({VERBOSE_FLAG} shows where it happened)",
              EXIT_USAGE if _is_path_error(err) else EXIT_FAILURE)
    return None
