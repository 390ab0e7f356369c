"""The study index commits records that arrive together as one group, each decided as if it were alone, and a
record that fails fails only its own caller (SQLite and MariaDB); on SQLite its commits reach the disk with
``flush``, which the source runs alongside the journal commit and without which there is no Success."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, cast

import pytest

from adapters.dicom.index import IndexedInstance, StudyIndex
from gateway.errors import TransientError
from gateway.normalise.dicom import POLICY_IDENTICAL, POLICY_KEPT, POLICY_NEW

from .dicom_helpers import Gateway, pydicom_file, send_files


def _inst(n: int, sha: str = "a" * 64, study: str = "1.2.3") -> IndexedInstance:
    return IndexedInstance(
        sop_instance_uid=f"1.2.3.{n}",
        study_instance_uid=study,
        series_instance_uid="1.2.3.0",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sha256=sha,
        path=f"/nowhere/{n}.dcm",
        message_id=f"m{n}",
        source="dicom",
        header={"Modality": "CT"},
    )


@pytest.fixture
async def index(db_url: str, tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path}/index.db" if db_url.startswith("sqlite") else db_url
    idx = StudyIndex(url)
    await idx.open()
    try:
        yield idx
    finally:
        await idx.close()


async def test_records_that_arrive_together_share_a_commit_and_are_decided_in_turn(index: StudyIndex) -> None:
    assert index.db is not None
    transactions = 0
    real = index.db.transaction

    async def counted(fn: Any, **kw: Any) -> Any:
        nonlocal transactions
        transactions += 1
        return await real(fn, **kw)

    index.db.transaction = counted  # type: ignore[method-assign]
    batch = [_inst(n) for n in range(10)]
    # The same UID twice with other bytes, then the same bytes again: decided in order, as alone.
    batch += [_inst(0, sha="b" * 64), _inst(1)]
    results = await asyncio.gather(*(index.record(i, "keep") for i in batch))
    assert results == [POLICY_NEW] * 10 + [POLICY_KEPT, POLICY_IDENTICAL]
    assert transactions < len(batch)
    rows = await index.study_instances("1.2.3")
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(f"1.2.3.{n}" for n in range(10))
    assert {r["sop_instance_uid"]: r for r in rows}["1.2.3.0"]["header"] == {"Modality": "CT"}


async def test_a_record_that_fails_fails_only_its_own_caller(index: StudyIndex) -> None:
    bad = _inst(99, study=cast(str, None))  # NOT NULL: the database refuses it
    results = await asyncio.gather(
        *(index.record(i, "keep") for i in [_inst(1), bad, _inst(2)]), return_exceptions=True
    )
    assert results[0] == POLICY_NEW and results[2] == POLICY_NEW
    assert isinstance(results[1], TransientError)
    assert sorted(r["sop_instance_uid"] for r in await index.study_instances("1.2.3")) == ["1.2.3.1", "1.2.3.2"]


async def test_flush_puts_the_records_of_a_sqlite_index_on_disk(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    idx = StudyIndex(f"sqlite:///{tmp_path}/index.db")
    await idx.open()
    try:
        assert await idx.record(_inst(1), "keep") == POLICY_NEW
        flushed: list[int] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            flushed.append(os.fstat(fd).st_ino)
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        await asyncio.to_thread(idx.flush)
        assert (tmp_path / "index.db-wal").stat().st_ino in flushed
    finally:
        await idx.close()


async def test_an_instance_whose_index_record_cannot_be_flushed_is_refused_then_stored_on_resend(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = pydicom_file("CT_small.dcm")
    async with Gateway(sqlite_url, tmp_path, study_quiet_seconds=60) as gw:
        real_flush = gw.source.index.flush

        def failing() -> None:
            raise TransientError("the disk is gone")

        monkeypatch.setattr(gw.source.index, "flush", failing)
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0xA700]
        monkeypatch.setattr(gw.source.index, "flush", real_flush)
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0]
        assert len(await gw.instance_rows()) == 1
