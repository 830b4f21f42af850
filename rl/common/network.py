"""Host networking shared by the rendezvous of the trainer ranks and of the weight transfer to the engines."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on this host now (for a rank 0's rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
