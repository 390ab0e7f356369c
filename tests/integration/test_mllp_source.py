"""The MLLP listener in-process, driven by a real TCP client: ACK content, one message in flight per connection,
concurrency across connections, timeouts, limits, framing errors, graceful stop and metrics. The last tests
run the source contract (STYLE.md) against the real pipeline and journal on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from adapters.mllp.config import MllpSourceConfig
from adapters.mllp.source import MllpSource
from gateway.contracts import Envelope, InputKind, Outcome, RejectCode, SubmitResult
from gateway.hl7v2.parse import Message, parse
from gateway.journal import Journal
from gateway.journal.schema import messages
from gateway.pipeline import Pipeline
from gateway.routing import Route, Router

START, END = b"\x0b", b"\x1c\r"
WAIT = 5.0  # upper bound for anything that should happen "soon"; a hang fails instead of timing out the test


def hl7(
    control_id: str = "C1",
    *,
    version: str = "2.5.1",
    extra: bytes = b"",
) -> bytes:
    return (
        f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|{version}\r"
        "EVN|A01|20240101120000\r"
        "PID|1||MRN-1^^^HOSP^MR||Doe^John||19800101|M\r"
        "PV1|1|I|WARD^1^A\r"
    ).encode() + extra


def framed(message: bytes) -> bytes:
    return START + message + END


def unique_name() -> str:
    return f"t-{secrets.token_hex(5)}"


def metric(name: str, source: str) -> float:
    return REGISTRY.get_sample_value(name, {"source": source}) or 0.0


# -- submitters (gateway.contracts.Submitter) ------------------------------------------------------------------


class Recording:
    """Answers every envelope with one fixed result and keeps what it saw."""

    def __init__(self, result: SubmitResult | None = None) -> None:
        self.result = result or SubmitResult(Outcome.DELIVERED)
        self.seen: list[Envelope] = []

    async def submit(self, envelope: Envelope) -> SubmitResult:
        self.seen.append(envelope)
        return self.result


class Tracking:
    """Records how many submits are in flight, per peer and overall; each one sleeps ``delays`` in turn."""

    def __init__(self, *delays: float) -> None:
        self.delays = list(delays)
        self.in_flight: Counter[str] = Counter()
        self.max_per_peer: Counter[str] = Counter()
        self.total = 0
        self.max_total = 0

    async def submit(self, envelope: Envelope) -> SubmitResult:
        self.in_flight[envelope.peer] += 1
        self.total += 1
        self.max_per_peer[envelope.peer] = max(self.max_per_peer[envelope.peer], self.in_flight[envelope.peer])
        self.max_total = max(self.max_total, self.total)
        try:
            await asyncio.sleep(self.delays.pop(0) if self.delays else 0.0)
        finally:
            self.in_flight[envelope.peer] -= 1
            self.total -= 1
        return SubmitResult(Outcome.DELIVERED)


class Hanging:
    """Never answers; notes whether the source gave up on it (cancelled the submit)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def submit(self, envelope: Envelope) -> SubmitResult:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


class Gated:
    """Holds messages whose control id is HOLD until ``release`` is set; answers the others at once."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.seen: list[bytes] = []

    async def submit(self, envelope: Envelope) -> SubmitResult:
        self.seen.append(envelope.payload)
        if b"|HOLD|" in envelope.payload:
            self.entered.set()
            await self.release.wait()
        return SubmitResult(Outcome.DELIVERED)


# -- a real MLLP client ----------------------------------------------------------------------------------------


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def send(self, *msgs: bytes, raw: bytes = b"") -> None:
        """All frames in one write (pipelined), after ``raw`` bytes."""
        self.writer.write(raw + b"".join(framed(m) for m in msgs))
        await self.writer.drain()

    async def ack(self, within: float = WAIT) -> Message:
        data = await asyncio.wait_for(self.reader.readuntil(END), within)
        assert data.startswith(START), data[:20]
        return parse(data[1:-2])

    async def request(self, msg: bytes) -> Message:
        await self.send(msg)
        return await self.ack()

    async def eof(self, within: float = WAIT) -> bool:
        """True when the server closed the connection (read returns b"") within ``within`` seconds."""
        try:
            data = await asyncio.wait_for(self.reader.read(1024), within)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        assert data == b"", f"unexpected data instead of a close: {data[:40]!r}"
        return True

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)


@asynccontextmanager
async def listening(submitter: Any, name: str | None = None, **options: Any) -> AsyncIterator[MllpSource]:
    cfg = MllpSourceConfig(type="mllp", name=name or unique_name(), host="127.0.0.1", port=0, **options)
    src = cfg.build(submitter)
    await src.start()
    try:
        yield src
    finally:
        await src.stop(1.0)


def msa(ack: Message) -> tuple[str, str]:
    seg = ack.first("MSA")
    assert seg is not None, "the ACK has no MSA segment"
    return seg.raw(1), seg.raw(2)


def err_code(ack: Message) -> str:
    seg = ack.first("ERR")
    assert seg is not None, "a negative ACK carries an ERR segment"
    return seg.get(3, 1)  # v2.5+: ERR-3 is the CWE error code


# -- acknowledgements ------------------------------------------------------------------------------------------


async def test_delivered_is_aa_with_swapped_header_and_the_envelope_is_exact() -> None:
    sub = Recording()
    payload = hl7("CTRL-77", version="2.4", extra=b"NTE|1||caf\xc3\xa9 \x1c not the end\r")
    async with listening(sub) as src:
        c = await Client.connect(src.port)
        try:
            before = datetime.now(UTC)
            ack = await c.request(payload)
            msh = ack.msh
            assert msa(ack) == ("AA", "CTRL-77")
            assert (msh.raw(3), msh.raw(4), msh.raw(5), msh.raw(6)) == ("RECVAPP", "RECVFAC", "SENDAPP", "SENDFAC")
            assert msh.raw(12) == "2.4"
            assert msh.raw(10) not in ("", "CTRL-77"), "the ACK has its own control id"
            assert ack.first("ERR") is None
            (env,) = sub.seen
            assert env.payload == payload
            assert env.kind is InputKind.HL7V2
            assert env.source == src.name
            assert env.peer == f"127.0.0.1:{c.local_port}"
            assert env.received_at.tzinfo is not None and before <= env.received_at <= datetime.now(UTC)
            assert env.id
        finally:
            await c.close()


@pytest.mark.parametrize(
    ("result", "code", "err"),
    [
        (SubmitResult(Outcome.ERRORED, reason="journal unavailable, resend later"), "AE", "207"),
        (
            SubmitResult(Outcome.REJECTED, reason="unsupported HL7 version", code=RejectCode.UNSUPPORTED_VERSION),
            "AR",
            "203",
        ),
        (SubmitResult(Outcome.REJECTED, reason="cannot map", code=RejectCode.MAPPING_FAILED), "AR", "207"),
        (SubmitResult(Outcome.DELIVERED, duplicate=True), "AA", None),
    ],
    ids=["errored", "unsupported-version", "mapping-failed", "duplicate"],
)
async def test_outcomes_map_to_ack_codes(result: SubmitResult, code: str, err: str | None) -> None:
    async with listening(Recording(result)) as src:
        c = await Client.connect(src.port)
        try:
            ack = await c.request(hl7("C-9"))
            assert msa(ack) == (code, "C-9")
            if err is None:
                assert ack.first("ERR") is None
            else:
                assert err_code(ack) == err
                assert result.reason in ack.first("ERR").raw(8)  # type: ignore[union-attr]
        finally:
            await c.close()


# -- flow ------------------------------------------------------------------------------------------------------


async def test_pipelined_frames_are_processed_one_at_a_time_and_acked_in_order() -> None:
    # The first message takes longest: a source that processed them concurrently would answer out of order.
    sub = Tracking(0.15, 0.05, 0.0)
    async with listening(sub) as src:
        c = await Client.connect(src.port)
        try:
            await c.send(hl7("P1"), hl7("P2"), hl7("P3"))
            acks = [await c.ack() for _ in range(3)]
            assert [msa(a) for a in acks] == [("AA", "P1"), ("AA", "P2"), ("AA", "P3")]
            assert sub.max_per_peer[f"127.0.0.1:{c.local_port}"] == 1
        finally:
            await c.close()


async def test_connections_are_served_concurrently() -> None:
    sub = Tracking(*[0.2] * 5)
    async with listening(sub) as src:
        clients = [await Client.connect(src.port) for _ in range(5)]
        try:
            started = time.perf_counter()
            acks = await asyncio.gather(*(c.request(hl7(f"K{i}")) for i, c in enumerate(clients)))
            elapsed = time.perf_counter() - started
            assert [msa(a) for a in acks] == [("AA", f"K{i}") for i in range(5)]
            assert sub.max_total == 5, "all five submits should have been in flight together"
            assert elapsed < 0.8, f"five 0.2 s submits on five connections took {elapsed:.2f} s"
        finally:
            for c in clients:
                await c.close()


async def test_a_submit_that_never_returns_is_answered_ae_after_the_ack_timeout() -> None:
    sub = Hanging()
    async with listening(sub, ack_timeout_seconds=0.3) as src:
        c = await Client.connect(src.port)
        try:
            started = time.perf_counter()
            ack = await c.request(hl7("SLOW"))
            elapsed = time.perf_counter() - started
            assert msa(ack) == ("AE", "SLOW")
            assert err_code(ack) == "207"
            assert 0.25 <= elapsed < 2.0
            assert sub.cancelled, "the abandoned submit is cancelled, not left running"
            # the connection is still usable afterwards
            ack = await c.request(hl7("SLOW2"))
            assert msa(ack) == ("AE", "SLOW2")
            # counted and logged as journal errors: a hung database used to show in no metric but the AEs
            assert metric("gateway_journal_errors_total", src.name) == 2
        finally:
            await c.close()


class Broken:
    """Failure injection: a submitter with a bug."""

    async def submit(self, envelope: Envelope) -> SubmitResult:
        raise RuntimeError("bug")


async def test_a_submitter_that_raises_is_answered_ae_and_the_connection_goes_on() -> None:
    async with listening(Broken()) as src:
        c = await Client.connect(src.port)
        try:
            ack = await c.request(hl7("BUG1"))
            assert msa(ack) == ("AE", "BUG1") and err_code(ack) == "207"
            ack = await c.request(hl7("BUG2"))
            assert msa(ack) == ("AE", "BUG2")
        finally:
            await c.close()


async def test_connections_over_the_limit_are_closed_and_the_others_keep_working() -> None:
    name = unique_name()
    async with listening(Recording(), name=name, max_connections=2) as src:
        c1, c2 = await Client.connect(src.port), await Client.connect(src.port)
        try:
            # Both are registered once they have been answered.
            assert msa(await c1.request(hl7("A1"))) == ("AA", "A1")
            assert msa(await c2.request(hl7("A2"))) == ("AA", "A2")
            c3 = await Client.connect(src.port)
            try:
                assert await c3.eof(), "the third connection should be closed by the server"
            finally:
                await c3.close()
            assert metric("gateway_connections_refused_total", name) == 1
            assert msa(await c1.request(hl7("B1"))) == ("AA", "B1")
            assert msa(await c2.request(hl7("B2"))) == ("AA", "B2")
        finally:
            await c1.close()
            await c2.close()
        # a freed slot is available again (the server notices the closes asynchronously)
        for _ in range(100):
            if metric("gateway_open_connections", name) == 0:
                break
            await asyncio.sleep(0.02)
        c4 = await Client.connect(src.port)
        try:
            assert msa(await c4.request(hl7("D1"))) == ("AA", "D1")
        finally:
            await c4.close()


async def test_a_silent_connection_is_closed_after_the_idle_timeout() -> None:
    async with listening(Recording(), idle_timeout_seconds=0.3) as src:
        started = time.perf_counter()
        silent = await Client.connect(src.port)
        active = await Client.connect(src.port)
        closed_after: list[float] = []

        async def watch() -> None:
            if await silent.eof(within=WAIT):
                closed_after.append(time.perf_counter() - started)

        watcher = asyncio.create_task(watch())
        try:
            # The active one talks every 0.2 s: its timer restarts with each message.
            for i in range(3):
                await asyncio.sleep(0.2)
                assert msa(await active.request(hl7(f"I{i}"))) == ("AA", f"I{i}")
            await asyncio.wait_for(watcher, WAIT)
            assert len(closed_after) == 1 and 0.25 <= closed_after[0] < 0.55, closed_after
            assert await active.eof(within=2.0), "once silent, the active one times out too"
        finally:
            watcher.cancel()
            await silent.close()
            await active.close()


async def test_a_sender_that_takes_no_acks_is_closed_after_the_read_timeout() -> None:
    """ACKs the kernel cannot take any more wait in the transport's buffer; past read_timeout_seconds the
    connection is closed (the drain that waits for the buffer runs under that timer)."""
    async with listening(Recording(), read_timeout_seconds=0.5) as src:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a sender whose receive window stays small
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", src.port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        before = REGISTRY.get_sample_value("gateway_limit_hits_total", {"source": src.name, "limit": "write-timeout"})
        try:
            # Each ACK echoes the 60 KB MSH-5 as its MSH-3: 200 of them are more than the socket buffers hold.
            big = hl7("W").replace(b"|RECVAPP|", b"|" + b"R" * 60_000 + b"|")
            writer.write(framed(big) * 200)  # never drained, never reading: the sender is stuck, not gone
            deadline = time.perf_counter() + WAIT
            while time.perf_counter() < deadline:
                hits = REGISTRY.get_sample_value(
                    "gateway_limit_hits_total", {"source": src.name, "limit": "write-timeout"}
                )
                if (hits or 0.0) > (before or 0.0):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the stuck sender was not closed for its write timeout")
        finally:
            writer.transport.abort()


async def test_a_silent_connection_stays_open_before_the_idle_timeout() -> None:
    async with listening(Recording(), idle_timeout_seconds=5) as src:
        c = await Client.connect(src.port)
        try:
            assert not await c.eof(within=0.4)
            assert msa(await c.request(hl7("LATE"))) == ("AA", "LATE")
        finally:
            await c.close()


# -- framing ---------------------------------------------------------------------------------------------------


async def test_an_oversized_frame_is_answered_ar_and_the_next_frame_aa() -> None:
    sub = Recording()
    big = hl7("BIG", extra=b"NTE|1||" + b"x" * 2000 + b"\r")
    async with listening(sub, max_frame_bytes=1024) as src:
        c = await Client.connect(src.port)
        try:
            ack = await c.request(big)
            assert msa(ack) == ("AR", "BIG"), "the AR is addressed from the oversized frame's MSH"
            assert err_code(ack) == "207"
            assert sub.seen == [], "an oversized frame is not submitted"
            small = hl7("SMALL")
            assert msa(await c.request(small)) == ("AA", "SMALL")
            assert [e.payload for e in sub.seen] == [small]
        finally:
            await c.close()


async def test_a_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    sub = Recording()
    base = hl7("EXACT", extra=b"NTE|1||")
    exact = base + b"y" * (1024 - len(base))
    assert len(exact) == 1024
    async with listening(sub, max_frame_bytes=1024) as src:
        c = await Client.connect(src.port)
        try:
            assert msa(await c.request(exact)) == ("AA", "EXACT")
            assert sub.seen[0].payload == exact
        finally:
            await c.close()


async def test_bytes_before_the_start_block_are_ignored() -> None:
    sub = Recording()
    name = unique_name()
    async with listening(sub, name=name) as src:
        c = await Client.connect(src.port)
        try:
            before = (
                REGISTRY.get_sample_value("gateway_protocol_errors_total", {"source": name, "reason": "garbage"}) or 0.0
            )
            msg = hl7("AFTER-NOISE")
            await c.send(msg, raw=b"noise\r\n\x1c\rMSH|half")
            assert msa(await c.ack()) == ("AA", "AFTER-NOISE")
            assert [e.payload for e in sub.seen] == [msg]
            after = REGISTRY.get_sample_value("gateway_protocol_errors_total", {"source": name, "reason": "garbage"})
            assert after == before + 1
        finally:
            await c.close()


async def test_frames_sent_before_a_half_close_are_still_acked() -> None:
    async with listening(Recording()) as src:
        c = await Client.connect(src.port)
        try:
            await c.send(hl7("H1"), hl7("H2"))
            c.writer.write_eof()  # like `mllp_send` and many interface engines: send, shut down writing, read
            assert [msa(await c.ack()), msa(await c.ack())] == [("AA", "H1"), ("AA", "H2")]
            assert await c.eof()
        finally:
            await c.close()


async def test_a_frame_split_across_writes_is_reassembled() -> None:
    sub = Recording()
    msg = hl7("SPLIT")
    data = framed(msg)
    async with listening(sub) as src:
        c = await Client.connect(src.port)
        try:
            # split inside the payload and between 0x1C and 0x0D of the end block
            for part in (data[:10], data[10:-1], data[-1:]):
                c.writer.write(part)
                await c.writer.drain()
                await asyncio.sleep(0.05)
            assert msa(await c.ack()) == ("AA", "SPLIT")
            assert sub.seen[0].payload == msg
        finally:
            await c.close()


# -- stop ------------------------------------------------------------------------------------------------------


async def test_stop_lets_the_message_in_flight_finish_and_closes_idle_connections_at_once() -> None:
    sub = Gated()
    cfg = MllpSourceConfig(type="mllp", name=unique_name(), host="127.0.0.1", port=0)
    src = cfg.build(sub)
    await src.start()
    port = src.port
    busy = await Client.connect(port)
    idle = await Client.connect(port)
    stopper: asyncio.Task[None] | None = None
    try:
        assert msa(await idle.request(hl7("IDLE"))) == ("AA", "IDLE")
        await busy.send(hl7("HOLD"))
        await asyncio.wait_for(sub.entered.wait(), WAIT)

        stopper = asyncio.create_task(src.stop(5.0))
        assert await idle.eof(within=1.0), "an idle connection is closed by stop() at once"
        assert not stopper.done(), "stop() waits for the message in flight"
        with pytest.raises(OSError):  # no new connections while draining
            await Client.connect(port)

        sub.release.set()
        assert msa(await busy.ack()) == ("AA", "HOLD"), "the drained message still gets its ACK"
        await asyncio.wait_for(stopper, WAIT)
        assert await busy.eof(within=1.0)
        with pytest.raises(OSError):
            await Client.connect(port)
    finally:
        sub.release.set()
        if stopper is None:
            await src.stop(1.0)
        await busy.close()
        await idle.close()


async def test_stop_gives_up_on_a_message_after_the_drain_timeout() -> None:
    sub = Hanging()
    cfg = MllpSourceConfig(type="mllp", name=unique_name(), host="127.0.0.1", port=0)
    src = cfg.build(sub)
    await src.start()
    c = await Client.connect(src.port)
    try:
        await c.send(hl7("STUCK"))
        await asyncio.wait_for(sub.started.wait(), WAIT)
        started = time.perf_counter()
        await asyncio.wait_for(src.stop(0.3), WAIT)
        assert time.perf_counter() - started < 2.0
        assert sub.cancelled
        assert await c.eof(within=1.0)
    finally:
        await c.close()


# -- metrics ---------------------------------------------------------------------------------------------------


async def test_ack_latency_and_connections_are_counted_per_source() -> None:
    name = unique_name()
    other = unique_name()
    assert metric("gateway_ack_seconds_count", name) == 0
    async with listening(Recording(), name=name) as src, listening(Recording(), name=other):
        c1, c2 = await Client.connect(src.port), await Client.connect(src.port)
        try:
            await c1.request(hl7("M1"))
            await c1.request(hl7("M2"))
            await c2.request(hl7("M3"))
            assert metric("gateway_ack_seconds_count", name) == 3
            assert metric("gateway_ack_seconds_sum", name) > 0
            assert metric("gateway_connections_total", name) == 2
            assert metric("gateway_open_connections", name) == 2
            assert metric("gateway_ack_seconds_count", other) == 0
            assert metric("gateway_connections_total", other) == 0
        finally:
            await c1.close()
            await c2.close()


# -- source contract: the real pipeline and journal ------------------------------------------------------------

ADT_A01 = (
    "MSH|^~\\&|ADMIT|HOSP|GATEWAY|HOSP|20240101120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
    "EVN|A01|20240101120000\r"
    "PID|1||MRN-{cid}^^^HOSP^MR||Doe^John||19800101|M\r"
    "PV1|1|I|WARD^1^A\r"
)


def adt(cid: str) -> bytes:
    return ADT_A01.format(cid=cid).encode()


async def rows(journal: Journal, control_id: str | None = None) -> int:
    assert journal.db is not None
    stmt = select(func.count()).select_from(messages)
    if control_id is not None:
        stmt = stmt.where(messages.c.control_id == control_id)
    return await journal.db.read(lambda conn: int(conn.execute(stmt).scalar_one()))


def router() -> Router:
    return Router([Route("all", ("store",))])


async def test_contract_ack_after_commit_and_a_duplicate_is_one_row(db_url: str) -> None:
    name = unique_name()
    journal = Journal(db_url)
    await journal.open()
    try:
        async with listening(Pipeline(journal, router()), name=name) as src:
            c = await Client.connect(src.port)
            try:
                msg = adt("ADM-1")
                assert msa(await c.request(msg)) == ("AA", "ADM-1")
                assert await rows(journal, "ADM-1") == 1, "AA only once the message is in the journal"
                assert msa(await c.request(msg)) == ("AA", "ADM-1")
                assert await rows(journal) == 1
                counts = await journal.counts()
                assert counts == {"messages.accepted": 1, "outbox.pending": 1}
            finally:
                await c.close()
        assert metric("gateway_connections_total", name) == 1
        assert metric("gateway_ack_seconds_count", name) == 2
        assert (
            REGISTRY.get_sample_value("gateway_messages_total", {"source": name, "kind": "hl7v2", "status": "accepted"})
            == 1
        )
        assert metric("gateway_duplicates_total", name) == 1
    finally:
        await journal.close()


async def test_contract_journal_unavailable_is_ae_and_the_resend_is_stored_once(db_url: str) -> None:
    name = unique_name()
    journal = Journal(db_url)
    await journal.open()
    try:
        async with listening(Pipeline(journal, router()), name=name) as src:
            c = await Client.connect(src.port)
            try:
                assert msa(await c.request(adt("FIRST"))) == ("AA", "FIRST")
                await journal.close()
                ack = await c.request(adt("SECOND"))
                assert msa(ack) == ("AE", "SECOND")
                assert err_code(ack) == "207"
            finally:
                await c.close()
        assert metric("gateway_journal_errors_total", name) == 1
    finally:
        await journal.close()

    journal = Journal(db_url)
    await journal.open()
    try:
        async with listening(Pipeline(journal, router()), name=name) as src:
            c = await Client.connect(src.port)
            try:
                assert msa(await c.request(adt("SECOND"))) == ("AA", "SECOND")
                assert msa(await c.request(adt("SECOND"))) == ("AA", "SECOND")
            finally:
                await c.close()
        assert await rows(journal, "SECOND") == 1
        assert await rows(journal, "FIRST") == 1
        assert await rows(journal) == 2
    finally:
        await journal.close()


async def test_contract_unsupported_version_is_quarantined_and_answered_ar(db_url: str) -> None:
    journal = Journal(db_url)
    await journal.open()
    try:
        async with listening(Pipeline(journal, router())) as src:
            c = await Client.connect(src.port)
            try:
                ack = await c.request(hl7("OLD", version="9.9"))
                assert msa(ack) == ("AR", "OLD")
                assert err_code(ack) == "203"
            finally:
                await c.close()
        assert await journal.counts() == {"messages.quarantined": 1}
    finally:
        await journal.close()


async def test_at_the_limit_a_new_sender_evicts_the_longest_silent_connection() -> None:
    name = unique_name()
    async with listening(Recording(), name=name, max_connections=2, evict_idle_seconds=0.2) as src:
        old = await Client.connect(src.port)  # silent, e.g. left over from a crashed engine
        await asyncio.sleep(0.1)
        busy = await Client.connect(src.port)
        await busy.request(hl7("KEEP1"))
        await asyncio.sleep(0.25)  # both silent now; "old" longer
        await busy.request(hl7("KEEP2"))  # "busy" talks again: only "old" is over the threshold
        new = await Client.connect(src.port)
        try:
            assert msa(await new.request(hl7("NEW1"))) == ("AA", "NEW1")
            assert await old.eof(), "the longest silent connection was closed"
            assert msa(await busy.request(hl7("KEEP3"))) == ("AA", "KEEP3")
            evicted = REGISTRY.get_sample_value("gateway_protocol_errors_total", {"source": name, "reason": "evicted"})
            assert evicted == 1.0
        finally:
            for c in (old, busy, new):
                await c.close()


async def test_at_the_limit_recently_active_connections_are_not_evicted() -> None:
    async with listening(Recording(), max_connections=1, evict_idle_seconds=30) as src:
        first = await Client.connect(src.port)
        await first.request(hl7("A1"))
        second = await Client.connect(src.port)
        try:
            assert await second.eof(), "refused: the only connection is not idle long enough"
            assert msa(await first.request(hl7("A2"))) == ("AA", "A2")
        finally:
            await first.close()
            await second.close()
