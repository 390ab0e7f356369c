"""Pure parts of delivery: what a FHIR server's answer means, Retry-After, the next attempt's delay, sink
configs."""

from __future__ import annotations

from datetime import UTC, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from pydantic import ValidationError

from adapters.fhir_rest.config import FhirRestConfig
from adapters.fhir_rest.sink import Refused, classify, retry_after, transaction_bundle
from adapters.mllp.forward_config import MllpForwardConfig
from gateway.delivery import MAX_RETRY_AFTER, DeliveryWorker, RetryLater, RetryPolicy
from gateway.errors import PermanentError, TransientError
from gateway.journal import utcnow
from gateway.rules import RuleSet


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify("ehr", status, {}, b"") is None


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_carry_not_before(status: int) -> None:
    err = classify("ehr", status, {"Retry-After": "120"}, b"")
    assert isinstance(err, RetryLater) and isinstance(err, TransientError)
    assert timedelta(seconds=118) < err.not_before - utcnow() <= timedelta(seconds=120)


@pytest.mark.parametrize("status", [408, 500, 502, 504, 599])
def test_other_5xx_and_408_are_transient(status: int) -> None:
    err = classify("ehr", status, {}, b"")
    assert isinstance(err, TransientError) and not isinstance(err, RetryLater)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 412, 422])
def test_other_4xx_are_permanent_with_the_body_as_detail(status: int) -> None:
    err = classify("ehr", status, {}, b'{"resourceType": "OperationOutcome",  "issue": []}')
    assert isinstance(err, Refused) and isinstance(err, PermanentError)
    assert err.detail == '{"resourceType":"OperationOutcome","issue":[]}'
    assert "OperationOutcome" not in str(err)  # the log line never carries the body
    long = classify("ehr", status, {}, b"x" * 10_000)
    assert isinstance(long, Refused) and len(long.detail) == 1500


def test_retry_after_forms() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(None) == 1.0
    assert retry_after("soon") == 1.0
    when = format_datetime((utcnow() + timedelta(seconds=30)).replace(tzinfo=UTC), usegmt=True)
    assert 28 <= retry_after(when) <= 30
    past = format_datetime((utcnow() - timedelta(seconds=30)).replace(tzinfo=UTC), usegmt=True)
    assert retry_after(past) == 0.0


class _Sink:
    name = "ehr"

    async def start(self) -> None: ...

    async def deliver(self, item: Any) -> None: ...

    async def close(self) -> None: ...


def test_next_delay_honours_retry_after_but_not_beyond_an_hour() -> None:
    w = DeliveryWorker(None, _Sink(), RetryPolicy(10, 1.0, 4.0))  # type: ignore[arg-type]
    assert 0.5 <= w.next_delay(1, TransientError("x")) <= 1.0
    later = RetryLater("429", utcnow() + timedelta(seconds=60))
    assert 59 <= w.next_delay(1, later) <= 60
    soon = RetryLater("429", utcnow())
    assert 2.0 <= w.next_delay(3, soon) <= 4.0  # the backoff when it is later than the server's wish
    absurd = RetryLater("429", utcnow() + timedelta(days=3))
    assert w.next_delay(1, absurd) == MAX_RETRY_AFTER


def test_sink_attributes_steer_the_worker() -> None:
    fhir = FhirRestConfig(type="fhir_rest", base_url="https://ehr.example.org/fhir/", concurrency=6).build("ehr")
    w = DeliveryWorker(None, fhir, RetryPolicy())  # type: ignore[arg-type]
    assert (w.ordered, w.concurrency) == (True, 6)
    assert fhir.config.base_url == "https://ehr.example.org/fhir"
    plain = DeliveryWorker(None, _Sink(), RetryPolicy())  # type: ignore[arg-type]
    assert (plain.ordered, plain.concurrency) == (False, 1)


def test_transaction_bundle_matches_the_normalisers_full_urls() -> None:
    from gateway.normalise.hl7v2.bundle import full_url

    b = transaction_bundle([{"resourceType": "Patient", "id": "abc"}])
    assert b["entry"][0]["fullUrl"] == full_url("Patient", "abc")
    assert b["entry"][0]["request"] == {"method": "PUT", "url": "Patient/abc"}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"base_url": "ftp://x"}, "http"),
        ({"base_url": "https://x", "auth": {"type": "bearer"}}, "token_file"),
        (
            {
                "base_url": "https://x",
                "auth": {"type": "oauth2_client_credentials", "token_url": "https://t", "client_id": "c"},
            },
            "client_secret_file",
        ),
        (
            {
                "base_url": "https://x",
                "auth": {
                    "type": "oauth2_client_credentials",
                    "token_url": "https://t",
                    "client_id": "c",
                    "method": "private_key_jwt",
                },
            },
            "private_key",
        ),
        ({"base_url": "https://x", "tls": {"cert": "a.pem"}}, "cert and key"),
        ({"base_url": "https://x", "timeout": 3}, "Extra inputs"),
    ],
)
def test_fhir_rest_config_errors(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FhirRestConfig.model_validate({"type": "fhir_rest", **cfg})


def test_both_sinks_are_in_the_destination_union() -> None:
    rules = RuleSet.model_validate(
        {
            "serial": 1,
            "destinations": {
                "ehr": {"type": "fhir_rest", "base_url": "https://ehr.example.org/fhir"},
                "lis": {"type": "mllp_forward", "host": "lis.example.org", "port": 2575},
            },
            "routes": [{"name": "all", "to": ["ehr", "lis"]}],
        }
    )
    assert isinstance(rules.destinations["lis"], MllpForwardConfig)
    assert isinstance(rules.destinations["ehr"], FhirRestConfig)
