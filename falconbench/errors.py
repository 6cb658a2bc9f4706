"""The errors falconbench raises. The CLI prints each as one `Error: ...` line and exits non-zero."""


class FalconbenchError(Exception):
    """Base class: the message says what is wrong and how to fix it."""

    exit_code = 1


class UsageError(FalconbenchError):
    """A value given on the command line or to the API is invalid."""

    exit_code = 2


class ModelNotFoundError(FalconbenchError):
    """--model names nothing falconbench can find offline."""


class ConfigError(FalconbenchError):
    """A config.json is unreadable, malformed, or lacks what the planner needs."""


class RunError(FalconbenchError):
    """A benchmark run could not start or could not write its results."""


class ResultsError(FalconbenchError):
    """A results file is unusable (wrong model, foreign settings, unreadable)."""
