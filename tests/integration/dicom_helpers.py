"""Helpers for the DICOM tests: a gateway DICOM source on a real journal, and independent senders (pynetdicom's
SCU, dcmtk's storescu and echoscu). Senders block, so they run in threads: the source needs the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import select

from adapters.dicom.config import DicomSourceConfig
from adapters.dicom.source import DicomSource
from gateway.contracts import InputKind
from gateway.journal import Journal
from gateway.journal.schema import messages
from gateway.normalise.dicom.normaliser import DicomNormaliser
from gateway.pipeline import Pipeline
from gateway.routing import Router
from tests.ports import free_port

TEST_FILES = Path(str(get_testdata_file("CT_small.dcm"))).parent
CHARSET_FILES = TEST_FILES.parent / "charset_files"


def pydicom_file(name: str) -> Path:
    p = TEST_FILES / name
    assert p.exists(), p
    return p


def need_dcmtk() -> None:
    if shutil.which("storescu") is None:
        pytest.fail("dcmtk (storescu, echoscu, storescp) is required: .ci/services installs it")


def split_file(path: Path) -> tuple[bytes, str, str, str]:
    """(dataset bytes after the File Meta group, transfer syntax, SOP class, SOP instance) of a Part 10 file."""
    data = path.read_bytes()
    meta = read_file_meta_info(path)
    # The group length (0002,0000) tells where the meta group ends.
    assert data[132:136] == b"\x02\x00\x00\x00"
    end = 144 + int.from_bytes(data[140:144], "little")
    return (
        data[end:],
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Gateway:
    """A DICOM source wired to a real journal through the real pipeline."""

    def __init__(self, journal_url: str, root: Path, **config: Any) -> None:
        self.journal = Journal(journal_url)
        self.pipeline = Pipeline(self.journal, Router([]), normalisers={InputKind.DICOM: DicomNormaliser()})
        cfg: dict[str, Any] = {
            "type": "dicom",
            "port": 0,
            "storage_dir": str(root / "dicom"),
            "study_quiet_seconds": 0.5,
            "ack_timeout_seconds": 10,
        }
        cfg.update(config)
        self.config = DicomSourceConfig.model_validate(cfg)
        self.source: DicomSource = self.config.build(self.pipeline)

    async def __aenter__(self) -> Gateway:
        await self.journal.open()
        await self.source.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.source.stop(5)
        await self.journal.close()

    @property
    def port(self) -> int:
        return self.source.port

    async def rows(self) -> list[dict[str, Any]]:
        assert self.journal.db is not None
        stmt = select(messages).order_by(messages.c.id)
        return await self.journal.db.read(lambda conn: [dict(r._mapping) for r in conn.execute(stmt)])

    async def instance_rows(self) -> list[dict[str, Any]]:
        return [r for r in await self.rows() if orjson.loads(r["raw"]).get("format", "").endswith("instance/1")]

    async def study_bundles(self, expected: int, wait_seconds: float = 15.0) -> dict[str, dict[str, Any]]:
        """The latest mapped bundle per study (Study Instance UID -> bundle), once ``expected`` studies have
        one and no summary is pending."""
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            out: dict[str, dict[str, Any]] = {}
            for r in await self.rows():
                if r["fhir"] is not None and r["status"] == "accepted":
                    out[r["control_id"]] = orjson.loads(r["fhir"])
            pending = await self.source.index.due(0)
            if len(out) >= expected and not pending:
                return out
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{len(out)} of {expected} study summaries after {wait_seconds} s")
            await asyncio.sleep(0.2)


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def send_files(
    port: int,
    files: Sequence[Path],
    *,
    called: str = "GATEWAY",
    calling: str = "TESTSCU",
    raw: bool = True,
) -> list[int]:
    """C-STORE each file over one pynetdicom association, proposing each file's own transfer syntax (so
    nothing is transcoded); ``raw`` sends the file's dataset bytes as they are. Returns the statuses."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        seen: set[tuple[str, str]] = set()
        for f in files:
            _, ts, cls, _ = split_file(f)
            if (cls, ts) not in seen:
                seen.add((cls, ts))
                ae.add_requested_context(cls, [ts])
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association not established"
        statuses = []
        try:
            for f in files:
                status = assoc.send_c_store(f)
                statuses.append(int(status.Status) if status and "Status" in status else -1)
        finally:
            assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def storescu(port: int, files: Sequence[Path], *args: str, called: str = "GATEWAY") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aec", called, *args, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )


def storescp_reference(files: Sequence[Path], workdir: Path, *args: str) -> dict[str, bytes]:
    """What storescu actually puts on the wire for ``files`` (it re-encodes datasets, e.g. drops group lengths):
    the same files sent with the same options to dcmtk's storescp in bit-preserving mode, whose stored datasets
    are the bytes it received. Returns SOP Instance UID -> dataset bytes."""
    import time

    out = workdir / "storescp"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", "+B", "+xa", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            done = storescu(port, files, *args, called="ANY-SCP")
            if done.returncode == 0 or "refused" not in done.stderr.lower():
                break
            time.sleep(0.05)  # storescp not listening yet
        assert done.returncode == 0, done.stderr
    finally:
        scp.terminate()
        scp.wait(10)
    return {split_file(p)[3]: split_file(p)[0] for p in out.iterdir()}
