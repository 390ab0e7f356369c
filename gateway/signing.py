"""Trust in the rule set: Ed25519 detached signatures, AES-256-GCM encryption and a durable anti-rollback serial.

The rule set decides where patient data goes, so the daemon only uses one that

1. decrypts (when ``[rules_trust] decryption_key`` is set) with AES-256-GCM,
2. carries a detached Ed25519 signature over its exact plaintext bytes, by a key whose id is listed in
   ``[rules_trust] keys`` (several keys may be trusted at once, for rotation),
3. has a ``serial`` no lower than the highest serial this machine has accepted (the state file), so an attacker
   cannot put back an older, validly signed set.

File formats (all one line of text, so they survive copy and paste and review):

- public key  ``ed25519-pub KEY_ID BASE64``   (``gateway rules keygen`` writes ``NAME.pub``)
- secret key  ``ed25519-secret KEY_ID BASE64`` (``NAME.key``, mode 0600, never on the daemon's machine)
- signature   ``ed25519-sig KEY_ID BASE64``   (``RULES.sig``, next to the rule file)

An encrypted rule file is ``GWRULES1`` | 12-byte nonce | ciphertext and tag; the magic is the associated data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.crypto import ConfigPath, parse_key, read_secret
from gateway.errors import ConfigError

KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PUB_TAG = "ed25519-pub"
SECRET_TAG = "ed25519-secret"
SIG_TAG = "ed25519-sig"
ENC_MAGIC = b"GWRULES1"
NONCE_BYTES = 12


class TrustedKey(BaseModel):
    """One public key allowed to sign rule sets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(
        None,
        description="Key id, as in the signature file. Required with public_key; with file, optional and "
        "checked against the file.",
    )
    public_key: str | None = Field(None, description="The Ed25519 public key, base64 of its 32 bytes.")
    file: ConfigPath | None = Field(
        None, description="A public key file written by `gateway rules keygen` (relative to the config file)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TrustedKey:
        if (self.public_key is None) == (self.file is None):
            raise ValueError("give exactly one of public_key and file")
        if self.public_key is not None and self.id is None:
            raise ValueError("a public_key needs its id")
        if self.id is not None and not KEY_ID_RE.match(self.id):
            raise ValueError("a key id is 1-64 letters, digits, '.', '_' or '-'")
        if self.public_key is not None:
            _public_key_bytes(self.public_key, "public_key")
        return self


class RulesTrustConfig(BaseModel):
    """``[rules_trust]`` of the daemon config: which keys may sign the rule set, and how to decrypt it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[TrustedKey, ...] = Field(
        (), description="Public keys allowed to sign the rule set; several during a key rotation."
    )
    signature: ConfigPath | None = Field(
        None,
        description="The detached signature file. Default: the rule file's path with `.sig` added (after "
        "removing a final `.enc`): rules.yaml.sig for rules.yaml and for rules.yaml.enc.",
    )
    decryption_key: ConfigPath | None = Field(
        None,
        description="AES-256 key of an encrypted rule set: a file (64 hex digits) or `credential:NAME` "
        "(systemd LoadCredential=). When set, the rule file must be encrypted.",
    )
    state_file: ConfigPath = Field(
        "/var/lib/gateway/rules.serial",
        description="Where the highest accepted serial is remembered (anti-rollback); relative to the config "
        "file. Written atomically after each start or reload that accepts a rule set.",
    )


# -- keys and signatures --------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str, size: int | None = None) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"the {what} is not valid base64") from None
    if size is not None and len(data) != size:
        raise ConfigError(f"the {what} is {len(data)} bytes, expected {size}")
    return data


def _public_key_bytes(text: str, what: str) -> bytes:
    try:
        return _unb64(text.strip(), what, 32)
    except ConfigError as exc:
        raise ValueError(exc.reason) from None


def _line(text: str, tag: str, what: str) -> tuple[str, str]:
    parts = text.strip().split()
    if len(parts) != 3 or parts[0] != tag:
        raise ConfigError(f"the {what} is not in the expected form '{tag} KEY_ID BASE64'")
    if not KEY_ID_RE.match(parts[1]):
        raise ConfigError(f"the {what} names an invalid key id")
    return parts[1], parts[2]


def keygen(key_id: str, secret_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair: the secret key readable by its owner only (created, never overwritten)."""
    if not KEY_ID_RE.match(key_id):
        raise ConfigError("a key id is 1-64 letters, digits, '.', '_' or '-'", key_id)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    try:
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError("refusing to overwrite an existing key", str(secret_path)) from None
    try:
        os.write(fd, f"{SECRET_TAG} {key_id} {_b64(raw)}\n".encode())
    finally:
        os.close(fd)
    public_path.write_text(f"{PUB_TAG} {key_id} {_b64(key.public_key().public_bytes_raw())}\n")


def load_secret_key(path: Path) -> tuple[str, Ed25519PrivateKey]:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the signing key: {getattr(exc, 'strerror', None) or exc}", str(path)) from None
    try:
        key_id, b64 = _line(text, SECRET_TAG, "signing key")
        return key_id, Ed25519PrivateKey.from_private_bytes(_unb64(b64, "signing key", 32))
    except ConfigError as exc:
        raise ConfigError(exc.reason, str(path)) from None


def parse_public_key_file(text: str, where: str) -> tuple[str, Ed25519PublicKey]:
    try:
        key_id, b64 = _line(text, PUB_TAG, "public key")
        return key_id, Ed25519PublicKey.from_public_bytes(_unb64(b64, "public key", 32))
    except ConfigError as exc:
        raise ConfigError(exc.reason, where) from None


def sign(data: bytes, key_id: str, key: Ed25519PrivateKey) -> str:
    """The signature file's text for ``data``."""
    return f"{SIG_TAG} {key_id} {_b64(key.sign(data))}\n"


def trusted_keys(cfg: RulesTrustConfig) -> dict[str, Ed25519PublicKey]:
    """The trusted keys by id, reading key files now."""
    out: dict[str, Ed25519PublicKey] = {}
    for i, k in enumerate(cfg.keys):
        where = f"rules_trust.keys[{i}]"
        if k.file is not None:
            try:
                text = read_secret(k.file, "trusted public key").decode("ascii")
            except UnicodeDecodeError:
                raise ConfigError("the public key file is not text", k.file) from None
            key_id, pub = parse_public_key_file(text, k.file)
            if k.id is not None and k.id != key_id:
                raise ConfigError(f"the key file is for key id {key_id!r}, not {k.id!r}", where)
        else:
            assert k.public_key is not None and k.id is not None  # the model validator guarantees it
            key_id, pub = k.id, Ed25519PublicKey.from_public_bytes(_unb64(k.public_key.strip(), "public key", 32))
        if key_id in out:
            raise ConfigError(f"key id {key_id!r} is listed twice", where)
        out[key_id] = pub
    return out


def verify(data: bytes, signature_text: str, keys: dict[str, Ed25519PublicKey], where: str) -> str:
    """The id of the trusted key whose signature over ``data`` this is; ConfigError naming the failed check."""
    try:
        key_id, b64 = _line(signature_text, SIG_TAG, "signature file")
        sig = _unb64(b64, "signature", 64)
    except ConfigError as exc:
        raise ConfigError(f"signature check failed: {exc.reason}", where) from None
    key = keys.get(key_id)
    if key is None:
        trusted = ", ".join(sorted(keys)) or "none"
        raise ConfigError(
            f"signature check failed: signed by key {key_id!r}, which is not trusted (trusted: {trusted})", where
        )
    try:
        key.verify(sig, data)
    except InvalidSignature:
        raise ConfigError(
            f"signature check failed: the signature by key {key_id!r} does not match the rule set (tampered, or "
            "signed before its last change)",
            where,
        ) from None
    return key_id


def default_signature_path(rules_path: Path) -> Path:
    name = rules_path.name.removesuffix(".enc")
    return rules_path.with_name(name + ".sig")


# -- encryption -----------------------------------------------------------------------------------------------


def is_encrypted(blob: bytes) -> bool:
    return blob.startswith(ENC_MAGIC)


def encrypt(plaintext: bytes, key: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return ENC_MAGIC + nonce + AESGCM(key).encrypt(nonce, plaintext, ENC_MAGIC)


def decrypt(blob: bytes, key: bytes, where: str) -> bytes:
    if not is_encrypted(blob):
        raise ConfigError("decryption failed: the rule file is not encrypted (no GWRULES1 header)", where)
    nonce = blob[len(ENC_MAGIC) : len(ENC_MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(ENC_MAGIC) + NONCE_BYTES :], ENC_MAGIC)
    except InvalidTag:
        raise ConfigError("decryption failed: wrong key, or the encrypted file was altered", where) from None


def read_encryption_key(spec: str) -> bytes:
    return parse_key(read_secret(spec, "rules decryption key"), spec)


# -- anti-rollback --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    serial: int
    sha256: str


def read_state(path: Path) -> Accepted | None:
    """The highest accepted serial, or None on a machine that has never accepted a rule set."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return Accepted(int(doc["serial"]), str(doc["sha256"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # A state file that cannot be read is not "no state": treating it so would re-open rollback.
        raise ConfigError(f"rollback check failed: cannot read the serial state file ({exc})", str(path)) from None


def check_serial(serial: int, digest: str, state: Accepted | None, where: str) -> None:
    """Refuse a rule set older than the accepted one, or a different set under the accepted serial."""
    if state is None:
        return
    if serial < state.serial:
        raise ConfigError(
            f"rollback check failed: serial {serial} is lower than serial {state.serial}, already accepted on "
            "this machine",
            where,
        )
    if serial == state.serial and digest != state.sha256:
        raise ConfigError(
            f"rollback check failed: serial {serial} was already accepted with different content; a changed "
            "rule set needs a higher serial",
            where,
        )


def write_state(path: Path, accepted: Accepted) -> None:
    """Remember the accepted serial atomically (write, fsync, rename, fsync the directory): a crash leaves the
    old state or the new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "serial": accepted.serial,
        "sha256": accepted.sha256,
        "accepted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    fd, tmp = tempfile.mkstemp(prefix=".rules-serial-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
