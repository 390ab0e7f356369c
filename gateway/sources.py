"""The source (listener) configurations the daemon config accepts, as one discriminated union on ``type``.

Each adapter owns its config model (with ``build(submitter)``); adding an adapter means adding its model here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from adapters.dicom.config import DicomSourceConfig
from adapters.mllp.config import MllpSourceConfig
from adapters.mqtt.config import MqttSourceConfig

SourceConfig = Annotated[MllpSourceConfig | MqttSourceConfig | DicomSourceConfig, Field(discriminator="type")]
