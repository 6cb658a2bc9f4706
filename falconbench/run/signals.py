"""Stopping a sweep cleanly: SIGTERM and SIGHUP act as Ctrl-C, and a worker starts with the stop signals blocked.

Both run in the parent only; the worker inherits the mask it started under (see `signals_blocked`).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt, as Ctrl-C does, so every way of stopping a sweep ends the
    worker and records the configuration in flight as interrupted. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# NOTE: blocked while the worker starts, so it inherits the block: Ctrl-C (sent to the whole process group), SIGTERM
# and SIGHUP then reach only the parent, which kills the worker and records its row as interrupted. A worker hit
# while its interpreter starts would print a traceback, or die first and leave an "error" row that --resume keeps.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


@contextmanager
def signals_blocked(signals: frozenset):
    """Block `signals` in this thread, and hold back their Python handlers, while the block runs; a process
    started meanwhile keeps the mask for its whole life. A signal that came meanwhile raises KeyboardInterrupt
    once the block is done.

    NOTE: the mask alone is not enough. It is per thread, and the sweep has others (the progress display's
    refresh thread): the kernel hands a process-directed signal to a thread that does not block it, and Python
    then runs the handler in the main thread at its next instruction, inside `Process.start()`. Raised between
    spawning the child and sending it its pickled arguments, that left a child whose pid the parent never
    learnt: it printed a traceback from multiprocessing/spawn.py on the terminal and was never killed.
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    arrived: list[int] = []
    held = {}
    if threading.current_thread() is threading.main_thread():
        held = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in signals}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        # still masked: take the signals pending for this thread, so none reaches a restored handler half-way
        for sig in signal.sigpending() & set(signals):
            signal.sigtimedwait([sig], 0)
            arrived.append(sig)
        try:
            for sig, handler in held.items():
                signal.signal(sig, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    arrived = [sig for sig in arrived if held.get(sig) is not signal.SIG_IGN]
    if arrived:
        raise KeyboardInterrupt(*([] if arrived[0] == signal.SIGINT else [signal.Signals(arrived[0]).name]))
