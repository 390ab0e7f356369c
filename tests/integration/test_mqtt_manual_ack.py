"""The guard under PUBACK-after-commit: paho's manual acknowledgement reached through aiomqtt.

aiomqtt 2.x sends the PUBACK of a QoS 1 message from paho's callback, before the application sees it (aiomqtt
issue #345). adapters/mqtt/client.py turns that off. These tests fail if a new aiomqtt or paho-mqtt breaks it: a
message received but not acknowledged must come back when the session resumes, and one acknowledged with
``ack(mid, 1)`` must not. The last test pins the upstream behaviour we work around, so a fix upstream is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import aiomqtt
import pytest

from adapters.mqtt.client import (
    ManualAckUnavailable,
    _BufferedSocket,
    connect_properties,
    enable_manual_ack,
    paho_client,
    puback_sender,
    read_in_chunks,
    share_property_tables,
)
from tests.integration.mqtt_helpers import BROKER, mosquitto_pub, mosquitto_pub_lines, need_mosquitto, unique_topic

WAIT = 5.0


def client(client_id: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        *BROKER,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=connect_properties(SessionExpiryInterval=60),
    )


async def receive(c: aiomqtt.Client, n: int, seconds: float = WAIT) -> list[aiomqtt.Message]:
    out: list[aiomqtt.Message] = []
    try:
        async with asyncio.timeout(seconds):
            async for m in c.messages:
                out.append(m)
                if len(out) == n:
                    break
    except TimeoutError:
        pass
    return out


async def session(client_id: str, topic: str, *, manual: bool, ack: bool, expect: int) -> list[bytes]:
    """Connect (resuming the session), collect ``expect`` messages (or what arrives in WAIT), ack if asked."""
    c = client(client_id)
    inner = enable_manual_ack(c) if manual else None
    async with c:
        await c.subscribe(topic, qos=1)
        got = await receive(c, expect, WAIT if expect else 1.5)
        if ack and inner is not None:
            for m in got:
                inner.ack(m.mid, m.qos)
            await asyncio.sleep(0.3)  # let the PUBACKs leave before DISCONNECT
    return [bytes(m.payload) for m in got if isinstance(m.payload, bytes | bytearray)]


async def clean_up(client_id: str) -> None:
    c = aiomqtt.Client(*BROKER, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5, clean_start=True)
    async with c:
        pass


@pytest.fixture(autouse=True)
def _broker() -> None:
    need_mosquitto()


async def test_a_message_received_but_not_acknowledged_is_redelivered() -> None:
    topic, cid = unique_topic(), f"gw-test-{secrets.token_hex(4)}"
    await session(cid, topic, manual=True, ack=False, expect=0)  # create the session and its subscription
    mosquitto_pub(topic, b"reading-1")
    try:
        assert await session(cid, topic, manual=True, ack=False, expect=1) == [b"reading-1"]
        # not acknowledged: the broker sends it again when the session resumes
        assert await session(cid, topic, manual=True, ack=True, expect=1) == [b"reading-1"]
        # acknowledged now: nothing comes back
        assert await session(cid, topic, manual=True, ack=False, expect=0) == []
    finally:
        await clean_up(cid)


async def test_the_guard_finds_paho_and_turns_automatic_acks_off() -> None:
    c = client("gw-test-guard")
    inner = enable_manual_ack(c)
    assert inner is paho_client(c)
    assert inner._manual_ack is True


async def test_the_guard_refuses_a_client_without_paho_inside() -> None:
    class NotAClient:
        _client = object()

    with pytest.raises(ManualAckUnavailable):
        enable_manual_ack(NotAClient())  # type: ignore[arg-type]


async def test_plain_aiomqtt_acknowledges_before_the_application_sees_the_message() -> None:
    """aiomqtt #345, the reason for the guard: without manual ack, a message the application never processed
    is not redelivered. If this starts failing, upstream changed and adapters/mqtt/client.py can be revisited."""
    topic, cid = unique_topic(), f"gw-test-{secrets.token_hex(4)}"
    await session(cid, topic, manual=False, ack=False, expect=0)
    mosquitto_pub(topic, b"reading-1")
    try:
        assert await session(cid, topic, manual=False, ack=False, expect=1) == [b"reading-1"]
        assert await session(cid, topic, manual=False, ack=False, expect=0) == []
    finally:
        await clean_up(cid)


async def test_mqtt5_properties_still_parse_with_the_shared_property_tables() -> None:
    """share_property_tables() swaps paho's Properties for a subclass that builds its tables once."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    share_property_tables()
    topic = unique_topic()
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("device-class", "pulse-oximeter")]
    props.ContentType = "application/json"
    async with aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5) as sub:
        await sub.subscribe(topic, qos=1)
        async with aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5) as pub:
            await pub.publish(topic, b"{}", qos=1, properties=props)
        (m,) = await receive(sub, 1)
    assert m.properties is not None
    assert type(m.properties).__name__ == "_SharedTableProperties"
    assert m.properties.UserProperty == [("device-class", "pulse-oximeter")]
    assert m.properties.ContentType == "application/json"
    fresh = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    assert not hasattr(fresh, "UserProperty"), "instances must not share property values"


async def test_reading_in_chunks_hooks_the_socket_and_a_burst_arrives_whole_and_in_order() -> None:
    """read_in_chunks() wraps the socket paho opens, through aiomqtt's socket callback; packets split across
    chunks (one larger than a chunk) and many packets in one chunk all arrive, in order."""
    topic = unique_topic()
    lines = [b"reading-%d" % i for i in range(300)]
    lines[150] = b"x" * (3 * _BufferedSocket.CHUNK + 17)
    c = aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5)
    inner = enable_manual_ack(c)
    read_in_chunks(inner)
    async with c:
        assert isinstance(inner._sock, _BufferedSocket)
        await c.subscribe(topic, qos=1)
        await asyncio.to_thread(mosquitto_pub_lines, topic, lines)
        got: list[aiomqtt.Message] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                async for m in c.messages:  # acknowledged as they come: the broker's window may be small
                    got.append(m)
                    puback_sender(inner)([m.mid])
                    if len(got) == len(lines):
                        break
        await asyncio.sleep(0.2)
    assert [bytes(m.payload) for m in got if isinstance(m.payload, bytes)] == lines
