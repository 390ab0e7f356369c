"""The journal's fast path binds values on the driver cursor itself: they must be exactly what SQLAlchemy would
have bound, or rows it writes would compare and read back differently from rows written through Core."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import DateTime
from sqlalchemy.dialects import mysql, sqlite

from gateway.journal.fastpath import compile_due, datetime_to_db


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 24, 12, 0, 0),  # no microseconds: still written with six digits
        datetime(2026, 11, 24, 12, 0, 0, 7),
        datetime(1999, 1, 2, 3, 4, 5, 999_999),
    ],
)
def test_sqlite_datetimes_are_bound_as_sqlalchemy_stores_them(value: datetime) -> None:
    dialect = sqlite.dialect()
    core = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert core is not None
    assert datetime_to_db(sqlite.dialect())(value) == core(value)


def test_mysql_datetimes_are_bound_as_they_are() -> None:
    value = datetime(2026, 11, 24, 12, 0, 0, 7)
    assert datetime_to_db(mysql.dialect())(value) is value


@pytest.mark.parametrize("ordered", [False, True])
def test_the_claim_locks_with_skip_locked_on_mysql_only(ordered: bool) -> None:
    for dialect, locks in ((mysql.dialect(), True), (sqlite.dialect(), False)):
        sql, order, defaults = compile_due(dialect, ordered)
        assert sql.rstrip().endswith("FOR UPDATE SKIP LOCKED") is locks
        assert {"destination", "now", "limit"} <= set(order)
        # Every parameter has a value once the three per-claim ones are filled in.
        assert set(order) <= {*defaults, "destination", "now", "limit"}
        assert ("EXISTS" in sql) is ordered
