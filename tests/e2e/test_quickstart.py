"""The README quick start, as a user types it: gateway send, gateway messages, gateway resources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Daemon

pytestmark = pytest.mark.slow


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_readme_quick_start(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    sent = gateway("send", "--port", str(daemon.mllp_port), "tests/data/adt_a01.hl7")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "tests/data/adt_a01.hl7: AA MSG-QS-0001"
    daemon.wait_delivered()

    listed = gateway("messages", "--config", str(daemon.config))
    assert listed.returncode == 0, listed.stderr
    assert "ADT^A01" in listed.stdout and "MSG-QS-0001" in listed.stdout and "accepted" in listed.stdout

    shown = gateway("resources", "--config", str(daemon.config), "--type", "Patient")
    assert shown.returncode == 0, shown.stderr
    patient = json.loads(shown.stdout)
    assert patient["resourceType"] == "Patient"
    assert patient["name"][0]["family"] == "Everyman"
    assert {"system": "urn:hl7v2:authority:HOSP", "value": "MRN-4711"}.items() <= patient["identifier"][0].items()
    assert patient["meta"]["versionId"] == "1"

    bad = tmp_path / "bad.hl7"
    bad.write_text("not hl7")
    refused = gateway("send", "--port", str(daemon.mllp_port), str(bad))
    assert refused.returncode == 1
    assert " AR " in refused.stdout and "ERR 100" in refused.stdout
    assert daemon.stop() == 0


def test_check_config_accepts_the_shipped_configs_and_names_the_bad_key(tmp_path: Path) -> None:
    for cfg in ("config/dev.toml", "config/gateway.example.toml"):
        if cfg.endswith("example.toml"):
            # The example points at /etc/gateway/rules.yaml; check it against the demo rule set instead.
            text = (REPO / cfg).read_text().replace("/etc/gateway/rules.yaml", str(REPO / "rules/demo.yaml"))
            path = tmp_path / "example.toml"
            path.write_text(text)
        else:
            path = REPO / cfg
        ok = gateway("check-config", str(path))
        assert ok.returncode == 0 and ok.stdout.strip() == "OK", (cfg, ok.stdout, ok.stderr)

    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "config/dev.toml").read_text().replace("port = 2575", "port = 70000"))
    out = gateway("check-config", str(bad))
    assert out.returncode == 2
    assert "sources[0].port" in out.stderr

    typo = tmp_path / "typo.toml"
    typo.write_text((REPO / "config/dev.toml").read_text().replace("[journal]", "[journal]\nurll = 'x'"))
    out = gateway("check-config", str(typo))
    assert out.returncode == 2 and "journal.urll" in out.stderr and "Extra inputs are not permitted" in out.stderr
