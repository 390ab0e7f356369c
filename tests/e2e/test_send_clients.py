"""`gateway send dicom` and `gateway send mqtt` against the daemon: each file's answer, the summary, the exit
code, and the messages in the journal."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from pydicom.data import get_testdata_file

from tests.conftest import REPO
from tests.integration.mqtt_helpers import broker_up, need_mosquitto, unique_topic

from .conftest import Daemon, free_port
from .test_dicom_daemon import dicom_source
from .test_mqtt_daemon import mqtt_source, reading

pytestmark = pytest.mark.slow


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def kinds(d: Daemon) -> dict[str, int]:
    with d.journal() as db:
        return dict(db.execute("SELECT kind, COUNT(*) FROM messages GROUP BY kind").fetchall())


def test_send_dicom_and_mqtt_report_each_file_and_the_messages_are_journaled(tmp_path: Path) -> None:
    if not broker_up():
        need_mosquitto()
    dicom_port = free_port()
    topic = unique_topic("gw-send")
    (tmp_path / "gw").mkdir()
    d = Daemon(
        tmp_path / "gw",
        source_extra=dicom_source(dicom_port) + mqtt_source(1883, topic, f"gw-send-{dicom_port}"),
    )
    try:
        d.start()
        ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
        assert isinstance(ct, str) and isinstance(mr, str)
        sent = gateway("send", "dicom", "--port", str(dicom_port), ct, mr)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert sent.stdout.count(": Success 0x0000") == 2
        assert "sent 2 instance(s): Success=2" in sent.stderr

        not_dicom = tmp_path / "note.txt"
        not_dicom.write_text("not an image")
        refused = gateway("send", "dicom", "--port", str(dicom_port), str(not_dicom), ct)
        assert refused.returncode == 1 and "not a DICOM instance" in refused.stderr
        # A file cut short: pydicom reads it without a word and would send a well-formed, shorter dataset that the
        # gateway stored as Success; refused before sending, as storescu refuses it.
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(Path(ct).read_bytes()[:30000])
        truncated = gateway("send", "dicom", "--port", str(dicom_port), str(cut))
        assert truncated.returncode == 1 and "not a complete DICOM instance" in truncated.stderr
        assert "Success" not in truncated.stdout

        files = []
        for i in range(3):
            f = tmp_path / f"reading-{i}.json"
            f.write_bytes(reading(i, device="bed-send"))
            files.append(str(f))
        published = gateway("send", "mqtt", "--topic", f"{topic}/bed-send", *files)
        assert published.returncode == 0, published.stdout + published.stderr
        assert published.stdout.count(": PUBACK") == 3 and "sent 3 payload(s): PUBACK=3" in published.stderr

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and kinds(d).get("mqtt", 0) < 3:
            time.sleep(0.2)
        counts = kinds(d)
        # CT_small twice (the second a duplicate, stored once) and MR_small once; three readings
        assert counts.get("mqtt") == 3
        with d.journal() as db:
            sops = {r[0] for r in db.execute("SELECT control_id FROM messages WHERE message_type LIKE 'DICOM^%'")}
        assert len(sops) == 2
        # DICOM associations are audited by peer (from pynetdicom's association threads, off the event loop)
        audit = [orjson.loads(line) for line in (d.workdir / "audit.log").read_text().splitlines()]
        opened = [a for a in audit if a.get("action") == "connection.open" and "dicom-e2e" in str(a)]
        assert opened, audit[-5:]
        assert "no running event loop" not in d.log()
        payloads = [orjson.loads(Path(f).read_bytes())["messageId"] for f in files]
        assert payloads == ["r-0", "r-1", "r-2"]

        # A payload that cannot be read has no message id: `gateway messages` names its topic instead (the
        # device), where its type and control id columns were empty.
        junk = tmp_path / "junk.json"
        junk.write_text("not json")
        assert gateway("send", "mqtt", "--topic", f"{topic}/bed-junk", str(junk)).returncode == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and kinds(d).get("mqtt", 0) < 4:
            time.sleep(0.2)
        listed = gateway("messages", "--status", "quarantined", "--config", str(d.config))
        assert f"topic {topic}/bed-junk" in listed.stdout, listed.stdout
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


def test_send_names_a_missing_protocol_argument() -> None:
    out = gateway("send", "mqtt", "x.json")
    assert out.returncode == 2 and "needs --topic" in out.stderr
    out = gateway("send", "dicom")
    assert out.returncode == 2 and "no files given" in out.stderr
