"""Building aiomqtt clients, and the one place that reaches under aiomqtt to acknowledge manually.

aiomqtt (2.x) lets paho-mqtt send the PUBACK of a QoS 1 message from paho's receive callback, before the
application has seen the message (aiomqtt issue #345): a reading the broker thinks delivered could be lost in a
crash before it is committed. paho-mqtt 2.x can leave the PUBACK to the application (``manual_ack_set(True)``,
then ``ack(mid, qos)``). aiomqtt exposes neither, so :func:`enable_manual_ack` sets it on aiomqtt's paho client
(``Client._client``). Both versions are pinned in pyproject.toml, and tests/integration/test_mqtt_manual_ack.py
fails if a new version breaks this (the broker must redeliver a message received but not acknowledged).

The per-message savings that reach into paho live here too (:func:`lighten_paho`, :func:`read_in_chunks`,
:func:`puback_sender`), each guarded by tests/unit/test_mqtt_client.py and test_mqtt_manual_ack.py.
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

    def clear(self) -> None:
        """paho's ``unpack`` starts with ``clear()``, which tries all ~40 property names on an object that
        was created a moment ago and holds none; values live in the instance dict next to the four table
        attributes, so dropping the rest is the same."""
        values = self.__dict__
        for name in [n for n in values if n not in _TABLE_ATTRIBUTES]:
            del values[name]


_TABLE_ATTRIBUTES = frozenset({"packetType", "types", "names", "properties"})


_PAHO_MESSAGE = paho.MQTTMessage


class _ReceivedMessage(paho.MQTTMessage):
    """paho's ``MQTTMessage`` makes an ``MQTTMessageInfo`` (a ``threading.Condition`` and its lock) for every
    message, received ones too, although only ``publish()`` hands it out: a tenth of the daemon's Python
    time per reading in a profile. Here ``info`` is made when first read (``publish()`` reads it at once, on its own
    thread, so no other thread can race for it). Installed by :func:`lighten_paho` for the pinned paho-mqtt;
    tests/unit/test_mqtt_client.py checks the fields match paho's."""

    __slots__ = ()
    _info_slot: ClassVar[Any] = paho.MQTTMessage.__dict__["info"]  # the base class's slot descriptor

    def __init__(self, mid: int = 0, topic: bytes = b"") -> None:  # paho's fields, less the eager info
        self.timestamp = 0.0
        self.state = paho.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = b""
        self.qos = 0
        self.retain = False
        self.properties = None

    @property
    def info(self) -> paho.MQTTMessageInfo:
        try:
            info: paho.MQTTMessageInfo = _ReceivedMessage._info_slot.__get__(self)
            return info
        except AttributeError:
            made = paho.MQTTMessageInfo(self.mid)
            _ReceivedMessage._info_slot.__set__(self, made)
            return made

    @info.setter
    def info(self, value: paho.MQTTMessageInfo) -> None:
        _ReceivedMessage._info_slot.__set__(self, value)


def share_property_tables() -> None:
    """Make paho's client build packet properties with shared tables (see _SharedTableProperties)."""
    if getattr(paho, "Properties", None) is Properties:
        setattr(paho, "Properties", _SharedTableProperties)  # noqa: B010 (not exported, so no attribute syntax)


def lighten_paho() -> None:
    """The per-message savings that hold for every paho client of the process: shared property tables, and
    message info made only when asked for (see _ReceivedMessage)."""
    share_property_tables()
    if getattr(paho, "MQTTMessage", None) is _PAHO_MESSAGE:
        setattr(paho, "MQTTMessage", _ReceivedMessage)  # noqa: B010


class _BufferedSocket:
    """paho reads a packet with three ``recv`` calls (the type byte, the length byte by byte, then the rest),
    and ``loop_read`` reads one packet per readable event: per reading, four system calls and a trip through
    the event loop. This wrapper receives up to 64 KiB at once and serves paho's small reads from it; its
    ``pending()`` (the method paho and aiomqtt ask of a TLS socket) reports the buffered bytes, so aiomqtt's
    read callback keeps calling ``loop_read`` until every whole packet in the buffer is handled. Everything
    else goes to the real socket."""

    CHUNK = 65536

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            end = min(pos + n, len(buf))
            self._pos = end
            return buf[pos:end]
        data: bytes = self._sock.recv(max(n, self.CHUNK))  # BlockingIOError, EOF (b"") and errors as paho expects
        if len(data) <= n:
            return data
        self._buf, self._pos = data, n
        return data[:n]

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def read_in_chunks(inner: paho.Client) -> None:
    """Give paho a :class:`_BufferedSocket` over each new connection's socket, before aiomqtt registers its
    read callback for it. Must be called after aiomqtt set its own ``on_socket_open`` (in its constructor)."""
    opened = inner.on_socket_open
    if opened is None:
        raise ManualAckUnavailable("aiomqtt did not register its socket callback with paho")

    def on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
        if not isinstance(sock, _BufferedSocket):
            sock = _BufferedSocket(sock)
            client._sock = sock
        opened(client, userdata, sock)

    inner.on_socket_open = on_socket_open


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
    lighten_paho()
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
