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
    """Write ``parts`` to ``path`` so that after this returns the file and its name survive a power failure.
    A path that already exists is checked to hold exactly these bytes (the name carries their hash, but a crash
    can leave a file cut short) and flushed, since its writer may not have flushed it yet; one that does not is
    replaced. Raises TransientError (disk full, I/O error): the sender should retry."""
    try:
        _make_dirs(path.parent)
        if not _write_linked(path, parts):
            _write_renamed(path, parts)
    except OSError as exc:
        what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"I/O error ({exc.strerror})"
        raise TransientError(f"cannot store the instance: {what}") from exc


def _write_linked(path: Path, parts: tuple[bytes, ...]) -> bool:
    """The fast way: the bytes go to an unnamed file (O_TMPFILE) that is linked under its name only once it is
    complete, so no reader sees it partial; then the file and the directory are flushed, which on ext4 and XFS
    costs one journal commit where a temporary name, its fsync, the rename and the directory's fsync cost two,
    one after the other. Only a crash between the link and the flush can leave the name with fewer bytes
    behind: the check of an existing file catches that. False when the file system or kernel
    has no O_TMPFILE (or /proc is not there to link it); the caller writes the classic way then."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if not tmpfile:
        return False
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _matches(path, parts, dir_fd):
            return True
        try:
            fd = os.open(path.parent, tmpfile | os.O_WRONLY, 0o640)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return False
            raise
        try:
            _write_all(fd, parts)
            try:
                # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd is how open(2) says to name an O_TMPFILE file
                # without CAP_DAC_READ_SEARCH; a dst_dir_fd makes Python call linkat rather than link.
                os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=dir_fd, follow_symlinks=True)
            except FileExistsError:  # a concurrent writer of the same bytes linked first
                return _matches(path, parts, dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP):
                    return False
                raise
            _flush_both(fd, dir_fd)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    return True


def _write_renamed(path: Path, parts: tuple[bytes, ...]) -> None:
    """The portable way: a temporary file, flushed, renamed over the name (replacing a file a crash left short),
    then the directory flushed."""
    if _matches(path, parts, None):
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident():x}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _matches(path: Path, parts: tuple[bytes, ...], dir_fd: int | None) -> bool:
    """True when ``path`` holds exactly ``parts``, after flushing it and its directory (it may be another
    writer's, linked but not flushed yet). False when it does not exist or holds other bytes (cut short by a
    crash: the caller writes it again; a different dataset never has the same name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != sum(len(p) for p in parts):
            return False
        with os.fdopen(os.dup(fd), "rb") as f:
            for part in parts:
                view = memoryview(part)
                while view:
                    chunk = f.read(min(len(view), 1 << 20))
                    if not chunk or chunk != view[: len(chunk)]:
                        return False
                    view = view[len(chunk) :]
        if dir_fd is None:
            os.fsync(fd)
            _fsync_dir(path.parent)
        else:
            _flush_both(fd, dir_fd)
    finally:
        os.close(fd)
    return True


def _flush_both(fd: int, dir_fd: int) -> None:
    """fsync the file, then its directory. The name was linked before, so on ext4 and XFS the file's fsync already
    commits it and the directory's finds nothing left to commit; the directory's fsync is what POSIX requires.
    (Running the two at once in two threads showed no gain on the loaded test machine and adds a hand-off.)"""
    os.fsync(fd)
    os.fsync(dir_fd)


def _write_all(fd: int, parts: tuple[bytes, ...]) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            n = os.write(fd, view)
            view = view[n:]


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
