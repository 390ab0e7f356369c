"""The MQTT source in-process against the real Mosquitto and the real pipeline and journal: readings published
with mosquitto_pub and aiomqtt are committed once and acknowledged; bad payloads are quarantined with the reason
and acknowledged; a journal failure withholds the PUBACK and the broker redelivers; the publish sink waits for
PUBACKs. Each test uses its own topic and client id."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from adapters.mqtt.config import MqttPublishConfig, MqttSourceConfig
from adapters.mqtt.source import MqttSource
from gateway.contracts import Envelope, InputKind, OutboxItem, Outcome, SubmitResult
from gateway.errors import TransientError
from gateway.journal import Journal
from gateway.journal.schema import messages
from gateway.normalise.sensors import SensorNormaliser
from gateway.pipeline import Pipeline
from gateway.routing import Route, Router
from tests.integration.mqtt_helpers import (
    BROKER,
    eventually,
    free_port,
    mosquitto_pub,
    need_mosquitto,
    unique_topic,
)

WAIT = 10.0


def reading(message_id: str | None, value: float = 97, **over: Any) -> bytes:
    doc: dict[str, Any] = {
        "deviceId": "pulseox-01",
        "patient": {"system": "urn:oid:1.2.36.1", "value": "MRN-7"},
        "effective": "2024-05-01T10:15:00Z",
        "readings": [
            {"code": {"system": "urn:iso:std:iso:11073:10101", "code": "150456"}, "value": value, "unit": "%"}
        ],
    }
    if message_id is not None:
        doc["messageId"] = message_id
    doc.update(over)
    return orjson.dumps(doc)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _broker() -> None:
    need_mosquitto()


@asynccontextmanager
async def gateway(db_url: str, topic: str, **cfg: Any) -> AsyncIterator[tuple[MqttSource, Journal, Pipeline]]:
    journal = Journal(db_url)
    await journal.open()
    pipeline = Pipeline(journal, Router([Route("all", ("store",))]), normalisers={InputKind.MQTT: SensorNormaliser()})
    submitter = cfg.pop("submitter", pipeline)
    config = MqttSourceConfig(
        type="mqtt",
        name=cfg.pop("name", f"mqtt-{secrets.token_hex(3)}"),
        host=BROKER[0],
        port=cfg.pop("port", BROKER[1]),
        client_id=cfg.pop("client_id", f"gw-test-{secrets.token_hex(4)}"),
        topics=(f"{topic}/#",),
        reconnect_initial_seconds=0.2,
        **cfg,
    )
    src = MqttSource(config, submitter)
    await src.start()
    try:
        await asyncio.wait_for(src.connected.wait(), WAIT)
        yield src, journal, pipeline
    finally:
        await src.stop(5.0)
        await journal.close()


async def rows(journal: Journal) -> list[Any]:
    stmt = select(messages.c.status, messages.c.reject_code, messages.c.error, messages.c.meta, messages.c.dedup_key)
    return await journal.db.read(lambda conn: list(conn.execute(stmt)))


async def wait_rows(journal: Journal, n: int) -> list[Any]:
    async def enough() -> bool:
        return len(await rows(journal)) >= n

    await eventually(enough, WAIT)
    return await rows(journal)


async def test_readings_from_mosquitto_pub_and_aiomqtt_are_committed_once_and_acknowledged(db_url: str) -> None:
    topic, cid = unique_topic(), f"gw-test-{secrets.token_hex(4)}"
    async with gateway(db_url, topic, client_id=cid) as (src, journal, _):
        mosquitto_pub(f"{topic}/pulseox-01/observations", reading("m-1"))
        async with aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5) as pub:
            await pub.publish(f"{topic}/pulseox-01/observations", reading("m-2"), qos=1)
            await pub.publish(f"{topic}/pulseox-01/observations", reading("m-2"), qos=1)  # a resend
        got = await wait_rows(journal, 2)
        await asyncio.sleep(0.5)
        got = await rows(journal)
        assert sorted(r.dedup_key for r in got) == ["mqtt|pulseox-01|m-1", "mqtt|pulseox-01|m-2"]
        assert {r.status for r in got} == {"accepted"}
        meta = orjson.loads(got[0].meta)
        assert meta["topic"] == f"{topic}/pulseox-01/observations" and meta["device_id"] == "pulseox-01"
        assert "MRN-7" not in got[0].meta
        assert metric("gateway_acks_total", source=src.name, code="puback") == 3
    # Same client id again: every reading was acknowledged, so the session holds nothing to redeliver.
    async with gateway(db_url, topic, client_id=cid) as (src, journal, _):
        await asyncio.sleep(1.0)
        assert metric("gateway_received_total", source=src.name) == 0
        assert len(await rows(journal)) == 2


BAD = {
    "not-json": (b"{not json", "unparseable", "not JSON"),
    "nan": (b'{"deviceId": "d", "patientId": "p", "readings": [{"value": NaN}]}', "unparseable", "not JSON"),
    "wrong-schema": (orjson.dumps({"deviceId": "d", "readings": []}), "invalid-payload", "patient"),
    "no-zone": (reading("b-1", effective="2024-05-01T10:15:00"), "invalid-payload", "no time zone"),
    "unknown-code": (
        reading("b-2", readings=[{"code": {"system": "http://loinc.org", "code": "0000-0"}, "value": 1, "unit": "%"}]),
        "unknown-code",
        "not a supported vital sign",
    ),
    "oversize": (reading("b-3", deviceId="x" * 20) + b" " * 5000, "too-large", "exceeds the limit"),
}


async def test_bad_payloads_are_quarantined_with_the_reason_and_acknowledged(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic, cid = unique_topic(), f"gw-test-{secrets.token_hex(4)}"
    async with gateway(sqlite_url, topic, client_id=cid, max_payload_bytes=4096) as (src, journal, _):
        with caplog.at_level(logging.WARNING, logger="gateway.events"):
            for name, (payload, _, _) in BAD.items():
                mosquitto_pub(f"{topic}/{name}", payload)
            got = await wait_rows(journal, len(BAD))
        # the log line names the topic, the reading's sender (the peer is the broker)
        quarantine_lines = [r.getMessage() for r in caplog.records if "Quarantined" in r.getMessage()]
        assert len(quarantine_lines) == len(BAD)
        assert all(f"(topic {topic}/" in line for line in quarantine_lines), quarantine_lines[:2]
        by_topic = {orjson.loads(r.meta)["topic"].rsplit("/", 1)[1]: r for r in got}
        for name, (_, code, reason) in BAD.items():
            row = by_topic[name]
            assert (row.status, row.reject_code) == ("quarantined", code), name
            assert reason in row.error, (name, row.error)
            assert "MRN-7" not in row.error
        assert metric("gateway_acks_total", source=src.name, code="puback-quarantined") == len(BAD)
        assert metric("gateway_rejected_total", source=src.name, code="invalid-payload") == 2
    async with gateway(sqlite_url, topic, client_id=cid) as (src, journal, _):
        await asyncio.sleep(1.0)
        assert metric("gateway_received_total", source=src.name) == 0  # all acknowledged: none redelivered


class FailingFirst:
    """The journal is down for the first ``n`` submits (failure injection), then the real pipeline answers."""

    def __init__(self, pipeline: Pipeline, n: int) -> None:
        self.pipeline, self.n = pipeline, n

    async def submit(self, envelope: Envelope) -> SubmitResult:
        if self.n > 0:
            self.n -= 1
            return SubmitResult(Outcome.ERRORED, reason="journal unavailable, resend later")
        return await self.pipeline.submit(envelope)


async def test_a_failed_commit_withholds_the_puback_and_the_broker_redelivers(sqlite_url: str) -> None:
    topic = unique_topic()
    async with gateway(sqlite_url, topic) as (src, journal, pipeline):
        src.submitter = FailingFirst(pipeline, 3)
        for i in range(10):
            mosquitto_pub(f"{topic}/d", reading(f"r-{i}", value=90 + i))
        got = await wait_rows(journal, 10)
        await asyncio.sleep(1.0)
        got = await rows(journal)
        assert sorted(r.dedup_key for r in got) == sorted(f"mqtt|pulseox-01|r-{i}" for i in range(10))
        assert metric("gateway_acks_total", source=src.name, code="withheld") >= 1
        assert metric("gateway_mqtt_connect_failures_total", source=src.name) >= 1


async def test_the_source_keeps_retrying_while_the_broker_is_down(sqlite_url: str) -> None:
    journal = Journal(sqlite_url)
    await journal.open()
    pipeline = Pipeline(journal, Router([]), normalisers={InputKind.MQTT: SensorNormaliser()})
    config = MqttSourceConfig(type="mqtt", name="mqtt-down", port=free_port(), reconnect_initial_seconds=0.05,
                              reconnect_max_seconds=0.2)  # fmt: skip
    src = MqttSource(config, pipeline)
    await src.start()
    try:
        await asyncio.sleep(1.5)
        assert not src.connected.is_set()
        assert metric("gateway_mqtt_connect_failures_total", source="mqtt-down") >= 4  # capped backoff: ~0.2 s
    finally:
        await src.stop(1.0)
        await journal.close()


def outbox_item(resources: list[dict[str, Any]]) -> OutboxItem:
    return OutboxItem(1, "0190-msg", "mqtt-out", 0, InputKind.MQTT, "mqtt-main", b"{}", resources)


async def test_the_publish_sink_is_done_only_after_the_pubacks() -> None:
    topic = unique_topic()
    cfg = MqttPublishConfig(type="mqtt_publish", topic=f"{topic}/{{resource_type}}/{{resource_id}}", max_inflight=8)
    sink = cfg.build("mqtt-out")
    await sink.start()
    resources = [{"resourceType": "Observation", "id": f"o{i}", "status": "final"} for i in range(50)]
    async with aiomqtt.Client(*BROKER, protocol=aiomqtt.ProtocolVersion.V5) as sub:
        await sub.subscribe(f"{topic}/#", qos=1)
        try:
            results = await sink.deliver_many([outbox_item(resources[:25]), outbox_item(resources[25:])])
            assert results == [None, None]
        finally:
            await sink.close()
        got: list[str] = []
        async with asyncio.timeout(WAIT):
            async for m in sub.messages:
                got.append(m.topic.value)
                if len(got) == 50:
                    break
    assert sorted(got) == sorted(f"{topic}/Observation/o{i}" for i in range(50))


async def test_the_publish_sink_reports_an_unreachable_broker_as_transient() -> None:
    cfg = MqttPublishConfig(type="mqtt_publish", port=free_port(), connect_timeout_seconds=1)
    sink = cfg.build("mqtt-out")
    await sink.start()
    with pytest.raises(TransientError):
        await sink.deliver(outbox_item([{"resourceType": "Device", "id": "d1"}]))
    await sink.close()
