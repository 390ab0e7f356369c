"""Issue #10: two gateway instances on one MariaDB journal and one Mosquitto take a mixed feed from concurrent
senders (HL7 v2 over MLLP, DICOM C-STORE, MQTT readings); one instance is killed with SIGKILL in the middle
and restarted. Every acknowledged message is in the journal exactly once, every outbox item is delivered to a
real FHIR server, which sees each resource under one id and each patient's messages in the order they were sent.

The count is ``GATEWAY_CRASH_MESSAGES`` (20,000 by default): about 83 % HL7, 15 % MQTT, the rest DICOM (at most
300 instances: DICOM is the slowest path and a few hundred instances already cross the kill). 20,000 took 62 s
on the 2-core development VM at load average 4, and 130 to 180 s at 10 to 13 (other jobs running); the test
prints its counts and times.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pymysql
import pytest
from aiohttp import web
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import MARIADB
from tests.e2e.conftest import Daemon, MllpConnection, free_port, msa, wait_for
from tests.e2e.test_dicom_daemon import send as dicom_send
from tests.e2e.test_mqtt_daemon import metric, mqtt_source
from tests.integration.mqtt_helpers import BROKER, need_mosquitto, unique_topic

# About three minutes on the 2-core machine (see the module docstring); the limits leave room for a slow run.
pytestmark = [pytest.mark.slow, pytest.mark.mariadb, pytest.mark.timeout(420)]

TOTAL = int(os.environ.get("GATEWAY_CRASH_MESSAGES", "20000"))
HL7_SENDERS = 12  # six connections to each instance
MESSAGES_PER_PATIENT = 5  # A01, three A08, one ORU^R01
PATIENTS_PER_BLOCK = 25  # a sender interleaves this many patients, so many patients' queues are open at once
KILL_AT = 0.4  # share of the HL7 messages acknowledged when the first instance is killed


class FhirServer:
    """A FHIR server for transaction Bundles on its own event loop in a thread: resources stored by type and
    id (an id seen again is an update, not a second resource), and per patient the order of the versions it
    received, read from the street number the sender wrote into PID-11."""

    def __init__(self) -> None:
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[str, list[int]] = defaultdict(list)  # MRN -> street numbers, in arrival order
        self.bundles = 0
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner: web.AppRunner | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/fhir", self._transaction)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _transaction(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        with self.lock:
            self.bundles += 1
            for entry in doc.get("entry", []):
                res = entry["resource"]
                self.resources[(res["resourceType"], res["id"])] = res
                if res["resourceType"] == "Patient" and res.get("address"):  # the HL7 senders' patients
                    mrn = res["identifier"][0]["value"]
                    self.versions[mrn].append(int(res["address"][0]["line"][0].split()[0]))
        reply = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": {"status": "200 OK"}} for _ in doc.get("entry", [])],
        }
        return web.Response(body=orjson.dumps(reply), content_type="application/fhir+json")

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    s = FhirServer()
    yield s
    s.stop()


def hl7(sender: int, patient: int, seq: int) -> tuple[bytes, str]:
    """Message ``seq`` of a patient: A01, then A08s, then an ORU; the street number in PID-11 is ``seq``, so the
    receiver can tell the versions apart."""
    cid = f"K{sender}-{patient}-{seq}"
    mrn = f"MRN{sender:02d}{patient:06d}"
    ts = f"2026112412{seq:02d}00"
    pid = f"PID|1||{mrn}^^^HOSP^MR||Testpatient^Alex^J||19800101|F|||{seq} Main St^^Springfield^IL^62701\r"
    if seq < MESSAGES_PER_PATIENT - 1:
        event = "A01" if seq == 0 else "A08"
        msg = (
            f"MSH|^~\\&|LOADGEN|HOSP|GW|HOSP|{ts}||ADT^{event}^ADT_A01|{cid}|P|2.5.1\r"
            f"EVN|{event}|{ts}\r" + pid + f"PV1|1|I|WARD1^101^A||||1234^Attending^Ann^^^Dr|||MED|||||||||"
            f"V{sender}-{patient}^^^HOSP^VN\r"
        )
    else:
        msg = (
            f"MSH|^~\\&|LAB|HOSP|GW|HOSP|{ts}||ORU^R01^ORU_R01|{cid}|P|2.5.1\r" + pid + f"OBR|1||F{cid}|"
            f"24331-1^Lipid panel^LN|||{ts}\rOBX|1|NM|2093-3^Cholesterol^LN||180|mg/dL|||||F|||{ts}\r"
        )
    return msg.encode(), cid


def hl7_plan(sender: int, patients: int) -> list[tuple[bytes, str]]:
    """A sender's messages: patients in blocks; inside a block, round by round (every patient's A01, then
    every patient's first A08, ...), so a patient's messages are spread among other patients'."""
    out = []
    for first in range(0, patients, PATIENTS_PER_BLOCK):
        block = range(first, min(first + PATIENTS_PER_BLOCK, patients))
        for seq in range(MESSAGES_PER_PATIENT):
            out += [hl7(sender, p, seq) for p in block]
    return out


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hl7_acked: list[str] = []
        self.dropped = 0  # connections lost (the kill), each followed by a resend
        self.ae = 0
        self.errors: list[BaseException] = []


def hl7_sender(plan: list[tuple[bytes, str]], ports: list[int], home: int, tally: Tally, deadline: float) -> None:
    """As a real sender: one message at a time, the next only after AA; on a lost connection reconnect (to the
    other instance first; the killed one comes back later) and resend what was not acknowledged."""
    conn: MllpConnection | None = None
    target = home
    try:
        for msg, cid in plan:
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{cid} not acknowledged in time ({len(tally.hl7_acked)} of all acknowledged)")
                try:
                    if conn is None:
                        conn = MllpConnection(ports[target], timeout=30)
                    code, echoed = msa(conn.send(msg))
                except OSError:
                    if conn is not None:
                        conn.close()
                        conn = None
                    with tally.lock:
                        tally.dropped += 1
                    target = 1 - target
                    time.sleep(0.05)
                    continue
                if code == "AE":  # transient: resend, as the protocol says
                    with tally.lock:
                        tally.ae += 1
                    continue
                assert (code, echoed) == ("AA", cid), f"{cid}: {code} {echoed}"
                with tally.lock:
                    tally.hl7_acked.append(cid)
                break
    except BaseException as exc:
        with tally.lock:
            tally.errors.append(exc)
    finally:
        if conn is not None:
            conn.close()


def make_series(directory: Path, tag: int, n: int) -> dict[str, Path]:
    """``n`` CT instances of one study (its own UIDs per ``tag``): SOP Instance UID -> file."""
    directory.mkdir()
    ds = dcmread(str(get_testdata_file("CT_small.dcm")))
    root = f"1.2.826.0.1.3680043.2.1125.77.{tag}"
    ds.StudyInstanceUID = root
    ds.SeriesInstanceUID = f"{root}.1"
    out = {}
    for i in range(n):
        ds.SOPInstanceUID = f"{root}.1.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = directory / f"ct{i:04d}.dcm"
        ds.save_as(p)
        out[ds.SOPInstanceUID] = p
    return out


def paced(tally: Tally, n_hl7: int, share: float, deadline: float) -> None:
    """Wait until ``share`` of the HL7 feed is acknowledged: DICOM and MQTT keep pace with HL7, so some of
    each are in flight when the instance is killed."""
    while len(tally.hl7_acked) < share * n_hl7 and not tally.errors and time.monotonic() < deadline:
        time.sleep(0.05)


def listening(port: int) -> bool:
    """Whether the instance accepts connections. pynetdicom leaks its socket (a ResourceWarning, which fails
    some later test) when a connection is refused, so the killed instance is not offered an association."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return True
    except OSError:
        return False


def dicom_sender(
    files: dict[str, Path],
    ports: list[int],
    home: int,
    acked: dict[str, int],
    n_hl7: int,
    tally: Tally,
    deadline: float,
) -> None:
    """A modality sending a study in ten parts, one association each, spread over the HL7 feed. When an
    association breaks, the instances not yet stored with Success are sent again on a new association (to the
    other instance first)."""
    target = home
    uids = list(files)
    parts = 10
    try:
        for k in range(parts):
            paced(tally, n_hl7, 0.9 * k / parts, deadline)
            part = uids[k * len(uids) // parts : (k + 1) * len(uids) // parts]
            while True:
                left = [files[uid] for uid in part if acked.get(uid) != 0]
                if not left:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(left)} DICOM instances not stored in time")
                if listening(ports[target]):
                    dicom_send(ports[target], left, acked)
                if any(acked.get(uid) != 0 for uid in part):
                    with tally.lock:
                        tally.dropped += 1
                    target = 1 - target
                    time.sleep(0.2)
    except BaseException as exc:
        with tally.lock:
            tally.errors.append(exc)


def reading(i: int) -> bytes:
    """Reading ``i`` of one of 50 bedside monitors, each for its own patient."""
    device = f"bed-{i % 50}"
    return orjson.dumps(
        {
            "messageId": f"r-{i}",
            "deviceId": device,
            "patientId": f"MRN-Q{i % 50}",
            "effective": f"2026-11-24T12:{(i // 60) % 60:02d}:{i % 60:02d}Z",
            "readings": [{"code": {"system": "urn:iso:std:iso:11073:10101", "code": "147842"}, "value": 60 + i % 40,
                          "unit": "/min"}],
        }
    )  # fmt: skip


def test_two_instances_one_killed_mid_stream_lose_nothing_duplicate_nothing_and_keep_patient_order(
    tmp_path: Path, mariadb_url: str, fhir_server: FhirServer
) -> None:
    need_mosquitto()
    n_dicom = min(300, TOTAL // 60)
    n_mqtt = TOTAL * 15 // 100
    patients_per_sender = (TOTAL - n_dicom - n_mqtt) // (HL7_SENDERS * MESSAGES_PER_PATIENT)
    n_hl7 = patients_per_sender * HL7_SENDERS * MESSAGES_PER_PATIENT
    n_mqtt = TOTAL - n_dicom - n_hl7
    topic, group = unique_topic("gw-scale"), f"g{secrets.token_hex(3)}"
    dbname = mariadb_url.rsplit("/", 1)[1]
    started = time.monotonic()

    daemons: list[Daemon] = []
    dicom_ports = []
    for i in range(2):
        work = tmp_path / f"gw{i}"
        work.mkdir()
        dicom_ports.append(free_port())
        sources = mqtt_source(BROKER[1], topic, f"gw-scale-{secrets.token_hex(3)}-{i}", shared_group=f'"{group}"')
        sources += (
            f'[[sources]]\ntype = "dicom"\nname = "dicom-scale"\nhost = "127.0.0.1"\nport = {dicom_ports[i]}\n'
            'storage_dir = "dicom"\nstudy_quiet_seconds = 1\n'
        )
        d = Daemon(work, journal_url=mariadb_url, source_extra=sources)
        # Everything mapped goes to the FHIR server, FIFO per patient; nothing to the per-instance SQL store.
        d.write_rules(
            destinations=f"  fhir: {{type: fhir_rest, base_url: 'http://127.0.0.1:{fhir_server.port}/fhir', "
            "ordered: true, concurrency: 8}\n",
            routes="  - {name: to-fhir, match: {mapped: true}, to: [fhir]}\n",
            default_route=False,
        )
        config = d.config.read_text()
        # The instance name tells the two apart in logs and audit records; a short lease lets the survivor
        # take over the killed instance's claimed items within the test.
        config = config.replace("[delivery]\n", "[delivery]\nlease_seconds = 5\n", 1)
        d.config.write_text(f'instance = "gw-scale-{i}"\n' + config)
        daemons.append(d)

    mllp_ports = [d.mllp_port for d in daemons]
    tally = Tally()
    dicom_acked: dict[str, int] = {}
    series = [make_series(tmp_path / f"series{i}", i, n_dicom // 2 + (n_dicom % 2 if i == 0 else 0)) for i in range(2)]
    deadline = time.monotonic() + 300
    publisher: subprocess.Popen[bytes] | None = None
    threads: list[threading.Thread] = []
    try:
        for d in daemons:
            d.start()
        for d in daemons:
            wait_for("the MQTT subscription", lambda d=d: metric(d, "gateway_mqtt_connected") == 1, 30)

        # MQTT: one publisher at QoS 1 (mosquitto_pub exits 0 once the broker has PUBACKed every reading).
        pub = ["mosquitto_pub", "-h", BROKER[0], "-p", str(BROKER[1]), "-V", "mqttv5", "-q", "1", "-l"]
        publisher = subprocess.Popen([*pub, "-t", f"{topic}/monitors"], stdin=subprocess.PIPE)
        stdin = publisher.stdin
        assert stdin is not None

        def feed() -> None:
            with stdin:
                parts = 20
                for k in range(parts):
                    paced(tally, n_hl7, 0.9 * k / parts, deadline)
                    part = range(k * n_mqtt // parts, (k + 1) * n_mqtt // parts)
                    stdin.write(b"".join(reading(i) + b"\n" for i in part))
                    stdin.flush()

        threads.append(threading.Thread(target=feed, daemon=True))
        for s in range(HL7_SENDERS):
            plan = hl7_plan(s, patients_per_sender)
            threads.append(
                threading.Thread(target=hl7_sender, args=(plan, mllp_ports, s % 2, tally, deadline), daemon=True)
            )
        for i in range(2):
            threads.append(
                threading.Thread(
                    target=dicom_sender,
                    args=(series[i], dicom_ports, i, dicom_acked, n_hl7, tally, deadline),
                    daemon=True,
                )
            )
        for t in threads:
            t.start()

        wait_for("the kill point", lambda: len(tally.hl7_acked) >= n_hl7 * KILL_AT or bool(tally.errors), 180)
        assert not tally.errors, tally.errors
        acked_at_kill = len(tally.hl7_acked)
        killed_after = time.monotonic() - started
        daemons[0].kill()
        time.sleep(1.0)  # the senders of the killed instance find it gone and move to the other one
        daemons[0].start(timeout=60)

        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        assert not [t for t in threads if t.is_alive()], "senders still running at the deadline"
        assert not tally.errors, tally.errors
        assert publisher.wait(30) == 0, "the broker did not acknowledge every reading"
        sent_after = time.monotonic() - started

        def journal(sql: str) -> list[tuple[Any, ...]]:
            conn = pymysql.connect(**MARIADB, database=dbname)
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    return list(cur.fetchall())
            finally:
                conn.close()

        wait_for(
            "every reading in the journal",
            lambda: journal("SELECT count(*) FROM messages WHERE kind = 'mqtt'")[0][0] >= n_mqtt,
            60,
        )
        wait_for(
            "every outbox item delivered",
            lambda: not journal("SELECT count(*) FROM outbox WHERE status <> 'done'")[0][0],
            max(30.0, 360 - (time.monotonic() - started)),
        )
        elapsed = time.monotonic() - started

        # Exactly once in the journal: every acknowledged HL7 control id, every stored SOP instance, every
        # published reading.
        hl7_rows = dict(journal("SELECT control_id, count(*) FROM messages WHERE kind = 'hl7v2' GROUP BY control_id"))
        assert len(tally.hl7_acked) == n_hl7
        assert set(hl7_rows) == set(tally.hl7_acked)
        assert all(c == 1 for c in hl7_rows.values()), {k: c for k, c in hl7_rows.items() if c > 1}
        sop_uids = [uid for s in series for uid in s]
        assert all(dicom_acked.get(uid) == 0 for uid in sop_uids)
        dicom_rows = dict(
            journal(
                "SELECT control_id, count(*) FROM messages WHERE kind = 'dicom' AND message_type LIKE 'DICOM^%' "
                "GROUP BY control_id"
            )
        )
        studies = journal("SELECT count(*) FROM messages WHERE message_type LIKE 'IMAGINGSTUDY^%'")[0][0]
        assert set(dicom_rows) == set(sop_uids) and all(c == 1 for c in dicom_rows.values())
        mqtt_rows = dict(journal("SELECT dedup_key, count(*) FROM messages WHERE kind = 'mqtt' GROUP BY dedup_key"))
        assert len(mqtt_rows) == n_mqtt and all(c == 1 for c in mqtt_rows.values())
        assert not journal("SELECT count(*) FROM messages WHERE status = 'quarantined'")[0][0]
        outbox = dict(journal("SELECT status, count(*) FROM outbox GROUP BY status"))
        assert set(outbox) == {"done"}
        assert outbox["done"] >= n_hl7 + n_mqtt  # every mapped message has its item

        # The receiving side: one resource per id, and per patient every version in the order it was sent (a
        # version delivered again after the kill repeats in place; none overtakes an earlier one).
        with fhir_server.lock:
            versions = {mrn: list(v) for mrn, v in fhir_server.versions.items()}
            resources = dict(fhir_server.resources)
            bundles = fhir_server.bundles
        expected_mrns = {f"MRN{s:02d}{p:06d}" for s in range(HL7_SENDERS) for p in range(patients_per_sender)}
        assert expected_mrns <= set(versions)
        out_of_order = {m: v for m, v in versions.items() if m in expected_mrns and v != sorted(v)}
        assert not out_of_order, dict(list(out_of_order.items())[:5])
        incomplete = {m: v for m, v in versions.items() if m in expected_mrns and set(v) != set(range(5))}
        assert not incomplete, dict(list(incomplete.items())[:5])
        patients = [r for (t, _), r in resources.items() if t == "Patient"]
        ids_by_mrn: dict[str, set[str]] = defaultdict(set)
        for r in patients:
            ids_by_mrn[r["identifier"][0]["value"]].add(r["id"])
        assert all(len(ids) == 1 for ids in ids_by_mrn.values()), "a patient got two resource ids"
        assert resources and bundles >= outbox["done"]
        redelivered = sum(len(v) - len(set(v)) for v in versions.values())

        for d in daemons:
            assert d.stop() == 0
        print(
            f"\nscale crash test: {TOTAL} messages ({n_hl7} HL7 from {HL7_SENDERS} senders, {n_mqtt} MQTT, "
            f"{n_dicom} DICOM) in {elapsed:.1f} s; killed gw-scale-0 at {killed_after:.1f} s after "
            f"{acked_at_kill} HL7 ACKs; all acknowledged at {sent_after:.1f} s; {tally.dropped} connections lost "
            f"and resent, {tally.ae} AE; journal: {len(hl7_rows)} HL7, {len(mqtt_rows)} MQTT, {len(dicom_rows)} "
            f"DICOM, each once, {studies} study records; outbox: {outbox['done']} done; FHIR server: {bundles} "
            f"bundles, {len(resources)} resources, {len(patients)} patients in order, {redelivered} patient "
            f"versions delivered again after the kill; load {os.getloadavg()[0]:.2f}"
        )
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        if publisher is not None:
            publisher.wait(10)
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
        for t in threads:
            t.join(5)
