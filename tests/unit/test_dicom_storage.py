"""Instance files: the bytes land under their name, the file and its directory are flushed, a file a crash left
short is replaced, and concurrent writers of the same bytes all succeed with one file. Each case runs on both
ways of writing: O_TMPFILE + link (Linux, ext4/XFS/tmpfs) and the portable temporary name + rename."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from adapters.dicom import storage
from adapters.dicom.storage import instance_path, write_durably

PARTS = (b"\0" * 128 + b"DICM" + b"meta", b"dataset bytes " * 3000)
WHOLE = b"".join(PARTS)


@pytest.fixture(params=["linked", "renamed"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "renamed":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    elif not hasattr(os, "O_TMPFILE"):
        pytest.skip("no O_TMPFILE on this platform")
    return str(request.param)


def _path(root: Path) -> Path:
    return instance_path(root, "1.2.3", "1.2.3.4", "ab" * 32)


def test_a_new_file_holds_exactly_the_bytes_and_no_temporary_file_is_left(way: str, tmp_path: Path) -> None:
    path = _path(tmp_path)
    write_durably(path, PARTS)
    assert path.read_bytes() == WHOLE
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_the_file_and_its_directory_are_flushed(way: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = _path(tmp_path)
    write_durably(path, PARTS)
    assert path.stat().st_ino in flushed
    assert path.parent.stat().st_ino in flushed


def test_a_file_a_crash_left_short_is_replaced(way: str, tmp_path: Path) -> None:
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(WHOLE[:1000])  # linked, then the power failed before its data was flushed
    write_durably(path, PARTS)
    assert path.read_bytes() == WHOLE


def test_a_file_of_the_right_size_with_other_bytes_is_replaced(way: str, tmp_path: Path) -> None:
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * len(WHOLE))  # a file system that kept the size but not the data
    write_durably(path, PARTS)
    assert path.read_bytes() == WHOLE


def test_a_complete_file_is_kept_as_it_is(way: str, tmp_path: Path) -> None:
    path = _path(tmp_path)
    write_durably(path, PARTS)
    inode = path.stat().st_ino
    write_durably(path, PARTS)
    assert path.stat().st_ino == inode
    assert path.read_bytes() == WHOLE


def test_concurrent_writers_of_the_same_bytes_all_succeed_with_one_file(way: str, tmp_path: Path) -> None:
    path = _path(tmp_path)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def write() -> None:
        start.wait()
        try:
            write_durably(path, PARTS)
        except BaseException as exc:  # collected: the test fails on it below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() == WHOLE
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_file_system_without_o_tmpfile_falls_back_to_a_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if not tmpfile:
        pytest.skip("no O_TMPFILE on this platform")

    def open_(path: str | Path, flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & tmpfile == tmpfile:
            raise OSError(95, "Operation not supported")  # EOPNOTSUPP, as on a file system without it
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(storage.os, "open", open_)
    path = _path(tmp_path)
    write_durably(path, PARTS)
    assert path.read_bytes() == WHOLE
    assert [p.name for p in path.parent.iterdir()] == [path.name]
