"""MQTT sensor readings -> FHIR R4 vital-signs Observations and a Device per device id.

:class:`SensorNormaliser` is the Normaliser of ``InputKind.MQTT``. Payload formats are in :mod:`.payload`
(the gateway's reading-v1 contract, ``reading-v1.schema.json``) and :mod:`.omh` (Open mHealth); the mapping to
FHIR is :func:`.fhir.bundle_for`.
"""

from __future__ import annotations

from importlib import resources

from .normaliser import SensorNormaliser

__all__ = ["SensorNormaliser", "schema_text"]


def schema_text() -> str:
    """The payload contract shipped with the package (reading-v1.schema.json)."""
    return resources.files(__package__).joinpath("reading-v1.schema.json").read_text(encoding="utf-8")
