"""The FHIR REST sink: one outbox item is one transaction Bundle POSTed to the server (or one PUT per resource).

Why aiohttp: it is one library for both sides of the tests (the FHIR receiver in tests/ is an aiohttp server),
its connection pool keeps connections to the EHR open across items, and its client costs less CPU per request
than httpx's, which matters on the core the delivery process shares with nothing but itself.

What the server's answer means (``classify``): 2xx delivered; 429 and 503 retried no earlier than Retry-After
(:class:`gateway.delivery.RetryLater`); 408, other 5xx, timeouts and dropped connections retried with backoff;
401 once more with a fresh token, then like any other 4xx: a dead letter carrying the server's OperationOutcome
(stored with the item, never logged: its diagnostics may quote patient data). Every request is a PUT of a
resource at its deterministic id (inside the Bundle or on its own), so a retry after a lost answer updates the
same resource instead of creating a twin.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from datetime import UTC, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from adapters.fhir_rest.auth import TokenSource, token_source
from adapters.fhir_rest.config import FhirRestConfig
from gateway.contracts import OutboxItem
from gateway.delivery import RetryLater
from gateway.errors import PermanentError, TransientError
from gateway.journal import utcnow
from gateway.normalise.hl7v2.bundle import full_url
from gateway.tls import ReloadableContext

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
MAX_BODY_KEPT = 1500  # characters of an error body kept with a dead letter


class Refused(PermanentError):
    """The server refused the item (4xx). ``detail`` is what it said (an OperationOutcome), kept with the dead
    letter and left out of log lines."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def retry_after(value: str | None, default: float = 1.0) -> float:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3); ``default``
    when absent or unreadable."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return default
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return max(0.0, (when - utcnow()).total_seconds())


def _outcome_summary(body: bytes) -> str:
    """The body as kept with a dead letter: an OperationOutcome compacted, anything else truncated."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:MAX_BODY_KEPT].decode("utf-8", "replace")
    return orjson.dumps(doc).decode()[:MAX_BODY_KEPT]


def classify(destination: str, status: int, headers: Mapping[str, str], body: bytes) -> Exception | None:
    """What a FHIR server's answer means for the item (None: delivered)."""
    if 200 <= status < 300:
        return None
    if status in (429, 503):
        wait = retry_after(headers.get("Retry-After"))
        return RetryLater(
            f"{destination} answered HTTP {status}; Retry-After {wait:.0f} s", utcnow() + timedelta(seconds=wait)
        )
    if status == 408 or status >= 500:
        return TransientError(f"{destination} answered HTTP {status}")
    return Refused(f"{destination} refused the item with HTTP {status}", _outcome_summary(body))


def transaction_bundle(resources: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The item's resources as a FHIR transaction: each a PUT at its id, as the normaliser's bundle has them."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": full_url(r["resourceType"], r["id"]),  # the normaliser's, so both bundles agree
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }


class FhirRestSink:
    """Sink protocol implementation; ``ordered`` and ``concurrency`` tell the delivery worker how to claim."""

    def __init__(self, name: str, config: FhirRestConfig) -> None:
        self.name = name
        self.config = config
        self.ordered = config.ordered
        self.concurrency = config.concurrency
        self._session: aiohttp.ClientSession | None = None
        self._tokens: TokenSource | None = None
        self._tls: ReloadableContext | None = None

    async def start(self) -> None:
        """Read the TLS files and secrets now (ConfigError); no request is made before the first item."""
        self._tokens = token_source(self.config.auth, self.name)
        if self.config.tls is not None:
            self._tls = ReloadableContext.client(self.config.tls, f"destination {self.name}")
        elif self.config.base_url.startswith("https://"):
            self._tls = None  # aiohttp's default: the system trust store, hostname checked
        connector = aiohttp.TCPConnector(limit=self.config.concurrency + 1)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
            headers={**self.config.headers, "Accept": FHIR_JSON},
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ssl(self) -> ssl.SSLContext | bool:
        return self._tls.context if self._tls is not None else True

    async def deliver(self, item: OutboxItem) -> None:
        if self._session is None:
            raise TransientError(f"destination {self.name} is not started")
        resources = list(item.resources)
        if not resources:
            raise PermanentError(f"message {item.message_id} has no FHIR resources to send to {self.name}")
        if self.config.mode == "transaction":
            body = orjson.dumps(transaction_bundle(resources))
            await self._request("POST", self.config.base_url, body)
            return
        for r in resources:
            await self._request("PUT", f"{self.config.base_url}/{r['resourceType']}/{r['id']}", orjson.dumps(r))

    async def _request(self, method: str, url: str, body: bytes) -> None:
        assert self._session is not None
        for fresh_token in (False, True):
            headers = {"Content-Type": FHIR_JSON}
            if self._tokens is not None:
                headers["Authorization"] = await self._tokens.authorization(self._session)
            try:
                async with self._session.request(method, url, data=body, headers=headers, ssl=self._ssl()) as resp:
                    answer = await resp.read()
                    status = resp.status
                    resp_headers = dict(resp.headers)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise TransientError(f"{self.name}: the server's TLS certificate failed verification") from exc
            except aiohttp.ClientConnectorError as exc:
                raise TransientError(f"{self.name}: cannot connect ({exc.os_error.strerror or 'refused'})") from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
                raise TransientError(f"{self.name}: the connection dropped before an answer") from exc
            except TimeoutError as exc:
                raise TransientError(f"{self.name}: no answer within {self.config.timeout_seconds:g} s") from exc
            except aiohttp.ClientError as exc:
                raise TransientError(f"{self.name}: HTTP client error ({type(exc).__name__})") from exc
            if status == 401 and self._tokens is not None and not fresh_token:
                self._tokens.invalidate()  # expired or revoked: once more with a new token
                continue
            err = classify(self.name, status, resp_headers, answer)
            if err is not None:
                raise err
            return
