"""Signed rule sets for tests that build a Gateway from a config in memory (the e2e Daemon helper signs its own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import signing


def signed_rules(directory: Path, text: str, name: str = "rules.yaml", key_id: str = "test") -> dict[str, Any]:
    """Write ``text`` as ``directory/name``, sign it with a new key trusted by the returned ``rules_trust``
    section, and keep the anti-rollback state in ``directory``."""
    secret = directory / f"{key_id}.key"
    if not secret.exists():
        signing.keygen(key_id, secret, directory / f"{key_id}.pub")
    path = directory / name
    path.write_text(text)
    kid, key = signing.load_secret_key(secret)
    signing.default_signature_path(path).write_text(signing.sign(path.read_bytes(), kid, key))
    return {
        "keys": [{"file": str(directory / f"{key_id}.pub")}],
        "state_file": str(directory / "rules.serial"),
    }
