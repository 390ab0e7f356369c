"""The two places adapters/mqtt/client.py reaches under aiomqtt and paho-mqtt, checked without a broker: joined
PUBACKs are byte for byte what paho's ``ack`` sends, and the shared property tables parse like paho's own."""

from __future__ import annotations

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.client import _SharedTableProperties, puback_sender


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
