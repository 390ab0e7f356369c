"""Configuration of the DICOM listener (C-ECHO and C-STORE SCP) and of the DICOM forward destination."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.db import check_database_url
from gateway.tls import ClientTLS, ServerTLS

if TYPE_CHECKING:
    from adapters.dicom.sink import DicomForwardSink
    from adapters.dicom.source import DicomSource
    from gateway.contracts import Submitter

# AE titles: up to 16 characters of the default repertoire, no backslash or control characters (PS3.5 6.2).
_AE_TITLE = r"^[ -\[\]-~]{1,16}$"


def _ae(value: str) -> str:
    if not value.strip():
        raise ValueError("an AE title may not be blank")
    return value.strip()


class AllowedPeer(BaseModel):
    """A calling AE title allowed to associate, optionally only from some addresses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(pattern=_AE_TITLE, description="Calling AE title of the modality or PACS.")
    addresses: tuple[str, ...] = Field(
        (), description="IP addresses or networks (CIDR) it may connect from; empty: any address."
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _ae(value)

    @field_validator("addresses")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for a in value:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or network: {a!r}") from None
        return value

    def allows(self, address: str) -> bool:
        if not self.addresses:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(a, strict=False) for a in self.addresses)


class DicomSourceConfig(BaseModel):
    """A DICOM listener: C-ECHO and C-STORE SCP for every standard storage SOP class, any transfer syntax."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dicom"] = Field(description="Selects this adapter.")
    name: str = Field(
        "dicom", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Source name in the journal, logs and metrics."
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all IPv4 interfaces).")
    port: int = Field(11112, ge=0, le=65535, description="TCP port (104 is the registered DICOM port; 0 picks one).")
    ae_title: str = Field("GATEWAY", pattern=_AE_TITLE, description="This gateway's AE title.")
    require_called_ae: bool = Field(
        True, description="Reject associations whose called AE title is not ae_title (A-ASSOCIATE-RJ reason 7)."
    )
    allowed_peers: tuple[AllowedPeer, ...] = Field(
        (),
        description="Calling AE titles allowed to associate, each optionally from some addresses; empty: any "
        "calling AE (reject reason 3 for the others).",
    )
    max_associations: int = Field(
        16, ge=1, le=1000, description="Associations served at once; more are rejected (transient, reason 2)."
    )
    max_pdu_bytes: int = Field(
        262144,
        ge=0,
        description="Largest PDU this listener receives (0: no limit). Larger PDUs mean fewer round trips "
        "per instance; pynetdicom's default of 16382 splits a 40 KB CT into three.",
    )
    max_dataset_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="Largest dataset stored (0: no limit); a larger one is answered 0xA700 (out of resources), "
        'counted in gateway_limit_hits_total{limit="dataset-size"} and logged, and not written to disk.',
    )
    acse_timeout_seconds: float = Field(
        30.0, gt=0, description="How long to wait for the association request and release."
    )
    dimse_timeout_seconds: float = Field(30.0, gt=0, description="How long to wait for a DIMSE message.")
    network_timeout_seconds: float = Field(
        60.0, gt=0, description="An association with no data for this long is aborted (a silent peer)."
    )
    ack_timeout_seconds: float = Field(
        30.0, gt=0, description="How long an instance may wait for its journal commit before it is answered 0xA700."
    )
    reactor_poll_seconds: float = Field(
        0.0002,
        gt=0,
        le=0.01,
        description="How long pynetdicom's own network loop sleeps when it finds nothing to do. The gateway "
        "replaces that loop with one that waits for data instead (adapters/dicom/reactor.py); this applies only "
        "when it cannot (another pynetdicom version) and to pynetdicom's wait for a closed association's thread.",
    )
    storage_dir: str = Field(
        "/var/lib/gateway/dicom",
        description="Where received instances are written (fsynced) before they are acknowledged; relative to "
        "the working directory.",
    )
    index_url: str = Field(
        "",
        description="Database of the study index (instances and studies for ImagingStudy aggregation); empty: "
        "SQLite file index.db in storage_dir. Several instances behind one load balancer share one MySQL URL.",
    )
    duplicate_policy: Literal["keep", "overwrite", "reject"] = Field(
        "keep",
        description="A SOP Instance UID received again with different content: keep the first (the new copy is "
        "stored aside and journaled, Success), overwrite (the new one becomes current, the study is updated) "
        "or reject (stored aside and quarantined, 0x0111). Identical content is always a duplicate: Success, "
        "nothing new stored.",
    )
    study_quiet_seconds: float = Field(
        30.0,
        gt=0,
        description="A study is mapped to Patient + ImagingStudy once no instance has arrived for this long; "
        "later instances produce an update.",
    )

    tls: ServerTLS | None = Field(
        None,
        description="DICOM over TLS (PS3.15 Annex B): certificate, key, and optionally client certificates with "
        "an allow-list; absent: plain TCP.",
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _ae(value)

    @field_validator("index_url")
    @classmethod
    def _index_url(cls, value: str) -> str:
        return check_database_url(value) if value else value

    @property
    def storage_path(self) -> Path:
        return Path(self.storage_dir).absolute()

    @property
    def index_database_url(self) -> str:
        return self.index_url or f"sqlite:///{self.storage_path / 'index.db'}"

    def build(self, submitter: Submitter) -> DicomSource:
        from adapters.dicom.source import DicomSource

        return DicomSource(self, submitter)


class DicomForwardConfig(BaseModel):
    """A downstream PACS: the stored instances of each routed message are sent with C-STORE, as received."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dicom_forward"] = Field(description="Selects this sink.")
    host: str = Field(description="Address of the PACS.")
    port: int = Field(104, ge=1, le=65535, description="Its DICOM port.")
    called_ae: str = Field(pattern=_AE_TITLE, description="The PACS's AE title.")
    calling_ae: str = Field("GATEWAY", pattern=_AE_TITLE, description="The AE title the gateway calls from.")
    max_pdu_bytes: int = Field(262144, ge=0, description="Largest PDU the gateway receives on this association.")
    acse_timeout_seconds: float = Field(30.0, gt=0, description="Association request and release timeout.")
    dimse_timeout_seconds: float = Field(60.0, gt=0, description="How long to wait for each C-STORE response.")
    network_timeout_seconds: float = Field(60.0, gt=0, description="Abort when the PACS sends nothing this long.")
    idle_close_seconds: float = Field(
        5.0, ge=0, description="An association unused for longer is not reused: the next instance opens a new one."
    )
    tls: ClientTLS | None = Field(None, description="TLS to the PACS (CA, optional client certificate); absent: TCP.")

    @field_validator("called_ae", "calling_ae")
    @classmethod
    def _ae_titles(cls, value: str) -> str:
        return _ae(value)

    def build(self, name: str) -> DicomForwardSink:
        from adapters.dicom.sink import DicomForwardSink

        return DicomForwardSink(name, self)
