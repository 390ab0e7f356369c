"""The narrow interfaces between the core and the adapters.

A source turns its protocol into :class:`Envelope` objects, awaits :meth:`Submitter.submit` and turns the
:class:`Outcome` into the protocol's acknowledgement. A sink delivers one :class:`OutboxItem` or raises
:class:`~gateway.errors.TransientError` / :class:`~gateway.errors.PermanentError`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable


class Outcome(enum.Enum):
    """What the journal did with a message; the source maps it to its protocol's reply."""

    DELIVERED = "delivered"  # committed (or a duplicate of a committed message): positive ack
    ERRORED = "errored"  # not committed, transient: the sender should retry (AE, 0xA700, no PUBACK)
    REJECTED = "rejected"  # committed to quarantine, permanent: the sender must not retry (AR, 0xCxxx)


class InputKind(enum.StrEnum):
    HL7V2 = "hl7v2"
    DICOM = "dicom"
    MQTT = "mqtt"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One inbound message exactly as received, with where it came from. Immutable."""

    id: str  # UUIDv7, time-ordered
    source: str  # the configured source name, e.g. "mllp-main"
    kind: InputKind
    received_at: datetime  # timezone-aware UTC
    payload: bytes  # the raw bytes, byte for byte
    peer: str  # "host:port" of the sender
    metadata: Mapping[str, str] = field(default_factory=dict)  # protocol header fields (no PHI)


class RejectCode(enum.StrEnum):
    """Why a message was refused; sources map these to their protocol's error codes."""

    UNPARSEABLE = "unparseable"  # HL7 ERR 102 data type error / DICOM 0xC000
    NO_HEADER = "no-header"  # HL7 ERR 100 segment sequence error
    UNSUPPORTED_VERSION = "unsupported-version"  # HL7 ERR 203
    UNSUPPORTED_TYPE = "unsupported-type"  # HL7 ERR 200 / 201
    MAPPING_FAILED = "mapping-failed"  # HL7 ERR 207 application internal error
    TOO_LARGE = "too-large"  # frame over the size limit; nothing could be journaled
    INVALID_PAYLOAD = "invalid-payload"  # MQTT: JSON that breaks the payload contract (shape, unit, time zone)
    UNKNOWN_CODE = "unknown-code"  # MQTT: a vital-sign code (MDC/LOINC) or Open mHealth schema the gateway does not map
    CONFLICT = "conflict"  # DICOM: the SOP Instance UID is stored with other content (policy reject) / 0x0111


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The outcome of one submit, with the reason a source puts in its negative acknowledgement."""

    outcome: Outcome
    duplicate: bool = False
    reason: str = ""  # short, PHI-free explanation for ERR segments and logs
    code: RejectCode | None = None


class Submitter(Protocol):
    """What a source depends on: hand over an envelope, learn whether it is durable."""

    async def submit(self, envelope: Envelope) -> SubmitResult: ...


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One delivery to do: a committed message for one destination."""

    id: int
    message_id: str
    destination: str
    attempts: int
    kind: InputKind
    source: str
    raw: bytes  # the message as received
    resources: Sequence[Mapping[str, Any]]  # the FHIR resources mapped from it (may be empty)
    ordering_key: str = ""


@runtime_checkable
class Sink(Protocol):
    """Delivers outbox items. ``deliver`` raises TransientError (retry with backoff) or PermanentError
    (dead letter) and returns normally only when the item is durably delivered."""

    name: str

    async def start(self) -> None: ...

    async def deliver(self, item: OutboxItem) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchSink(Sink, Protocol):
    """A sink that can deliver several items in one round trip. The result has one entry per item:
    None for delivered, or the error for that item."""

    async def deliver_many(self, items: Sequence[OutboxItem]) -> list[Exception | None]: ...


class Source(Protocol):
    """A protocol listener. ``start`` binds (and may raise ConfigError); ``stop`` stops accepting new work and
    returns when in-flight acknowledgements are sent or ``drain_timeout`` passed."""

    name: str

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float) -> None: ...


@runtime_checkable
class BrokerSource(Source, Protocol):
    """A source that receives through a connection it keeps to a broker (MQTT) rather than by listening: its
    connection state is reported by /readyz."""

    def broker_connected(self) -> bool: ...
