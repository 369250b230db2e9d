"""SIGTERM (Kubernetes, ``ray job stop``, ``kill``) stops a job like Ctrl-C: a ``KeyboardInterrupt`` in the
main thread, so the job's ``finally`` blocks shut down what it started and ``caig-ray`` prints one line.

An interrupt can be lost: a signal handler runs between two bytecodes of whatever the main thread is
executing, and when that is a weakref callback or a ``__del__`` (the garbage collector runs them at any
allocation) Python prints "Exception ignored in ..." and drops the exception -- the job would train on.
So after the first SIGTERM a watcher thread looks, once a second, at the exception the main thread is
handling (``sys._current_exceptions``): while no ``KeyboardInterrupt`` is in flight there (neither
handled nor the context of the one handled: a ``finally`` or an ``except`` it reached), for two looks
in a row, it delivers the interrupt again. Once one is in flight it stays quiet, so clean-up is never
interrupted twice.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGTERM_RECEIVED: list[bool] = []  # set when SIGTERM arrived: a library may re-raise the interrupt without its text
_STOPPED = threading.Event()  # the interrupt reached the entry point (caig-ray's handler): nothing to re-deliver
_WATCH_S = 1.0


def stop_on_sigterm() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt("SIGTERM")`` in the main thread. Installed at start and again
    after ``ray.init``, which sets its own SIGTERM handler (``sys.exit``, nothing shut down)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


def interrupt_reached_entry_point() -> None:
    """Called where the entry point caught the interrupt: the watcher stops re-delivering it."""
    _STOPPED.set()


def _raise_interrupt(signum, frame) -> None:
    if not SIGTERM_RECEIVED:
        threading.Thread(target=_redeliver_until_taken, name="caig-ray-sigterm", daemon=True).start()
    SIGTERM_RECEIVED.append(True)
    raise KeyboardInterrupt("SIGTERM")


def _redeliver_until_taken() -> None:
    import _thread

    quiet_looks = 0
    while not _STOPPED.wait(_WATCH_S):
        quiet_looks = 0 if main_thread_handles_an_interrupt() else quiet_looks + 1
        if quiet_looks >= 2:  # two looks a second apart: the interrupt was dropped, not just propagating
            _thread.interrupt_main(signal.SIGTERM)  # runs _raise_interrupt in the main thread again
            quiet_looks = 0


def main_thread_handles_an_interrupt() -> bool:
    """Whether the main thread is inside an ``except``/``finally`` for a ``KeyboardInterrupt`` (or for an
    exception raised while handling one)."""
    current = sys._current_exceptions().get(threading.main_thread().ident)
    exc = current[1] if isinstance(current, tuple) else current  # Python 3.11: (type, value, tb); 3.12+: the exception
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__context__
    return False
