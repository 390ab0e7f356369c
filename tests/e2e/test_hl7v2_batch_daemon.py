"""The daemon as a process receives an HL7 v2 batch (BHS ... BTS) in one MLLP block: each message is journaled,
mapped and stored on its own, and the answer is an acknowledgement batch with one ACK per message."""

from __future__ import annotations

import contextlib

from tests.e2e.conftest import Daemon, MllpConnection


def message(control_id: str, mrn: str) -> bytes:
    return (
        f"MSH|^~\\&|LAB|HOSP|GW|GW|20240105093000+0100||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r"
        f"PID|1||{mrn}^^^HOSP^MR||Doe^Jane||19700101|F\r"
        f"OBR|1|P-{control_id}^LIS|F-{control_id}^LAB|2345-7^Glucose^LN|||20240105080000+0100\r"
        "OBX|1|NM|2345-7^Glucose^LN|1|5.4|mmol/L|3.9-6.1|N|||F\r"
    ).encode()


def test_a_batch_is_acknowledged_per_message_and_each_message_is_stored(daemon: Daemon) -> None:
    daemon.start()
    batch = (
        b"BHS|^~\\&|LAB|HOSP|GW|GW|20240105093000+0100||||BATCH-1\r"
        + message("B-1", "MRN-B1")
        + message("B-2", "MRN-B2")
        + b"BTS|2\r"
    )
    conn = MllpConnection(daemon.mllp_port)
    try:
        reply = conn.send(batch)
    finally:
        conn.close()
    segments = reply.rstrip(b"\r").split(b"\r")
    assert segments[0].startswith(b"BHS|") and segments[0].split(b"|")[11] == b"BATCH-1"
    assert [s.split(b"|")[1:3] for s in segments if s.startswith(b"MSA|")] == [[b"AA", b"B-1"], [b"AA", b"B-2"]]
    assert segments[-1] == b"BTS|2"
    daemon.wait_delivered()
    with contextlib.closing(daemon.journal()) as db:
        rows = dict(db.execute("SELECT control_id, status FROM messages").fetchall())
    assert rows == {"B-1": "accepted", "B-2": "accepted"}
    with contextlib.closing(daemon.store()) as db:
        types = [r[0] for r in db.execute("SELECT resource_type FROM fhir_resources")]
    assert types.count("DiagnosticReport") == 2 and types.count("Observation") == 2 and types.count("Patient") == 2
