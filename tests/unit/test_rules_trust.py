"""Signed, encrypted, rollback-protected rule sets: every check refuses with a message naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway import signing
from gateway.config import parse_config
from gateway.crypto import generate_key_file
from gateway.errors import ConfigError
from gateway.rules import load_rule_set

RULES = """\
serial: {serial}
destinations:
  store: {{type: sql_store, url: 'sqlite:///store.db'}}
routes:
  - {{name: mapped, match: {{mapped: true}}, to: [store]}}
"""


class Site:
    """A config directory: a trusted key, a signed rule set, the serial state."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.rules = tmp / "rules.yaml"
        self.sig = tmp / "rules.yaml.sig"
        self.state = tmp / "rules.serial"
        signing.keygen("ops-2026", tmp / "ops.key", tmp / "ops.pub")
        self.trust: dict[str, Any] = {"keys": [{"file": "ops.pub"}], "state_file": "rules.serial"}

    def write(self, serial: int = 1, text: str | None = None, key: str = "ops.key") -> bytes:
        data = (text or RULES.format(serial=serial)).encode()
        self.rules.write_bytes(data)
        key_id, secret = signing.load_secret_key(self.dir / key)
        self.sig.write_text(signing.sign(data, key_id, secret))
        return data

    def config(self, rules: str = "rules.yaml", **trust: Any) -> Any:
        data = {"rules": rules, "rules_trust": {**self.trust, **trust}, "sources": [{"type": "mllp"}]}
        return parse_config(data, self.dir)

    def load(self, accept: bool = True, **kw: Any) -> Any:
        return load_rule_set(self.config(**kw), self.dir, accept=accept)

    def refused(self, **kw: Any) -> str:
        with pytest.raises(ConfigError) as info:
            self.load(**kw)
        return str(info.value)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_a_signed_rule_set_loads_and_its_serial_is_remembered(site: Site) -> None:
    data = site.write(serial=3)
    loaded = site.load()
    assert loaded.serial == 3 and loaded.key_id == "ops-2026" and not loaded.encrypted
    assert loaded.sha256 == signing.sha256(data)
    assert list(loaded.rules.destinations) == ["store"]
    state = json.loads(site.state.read_text())
    assert state["serial"] == 3 and state["sha256"] == loaded.sha256


def test_checking_without_accepting_leaves_no_state(site: Site) -> None:
    site.write()
    site.load(accept=False)
    assert not site.state.exists()


def test_one_flipped_byte_in_the_rules_is_refused(site: Site) -> None:
    data = bytearray(site.write())
    data[data.index(b"mapped")] ^= 0x01
    site.rules.write_bytes(bytes(data))
    msg = site.refused()
    assert "signature check failed" in msg and "does not match" in msg


def test_one_flipped_byte_in_the_signature_is_refused(site: Site) -> None:
    site.write()
    tag, kid, b64 = site.sig.read_text().split()
    raw = bytearray(signing._unb64(b64, "sig"))
    raw[10] ^= 0x40
    site.sig.write_text(f"{tag} {kid} {signing._b64(bytes(raw))}\n")
    assert "signature check failed" in site.refused()


def test_a_flipped_byte_in_the_key_id_is_refused_as_untrusted(site: Site) -> None:
    site.write()
    site.sig.write_text(site.sig.read_text().replace("ops-2026", "ops-2027"))
    msg = site.refused()
    assert "signature check failed" in msg and "'ops-2027', which is not trusted" in msg


def test_a_valid_signature_by_an_untrusted_key_is_refused(site: Site) -> None:
    signing.keygen("mallory", site.dir / "m.key", site.dir / "m.pub")
    site.write(key="m.key")
    msg = site.refused()
    assert "signed by key 'mallory', which is not trusted (trusted: ops-2026)" in msg


def test_an_untrusted_key_reusing_a_trusted_id_is_refused(site: Site) -> None:
    signing.keygen("ops-2026", site.dir / "impostor.key", site.dir / "impostor.pub")
    site.write(key="impostor.key")
    assert "does not match" in site.refused()


def test_an_unsigned_rule_set_is_refused(site: Site) -> None:
    site.write()
    site.sig.unlink()
    assert "signature check failed: the rule set is not signed" in site.refused()


def test_without_trusted_keys_the_daemon_refuses(site: Site) -> None:
    site.write()
    msg = site.refused(keys=[])
    assert "no trusted keys" in msg and "rules_trust.keys" in msg


def test_a_garbled_signature_file_is_refused(site: Site) -> None:
    site.write()
    site.sig.write_text("not a signature\n")
    assert "signature check failed" in site.refused()


def test_an_older_serial_is_refused_after_a_newer_one_was_accepted(site: Site) -> None:
    site.write(serial=5)
    site.load()
    site.write(serial=4)
    msg = site.refused()
    assert "rollback check failed: serial 4 is lower than serial 5" in msg
    assert json.loads(site.state.read_text())["serial"] == 5


def test_a_changed_set_under_the_accepted_serial_is_refused(site: Site) -> None:
    site.write(serial=2)
    site.load()
    site.write(text=RULES.format(serial=2).replace("mapped: true", "mapped: false"))
    assert "serial 2 was already accepted with different content" in site.refused()
    site.write(serial=2)  # the same bytes again: a restart, accepted
    assert site.load().serial == 2


def test_an_unreadable_state_file_does_not_reopen_rollback(site: Site) -> None:
    site.write()
    site.state.write_text("{garbage")
    assert "rollback check failed: cannot read the serial state file" in site.refused()


def test_two_trusted_keys_during_a_rotation(site: Site) -> None:
    signing.keygen("ops-2027", site.dir / "new.key", site.dir / "new.pub")
    pub = (site.dir / "new.pub").read_text().split()[2]
    keys = [{"file": "ops.pub"}, {"id": "ops-2027", "public_key": pub}]
    site.write(serial=1)
    assert site.load(keys=keys).key_id == "ops-2026"
    site.write(serial=2, key="new.key")
    assert site.load(keys=keys).key_id == "ops-2027"


def test_a_key_file_whose_id_differs_from_the_config_is_refused(site: Site) -> None:
    site.write()
    msg = site.refused(keys=[{"id": "other", "file": "ops.pub"}])
    assert "for key id 'ops-2026', not 'other'" in msg


@pytest.mark.parametrize(
    "key",
    [{"id": "x"}, {"public_key": "AAAA"}, {"id": "x", "public_key": "bm90IDMyIGJ5dGVz"}, {"id": "bad id", "file": "f"}],
)
def test_malformed_trusted_keys_fail_validation(site: Site, key: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        site.config(keys=[key])
    assert info.value.path.startswith("rules_trust.keys[0]")


# -- encryption ------------------------------------------------------------------------------------------------


def encrypt(site: Site, key_file: Path) -> Path:
    enc = site.dir / "rules.yaml.enc"
    enc.write_bytes(signing.encrypt(site.rules.read_bytes(), signing.read_encryption_key(str(key_file))))
    return enc


def test_an_encrypted_rule_set_is_decrypted_then_verified(site: Site) -> None:
    site.write(serial=4)
    generate_key_file(site.dir / "rules.key")
    enc = encrypt(site, site.dir / "rules.key")
    site.rules.unlink()  # only ciphertext on disk; the signature (rules.yaml.sig) is over the plaintext
    loaded = site.load(rules=enc.name, decryption_key="rules.key")
    assert loaded.encrypted and loaded.serial == 4


def test_the_decryption_key_can_be_a_systemd_credential(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    site.write()
    creds = site.dir / "creds"
    creds.mkdir()
    generate_key_file(creds / "rules.key")
    enc = encrypt(site, creds / "rules.key")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert site.load(rules=enc.name, decryption_key="credential:rules.key").encrypted


def test_a_wrong_decryption_key_is_refused(site: Site) -> None:
    site.write()
    generate_key_file(site.dir / "rules.key")
    generate_key_file(site.dir / "other.key")
    enc = encrypt(site, site.dir / "rules.key")
    msg = site.refused(rules=enc.name, decryption_key="other.key")
    assert "decryption failed: wrong key, or the encrypted file was altered" in msg


def test_a_flipped_byte_in_the_ciphertext_is_refused(site: Site) -> None:
    site.write()
    generate_key_file(site.dir / "rules.key")
    enc = encrypt(site, site.dir / "rules.key")
    data = bytearray(enc.read_bytes())
    data[-20] ^= 0x01
    enc.write_bytes(bytes(data))
    assert "decryption failed" in site.refused(rules=enc.name, decryption_key="rules.key")


def test_an_encrypted_set_without_a_key_and_a_plain_set_with_one_are_refused(site: Site) -> None:
    site.write()
    generate_key_file(site.dir / "rules.key")
    enc = encrypt(site, site.dir / "rules.key")
    assert "decryption_key is not set" in site.refused(rules=enc.name)
    assert "the rule file is not encrypted" in site.refused(decryption_key="rules.key")


def test_the_signature_is_checked_after_decryption(site: Site) -> None:
    site.write(serial=1)
    generate_key_file(site.dir / "rules.key")
    site.rules.write_bytes(RULES.format(serial=9).encode())  # encrypt a set the signature is not for
    enc = encrypt(site, site.dir / "rules.key")
    assert "signature check failed" in site.refused(rules=enc.name, decryption_key="rules.key")


def test_keygen_never_overwrites_and_keeps_the_secret_private(tmp_path: Path) -> None:
    signing.keygen("k", tmp_path / "k.key", tmp_path / "k.pub")
    assert os.stat(tmp_path / "k.key").st_mode & 0o077 == 0
    with pytest.raises(ConfigError):
        signing.keygen("k", tmp_path / "k.key", tmp_path / "k2.pub")
