"""Configuration of the MLLP forward destination."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.tls import ClientTLS

if TYPE_CHECKING:
    from adapters.mllp.forward import MllpForwardSink


class MllpForwardConfig(BaseModel):
    """Forward the HL7 v2 message exactly as received to a downstream MLLP receiver (an EHR's interface
    engine), one message at a time on one persistent connection, each confirmed by its own ACK."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["mllp_forward"] = Field(description="Selects this sink.")
    host: str = Field(description="Host name or address of the receiver.")
    port: int = Field(ge=1, le=65535, description="Its MLLP port.")
    tls: ClientTLS | None = Field(
        None, description="Speak TLS (server verified unless tls.verify = false; cert/key for mutual TLS)."
    )
    connect_timeout_seconds: float = Field(10.0, gt=0, description="A connection not made in this time fails.")
    ack_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="How long to wait for the ACK of a sent message. On timeout the connection is closed (a late "
        "ACK can then never be taken for the next message's) and the message is retried with backoff.",
    )
    max_ack_bytes: int = Field(1024 * 1024, ge=1024, description="Largest ACK frame read; a larger one is an error.")
    ordered: bool = Field(
        True,
        description="FIFO per ordering key (the patient) across retries: a message waits until every earlier "
        "message of its patient was acknowledged or dead-lettered.",
    )

    def build(self, name: str) -> MllpForwardSink:
        from adapters.mllp.forward import MllpForwardSink

        return MllpForwardSink(name, self)
