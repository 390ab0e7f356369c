"""MQTT source and publish configs: validation is pure and names the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.mqtt.config import MqttPublishConfig, MqttSourceConfig
from gateway.config import parse_config
from gateway.errors import ConfigError


def source(**kw: object) -> MqttSourceConfig:
    return MqttSourceConfig.model_validate({"type": "mqtt", **kw})


def test_defaults_make_a_persistent_qos1_subscription() -> None:
    cfg = source(name="mqtt-main")
    assert cfg.subscriptions() == ["devices/+/observations"]
    assert cfg.session_expiry_seconds > 0 and cfg.receive_maximum == 1000
    assert cfg.identifier("mqtt-main").startswith("hl7-gateway-") and cfg.identifier("mqtt-main").endswith("mqtt-main")
    assert source(client_id="gw-1").identifier("x") == "gw-1"


def test_a_shared_group_prefixes_every_filter() -> None:
    cfg = source(topics=["a/+/b", "c/#"], shared_group="gateways")
    assert cfg.subscriptions() == ["$share/gateways/a/+/b", "$share/gateways/c/#"]


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", "", "$share/g/a"])
def test_bad_topic_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        source(topics=[bad])


@pytest.mark.parametrize(
    "kw",
    [{"shared_group": "a/b"}, {"password": "x"}, {"username": "u", "password": "x", "password_file": "/p"},
     {"receive_maximum": 0}, {"port": 0}, {"qos": 0}],
)  # fmt: skip
def test_bad_source_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        source(**kw)


def test_the_publish_topic_template_knows_its_fields() -> None:
    assert MqttPublishConfig(type="mqtt_publish").topic == "fhir/{resource_type}/{resource_id}"
    with pytest.raises(ValueError, match="unknown topic field"):
        MqttPublishConfig(type="mqtt_publish", topic="x/{patient}")
    with pytest.raises(ValueError, match="per_resource"):
        MqttPublishConfig(type="mqtt_publish", mode="bundle", topic="x/{resource_id}")
    with pytest.raises(ValueError, match="wildcards"):
        MqttPublishConfig(type="mqtt_publish", topic="x/#")


def test_the_daemon_config_accepts_an_mqtt_source_and_names_a_bad_key(tmp_path: Path) -> None:
    base = {"rules": "rules.yaml", "sources": [{"type": "mqtt", "name": "m", "topics": ["d/+/o"]}]}
    cfg = parse_config(base)
    assert isinstance(cfg.sources[0], MqttSourceConfig)
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "sources": [{"type": "mqtt", "name": "m", "receive_maximum": 0}]})
    assert "sources[0].receive_maximum" in str(info.value)
