"""Normalisation: pure functions from a received message to FHIR R4 resources, one package per input kind.

Resources are built as plain JSON-ready dicts (not fhir.resources models): validating and dumping a model costs
about 0.22 ms per Patient and 2.5 ms per 10-resource bundle, more than the rest of the pipeline. The mapping is
kept provably valid by tests that validate every corpus message's output against fhir.resources (R4B models, R4
JSON) and the official R4 JSON schema; ``validate = true`` in the config turns the same model validation on at
run time for operators who want it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class MapContext:
    """What a mapping may know besides the message itself."""

    message_id: str  # the envelope id (UUIDv7)
    source: str  # configured source name
    received_at: datetime  # timezone-aware UTC


class MappingError(Exception):
    """The message is well-formed HL7 but cannot be mapped (e.g. an ADT without PID). Permanent."""
