"""Handlers for SIGTERM / SIGINT for the length of a block: a run's guard, or a launcher that hands a signal on."""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A stop request as a file in output_dir: what a launcher whose workers cannot get the signal (Ray's driver)
# writes when it is signalled; rank 0 of the run looks for it after every step.
STOP_FILE = ".lf-dist-stop"


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
