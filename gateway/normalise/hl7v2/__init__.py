"""HL7 v2 -> FHIR R4, after the HL7 v2-to-FHIR Implementation Guide.

``map_hl7v2`` is the entry point: a transaction Bundle (a JSON-ready dict of plain dicts, no fhir.resources
models on this hot path) for the events in ``MAPPED_EVENTS``, None for any other message type, MappingError
(naming the segment and field) for a mapped event that cannot be mapped. The event is read from MSH-9
(``ADT^A04`` and ``ADT^A04^ADT_A01`` alike; EVN-1 when an old sender leaves MSH-9.2 empty), never from a file
name. ``walk`` reads the segments in order; ``adt``, ``clinical``, ``results`` and ``events`` map them;
``settings`` holds the configurable tables.
"""

from __future__ import annotations

from typing import Any

from gateway.hl7v2.parse import Message

from .. import MapContext, MappingError
from .datatypes import subcomponents
from .settings import DEFAULT_SETTINGS, MappingSettings
from .walk import map_message

__all__ = ["MAPPED_EVENTS", "MappingError", "MappingSettings", "map_hl7v2"]

MAPPED_EVENTS: frozenset[tuple[str, str]] = frozenset(
    [("ADT", f"A{n:02d}") for n in range(1, 14)]
    + [("ADT", "A17"), ("ADT", "A28"), ("ADT", "A31"), ("ADT", "A40")]
    + [("ORU", "R01"), ("ORM", "O01"), ("OML", "O21"), ("VXU", "V04")]
    + [("MDM", t) for t in ("T02", "T04", "T06", "T08", "T10")]  # the MDM events that carry the document
    + [("SIU", f"S{n}") for n in range(12, 16)]
)


def message_event(msg: Message) -> tuple[str, str]:
    """(MSH-9.1, MSH-9.2) upper-cased; for an ADT with an empty MSH-9.2, EVN-1."""
    msh = msg.msh
    msh9 = msh.field(9).raw  # (its first repetition)
    message_type = subcomponents(msh9, msh.enc, 1, 1)[0].strip().upper()
    trigger = subcomponents(msh9, msh.enc, 2, 1)[0].strip().upper()
    if not trigger and message_type == "ADT":
        evn = msg.first("EVN")
        trigger = evn.get(1).strip().upper() if evn is not None else ""
    return message_type, trigger


def map_hl7v2(msg: Message, ctx: MapContext, settings: MappingSettings = DEFAULT_SETTINGS) -> dict[str, Any] | None:
    """A FHIR R4 transaction Bundle for a mapped event, None for a message type we do not map (the caller
    journals it as "not mapped"). Raises MappingError, with a short reason free of PHI that names the segment
    and field, when a mapped event cannot be mapped (e.g. an ADT without PID, or a PID without any patient
    identifier)."""
    message_type, trigger = message_event(msg)
    if (message_type, trigger) not in MAPPED_EVENTS:
        return None
    return map_message(msg, ctx, message_type, trigger, settings)
