"""Log lines carry the peer and the reason, never patient data."""

from __future__ import annotations

import logging

import pytest

from gateway import telemetry


def _fails_with_patient_data() -> None:
    raise KeyError("EVERYMAN^ADAM")


def test_internal_errors_log_the_type_and_place_but_not_the_exception_text(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_LOG_PHI", raising=False)
    try:
        _fails_with_patient_data()
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, logger="gateway.events"):
            telemetry.internal_error("Mapping failed unexpectedly", exc, peer="10.0.0.1:5")
    (record,) = caplog.records
    text = caplog.text
    assert "EVERYMAN" not in text and record.exc_info is None
    assert "KeyError at test_telemetry.py:" in record.getMessage() and "_fails_with_patient_data" in text
    assert record.__dict__["peer"] == "10.0.0.1:5"


def test_the_operator_can_ask_for_full_tracebacks(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_LOG_PHI", "1")
    try:
        _fails_with_patient_data()
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, logger="gateway.events"):
            telemetry.internal_error("Mapping failed unexpectedly", exc)
    assert "EVERYMAN" in caplog.text  # the traceback, on purpose


def test_a_failing_destination_logs_one_warning_a_summary_a_minute_and_its_recovery(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A destination that is down used to log one WARNING per item and attempt, several a second.
    clock = [1000.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: clock[0])
    dest = "ehr-episode-test"
    with caplog.at_level(logging.DEBUG, logger="gateway.events"):
        for n in range(50):
            telemetry.delivery_retry(dest, f"m{n}", 1, 0.5, "connection refused")
            clock[0] += 0.5
        telemetry.delivered(dest, 3)
        telemetry.delivered(dest, 3)  # no episode open: nothing more
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].startswith(f"Delivery to {dest} is failing: message m0 (attempt 1)")
    # 25 s of failures: no summary yet; one after a minute
    assert len(warnings) == 1
    assert sum(1 for r in caplog.records if r.levelno == logging.DEBUG) == 49
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [f"Delivery to {dest} works again after 50 failure(s) over 25 s."]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.events"):
        for _ in range(130):  # 130 s, one failure a second
            telemetry.delivery_round_failed(dest, "the journal refused the request")
            clock[0] += 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # the first, and a summary at 60 s and at 120 s
    assert "60 in the last minute, 61 in 60 s" in lines[1]
    with caplog.at_level(logging.INFO, logger="gateway.events"):
        telemetry.delivery_round_done(dest)
    assert caplog.records[-1].getMessage() == f"Delivery for {dest} works again after 130 failure(s) over 130 s."
