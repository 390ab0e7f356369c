"""The destination (sink) configurations a rule set accepts, as one discriminated union on ``type``.

Each adapter owns its config model (with ``build(name)``); adding a sink means adding its model here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from adapters.sqlstore.config import SqlStoreConfig

DestinationConfig = Annotated[SqlStoreConfig, Field(discriminator="type")]
