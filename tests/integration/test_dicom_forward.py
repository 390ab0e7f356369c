"""The DICOM forward sink against real downstream peers: dcmtk's storescp (bit-preserving) receives exactly the
bytes the modality sent; a PACS that answers out-of-resources is retried, one that refuses is a dead letter; the
study index's migrations create its declared schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from sqlalchemy import inspect

from adapters.dicom.config import DicomForwardConfig
from adapters.dicom.index import StudyIndex
from adapters.dicom.schema import metadata
from adapters.dicom.sink import DicomForwardSink
from gateway.contracts import InputKind, OutboxItem, Sink
from gateway.errors import PermanentError, TransientError

from .dicom_helpers import Gateway, free_port, need_dcmtk, pydicom_file, send_files, sha256, split_file


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    need_dcmtk()
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+B", "+xa", "-aet", "PACS", "-od", str(out), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        echo = ["echoscu", "-aec", "PACS", "127.0.0.1", str(port)]
        while subprocess.run(echo, check=False, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        yield port, out
    finally:
        proc.terminate()
        proc.wait(10)


def item(row: dict[str, Any], n: int = 1) -> OutboxItem:
    return OutboxItem(
        id=n,
        message_id=row["id"],
        destination="pacs",
        attempts=0,
        kind=InputKind.DICOM,
        source=row["source"],
        raw=row["raw"],
        resources=[],
    )


def sink_to(port: int, **extra: Any) -> DicomForwardSink:
    cfg = DicomForwardConfig.model_validate(
        {"type": "dicom_forward", "host": "127.0.0.1", "port": port, "called_ae": "PACS", **extra}
    )
    return cfg.build("pacs")


async def received(sqlite_url: str, tmp_path: Path, files: list[Path]) -> list[dict[str, Any]]:
    async with Gateway(sqlite_url, tmp_path) as gw:
        assert await asyncio.to_thread(send_files, gw.port, files) == [0] * len(files)
        return await gw.rows()


async def test_forwarded_instances_reach_the_pacs_byte_identical(
    sqlite_url: str, tmp_path: Path, storescp: tuple[int, Path]
) -> None:
    port, out = storescp
    # (image_dfl.dcm is left out: its deflated dataset has an odd length, which dcmtk refuses as a PDV.)
    names = ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "SC_rgb_small_odd_big_endian.dcm")
    files = [pydicom_file(n) for n in names]
    rows = [r for r in await received(sqlite_url, tmp_path, files) if r["message_type"].startswith("DICOM^")]
    assert len(rows) == len(files)
    sink = sink_to(port)
    assert isinstance(sink, Sink)
    await sink.start()
    try:
        for i, row in enumerate(rows):
            await sink.deliver(item(row, i))
    finally:
        await sink.close()
    got = {split_file(p)[3]: split_file(p) for p in out.iterdir()}
    for f in files:
        data, ts, _, uid = split_file(f)
        assert got[uid][1] == ts  # no transcoding
        assert sha256(got[uid][0]) == sha256(data)


async def test_study_summaries_have_nothing_to_forward(sqlite_url: str, tmp_path: Path) -> None:
    summary = {"format": "gateway.dicom.study/1", "study_instance_uid": "1.2.3", "series": []}
    row = {"id": "x", "source": "dicom", "raw": orjson.dumps(summary)}
    await sink_to(1).deliver(item(row))  # no association is even attempted (port 1 would refuse)


async def test_an_unreachable_pacs_is_a_transient_error(sqlite_url: str, tmp_path: Path) -> None:
    (row,) = await received(sqlite_url, tmp_path, [pydicom_file("CT_small.dcm")])
    with pytest.raises(TransientError):
        await sink_to(free_port(), acse_timeout_seconds=2).deliver(item(row))


async def test_a_missing_file_is_a_permanent_error(sqlite_url: str, tmp_path: Path) -> None:
    (row,) = await received(sqlite_url, tmp_path, [pydicom_file("CT_small.dcm")])
    await asyncio.to_thread(Path(orjson.loads(row["raw"])["path"]).unlink)
    with pytest.raises(PermanentError, match="cannot be read"):
        await sink_to(1).deliver(item(row))


@pytest.mark.parametrize(("status", "error"), [(0xA700, TransientError), (0xC000, PermanentError)])
async def test_pacs_statuses_decide_retry_or_dead_letter(
    sqlite_url: str, tmp_path: Path, status: int, error: type[Exception]
) -> None:
    (row,) = await received(sqlite_url, tmp_path, [pydicom_file("CT_small.dcm")])
    ae = AE(ae_title="PACS")
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)])
    try:
        with pytest.raises(error, match=f"{status:#06x}"):
            await sink_to(port).deliver(item(row))
    finally:
        assert server is not None
        server.shutdown()


async def test_index_migrations_create_the_declared_schema(db_url: str) -> None:
    index = StudyIndex(db_url)
    await index.open()
    try:
        assert index.db is not None
        found = await index.db.read(
            lambda conn: {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in inspect(conn).get_table_names()}
        )
        for table in metadata.sorted_tables:
            assert found[table.name] == {c.name for c in table.columns}, table.name
        assert "gateway_dicom_version" in found
        await index.close()
        await index.open()  # idempotent at every start
    finally:
        await index.close()
