"""HL7 v2 -> FHIR R4, after the HL7 v2-to-FHIR Implementation Guide.

``map_hl7v2`` is the entry point: a transaction Bundle (a JSON-ready dict of plain dicts, no fhir.resources
models on this hot path) for the events in ``MAPPED_EVENTS``, None for any other message type, MappingError
for a mapped event that cannot be mapped. The event is read from MSH-9 (``ADT^A04`` and ``ADT^A04^ADT_A01``
alike; EVN-1 when an old sender leaves MSH-9.2 empty), never from a file name. Field positions used here are
the same from v2.3 to v2.8; see ``adt`` for the resource ids and ``datatypes`` for identifier systems and time
zones.
"""

from __future__ import annotations

from typing import Any

from gateway.hl7v2.parse import Message

from .. import MapContext, MappingError
from .adt import map_adt
from .datatypes import subcomponents

__all__ = ["MAPPED_EVENTS", "MappingError", "map_hl7v2"]

MAPPED_EVENTS: frozenset[tuple[str, str]] = frozenset({("ADT", "A01"), ("ADT", "A03"), ("ADT", "A04"), ("ADT", "A08")})


def map_hl7v2(msg: Message, ctx: MapContext) -> dict[str, Any] | None:
    """A FHIR R4 transaction Bundle for a mapped event, None for a message type we do not map (the caller
    journals it as "not mapped"). Raises MappingError, with a short reason free of PHI, when a mapped event
    cannot be mapped (e.g. an ADT without PID, or a PID without any patient identifier)."""
    msh = msg.msh
    msh9 = msh.field(9).raw  # (its first repetition)
    message_type = subcomponents(msh9, msh.enc, 1, 1)[0].strip().upper()  # MSH-9.1: ``msg.message_type``
    trigger = subcomponents(msh9, msh.enc, 2, 1)[0].strip().upper()  # MSH-9.2: ``msg.trigger_event``
    if not trigger and message_type == "ADT":
        evn = msg.first("EVN")
        trigger = evn.get(1).strip().upper() if evn is not None else ""
    if (message_type, trigger) not in MAPPED_EVENTS:
        return None
    return map_adt(msg, ctx, trigger)
