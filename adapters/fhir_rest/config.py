"""Configuration of the FHIR REST destination."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.crypto import ConfigPath
from gateway.tls import ClientTLS

if TYPE_CHECKING:
    from adapters.fhir_rest.sink import FhirRestSink


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BearerAuth(_Frozen):
    """A fixed bearer token (a long-lived API token issued by the FHIR server's operator)."""

    type: Literal["bearer"] = Field(description="Selects bearer-token authentication.")
    token_file: ConfigPath = Field(
        description="File holding the token (first line), or credential:NAME for a systemd credential."
    )


class ClientCredentialsAuth(_Frozen):
    """OAuth2 client credentials grant, as SMART Backend Services use it: the gateway asks ``token_url`` for an
    access token, caches it until shortly before it expires, and fetches a new one when the server answers 401.
    ``client_secret_basic``/``client_secret_post`` send a shared secret; ``private_key_jwt`` signs a client
    assertion (RFC 7523) with the gateway's private key (RS384 or ES384, as SMART requires)."""

    type: Literal["oauth2_client_credentials"] = Field(description="Selects OAuth2 client credentials.")
    token_url: str = Field(description="The authorization server's token endpoint (https).")
    client_id: str = Field(min_length=1, description="The client id registered for this gateway.")
    scope: str = Field(
        "system/*.write", description="Scopes asked for, space separated (SMART v2: system/Patient.cu ...)."
    )
    method: Literal["client_secret_basic", "client_secret_post", "private_key_jwt"] = Field(
        "client_secret_basic", description="How the client authenticates to the token endpoint."
    )
    client_secret_file: ConfigPath | None = Field(
        None, description="File with the client secret (first line) or credential:NAME; for the client_secret methods."
    )
    private_key: ConfigPath | None = Field(
        None, description="PEM private key (RSA or EC P-384) or credential:NAME; for private_key_jwt."
    )
    key_id: str | None = Field(None, description="`kid` of the signing key as registered (its JWKS entry).")
    algorithm: Literal["RS384", "ES384"] = Field("RS384", description="Signature algorithm of the client assertion.")

    @field_validator("token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL")
        return value

    @model_validator(mode="after")
    def _credential_for_method(self) -> ClientCredentialsAuth:
        if self.method == "private_key_jwt" and self.private_key is None:
            raise ValueError("private_key_jwt needs private_key")
        if self.method != "private_key_jwt" and self.client_secret_file is None:
            raise ValueError(f"{self.method} needs client_secret_file")
        return self


AuthConfig = Annotated[BearerAuth | ClientCredentialsAuth, Field(discriminator="type")]


class FhirRestConfig(_Frozen):
    """A FHIR R4 server: each outbox item is POSTed to the base URL as one transaction Bundle (all its resources
    or none), or sent as one PUT per resource (``mode = "put"``) for servers without transactions.

    Outcomes: 2xx done; 429 and 503 retried no earlier than their Retry-After; other 5xx, 408, timeouts and
    dropped connections retried with backoff; other 4xx dead-lettered with the server's OperationOutcome."""

    type: Literal["fhir_rest"] = Field(description="Selects this sink.")
    base_url: str = Field(description="FHIR base URL, e.g. https://ehr.example.org/fhir (no trailing /metadata).")
    mode: Literal["transaction", "put"] = Field(
        "transaction", description="transaction: POST one Bundle per message; put: PUT each resource in bundle order."
    )
    auth: AuthConfig | None = Field(None, description="How to authenticate; unset: none (or mutual TLS alone).")
    tls: ClientTLS | None = Field(
        None,
        description="TLS settings for https: CA bundle, client certificate for mutual TLS. Verification is on "
        "unless tls.verify = false.",
    )
    timeout_seconds: float = Field(30.0, gt=0, description="A request without a complete answer in this time fails.")
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once to this server.")
    ordered: bool = Field(
        True,
        description="FIFO per ordering key (the patient): a message is sent only after every earlier message of "
        "the same patient was delivered or dead-lettered, so an update never overtakes the create before it.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers on every request (not for secrets: use auth)."
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("expected an http(s) URL")
        return value.rstrip("/")

    def build(self, name: str) -> FhirRestSink:
        from adapters.fhir_rest.sink import FhirRestSink

        return FhirRestSink(name, self)
