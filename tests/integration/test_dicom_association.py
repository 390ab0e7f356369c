"""Association policy against real peers: the called AE title, the calling AE allow-list (with addresses), the
association limit, silent peers. Each rejection is an A-ASSOCIATE-RJ with the proper reason and a log line, and
the listener keeps serving afterwards."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .dicom_helpers import Gateway, pydicom_file, send_files


def associate(port: int, called: str = "GATEWAY", calling: str = "TESTSCU") -> tuple[bool, tuple[int, int, int] | None]:
    """(established, (result, source, diagnostic) of the A-ASSOCIATE-RJ or None); released at once."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return True, None
    rj = assoc.acceptor.primitive
    if assoc.is_rejected and rj is not None:
        return False, (int(rj.result), int(rj.result_source), int(rj.diagnostic))
    return False, None


def echo(port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status and status.Status == 0)


async def test_a_wrong_called_ae_title_is_rejected_with_reason_7(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Gateway(sqlite_url, tmp_path) as gw:
        with caplog.at_level(logging.WARNING):
            ok, rj = await asyncio.to_thread(associate, gw.port, called="NOT-ME")
        assert not ok and rj == (1, 1, 7)
        assert any(
            "called AE title 'NOT-ME'" in r.getMessage()
            and "127.0.0.1" in r.getMessage()
            and "calling AE 'TESTSCU'" in r.getMessage()  # which modality: the address alone may be a NAT
            for r in caplog.records
        )
        assert await asyncio.to_thread(echo, gw.port)


async def test_the_called_ae_check_can_be_off(sqlite_url: str, tmp_path: Path) -> None:
    async with Gateway(sqlite_url, tmp_path, require_called_ae=False) as gw:
        ok, _ = await asyncio.to_thread(associate, gw.port, called="ANYTHING")
        assert ok


async def test_an_unknown_calling_ae_title_is_rejected_with_reason_3(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peers = [{"ae_title": "MODALITY1"}, {"ae_title": "PACS", "addresses": ["127.0.0.1/32"]}]
    async with Gateway(sqlite_url, tmp_path, allowed_peers=peers) as gw:
        with caplog.at_level(logging.WARNING):
            ok, rj = await asyncio.to_thread(associate, gw.port, calling="STRANGER")
        assert not ok and rj == (1, 1, 3)
        assert any("'STRANGER' is not in allowed_peers" in r.getMessage() for r in caplog.records)
        for calling in ("MODALITY1", "PACS"):
            ok, _ = await asyncio.to_thread(associate, gw.port, calling=calling)
            assert ok, calling


async def test_an_allowed_ae_title_from_another_address_is_rejected(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    peers = [{"ae_title": "MODALITY1", "addresses": ["10.0.0.0/8"]}]
    async with Gateway(sqlite_url, tmp_path, allowed_peers=peers) as gw:
        with caplog.at_level(logging.WARNING):
            ok, rj = await asyncio.to_thread(associate, gw.port, calling="MODALITY1")
        assert not ok and rj == (1, 1, 3)
        assert any("not allowed from address 127.0.0.1" in r.getMessage() for r in caplog.records)


async def test_associations_over_the_limit_are_rejected_transiently(sqlite_url: str, tmp_path: Path) -> None:
    async with Gateway(sqlite_url, tmp_path, max_associations=1) as gw:

        def hold_one_and_try_another() -> tuple[bool, tuple[int, int, int] | None]:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            first = ae.associate("127.0.0.1", gw.port, ae_title="GATEWAY")
            assert first.is_established
            try:
                return associate(gw.port)
            finally:
                first.release()

        ok, rj = await asyncio.to_thread(hold_one_and_try_another)
        assert not ok and rj == (2, 3, 2)  # rejected-transient, local limit exceeded
        # The slot is free again once the first association is released.
        deadline = time.monotonic() + 5
        while not await asyncio.to_thread(echo, gw.port):
            assert time.monotonic() < deadline


async def test_a_connection_that_never_requests_an_association_is_closed(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Gateway(sqlite_url, tmp_path, acse_timeout_seconds=0.5) as gw:

        def silent() -> bytes:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                return s.recv(100)  # b"" when the gateway closes the connection

        with caplog.at_level(logging.WARNING):
            started = time.monotonic()
            assert await asyncio.to_thread(silent) == b""
            assert time.monotonic() - started < 8
            await asyncio.sleep(0.2)
        assert any("no association request" in r.getMessage() for r in caplog.records)
        assert await asyncio.to_thread(echo, gw.port)


async def test_a_peer_that_goes_silent_inside_an_association_is_aborted(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Gateway(sqlite_url, tmp_path, network_timeout_seconds=0.5) as gw:

        def open_and_wait() -> bool:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="GATEWAY")
            assert assoc.is_established
            deadline = time.monotonic() + 8
            while assoc.is_established and time.monotonic() < deadline:
                time.sleep(0.05)
            return bool(assoc.is_aborted)

        with caplog.at_level(logging.WARNING):
            assert await asyncio.to_thread(open_and_wait)
            await asyncio.sleep(0.2)
        assert any("no data for 0.5 s" in r.getMessage() for r in caplog.records)
        assert await asyncio.to_thread(send_files, gw.port, [pydicom_file("CT_small.dcm")]) == [0]


def _thread_cpu_seconds(native_id: int) -> float:
    """CPU time of one of this process's threads, in ns resolution (schedstat; /proc/.../stat counts 10-ms ticks)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
async def test_an_idle_association_costs_no_cpu(sqlite_url: str, tmp_path: Path) -> None:
    # pynetdicom's network thread polls its socket every 0.2 ms (our setting) when it has nothing to do, about a
    # fifth of a core per open association, and its association thread wakes every 1 ms to look for a message,
    # for a release or an abort (2-3 % of a core). The loops of adapters/dicom/reactor.py wait for their work.
    async with Gateway(sqlite_url, tmp_path) as gw:

        def idle_association() -> tuple[float, float, bool]:
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", gw.port, ae_title="GATEWAY")
            assert assoc.is_established
            try:
                assert gw.source._server is not None
                (server_side,) = gw.source._server.active_associations
                threads = (server_side.dul.native_id, server_side.native_id)
                assert None not in threads
                before = [_thread_cpu_seconds(t) for t in threads if t is not None]
                time.sleep(2.0)
                after = [_thread_cpu_seconds(t) for t in threads if t is not None]
                answered = bool(assoc.send_c_echo().Status == 0)  # and it still answers at once
                return after[0] - before[0], after[1] - before[1], answered
            finally:
                assoc.release()

        network, dimse, answered = await asyncio.to_thread(idle_association)
        assert answered
        assert network < 0.01, f"the idle association's network thread used {network * 1000:.1f} ms of CPU in 2 s"
        assert dimse < 0.01, f"the idle association's own thread used {dimse * 1000:.1f} ms of CPU in 2 s"


async def test_stopping_with_a_connection_that_has_not_requested_an_association(
    sqlite_url: str, tmp_path: Path
) -> None:
    # stop() aborts what is still open; for a connection still waiting for its A-ASSOCIATE-RQ, pynetdicom's
    # state machine has no abort transition, and its network thread ended with an uncaught exception (which
    # pytest reports as a failure here). Now the peer gets an A-ABORT and the connection is closed.
    with socket.socket() as raw:
        async with Gateway(sqlite_url, tmp_path) as gw:
            raw.connect(("127.0.0.1", gw.port))
            await asyncio.sleep(0.3)
            assert gw.source._server is not None and len(gw.source._server.active_associations) == 1
        received = b""
        while chunk := await asyncio.to_thread(raw.recv, 100):
            received += chunk
        assert received in (b"", b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # nothing, or an A-ABORT
