"""Encryption at rest: sealing and opening values, the row binding, key ids, key files and the keyring config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.crypto import (
    EncryptionConfig,
    Keyring,
    UndecryptableError,
    generate_key_file,
    is_sealed,
    key_id,
    load_keyring,
    open_value,
    parse_key,
    path_context,
    row_aad,
    sealed_key_id,
)
from gateway.errors import ConfigError

PHI = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\rPID|1||MRN-1||Doe^Jane||19800101|F\r"


def test_a_sealed_value_hides_the_plaintext_and_opens_again() -> None:
    ring = Keyring(os.urandom(32))
    aad = row_aad("messages", "raw", "id-1")
    sealed = ring.seal(PHI, aad)
    assert b"Doe" not in sealed and is_sealed(sealed)
    assert sealed_key_id(sealed) == ring.current_key_id
    assert ring.open(sealed, aad) == PHI
    assert ring.seal(PHI, aad) != sealed  # a fresh nonce every time


def test_a_value_moved_to_another_row_or_column_does_not_open() -> None:
    ring = Keyring(os.urandom(32))
    sealed = ring.seal(PHI, row_aad("messages", "raw", "id-1"))
    with pytest.raises(UndecryptableError, match="authentication"):
        ring.open(sealed, row_aad("messages", "raw", "id-2"))
    with pytest.raises(UndecryptableError, match="authentication"):
        ring.open(sealed, row_aad("messages", "fhir", "id-1"))
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(UndecryptableError):
        ring.open(bytes(tampered), row_aad("messages", "raw", "id-1"))


def test_old_keys_open_old_values_and_new_values_use_the_current_key() -> None:
    old, new = os.urandom(32), os.urandom(32)
    aad = row_aad("messages", "raw", "x")
    sealed_old = Keyring(old).seal(PHI, aad)
    ring = Keyring(new, [old])
    assert ring.open(sealed_old, aad) == PHI
    assert ring.needs_rotation(sealed_old)
    assert not ring.needs_rotation(ring.seal(PHI, aad))
    assert ring.needs_rotation(PHI)  # clear rows are sealed by a rotation too
    assert not ring.needs_rotation(None)
    with pytest.raises(UndecryptableError, match=key_id(old).hex()):
        Keyring(new).open(sealed_old, aad)


def test_clear_values_pass_through_and_sealed_ones_need_a_key() -> None:
    ring = Keyring(os.urandom(32))
    assert ring.open(PHI, b"any") == PHI
    assert open_value(None, PHI, b"any") == PHI
    with pytest.raises(UndecryptableError, match="encryption is off"):
        open_value(None, ring.seal(PHI, b"a"), b"a")


def test_key_files_in_hex_base64_or_raw(tmp_path: Path) -> None:
    key = os.urandom(32)
    import base64

    assert parse_key(key.hex().encode() + b"\n", "f") == key
    assert parse_key(base64.b64encode(key), "f") == key
    assert parse_key(key, "f") == key
    with pytest.raises(ConfigError, match="256-bit"):
        parse_key(b"short", "f")
    kid = generate_key_file(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert key_id(parse_key((tmp_path / "k").read_bytes(), "k")).hex() == kid
    with pytest.raises(FileExistsError):
        generate_key_file(tmp_path / "k")


def test_load_keyring_from_files_and_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    generate_key_file(tmp_path / "new.key")
    old_id = generate_key_file(tmp_path / "old.key")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "journal.key").write_bytes((tmp_path / "new.key").read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = EncryptionConfig.model_validate(
        {"key": "credential:journal.key", "old_keys": ["old.key"]}, context=path_context(tmp_path)
    )
    ring = load_keyring(cfg)
    assert ring is not None
    aad = b"a"
    sealed_old = Keyring(parse_key((tmp_path / "old.key").read_bytes(), "")).seal(PHI, aad)
    assert sealed_key_id(sealed_old) == old_id
    assert ring.open(sealed_old, aad) == PHI


def test_encryption_is_on_by_default_and_off_is_loud(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.crypto

    monkeypatch.setattr(gateway.crypto, "_warned_off", False)  # as in a new process
    with pytest.raises(ConfigError, match="no key is set"):
        load_keyring(EncryptionConfig())
    assert load_keyring(EncryptionConfig(enabled=False)) is None
    assert load_keyring(EncryptionConfig(enabled=False)) is None
    assert caplog.text.count("ENCRYPTION AT REST IS OFF") == 1  # once per process
    with pytest.raises(ConfigError, match="cannot read"):
        load_keyring(EncryptionConfig(key="/nonexistent/journal.key"))
