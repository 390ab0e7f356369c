"""Close pynetdicom's association sockets even when the peer is already gone.

pynetdicom 3.0 (``AssociationSocket._shutdown_socket``) calls ``shutdown()`` and ``close()`` in one ``try``: when
``shutdown()`` fails -- the connection was refused, or the peer reset it before we closed -- ``close()`` is skipped
and the file descriptor stays open until the garbage collector finds the socket, which in a long-running daemon
can be a long time (a forward destination that refuses connections leaks one descriptor per retry). The
replacement below shuts down and closes in separate steps. It replaces one private method of the pinned major
version; tests/unit/test_dicom_sockets.py fails if the original returns or the method goes away.
"""

from __future__ import annotations

import contextlib
import socket

from pynetdicom.transport import AssociationSocket


def _shutdown_and_close(self: AssociationSocket) -> None:
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # ENOTCONN after a refused connect or a reset: nothing to shut down
    with contextlib.suppress(OSError):
        sock.close()


def install() -> None:
    """Idempotent; called when the DICOM source, the forward sink or ``gateway send dicom`` is imported."""
    if not hasattr(AssociationSocket, "_shutdown_socket"):
        raise RuntimeError(
            "pynetdicom changed: AssociationSocket._shutdown_socket is gone (see adapters/dicom/sockets.py)"
        )
    AssociationSocket._shutdown_socket = _shutdown_and_close  # type: ignore[method-assign]


install()
