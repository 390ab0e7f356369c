"""The source (listener) configurations the daemon config accepts, as one discriminated union on ``type``.

Each adapter owns its config model (with ``build(submitter)``); adding an adapter means adding its model here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from adapters.mllp.config import MllpSourceConfig

SourceConfig = Annotated[MllpSourceConfig, Field(discriminator="type")]
