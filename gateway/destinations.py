"""The destination (sink) configurations a rule set accepts, as one discriminated union on ``type``.

Each adapter owns its config model (with ``build(name)``); adding a sink means adding its model here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from adapters.dicom.config import DicomForwardConfig
from adapters.fhir_rest.config import FhirRestConfig
from adapters.mllp.forward_config import MllpForwardConfig
from adapters.mqtt.config import MqttPublishConfig
from adapters.sqlstore.config import SqlStoreConfig

DestinationConfig = Annotated[
    SqlStoreConfig | MqttPublishConfig | DicomForwardConfig | FhirRestConfig | MllpForwardConfig,
    Field(discriminator="type"),
]
