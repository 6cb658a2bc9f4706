"""The errors falconbench raises, and the exit codes. The CLI prints each error as one `Error: ...` line and exits
with its kind's code."""

from __future__ import annotations

import difflib
from typing import Iterable

# Exit codes (documented in the README, from EXIT_CODES below): each kind of error has its own; a run in which some
# configuration ended oom or error exits EXIT_FAILURE; Ctrl-C, SIGINT, SIGTERM and SIGHUP exit EXIT_INTERRUPTED.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C
INTERRUPTED_EXIT_CODE = EXIT_INTERRUPTED
UNEXPECTED_EXIT_CODE = EXIT_FAILURE


class FalconbenchError(Exception):
    """Base class: the message says what is wrong and how to fix it."""

    exit_code = EXIT_FAILURE


class UsageError(FalconbenchError):
    """A value given on the command line or to the API is invalid, or names nothing known (a dtype, a GPU)."""

    exit_code = EXIT_USAGE


class NotFoundError(FalconbenchError):
    """A path, file, package or cached hub id that was asked for does not exist."""

    exit_code = 3


class ModelNotFoundError(NotFoundError):
    """--model points at nothing falconbench can find offline (a missing folder, a hub id not in the cache)."""


class UnknownModelError(UsageError, ModelNotFoundError):
    """--model is a name, and no profile or bundled model has it (a usage error: a near miss is suggested)."""

    exit_code = EXIT_USAGE


class ConfigError(FalconbenchError):
    """A config.json is unreadable, malformed, or lacks what the planner needs."""

    exit_code = 4


class ResultsError(FalconbenchError):
    """A results file is unusable (wrong model, foreign settings, unreadable)."""

    exit_code = 5


class RunError(FalconbenchError):
    """A benchmark run could not start or could not write its results."""

    exit_code = 6


class FolderBusyError(RunError):
    """The run folder is locked by another falconbench process."""


# Every exit code, for the README's and the docs' reference sections (generated from this table).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILURE, "a run in which some configuration ended oom or error (each row says which), or an unexpected "
                   "error (FALCONBENCH_DEBUG=1 shows the traceback)"),
    (UsageError.exit_code, "an invalid option value, or a name (model, dtype, GPU) that nothing has"),
    (NotFoundError.exit_code, "a path, package or cached hub id that does not exist"),
    (ConfigError.exit_code, "a config.json that cannot be read or planned"),
    (ResultsError.exit_code, "a results file that cannot be read, used or written (a full disk)"),
    (RunError.exit_code, "a run that could not start or measure (weights cut short, a busy run folder, ...)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGINT, SIGTERM, SIGHUP); finished rows are kept"),
)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """` Did you mean 'falcon-7b'?` for a near miss of `name` among `known` (case-insensitive), else ""."""
    choices = {k.lower(): k for k in known}
    wanted = name.strip().lower()
    # a prefix is the likeliest near miss (A100 for A100-40GB), which difflib's ratio ranks below A10G
    close = [c for c in choices if wanted and c.startswith(wanted)][:2] or \
        difflib.get_close_matches(wanted, list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    quoted = " or ".join(repr(choices[c]) for c in close)
    return f" Did you mean {quoted}?"
