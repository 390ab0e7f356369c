"""The journal on real databases: SQLite (embedded) and MariaDB, same code."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from gateway.contracts import Envelope, InputKind
from gateway.errors import TransientError
from gateway.ids import uuid7
from gateway.journal import CommitResult, Journal, JournalRecord
from gateway.journal.schema import dedup_keys, messages, metadata, outbox


def record(
    key: str | None, *, payload: bytes = b"MSH|^~\\&|A|B\r", dest: tuple[str, ...] = ("store",)
) -> JournalRecord:
    env = Envelope(uuid7(), "test", InputKind.HL7V2, datetime.now(UTC), payload, "127.0.0.1:1")
    return JournalRecord(
        env,
        "accepted",
        message_type="ADT^A01",
        control_id="c1",
        dedup_key=key,
        destinations=dest,
        fhir=b'{"resourceType":"Bundle","type":"transaction","entry":[]}',
    )


async def open_journal(url: str, **kw: object) -> Journal:
    j = Journal(url, **kw)  # type: ignore[arg-type]
    await j.open()
    return j


async def count(j: Journal, table: object) -> int:
    assert j.db is not None
    return await j.db.read(lambda conn: int(conn.execute(select(func.count()).select_from(table)).scalar_one()))  # type: ignore[arg-type]


async def test_migrations_create_the_declared_schema(db_url: str) -> None:
    j = await open_journal(db_url)
    try:
        assert j.db is not None

        def columns(sync_conn: object) -> dict[str, set[str]]:
            from sqlalchemy import inspect

            insp = inspect(sync_conn)
            return {t: {c["name"] for c in insp.get_columns(t)} for t in insp.get_table_names()}

        found = await j.db.read(columns)
        for table in metadata.sorted_tables:
            assert table.name in found
            assert found[table.name] == {c.name for c in table.columns}, table.name
    finally:
        await j.close()
    # a second open (another start) applies nothing and works
    j = await open_journal(db_url)
    await j.close()


async def test_raw_bytes_are_kept_exactly(db_url: str) -> None:
    raw = bytes(range(256)) * 300  # every byte value, > 64 KB (MySQL BLOB would truncate)
    j = await open_journal(db_url)
    try:
        rec = record(None, payload=raw)
        await j.commit(rec)
        assert j.db is not None
        stored = await j.db.read(
            lambda conn: conn.execute(select(messages.c.raw).where(messages.c.id == rec.envelope.id)).scalar_one()
        )
        assert stored == raw
    finally:
        await j.close()


async def test_concurrent_commits_share_a_transaction_and_each_gets_its_result(db_url: str) -> None:
    j = await open_journal(db_url)
    try:
        recs = [record(f"k{i}") for i in range(200)]
        results = await asyncio.gather(*(j.commit(r) for r in recs))
        assert [r.message_id for r in results] == [r.envelope.id for r in recs]
        assert not any(r.duplicate for r in results)
        assert j.groups < 50, "200 concurrent commits should need far fewer transactions"
        assert await count(j, messages) == 200
        assert await count(j, outbox) == 200
        assert await count(j, dedup_keys) == 200
    finally:
        await j.close()


async def test_duplicates_inside_and_across_groups_are_recognised(db_url: str) -> None:
    j = await open_journal(db_url)
    try:
        first = await j.commit(record("same"))
        again = await asyncio.gather(*(j.commit(record("same")) for _ in range(5)))
        assert not first.duplicate
        assert all(r.duplicate and r.message_id == first.message_id for r in again)
        both = await asyncio.gather(j.commit(record("pair")), j.commit(record("pair")))
        assert sorted(r.duplicate for r in both) == [False, True]
        assert await count(j, messages) == 2
        assert await count(j, outbox) == 2
    finally:
        await j.close()


async def test_dedup_key_expires_after_the_window(db_url: str) -> None:
    j = await open_journal(db_url, dedup_window=timedelta(milliseconds=50))
    try:
        await j.commit(record("k"))
        await asyncio.sleep(0.1)
        later = await j.commit(record("k"))
        assert not later.duplicate
        assert await count(j, messages) == 2
    finally:
        await j.close()


class SlowJournal(Journal):
    """Failure injection: each group's transaction takes a while, so later arrivals form the next group."""

    def __init__(self, url: str, delay: float) -> None:
        super().__init__(url)
        self.delay = delay
        self.group_sizes: list[int] = []

    async def _write(self, records: list[JournalRecord], retry_conflict: bool = True) -> list[CommitResult]:
        self.group_sizes.append(len(records))
        await asyncio.sleep(self.delay)
        return await super()._write(records, retry_conflict)


async def test_a_commit_waits_for_its_own_group_not_a_later_one(sqlite_url: str) -> None:
    j = SlowJournal(sqlite_url, delay=0.3)
    await j.open()
    try:
        loop = asyncio.get_running_loop()
        done_at: dict[str, float] = {}

        async def commit(name: str, rec: JournalRecord) -> None:
            await j.commit(rec)
            done_at[name] = loop.time()

        a = asyncio.create_task(commit("a", record("a")))
        await asyncio.sleep(0.05)  # a's group is being written now
        later = [asyncio.create_task(commit(f"b{i}", record(f"b{i}"))) for i in range(3)]
        await asyncio.gather(a, *later)
        assert j.group_sizes == [1, 3]
        assert all(done_at["a"] < done_at[f"b{i}"] - 0.2 for i in range(3))
    finally:
        await j.close()


async def test_one_bad_record_does_not_fail_its_group(sqlite_url: str) -> None:
    j = await open_journal(sqlite_url)
    try:
        good = [record(f"g{i}") for i in range(5)]
        ok = record("bad")
        bad = JournalRecord(ok.envelope, None, dedup_key="bad")  # type: ignore[arg-type]  # NOT NULL violation
        results = await asyncio.gather(*(j.commit(r) for r in [*good[:3], bad, *good[3:]]), return_exceptions=True)
        assert isinstance(results[3], TransientError)
        assert all(isinstance(r, CommitResult) for i, r in enumerate(results) if i != 3)
        assert await count(j, messages) == 5
    finally:
        await j.close()


async def test_commit_reports_transient_error_when_the_database_is_gone(sqlite_url: str) -> None:
    j = await open_journal(sqlite_url)
    try:
        assert j.db is not None
        await j.db.transaction(lambda conn: conn.execute(text("DROP TABLE dedup_keys")))
        with pytest.raises(TransientError):
            await j.commit(record("k"))
        await j.commit(record(None))  # without a dedup key the journal still works
    finally:
        await j.close()


async def test_claim_lease_done_retry_dead(db_url: str) -> None:
    j = await open_journal(db_url)
    try:
        for i in range(5):
            await j.commit(record(f"k{i}"))
        items = await j.claim("store", 3, timedelta(seconds=60))
        assert len(items) == 3 and items[0].id < items[1].id < items[2].id
        assert items[0].raw == b"MSH|^~\\&|A|B\r" and items[0].resources == []
        # leased items are not claimed twice
        rest = await j.claim("store", 10, timedelta(seconds=60))
        assert len(rest) == 2
        await j.mark_done([i.id for i in items])
        await j.mark_retry(rest[0].id, "boom", datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1))
        await j.mark_dead(rest[1].id, "refused")
        again = await j.claim("store", 10, timedelta(seconds=60))
        assert [i.id for i in again] == [rest[0].id] and again[0].attempts == 1
        dead = await j.dead_letters()
        assert [d["id"] for d in dead] == [rest[1].id] and dead[0]["last_error"] == "refused"
        assert await j.retry_dead() == 1
        counts = await j.counts()
        assert counts["outbox.done"] == 3 and counts["outbox.pending"] == 2
    finally:
        await j.close()


async def test_expired_lease_is_claimed_again(db_url: str) -> None:
    j = await open_journal(db_url)
    try:
        await j.commit(record("k"))
        first = await j.claim("store", 10, timedelta(milliseconds=1))
        await asyncio.sleep(0.05)
        second = await j.claim("store", 10, timedelta(seconds=60))
        assert [i.id for i in first] == [i.id for i in second]
    finally:
        await j.close()


async def test_a_dedup_key_race_with_another_instance_is_resolved_as_a_duplicate(db_url: str) -> None:
    """Two instances on one database: the other one commits the key between our check and our insert."""
    mine = await open_journal(db_url)
    other = await open_journal(db_url)
    try:
        original = await other.commit(record("raced"))
        # Simulate the race: our dedup check saw nothing (the key is absent from our check's view) because the
        # other instance committed after it. The unique index refuses our insert; the retry sees the key.
        assert mine.db is not None
        fast = await mine.db.read(mine._fastpath)  # failure injection at the seam
        real_check = fast.existing_keys
        calls = 0

        def blind_first_check(conn: object, keys: list[str], now: datetime) -> tuple[dict[str, str], list[str]]:
            nonlocal calls
            calls += 1
            return ({}, []) if calls == 1 else real_check(conn, keys, now)  # type: ignore[arg-type]

        fast.existing_keys = blind_first_check  # type: ignore[method-assign]
        result = await mine.commit(record("raced"))
        assert result.duplicate and result.message_id == original.message_id
        assert calls == 2
        assert await count(mine, messages) == 1
    finally:
        await mine.close()
        await other.close()


async def test_counts_keep_working_after_a_wal_checkpoint(sqlite_url: str) -> None:
    """The health check reads on the same reader threads that run the background checkpoints."""
    from gateway.db import SqliteDatabase

    j = await open_journal(sqlite_url)
    try:
        await j.commit(record("k"))
        assert isinstance(j.db, SqliteDatabase)
        for _ in range(4):  # every reader thread gets a checkpoint and a read
            await j.db.checkpoint()
            assert (await j.counts())["messages.accepted"] == 1
    finally:
        await j.close()


async def test_maintenance_purges_expired_dedup_keys_and_ping_answers(db_url: str) -> None:
    j = await open_journal(db_url, dedup_window=timedelta(milliseconds=10))
    try:
        for i in range(3):
            await j.commit(record(f"old{i}"))
        await asyncio.sleep(0.05)
        assert await j.purge_expired_dedup_keys() == 3
        assert await count(j, dedup_keys) == 0
        await j.ping()
    finally:
        await j.close()
    with pytest.raises(TransientError):
        await j.ping()  # closed


async def test_each_record_can_carry_its_own_dedup_window(db_url: str) -> None:
    """Dedup rules give a window per source or kind: a key's expiry is the record's window, else the default."""
    j = await open_journal(db_url, dedup_window=timedelta(days=7))
    try:
        short = dataclasses.replace(record("short"), dedup_window=timedelta(milliseconds=50))
        await j.commit(short)
        await j.commit(record("default"))
        assert j.db is not None
        rows = await j.db.read(
            lambda conn: dict(conn.execute(select(dedup_keys.c.dedup_key, dedup_keys.c.expires_at)).all())
        )
        assert rows["default"] - rows["short"] > timedelta(days=6)
        await asyncio.sleep(0.1)
        assert not (await j.commit(record("short"))).duplicate  # its own window has passed
        assert (await j.commit(record("default"))).duplicate
    finally:
        await j.close()


async def test_two_instances_racing_on_the_same_duplicates_store_each_once(db_url: str) -> None:
    """Two gateway instances on one database receive the same 30 messages at the same moment (a sender that
    resent to both behind a load balancer): each message is stored once, and each pair gets one original and
    one duplicate answer, whatever the interleaving."""
    first = await open_journal(db_url)
    second = await open_journal(db_url)
    try:
        keys = [f"race-{i}" for i in range(30)]
        results = await asyncio.gather(
            *(j.commit(record(k)) for k in keys for j in (first, second)), return_exceptions=True
        )
        assert not [r for r in results if isinstance(r, BaseException)]
        for i in range(len(keys)):
            pair = results[2 * i : 2 * i + 2]
            assert sorted(r.duplicate for r in pair) == [False, True]  # type: ignore[union-attr]
            assert pair[0].message_id == pair[1].message_id  # type: ignore[union-attr]
        assert await count(first, messages) == len(keys)
        assert await count(first, dedup_keys) == len(keys)
        assert await count(first, outbox) == len(keys)
    finally:
        await first.close()
        await second.close()


@pytest.mark.mariadb
async def test_a_commit_that_loses_a_deadlock_to_another_instance_is_retried_not_refused(mariadb_url: str) -> None:
    """Issue #10: two instances on one MariaDB, one committing while the other's delivery claims outbox rows.
    In REPEATABLE READ the claim holds next-key locks on the outbox, our commit's outbox INSERT waits for them,
    and the claim then waits for a row our commit inserted: InnoDB aborts one of the two (1213). Here the other
    instance's transaction is played by a raw connection that builds exactly that cycle and has done more work
    than the commit, so InnoDB picks the commit as the victim. The sender must still get a plain success."""
    import pymysql
    from prometheus_client import REGISTRY

    from tests.conftest import MARIADB

    j = await open_journal(mariadb_url)
    other = pymysql.connect(**MARIADB, database=mariadb_url.rsplit("/", 1)[1], autocommit=False)
    try:
        for i in range(50):
            await j.commit(record(f"before-{i}"))

        def sample() -> float:
            labels = {"code": "1213", "outcome": "retried"}
            return REGISTRY.get_sample_value("gateway_journal_lock_conflicts_total", labels) or 0.0

        retried_before = sample()
        with other.cursor() as cur:
            # The other instance's claim: every outbox row and the gap after the last one, locked; and weight, so
            # that InnoDB rolls back the commit, not this transaction.
            cur.execute("UPDATE outbox SET updated_at = updated_at + INTERVAL 1 SECOND")
        rec = record("during")
        commit = asyncio.create_task(j.commit(rec))

        def parked() -> bool:
            probe = pymysql.connect(**MARIADB)
            try:
                with probe.cursor() as cur:
                    cur.execute(
                        "SELECT count(*) FROM information_schema.processlist WHERE db = %s AND info LIKE %s",
                        (mariadb_url.rsplit("/", 1)[1], "INSERT INTO outbox%"),
                    )
                    row = cur.fetchone()
                    return bool(row and row[0])
            finally:
                probe.close()

        for _ in range(200):  # until the commit is parked on the outbox lock
            if await asyncio.to_thread(parked):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the commit never waited for the other transaction's lock")

        def close_the_cycle() -> None:
            with other.cursor() as cur:
                cur.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", (rec.envelope.id,))
            other.commit()

        await asyncio.to_thread(close_the_cycle)
        result = await asyncio.wait_for(commit, 30)
        assert not result.duplicate and result.message_id == rec.envelope.id
        assert sample() >= retried_before + 1
        assert await count(j, messages) == 51
        assert await count(j, outbox) == 51
    finally:
        other.close()
        await j.close()


async def test_journal_maintenance_goes_on_after_a_failure(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkpoint that failed with the driver's own error (sqlite3.OperationalError on a full disk) ended the
    # maintenance task without a word: no checkpoint, no WAL reset and no dedup purge until a restart.
    import sqlite3

    import gateway.journal as journal_module
    from gateway.db import SqliteDatabase

    monkeypatch.setattr(journal_module, "CHECKPOINT_INTERVAL", 0.01)
    calls = 0
    real = SqliteDatabase.checkpoint

    async def failing_first(self: SqliteDatabase) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("database or disk is full")
        if calls == 2:
            raise RuntimeError("anything else")
        await real(self)

    monkeypatch.setattr(SqliteDatabase, "checkpoint", failing_first)
    j = Journal(sqlite_url)
    await j.open()
    try:
        for _ in range(200):
            if calls >= 4:
                break
            await asyncio.sleep(0.01)
        assert calls >= 4
        assert j._maintainer is not None and not j._maintainer.done()
    finally:
        await j.close()


async def test_reads_of_an_unreachable_journal_raise_the_gateway_s_error() -> None:
    # outbox_state (the metrics task) let the driver's OperationalError through, past every
    # ``except GatewayError``: the daemon ended within seconds of MariaDB going away.
    from gateway.db import open_database
    from gateway.errors import UnavailableError

    j = Journal("mysql+aiomysql://root:@127.0.0.1:1/gateway")  # nothing listens on port 1
    j.db = open_database(j.url, pool_size=1)
    try:
        for read in (j.outbox_state, j.counts, j.destination_state, j.dead_letters):
            with pytest.raises(UnavailableError):
                await read()
    finally:
        await j.db.dispose()
