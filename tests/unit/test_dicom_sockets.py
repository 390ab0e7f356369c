"""pynetdicom's association socket is closed when the connection is refused (pynetdicom 3.0 leaves that to the
socket's finalizer, which warns and, when the socket sits in a reference cycle, waits for the garbage collector:
see adapters/dicom/sockets.py)."""

from __future__ import annotations

import gc
import socket
import warnings

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

from adapters.dicom import sockets


def refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens here once the socket is closed


def test_the_fix_is_installed() -> None:
    assert AssociationSocket._shutdown_socket is sockets._shutdown_and_close


def test_refused_associations_close_their_sockets() -> None:
    ae = AE(ae_title="LEAKTEST")
    ae.add_requested_context(Verification)
    ae.connection_timeout = 2
    port = refused_port()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                assert not ae.associate("127.0.0.1", port).is_established
            gc.collect()
    finally:
        ae.shutdown()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
