"""``gateway certs init DIR``: a development CA, a server certificate and a client certificate.

For development and tests only (see certs/README.md): the CA key sits next to the certificates it signs, and
anyone who holds it can mint certificates the gateway trusts. In production certificates come from the
hospital's PKI.

The functions here (``new_ca``, ``issue``) are also what the tests use to build other CAs and expired
certificates.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(self, cert_path: Path, key_path: Path) -> None:
        cert_path.write_bytes(self.cert_pem())
        _write_private(key_path, self.key_pem())


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, from the first byte (no window with wider modes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hl7-gateway development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def new_ca(common_name: str = "hl7-gateway development CA", days: int = 3650) -> Issued:
    """A self-signed CA certificate (P-256) that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server: bool,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """An end-entity certificate signed by ``ca``: for a server (serverAuth, with the SANs) or a client
    (clientAuth). ``not_before``/``not_after`` override the validity (tests make expired certificates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    start = not_before or now - timedelta(minutes=5)
    end = not_after or now + timedelta(days=days)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def host_names() -> tuple[str, ...]:
    """The names this host answers to: localhost, its hostname and its fully qualified name."""
    names = ["localhost"]
    for n in (socket.gethostname(), socket.getfqdn()):
        if n and n not in names and all(c.isalnum() or c in "-." for c in n):
            names.append(n)
    return tuple(names)


FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


def init(directory: Path, *, force: bool = False, client_name: str = "gateway-dev-client") -> list[Path]:
    """Create the development CA, server and client certificates in ``directory``; returns the files written.
    Refuses to overwrite existing files unless ``force`` (a new CA would invalidate every certificate the old
    one signed)."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = [directory / f for f in FILES if (directory / f).exists()]
    if existing and not force:
        raise ConfigError(
            f"{len(existing)} certificate file(s) exist already; use --force to replace them", str(directory)
        )
    ca = new_ca()
    server = issue(ca, "gateway-dev-server", server=True, dns_names=host_names(), ip_addresses=("127.0.0.1", "::1"))
    client = issue(ca, client_name, server=False)
    ca.write(directory / "ca.pem", directory / "ca.key")
    server.write(directory / "server.pem", directory / "server.key")
    client.write(directory / "client.pem", directory / "client.key")
    return [directory / f for f in FILES]


def cmd_certs_init(args: argparse.Namespace) -> int:
    written = init(Path(args.dir), force=args.force)
    for path in written:
        print(path)
    print(
        "Development certificates only: the CA key is in the same directory. Use your organisation's PKI in "
        "production (see certs/README.md)."
    )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    c = sub.add_parser("certs", help="development certificates")
    csub = c.add_subparsers(dest="certs_command", required=True)
    i = csub.add_parser(
        "init",
        help="create a development CA, a server certificate (this host's names, 127.0.0.1, ::1) and a client "
        "certificate in DIR",
    )
    i.add_argument("dir")
    i.add_argument("--force", action="store_true", help="replace existing files (and the CA)")
    i.set_defaults(func=cmd_certs_init)
