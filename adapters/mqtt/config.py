"""Configuration of the MQTT subscriber (source ``mqtt``) and the MQTT publisher (destination ``mqtt_publish``)."""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.crypto import ConfigPath
from gateway.tls import ClientTLS

if TYPE_CHECKING:
    from adapters.mqtt.sink import MqttPublishSink
    from adapters.mqtt.source import MqttSource
    from gateway.contracts import Submitter

_WILDCARD_MISUSE = re.compile(r"(?:[^/]#|#.|[^/]\+|\+[^/])")


def check_filter(value: str) -> str:
    """An MQTT topic filter: '+' and '#' only as whole levels, '#' last; no $share prefix (use shared_group)."""
    if not value or len(value.encode()) > 65535 or "\x00" in value:
        raise ValueError("a topic filter must be 1 to 65535 bytes without NUL")
    if value.startswith("$share/"):
        raise ValueError("write the plain filter and set shared_group instead of a $share/ prefix")
    if _WILDCARD_MISUSE.search(value):
        raise ValueError(f"{value!r}: '+' and '#' must stand alone between slashes, and '#' must be last")
    return value


class BrokerConfig(BaseModel):
    """How to reach and log in to the broker (shared by the subscriber and the publisher)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (1883 plain, 8883 TLS by convention).")
    client_id: str = Field(
        "",
        max_length=128,
        description="MQTT client id. It names the persistent session, so it must be stable across restarts and "
        "unique per gateway instance; empty: hl7-gateway-<host name>-<source name>.",
    )
    username: str | None = Field(None, description="User name for the broker's password check.")
    password: str | None = Field(None, description="Password (prefer password_file).")
    password_file: ConfigPath | None = Field(
        None, description="File holding the password (first line), or credential:NAME for a systemd credential."
    )
    tls: ClientTLS | None = Field(
        None, description="TLS to the broker: ca, and cert + key for a client certificate (see docs/security.md)."
    )
    keepalive_seconds: int = Field(30, ge=5, le=65535, description="MQTT keep-alive interval.")
    connect_timeout_seconds: float = Field(10.0, gt=0, description="Give up a connection attempt after this long.")

    @model_validator(mode="after")
    def _one_password(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise ValueError("a password needs a username")
        return self

    def identifier(self, name: str) -> str:
        return self.client_id or f"hl7-gateway-{socket.gethostname()}-{name}"[:128]

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class MqttSourceConfig(BrokerConfig):
    """A subscriber: sensor readings from MQTT topics, each PUBACKed only after it is committed."""

    type: Literal["mqtt"] = Field(description="Selects this adapter.")
    name: str = Field(
        "mqtt", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Source name in the journal, logs and metrics."
    )
    topics: tuple[str, ...] = Field(
        ("devices/+/observations",), min_length=1, description="Topic filters to subscribe to (QoS 1)."
    )
    shared_group: str | None = Field(
        None,
        pattern=r"^[^/+#]{1,64}$",
        description="MQTT 5 shared subscription group: each filter becomes $share/<group>/<filter>, and the "
        "broker splits the feed between the gateway instances of the group.",
    )
    session_expiry_seconds: int = Field(
        86400,
        ge=0,
        le=0xFFFFFFFF,
        description="How long the broker keeps this client's session (subscriptions and unacknowledged or "
        "queued readings) while it is disconnected. 0 ends the session at disconnect: readings sent while "
        "the gateway is down are then lost.",
    )
    receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="In-flight window: readings the broker may send before the first of them is acknowledged "
        "(MQTT 5 Receive Maximum). Larger windows make bigger group commits.",
    )
    max_payload_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest payload mapped; a larger one is quarantined (its first bytes kept) and acknowledged.",
    )
    ack_timeout_seconds: float = Field(
        30.0, gt=0, description="A reading not committed within this time is not acknowledged; the connection "
        "is restarted so the broker redelivers it."
    )  # fmt: skip
    reconnect_initial_seconds: float = Field(1.0, gt=0, description="First delay before reconnecting.")
    reconnect_max_seconds: float = Field(60.0, gt=0, description="Cap of the reconnect backoff (doubles, jittered).")
    behind_after_seconds: float = Field(
        10.0,
        gt=0,
        description="Report falling behind (log warning, gateway_mqtt_behind_total) when the in-flight window "
        "has been full this long: the broker is queueing readings for the gateway.",
    )

    @field_validator("topics")
    @classmethod
    def _filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_filter(t) for t in value)

    def subscriptions(self) -> list[str]:
        if self.shared_group:
            return [f"$share/{self.shared_group}/{t}" for t in self.topics]
        return list(self.topics)

    def build(self, submitter: Submitter) -> MqttSource:
        from adapters.mqtt.source import MqttSource

        return MqttSource(self, submitter)


class MqttPublishConfig(BrokerConfig):
    """A destination publishing FHIR resources (or the whole bundle) to MQTT with QoS 1; an outbox item is done
    when the broker has acknowledged (PUBACK) every publish of it."""

    type: Literal["mqtt_publish"] = Field(description="Selects this adapter.")
    topic: str = Field(
        "fhir/{resource_type}/{resource_id}",
        description="Topic template. Fields: {source}, {kind}, {message_id}; with per_resource also "
        "{resource_type} and {resource_id}.",
    )
    mode: Literal["per_resource", "bundle"] = Field(
        "per_resource", description="per_resource: one publish per FHIR resource; bundle: one per message."
    )
    retain: bool = Field(False, description="Publish with the retain flag (the broker keeps the last per topic).")
    max_inflight: int = Field(
        256,
        ge=1,
        le=65535,
        description="Publishes awaiting their PUBACK at once (paho's max_inflight_messages; aiomqtt's "
        "pending_calls_threshold is raised to match so it does not warn on every publish).",
    )
    publish_timeout_seconds: float = Field(30.0, gt=0, description="A PUBACK not received in this time: retry.")

    @field_validator("topic")
    @classmethod
    def _template(cls, value: str) -> str:
        fields = set(re.findall(r"{([^{}]*)}", value))
        unknown = fields - {"source", "kind", "message_id", "resource_type", "resource_id"}
        if unknown:
            raise ValueError(f"unknown topic field {{{sorted(unknown)[0]}}}")
        if "+" in value or "#" in value or not value:
            raise ValueError("a publish topic has no wildcards")
        return value

    @model_validator(mode="after")
    def _fields_for_mode(self) -> MqttPublishConfig:
        if self.mode == "bundle" and ("{resource_type}" in self.topic or "{resource_id}" in self.topic):
            raise ValueError("{resource_type} and {resource_id} exist only with mode = per_resource")
        return self

    def build(self, name: str) -> MqttPublishSink:
        from adapters.mqtt.sink import MqttPublishSink

        return MqttPublishSink(self, name)
