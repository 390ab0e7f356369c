"""Reading received datasets (adapters/dicom/dataset.py): truncation at every kind of boundary is detected,
every complete pydicom test file in every transfer syntax is accepted, names are decoded with their character
sets, and the File Meta Information written for a stored file reads back."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from adapters.dicom.dataset import DatasetError, check_complete, file_meta, inspect

TEST_FILES = Path(str(get_testdata_file("CT_small.dcm"))).parent
CHARSETS = TEST_FILES.parent / "charset_files"


def dataset_of(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    end = 144 + int.from_bytes(data[140:144], "little")
    return data[end:], str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


GOOD = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "image_dfl.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
]


@pytest.mark.parametrize("name", GOOD)
def test_complete_datasets_are_accepted(name: str) -> None:
    data, ts = dataset_of(TEST_FILES / name)
    check_complete(data, ts)


def element_ends(data: bytes, ts: str) -> list[int]:
    """Where each top-level element ends (pydicom's own reading of the dataset)."""
    from pydicom.filereader import read_dataset

    ds = read_dataset(BytesIO(data), ts == "1.2.840.10008.1.2", ts != "1.2.840.10008.1.2.2")
    ends = []
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset yields elements, not tags)
        raw = ds.get_item(tag)
        if raw is not None and getattr(raw, "length", 0xFFFFFFFF) != 0xFFFFFFFF:
            ends.append(raw.value_tell + raw.length)
    return ends


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "rtplan.dcm"])
def test_a_cut_inside_any_element_is_detected(name: str) -> None:
    # (A cut exactly between two elements leaves a well-formed, shorter dataset: no structure tells it apart.)
    data, ts = dataset_of(TEST_FILES / name)
    cuts = set()
    for end in element_ends(data, ts):
        cuts |= {end - 1, end + 1, end + 5, end + 9}
    cuts |= {1, 7, len(data) - 1}
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        with pytest.raises(DatasetError):
            check_complete(data[:cut], ts)


def test_pydicoms_own_truncated_files_are_refused() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        data, ts = dataset_of(TEST_FILES / name)
        with pytest.raises(DatasetError, match="truncated"):
            inspect(data, ts)


def charset_instances() -> list[Path]:
    """The charset files that are storage instances (chrSQEncoding*.dcm hold only a sequence)."""
    return [p for p in sorted(CHARSETS.glob("chr*.dcm")) if "SOPClassUID" in dcmread(p, stop_before_pixels=True)]


@pytest.mark.parametrize("path", charset_instances(), ids=lambda p: p.name)
def test_names_are_decoded_as_pydicom_decodes_them(path: Path) -> None:
    ds = dcmread(path)
    data, ts = dataset_of(path)
    assert inspect(data, ts).header.get("PatientName", "") == str(ds.PatientName).strip()


def test_the_charset_set_is_there() -> None:
    assert len(charset_instances()) >= 15


def test_file_meta_reads_back() -> None:
    path = TEST_FILES / "CT_small.dcm"
    data, ts = dataset_of(path)
    ins = inspect(data, ts)
    stored = dcmread(BytesIO(file_meta(ins, ts, "CT1") + data))
    assert stored.file_meta.MediaStorageSOPInstanceUID == ins.sop_instance_uid
    assert stored.file_meta.TransferSyntaxUID == ts
    assert stored.file_meta.SourceApplicationEntityTitle == "CT1"
    assert stored.SOPInstanceUID == ins.sop_instance_uid
