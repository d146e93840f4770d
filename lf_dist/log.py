"""One logger for the package: short lines on stderr, only from the main rank."""

from __future__ import annotations

import logging
import os
import sys

_configured = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (it may be swapped, e.g. by test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def get_logger(name: str = "lf_dist") -> logging.Logger:
    global _configured
    if not _configured:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[lf-dist] %(message)s"))
        root = logging.getLogger("lf_dist")
        root.addHandler(handler)
        root.propagate = False
        # Other ranks stay quiet unless something goes wrong.
        root.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
        _configured = True
    return logging.getLogger(name)
