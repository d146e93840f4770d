"""Handlers for SIGTERM / SIGINT for the length of a block: a run's guard, or a launcher that hands a signal on."""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def on_signals(handler):
    """`handler(signum, frame)` for SIGTERM and SIGINT inside the block, the previous handlers after it. Only the
    main thread may set handlers: elsewhere (a Ray worker's training thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
