"""MLLP over TLS, in-process, with real TLS clients: mutual TLS (no certificate, another CA's, an expired one, an
allowed one, one not on the allow-list), handshake timeouts, and the connection limits and read timeouts that end
slow senders while others are served."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from adapters.mllp.config import MllpSourceConfig
from adapters.mllp.source import MllpSource
from gateway.tls import ClientTLS, ServerTLS, client_context
from tests.integration.test_mllp_source import END, START, WAIT, Recording, framed, hl7, msa, unique_name
from tests.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def limit_hits(source: str, limit: str) -> float:
    return REGISTRY.get_sample_value("gateway_limit_hits_total", {"source": source, "limit": limit}) or 0.0


def tls_refused(source: str, reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_tls_refused_total", {"source": source, "reason": reason}) or 0.0


@asynccontextmanager
async def listening(submitter: Any, **options: Any) -> AsyncIterator[MllpSource]:
    cfg = MllpSourceConfig(type="mllp", name=unique_name(), host="127.0.0.1", port=0, **options)
    src = cfg.build(submitter)
    await src.start()
    try:
        yield src
    finally:
        await src.stop(1.0)


def mtls(pki: Pki, **extra: Any) -> ServerTLS:
    return ServerTLS(
        cert=pki.p("server.pem"),
        key=pki.p("server.key"),
        client_ca=pki.p("ca.pem"),
        require_client_cert=True,
        **extra,
    )


def client(pki: Pki, name: str | None) -> ssl.SSLContext:
    if name is None:
        return client_context(ClientTLS(ca=pki.p("ca.pem")))
    return client_context(ClientTLS(ca=pki.p("ca.pem"), cert=pki.p(f"{name}.pem"), key=pki.p(f"{name}.key")))


async def exchange(port: int, ctx: ssl.SSLContext | None, message: bytes) -> bytes:
    """Connect (over TLS when ``ctx``), send one framed message, return what came back before the close: an
    ACK frame, or b"" when the server refused the connection."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None), WAIT
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(framed(message))
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(END), WAIT)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return b""
    finally:
        writer.close()
        with suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


def ack_code(data: bytes) -> str:
    from gateway.hl7v2.parse import parse

    assert data.startswith(START), data[:20]
    return msa(parse(data[1:-2]))[0]


async def test_mutual_tls_accepts_only_verified_client_certificates(pki: Pki) -> None:
    seen = Recording()
    async with listening(seen, tls=mtls(pki)) as src:
        assert ack_code(await exchange(src.port, client(pki, "client"), hl7("OK1"))) == "AA"
        assert await exchange(src.port, client(pki, None), hl7("NOCERT")) == b""
        assert await exchange(src.port, client(pki, "rogue"), hl7("ROGUE")) == b""
        assert await exchange(src.port, client(pki, "expired"), hl7("EXPIRED")) == b""
        assert await exchange(src.port, None, hl7("PLAIN")) == b""  # plain MLLP on a TLS port
        assert ack_code(await exchange(src.port, client(pki, "client"), hl7("OK2"))) == "AA"
        assert tls_refused(src.name, "handshake-failed") == 4
    assert [e.payload.split(b"|")[9] for e in seen.seen] == [b"OK1", b"OK2"]


async def test_the_allow_list_refuses_a_verified_certificate_not_on_it(pki: Pki) -> None:
    seen = Recording()
    async with listening(seen, tls=mtls(pki, allowed_subjects=("CN=modality-1",))) as src:
        assert ack_code(await exchange(src.port, client(pki, "client"), hl7("M1"))) == "AA"
        assert await exchange(src.port, client(pki, "client2"), hl7("M2")) == b""
        assert tls_refused(src.name, "not-allowed") == 1
    from cryptography.hazmat.primitives import hashes

    fingerprint = pki.client.cert.fingerprint(hashes.SHA256()).hex()
    async with listening(seen, tls=mtls(pki, allowed_fingerprints=(fingerprint,))) as src:
        assert ack_code(await exchange(src.port, client(pki, "client"), hl7("M3"))) == "AA"
        assert await exchange(src.port, client(pki, "client2"), hl7("M4")) == b""
    assert [e.payload.split(b"|")[9] for e in seen.seen] == [b"M1", b"M3"]


async def test_tls_without_client_certificates(pki: Pki) -> None:
    tls = ServerTLS(cert=pki.p("server.pem"), key=pki.p("server.key"))
    async with listening(Recording(), tls=tls) as src:
        assert ack_code(await exchange(src.port, client(pki, None), hl7("T1"))) == "AA"
        # A client that does not trust the server's CA refuses it.
        other = client_context(ClientTLS(ca=pki.p("other-ca.pem")))
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", src.port, ssl=other, server_hostname="localhost")


async def test_a_client_that_never_starts_the_handshake_is_cut_off(pki: Pki) -> None:
    tls = mtls(pki, handshake_timeout_seconds=0.3)
    async with listening(Recording(), tls=tls) as src:
        reader, writer = await asyncio.open_connection("127.0.0.1", src.port)
        data = await asyncio.wait_for(reader.read(100), WAIT)  # closed by the server, not by us
        assert data == b""
        writer.close()
        assert tls_refused(src.name, "handshake-timeout") == 1
        assert limit_hits(src.name, "handshake-timeout") == 1
        assert ack_code(await exchange(src.port, client(pki, "client"), hl7("AFTER"))) == "AA"


async def test_a_slowloris_sender_is_cut_off_while_others_are_served() -> None:
    async with listening(Recording(), read_timeout_seconds=0.6, idle_timeout_seconds=30) as src:
        reader, writer = await asyncio.open_connection("127.0.0.1", src.port)
        message = framed(hl7("SLOW"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = False

        async def dribble() -> None:
            nonlocal closed
            for b in message:  # one byte every 50 ms: never idle, never done
                try:
                    writer.write(bytes([b]))
                    await writer.drain()
                except ConnectionError:
                    break
                await asyncio.sleep(0.05)

        dribbler = asyncio.create_task(dribble())
        # Meanwhile a well-behaved sender is served at once, several times.
        for i in range(5):
            assert ack_code(await exchange(src.port, None, hl7(f"FAST{i}"))) == "AA"
        data = await asyncio.wait_for(reader.read(100), WAIT)
        closed = data == b""
        elapsed = loop.time() - started
        dribbler.cancel()
        with suppress(asyncio.CancelledError):
            await dribbler
        writer.close()
        assert closed
        assert 0.5 < elapsed < 3.0, elapsed
        assert limit_hits(src.name, "read-timeout") == 1


async def test_the_read_timeout_does_not_cut_a_sender_between_messages() -> None:
    """The deadline runs from a message's first byte: a sender pausing between whole messages is fine."""
    async with listening(Recording(), read_timeout_seconds=0.3, idle_timeout_seconds=30) as src:
        reader, writer = await asyncio.open_connection("127.0.0.1", src.port)
        for i in range(3):
            writer.write(framed(hl7(f"P{i}")))
            await writer.drain()
            assert ack_code(await asyncio.wait_for(reader.readuntil(END), WAIT)) == "AA"
            await asyncio.sleep(0.4)
        writer.close()
        assert limit_hits(src.name, "read-timeout") == 0


async def test_connections_per_peer_are_limited() -> None:
    async with listening(Recording(), max_connections_per_peer=2) as src:
        held = [await asyncio.open_connection("127.0.0.1", src.port) for _ in range(2)]
        for r, w in held:
            w.write(framed(hl7("HELD")))
            await w.drain()
            assert ack_code(await asyncio.wait_for(r.readuntil(END), WAIT)) == "AA"
        assert await exchange(src.port, None, hl7("THIRD")) == b""
        assert limit_hits(src.name, "per-peer-connections") == 1
        _, w0 = held.pop()
        w0.close()
        await w0.wait_closed()
        await asyncio.sleep(0.1)
        assert ack_code(await exchange(src.port, None, hl7("AGAIN"))) == "AA"
        for _, w in held:
            w.close()


async def test_the_listener_refuses_to_start_with_a_bad_key(tmp_path: Path, pki: Pki) -> None:
    from gateway.errors import ConfigError

    cfg = MllpSourceConfig(
        type="mllp", name=unique_name(), port=0, tls=ServerTLS(cert=pki.p("server.pem"), key=pki.p("client.key"))
    )
    with pytest.raises(ConfigError, match="do not load together"):
        await cfg.build(Recording()).start()


async def test_a_reload_serves_new_connections_with_the_new_certificate_and_keeps_old_ones(
    tmp_path: Path, pki: Pki
) -> None:
    import shutil

    from gateway.commands.certs import issue
    from gateway.tls import PeerCertificate, reload_all

    shutil.copy(pki.path("server.pem"), tmp_path / "server.pem")
    shutil.copy(pki.path("server.key"), tmp_path / "server.key")
    tls = mtls(pki)
    tls = tls.model_copy(update={"cert": str(tmp_path / "server.pem"), "key": str(tmp_path / "server.key")})
    async with listening(Recording(), tls=tls) as src:
        ctx = client(pki, "client")
        r1, w1 = await asyncio.open_connection("127.0.0.1", src.port, ssl=ctx, server_hostname="localhost")
        w1.write(framed(hl7("B1")))
        assert ack_code(await asyncio.wait_for(r1.readuntil(END), WAIT)) == "AA"
        issue(pki.ca, "renewed", server=True, dns_names=("localhost",)).write(
            tmp_path / "server.pem", tmp_path / "server.key"
        )
        assert reload_all() == []
        r2, w2 = await asyncio.open_connection("127.0.0.1", src.port, ssl=ctx, server_hostname="localhost")
        der = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert PeerCertificate.from_der(der).common_name == "renewed"
        w2.write(framed(hl7("A1")))
        assert ack_code(await asyncio.wait_for(r2.readuntil(END), WAIT)) == "AA"
        w1.write(framed(hl7("B2")))
        assert ack_code(await asyncio.wait_for(r1.readuntil(END), WAIT)) == "AA"
        for w in (w1, w2):
            w.close()


async def test_an_ack_never_carries_an_end_block_from_the_message_it_answers() -> None:
    """MSH fields echoed into the ACK may end in 0x1C when the sender separates segments with LF; the ACK must
    still arrive as one frame (found by tests/fuzz/test_properties.py)."""
    message = b"MSH|^~\\&|A\x1c|B|C|D|20240101||ADT^A01|X1\x1c|P|2.5\x1c\nPID|1||M^^^H^MR||Doe^J\n"
    async with listening(Recording()) as src:
        reply = await exchange(src.port, None, message)
        assert reply.startswith(START) and reply.endswith(END)
        assert reply.count(END) == 1
        assert b"MSA|" in reply


async def test_only_allowed_addresses_may_connect() -> None:
    async with listening(Recording(), allowed_peers=("10.0.0.0/8", "::1")) as src:
        assert await exchange(src.port, None, hl7("NOPE")) == b""
        assert limit_hits(src.name, "address-not-allowed") == 1
    async with listening(Recording(), allowed_peers=("10.0.0.0/8", "127.0.0.1")) as src:
        assert ack_code(await exchange(src.port, None, hl7("YES"))) == "AA"
    with pytest.raises(ValueError, match="not an IP address"):
        MllpSourceConfig(type="mllp", allowed_peers=("modality.example.org",))


async def test_with_tls_refused_addresses_and_handshake_floods_cost_no_handshake(pki: Pki) -> None:
    tls = mtls(pki, handshake_timeout_seconds=5)
    async with listening(Recording(), tls=tls, allowed_peers=("10.0.0.0/8",)) as src:
        assert await exchange(src.port, client(pki, "client"), hl7("NOPE")) == b""
        assert limit_hits(src.name, "address-not-allowed") == 1
        assert tls_refused(src.name, "handshake-failed") == 0  # refused before any handshake
    async with listening(Recording(), tls=tls, max_connections=2) as src:
        # Two clients that connect and never say hello hold the two handshake slots; a third is refused at once,
        # and once they are gone a real client is served.
        idle = [await asyncio.open_connection("127.0.0.1", src.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", src.port)
        assert await asyncio.wait_for(reader.read(10), WAIT) == b""
        writer.close()
        assert limit_hits(src.name, "pending-handshakes") == 1
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.2)
        assert ack_code(await exchange(src.port, client(pki, "client"), hl7("AFTER"))) == "AA"
