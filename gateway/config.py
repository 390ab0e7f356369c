"""The daemon configuration: one TOML file, validated into frozen pydantic models with unknown keys forbidden.

The daemon config holds what belongs to this machine: listeners (sources), the journal, delivery tuning,
telemetry and where the rule set lives. Routes and destinations are not here: they belong to the rule set
(``rules``), which is reviewed and signed separately (see docs/configuration.md).

Validation is pure: no network or disk work happens before ``start()``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from gateway.normalise.hl7v2.settings import MappingSettings

from gateway.crypto import EncryptionConfig, path_context
from gateway.db import check_database_url
from gateway.errors import ConfigError
from gateway.signing import RulesTrustConfig
from gateway.sources import SourceConfig


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listen_address(value: str) -> str:
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9102 or [::1]:9102, or an empty string for off")
    return value


class JournalConfig(Frozen):
    url: str = Field(
        "sqlite:////var/lib/gateway/journal.db",
        description="Database URL of the journal: sqlite:////ABSOLUTE/PATH (embedded, WAL, "
        "synchronous=FULL) or mysql+aiomysql://USER:PASSWORD@HOST:PORT/DB.",
    )
    group_commit_max: int = Field(512, ge=1, le=10_000, description="Most messages committed in one transaction.")
    dedup_window_seconds: float = Field(
        7 * 86400,
        gt=0,
        description="How long a message's dedup key is remembered (a resend inside it is ACKed, not processed again).",
    )
    pool_size: int = Field(5, ge=1, le=100, description="Database connections held open (MySQL).")

    @field_validator("url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        return check_database_url(value)


class DeliveryConfig(Frozen):
    isolation: Literal["process", "inline"] = Field(
        "process",
        description="process: delivery workers run in a child process, so they do not take CPU from "
        "acknowledging (about twice the MLLP throughput on two cores); inline: in the daemon's event loop.",
    )
    max_attempts: int = Field(10, ge=1, description="Attempts before an item goes to the dead-letter state.")
    backoff_initial_seconds: float = Field(1.0, gt=0, description="Delay before the first retry.")
    backoff_max_seconds: float = Field(300.0, gt=0, description="Cap of the exponential backoff.")
    batch_size: int = Field(200, ge=1, le=10_000, description="Outbox items claimed per round.")
    lease_seconds: float = Field(
        60.0,
        gt=0,
        description="How long a claimed item stays reserved for this instance before another may "
        "take it over (a crashed instance's items are retried after this).",
    )
    poll_interval_seconds: float = Field(1.0, gt=0, description="How often idle workers look for due retries.")
    linger_seconds: float = Field(
        0.05,
        ge=0,
        le=5,
        description="After a part-filled batch, wait this long before the next one, so "
        "delivery runs in fewer, larger rounds under load (adds at most this much delivery latency).",
    )
    max_age_seconds: float = Field(
        0,
        ge=0,
        description="An item that fails after waiting this long since it was queued goes to the dead-letter "
        "state instead of being retried again; 0: no age limit (max_attempts still applies).",
    )


class RetentionConfig(Frozen):
    delivered_days: float = Field(
        0,
        ge=0,
        description="Purge messages received this many days ago whose outbox items are all done or dropped "
        "(raw payload, bundle and outbox rows); 0: keep forever. Dead letters and pending items are never purged.",
    )
    quarantined_days: float = Field(
        0, ge=0, description="Purge quarantined messages received this many days ago; 0: keep forever (for replay)."
    )
    interval_seconds: float = Field(3600, gt=0, description="How often the purge runs.")
    batch_size: int = Field(
        1000, ge=1, le=100_000, description="Messages deleted per transaction (short transactions keep ingest fast)."
    )


class TelemetryConfig(Frozen):
    listen: str = Field(
        "127.0.0.1:9102",
        description="host:port of the HTTP endpoint serving /metrics and /healthz; empty: off.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Root log level.")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line.")
    log_phi: bool = Field(
        False,
        description="Allow patient data in logs (full tracebacks of caught bugs). For debugging only; off in "
        "production.",
    )

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        return _listen_address(value)


class CodeMapEntry(Frozen):
    source_system: str = Field(..., min_length=1, description="The sender's coding system name (CWE-3).")
    code: str = Field(..., min_length=1, description="The sender's code (CWE-1).")
    target_system: str = Field(..., min_length=1, description="The standard code system URI.")
    target_code: str = Field(..., min_length=1, description="The standard code.")
    display: str = Field("", description="The standard code's display.")


class NormaliseConfig(Frozen):
    hl7_strict: bool = Field(
        False,
        description="Validate every HL7 v2 message against its standard structure with hl7apy (about 20 ms "
        "per message, in a worker thread); a message that fails is quarantined and answered AR.",
    )
    validate_fhir: bool = Field(
        False,
        description="Validate every mapped bundle with the fhir.resources R4 models at run time (about "
        "2.5 ms per 10-resource bundle). The mapping is validated by the test suite either way.",
    )
    identifier_systems: dict[str, str] = Field(
        default_factory=dict,
        description="HL7 v2 assigning authority (HD-1 namespace, or HD-2 universal id) -> Identifier.system URI "
        "for the identifiers it assigns (CX-4, XCN-9, EI).",
    )
    coding_systems: dict[str, str] = Field(
        default_factory=dict,
        description="Coding system name as senders write it in CWE-3 (e.g. a local '99LAB') -> code system URI; "
        "adds to and overrides the HL7 table 0396 names the mapping knows.",
    )
    code_maps: tuple[CodeMapEntry, ...] = Field(
        (), description="Local code -> standard coding, like a FHIR ConceptMap; the mapped coding comes first."
    )
    z_segments: dict[str, str] = Field(
        default_factory=dict,
        description="Z-segment name -> extension URL: each such segment becomes an extension (ZXX.n fields as "
        "nested valueStrings) on the resource it follows; other Z-segments stay in the raw message only.",
    )
    default_timezone: str = Field(
        "",
        description="The senders' time zone (IANA name like 'Europe/London', or '+01:00') for HL7 times that "
        "carry no offset when MSH-7 has none either; empty: such times are cut to their date.",
    )

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value:
            from gateway.normalise.hl7v2.settings import zone_for

            try:
                zone_for(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("z_segments")
    @classmethod
    def _z_names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if len(name) != 3 or not name.startswith("Z") or not name.isalnum()]
        if bad:
            raise ValueError(f"not Z-segment names: {', '.join(sorted(bad))}")
        return value

    def mapping_settings(self) -> MappingSettings:
        """The HL7 v2 map's tables (gateway.normalise.hl7v2.settings.MappingSettings)."""
        from gateway.normalise.hl7v2.settings import settings_from_config

        return settings_from_config(
            self.identifier_systems,
            self.coding_systems,
            [m.model_dump() for m in self.code_maps],
            self.default_timezone,
            self.z_segments,
        )


class GatewayConfig(Frozen):
    instance: str = Field("gateway", description="Name of this instance in logs and metrics.")
    journal: JournalConfig = Field(default_factory=JournalConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    normalise: NormaliseConfig = Field(default_factory=NormaliseConfig)
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)
    rules: str = Field(..., description="Path of the rule set (routes and destinations), relative to this file.")
    rules_trust: RulesTrustConfig = Field(
        default_factory=RulesTrustConfig,
        description="Who may sign the rule set, its decryption key and the anti-rollback state (docs/rules.md).",
    )
    audit_log: str = Field(
        "/var/log/gateway/audit.log",
        description="Append-only, hash-chained audit trail (starts, stops, connections, operator actions); "
        "relative to the working directory; empty: off. `gateway audit verify FILE` checks it.",
    )
    drain_timeout_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM: how long in-flight messages may take to be committed and ACKed."
    )
    sources: tuple[SourceConfig, ...] = Field(..., min_length=1, description="The listeners.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway processes on this host. 1: one process, as before. N > 1: `gateway run` supervises N "
        "worker processes sharing the MLLP and DICOM ports (SO_REUSEPORT), the MQTT shared subscription and the "
        "journal; see docs/scaling.md.",
    )

    @model_validator(mode="after")
    def _shareable_sources(self) -> GatewayConfig:
        if self.workers == 1:
            return self
        for src in self.sources:
            # Duck-typed: the core names no adapter. A port of 0 would give each worker its own random port; an
            # MQTT filter without a shared group would hand every reading to every worker.
            if getattr(src, "port", None) == 0:
                raise ValueError(f"source {src.name}: with workers > 1 every listener needs a fixed port, not 0")
            if hasattr(src, "shared_group") and src.shared_group is None:
                raise ValueError(
                    f"source {src.name}: with workers > 1 an MQTT source needs shared_group (e.g. shared_group = "
                    f'"{self.instance}"), so the broker hands each reading to one worker'
                )
        return self

    def rules_path(self, base: Path) -> Path:
        p = Path(self.rules)
        return p if p.is_absolute() else base / p


def _error_path(loc: tuple[int | str, ...], data: Any) -> str:
    """The key path as the user wrote it. A discriminated union puts the chosen tag into the location
    (``sources.0.mllp.port``); it is dropped where the input at that point is an object whose ``type`` is that
    tag, so a destination that happens to be *named* like an adapter keeps its name."""
    out = ""
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("type") == part:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def validation_error(exc: ValidationError, data: Any) -> ConfigError:
    """The first pydantic error as a ConfigError naming its key path (``sources[0].port``)."""
    err = exc.errors()[0]
    return ConfigError(err["msg"], _error_path(err["loc"], data))


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> GatewayConfig:
    """Validate a config; relative certificate and key paths are resolved against ``base_dir`` (the config
    file's directory) when given."""
    try:
        return GatewayConfig.model_validate(data, context=path_context(base_dir) if base_dir is not None else None)
    except ValidationError as exc:
        raise validation_error(exc, data) from None


def read_text(path: Path, what: str) -> str:
    """A configuration file's text; ConfigError naming the file when it cannot be read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror}", str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"the {what} is not UTF-8 text", str(path)) from None


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a TOML config file; raises ConfigError with the key path of the first problem."""
    p = Path(path)
    text = read_text(p, "config file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", str(p)) from None
    return parse_config(data, p.resolve().parent)
