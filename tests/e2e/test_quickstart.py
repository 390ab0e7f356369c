"""The README quick start, as a user types it: gateway send, gateway messages, gateway resources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Daemon

pytestmark = pytest.mark.slow


def gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=None if env is None else {**os.environ, **env},
    )


def test_readme_quick_start(daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    sent = gateway("send", "--port", str(daemon.mllp_port), "tests/data/adt_a01.hl7")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "tests/data/adt_a01.hl7: AA MSG-QS-0001"
    daemon.wait_delivered()

    # The README's resend with python-hl7's mllp_send, which sends the file without the last segment's CR:
    # recognised as a resend (it used to be stored a second time).
    mllp_send = str(Path(sys.executable).parent / "mllp_send")
    resent = subprocess.run(
        [mllp_send, "--port", str(daemon.mllp_port), "--loose", "--file", "tests/data/adt_a01.hl7", "localhost"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert resent.returncode == 0, resent.stderr
    assert "MSA|AA|MSG-QS-0001" in resent.stdout

    listed = gateway("messages", "--config", str(daemon.config))
    assert listed.returncode == 0, listed.stderr
    assert "ADT^A01" in listed.stdout and "MSG-QS-0001" in listed.stdout and "accepted" in listed.stdout
    assert listed.stdout.count("MSG-QS-0001") == 1, listed.stdout

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
    time.sleep(1.5)  # past the first background WAL checkpoint: health must still answer 200
    assert daemon.healthy()
    assert daemon.stop() == 0


def shipped_config(name: str, tmp_path: Path) -> Path:
    """A shipped config rewritten to a fresh signing key and the demo rule set signed with it, in tmp_path (what
    `make run` makes under var/, and /etc/gateway for the example)."""
    var = tmp_path / "var"
    if not (var / "rules-dev.key").exists():
        var.mkdir(exist_ok=True)
        assert gateway("rules", "keygen", "--key-id", "dev", "--out", str(var / "rules-dev")).returncode == 0
        signed = gateway(
            "rules", "sign", "--key", str(var / "rules-dev.key"), "--out", str(var / "demo.yaml.sig"), "rules/demo.yaml"
        )
        assert signed.returncode == 0, signed.stderr
        assert gateway("certs", "init", str(var / "certs")).returncode == 0  # as `make run` makes them
    text = (REPO / name).read_text()
    text = text.replace('"../var/', f'"{var}/').replace("/etc/gateway/rules.yaml", str(REPO / "rules/demo.yaml"))
    text = text.replace("/etc/gateway/rules-signing/ops-2026.pub", str(var / "rules-dev.pub"))
    text = text.replace("/var/lib/gateway/rules.serial", str(var / "rules.serial"))
    text = text.replace('rules = "../rules/', f'rules = "{REPO}/rules/')
    if "example" in name:
        text = text.replace("[rules_trust]\n", f'[rules_trust]\nsignature = "{var}/demo.yaml.sig"\n', 1)
    path = tmp_path / Path(name).name
    path.write_text(text)
    return path


def example_files(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The example config with what it names under /etc/gateway made in tmp_path: the listener's certificate and
    client CA (development ones), and the TLS key and journal key as systemd credentials."""
    tls, creds = tmp_path / "tls", tmp_path / "credentials"
    assert gateway("certs", "init", str(tls)).returncode == 0
    creds.mkdir()
    (creds / "mllp.key").write_bytes((tls / "server.key").read_bytes())
    assert gateway("keys", "generate", str(creds / "journal.key")).returncode == 0
    path = shipped_config("config/gateway.example.toml", tmp_path)
    text = path.read_text().replace("/etc/gateway/tls/mllp.pem", str(tls / "server.pem"))
    path.write_text(text.replace("/etc/gateway/tls/clients-ca.pem", str(tls / "ca.pem")))
    return path, {"CREDENTIALS_DIRECTORY": str(creds)}


def test_check_config_accepts_the_shipped_configs_and_names_the_bad_key(tmp_path: Path) -> None:
    dev = gateway("check-config", str(shipped_config("config/dev.toml", tmp_path)))
    assert dev.returncode == 0, dev.stderr
    assert dev.stdout.strip() == (
        "OK: rule set serial 1, signed by key dev; ENCRYPTION AT REST OFF; 1 TLS setting(s) loaded"
    ), dev.stdout
    example, env = example_files(tmp_path)
    ok = gateway("check-config", str(example), env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK: rule set serial 1, signed by key dev; encryption key "), ok.stdout

    # What the daemon refuses at start, check-config refuses too (it used to say OK): a missing credential or
    # key file, a certificate that cannot be read.
    missing_key = gateway("check-config", str(example), env={"CREDENTIALS_DIRECTORY": str(tmp_path / "none")})
    assert missing_key.returncode == 2 and "encryption" in missing_key.stderr, missing_key.stderr
    no_cert = tmp_path / "no-cert.toml"
    no_cert.write_text(example.read_text().replace(str(tmp_path / "tls" / "server.pem"), str(tmp_path / "nope.pem")))
    refused = gateway("check-config", str(no_cert), env=env)
    assert refused.returncode == 2 and "sources[0].tls" in refused.stderr, refused.stderr

    bad = tmp_path / "bad.toml"
    bad.write_text((REPO / "config/dev.toml").read_text().replace("port = 2575", "port = 70000"))
    out = gateway("check-config", str(bad))
    assert out.returncode == 2
    assert "sources[0].port" in out.stderr

    typo = tmp_path / "typo.toml"
    typo.write_text((REPO / "config/dev.toml").read_text().replace("[journal]", "[journal]\nurll = 'x'"))
    out = gateway("check-config", str(typo))
    assert out.returncode == 2 and "journal.urll" in out.stderr and "Extra inputs are not permitted" in out.stderr


def test_db_upgrade_then_dead_letters_list_and_retry(tmp_path: Path) -> None:
    import asyncio
    from datetime import UTC, datetime, timedelta

    from gateway.contracts import Envelope, InputKind
    from gateway.ids import uuid7
    from gateway.journal import Journal, JournalRecord

    d = Daemon(tmp_path)  # only its config files; the daemon is not started
    up = gateway("db", "upgrade", "--config", str(d.config))
    assert up.returncode == 0, up.stderr
    assert "journal: up to date" in up.stdout and "destination store: up to date" in up.stdout
    assert d.journal_path.exists() and d.store_path.exists()

    async def make_dead_letter() -> None:
        j = Journal(d.journal_url)
        await j.open(migrate_schema=False)
        try:
            env = Envelope(uuid7(), "cli", InputKind.HL7V2, datetime.now(UTC), b"MSH|^~\\&|A|B\r", "127.0.0.1:1")
            rec = JournalRecord(env, "accepted", message_type="ADT^A01", control_id="DL1", destinations=["store"])
            await j.commit(rec)
            (item,) = await j.claim("store", 10, timedelta(seconds=60))
            await j.mark_dead(item.id, "refused by the test")
        finally:
            await j.close()

    asyncio.run(make_dead_letter())
    listed = gateway("dead-letters", "list", "--config", str(d.config))
    assert listed.returncode == 0, listed.stderr
    assert "store" in listed.stdout and "ADT^A01" in listed.stdout and "refused by the test" in listed.stdout
    retried = gateway("dead-letters", "retry", "--config", str(d.config))
    assert retried.returncode == 0 and retried.stdout.strip() == "1 dead letter(s) queued again"
    audit = (tmp_path / "audit.log").read_text()
    assert '"action":"dead_letters.retry"' in audit and '"actor":"operator:' in audit
    again = gateway("dead-letters", "list", "--config", str(d.config))
    assert again.stdout.strip() == ""


def test_status_as_table_and_json(daemon: Daemon) -> None:
    daemon.start()
    sent = gateway("send", "--port", str(daemon.mllp_port), "tests/data/adt_a01.hl7")
    assert sent.returncode == 0
    daemon.wait_delivered()
    table = gateway("status", "--config", str(daemon.config))
    assert table.returncode == 0 and "accepted=1" in table.stdout and "store" in table.stdout
    as_json = gateway("status", "--config", str(daemon.config), "--json")
    state = json.loads(as_json.stdout)
    assert state["messages"] == {"accepted": 1} and state["outbox"] == {"done": 1}
    assert state["destinations"] == {"store": {"pending": 0, "retrying": 0, "oldest_seconds": 0.0, "dead": 0}}
    # A rule set edited on disk and not signed yet (the daemon runs the verified one): status still answers,
    # and says what is wrong (it used to exit 2 with the signature error, when it is needed most).
    with daemon.rules_path.open("a") as f:
        f.write("# staged, not signed yet\n")
    staged = gateway("status", "--config", str(daemon.config), "--json")
    assert staged.returncode == 0, staged.stderr
    assert "signature check failed" in staged.stderr
    state = json.loads(staged.stdout)
    assert state["messages"] == {"accepted": 1} and "signature check failed" in state["rule_set_problem"]
    assert daemon.stop() == 0


def test_send_many_files_prints_a_summary(daemon: Daemon) -> None:
    daemon.start()
    files = sorted((REPO.parent / "shared/corpora/hl7v2/fhir-converter/input").glob("ADT-A0*.hl7"))[:5]
    out = gateway("send", "--quiet", "--port", str(daemon.mllp_port), *map(str, files))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and f"sent {len(files)} message(s): AA={len(files)}" in out.stderr
    assert daemon.stop() == 0
