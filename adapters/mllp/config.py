"""Configuration of the MLLP listener."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.tls import ServerTLS

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
    allowed_peers: tuple[str, ...] = Field(
        (),
        description="Accept connections only from these addresses or networks (`10.1.2.3`, `10.1.0.0/16`, "
        "`fd00::/8`); empty: from anywhere. Checked before anything is read.",
    )
    max_connections_per_peer: int = Field(
        64,
        ge=1,
        description="Connections from one IP address served at once; more are closed at once (behind a TCP load "
        "balancer every sender has the balancer's address: raise it there).",
    )
    read_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A message must arrive whole within this time from its first byte, and an ACK must be taken "
        "by the sender within it; a slower connection is closed (a sender dribbling bytes cannot hold a slot).",
    )
    tls: ServerTLS | None = Field(
        None, description="TLS on this listener (optionally mutual TLS with an allow-list); unset: plain TCP."
    )

    @field_validator("allowed_peers")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or network: {entry!r}") from None
        return value

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(e, strict=False) for e in self.allowed_peers)

    def build(self, submitter: Submitter) -> MllpSource:
        from adapters.mllp.source import MllpSource

        return MllpSource(self, submitter)
