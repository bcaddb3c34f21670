"""A free TCP port for a process group's rendezvous on this machine."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now, so two jobs on one machine do not both take torch's 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
