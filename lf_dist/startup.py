"""Start-up without the garbage collector's passes over the imported libraries.

Importing torch, transformers, peft and datasets creates ~700,000 long-lived objects, and every generation-2
collection on the way walks all of them: ~1.5 s of a 5 s `lf-dist train` start-up on the 2-core build machine.
The entry points (the console script, a torchrun rank) pause collection before they import (`pause`). Once the
libraries are in, `settle` moves every object so far to the permanent generation (`gc.freeze`: never scanned
again) and collection resumes for what the process itself allocates: the worker settles once the model was
built on the meta device, a launcher before it waits for its workers, a server once its model is loaded. Only
a process that paused settles: a library caller's interpreter (tests, Ray workers) is left as it is.
"""

from __future__ import annotations

import gc
import os
import sys

_paused = False


def pause() -> None:
    """Stop automatic collection until `settle` (an entry point's first call)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def settle() -> None:
    """Freeze what start-up created and collect as usual from here on; a no-op unless `pause` ran."""
    global _paused
    if _paused:
        gc.freeze()
        gc.enable()
        _paused = False


def end_process(code: int) -> None:
    """End an entry point's process once its work is done and every stream flushed, without the interpreter
    tearing down its thousands of modules (torch, transformers: ~2 s, and the "leaked instances" reports some
    extension libraries print from their finalizers); exit handlers (trackers, temporary files) still run."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
