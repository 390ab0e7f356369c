"""The rule language: match criteria, actions, resource-type restrictions, FHIRPath conditions, dedup rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.contracts import Envelope, InputKind
from gateway.errors import ConfigError
from gateway.ids import uuid7
from gateway.journal import Journal
from gateway.normalise import Prepared
from gateway.pipeline import Pipeline
from gateway.routing import (
    Glob,
    Router,
    decode_restrictions,
    encode_restrictions,
    restrict_bundle,
    topic_matches,
)
from gateway.rules import RuleSet, parse_duration, parse_rules

REPO = Path(__file__).resolve().parents[2]
DESTS = {n: {"type": "sql_store", "url": f"sqlite:///{n}.db"} for n in ("a", "b", "c")}


def router(routes: list[dict[str, Any]], dedup: list[dict[str, Any]] | None = None) -> Router:
    return RuleSet.model_validate({"serial": 1, "destinations": DESTS, "routes": routes, "dedup": dedup or []}).router()


def env(kind: InputKind = InputKind.HL7V2, source: str = "s") -> Envelope:
    return Envelope(uuid7(), source, kind, datetime.now(UTC), b"", "127.0.0.1:1")


def bundle(*types: str, **patient: Any) -> dict[str, Any]:
    entries = [{"resource": {"resourceType": t, "id": f"{t}-1", **(patient if t == "Patient" else {})}} for t in types]
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def prep(message_type: str = "ADT^A01", b: dict[str, Any] | None = None, **meta: str) -> Prepared:
    return Prepared(message_type, meta.pop("control_id", "C1"), dict(meta), b, None)


@pytest.mark.parametrize(
    ("filt", "topic", "ok"),
    [
        ("devices/+/observations", "devices/d1/observations", True),
        ("devices/+/observations", "devices/a/b/observations", False),
        ("devices/#", "devices/a/b/c", True),
        ("devices/#", "devices", True),
        ("#", "anything/at/all", True),
        ("#", "$SYS/broker/load", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
    ],
)
def test_mqtt_topic_filters(filt: str, topic: str, ok: bool) -> None:
    assert topic_matches(filt, topic) is ok


def test_globs_are_anchored_and_case_sensitive() -> None:
    g = Glob(["CT_*", "MR1"])
    assert g("CT_ROOM1") and g("MR1") and not g("XCT_1") and not g("ct_room1") and not g("MR12")


@pytest.mark.parametrize(
    ("types", "message_type", "ok"),
    [
        (["ADT^A0*"], "ADT^A04", True),
        (["ADT^A0*"], "ADT^A11", False),
        (["ADT"], "ADT^A11", True),
        (["ADT"], "ADTX^A01", False),
        (["*^R01"], "ORU^R01", True),
        (["DICOM^*"], "DICOM^CT", True),
        (["DICOM^*"], "DICOM-KEPT^CT", False),
    ],
)
def test_message_type_globs(types: list[str], message_type: str, ok: bool) -> None:
    r = router([{"name": "r", "match": {"message_types": types}, "to": ["a"]}])
    assert (r.route(env(), prep(message_type)).destinations == ("a",)) is ok


def test_dicom_criteria_read_the_normalisers_meta() -> None:
    r = router(
        [{"name": "ct", "match": {"calling_ae": ["CT_*"], "called_ae": ["GW"], "modalities": ["CT"]}, "to": ["a"]}]
    )
    e = env(InputKind.DICOM)
    assert r.route(e, prep("DICOM^CT", calling_ae="CT_1", called_ae="GW", modality="CT")).destinations == ("a",)
    assert r.route(e, prep("DICOM^CT", calling_ae="CT_1", called_ae="OTHER", modality="CT")).destinations == ()
    assert r.route(e, prep("DICOM^MR", calling_ae="CT_1", called_ae="GW", modality="MR")).destinations == ()
    assert r.route(e, prep("DICOM^CT")).destinations == ()  # no meta at all: no match


def test_generic_meta_criteria() -> None:
    r = router([{"name": "test", "match": {"meta": {"processing_id": ["T", "D"]}}, "action": "drop"}])
    assert r.route(env(), prep(processing_id="T")).action == "drop"
    assert r.route(env(), prep(processing_id="P")).action == "deliver"


def test_resource_type_criterion_and_restriction() -> None:
    r = router(
        [
            {"name": "all", "match": {"resource_types": ["Patient"]}, "to": ["a"]},
            {
                "name": "obs",
                "match": {"resource_types": ["Observation"]},
                "to": ["b"],
                "resource_types": ["Observation"],
            },
        ]
    )
    d = r.route(env(), prep(b=bundle("Patient", "Observation", "Provenance")))
    assert d.destinations == ("a", "b") and d.routes == ("all", "obs")
    assert d.resource_types == {"b": frozenset({"Observation"})}
    assert r.route(env(), prep(b=bundle("Encounter"))).destinations == ()
    assert r.route(env(), prep(b=None)).destinations == ()


def test_restrictions_of_two_routes_to_one_destination_combine_and_no_restriction_wins() -> None:
    r = router(
        [
            {"name": "p", "to": ["a"], "resource_types": ["Patient"]},
            {"name": "o", "to": ["a"], "resource_types": ["Observation"]},
            {"name": "b-some", "to": ["b"], "resource_types": ["Patient"]},
            {"name": "b-all", "to": ["b"]},
        ]
    )
    d = r.route(env(), prep(b=bundle("Patient")))
    assert d.resource_types == {"a": frozenset({"Patient", "Observation"})}


def test_drop_and_quarantine_end_evaluation_and_override_earlier_destinations() -> None:
    routes = [
        {"name": "first", "to": ["a"]},
        {"name": "legacy", "match": {"sources": ["old"]}, "action": "quarantine", "reason": "retired feed"},
        {"name": "noise", "match": {"message_types": ["ACK"]}, "action": "drop"},
        {"name": "later", "to": ["b"]},
    ]
    r = router(routes)
    q = r.route(env(source="old"), prep())
    assert (q.action, q.destinations, q.reason, q.routes) == ("quarantine", (), "retired feed", ("first", "legacy"))
    dr = r.route(env(), prep("ACK"))
    assert (dr.action, dr.destinations, dr.reason) == ("drop", (), "route noise")
    assert r.route(env(), prep()).destinations == ("a", "b")


def test_stop_ends_evaluation_after_a_deliver_route() -> None:
    r = router([{"name": "x", "match": {"kinds": ["dicom"]}, "to": ["c"], "stop": True}, {"name": "y", "to": ["a"]}])
    assert r.route(env(InputKind.DICOM), prep("DICOM^CT")).destinations == ("c",)
    assert r.route(env(), prep()).destinations == ("a",)


def test_fhirpath_conditions() -> None:
    r = router(
        [
            {
                "name": "female",
                "match": {"condition": "Bundle.entry.resource.ofType(Patient).gender = 'female'"},
                "to": ["a"],
            },
            {"name": "has-obs", "match": {"condition": "Bundle.entry.resource.ofType(Observation)"}, "to": ["b"]},
        ]
    )
    assert r.route(env(), prep(b=bundle("Patient", gender="female"))).destinations == ("a",)
    assert r.route(env(), prep(b=bundle("Patient", gender="male"))).destinations == ()
    assert r.route(env(), prep(b=bundle("Patient", "Observation"))).destinations == ("b",)
    assert r.route(env(), prep(b=None)).destinations == ()  # a condition never holds for an unmapped message


def test_a_bad_fhirpath_expression_is_refused_at_load_naming_the_route() -> None:
    text = (
        "serial: 1\ndestinations: {}\nroutes:\n  - {name: r, match: {condition: 'Bundle.entry.where('}, action: drop}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_rules(text, "rules.yaml")
    assert info.value.path == "routes[0].match.condition" and "FHIRPath" in info.value.reason


def test_a_fhirpath_error_at_run_time_counts_as_false(caplog: pytest.LogCaptureFixture) -> None:
    r = router(
        [{"name": "r", "match": {"condition": "Bundle.entry.resource.ofType(Patient).birthDate + 1"}, "to": ["a"]}]
    )
    d = r.route(env(), prep(b=bundle("Patient", birthDate="1970-01-01")))
    assert d.destinations == ()


@pytest.mark.parametrize(
    ("route", "error"),
    [
        ({"name": "r", "action": "deliver"}, "needs `to`"),
        ({"name": "r", "action": "drop", "to": ["a"]}, "takes no `to`"),
        ({"name": "r", "to": ["zz"]}, "unknown destination 'zz'"),
        ({"name": "r", "match": {"topics": ["a/#/b"]}, "to": ["a"]}, "must be the last level"),
        ({"name": "r", "match": {"topics": ["a+/b"]}, "to": ["a"]}, "not an MQTT topic filter"),
    ],
)
def test_invalid_routes(route: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules(yaml.safe_dump({"serial": 1, "destinations": DESTS, "routes": [route]}), "r.yaml")
    assert error in str(info.value)


def test_route_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="used twice"):
        parse_rules(
            yaml.safe_dump({"serial": 1, "destinations": DESTS, "routes": [{"name": "x", "to": ["a"]}] * 2}), "r"
        )


# -- dedup rules -----------------------------------------------------------------------------------------------


def test_the_first_applicable_dedup_rule_gives_key_and_window() -> None:
    r = router(
        [],
        [
            {
                "name": "lab",
                "match": {"sources": ["lab"]},
                "key": "{meta.sending_facility}|{control_id}",
                "window": "24h",
            },
            {"name": "dicom", "match": {"kinds": ["dicom"]}, "key": "{control_id}", "window": "30d"},
        ],
    )
    d = r.route(env(source="lab"), prep(sending_facility="HOSP", control_id="42"))
    assert (d.dedup_key, d.dedup_window, d.dedup_rule) == ("lab|HOSP|42", timedelta(hours=24), "lab")
    d = r.route(env(InputKind.DICOM), prep("DICOM^CT", control_id="1.2.3"))
    assert (d.dedup_key, d.dedup_window) == ("dicom|1.2.3", timedelta(days=30))
    # no rule applies: the normaliser's key with the daemon's default window
    p = Prepared("ADT^A01", "C1", {}, None, "hl7v2|default")
    d = r.route(env(source="other"), p)
    assert (d.dedup_key, d.dedup_window, d.dedup_rule) == ("hl7v2|default", None, "")


def test_a_dedup_rule_with_an_empty_field_does_not_apply() -> None:
    r = router([], [{"name": "f", "key": "{meta.sending_facility}|{control_id}", "window": 60}])
    d = r.route(env(), Prepared("ADT^A01", "C1", {"sending_facility": ""}, None, "fallback"))
    assert d.dedup_key == "fallback" and d.dedup_window is None


def test_long_dedup_keys_are_shortened_but_stay_distinct() -> None:
    r = router([], [{"name": "f", "key": "{control_id}", "window": 60}])
    k1 = r.route(env(), prep(control_id="x" * 300)).dedup_key
    k2 = r.route(env(), prep(control_id="x" * 299 + "y")).dedup_key
    assert k1 and k2 and len(k1) <= 200 and len(k2) <= 200 and k1 != k2


@pytest.mark.parametrize(
    ("key", "error"), [("static", "at least one"), ("{nope}", "unknown field {nope}"), ("{meta.}", "unknown field")]
)
def test_invalid_key_templates(key: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_rules(
            yaml.safe_dump(
                {"serial": 1, "destinations": {}, "routes": [], "dedup": [{"name": "d", "key": key, "window": 1}]}
            ),
            "r",
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("24h", 86400.0), ("7d", 604800.0), ("1.5h", 5400.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "-1h", "1w", "soon"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- what the pipeline makes of a decision ---------------------------------------------------------------------

ADT = (REPO / "tests/data/adt_a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def pipeline(routes: list[dict[str, Any]], dedup: list[dict[str, Any]] | None = None) -> Pipeline:
    return Pipeline(Journal("sqlite:///:memory:"), router(routes, dedup))


def test_a_drop_route_commits_the_message_as_dropped_delivered_nowhere() -> None:
    rec = pipeline(
        [{"name": "a", "to": ["a"]}, {"name": "no-adt", "match": {"message_types": ["ADT"]}, "action": "drop"}]
    ).prepare(env_with(ADT))
    assert rec.status == "dropped" and list(rec.destinations) == [] and rec.fhir is not None
    assert rec.error == "route no-adt" and rec.dedup_key


def test_a_quarantine_route_commits_the_message_as_quarantined_with_its_reason() -> None:
    rec = pipeline([{"name": "q", "action": "quarantine", "reason": "feed retired"}]).prepare(env_with(ADT))
    assert rec.status == "quarantined" and list(rec.destinations) == []
    assert rec.error == "quarantined by rule: feed retired" and rec.reject_code == "unsupported-type"
    assert rec.message_type == "ADT^A01"


def test_the_pipeline_carries_the_dedup_window_and_restrictions_into_the_record() -> None:
    rec = pipeline(
        [{"name": "p", "to": ["a"], "resource_types": ["Patient"]}],
        [{"name": "hl7", "key": "{meta.sending_facility}|{control_id}", "window": "24h"}],
    ).prepare(env_with(ADT))
    assert rec.dedup_key == "hl7|HOSP|MSG-QS-0001" and rec.dedup_window == timedelta(hours=24)
    assert decode_restrictions(rec.meta["route.resource_types"]) == {"a": frozenset({"Patient"})}
    only = restrict_bundle(orjson.dumps(rec.meta).decode(), "a", rec.fhir)
    assert only is not None
    assert {e["resource"]["resourceType"] for e in orjson.loads(only)["entry"]} == {"Patient"}
    assert restrict_bundle(orjson.dumps(rec.meta).decode(), "b", rec.fhir) is rec.fhir  # not restricted there


def test_a_restricted_bundle_keeps_only_provenance_targets_it_delivers() -> None:
    rec = pipeline([{"name": "p", "to": ["a"], "resource_types": ["Patient", "Provenance"]}]).prepare(env_with(ADT))
    full = orjson.loads(rec.fhir or b"{}")
    prov = [e["resource"] for e in full["entry"] if e["resource"]["resourceType"] == "Provenance"]
    assert prov and len(prov[0]["target"]) > 1  # the message's Provenance names more than the Patient
    only = orjson.loads(restrict_bundle(orjson.dumps(rec.meta).decode(), "a", rec.fhir) or b"{}")
    patient = next(e["resource"] for e in only["entry"] if e["resource"]["resourceType"] == "Patient")
    (kept,) = [e["resource"] for e in only["entry"] if e["resource"]["resourceType"] == "Provenance"]
    assert [t["reference"] for t in kept["target"]] == [f"Patient/{patient['id']}"]
    rec = pipeline([{"name": "p", "to": ["a"], "resource_types": ["Encounter", "Provenance"]}]).prepare(
        env_with(ADT.replace(b"PV1|", b"ZZ1|"))
    )
    only = orjson.loads(restrict_bundle(orjson.dumps(rec.meta).decode(), "a", rec.fhir) or b"{}")
    assert only["entry"] == []  # no Encounter, so the Provenance would point at nothing: dropped


def test_restrictions_round_trip() -> None:
    r = {"a": frozenset({"Patient", "Encounter"}), "b": frozenset({"Observation"})}
    assert decode_restrictions(encode_restrictions(r)) == r


def env_with(payload: bytes) -> Envelope:
    return Envelope(uuid7(), "mllp", InputKind.HL7V2, datetime.now(UTC), payload, "127.0.0.1:9")


def test_the_header_cache_is_bounded_and_routing_stays_right_past_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.routing

    monkeypatch.setattr(gateway.routing, "CACHE_MAX", 2)
    r = router([{"name": "adt", "match": {"message_types": ["ADT"]}, "to": ["a"]}, {"name": "all", "to": ["b"]}])
    for i in range(5):
        assert r.route(env(), prep(f"ADT^A{i:02d}")).destinations == ("a", "b")
        assert r.route(env(), prep(f"ORU^R{i:02d}")).destinations == ("b",)
    assert len(r._cache) == 2
