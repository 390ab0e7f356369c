"""Signed rule sets with the daemon as a process: refused at start, reloaded on SIGHUP all-or-nothing."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway import signing
from tests.e2e.conftest import REPO, Daemon, MllpConnection, msa, wait_for

pytestmark = pytest.mark.slow

ADT = (REPO / "tests/data/adt_a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip() + b"\r"


def adt(control_id: str) -> bytes:
    return ADT.replace(b"MSG-QS-0001", control_id.encode())


def metric(d: Daemon, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", d.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def status(d: Daemon, control_id: str) -> tuple[str, int]:
    with contextlib.closing(d.journal()) as db:
        st, mid = db.execute("SELECT status, id FROM messages WHERE control_id = ?", (control_id,)).fetchone()
        (n,) = db.execute("SELECT count(*) FROM outbox WHERE message_id = ?", (mid,)).fetchone()
    return st, n


def audit_records(d: Daemon, action: str) -> list[dict[str, object]]:
    path = d.workdir / "audit.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("action") == action]


def tamper_rules(d: Daemon) -> None:
    data = bytearray(d.rules_path.read_bytes())
    data[data.index(b"store")] ^= 0x20  # one flipped byte, after signing
    d.rules_path.write_bytes(bytes(data))


def tamper_signature(d: Daemon) -> None:
    sig = d.workdir / "rules.yaml.sig"
    tag, kid, b64 = sig.read_text().split()
    sig.write_text(f"{tag} {kid} {b64[:10]}{'A' if b64[10] != 'A' else 'B'}{b64[11:]}\n")


def tamper_key_id(d: Daemon) -> None:
    sig = d.workdir / "rules.yaml.sig"
    sig.write_text(sig.read_text().replace(" e2e ", " e2f "))


def sign_with_untrusted_key(d: Daemon) -> None:
    signing.keygen("e2e", d.workdir / "other.key", d.workdir / "other.pub")  # same id, another key
    kid, key = signing.load_secret_key(d.workdir / "other.key")
    (d.workdir / "rules.yaml.sig").write_text(signing.sign(d.rules_path.read_bytes(), kid, key))


def older_serial(d: Daemon) -> None:
    d.write_rules(serial=1)  # validly signed, but serial 2 has been accepted


def unsigned(d: Daemon) -> None:
    (d.workdir / "rules.yaml.sig").unlink()


BREAKS: dict[str, tuple[Callable[[Daemon], None], str]] = {
    "flipped-rules-byte": (tamper_rules, "signature check failed: the signature by key 'e2e' does not match"),
    "flipped-signature-byte": (tamper_signature, "signature check failed"),
    "flipped-key-id": (tamper_key_id, "signed by key 'e2f', which is not trusted"),
    "untrusted-key": (sign_with_untrusted_key, "signature check failed: the signature by key 'e2e' does not match"),
    "older-serial": (older_serial, "rollback check failed: serial 1 is lower than serial 2"),
    "unsigned": (unsigned, "signature check failed: the rule set is not signed"),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_the_daemon_refuses_to_start_with_a_broken_rule_set(tmp_path: Path, name: str) -> None:
    break_it, message = BREAKS[name]
    d = Daemon(tmp_path)
    d.auto_sign = False
    if name == "older-serial":  # serial 2 is accepted by a first start, then serial 1 is put back
        d.write_rules(serial=2)
        d.start()
        assert d.stop() == 0
    break_it(d)
    code, output = d.start_refused()
    assert code == 2, output
    assert message in output
    from tests.e2e.test_quickstart import gateway

    checked = gateway("check-config", str(d.config))
    assert checked.returncode == 2 and message in checked.stderr


def test_sighup_swaps_good_rule_sets_and_keeps_the_running_one_on_any_failure(daemon: Daemon) -> None:
    daemon.auto_sign = False
    daemon.start()
    assert metric(daemon, "gateway_rules_serial") == 1
    conn = MllpConnection(daemon.mllp_port)
    try:
        assert msa(conn.send(adt("R1")))[0] == "AA"
        assert status(daemon, "R1") == ("accepted", 1)

        # A good set: ADT is now dropped (committed, delivered nowhere).
        daemon.write_rules(
            default_route=False, routes="  - {name: no-adt, match: {message_types: [ADT]}, action: drop}\n"
        )
        daemon.reload()
        wait_for("the reload", lambda: metric(daemon, 'gateway_rules_reloads_total{result="ok"}') == 1)
        assert metric(daemon, "gateway_rules_serial") == 2
        assert msa(conn.send(adt("R2")))[0] == "AA"
        assert status(daemon, "R2") == ("dropped", 0)

        # Every broken set is refused: the drop rule of serial 2 stays in force after each.
        for n, (name, (break_it, message)) in enumerate(BREAKS.items(), 1):
            daemon.write_rules(serial=3)  # would deliver ADT again, if it were accepted
            break_it(daemon)
            daemon.reload()
            wait_for(
                f"the refusal of {name}",
                lambda n=n: metric(daemon, 'gateway_rules_reloads_total{result="failed"}') == n,  # type: ignore[misc]
            )
            assert message in daemon.log(), name
            assert metric(daemon, "gateway_rules_serial") == 2
            control_id = f"R-{name}"
            assert msa(conn.send(adt(control_id)))[0] == "AA"
            assert status(daemon, control_id) == ("dropped", 0), name
        wait_for("the audit records", lambda: len(audit_records(daemon, "rules.reload")) == 1 + len(BREAKS))
        reloads = audit_records(daemon, "rules.reload")
        assert [r["fields"]["result"] for r in reloads] == ["ok"] + ["failed"] * len(BREAKS)  # type: ignore[index]
        assert "signature check failed" in str(reloads[1]["fields"]["reason"])  # type: ignore[index]

        # A good set with a new destination: the delivery process is restarted and delivers there.
        store2 = daemon.workdir / "store2.db"
        daemon.write_rules(
            serial=3,
            default_route=False,
            destinations=f"  second: {{type: sql_store, url: 'sqlite+aiosqlite:///{store2}'}}\n",
            routes="  - {name: to-second, match: {mapped: true}, to: [second], resource_types: [Patient]}\n",
        )
        daemon.reload()
        wait_for("the second reload", lambda: metric(daemon, 'gateway_rules_reloads_total{result="ok"}') == 2)
        assert msa(conn.send(adt("R3")))[0] == "AA"
        assert status(daemon, "R3") == ("accepted", 1)
        daemon.wait_delivered()
        import sqlite3

        with contextlib.closing(sqlite3.connect(store2)) as db:
            types = {t for (t,) in db.execute("SELECT resource_type FROM fhir_resources")}
        assert types == {"Patient"}  # the route's restriction: only the Patient went to this destination
    finally:
        conn.close()
    assert daemon.stop() == 0


def test_a_reload_tells_systemd_reloading_then_ready(tmp_path: Path) -> None:
    """Type=notify-reload: RELOADING=1 with MONOTONIC_USEC when the reload starts, READY=1 when it is done, for
    a refused rule set too (the old one keeps serving)."""
    from tests.e2e.test_systemd_notify import NotifySocket

    notify = NotifySocket(tmp_path / "notify.sock")
    d = Daemon(tmp_path)
    try:
        d.start(env={"NOTIFY_SOCKET": str(notify.path)})
        notify.wait_for("READY")
        d.write_rules()
        d.reload()
        reloading = notify.wait_for("RELOADING")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        ready = notify.wait_for("READY")
        assert "rules serial 2" in ready["STATUS"]
        tamper_rules(d)
        d.reload()
        notify.wait_for("RELOADING")
        assert "rules serial 2" in notify.wait_for("READY")["STATUS"]
        assert d.stop() == 0
    finally:
        notify.close()
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
