"""Configuration of the MLLP listener."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from adapters.mllp.source import MllpSource
    from gateway.contracts import Submitter


class MllpSourceConfig(BaseModel):
    """An HL7 v2 listener speaking MLLP (HL7 v2 Minimal Lower Layer Protocol) over TCP."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mllp"] = Field(description="Selects this adapter.")
    name: str = Field(
        "mllp", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Source name in the journal, logs and metrics."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all IPv4 interfaces).")
    port: int = Field(2575, ge=0, le=65535, description="TCP port (2575 is the registered HL7 port; 0 picks one).")
    max_connections: int = Field(256, ge=1, description="Connections served at once; more are closed at once.")
    idle_timeout_seconds: float = Field(300.0, gt=0, description="A connection with no data for this long is closed.")
    evict_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="When max_connections is reached, a new connection closes the one silent longest, if it has "
        "been silent this long (so hung old connections cannot lock a sender out).",
    )
    max_frame_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest message accepted; a larger frame is answered AR."
    )
    ack_timeout_seconds: float = Field(
        30.0, gt=0, description="How long a message may wait for its journal commit before it is answered AE."
    )

    def build(self, submitter: Submitter) -> MllpSource:
        from adapters.mllp.source import MllpSource

        return MllpSource(self, submitter)
