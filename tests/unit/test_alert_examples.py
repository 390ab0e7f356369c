"""The example alerting rules only name metrics the gateway exports, so they cannot silently go stale when a
metric is renamed (an alert on a metric that no longer exists never fires)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import gateway.telemetry  # noqa: F401  (registers the gateway's metrics)

ALERTS = Path(__file__).parents[2] / "docs" / "examples" / "prometheus-alerts.yml"


def exported_samples() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_every_metric_in_the_example_alerts_is_exported() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for group in doc["groups"] for r in group["rules"]]
    assert len(rules) >= 8
    exported = exported_samples()
    for rule in rules:
        for name in re.findall(r"\bgateway_[a-z_]+", rule["expr"]):
            assert name in exported, f"{rule['alert']}: {name} is not a metric of the gateway"
