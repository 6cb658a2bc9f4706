"""The worker process's own setup: it dies with its parent, sends its output to the log, and may be capped.

Linux-specific parts degrade to nothing elsewhere (no prctl, no /proc).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import sys


def end_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a killed sweep leaves no worker behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the parent still kills its worker on every way out it sees
        pass
    parent = multiprocessing.parent_process()
    # the parent died before the request took effect (NOTE: the orphan's new parent is a subreaper, not always 1)
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent.pid):
        os._exit(1)


def cap_memory(extra_bytes: int) -> None:
    """Let this process's address space grow by at most `extra_bytes` from now on (RLIMIT_AS): allocations past
    it fail as they would on a smaller machine, and the row reads oom."""
    import resource

    with open("/proc/self/statm", encoding="ascii") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (current + extra_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (library warnings, progress bars, crash dumps) to the log."""
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    faulthandler.enable()  # a crash in native code (a segfault at a --memory-cap) leaves its Python stack here
