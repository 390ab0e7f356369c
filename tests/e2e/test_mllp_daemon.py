"""End to end: the daemon as a process, real MLLP clients, the journal and the store read back from disk."""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
from pathlib import Path

import hl7.client
import pytest

from tests.conftest import corpus, hl7_for_wire
from tests.e2e.conftest import Daemon, MllpConnection, msa

pytestmark = pytest.mark.slow

CONVERTER = "hl7v2/fhir-converter/input"


def with_control_id(message: bytes, control_id: str) -> bytes:
    """Replace MSH-10. The FHIR-Converter samples reuse a few control ids (42 distinct among 139 files), and a
    resent control id is, correctly, a duplicate; the corpus test wants every file journaled on its own."""
    head, sep, rest = message.partition(b"\r")
    fs = head[3:4]
    fields = head.split(fs)
    fields[9] = control_id.encode()
    return fs.join(fields) + sep + rest


def adt(n: int, sender: int) -> tuple[bytes, str, str]:
    """A small ADT^A01 with a unique control id and a unique patient (MRN)."""
    cid = f"S{sender}-{n}"
    mrn = f"MRN{sender:02d}{n:06d}"
    msg = (
        f"MSH|^~\\&|LOADGEN|HOSP|GW|HOSP|20261124120000||ADT^A01^ADT_A01|{cid}|P|2.5.1\r"
        f"EVN|A01|20261124120000\r"
        f"PID|1||{mrn}^^^HOSP^MR||Testpatient^Alex^J||19800101|F|||1 Main St^^Springfield^IL^62701\r"
        f"PV1|1|I|WARD1^101^A||||1234^Attending^Ann^^^Dr|||MED|||||||||V{sender}{n}^^^HOSP^VN\r"
    ).encode()
    return msg, cid, mrn


def journal_control_ids(d: Daemon) -> dict[str, int]:
    with contextlib.closing(d.journal()) as db:
        return dict(db.execute("SELECT control_id, count(*) FROM messages GROUP BY control_id").fetchall())


def store_patient_mrns(d: Daemon) -> set[str]:
    with contextlib.closing(d.store()) as db:
        docs = [json.loads(r[0]) for r in db.execute("SELECT json FROM fhir_resources WHERE resource_type='Patient'")]
    return {i["value"] for doc in docs for i in doc.get("identifier", [])}


def test_every_corpus_message_is_answered_journaled_and_adt_lands_in_the_store(daemon: Daemon) -> None:
    files = sorted(corpus(CONVERTER).glob("*.hl7"))
    assert len(files) == 139
    daemon.start()
    sent: dict[str, bytes] = {}
    codes: dict[str, str] = {}
    # python-hl7's MLLPClient: a client this project did not write.
    with hl7.client.MLLPClient("127.0.0.1", daemon.mllp_port) as client:
        for i, f in enumerate(files):
            cid = f"E2E-{i:03d}"
            msg = with_control_id(hl7_for_wire(f.read_bytes()), cid)
            raw = client.send_message(msg)
            while not raw.endswith(b"\x1c\r"):
                raw += client.socket.recv(65536)
            code, msa2 = msa(raw.strip(b"\x0b\x1c\r"))
            assert msa2 == cid, f"{f.name}: MSA-2 {msa2!r} does not match MSH-10"
            sent[cid] = msg
            codes[cid] = code
    assert set(codes.values()) <= {"AA", "AE", "AR"}
    acked = [c for c, code in codes.items() if code == "AA"]
    # Every sample is well-formed HL7 of a mapped or an unmapped (journaled as not_mapped) type: all are AA.
    assert len(acked) == 139, f"not accepted: {[(c, k) for c, k in codes.items() if k != 'AA']}"
    daemon.wait_delivered()
    with contextlib.closing(daemon.journal()) as db:
        rows = {
            cid: (raw, status, mtype)
            for cid, raw, status, mtype in db.execute("SELECT control_id, raw, status, message_type FROM messages")
        }
    for cid in acked:
        assert cid in rows, f"{cid} was acknowledged but is not in the journal"
        assert rows[cid][0] == sent[cid], f"{cid}: the journal does not hold the bytes as sent"
        assert rows[cid][1] in ("accepted", "not_mapped")
    adt_mapped = [cid for cid in acked if rows[cid][1] == "accepted" and rows[cid][2].startswith("ADT")]
    assert len(adt_mapped) >= 10
    with contextlib.closing(daemon.journal()) as db:
        bundles = {
            cid: json.loads(fhir)
            for cid, fhir in db.execute("SELECT control_id, fhir FROM messages WHERE fhir IS NOT NULL")
        }
    with contextlib.closing(daemon.store()) as db:
        stored = set(db.execute("SELECT resource_type, id FROM fhir_resources").fetchall())
    for cid in adt_mapped:
        resources = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundles[cid]["entry"]}
        assert any(t == "Patient" for t, _ in resources), f"{cid}: no Patient mapped"
        assert resources <= stored, f"{cid}: mapped resources missing from the store: {resources - stored}"
    assert any(t == "Encounter" for t, _ in stored)
    # No patient name or identifier from the 139 messages reached the log.
    from gateway.hl7v2.parse import parse

    phi: set[str] = set()
    for raw in sent.values():
        pid = parse(raw).first("PID")
        if pid is not None:
            phi |= {pid.get(5, 1), pid.get(5, 2), pid.get(3, 1)}
    phi = {v for v in phi if len(v) >= 4}
    assert len(phi) > 20
    log = daemon.log()
    assert not [v for v in phi if v in log], "patient data in the log"
    assert daemon.stop() == 0


def run_senders(
    port: int, senders: int, per_sender: int, acked: dict[str, str], stop: threading.Event, errors: list[str]
) -> list[threading.Thread]:
    def sender(k: int) -> None:
        try:
            conn = MllpConnection(port, timeout=10)
        except OSError as exc:
            errors.append(f"sender {k}: {exc}")
            return
        try:
            for n in range(per_sender):
                if stop.is_set():
                    return
                msg, cid, mrn = adt(n, k)
                code, msa2 = msa(conn.send(msg))
                assert msa2 == cid
                if code == "AA":
                    acked[cid] = mrn
        except (OSError, ConnectionError):
            return  # the daemon died under us: expected in the kill test
        finally:
            conn.close()

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for t in threads:
        t.start()
    return threads


def load_until(
    port: int, acked_at_least: int
) -> tuple[dict[str, str], list[str], threading.Event, list[threading.Thread]]:
    """8 senders sending until stopped; returns once ``acked_at_least`` messages were acknowledged (or 20 s)."""
    acked: dict[str, str] = {}
    errors: list[str] = []
    stop = threading.Event()
    threads = run_senders(port, 8, 100_000, acked, stop, errors)
    deadline = time.monotonic() + 20
    while len(acked) < acked_at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    return acked, errors, stop, threads


def test_kill_9_mid_stream_loses_no_acknowledged_message_and_stores_none_twice(daemon: Daemon) -> None:
    daemon.start()
    acked, errors, stop, threads = load_until(daemon.mllp_port, 400)
    time.sleep(random.uniform(0.0, 0.2))
    daemon.kill()  # SIGKILL: no drain, no flush
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(acked) >= 400, "the senders did not get going"
    ack_count = len(acked)

    daemon.start()
    in_journal = journal_control_ids(daemon)
    missing = [cid for cid in acked if cid not in in_journal]
    assert not missing, f"{len(missing)} acknowledged messages are not in the journal, e.g. {missing[:5]}"
    twice = {cid: n for cid, n in in_journal.items() if n > 1}
    assert not twice, f"stored more than once: {list(twice)[:5]}"

    # Senders resend what was not acknowledged, as a real sender would; the one in flight at the kill may have
    # been committed already, and must then be acknowledged without a second copy.
    last = {}
    for cid in acked:
        k, n = cid[1:].split("-")
        last[int(k)] = max(last.get(int(k), -1), int(n))
    conn = MllpConnection(daemon.mllp_port)
    try:
        for k in range(8):
            for n in range(last.get(k, -1) + 1, last.get(k, -1) + 3):
                msg, cid, mrn = adt(n, k)
                code, _ = msa(conn.send(msg))
                assert code == "AA"
                acked[cid] = mrn
    finally:
        conn.close()
    in_journal = journal_control_ids(daemon)
    assert all(in_journal.get(cid) == 1 for cid in acked)
    assert len(acked) == ack_count + 16

    daemon.wait_delivered(60)
    mrns = store_patient_mrns(daemon)
    lost = [cid for cid, mrn in acked.items() if mrn not in mrns]
    assert not lost, f"{len(lost)} acknowledged messages have no Patient in the store, e.g. {lost[:5]}"
    assert daemon.stop() == 0


def test_sigterm_drains_in_flight_messages_and_exits_zero(daemon: Daemon) -> None:
    daemon.start()
    acked, errors, stop, threads = load_until(daemon.mllp_port, 200)
    assert daemon.stop() == 0
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert "The gateway has stopped." in daemon.log()
    daemon.start()
    in_journal = journal_control_ids(daemon)
    assert all(in_journal.get(cid) == 1 for cid in acked)
    assert daemon.stop() == 0


@pytest.fixture
def strict_daemon(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path, source_extra="max_frame_bytes = 4096\nidle_timeout_seconds = 1.0\n")


def test_bad_input_is_answered_logged_without_phi_and_the_daemon_keeps_serving(strict_daemon: Daemon) -> None:
    d = strict_daemon
    d.start()
    good, good_cid, _ = adt(1, 99)

    def still_serving() -> None:
        c = MllpConnection(d.mllp_port)
        try:
            code, msa2 = msa(c.send(good))
            assert code == "AA" and msa2 == good_cid
        finally:
            c.close()

    cases: list[tuple[str, bytes, str, str]] = [
        (
            "random bytes",
            bytes(random.Random(7).randrange(256) for _ in range(300)).replace(b"\x0b", b"").replace(b"\x1c", b""),
            "AR",
            "100",
        ),
        ("no MSH", b"PID|1||123^^^HOSP^MR||Secretname^Bob\rPV1|1|I\r", "AR", "100"),
        (
            "unknown version",
            b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|V1|P|9.9\rPID|1||1^^^H^MR||Secretname^Bob\r",
            "AR",
            "203",
        ),
        (
            "too large",
            b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|BIG1|P|2.5\rNTE|1||" + b"Secretname " * 1000 + b"\r",
            "AR",
            "207",
        ),
    ]
    for name, payload, want_code, want_err in cases:
        c = MllpConnection(d.mllp_port)
        try:
            ack = c.send(payload)
        finally:
            c.close()
        code, _ = msa(ack)
        assert code == want_code, name
        assert re.search(rb"\|" + want_err.encode() + rb"[\^&]", ack) or want_err.encode() in ack, (name, ack)
        still_serving()

    # A client that connects and sends nothing is closed after the idle timeout.
    s = socket.create_connection(("127.0.0.1", d.mllp_port), timeout=5)
    try:
        s.settimeout(5)
        assert s.recv(10) == b""  # closed by the daemon
    finally:
        s.close()
    still_serving()

    # Raw bytes outside any frame are discarded and logged; the connection goes on.
    c = MllpConnection(d.mllp_port)
    try:
        c.sock.sendall(b"noise before the start block")
        code, msa2 = msa(c.send(good))
        assert code == "AA" and msa2 == good_cid
    finally:
        c.close()

    log = d.log()
    assert "Secretname" not in log and "Testpatient" not in log, "patient data leaked into the log"
    assert re.search(r"Quarantined a message from 127\.0\.0\.1:\d+ on mllp-e2e: .*MSH", log)
    assert "unsupported HL7 version" in log
    assert re.search(r"127\.0\.0\.1:\d+ on mllp-e2e: a frame of at least \d+ bytes exceeds", log)
    assert re.search(r"127\.0\.0\.1:\d+ on mllp-e2e: no data for 1 s", log)
    assert re.search(r"discarded \d+ bytes outside any frame", log)
    # quarantined messages keep their raw bytes for replay
    with contextlib.closing(d.journal()) as db:
        q = db.execute("SELECT raw, reject_code FROM messages WHERE status = 'quarantined'").fetchall()
    assert {r[1] for r in q} >= {"no-header", "unsupported-version"}
    assert any(r[0] == cases[1][1] for r in q)
    assert d.stop() == 0
