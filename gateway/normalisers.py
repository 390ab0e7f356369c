"""The normaliser for each input kind, built from the daemon config (``[normalise]``)."""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.contracts import InputKind
from gateway.normalise import Normaliser
from gateway.normalise.dicom.normaliser import DicomNormaliser
from gateway.normalise.hl7v2.normaliser import Hl7v2Normaliser
from gateway.normalise.sensors import SensorNormaliser


def build_normalisers(config: GatewayConfig) -> dict[InputKind, Normaliser]:
    return {
        InputKind.HL7V2: Hl7v2Normaliser(
            strict=config.normalise.hl7_strict, settings=config.normalise.mapping_settings()
        ),
        InputKind.DICOM: DicomNormaliser(),
        InputKind.MQTT: SensorNormaliser(),
    }
