"""Instance files: written and fsynced (file and directory) before the instance is journaled.

Paths are content-addressed within a UID-based layout: ``<storage>/<Study UID>/<SOP UID>.<sha256:16>.dcm``.
The same bytes received twice land on the same path (written once); a different dataset under the same SOP
Instance UID gets a path of its own, so no policy decision ever destroys received bytes. A dataset that could
not be decoded is kept under ``unreadable/<sha256>.dcm``. A UID that is not a well-formed DICOM UID (they occur)
is replaced in the path by a hash, so no path component can escape the directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from pathlib import Path

from gateway.errors import TransientError

from .dataset import UID_RE


def _component(uid: str) -> str:
    return uid if UID_RE.fullmatch(uid) and len(uid) <= 64 else "x" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def instance_path(root: Path, study_uid: str, sop_uid: str, sha256: str) -> Path:
    return root / _component(study_uid) / f"{_component(sop_uid)}.{sha256[:16]}.dcm"


def unreadable_path(root: Path, sha256: str) -> Path:
    return root / "unreadable" / f"{sha256}.dcm"


def write_durably(path: Path, parts: tuple[bytes, ...]) -> None:
    """Write ``parts`` to ``path`` so that after this returns the file survives a power failure: a temporary
    file is written and fsynced, renamed into place, and the directory fsynced (new directories too). A path
    that already exists holds the same bytes (the name carries their hash) and was made durable the same way,
    so it is left as it is. Raises TransientError (disk full, I/O error): the sender should retry."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident():x}.tmp")
    try:
        _make_dirs(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"I/O error ({exc.strerror})"
        raise TransientError(f"cannot store the instance: {what}") from exc


def _make_dirs(directory: Path) -> None:
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    try:
        directory.mkdir(mode=0o750)
    except FileExistsError:
        return
    _fsync_dir(directory.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
