"""Key material and encryption at rest (AES-256-GCM, keys from files or systemd credentials, key id per value).

Paths of certificates and keys in the config (``ConfigPath``) are resolved against the directory of the config
file at validation time, when the validation context carries it (``path_context(base_dir)``); a value
``credential:NAME`` stays symbolic until it is read, then names ``$CREDENTIALS_DIRECTORY/NAME``, where systemd
puts the credentials of ``LoadCredential=`` / ``LoadCredentialEncrypted=`` (readable by the service only, never
on the command line or in the environment).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from gateway.errors import ConfigError, PermanentError

log = logging.getLogger(__name__)

CREDENTIAL_PREFIX = "credential:"
BASE_DIR_KEY = "base_dir"


def path_context(base_dir: Path) -> dict[str, Any]:
    """The pydantic validation context under which relative ``ConfigPath`` values are made absolute."""
    return {BASE_DIR_KEY: base_dir}


def _resolve_config_path(value: str, info: ValidationInfo) -> str:
    if not value:
        raise ValueError("a path cannot be empty")
    if value.startswith(CREDENTIAL_PREFIX):
        name = value[len(CREDENTIAL_PREFIX) :]
        if not name or "/" in name or name in (".", ".."):
            raise ValueError("credential:NAME needs a plain file name (no slashes)")
        return value
    path = Path(value).expanduser()
    ctx = info.context
    if not path.is_absolute() and isinstance(ctx, dict) and isinstance(ctx.get(BASE_DIR_KEY), Path):
        path = ctx[BASE_DIR_KEY] / path
    return str(path)


ConfigPath = Annotated[str, AfterValidator(_resolve_config_path)]
"""A file path in the config: absolute after validation under ``path_context``, or ``credential:NAME``."""


def resolve_file(spec: str, what: str) -> Path:
    """The file a ConfigPath names, now: ``credential:NAME`` becomes ``$CREDENTIALS_DIRECTORY/NAME``. Does not
    read it; raises ConfigError when a credential is asked for outside systemd's credential mechanism."""
    if not spec.startswith(CREDENTIAL_PREFIX):
        return Path(spec)
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"the {what} is a systemd credential but $CREDENTIALS_DIRECTORY is not set (is the service started "
            "with LoadCredential=?)",
            spec,
        )
    return Path(directory) / spec[len(CREDENTIAL_PREFIX) :]


def read_secret(spec: str, what: str) -> bytes:
    """The bytes of a key file (a ConfigPath); ConfigError naming the file when it cannot be read."""
    path = resolve_file(spec, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what}: {exc.strerror}", str(path)) from None


# -- encryption at rest -----------------------------------------------------------------------------------------
#
# A sealed value is  MAGIC (4) | key id (8) | nonce (12) | AES-256-GCM ciphertext and tag.  The key id is carried
# in the value itself, so each row says which key it needs and no schema change was needed to add encryption or
# to rotate keys. The associated data binds a value to its table, column and row id: a ciphertext copied into
# another row or column fails authentication instead of decrypting as the wrong patient's message.

MAGIC = b"GWE1"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES


class EncryptionConfig(BaseModel):
    """``[encryption]`` of the daemon config: AES-256-GCM for the journal's raw payloads and FHIR bundles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="Encrypt raw payloads and mapped FHIR bundles in the journal. Off only on a development "
        "machine (`make run`); the daemon logs a warning at start while it is off.",
    )
    key: ConfigPath | None = Field(
        None,
        description="The current key: a file with 32 random bytes as 64 hex digits (`gateway keys generate`), "
        "or `credential:NAME` for a systemd credential. New rows are sealed with it.",
    )
    old_keys: tuple[ConfigPath, ...] = Field(
        (),
        description="Earlier keys, still used to open rows sealed with them until `gateway keys rotate` has "
        "re-sealed those rows with the current key.",
    )


def key_id(key: bytes) -> bytes:
    """The 8-byte id of a key: derived from the key, so a row's id can never name the wrong key."""
    return hashlib.sha256(b"hl7-gateway key id\x00" + key).digest()[:KEY_ID_BYTES]


def parse_key(data: bytes, where: str) -> bytes:
    """A 256-bit key from a key file: 64 hex digits (what `gateway keys generate` writes), base64 of 32
    bytes, or the 32 raw bytes."""
    text = data.strip()
    with contextlib.suppress(ValueError):
        if len(text) == 64:
            return bytes.fromhex(text.decode("ascii"))
    with contextlib.suppress(ValueError, binascii.Error):
        if len(text) == 44:
            decoded = base64.b64decode(text, validate=True)
            if len(decoded) == 32:
                return decoded
    if len(data) == 32:
        return data
    raise ConfigError("not a 256-bit key (expected 64 hex digits, base64 of 32 bytes, or 32 raw bytes)", where)


class UndecryptableError(PermanentError):
    """A stored value cannot be opened: its key is not configured, or it was altered."""


class Keyring:
    """The current key (seals new values) and earlier keys (still open old ones)."""

    def __init__(self, current: bytes, others: Sequence[bytes] = ()) -> None:
        if len(current) != 32 or any(len(k) != 32 for k in others):
            raise ValueError("AES-256 keys are 32 bytes")
        self.current_id = key_id(current)
        self._current = AESGCM(current)
        self._keys = {key_id(k): AESGCM(k) for k in others}
        self._keys[self.current_id] = self._current

    @property
    def current_key_id(self) -> str:
        return self.current_id.hex()

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: safe for far more than 2**32 values per key
        return MAGIC + self.current_id + nonce + self._current.encrypt(nonce, plaintext, aad)

    def open(self, value: bytes, aad: bytes) -> bytes:
        """The plaintext of a sealed value; a value written before encryption was turned on is returned as it is.
        Raises UndecryptableError when the key is missing or the value (or its row binding) was altered."""
        if not is_sealed(value):
            return value
        kid = value[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES]
        aead = self._keys.get(kid)
        if aead is None:
            raise UndecryptableError(
                f"a stored value is sealed with key {kid.hex()}, which is not configured (add it to "
                "[encryption] old_keys)"
            )
        nonce = value[len(MAGIC) + KEY_ID_BYTES : HEADER_BYTES]
        try:
            return aead.decrypt(nonce, value[HEADER_BYTES:], aad)
        except InvalidTag:
            raise UndecryptableError(f"a stored value sealed with key {kid.hex()} fails authentication") from None

    def needs_rotation(self, value: bytes | None) -> bool:
        """True for a value not sealed with the current key (plaintext included)."""
        return value is not None and sealed_key_id(value) != self.current_id.hex()


def is_sealed(value: bytes) -> bool:
    return len(value) >= HEADER_BYTES + 16 and value.startswith(MAGIC)


def sealed_key_id(value: bytes) -> str | None:
    """The hex key id a value is sealed with, or None for plaintext."""
    return value[len(MAGIC) : len(MAGIC) + KEY_ID_BYTES].hex() if is_sealed(value) else None


def row_aad(table: str, column: str, row_id: str) -> bytes:
    return f"hl7-gateway/{table}/{column}/{row_id}".encode()


def open_value(keyring: Keyring | None, value: bytes, aad: bytes) -> bytes:
    """Open with a keyring, or, with encryption off, refuse sealed values clearly instead of returning
    ciphertext as if it were a message."""
    if keyring is not None:
        return keyring.open(value, aad)
    if is_sealed(value):
        raise UndecryptableError(
            f"a stored value is sealed with key {sealed_key_id(value)} but encryption is off (set [encryption] key)"
        )
    return value


_warned_off = False


def load_keyring(cfg: EncryptionConfig) -> Keyring | None:
    """Read the keys now; None when encryption is off, which is logged loudly: a stolen disk then holds every
    message in clear."""
    if cfg.enabled and cfg.key is None:
        # Checked at start, not in validation: a config without [encryption] still validates (check-config,
        # tools), but the daemon does not store patient data in clear unless told so by name.
        raise ConfigError(
            "encryption at rest is on but no key is set: set key (see `gateway keys generate`), or "
            "enabled = false on a development machine",
            "encryption",
        )
    if not cfg.enabled or cfg.key is None:
        global _warned_off
        if not _warned_off:  # once per process: a CLI command that opens the journal twice said it twice
            _warned_off = True
            log.warning(
                "ENCRYPTION AT REST IS OFF: raw messages and FHIR bundles are stored in the journal in clear. "
                "Acceptable on a development machine only; set [encryption] key in production.",
                extra={"reason": "encryption-off"},
            )
        return None
    current = parse_key(read_secret(cfg.key, "encryption key"), cfg.key)
    old = [parse_key(read_secret(k, "old encryption key"), k) for k in cfg.old_keys]
    ring = Keyring(current, old)
    log.info(
        "Encryption at rest is on: new journal rows are sealed with key %s (%d earlier key(s) can still open "
        "old rows).",
        ring.current_key_id,
        len(old),
    )
    return ring


def generate_key_file(path: Path) -> str:
    """Write a new random key (64 hex digits) readable by its owner only; returns its key id."""
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
    finally:
        os.close(fd)
    return key_id(key).hex()
