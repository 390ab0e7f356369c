"""The normaliser for each input kind, built from the daemon config (``[normalise]``)."""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.contracts import InputKind
from gateway.normalise import Normaliser
from gateway.normalise.hl7v2.normaliser import Hl7v2Normaliser


def build_normalisers(config: GatewayConfig) -> dict[InputKind, Normaliser]:
    return {InputKind.HL7V2: Hl7v2Normaliser(strict=config.normalise.hl7_strict)}
