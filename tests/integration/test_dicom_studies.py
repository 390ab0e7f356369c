"""Study aggregation: Patient + ImagingStudy once a study is quiet, counts that match what was sent, names
decoded from their character sets, valid FHIR, and a study index that survives a restart."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from tests.unit.test_fhir_validity import assert_valid

from .dicom_helpers import CHARSET_FILES, TEST_FILES, Gateway, pydicom_file, resources, send_files

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def storage_files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        try:
            ds = dcmread(p, stop_before_pixels=True)
        except InvalidDicomError:
            continue
        if ds.get("SOPClassUID") not in (None, MEDIA_STORAGE_DIRECTORY) and "StudyInstanceUID" in ds:
            out.append(p)
    return out


def expected_counts(files: list[Path]) -> dict[str, dict[str, set[str]]]:
    studies: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        studies[ds.StudyInstanceUID][ds.SeriesInstanceUID].add(ds.SOPInstanceUID)
    return studies


def study_of(bundle: dict[str, Any]) -> dict[str, Any]:
    (study,) = resources(bundle, "ImagingStudy")
    return study


async def test_the_dicomdir_multi_study_set_gives_imaging_studies_with_matching_counts(
    db_url: str, tmp_path: Path
) -> None:
    files = storage_files(sorted(p for p in (TEST_FILES / "dicomdirtests").rglob("*") if p.is_file()))
    assert len(files) > 50
    expected = expected_counts(files)
    assert len(expected) >= 3
    async with Gateway(db_url, tmp_path) as gw:
        statuses = await asyncio.to_thread(send_files, gw.port, files)
        assert statuses == [0] * len(files)
        bundles = await gw.study_bundles(len(expected))
        assert set(bundles) == set(expected)
        for study_uid, series in expected.items():
            bundle = bundles[study_uid]
            assert_valid(bundle)
            study = study_of(bundle)
            assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}
            assert study["numberOfSeries"] == len(series)
            assert study["numberOfInstances"] == sum(len(s) for s in series.values())
            got = {s["uid"]: {i["uid"] for i in s.get("instance", [])} for s in study["series"]}
            assert got == {k: set(v) for k, v in series.items()}
            for s in study["series"]:
                assert s["numberOfInstances"] == len(series[s["uid"]])
            (patient,) = resources(bundle, "Patient")
            assert study["subject"] == {"reference": f"Patient/{patient['id']}"}


async def test_non_ascii_patient_names_arrive_intact(sqlite_url: str, tmp_path: Path) -> None:
    files = storage_files(sorted(CHARSET_FILES.glob("*.dcm")))
    assert len(files) >= 12
    names_by_study: dict[str, list[str]] = defaultdict(list)
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        names_by_study[ds.StudyInstanceUID].append(str(ds.PatientName))
    async with Gateway(sqlite_url, tmp_path) as gw:
        for f in files:
            # Decoded and re-encoded by pynetdicom (raw=False): a few of these files' meta groups name another
            # SOP Instance UID than their dataset, which the gateway would rightly refuse with 0xA900.
            assert await asyncio.to_thread(send_files, gw.port, [f], raw=False) == [0], f.name
        bundles = await gw.study_bundles(len(names_by_study))
        for study_uid, candidates in names_by_study.items():
            bundle = bundles[study_uid]
            assert_valid(bundle)
            (patient,) = resources(bundle, "Patient")
            names = patient["name"]
            matched = False
            for pn in candidates:
                groups = [g for g in pn.split("=") if g.replace("^", "").strip()]
                if len(groups) == len(names) and all(
                    n.get("family", "") == g.split("^")[0].strip() for n, g in zip(names, groups, strict=True)
                ):
                    matched = True
            assert matched, (candidates, names)
        # At least one name per script: Arabic, Greek, Hebrew, Cyrillic, Japanese, Korean, Chinese.
        families = {n.get("family", "") for b in bundles.values() for p in resources(b, "Patient") for n in p["name"]}
        for needle in ("قباني", "Διονυσιος", "שרון", "Люкceмбypг", "山田", "김희중", "王"):
            assert any(needle in f for f in families), needle


async def test_patient_and_study_attributes_map(sqlite_url: str, tmp_path: Path) -> None:
    f = pydicom_file("CT_small.dcm")
    ds = dcmread(f)
    async with Gateway(sqlite_url, tmp_path) as gw:
        assert await asyncio.to_thread(send_files, gw.port, [f]) == [0]
        (bundle,) = (await gw.study_bundles(1)).values()
    assert_valid(bundle)
    (patient,) = resources(bundle, "Patient")
    study = study_of(bundle)
    assert patient["identifier"] == [{"value": ds.PatientID}]
    assert patient["gender"] == {"M": "male", "F": "female", "O": "other"}.get(ds.PatientSex, "unknown")
    assert patient["name"][0]["family"] == ds.PatientName.family_name
    assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}]
    assert study["started"].startswith(f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}")
    (series,) = study["series"]
    assert series["uid"] == ds.SeriesInstanceUID and series["modality"]["code"] == "CT"
    assert series["instance"] == [
        {
            "uid": ds.SOPInstanceUID,
            "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{ds.SOPClassUID}"},
            "number": int(ds.InstanceNumber),
        }
    ]


async def test_more_instances_later_update_the_study_and_a_restart_loses_none(sqlite_url: str, tmp_path: Path) -> None:
    base = dcmread(pydicom_file("CT_small.dcm"))

    def variant(i: int) -> Path:
        base.SOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.7.{i}"
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = i
        p = tmp_path / f"i{i}.dcm"
        base.save_as(p)
        return p

    first, later = [variant(i) for i in (1, 2, 3)], [variant(i) for i in (4, 5)]
    # Instances arrive, then the gateway restarts before the study is quiet: the summary comes after the restart.
    async with Gateway(sqlite_url, tmp_path, study_quiet_seconds=60) as gw:
        assert await asyncio.to_thread(send_files, gw.port, first) == [0, 0, 0]
    async with Gateway(sqlite_url, tmp_path, study_quiet_seconds=0.3) as gw:
        (bundle,) = (await gw.study_bundles(1)).values()
        assert study_of(bundle)["numberOfInstances"] == 3
        assert await asyncio.to_thread(send_files, gw.port, later) == [0, 0]
        await asyncio.sleep(0.5)
        await gw.study_bundles(1)  # no summary pending
        summaries = [r for r in await gw.rows() if r["message_type"].startswith("IMAGINGSTUDY")]
        assert len(summaries) == 2
        import orjson

        last = orjson.loads(summaries[-1]["fhir"])
        assert study_of(last)["numberOfInstances"] == 5
        # The same ImagingStudy and Patient ids: an update, not a second study.
        assert study_of(last)["id"] == study_of(bundle)["id"]
