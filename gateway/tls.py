"""TLS for every listener and client: typed config, SSL context builders, and contexts reloaded on SIGHUP.

The API other modules use (kept small on purpose; adapters for MLLP, DICOM, MQTT, FHIR REST and MLLP forward
depend on it):

``ServerTLS``
    Config of a TLS listener: ``cert``, ``key``, optional ``client_ca`` (turns on client-certificate checks),
    ``require_client_cert``, ``allowed_subjects`` / ``allowed_fingerprints`` (an allow-list checked after the
    handshake with ``ServerTLS.refusal(peer_certificate(ssl_object))``), ``min_version``,
    ``handshake_timeout_seconds``.
``ClientTLS``
    Config of a TLS client: ``ca`` (a CA bundle; none means the system's trust store), optional ``cert`` and
    ``key`` (mutual TLS), ``verify`` (on by default; off is logged loudly), ``server_hostname`` (overrides the
    name checked against the server's certificate and sent as SNI).
``server_context(cfg)`` / ``client_context(cfg)``
    Build an ``ssl.SSLContext`` (TLS 1.2 minimum) now, reading the files. ConfigError names the file that is
    missing, unreadable or does not match.
``ReloadableContext``
    Holds the current context; ``.context`` is what a *new* connection should use, ``.reload()`` re-reads the
    files and swaps it (an error keeps the old one). Established connections keep the context they were made
    with, so a reload never drops them. ``ReloadableContext.server(cfg, name)`` / ``.client(cfg, name)`` build
    one; ``.listening_context()`` is one fixed context for libraries that take a context once at bind time
    (pynetdicom, ``asyncio.start_server``): each handshake on it switches to the current context.
``reload_all()``
    Re-read every live ReloadableContext (the daemon calls it on SIGHUP); returns the errors, one per context
    that kept its old certificate.
``tls_server_protocol(app, context, handshake_timeout=, on_failure=)``
    Wraps an asyncio server protocol in TLS inside a ``loop.create_server`` factory (take
    ``holder.context`` there, per connection), reporting failed handshakes; ``handshake_failure(exc)`` turns
    the reported exception into a metric reason and a log detail.
``peer_certificate(obj)``
    The verified client certificate of an ``ssl.SSLObject`` / ``ssl.SSLSocket`` as ``PeerCertificate``
    (RFC 4514 subject, SHA-256 fingerprint, expiry), or None when the client sent none.

Paths: relative paths are resolved against the directory of the config file when the config is validated with
``gateway.crypto.path_context(base_dir)`` (as ``gateway.config.load_config`` does), else against the working
directory. A key may be ``credential:NAME``, read from ``$CREDENTIALS_DIRECTORY/NAME`` (systemd's
LoadCredential=) at build time. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import threading
import weakref
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.crypto import ConfigPath, resolve_file
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _fingerprint(value: str) -> str:
    fp = value.strip().lower().removeprefix("sha256:").replace(":", "")
    if not _FINGERPRINT.match(fp):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits, colons allowed): {value!r}")
    return fp


class ServerTLS(_Frozen):
    """TLS on a listener, optionally with client certificates (mutual TLS) and an allow-list."""

    cert: ConfigPath = Field(description="PEM file with the server certificate (and its intermediates).")
    key: ConfigPath = Field(
        description="PEM file with the private key; `credential:NAME` reads it from $CREDENTIALS_DIRECTORY/NAME."
    )
    client_ca: ConfigPath | None = Field(
        None, description="PEM bundle of the CAs whose client certificates are accepted; unset: no client certificates."
    )
    require_client_cert: bool = Field(
        False, description="Refuse a client that presents no certificate (mutual TLS). Needs client_ca."
    )
    allowed_subjects: tuple[str, ...] = Field(
        (),
        description="Accept only clients whose certificate subject is one of these: the full RFC 4514 subject "
        "(`CN=modality-1,O=Hospital`) or `CN=<name>` for the common name alone. Empty: any verified client.",
    )
    allowed_fingerprints: tuple[str, ...] = Field(
        (), description="Accept only clients whose certificate has one of these SHA-256 fingerprints (hex)."
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version accepted.")
    handshake_timeout_seconds: float = Field(
        10.0, gt=0, description="A client that has not finished the TLS handshake in this time is disconnected."
    )

    @field_validator("allowed_fingerprints")
    @classmethod
    def _normalise_fingerprints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_fingerprint(v) for v in value)

    @model_validator(mode="after")
    def _client_checks_need_a_ca(self) -> ServerTLS:
        if self.client_ca is None and (self.require_client_cert or self.allowed_subjects or self.allowed_fingerprints):
            raise ValueError(
                "require_client_cert and the allow-lists need client_ca (the CA that signs client certificates)"
            )
        return self

    @property
    def has_allow_list(self) -> bool:
        return bool(self.allowed_subjects or self.allowed_fingerprints)

    def refusal(self, peer: PeerCertificate | None) -> str | None:
        """Why this verified peer must be refused (PHI-free text for the log), or None to accept it. The
        handshake already refused certificates from unknown CAs and expired ones; this adds the allow-list."""
        if peer is None:
            if self.require_client_cert or self.has_allow_list:
                return "no client certificate"
            return None
        if not self.has_allow_list:
            return None
        if peer.fingerprint in self.allowed_fingerprints:
            return None
        for entry in self.allowed_subjects:
            if entry == peer.subject or (
                entry.startswith("CN=") and "," not in entry and entry[3:] == peer.common_name
            ):
                return None
        return f"client certificate {peer.subject!r} (sha256 {peer.fingerprint[:16]}...) is not on the allow-list"


class ClientTLS(_Frozen):
    """TLS on an outgoing connection; the server's certificate is verified unless ``verify`` is turned off."""

    ca: ConfigPath | None = Field(
        None, description="PEM bundle of the CAs trusted for the server; unset: the system trust store."
    )
    cert: ConfigPath | None = Field(None, description="PEM client certificate for mutual TLS.")
    key: ConfigPath | None = Field(
        None,
        description="PEM private key of the client certificate; `credential:NAME` reads $CREDENTIALS_DIRECTORY/NAME.",
    )
    verify: bool = Field(True, description="Verify the server's certificate and name. Off only for a test bench.")
    server_hostname: str | None = Field(
        None,
        description="Name expected in the server's certificate (and sent as SNI) instead of the host connected to.",
    )
    min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version offered.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> ClientTLS:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together (both or neither)")
        return self


# -- building contexts ----------------------------------------------------------------------------------------


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, what: str) -> None:
    cert_path = resolve_file(cert, f"{what} certificate")
    key_path = resolve_file(key, f"{what} private key")
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot read the {what} certificate or key: {exc.strerror}", exc.filename or cert) from None
    except PermissionError as exc:
        raise ConfigError(f"no permission to read the {what} certificate or key", exc.filename or cert) from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"the {what} certificate and key do not load together ({exc.reason or exc}); are both PEM and do "
            "they belong to each other?",
            str(cert_path),
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: str, what: str) -> None:
    path = resolve_file(ca, what)
    try:
        ctx.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:  # before OSError, of which it is a subclass
        raise ConfigError(f"the {what} is not a PEM certificate bundle ({exc.reason or exc})", str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror}", str(path)) from None


def server_context(cfg: ServerTLS) -> ssl.SSLContext:
    """A server-side context: the certificate and key, TLS >= min_version, and client-certificate verification
    against ``client_ca`` (required or optional as configured). Reads the files now."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(ctx, cfg.cert, cfg.key, "server")
    if cfg.client_ca is not None:
        _load_ca(ctx, cfg.client_ca, "client CA bundle")
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: ClientTLS) -> ssl.SSLContext:
    """A client-side context: server verification against ``ca`` (or the system store), hostname checking,
    TLS >= min_version, and the client certificate when configured. Reads the files now."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    if cfg.ca is not None:
        _load_ca(ctx, cfg.ca, "CA bundle")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cfg.cert is not None and cfg.key is not None:
        _load_chain(ctx, cfg.cert, cfg.key, "client")
    if not cfg.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning(
            "TLS certificate verification is OFF for a client connection: anyone on the network path can read "
            "and change its traffic. Use this on a test bench only.",
            extra={"reason": "tls-verify-off"},
        )
    return ctx


# -- reloading ------------------------------------------------------------------------------------------------

_live: weakref.WeakSet[ReloadableContext] = weakref.WeakSet()
_live_lock = threading.Lock()


class ReloadableContext:
    """The context new connections use, swapped by ``reload()``. Thread-safe (pynetdicom accepts in threads)."""

    def __init__(self, build: Callable[[], ssl.SSLContext], name: str) -> None:
        self.name = name
        self._build = build
        self._context = build()
        self._front: ssl.SSLContext | None = None
        with _live_lock:
            _live.add(self)

    @classmethod
    def server(cls, cfg: ServerTLS, name: str) -> ReloadableContext:
        return cls(lambda: server_context(cfg), name)

    @classmethod
    def client(cls, cfg: ClientTLS, name: str) -> ReloadableContext:
        return cls(lambda: client_context(cfg), name)

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def reload(self) -> None:
        """Re-read the files. Raises ConfigError and keeps the current context when they do not load."""
        self._context = self._build()
        log.info("Reloaded the TLS certificates of %s.", self.name, extra={"source": self.name})

    def listening_context(self) -> ssl.SSLContext:
        """One server context to hand to a library once: at each handshake its SNI callback (which OpenSSL calls
        for every ClientHello, with or without a server name) moves the connection to the current context, so
        the certificate, key and client CA bundle of the latest reload are used. The verify mode is the one of
        the first build (it comes from the config, which a reload does not change)."""
        if self._front is None:
            front = self._build()

            def switch(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
                current = self._context
                if obj.context is not current:
                    obj.context = current

            front.sni_callback = switch
            self._front = front
        return self._front


def reload_all() -> list[ConfigError]:
    """Reload every live ReloadableContext; a context whose files fail keeps its old certificate, and its
    error is logged and returned."""
    with _live_lock:
        holders = list(_live)
    errors: list[ConfigError] = []
    for holder in holders:
        try:
            holder.reload()
        except ConfigError as exc:
            log.error(
                "Kept the old TLS certificates of %s: the new ones do not load: %s.",
                holder.name,
                exc,
                extra={"source": holder.name},
            )
            errors.append(exc)
    return errors


# -- the peer -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCertificate:
    """What the gateway knows of a verified client certificate: enough to decide and to log, no more."""

    subject: str  # RFC 4514, e.g. "CN=modality-1,O=Hospital"
    common_name: str
    fingerprint: str  # SHA-256 of the DER, lowercase hex
    not_after: datetime

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        cert = x509.load_der_x509_certificate(der)
        cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = cns[0].value if cns else ""
        return cls(
            subject=cert.subject.rfc4514_string(),
            common_name=cn if isinstance(cn, str) else cn.decode("utf-8", "replace"),
            fingerprint=hashlib.sha256(der).hexdigest(),
            not_after=cert.not_valid_after_utc,
        )


def peer_certificate(obj: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCertificate | None:
    """The client's certificate after the handshake (verified by it when client_ca is set), or None."""
    if obj is None:
        return None
    der = obj.getpeercert(binary_form=True)
    return PeerCertificate.from_der(der) if der else None


# -- asyncio listeners ----------------------------------------------------------------------------------------


class _ServerTLSProtocol(sslproto.SSLProtocol):
    """asyncio's own TLS protocol (what ``loop.create_server(ssl=...)`` uses), built per connection so that each
    connection takes the context current at accept time, and reporting a failed handshake with its peer (the
    loop would drop it silently). Not ``StreamWriter.start_tls``: a ClientHello that arrived before the upgrade
    sits in the plain stream buffer and the handshake hangs (CPython gh-142352, uvloop #707)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        timeout: float,
        on_failure: Callable[[str, BaseException | None], None],
        admit: Callable[[str, str], bool] | None,
    ) -> None:
        waiter = loop.create_future()
        # typeshed declares the timeout int; asyncio takes any number of seconds.
        super().__init__(loop, app, context, waiter, server_side=True, ssl_handshake_timeout=timeout)  # type: ignore[arg-type]
        self._peer = "unknown"
        self._report = on_failure
        self._admit = admit
        self._refused = False
        waiter.add_done_callback(self._handshake_done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        addr = transport.get_extra_info("peername")
        address = str(addr[0]) if isinstance(addr, tuple) and addr else "unknown"
        if isinstance(addr, tuple) and len(addr) >= 2:
            self._peer = f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
        if self._admit is not None and not self._admit(address, self._peer):
            self._refused = True  # the admit callback logged why; no handshake is started
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                transport.close()
            return
        super().connection_made(transport)

    def _handshake_done(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or self._refused:
            return
        exc = fut.exception()
        if exc is not None:
            self._report(self._peer, exc)
        elif "ssl_object" not in self._extra:  # the client went away before the handshake finished
            self._report(self._peer, None)


def tls_server_protocol(
    app: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    *,
    handshake_timeout: float,
    on_failure: Callable[[str, BaseException | None], None],
    admit: Callable[[str, str], bool] | None = None,
) -> asyncio.BaseProtocol:
    """Wrap an asyncio server's protocol (e.g. ``asyncio.StreamReaderProtocol``) in TLS, for use in the protocol
    factory of ``loop.create_server``: ``app.connection_made`` is called only after a successful handshake.
    ``on_failure(peer, exc)`` is called for a failed handshake: ``exc`` is an ``ssl.SSLError`` (untrusted,
    expired or missing client certificate, no shared protocol), a ``ConnectionAbortedError`` (handshake
    timeout) or None (the client left). ``admit(address, peer)``, when given, runs before the handshake: False
    aborts the connection at once (it logs its own reason), so refused addresses and floods cost no handshake."""
    return _ServerTLSProtocol(asyncio.get_running_loop(), app, context, handshake_timeout, on_failure, admit)


def handshake_failure(exc: BaseException | None) -> tuple[str, str]:
    """(reason token, PHI-free detail) of a failed handshake, for metrics and logs."""
    if exc is None:
        return "handshake-failed", "the client closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError):
        return "handshake-failed", str(exc.reason or type(exc).__name__).lower().replace("_", " ")
    if isinstance(exc, ConnectionAbortedError):
        return "handshake-timeout", "no TLS handshake in time"
    return "handshake-failed", f"connection lost ({type(exc).__name__})"
