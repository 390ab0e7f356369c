"""TLS contexts against real sockets: a real HTTPS server with a self-signed certificate is refused unless its
CA is configured; a reload swaps certificates for new connections and keeps established ones; a broken reload
keeps the old certificate."""

from __future__ import annotations

import http.server
import shutil
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.tls import ClientTLS, ReloadableContext, ServerTLS, client_context, reload_all, server_context
from tests.pki import make_pki


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"resourceType":"CapabilityStatement"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def https_server(cert: Path, key: Path) -> Iterator[int]:
    """A real HTTPS server (http.server in a thread) on a free port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


def _get(port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> bytes:
    with urllib.request.urlopen(f"https://{host}:{port}/metadata", context=ctx, timeout=5) as r:
        return bytes(r.read())


def test_a_self_signed_https_server_is_refused_unless_its_ca_is_configured(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with https_server(pki.path("selfsigned.pem"), pki.path("selfsigned.key")) as port:
        with pytest.raises(urllib.error.URLError) as err:
            _get(port, client_context(ClientTLS()))  # the system trust store does not know it
        assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
        with pytest.raises(urllib.error.URLError) as err:
            _get(port, client_context(ClientTLS(ca=pki.p("ca.pem"))))  # a different CA
        assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
        assert b"CapabilityStatement" in _get(port, client_context(ClientTLS(ca=pki.p("selfsigned-ca.pem"))))


def test_the_server_name_is_checked_and_can_be_overridden(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with https_server(pki.path("server.pem"), pki.path("server.key")) as port:
        assert b"Capability" in _get(port, client_context(ClientTLS(ca=pki.p("ca.pem"))))
        # Connecting to an address the certificate does not name fails unless server_hostname says which name.
        cfg = ClientTLS(ca=pki.p("ca.pem"), server_hostname="localhost")
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client_context(cfg).wrap_socket(raw, server_hostname=cfg.server_hostname) as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
        wrong = ClientTLS(ca=pki.p("ca.pem"), server_hostname="ehr.example.org")
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            client_context(wrong).wrap_socket(raw, server_hostname=wrong.server_hostname)
        raw.close()


def _serve_once_per_connection(listener: socket.socket, ctx: ssl.SSLContext, stop: threading.Event) -> None:
    listener.settimeout(0.1)  # so the loop sees ``stop``: closing a socket does not wake a thread in accept()
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        conn.settimeout(5)

        def serve(c: socket.socket) -> None:
            try:
                with ctx.wrap_socket(c, server_side=True) as s:
                    while data := s.recv(100):
                        s.sendall(data)
            except (OSError, ssl.SSLError):
                pass

        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _server_cert_cn(port: int, ca: str) -> tuple[ssl.SSLSocket, str]:
    ctx = client_context(ClientTLS(ca=ca, server_hostname="localhost"))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost")
    der = s.getpeercert(binary_form=True)
    from gateway.tls import PeerCertificate

    assert der is not None
    return s, PeerCertificate.from_der(der).common_name


def test_reload_swaps_the_certificate_for_new_connections_only(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "a")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(pki.path("server.pem"), live / "server.pem")
    shutil.copy(pki.path("server.key"), live / "server.key")
    cfg = ServerTLS(cert=str(live / "server.pem"), key=str(live / "server.key"))
    holder = ReloadableContext.server(cfg, "test-listener")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    t = threading.Thread(
        target=_serve_once_per_connection, args=(listener, holder.listening_context(), stop), daemon=True
    )
    t.start()
    port = listener.getsockname()[1]
    try:
        old_conn, cn = _server_cert_cn(port, pki.p("ca.pem"))
        assert cn == "localhost"
        # A renewed certificate from the same CA, with another CN so the test can tell them apart.
        from gateway.commands.certs import issue

        issue(pki.ca, "renewed", server=True, dns_names=("localhost",)).write(live / "server.pem", live / "server.key")
        assert reload_all() == []
        new_conn, cn = _server_cert_cn(port, pki.p("ca.pem"))
        assert cn == "renewed"
        # The connection made before the reload still works.
        old_conn.sendall(b"ping")
        assert old_conn.recv(10) == b"ping"
        # A broken file keeps the current certificate.
        (live / "server.key").write_text("garbage")
        errors = reload_all()
        assert len(errors) == 1 and isinstance(errors[0], ConfigError)
        third, cn = _server_cert_cn(port, pki.p("ca.pem"))
        assert cn == "renewed"
        for s in (old_conn, new_conn, third):
            s.close()
    finally:
        stop.set()
        listener.close()
        t.join(5)


def test_server_context_refuses_clients_without_a_certificate_when_required(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ctx = server_context(
        ServerTLS(
            cert=pki.p("server.pem"), key=pki.p("server.key"), client_ca=pki.p("ca.pem"), require_client_cert=True
        )
    )
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    t = threading.Thread(target=_serve_once_per_connection, args=(listener, ctx, stop), daemon=True)
    t.start()
    port = listener.getsockname()[1]
    try:
        anonymous = client_context(ClientTLS(ca=pki.p("ca.pem")))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with raw, pytest.raises((ssl.SSLError, ConnectionError)):
            s = anonymous.wrap_socket(raw, server_hostname="localhost")
            with s:
                s.sendall(b"x")  # TLS 1.3: the refusal arrives after the client's side of the handshake
                assert s.recv(10) == b""
                raise ConnectionError("closed")
        mutual = client_context(ClientTLS(ca=pki.p("ca.pem"), cert=pki.p("client.pem"), key=pki.p("client.key")))
        with mutual.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
        ) as s:
            s.sendall(b"hi")
            assert s.recv(10) == b"hi"
    finally:
        stop.set()
        listener.close()
        t.join(5)
