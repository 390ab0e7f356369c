"""Free ports for the listeners the tests start."""

from __future__ import annotations

import random
import socket

# Below Linux's ephemeral range (32768-60999 by default), from which the kernel picks a port for every bind to
# port 0 and every outgoing connection: a port taken from that range and released, as bind(0) gives, can be
# handed to another socket before the test's listener binds it. That happened: a worker's metrics listener
# (port 0) got the port reserved for the MLLP listener, which then failed with "address already in use".
_LOW, _HIGH = 20000, 32767


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the ephemeral range."""
    for _ in range(200):
        port = random.randint(_LOW, _HIGH)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {_LOW}-{_HIGH}")
