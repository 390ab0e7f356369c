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
