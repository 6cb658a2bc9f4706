"""The errors falconbench raises, and the exit codes. The CLI prints each error as one `Error: ...` line and exits
non-zero."""

# Exit codes (documented in the README): a command that printed an Error: line, or a run in which some
# configuration ended oom or error, exits EXIT_FAILURE; Ctrl-C, SIGINT, SIGTERM and SIGHUP exit EXIT_INTERRUPTED.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class FalconbenchError(Exception):
    """Base class: the message says what is wrong and how to fix it."""

    exit_code = EXIT_FAILURE


class UsageError(FalconbenchError):
    """A value given on the command line or to the API is invalid."""

    exit_code = EXIT_USAGE


class ModelNotFoundError(FalconbenchError):
    """--model names nothing falconbench can find offline."""


class ConfigError(FalconbenchError):
    """A config.json is unreadable, malformed, or lacks what the planner needs."""


class RunError(FalconbenchError):
    """A benchmark run could not start or could not write its results."""


class ResultsError(FalconbenchError):
    """A results file is unusable (wrong model, foreign settings, unreadable)."""


class FolderBusyError(RunError):
    """The run folder is locked by another falconbench process."""
