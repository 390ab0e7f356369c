"""The daemon as a process with an MQTT source: kill -9 between receiving readings and committing them loses
nothing (the broker redelivers, each reading is stored once); a broker that goes away and comes back (with its
persistent sessions) loses nothing and does not take the daemon down; two daemons on one shared subscription split
the feed and store every reading exactly once on a shared MariaDB journal."""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pymysql
import pytest

from tests.conftest import MARIADB
from tests.e2e.conftest import Daemon, wait_for
from tests.integration.mqtt_helpers import (
    BROKER,
    PrivateBroker,
    mosquitto_pub_lines,
    need_mosquitto,
    private_broker,
    unique_topic,
)

pytestmark = pytest.mark.slow
WAIT = 30.0


def reading(i: int, device: str = "bed-1") -> bytes:
    return orjson.dumps(
        {
            "messageId": f"r-{i}",
            "deviceId": device,
            "patientId": "MRN-7",
            "effective": "2024-05-01T10:15:00Z",
            "readings": [{"code": {"system": "urn:iso:std:iso:11073:10101", "code": "147842"}, "value": 60 + i % 40,
                          "unit": "/min"}],
        }
    )  # fmt: skip


def mqtt_source(port: int, topic: str, client_id: str, **extra: str) -> str:
    lines = "".join(f"{k} = {v}\n" for k, v in extra.items())
    return (
        f'[[sources]]\ntype = "mqtt"\nname = "mqtt-e2e"\nport = {port}\nclient_id = "{client_id}"\n'
        f'topics = ["{topic}/#"]\nreconnect_initial_seconds = 0.2\nreconnect_max_seconds = 1\n' + lines
    )


def metric(d: Daemon, name: str) -> float:
    m = re.search(rf'^{re.escape(name)}{{source="mqtt-e2e"}} ([0-9.e+]+)$', d.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def journal_keys(d: Daemon) -> list[str]:
    with contextlib.closing(d.journal()) as db:
        return [k for (k,) in db.execute("SELECT dedup_key FROM messages WHERE source = 'mqtt-e2e'")]


@pytest.fixture(autouse=True)
def _broker() -> None:
    need_mosquitto()


@contextlib.contextmanager
def killed_at_exit(*daemons: Daemon) -> Iterator[None]:
    """A failing test must not leave its daemons running."""
    try:
        yield
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)


def test_kill_9_before_commit_then_restart_stores_every_reading_exactly_once(tmp_path: Path) -> None:
    n = 200
    topic = unique_topic()
    with private_broker(tmp_path) as broker:
        d = Daemon(tmp_path, source_extra=mqtt_source(broker.port, topic, f"gw-e2e-{secrets.token_hex(3)}"))
        with killed_at_exit(d):
            kill_before_commit(d, broker.port, topic, n)


def kill_before_commit(d: Daemon, port: int, topic: str, n: int) -> None:
    """Receive n readings with the journal's write lock held (so none commits), kill -9, restart."""
    d.start()
    wait_for("the subscription", lambda: metric(d, "gateway_mqtt_connected") == 1)
    # Hold SQLite's write lock: the daemon receives the readings but cannot commit them.
    lock = sqlite3.connect(d.journal_path, timeout=30, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        mosquitto_pub_lines(f"{topic}/bed-1", [reading(i) for i in range(n)], port=port)
        wait_for("all readings received", lambda: metric(d, "gateway_received_total") >= n)
        assert metric(d, "gateway_acks_total") == 0
        d.kill()
    finally:
        lock.rollback()
        lock.close()
    assert journal_keys(d) == []  # nothing was committed (and so nothing acknowledged) before the kill
    d.start()
    wait_for("every reading committed", lambda: len(journal_keys(d)) >= n)
    time.sleep(1.0)
    keys = journal_keys(d)
    assert sorted(keys) == sorted(f"mqtt|bed-1|r-{i}" for i in range(n)), "each reading exactly once"
    d.stop()
    assert "MRN-7" not in d.log()


def test_a_broker_restart_loses_no_reading_and_the_daemon_stays_ready(tmp_path: Path) -> None:
    n = 100
    topic = unique_topic()
    with private_broker(tmp_path) as broker:
        d = Daemon(tmp_path, source_extra=mqtt_source(broker.port, topic, f"gw-e2e-{secrets.token_hex(3)}"))
        with killed_at_exit(d):
            restart_broker(d, broker, topic, n)


def readyz_body(d: Daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.http_port}/readyz", timeout=5) as r:
        return str(r.read().decode()).strip()


def restart_broker(d: Daemon, broker: PrivateBroker, topic: str, n: int) -> None:
    """The broker goes away under the daemon and comes back; then the daemon is stopped, readings are published
    into its session, the broker restarts, the daemon starts."""
    d.start()
    wait_for("the subscription", lambda: metric(d, "gateway_mqtt_connected") == 1)
    broker.stop()
    wait_for("the disconnect", lambda: metric(d, "gateway_mqtt_connected") == 0)
    time.sleep(1.5)
    assert d.proc is not None and d.proc.poll() is None and d.healthy(), "up and ready without a broker"
    assert "No connection to the MQTT broker" in d.log()
    assert readyz_body(d) == "ok; no MQTT broker connection for mqtt-e2e"
    broker.start()
    wait_for("the reconnect", lambda: metric(d, "gateway_mqtt_connected") == 1)
    assert readyz_body(d) == "ok"
    # The daemon goes away; readings published meanwhile wait in its persistent session, across a broker
    # restart (Mosquitto persists sessions and queued messages).
    assert d.stop() == 0
    mosquitto_pub_lines(f"{topic}/bed-1", [reading(i) for i in range(n)], port=broker.port)
    broker.stop()
    broker.start()
    d.start()
    wait_for("every reading committed", lambda: len(journal_keys(d)) >= n)
    time.sleep(0.5)
    assert sorted(journal_keys(d)) == sorted(f"mqtt|bed-1|r-{i}" for i in range(n))
    assert "no longer had the session" not in d.log()  # persisted: resumed each time
    # A broker that comes back without the session (its persistence lost): the gateway cannot know what was
    # published meanwhile, but must say so (it used to log only "new session" at INFO).
    broker.stop()
    for f in (broker.workdir / "mosq-data").iterdir():
        f.unlink()
    broker.start()
    wait_for("the session-lost warning", lambda: "no longer had the session of mqtt-e2e" in d.log())
    assert metric(d, "gateway_mqtt_sessions_lost_total") == 1
    d.stop()


@pytest.mark.mariadb
def test_two_daemons_on_one_shared_subscription_split_the_feed_and_store_each_reading_once(
    tmp_path: Path, mariadb_url: str
) -> None:
    n = 400
    topic, group = unique_topic(), f"g{secrets.token_hex(3)}"
    daemons = []
    for i in range(2):
        work = tmp_path / f"d{i}"
        work.mkdir()
        src = mqtt_source(BROKER[1], topic, f"gw-e2e-{secrets.token_hex(3)}-{i}", shared_group=f'"{group}"')
        daemons.append(Daemon(work, journal_url=mariadb_url, source_extra=src))
    with killed_at_exit(*daemons):
        for d in daemons:
            d.start()
        for d in daemons:
            wait_for("the subscription", lambda d=d: metric(d, "gateway_mqtt_connected") == 1)
        mosquitto_pub_lines(f"{topic}/bed-2", [reading(i, "bed-2") for i in range(n)])
        db = mariadb_url.rsplit("/", 1)[1]

        def stored() -> list[str]:
            conn = pymysql.connect(**MARIADB, database=db)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT dedup_key FROM messages WHERE source = 'mqtt-e2e'")
                    return [k for (k,) in cur.fetchall()]
            finally:
                conn.close()

        wait_for("every reading committed", lambda: len(stored()) >= n)
        received = [metric(d, "gateway_received_total") for d in daemons]
        assert all(r > 0 for r in received), f"the broker should split the feed: {received}"
        assert sum(received) == n
        assert sorted(stored()) == sorted(f"mqtt|bed-2|r-{i}" for i in range(n))
        for d in daemons:
            assert d.stop() == 0
