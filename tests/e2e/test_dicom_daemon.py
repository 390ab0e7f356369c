"""The daemon as a process with a DICOM listener: kill -9 in the middle of a multi-instance association loses
no acknowledged instance and the sender's retry stores none twice; bad input is answered and the daemon keeps
serving; instances are forwarded to a downstream PACS and studies reach the resource store."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from .conftest import Daemon, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def send_files_as_they_are() -> Iterator[None]:
    """pynetdicom sends a file path's dataset bytes as they are in the file (not decoded and re-encoded)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test starts; killed at the end if the test left them running (e.g. when it failed)."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def dicom_source(port: int, extra: str = "") -> str:
    return (
        f'[[sources]]\ntype = "dicom"\nname = "dicom-e2e"\nhost = "127.0.0.1"\nport = {port}\n'
        'storage_dir = "dicom"\nstudy_quiet_seconds = 1\n' + extra
    )


def make_series(directory: Path, n: int) -> list[Path]:
    """``n`` CT instances of one study and series, each with its own SOP Instance UID."""
    directory.mkdir()
    ds = dcmread(CT_SMALL)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.2.1125.99.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.99.1.1"
    out = []
    for i in range(n):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.99.1.1.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        p = directory / f"ct{i:04d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def dataset_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return data[144 + int.from_bytes(data[140:144], "little") :]


def send(port: int, files: list[Path], acked: dict[str, int], stop_after: threading.Event | None = None) -> None:
    """One association; records each instance's status by SOP Instance UID; returns when the association
    breaks (the daemon was killed) or everything is sent."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    raw_sockets: list[socket.socket] = []
    keep = [(evt.EVT_CONN_OPEN, lambda event: raw_sockets.append(event.assoc.dul.socket.socket))]
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY", evt_handlers=keep)
    try:
        for f in files:
            if not assoc.is_established:
                return
            uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
            try:
                status = assoc.send_c_store(f)
            except (RuntimeError, OSError):
                return
            if not status or "Status" not in status:
                return
            acked[uid] = int(status.Status)
        assoc.release()
    finally:
        # pynetdicom leaves its socket open when the peer resets the connection (its shutdown() raises before
        # close()): close it here.
        with contextlib.suppress(Exception):
            if assoc.is_established:
                assoc.abort()
        for sock in raw_sockets:
            sock.close()


def journal_instances(d: Daemon) -> list[tuple[str, bytes]]:
    with contextlib.closing(d.journal()) as db:
        return list(db.execute("SELECT control_id, raw FROM messages WHERE message_type LIKE 'DICOM^%'"))


def test_kill_9_mid_association_loses_no_acknowledged_instance_and_the_retry_stores_none_twice(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    files = make_series(tmp_path / "series", 150)
    port = free_port()
    (tmp_path / "gw").mkdir()
    d = Daemon(tmp_path / "gw", source_extra=dicom_source(port))
    daemons.append(d)
    d.start()
    acked: dict[str, int] = {}
    sender = threading.Thread(target=send, args=(port, files, acked), daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    # list() copies in one step under the GIL: a generator over the view fails when the sender adds meanwhile.
    while list(acked.values()).count(0) < 40:
        assert time.monotonic() < deadline, f"only {len(acked)} instances acknowledged:\n{d.log()}"
        time.sleep(0.005)
    d.kill()
    sender.join(30)
    successes = {uid for uid, s in acked.items() if s == 0}
    assert 40 <= len(successes) < len(files), "the kill must land in the middle of the association"

    # Every instance that got Success is in the journal and on disk, intact.
    rows = journal_instances(d)
    by_uid = {uid: orjson.loads(raw) for uid, raw in rows}
    sent = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for uid in successes:
        assert uid in by_uid, f"an acknowledged instance is missing from the journal:\n{d.log()}"
        doc = by_uid[uid]
        stored = dataset_bytes(Path(doc["path"]))
        assert hashlib.sha256(stored).hexdigest() == doc["sha256"]
        assert doc["sha256"] == hashlib.sha256(dataset_bytes(sent[uid])).hexdigest()

    # The sender retries everything that did not get Success; restarted, the daemon stores each instance once.
    d.start()
    rest = [f for uid, f in sent.items() if uid not in successes]
    retry: dict[str, int] = {}
    send(port, rest, retry)
    assert set(retry) == set(sent) - successes and set(retry.values()) == {0}
    # And a resend of everything (a cautious modality) changes nothing.
    again: dict[str, int] = {}
    send(port, files, again)
    assert set(again.values()) == {0}
    rows = journal_instances(d)
    assert sorted(uid for uid, _ in rows) == sorted(sent), "each instance exactly once in the journal"

    # The study is summarised once it is quiet, with every instance.
    deadline = time.monotonic() + 30
    while True:
        with contextlib.closing(d.journal()) as db:
            fhir = db.execute(
                "SELECT fhir FROM messages WHERE message_type LIKE 'IMAGINGSTUDY%' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        if fhir:
            bundle = orjson.loads(fhir[0])
            study = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
            if study["numberOfInstances"] == len(files):
                break
        assert time.monotonic() < deadline, "the study summary did not reach the full count"
        time.sleep(0.2)
    assert d.stop() == 0


def test_bad_input_is_answered_and_the_daemon_keeps_serving(tmp_path: Path, daemons: list[Daemon]) -> None:
    port = free_port()
    extra = 'allowed_peers = [{ae_title = "MODALITY"}]\nacse_timeout_seconds = 1\n'
    d = Daemon(tmp_path, source_extra=dicom_source(port, extra))
    daemons.append(d)
    d.start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    # Wrong called AE title, unknown calling AE title: A-ASSOCIATE-RJ.
    assoc = ae.associate("127.0.0.1", port, ae_title="SOMEONE-ELSE")
    assert assoc.is_rejected and assoc.acceptor.primitive is not None
    assert assoc.acceptor.primitive.diagnostic == 7
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context(Verification)
    assoc = stranger.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_rejected and assoc.acceptor.primitive is not None
    assert assoc.acceptor.primitive.diagnostic == 3
    # A silent peer.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert s.recv(10) == b""
    # A truncated dataset: 0xC000.
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(CT_SMALL.read_bytes()[:-3000])
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established
    assert assoc.send_c_store(truncated).Status == 0xC000
    assert assoc.send_c_store(CT_SMALL).Status == 0x0000  # and it keeps serving
    assoc.release()
    log = d.log()
    assert "called AE title 'SOMEONE-ELSE'" in log and "'STRANGER' is not in allowed_peers" in log
    assert "no association request" in log and "truncated" in log
    # No patient data in the log.
    ds = dcmread(CT_SMALL)
    assert str(ds.PatientName) not in log and str(ds.PatientID) not in log and ds.SOPInstanceUID not in log
    assert d.stop() == 0


def test_instances_are_forwarded_to_a_pacs_and_studies_reach_the_store(tmp_path: Path, daemons: list[Daemon]) -> None:
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(
        ["storescp", "+B", "+xa", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = free_port()
        gw = tmp_path / "gw"
        gw.mkdir()
        d = Daemon(
            gw,
            source_extra=dicom_source(port),
            destinations=f"  pacs: {{type: dicom_forward, host: 127.0.0.1, port: {pacs_port}, called_ae: PACS}}\n",
            routes="  - {name: images, match: {kinds: [dicom], message_types: [DICOM]}, to: [pacs]}\n",
        )
        daemons.append(d)
        d.start()
        files = make_series(tmp_path / "series", 5)
        acked: dict[str, int] = {}
        send(port, files, acked)
        assert set(acked.values()) == {0}
        d.wait_delivered()
        deadline = time.monotonic() + 30
        while len(list(pacs_dir.iterdir())) < len(files):
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        got = sorted(hashlib.sha256(dataset_bytes(p)).hexdigest() for p in pacs_dir.iterdir())
        assert got == sorted(hashlib.sha256(dataset_bytes(f)).hexdigest() for f in files)
        # The study summary (after 1 s of quiet) is mapped and stored as Patient + ImagingStudy.
        deadline = time.monotonic() + 30
        while True:
            with contextlib.closing(d.store()) as db, contextlib.suppress(Exception):
                types = {r[0] for r in db.execute("SELECT resource_type FROM fhir_resources")}
                if {"Patient", "ImagingStudy"} <= types:
                    break
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        assert d.stop() == 0
    finally:
        pacs.terminate()
        pacs.wait(10)
