"""Start-up: the entry points import without the garbage collector's passes, then collect as usual, with the
libraries frozen out of every later pass; an interpreter that never paused (a library caller) is left alone."""

from __future__ import annotations

import gc
import subprocess
import sys

from lf_dist import startup

from .conftest import ROOT

_CHILD = """
import gc
from lf_dist import startup
startup.pause()
paused = not gc.isenabled()
import torch, transformers
startup.settle()
print(paused, gc.isenabled(), gc.get_freeze_count())
"""


def test_an_entry_point_imports_without_collecting_then_collects_with_the_libraries_frozen():
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", check=True
    ).stdout.split()
    paused, enabled, frozen = out[0] == "True", out[1] == "True", int(out[2])
    assert paused and enabled
    assert frozen > 100_000  # torch's and transformers' objects: never walked again


def test_settle_leaves_an_interpreter_that_never_paused_alone():
    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    startup.settle()
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)
