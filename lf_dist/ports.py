"""Network helpers shared by launchers and strategies (neither imports the other)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that is free on this machine right now (for a rendezvous that needs one)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
