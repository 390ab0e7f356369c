"""The DICOM source against real senders (dcmtk's storescu and echoscu, pynetdicom's SCU) and a real journal:
files byte-identical to what was sent, durable before Success, duplicates, the duplicate policies, and the
statuses for input that cannot be stored."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY
from pydicom import dcmread

from gateway.contracts import Envelope, Outcome, SubmitResult

from .dicom_helpers import (
    Gateway,
    need_dcmtk,
    pydicom_file,
    send_files,
    sha256,
    split_file,
    storescp_reference,
    storescu,
)

MR_SYNTAXES = [
    "MR_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]


def stored(descriptor: dict[str, object]) -> bytes:
    """The dataset part of the file a descriptor names."""
    data, _, _, _ = split_file(Path(str(descriptor["path"])))
    return data


async def test_echoscu_gets_success(db_url: str, tmp_path: Path) -> None:
    need_dcmtk()
    async with Gateway(db_url, tmp_path) as gw:
        proc = await asyncio.create_subprocess_exec(
            "echoscu", "-aec", "GATEWAY", "127.0.0.1", str(gw.port), stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        assert proc.returncode == 0, err


async def test_storescu_files_are_stored_byte_identical_and_journaled(db_url: str, tmp_path: Path) -> None:
    need_dcmtk()
    files = [pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")]
    # storescu re-encodes what it sends: the reference is what dcmtk's storescp receives from it.
    sent = await asyncio.to_thread(storescp_reference, files, tmp_path)
    async with Gateway(db_url, tmp_path) as gw:
        done = await asyncio.to_thread(storescu, gw.port, files)
        assert done.returncode == 0, done.stderr
        rows = await gw.instance_rows()
        assert len(rows) == 2
        by_uid = {r["control_id"]: r for r in rows}
        for f in files:
            _, ts, cls, uid = split_file(f)
            data = sent[uid]
            row = by_uid[uid]
            assert row["status"] == "not_mapped" and row["message_type"].startswith("DICOM^")
            doc = orjson.loads(row["raw"])
            assert doc["transfer_syntax"] == ts and doc["sop_class_uid"] == cls
            assert sha256(stored(doc)) == sha256(data) == doc["sha256"]
            meta = orjson.loads(row["meta"])
            assert meta["calling_ae"] == "STORESCU" and meta["called_ae"] == "GATEWAY"
            assert meta["modality"] == dcmread(f).Modality
            # No patient data in the routing facts.
            ds = dcmread(f)
            assert str(ds.PatientName) not in row["meta"] and str(ds.PatientID) not in row["meta"]


async def test_one_sop_instance_in_several_transfer_syntaxes_keeps_every_copy_byte_identical(
    sqlite_url: str, tmp_path: Path
) -> None:
    files = [pydicom_file(n) for n in MR_SYNTAXES]
    uids = {split_file(f)[3] for f in files}
    assert len(uids) == 1  # the same SOP Instance UID in every file
    async with Gateway(sqlite_url, tmp_path) as gw:
        statuses = await asyncio.to_thread(send_files, gw.port, files)
        assert statuses == [0x0000] * len(files)
        rows = await gw.instance_rows()
        assert len(rows) == len(files)
        for f, row in zip(files, rows, strict=True):
            data, ts, _, _ = split_file(f)
            doc = orjson.loads(row["raw"])
            assert doc["transfer_syntax"] == ts
            assert sha256(stored(doc)) == sha256(data)
        # Policy keep: the first is the instance, the other encodings are kept aside and not routed as it.
        assert [r["message_type"] for r in rows] == ["DICOM^MR"] + ["DICOM-KEPT^MR"] * (len(files) - 1)
        bundles = await gw.study_bundles(1)
        (bundle,) = bundles.values()
        study = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
        assert study["numberOfInstances"] == 1


async def test_an_identical_resend_is_success_and_stores_nothing_new(db_url: str, tmp_path: Path) -> None:
    f = pydicom_file("CT_small.dcm")
    async with Gateway(db_url, tmp_path) as gw:
        assert await asyncio.to_thread(send_files, gw.port, [f, f]) == [0, 0]
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0]
        rows = await gw.instance_rows()
        assert len(rows) == 1
        files = [p for p in (tmp_path / "dicom").rglob("*.dcm")]
        assert len(files) == 1


@pytest.mark.parametrize(
    ("policy", "second_status", "current_is_second"),
    [("keep", 0x0000, False), ("overwrite", 0x0000, True), ("reject", 0x0111, False)],
)
async def test_different_content_under_one_uid_follows_the_policy(
    sqlite_url: str, tmp_path: Path, policy: str, second_status: int, current_is_second: bool
) -> None:
    first = pydicom_file("MR_small.dcm")
    ds = dcmread(first)
    ds.SeriesDescription = "changed"
    second = tmp_path / "changed.dcm"
    ds.save_as(second)
    # No study summary may come between the two sends (a slow machine can take longer than the default 0.5 s).
    async with Gateway(sqlite_url, tmp_path, duplicate_policy=policy, study_quiet_seconds=60) as gw:
        assert await asyncio.to_thread(send_files, gw.port, [first]) == [0]
        assert await asyncio.to_thread(send_files, gw.port, [second]) == [second_status]
        rows = await gw.rows()
        assert len(rows) == 2  # nothing is lost: the second copy is journaled whatever the policy
        second_row = rows[1]
        assert second_row["status"] == ("quarantined" if policy == "reject" else "not_mapped")
        if policy == "reject":
            assert second_row["reject_code"] == "conflict"
        # Both copies are on disk, each byte-identical.
        for f, row in zip([first, second], rows, strict=True):
            assert sha256(stored(orjson.loads(row["raw"]))) == sha256(split_file(f)[0])
        current = await gw.source.index.study_instances(ds.StudyInstanceUID)
        (inst,) = current
        assert (inst["header"].get("SeriesDescription") == "changed") is current_is_second


async def test_a_truncated_dataset_is_refused_0xc000_quarantined_and_kept(db_url: str, tmp_path: Path) -> None:
    data, _, _, _ = split_file(pydicom_file("CT_small.dcm"))
    original = pydicom_file("CT_small.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(original[: len(original) - 5000])  # the meta group intact, the pixel data cut
    async with Gateway(db_url, tmp_path) as gw:
        assert await asyncio.to_thread(send_files, gw.port, [truncated]) == [0xC000]
        (row,) = await gw.rows()
        assert row["status"] == "quarantined" and row["reject_code"] == "unparseable"
        assert "truncated" in row["error"]
        doc = orjson.loads(row["raw"])
        kept = await asyncio.to_thread(Path(doc["path"]).read_bytes)
        assert kept == data[: len(data) - 5000]
        # The daemon keeps serving: a good instance after the bad one is stored.
        assert await asyncio.to_thread(send_files, gw.port, [pydicom_file("CT_small.dcm")]) == [0]


class _Unavailable:
    """A submitter whose journal is down (failure injection)."""

    async def submit(self, envelope: Envelope) -> SubmitResult:
        return SubmitResult(Outcome.ERRORED, reason="journal unavailable, resend later")


async def test_a_journal_that_cannot_commit_gives_0xa700(sqlite_url: str, tmp_path: Path) -> None:
    async with Gateway(sqlite_url, tmp_path) as gw:
        gw.source.submitter = _Unavailable()
        f = pydicom_file("CT_small.dcm")
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0xA700]
        gw.source.submitter = gw.pipeline
        # The resend, once the journal is back, is stored once.
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0x0000]
        assert len(await gw.instance_rows()) == 1


async def test_a_full_disk_gives_0xa700(sqlite_url: str, tmp_path: Path) -> None:
    async with Gateway(sqlite_url, tmp_path) as gw:
        root = gw.source.root
        gw.source.root = Path("/proc/gateway-cannot-write-here")
        f = pydicom_file("CT_small.dcm")
        name = gw.source.name

        def counts() -> tuple[float, float]:
            storage = REGISTRY.get_sample_value("gateway_storage_errors_total", {"source": name, "store": "file"})
            return storage or 0.0, REGISTRY.get_sample_value("gateway_journal_errors_total", {"source": name}) or 0.0

        before = counts()
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0xA700]
        assert await gw.rows() == []
        # Counted as what it is: the journal was fine (it used to be logged and counted as a journal error).
        assert counts() == (before[0] + 1, before[1])
        # Nor is it in the study index: a record of it made ImagingStudy count an instance never stored, and a
        # later resend with other bytes was "kept" in favour of a file that did not exist.
        study_uid = str(dcmread(f).StudyInstanceUID)
        assert await gw.source.index.study_instances(study_uid) == []
        gw.source.root = root
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0x0000]
        assert len(await gw.source.index.study_instances(study_uid)) == 1
        (journaled,) = await gw.instance_rows()
        assert await asyncio.to_thread(Path(str(orjson.loads(journaled["raw"])["path"])).is_file)


async def test_storescu_with_many_files_in_one_association(sqlite_url: str, tmp_path: Path) -> None:
    need_dcmtk()
    base = dcmread(pydicom_file("CT_small.dcm"))
    files = []
    for i in range(20):
        base.SOPInstanceUID = f"1.2.3.4.5.6.{i + 1}"
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i + 1
        p = tmp_path / f"ct{i}.dcm"
        base.save_as(p)
        files.append(p)
    async with Gateway(sqlite_url, tmp_path) as gw:
        done = await asyncio.to_thread(storescu, gw.port, files)
        assert done.returncode == 0, done.stderr
        assert len(await gw.instance_rows()) == 20
        (bundle,) = (await gw.study_bundles(1)).values()
        study = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
        assert study["numberOfInstances"] == 20 and study["numberOfSeries"] == 1
        assert [i["number"] for i in study["series"][0]["instance"]] == list(range(1, 21))


def test_storescu_is_the_dcmtk_one() -> None:
    need_dcmtk()
    out = subprocess.run(["storescu", "--version"], capture_output=True, text=True, check=False)
    assert "dcmtk" in (out.stdout + out.stderr).lower()


async def test_a_dataset_that_is_not_the_requested_instance_is_refused_0xa900(sqlite_url: str, tmp_path: Path) -> None:
    # pydicom's rtplan.dcm names another SOP Instance UID in its meta group than in its dataset; sent as it is,
    # the C-STORE request announces one instance and carries another.
    f = pydicom_file("rtplan.dcm")
    _, _, _, announced = split_file(f)
    assert announced != dcmread(f).SOPInstanceUID
    async with Gateway(sqlite_url, tmp_path) as gw:
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0xA900]
        (row,) = await gw.rows()
        assert row["status"] == "quarantined" and row["reject_code"] == "unsupported-type"


async def test_the_source_emits_its_metrics(sqlite_url: str, tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async with Gateway(sqlite_url, tmp_path, name="dicom-metrics") as gw:
        before = value("gateway_acks_total", source="dicom-metrics", code="0x0000")
        assert await asyncio.to_thread(send_files, gw.port, [pydicom_file("CT_small.dcm")]) == [0]
        assert value("gateway_acks_total", source="dicom-metrics", code="0x0000") == before + 1
        assert value("gateway_received_total", source="dicom-metrics") >= 1
        assert value("gateway_connections_total", source="dicom-metrics") >= 1
        assert value("gateway_messages_total", source="dicom-metrics", kind="dicom", status="not_mapped") >= 1


@pytest.mark.parametrize(
    ("name", "propose"),
    [("MR_small_RLE.dcm", "-xr"), ("MR_small_jpeg_ls_lossless.dcm", "-xt"), ("MR_small_jp2klossless.dcm", "-xv")],
)
async def test_storescu_compressed_syntaxes_are_stored_as_sent(
    sqlite_url: str, tmp_path: Path, name: str, propose: str
) -> None:
    need_dcmtk()
    f = pydicom_file(name)
    _, ts, _, uid = split_file(f)
    sent = await asyncio.to_thread(storescp_reference, [f], tmp_path, propose, "-R")
    async with Gateway(sqlite_url, tmp_path) as gw:
        done = await asyncio.to_thread(storescu, gw.port, [f], propose, "-R")
        assert done.returncode == 0, done.stderr
        (row,) = await gw.instance_rows()
        doc = orjson.loads(row["raw"])
        assert doc["transfer_syntax"] == ts  # still compressed: nothing was transcoded
        assert sha256(stored(doc)) == sha256(sent[uid])


async def test_a_dataset_over_the_size_limit_gets_0xa700_a_metric_and_nothing_stored(
    sqlite_url: str, tmp_path: Path
) -> None:
    from gateway.telemetry import LIMIT_HITS

    size = len(split_file(pydicom_file("CT_small.dcm"))[0])
    async with Gateway(sqlite_url, tmp_path, max_dataset_bytes=size - 1, name="dicom-limit") as gw:
        before = LIMIT_HITS.labels("dicom-limit", "dataset-size")._value.get()
        assert await asyncio.to_thread(send_files, gw.port, [pydicom_file("CT_small.dcm")]) == [0xA700]
        assert LIMIT_HITS.labels("dicom-limit", "dataset-size")._value.get() == before + 1
        assert await gw.rows() == []
        assert not [f for f in (tmp_path / "dicom").rglob("*.dcm")]
        # a smaller instance on the same association policy is still stored
        assert await asyncio.to_thread(send_files, gw.port, [pydicom_file("MR_small.dcm")]) == [0]
