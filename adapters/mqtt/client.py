"""Building aiomqtt clients, and the one place that reaches under aiomqtt to acknowledge manually.

aiomqtt (2.x) lets paho-mqtt send the PUBACK of a QoS 1 message from paho's receive callback, before the
application has seen the message (aiomqtt issue #345): a reading the broker thinks delivered could be lost in a
crash before it is committed. paho-mqtt 2.x can leave the PUBACK to the application (``manual_ack_set(True)``,
then ``ack(mid, qos)``). aiomqtt exposes neither, so :func:`enable_manual_ack` sets it on aiomqtt's paho client
(``Client._client``). Both versions are pinned in pyproject.toml, and tests/integration/test_mqtt_manual_ack.py
fails if a new version breaks this (the broker must redeliver a message received but not acknowledged).
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.config import BrokerConfig
from gateway.crypto import read_secret
from gateway.errors import ConfigError
from gateway.tls import ReloadableContext

log = logging.getLogger(__name__)


class ManualAckUnavailable(ConfigError):
    """The installed aiomqtt/paho-mqtt no longer offer what PUBACK-after-commit needs."""


def paho_client(client: aiomqtt.Client) -> paho.Client:
    inner = getattr(client, "_client", None)
    if not isinstance(inner, paho.Client) or not callable(getattr(inner, "manual_ack_set", None)):
        raise ManualAckUnavailable(
            "this aiomqtt/paho-mqtt version does not expose paho's manual acknowledgement; install the versions "
            "pinned in pyproject.toml (PUBACK after commit depends on it)"
        )
    return inner


def enable_manual_ack(client: aiomqtt.Client) -> paho.Client:
    """Turn off paho's automatic PUBACK for this client (before it connects); return the paho client whose
    ``ack(mid, 1)`` then sends it."""
    inner = paho_client(client)
    inner.manual_ack_set(True)
    if getattr(inner, "_manual_ack", None) is not True:
        raise ManualAckUnavailable("paho-mqtt did not turn on manual acknowledgement")
    return inner


_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2 (reason code 0 omitted), packet id


def puback_sender(inner: paho.Client) -> Callable[[Sequence[int]], None]:
    """A function that acknowledges QoS 1 packet ids, several in one write.

    paho's ``ack(mid, 1)`` queues one 4-byte packet per message, and each becomes its own ``send`` (with an
    epoll registration around it): about a third of the CPU of receiving a reading. After a group commit,
    hundreds of readings are acknowledged at once, so their PUBACKs are joined into one queued write through
    paho's own queue (``_packet_queue``, the call ``ack`` ends in). The bytes are exactly those ``ack`` would
    send. Falls back to ``ack`` per id where paho lacks the method."""
    queue = getattr(inner, "_packet_queue", None)
    if callable(queue):

        def send_joined(mids: Sequence[int]) -> None:
            if mids:
                queue(paho.PUBACK, b"".join([_PUBACK.pack(paho.PUBACK, 2, m) for m in mids]), 0, 1)

        return send_joined

    def send_each(mids: Sequence[int]) -> None:
        for m in mids:
            inner.ack(m, 1)

    return send_each


class _SharedTableProperties(Properties):
    """paho's ``Properties`` builds its lookup tables (property names, ids, types and the packets each may
    appear in: about 40 entries) anew for every packet, and every received MQTT 5 PUBLISH gets one: about 40 %
    of the CPU paho spends receiving a reading. The tables are constants that paho only reads, so this subclass
    builds them once and shares them. Installed by :func:`share_property_tables` for the pinned paho-mqtt;
    tests/integration/test_mqtt_manual_ack.py checks that MQTT 5 properties still parse."""

    _tables: ClassVar[tuple[Any, Any, Any] | None] = None

    def __init__(self, packetType: int) -> None:  # paho's parameter name
        tables = _SharedTableProperties._tables
        if tables is None:
            proto = Properties(packetType)  # type: ignore[no-untyped-call]
            tables = _SharedTableProperties._tables = (proto.types, proto.names, proto.properties)
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", tables[0])
        object.__setattr__(self, "names", tables[1])
        object.__setattr__(self, "properties", tables[2])


def share_property_tables() -> None:
    """Make paho's client build packet properties with shared tables (see _SharedTableProperties)."""
    if getattr(paho, "Properties", None) is Properties:
        setattr(paho, "Properties", _SharedTableProperties)  # noqa: B010 (not exported, so no attribute syntax)


def read_password(cfg: BrokerConfig) -> str | None:
    if cfg.password_file is not None:
        text = read_secret(cfg.password_file, "MQTT password file").decode("utf-8", "replace")
        return text.splitlines()[0] if text else ""
    return cfg.password


def tls_context(cfg: BrokerConfig, name: str) -> ReloadableContext | None:
    """The TLS context holder (files read now: ConfigError when they do not load). Each new connection takes
    its current context, so certificates renewed and reloaded on SIGHUP are used from the next reconnect."""
    return ReloadableContext.client(cfg.tls, name) if cfg.tls is not None else None


def connect_properties(**values: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def make_client(
    cfg: BrokerConfig,
    identifier: str,
    *,
    password: str | None,
    tls: ssl.SSLContext | None,
    clean_start: bool,
    properties: Properties | None = None,
    **extra: Any,
) -> aiomqtt.Client:
    """An MQTT 5 client for ``cfg`` (not yet connected)."""
    share_property_tables()
    return aiomqtt.Client(
        cfg.host,
        cfg.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=clean_start,
        properties=properties,
        username=cfg.username,
        password=password,
        tls_context=tls,
        keepalive=cfg.keepalive_seconds,
        timeout=cfg.connect_timeout_seconds,
        logger=log,
        **extra,
    )
