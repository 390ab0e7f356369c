"""TLS config models and context builders: validation, path resolution, file errors, the allow-list."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.crypto import path_context, resolve_file
from gateway.errors import ConfigError
from gateway.tls import ClientTLS, PeerCertificate, ServerTLS, client_context, server_context
from tests.pki import make_pki


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    cfg = ServerTLS.model_validate({"cert": "certs/s.pem", "key": "/abs/s.key"}, context=path_context(tmp_path))
    assert cfg.cert == str(tmp_path / "certs/s.pem")
    assert cfg.key == "/abs/s.key"


def test_credential_keys_come_from_the_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ServerTLS.model_validate({"cert": "s.pem", "key": "credential:tls.key"}, context=path_context(tmp_path))
    assert cfg.key == "credential:tls.key"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        resolve_file(cfg.key, "key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert resolve_file(cfg.key, "key") == tmp_path / "tls.key"
    with pytest.raises(ValidationError, match="plain file name"):
        ServerTLS.model_validate({"cert": "s.pem", "key": "credential:../etc/shadow"})


def test_fingerprints_are_normalised_and_checked() -> None:
    fp = "AB:" * 31 + "CD"
    cfg = ServerTLS(cert="s", key="k", client_ca="ca", allowed_fingerprints=(fp,))
    assert cfg.allowed_fingerprints == ("ab" * 31 + "cd",)
    with pytest.raises(ValidationError, match="SHA-256"):
        ServerTLS(cert="s", key="k", client_ca="ca", allowed_fingerprints=("abc",))


def test_client_checks_need_a_client_ca() -> None:
    with pytest.raises(ValidationError, match="client_ca"):
        ServerTLS(cert="s", key="k", require_client_cert=True)
    with pytest.raises(ValidationError, match="client_ca"):
        ServerTLS(cert="s", key="k", allowed_subjects=("CN=x",))
    with pytest.raises(ValidationError, match="extra"):
        ServerTLS.model_validate({"cert": "s", "key": "k", "verify": False})


def test_client_cert_and_key_go_together() -> None:
    with pytest.raises(ValidationError, match="together"):
        ClientTLS(cert="c.pem")


def test_server_context_is_tls12_minimum_and_requires_client_certs(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ctx = server_context(
        ServerTLS(
            cert=pki.p("server.pem"), key=pki.p("server.key"), client_ca=pki.p("ca.pem"), require_client_cert=True
        )
    )
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    optional = server_context(ServerTLS(cert=pki.p("server.pem"), key=pki.p("server.key"), client_ca=pki.p("ca.pem")))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    plain = server_context(ServerTLS(cert=pki.p("server.pem"), key=pki.p("server.key"), min_version="1.3"))
    assert plain.verify_mode == ssl.CERT_NONE
    assert plain.minimum_version == ssl.TLSVersion.TLSv1_3


def test_client_context_verifies_by_default(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ctx = client_context(ClientTLS(ca=pki.p("ca.pem"), cert=pki.p("client.pem"), key=pki.p("client.key")))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    system = client_context(ClientTLS())
    assert system.verify_mode == ssl.CERT_REQUIRED and system.cert_store_stats()["x509_ca"] >= 0


def test_verify_off_is_logged_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = client_context(ClientTLS(verify=False))
    assert ctx.verify_mode == ssl.CERT_NONE
    assert "verification is OFF" in caplog.text


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        server_context(ServerTLS(cert=str(tmp_path / "missing.pem"), key=pki.p("server.key")))
    with pytest.raises(ConfigError, match="do not load together"):
        server_context(ServerTLS(cert=pki.p("server.pem"), key=pki.p("client.key")))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="not a PEM"):
        client_context(ClientTLS(ca=str(tmp_path / "junk.pem")))


def test_allow_list_by_subject_common_name_and_fingerprint(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    peer = PeerCertificate.from_der(pki.client.cert.public_bytes(encoding=_der()))
    assert peer.common_name == "modality-1"
    assert peer.subject == "CN=modality-1,O=hl7-gateway development"
    assert peer.not_after > datetime.now(UTC)
    base = {"cert": "s", "key": "k", "client_ca": "ca"}
    assert ServerTLS.model_validate(base).refusal(peer) is None
    assert ServerTLS.model_validate(base).refusal(None) is None
    assert ServerTLS.model_validate({**base, "require_client_cert": True}).refusal(None) == "no client certificate"
    assert ServerTLS.model_validate({**base, "allowed_subjects": ["CN=modality-1"]}).refusal(peer) is None
    assert ServerTLS.model_validate({**base, "allowed_subjects": [peer.subject]}).refusal(peer) is None
    assert ServerTLS.model_validate({**base, "allowed_fingerprints": [peer.fingerprint]}).refusal(peer) is None
    refused = ServerTLS.model_validate({**base, "allowed_subjects": ["CN=modality-2", "CN=modality"]}).refusal(peer)
    assert refused is not None and "not on the allow-list" in refused


def _der():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER
