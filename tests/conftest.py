"""Shared fixtures: real databases. A test that needs MariaDB skips when it is not running, except under CI,
where a missing service is a failure."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPORA = Path(os.environ.get("GATEWAY_CORPORA", REPO.parent / "shared" / "corpora"))
MARIADB = {"host": "127.0.0.1", "port": 3306, "user": "root", "password": ""}


def need_service(name: str, reason: str) -> None:
    """Skip locally, fail under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required under CI: {reason}")
    pytest.skip(f"{name} is not available: {reason}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/journal.db"


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh MariaDB database for one test, dropped afterwards."""
    import pymysql

    try:
        conn = pymysql.connect(**MARIADB, connect_timeout=3)
    except pymysql.err.OperationalError as exc:
        need_service("MariaDB", str(exc))
        raise AssertionError("unreachable") from exc
    name = f"gwtest_{secrets.token_hex(4)}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield f"mysql+aiomysql://root:@127.0.0.1:3306/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.close()


@pytest.fixture(params=["sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on MariaDB."""
    return str(request.getfixturevalue(f"{request.param}_url"))


def corpus(*parts: str) -> Path:
    p = CORPORA.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"test corpus missing: {p}")
    return p


def hl7_for_wire(data: bytes) -> bytes:
    """A corpus file as a sender would put it on the wire: no BOM, CR segment separators."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r") + b"\r"
