"""Access tokens for the FHIR REST sink: a fixed bearer token, or OAuth2 client credentials (SMART Backend
Services): client_secret_basic, client_secret_post or private_key_jwt (an RS384/ES384-signed client assertion,
RFC 7523). Tokens are cached until shortly before they expire; a 401 from the FHIR server drops the cache."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from adapters.fhir_rest.config import BearerAuth, ClientCredentialsAuth
from gateway.crypto import read_secret
from gateway.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)

EXPIRY_MARGIN = 30.0  # seconds before a token's expiry at which a new one is fetched
ASSERTION_LIFETIME = 300  # SMART: the client assertion's exp is at most five minutes ahead


class TokenSource(Protocol):
    async def authorization(self, session: aiohttp.ClientSession) -> str: ...

    def invalidate(self) -> None: ...


def _first_line(spec: str, what: str) -> str:
    text = read_secret(spec, what).decode("utf-8", "replace")
    value = text.splitlines()[0].strip() if text else ""
    if not value:
        raise ConfigError(f"the {what} is empty", spec)
    return value


class StaticBearer:
    def __init__(self, cfg: BearerAuth) -> None:
        self._header = "Bearer " + _first_line(cfg.token_file, "bearer token file")

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        return self._header

    def invalidate(self) -> None:
        pass  # a fixed token cannot be renewed; the 401 goes to the item


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_assertion(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, algorithm: str, claims: dict[str, Any], kid: str | None
) -> str:
    """A compact JWS (RFC 7515) over ``claims``. ES384 signatures are r||s, 48 bytes each (RFC 7518 3.4), not
    the DER that the cryptography library returns."""
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}".encode()
    if algorithm == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("RS384 needs an RSA private key")
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA384())
    else:
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
            raise ConfigError("ES384 needs an EC P-384 private key")
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA384())))
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    return f"{signing_input.decode()}.{_b64(signature)}"


class ClientCredentials:
    def __init__(self, cfg: ClientCredentialsAuth, destination: str) -> None:
        self.cfg = cfg
        self.destination = destination
        self._secret: str | None = None
        self._key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None
        if cfg.method == "private_key_jwt":
            assert cfg.private_key is not None
            pem = read_secret(cfg.private_key, "OAuth2 private key")
            try:
                key = serialization.load_pem_private_key(pem, password=None)
            except ValueError as exc:
                raise ConfigError(f"not a PEM private key: {exc}", cfg.private_key) from None
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise ConfigError("the private key must be RSA or EC", cfg.private_key)
            self._key = key
            sign_assertion(key, cfg.algorithm, {"check": 1}, cfg.key_id)  # the key fits the algorithm: ConfigError now
        else:
            assert cfg.client_secret_file is not None
            self._secret = _first_line(cfg.client_secret_file, "OAuth2 client secret file")
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._token = None

    async def authorization(self, session: aiohttp.ClientSession) -> str:
        if self._token is not None and time.monotonic() < self._expires:
            return self._token
        async with self._lock:  # one token request at a time; the others wait for its result
            if self._token is None or time.monotonic() >= self._expires:
                self._token, lifetime = await self._fetch(session)
                self._expires = time.monotonic() + max(0.0, lifetime - EXPIRY_MARGIN)
            return self._token

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[str, float]:
        cfg = self.cfg
        form = {"grant_type": "client_credentials", "scope": cfg.scope}
        headers = {"Accept": "application/json"}
        if cfg.method == "client_secret_basic":
            assert self._secret is not None
            # RFC 6749 2.3.1: id and secret are form-encoded before they are joined and base64-encoded.
            pair = f"{quote_plus(cfg.client_id)}:{quote_plus(self._secret)}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif cfg.method == "client_secret_post":
            assert self._secret is not None
            form |= {"client_id": cfg.client_id, "client_secret": self._secret}
        else:
            assert self._key is not None
            now = int(time.time())
            claims = {
                "iss": cfg.client_id,
                "sub": cfg.client_id,
                "aud": cfg.token_url,
                "exp": now + ASSERTION_LIFETIME,
                "iat": now,
                "jti": secrets.token_urlsafe(24),
            }
            form |= {
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": sign_assertion(self._key, cfg.algorithm, claims, cfg.key_id),
            }
        try:
            async with session.post(cfg.token_url, data=form, headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UnavailableError(
                f"destination {self.destination}: token endpoint unreachable ({type(exc).__name__})"
            ) from exc
        if status != 200:
            # The token endpoint's error code (invalid_client, invalid_scope) names the configuration problem.
            try:
                code = str(orjson.loads(body).get("error", ""))[:64]
            except (orjson.JSONDecodeError, AttributeError):
                code = ""
            raise UnavailableError(
                f"destination {self.destination}: token endpoint answered HTTP {status} {code}".rstrip()
            )
        try:
            doc = orjson.loads(body)
            token = str(doc["access_token"])
            lifetime = float(doc.get("expires_in", 300))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise UnavailableError(f"destination {self.destination}: token endpoint sent no access_token") from None
        log.info(
            "Got an access token for %s, valid for %.0f s.",
            self.destination,
            lifetime,
            extra={"destination": self.destination},
        )
        return f"Bearer {token}", lifetime


def token_source(cfg: BearerAuth | ClientCredentialsAuth | None, destination: str) -> TokenSource | None:
    if cfg is None:
        return None
    if isinstance(cfg, BearerAuth):
        return StaticBearer(cfg)
    return ClientCredentials(cfg, destination)
