"""DICOM over TLS: the listener with client certificates and an allow-list, and the forward sink as a TLS client
(sending to a second gateway listener over TLS)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from adapters.dicom.config import DicomForwardConfig
from gateway.contracts import InputKind, OutboxItem
from tests.pki import Pki, make_pki

from .dicom_helpers import Gateway, pydicom_file, send_files, sha256, split_file


def server_tls(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {"cert": pki.p("server.pem"), "key": pki.p("server.key"), "client_ca": pki.p("ca.pem"), **extra}


def client_context(pki: Pki, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.p("ca.pem"))
    ctx.load_cert_chain(pki.p(f"{name}.pem"), pki.p(f"{name}.key"))
    return ctx


def echo_over_tls(port: int, ctx: ssl.SSLContext) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)


def refused(port: int, ctx: ssl.SSLContext | None) -> bool:
    """True when the listener will not talk DICOM to this client: the handshake fails, or the connection is
    closed before an association could be requested. Written with plain sockets (closed here), not pynetdicom,
    whose requestor leaves its socket open when the connection fails."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        if ctx is None:
            raw.sendall(b"\x01\x00" + b"\x00" * 100)  # the start of an A-ASSOCIATE-RQ, in clear text
            try:
                return raw.recv(10) == b""
            except OSError:
                return True
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.settimeout(5)
                return tls.recv(10) == b""  # the allow-list check closes it after the handshake
        except (ssl.SSLError, OSError):
            return True


async def test_tls_listener_accepts_allowed_clients_only(sqlite_url: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = server_tls(pki, require_client_cert=True, allowed_subjects=["CN=modality-1"])
    async with Gateway(sqlite_url, tmp_path, tls=tls) as gw:
        assert await asyncio.to_thread(echo_over_tls, gw.port, client_context(pki, "client"))
        # Same CA but not on the allow-list; a client from another CA; plain TCP: no association.
        assert await asyncio.to_thread(refused, gw.port, client_context(pki, "client2"))
        assert await asyncio.to_thread(refused, gw.port, client_context(pki, "rogue"))
        assert await asyncio.to_thread(refused, gw.port, None)
        # TLS without a client certificate; an expired certificate with the allowed subject from the right CA.
        assert await asyncio.to_thread(refused, gw.port, ssl.create_default_context(cafile=pki.p("ca.pem")))
        assert await asyncio.to_thread(refused, gw.port, client_context(pki, "expired"))
        # And the listener keeps serving.
        assert await asyncio.to_thread(echo_over_tls, gw.port, client_context(pki, "client"))


async def test_the_forward_sink_sends_over_tls(sqlite_url: str, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    f = pydicom_file("CT_small.dcm")
    async with Gateway(sqlite_url, tmp_path / "a") as first:
        assert await asyncio.to_thread(send_files, first.port, [f]) == [0]
        (row,) = await first.instance_rows()
    (tmp_path / "b").mkdir()
    async with Gateway(
        sqlite_url.replace("journal.db", "b.db"), tmp_path / "b", ae_title="PACS", tls=server_tls(pki)
    ) as pacs:
        cfg = DicomForwardConfig.model_validate(
            {
                "type": "dicom_forward",
                "host": "127.0.0.1",
                "port": pacs.port,
                "called_ae": "PACS",
                "tls": {"ca": pki.p("ca.pem"), "cert": pki.p("client.pem"), "key": pki.p("client.key")},
            }
        )
        sink = cfg.build("pacs")
        await sink.start()
        item = OutboxItem(1, row["id"], "pacs", 0, InputKind.DICOM, row["source"], row["raw"], [])
        try:
            await sink.deliver(item)
        finally:
            await sink.close()
        (got,) = await pacs.instance_rows()
        stored = await asyncio.to_thread(split_file, Path(orjson.loads(got["raw"])["path"]))
        assert sha256(stored[0]) == sha256(split_file(f)[0])


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:  # closed with the client's bytes unread
        return True


async def test_a_client_that_never_starts_tls_blocks_no_one_and_is_logged(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pynetdicom performs the handshake in its only accepting thread, on a socket without a timeout: one silent
    # connection (a port scan, a health check that only connects) used to stop every later association.
    pki = make_pki(tmp_path / "pki")
    async with Gateway(sqlite_url, tmp_path, tls=server_tls(pki), acse_timeout_seconds=1) as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as silent, caplog.at_level(logging.WARNING):
            await asyncio.sleep(0.2)  # accepted, waiting for a ClientHello that never comes
            echoed = asyncio.to_thread(echo_over_tls, gw.port, client_context(pki, "client"))
            assert await asyncio.wait_for(echoed, 15), "an association waited for the silent connection"
            assert await asyncio.to_thread(silent.recv, 10) == b""  # closed after acse_timeout_seconds
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as plain:
            plain.sendall(b"\x01\x00" + b"\x00" * 100)  # an A-ASSOCIATE-RQ in clear text
            assert await asyncio.to_thread(closed_by_peer, plain)
        await asyncio.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if "Refused a TLS connection" in r.getMessage()]
    assert any("(handshake-timeout): no TLS handshake within 1 s" in line for line in lines), lines
    assert any("(handshake-failed)" in line for line in lines), lines


async def test_handshakes_under_way_are_limited_to_max_associations(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = make_pki(tmp_path / "pki")
    config = {"tls": server_tls(pki), "acse_timeout_seconds": 5, "max_associations": 2}
    async with Gateway(sqlite_url, tmp_path, **config) as gw:
        with caplog.at_level(logging.WARNING):
            silent = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(2)]
            try:
                await asyncio.sleep(0.3)
                with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as third:
                    started = time.monotonic()
                    assert await asyncio.to_thread(closed_by_peer, third)
                    assert time.monotonic() - started < 2  # at once, not after the 5-s handshake timeout
            finally:
                for s in silent:
                    s.close()
            await asyncio.sleep(0.3)  # the two handshakes fail on EOF and free their places
            assert await asyncio.to_thread(echo_over_tls, gw.port, client_context(pki, "client"))
    assert any("the limit of 2 connections is reached" in r.getMessage() for r in caplog.records)
