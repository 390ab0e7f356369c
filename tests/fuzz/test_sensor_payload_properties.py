"""Property test of the MQTT payload parser, the input a rogue device reaches: any bytes, and valid payloads with
any part replaced by any JSON value, are mapped or rejected, and patient data put anywhere under ``patient`` is
echoed by no reason and no meta; nothing else escapes (an exception other than Rejected would fail at the
per-message boundary instead)."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.normalise import Prepared, Rejected
from gateway.normalise.sensors import SensorNormaliser
from tests.unit.test_sensor_normaliser import envelope, v1

SENTINEL = "Zq7Sentinel"  # a value no reason may echo (it stands for a patient name or identifier)

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20).map(lambda t: SENTINEL + t),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def encode(value: Any) -> bytes:
    """json, not orjson: a device may send integers past 64 bits and Infinity, and orjson cannot write them."""
    return json.dumps(value).encode()


def check(payload: bytes, phi: bool) -> None:
    """``phi``: the sentinel stands where patient data goes; no reason and no meta may then carry it (device
    ids, message ids and vital-sign codes are not patient data and may be echoed)."""
    try:
        result = SensorNormaliser().prepare(envelope(payload))
    except Rejected as rej:
        assert rej.reason, "a rejection states its reason"
        assert not phi or SENTINEL not in rej.reason, "the reason echoes patient data"
        return
    assert isinstance(result, Prepared)
    assert not phi or SENTINEL not in orjson.dumps(result.meta).decode(), "meta holds patient data"


@settings(max_examples=400, deadline=None)
@given(data=st.data(), value=_json)
def test_a_valid_payload_with_any_part_replaced_is_mapped_or_rejected(data: st.DataObject, value: Any) -> None:
    doc = v1()
    path = data.draw(st.sampled_from(paths(doc)))
    check(encode(replace(doc, path, value)), phi=path[:1] == ("patient",))


@settings(max_examples=300, deadline=None)
@given(payload=st.one_of(st.binary(max_size=300), _json.map(lambda v: encode(v))))
def test_any_payload_is_mapped_or_rejected(payload: bytes) -> None:
    check(payload, phi=False)
