"""The MQTT source and sink over TLS with a client certificate and a password, against a Mosquitto of the test's
own that requires both; and the operator is told when the gateway falls behind the broker."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from adapters.mqtt.config import MqttPublishConfig, MqttSourceConfig
from adapters.mqtt.source import MqttSource
from gateway.contracts import Envelope, InputKind, OutboxItem, Outcome, SubmitResult
from gateway.errors import TransientError
from tests.integration.mqtt_helpers import eventually, mosquitto_pub, need_mosquitto, private_broker, unique_topic
from tests.pki import make_pki

WAIT = 10.0


class Recording:
    def __init__(self) -> None:
        self.seen: list[Envelope] = []

    async def submit(self, envelope: Envelope) -> SubmitResult:
        self.seen.append(envelope)
        return SubmitResult(Outcome.DELIVERED)


def tls_broker_config(tmp_path: Path) -> tuple[str, dict[str, Any]]:
    pki = make_pki(tmp_path / "pki")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "gateway", "s3cret"], check=True, capture_output=True)
    extra = (
        f"cafile {pki.p('ca.pem')}\ncertfile {pki.p('server.pem')}\nkeyfile {pki.p('server.key')}\n"
        f"require_certificate true\npassword_file {pw}\n"
    )
    (tmp_path / "pw.txt").write_text("s3cret\n")
    client = {
        "host": "localhost",
        "username": "gateway",
        "password_file": str(tmp_path / "pw.txt"),
        "tls": {"ca": pki.p("ca.pem"), "cert": pki.p("client.pem"), "key": pki.p("client.key")},
    }
    return extra, client


@pytest.fixture(autouse=True)
def _broker() -> None:
    need_mosquitto()


async def test_source_and_sink_over_tls_with_a_client_certificate_and_a_password(tmp_path: Path) -> None:
    extra, client = tls_broker_config(tmp_path)
    topic = unique_topic()
    with private_broker(tmp_path, extra) as broker:
        sub = Recording()
        src = MqttSource(
            MqttSourceConfig.model_validate({"type": "mqtt", "name": "mqtt-tls", "port": broker.port,
                                             "topics": [f"{topic}/#"], **client}), sub)  # fmt: skip
        sink = MqttPublishConfig.model_validate(
            {"type": "mqtt_publish", "port": broker.port, "topic": f"{topic}/{{resource_type}}", **client}
        ).build("mqtt-tls-out")
        await src.start()
        await sink.start()
        try:
            await asyncio.wait_for(src.connected.wait(), WAIT)
            item = OutboxItem(
                1, "m1", "mqtt-tls-out", 0, InputKind.MQTT, "s", b"", [{"resourceType": "Device", "id": "d"}]
            )
            await sink.deliver(item)

            async def seen() -> bool:
                return bool(sub.seen)

            await eventually(seen, WAIT)
            assert sub.seen[0].metadata["topic"] == f"{topic}/Device"
            assert orjson.loads(sub.seen[0].payload) == {"resourceType": "Device", "id": "d"}
        finally:
            await sink.close()
            await src.stop(2.0)


async def test_a_wrong_password_or_no_client_certificate_is_refused(tmp_path: Path) -> None:
    extra, client = tls_broker_config(tmp_path)
    with private_broker(tmp_path, extra) as broker:
        (tmp_path / "wrong.txt").write_text("nope\n")
        for cfg in (
            {**client, "password_file": str(tmp_path / "wrong.txt")},
            {**client, "tls": {"ca": client["tls"]["ca"]}},
        ):
            sink = MqttPublishConfig.model_validate(
                {"type": "mqtt_publish", "port": broker.port, "connect_timeout_seconds": 3, **cfg}
            ).build("o")
            await sink.start()
            with pytest.raises(TransientError):
                await sink.deliver(
                    OutboxItem(1, "m", "o", 0, InputKind.MQTT, "s", b"", [{"resourceType": "Device", "id": "d"}])
                )
            await sink.close()


class Stuck:
    """A journal that never answers (failure injection): every reading stays in flight."""

    async def submit(self, envelope: Envelope) -> SubmitResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_full_in_flight_window_is_reported_as_falling_behind(caplog: pytest.LogCaptureFixture) -> None:
    topic = unique_topic()
    cfg = MqttSourceConfig(
        type="mqtt",
        name="mqtt-behind",
        topics=(f"{topic}/#",),
        receive_maximum=5,
        behind_after_seconds=1.0,
        client_id=f"gw-test-behind-{topic[-6:]}",
        session_expiry_seconds=0,
    )
    src = MqttSource(cfg, Stuck())
    await src.start()
    caplog.set_level(logging.WARNING, logger="gateway.events")
    try:
        await asyncio.wait_for(src.connected.wait(), WAIT)
        for _ in range(8):
            mosquitto_pub(f"{topic}/d", b"{}")

        async def reported() -> bool:
            return bool(REGISTRY.get_sample_value("gateway_mqtt_behind_total", {"source": "mqtt-behind"}))

        await eventually(reported, WAIT)
        assert REGISTRY.get_sample_value("gateway_mqtt_inflight", {"source": "mqtt-behind"}) == 5
        assert any("falling behind" in r.getMessage() for r in caplog.records)
    finally:
        await src.stop(0.5)
