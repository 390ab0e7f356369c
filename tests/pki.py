"""Certificates for TLS tests, made with the same code as `gateway certs init`: a CA, a server certificate for
localhost/127.0.0.1/::1, an allowed client, a client from another CA, an expired client and a self-signed
server."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.commands.certs import Issued, issue, new_ca


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Issued
    client: Issued

    def path(self, name: str) -> Path:
        return self.dir / name

    def p(self, name: str) -> str:
        return str(self.dir / name)


def make_pki(directory: Path) -> Pki:
    """Files: ca.pem, server.pem/.key, client.pem/.key (CN=modality-1), client2.pem/.key (CN=modality-2, same
    CA), other-ca.pem, rogue.pem/.key (CN=modality-1 from the other CA), expired.pem/.key (CN=modality-1, same
    CA, expired yesterday), selfsigned.pem/.key (a server certificate that is its own CA)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = new_ca("test CA")
    other = new_ca("other CA")
    (directory / "ca.pem").write_bytes(ca.cert_pem())
    (directory / "other-ca.pem").write_bytes(other.cert_pem())
    issue(ca, "localhost", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1", "::1")).write(
        directory / "server.pem", directory / "server.key"
    )
    client = issue(ca, "modality-1", server=False)
    client.write(directory / "client.pem", directory / "client.key")
    issue(ca, "modality-2", server=False).write(directory / "client2.pem", directory / "client2.key")
    issue(other, "modality-1", server=False).write(directory / "rogue.pem", directory / "rogue.key")
    now = datetime.now(UTC)
    issue(ca, "modality-1", server=False, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)).write(
        directory / "expired.pem", directory / "expired.key"
    )
    selfsigned = _self_signed_server("localhost")
    selfsigned.write(directory / "selfsigned.pem", directory / "selfsigned.key")
    (directory / "selfsigned-ca.pem").write_bytes(selfsigned.cert_pem())  # what an operator would configure
    return Pki(directory, ca, client)


def _self_signed_server(name: str) -> Issued:
    """A server certificate that is its own issuer (what a device or a test FHIR server often ships)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)
