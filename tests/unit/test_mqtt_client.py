"""The places adapters/mqtt/client.py reaches under aiomqtt and paho-mqtt, checked without a broker: joined
PUBACKs are byte for byte what paho's ``ack`` sends, the shared property tables parse like paho's own, received
messages have paho's fields, and the buffered socket reads like the real one."""

from __future__ import annotations

import socket

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.client import _BufferedSocket, _SharedTableProperties, puback_sender


def queued(client: paho.Client) -> list[bytes]:
    return [bytes(p["packet"]) for p in client._out_packet]


def test_joined_pubacks_are_the_bytes_paho_ack_would_send() -> None:
    one = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, manual_ack=True)
    for mid in (1, 300, 65535):
        one.ack(mid, 1)
    joined = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, manual_ack=True)
    puback_sender(joined)([1, 300, 65535])
    assert queued(joined) == [b"".join(queued(one))]
    assert queued(joined)[0] == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x2c" + b"\x40\x02\xff\xff"


def test_no_ids_send_nothing() -> None:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, manual_ack=True)
    puback_sender(c)([])
    assert queued(c) == []


def test_shared_tables_read_the_same_properties_as_paho() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("a", "1"), ("b", "2")]
    props.MessageExpiryInterval = 60
    wire = props.pack()  # type: ignore[no-untyped-call]
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.unpack(wire)  # type: ignore[no-untyped-call]
    ours = _SharedTableProperties(PacketTypes.PUBLISH)
    ours.unpack(wire)  # type: ignore[no-untyped-call]
    assert ours.UserProperty == theirs.UserProperty == [("a", "1"), ("b", "2")]
    assert ours.MessageExpiryInterval == theirs.MessageExpiryInterval == 60
    assert not hasattr(_SharedTableProperties(PacketTypes.PUBLISH), "UserProperty")


def test_received_messages_carry_the_fields_paho_gives_them_and_info_only_when_asked() -> None:
    from adapters.mqtt.client import _PAHO_MESSAGE, _ReceivedMessage

    for args in ((), (7, b"a/b")):
        theirs, ours = _PAHO_MESSAGE(*args), _ReceivedMessage(*args)
        for name in _PAHO_MESSAGE.__slots__:
            if name != "info":
                assert getattr(ours, name) == getattr(theirs, name), name
        with pytest.raises(AttributeError):
            _ReceivedMessage._info_slot.__get__(ours)  # nothing made yet
        assert ours.info.mid == theirs.info.mid and ours.info is ours.info
        ours.info._set_as_published()  # paho's publish path: the condition works
        assert ours.info.is_published()


def test_lighten_paho_makes_publish_still_hand_out_its_info() -> None:
    from adapters.mqtt.client import _ReceivedMessage, lighten_paho

    lighten_paho()
    assert paho.MQTTMessage is _ReceivedMessage
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    info = c.publish("t", b"x", qos=1)  # not connected: queued, and its info says which mid
    assert isinstance(info, paho.MQTTMessageInfo) and info.mid == 1
    assert c._out_messages[1].info is info


def test_the_buffered_socket_serves_small_reads_from_one_large_one() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        calls: list[int] = []

        class Counting:
            def recv(self, n: int) -> bytes:
                calls.append(n)
                return b.recv(n)

            def fileno(self) -> int:
                return b.fileno()

        s = _BufferedSocket(Counting())
        a.sendall(b"\x30\x05hello" + b"\x30\x03abc")
        assert s.recv(1) == b"\x30" and s.recv(1) == b"\x05" and s.recv(5) == b"hello"
        assert s.pending() == 5  # the second packet, already read: aiomqtt keeps calling loop_read
        assert s.recv(1) == b"\x30" and s.recv(100) == b"\x03abc"
        assert s.pending() == 0 and calls == [_BufferedSocket.CHUNK]
        with pytest.raises(BlockingIOError):
            s.recv(1)  # nothing buffered, nothing on the socket: paho's "try again later"
        a.sendall(b"xy")
        assert s.recv(1) == b"x" and s.recv(5) == b"y"
        a.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""  # the peer closed: paho sees the end of the connection
        assert s.fileno() == b.fileno()  # everything else is the real socket's
