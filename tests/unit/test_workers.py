"""`workers = N`: the config checks, the worker role from the environment, the per-worker MQTT client id and the
supervisor's merge of its workers' metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapters.mqtt.config import MqttSourceConfig
from adapters.mqtt.source import MqttSource
from gateway.config import parse_config
from gateway.contracts import Envelope, SubmitResult
from gateway.errors import ConfigError
from gateway.supervisor import describe_status, render
from gateway.worker import COUNT_ENV, INDEX_ENV, WorkerRole, current_role

MQTT: dict[str, Any] = {"type": "mqtt", "topics": ["devices/+/obs"]}


def config(**top: Any) -> dict[str, Any]:
    return {"rules": "rules.yaml", "sources": [{"type": "mllp"}], **top}


def test_one_worker_by_default_and_the_range_is_checked() -> None:
    assert parse_config(config()).workers == 1
    assert parse_config(config(workers=64)).workers == 64
    for bad in (0, 65):
        with pytest.raises(ConfigError) as err:
            parse_config(config(workers=bad))
        assert err.value.path == "workers"


def test_several_workers_need_fixed_ports_and_shared_mqtt_subscriptions() -> None:
    with pytest.raises(ConfigError, match="fixed port"):
        parse_config(config(workers=2, sources=[{"type": "mllp", "port": 0}]))
    with pytest.raises(ConfigError, match='shared_group = "site-a"'):
        parse_config(config(workers=2, instance="site-a", sources=[MQTT]))
    cfg = parse_config(config(workers=2, sources=[{**MQTT, "shared_group": "site-a"}, {"type": "dicom"}]))
    assert cfg.workers == 2
    # One process: any port and a plain subscription, as before.
    parse_config(config(sources=[{"type": "mllp", "port": 0}, MQTT]))


@pytest.mark.parametrize(
    ("env", "role"),
    [
        ({}, None),
        ({INDEX_ENV: "1", COUNT_ENV: "2"}, WorkerRole(1, 2)),
        ({INDEX_ENV: "0", COUNT_ENV: "4"}, WorkerRole(0, 4)),
        ({INDEX_ENV: "2", COUNT_ENV: "2"}, None),  # out of range
        ({INDEX_ENV: "0", COUNT_ENV: "1"}, None),  # one worker is the single-process daemon
        ({INDEX_ENV: "x", COUNT_ENV: "2"}, None),
    ],
)
def test_the_role_comes_from_the_supervisors_environment(env: dict[str, str], role: WorkerRole | None) -> None:
    assert current_role(env) == role


class NoSubmit:
    async def submit(self, envelope: Envelope) -> SubmitResult:
        raise AssertionError("not called")


def test_each_worker_has_its_own_mqtt_session(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = MqttSourceConfig.model_validate({**MQTT, "client_id": "gw-site-a"})
    assert MqttSource(cfg, NoSubmit()).client_id == "gw-site-a"
    monkeypatch.setenv(INDEX_ENV, "1")
    monkeypatch.setenv(COUNT_ENV, "2")
    assert MqttSource(cfg, NoSubmit()).client_id == "gw-site-a-w1"
    long = MqttSourceConfig.model_validate({**MQTT, "client_id": "c" * 128})
    client_id = MqttSource(long, NoSubmit()).client_id
    assert len(client_id) == 128 and client_id.endswith("-w1")


def exposition(received: int, worker_build: str) -> str:
    reg = CollectorRegistry()
    Counter("gateway_received_total", "r", ["source"], registry=reg).labels("mllp").inc(received)
    Histogram("gateway_ack_seconds", "a", ["source"], buckets=(0.01, 1.0), registry=reg).labels("mllp").observe(0.5)
    Info("gateway_build", "b", registry=reg).info({"version": worker_build})
    return generate_latest(reg).decode()


def test_the_supervisor_serves_every_workers_metrics_once_with_a_worker_label() -> None:
    text = render({0: exposition(3, "1.0"), 1: exposition(5, "1.0")}).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    received = {s.labels["worker"]: s.value for s in families["gateway_received"].samples if s.name.endswith("_total")}
    assert received == {"0": 3.0, "1": 5.0}
    assert text.count("# TYPE gateway_received_total counter") == 1  # one family, not one per worker
    buckets = [s for s in families["gateway_ack_seconds"].samples if s.name == "gateway_ack_seconds_bucket"]
    assert {(s.labels["worker"], s.labels["le"]) for s in buckets} == {
        (w, le) for w in ("0", "1") for le in ("0.01", "1.0", "+Inf")
    }
    assert {s.labels["worker"] for s in families["gateway_build_info"].samples} == {"0", "1"}
    assert "gateway_workers_ready" in families  # the supervisor's own metrics follow
    # A worker that did not answer is simply absent.
    alone = render({0: exposition(1, "1.0")}).decode()
    assert 'gateway_received_total{source="mllp",worker="0"} 1.0' in alone and "gateway_build_info{version" in alone
    assert 'source="mllp",worker="1"' not in alone


def test_exit_statuses_are_named() -> None:
    assert describe_status(1) == "exit status 1"
    assert describe_status(-9) == "killed by SIGKILL"
