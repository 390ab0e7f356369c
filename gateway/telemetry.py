"""Every metric and its log line come from one function here, so they cannot drift apart.

Metric names are ``gateway_<noun>_<unit>_total`` with bounded labels (source and destination names come from
configuration, kinds and statuses from fixed sets). Log lines name the peer and the reason, never message
content: patient data does not enter logs.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, Info

from gateway.contracts import InputKind, RejectCode

log = logging.getLogger("gateway.events")

BUILD = Info("gateway_build", "Version of the running gateway.")
RECEIVED = Counter("gateway_received_total", "Messages received (complete frames), before any check.", ["source"])
ACKS = Counter("gateway_acks_total", "Acknowledgements sent, by code (AA, AE, AR).", ["source", "code"])
COMMIT_SECONDS = Histogram(
    "gateway_journal_commit_seconds",
    "Duration of one group commit (one transaction, one fsync).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0),
)
GROUP_SIZE = Histogram(
    "gateway_journal_group_size", "Messages per group commit.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 512)
)
OUTBOX_DEPTH = Gauge("gateway_outbox_pending", "Outbox items waiting for delivery.", ["destination"])
OUTBOX_OLDEST = Gauge(
    "gateway_outbox_oldest_seconds", "Age of the oldest outbox item waiting for delivery.", ["destination"]
)
MESSAGES = Counter("gateway_messages_total", "Messages committed to the journal.", ["source", "kind", "status"])
DUPLICATES = Counter("gateway_duplicates_total", "Resent messages recognised by their dedup key.", ["source"])
REJECTED = Counter("gateway_rejected_total", "Messages quarantined and answered negatively.", ["source", "code"])
JOURNAL_ERRORS = Counter(
    "gateway_journal_errors_total",
    "Messages that could not be committed (answered with a transient error).",
    ["source"],
)
CONNECTIONS = Counter("gateway_connections_total", "Connections accepted.", ["source"])
CONNECTIONS_REFUSED = Counter(
    "gateway_connections_refused_total", "Connections closed at once (limit reached).", ["source"]
)
OPEN_CONNECTIONS = Gauge("gateway_open_connections", "Connections open now.", ["source"])
# Labelled so that the series exists only where a delivery child is managed: inline delivery and the workers
# that do not deliver export none, and an alert on "== 0" does not fire for them.
DELIVERY_PROCESS_UP = Gauge(
    "gateway_delivery_process_up",
    "1 while the delivery child process runs, 0 while it is being restarted.",
    ["isolation"],
)
PROTOCOL_ERRORS = Counter(
    "gateway_protocol_errors_total",
    "Framing problems: oversized frames, bytes outside frames, idle timeouts.",
    ["source", "reason"],
)
ACK_SECONDS = Histogram(
    "gateway_ack_seconds",
    "From the last byte of a message to its acknowledgement being written.",
    ["source"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)
DELIVERED = Counter("gateway_delivered_total", "Outbox items delivered.", ["destination"])
DELIVERY_RETRIES = Counter("gateway_delivery_retries_total", "Delivery attempts that will be retried.", ["destination"])
DEAD_LETTERS = Counter("gateway_dead_letters_total", "Outbox items moved to the dead-letter state.", ["destination"])


# Set in the delivery child process (gateway/deliveryproc.py): delivery counters are sent to the parent, whose
# /metrics serves them. The child still logs its own lines.
forward: Callable[[str, str, float], None] | None = None

# Set by the daemon when an audit trail is configured: audit(action, **fields) records an event without blocking.
audit: Callable[..., None] | None = None

# [telemetry] log_phi: may log lines contain message content? Off unless the operator says so by name.
log_phi = False

_FORWARDED = {"delivered": DELIVERED, "retry": DELIVERY_RETRIES, "dead": DEAD_LETTERS}


def apply_forwarded(event: str, destination: str, value: float) -> None:
    """In the parent: count a delivery event reported by the child."""
    counter = _FORWARDED.get(event)
    if counter is not None and value >= 0:
        counter.labels(destination).inc(value)


def _count(event: str, destination: str, value: float = 1.0) -> None:
    if forward is not None:
        forward(event, destination, value)
    else:
        _FORWARDED[event].labels(destination).inc(value)


def internal_error(what: str, exc: BaseException, **context: str) -> None:
    """Log a bug caught at a per-message or supervisor boundary. Only the exception type and the code
    locations are logged, never the exception's text or local values: a KeyError or a ValueError raised while
    mapping can carry a patient's name. ``[telemetry] log_phi = true`` (or GATEWAY_LOG_PHI=1 in the environment)
    logs full tracebacks while debugging."""
    if log_phi or os.environ.get("GATEWAY_LOG_PHI") == "1":
        log.error("%s: %s", what, type(exc).__name__, exc_info=exc, extra=context)
        return
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)) or "unknown"
    log.error("%s: %s at %s.", what, type(exc).__name__, where, extra={**context, "error": type(exc).__name__})


def peer_name(host: object, port: object) -> str:
    """How log lines and audit records name a peer: ``host:port``, ``[v6 address]:port``."""
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def connection_opened(source: str, peer: str) -> None:
    if audit is not None:
        audit("connection.open", source=source, peer=peer)
    CONNECTIONS.labels(source).inc()
    OPEN_CONNECTIONS.labels(source).inc()
    log.debug("Accepted a connection from %s on %s.", peer, source, extra={"source": source, "peer": peer})


def connection_closed(source: str, peer: str, reason: str) -> None:
    if audit is not None:
        audit("connection.close", source=source, peer=peer, reason=reason)
    OPEN_CONNECTIONS.labels(source).dec()
    log.debug(
        "Closed the connection from %s on %s: %s.",
        peer,
        source,
        reason,
        extra={"source": source, "peer": peer, "reason": reason},
    )


def connection_refused(source: str, peer: str, limit: int) -> None:
    if audit is not None:
        audit("connection.refused", source=source, peer=peer, reason=f"limit of {limit} reached")
    CONNECTIONS_REFUSED.labels(source).inc()
    log.warning(
        "Refused a connection from %s on %s: the limit of %d connections is reached.",
        peer,
        source,
        limit,
        extra={"source": source, "peer": peer},
    )


def protocol_error(source: str, peer: str, reason: str, detail: str) -> None:
    """reason: a fixed token (too-large, garbage, idle-timeout, reset); detail: PHI-free text."""
    PROTOCOL_ERRORS.labels(source, reason).inc()
    log.warning(
        "Protocol problem with %s on %s: %s.",
        peer,
        source,
        detail,
        extra={"source": source, "peer": peer, "reason": reason},
    )


# Labelled children of the per-message metrics, looked up once: ``labels()`` takes a lock and builds a key on
# every call, several times per message. Their labels come from configuration and fixed sets, so these stay small.
_received: dict[str, Counter] = {}
_acks: dict[tuple[str, str], Counter] = {}
_ack_seconds: dict[str, Histogram] = {}
_messages: dict[tuple[str, str, str], Counter] = {}


def received(source: str) -> None:
    child = _received.get(source)
    if child is None:
        child = _received[source] = RECEIVED.labels(source)
    child.inc()


def acked(source: str, seconds: float, code: str = "AA") -> None:
    hist = _ack_seconds.get(source)
    if hist is None:
        hist = _ack_seconds[source] = ACK_SECONDS.labels(source)
    hist.observe(seconds)
    child = _acks.get((source, code))
    if child is None:
        child = _acks[(source, code)] = ACKS.labels(source, code)
    child.inc()


def group_committed(size: int, seconds: float) -> None:
    GROUP_SIZE.observe(size)
    COMMIT_SECONDS.observe(seconds)


JOURNAL_LOCK_CONFLICTS = Counter(
    "gateway_journal_lock_conflicts_total",
    "Group commits the database aborted for a lock conflict with another transaction (MySQL deadlock 1213, lock "
    "wait timeout 1205), by outcome: retried, or given up (the senders were told to resend).",
    ["code", "outcome"],
)


def journal_lock_conflict(code: int, attempt: int, size: int, retry_in: float | None) -> None:
    """A group commit lost a lock conflict (several instances, or a claim beside a commit, on one MySQL)."""
    JOURNAL_LOCK_CONFLICTS.labels(str(code), "retried" if retry_in is not None else "gave_up").inc()
    if retry_in is not None:
        log.info(
            "The database aborted a group commit of %d messages for a lock conflict (%d); retry %d in %.0f ms.",
            size,
            code,
            attempt,
            retry_in * 1000,
            extra={"code": code, "attempt": attempt},
        )
    else:
        log.warning(
            "A group commit of %d messages lost a lock conflict (%d) %d times; giving up on it.",
            size,
            code,
            attempt,
            extra={"code": code, "attempt": attempt},
        )


def outbox_state(destination: str, pending: int, oldest_seconds: float) -> None:
    OUTBOX_DEPTH.labels(destination).set(pending)
    OUTBOX_OLDEST.labels(destination).set(oldest_seconds)


def committed(source: str, kind: InputKind, status: str) -> None:
    child = _messages.get((source, kind, status))
    if child is None:
        child = _messages[(source, kind, status)] = MESSAGES.labels(source, kind.value, status)
    child.inc()


def duplicate(source: str, kind: InputKind, peer: str) -> None:
    DUPLICATES.labels(source).inc()
    # A broker redelivers every unacknowledged reading after a reconnect, by the hundred: counted, not logged
    # one by one. An HL7 or DICOM resend is a sender's decision worth a line.
    log.log(
        logging.DEBUG if kind is InputKind.MQTT else logging.INFO,
        "Acknowledged a resent %s message from %s on %s without processing it again.",
        kind.value,
        peer,
        source,
        extra={"source": source, "peer": peer},
    )


def quarantined(source: str, peer: str, code: RejectCode, reason: str) -> None:
    REJECTED.labels(source, code.value).inc()
    log.warning(
        "Quarantined a message from %s on %s: %s (%s). The raw bytes are kept in the journal for replay.",
        peer,
        source,
        reason,
        code.value,
        extra={"source": source, "peer": peer, "reason": code.value},
    )


STORAGE_ERRORS = Counter(
    "gateway_storage_errors_total",
    "DICOM instances answered 0xA700 because their file or their study index record could not be written "
    "(the journal was not involved: see gateway_journal_errors_total for that).",
    ["source", "store"],
)


def storage_failed(source: str, store: str, reason: str) -> None:
    """``store``: "file" (the instance's file under storage_dir) or "index" (the study index)."""
    STORAGE_ERRORS.labels(source, store).inc()
    what = "its file" if store == "file" else "its study index record"
    log.error(
        "Could not write %s for an instance on %s; the sender is told to resend (0xA700): %s.",
        what,
        source,
        reason,
        extra={"source": source, "reason": f"storage-{store}"},
    )


def journal_failed(source: str, reason: str) -> None:
    JOURNAL_ERRORS.labels(source).inc()
    log.error(
        "Could not commit a message from %s to the journal; the sender is told to resend: %s.",
        source,
        reason,
        extra={"source": source},
    )


def delivered(destination: str, n: int) -> None:
    if n:
        _count("delivered", destination, n)
        if _episodes:
            _recovered("retry", destination, "Delivery to")


# A destination that is down fails every item it is offered, several times a second: one WARNING per item and
# attempt buried the log at the moment an operator reads it. A failure now opens an "episode" per destination
# (and one per destination for failed rounds, when the journal cannot be reached): its first failure is a WARNING,
# later ones are DEBUG and summarised in one WARNING a minute, and the first success ends it with an INFO line.
# Every failure is still counted (gateway_delivery_retries_total). Dead letters stay one ERROR each.
SUMMARY_INTERVAL = 60.0


@dataclass(slots=True)
class _Episode:
    since: float
    summarised: float
    failures: int = 1
    since_summary: int = 0
    reason: str = ""


_episodes: dict[tuple[str, str], _Episode] = {}


def _failed(kind: str, destination: str, reason: str) -> _Episode | None:
    """Count a failure in the destination's episode; the episode when one was already open, else None (new)."""
    now = time.monotonic()
    episode = _episodes.get((kind, destination))
    if episode is None:
        _episodes[(kind, destination)] = _Episode(since=now, summarised=now, reason=reason)
        return None
    episode.failures += 1
    episode.since_summary += 1
    episode.reason = reason
    return episode


def _summarise(episode: _Episode, lead: str, unit: str, destination: str, reason: str) -> None:
    """The episode's WARNING of the last minute, once a minute."""
    now = time.monotonic()
    if now - episode.summarised < SUMMARY_INTERVAL:
        return
    episode.summarised = now
    log.warning(
        "%s: %d%s in the last minute, %d in %.0f s; the last: %s.",
        lead,
        episode.since_summary,
        unit,
        episode.failures,
        now - episode.since,
        reason,
        extra={"destination": destination},
    )
    episode.since_summary = 0


def delivery_retry(destination: str, message_id: str, attempt: int, delay: float, reason: str) -> None:
    _count("retry", destination)
    extra = {"destination": destination, "message_id": message_id}
    episode = _failed("retry", destination, reason)
    if episode is None:
        log.warning(
            "Delivery to %s is failing: message %s (attempt %d) is retried in %.1f s: %s. Further failures are "
            "counted in gateway_delivery_retries_total and summarised here once a minute until one succeeds.",
            destination,
            message_id,
            attempt,
            delay,
            reason,
            extra=extra,
        )
        return
    log.debug(
        "Delivery of message %s to %s failed (attempt %d); retrying in %.1f s: %s.",
        message_id,
        destination,
        attempt,
        delay,
        reason,
        extra=extra,
    )
    _summarise(episode, f"Delivery to {destination} is still failing", " failed attempts", destination, reason)


def _recovered(kind: str, destination: str, what: str) -> None:
    episode = _episodes.pop((kind, destination), None)
    if episode is not None:
        log.info(
            "%s %s works again after %d failure(s) over %.0f s.",
            what,
            destination,
            episode.failures,
            time.monotonic() - episode.since,
            extra={"destination": destination},
        )


def dead_lettered(destination: str, message_id: str, reason: str) -> None:
    _count("dead", destination)
    log.error(
        "Gave up delivering message %s to %s; it is a dead letter now: %s.",
        message_id,
        destination,
        reason,
        extra={"destination": destination, "message_id": message_id},
    )


def delivery_round_failed(destination: str, reason: str) -> None:
    episode = _failed("round", destination, reason)
    if episode is None:
        log.warning(
            "Delivery rounds for %s fail and are repeated: %s. Summarised here once a minute until one succeeds.",
            destination,
            reason,
            extra={"destination": destination},
        )
    else:
        _summarise(episode, f"Delivery rounds for {destination} still fail", "", destination, reason)


def delivery_round_done(destination: str) -> None:
    """A round ran (whatever its items' outcomes): ends a failed-rounds episode."""
    if _episodes:
        _recovered("round", destination, "Delivery for")


# -- limits and TLS (issue #9) ----------------------------------------------------------------------------------

LIMIT_HITS = Counter(
    "gateway_limit_hits_total",
    "Times a limit ended a connection or refused input: address-not-allowed, max-connections, "
    "pending-handshakes, per-peer-connections, idle-timeout, read-timeout, write-timeout, handshake-timeout, "
    "frame-size, dataset-size.",
    ["source", "limit"],
)
TLS_REFUSED = Counter(
    "gateway_tls_refused_total",
    "TLS connections refused: handshake-failed (no or untrusted or expired client certificate, protocol "
    "mismatch), handshake-timeout, not-allowed (a verified certificate not on the allow-list).",
    ["source", "reason"],
)


def limit_counted(source: str, limit: str) -> None:
    """Count a limit that an existing event already logged (connection_refused, protocol_error)."""
    LIMIT_HITS.labels(source, limit).inc()


def limit_hit(source: str, peer: str, limit: str, detail: str) -> None:
    """limit: a fixed token (see LIMIT_HITS); detail: PHI-free text naming the limit's value."""
    LIMIT_HITS.labels(source, limit).inc()
    log.warning(
        "Limit %s reached for %s on %s: %s.",
        limit,
        peer,
        source,
        detail,
        extra={"source": source, "peer": peer, "reason": limit},
    )


def tls_refused(source: str, peer: str, reason: str, detail: str) -> None:
    """reason: handshake-failed, handshake-timeout or not-allowed; detail: the TLS library's reason or the
    certificate subject (a device identity, not patient data)."""
    if audit is not None:
        audit("connection.tls_refused", source=source, peer=peer, reason=f"{reason}: {detail}")
    TLS_REFUSED.labels(source, reason).inc()
    log.warning(
        "Refused a TLS connection from %s on %s (%s): %s.",
        peer,
        source,
        reason,
        detail,
        extra={"source": source, "peer": peer, "reason": reason},
    )


def tls_accepted(source: str, peer: str, version: str, subject: str) -> None:
    log.debug(
        "TLS %s with %s on %s, client certificate: %s.",
        version,
        peer,
        source,
        subject or "none",
        extra={"source": source, "peer": peer},
    )


# -- MQTT (adapters/mqtt) ----------------------------------------------------------------------------------------

MQTT_CONNECTED = Gauge("gateway_mqtt_connected", "1 while the MQTT client is connected to its broker.", ["source"])
MQTT_CONNECT_FAILURES = Counter(
    "gateway_mqtt_connect_failures_total", "Lost or failed broker connections (each followed by a retry).", ["source"]
)
MQTT_INFLIGHT = Gauge(
    "gateway_mqtt_inflight", "Readings received from the broker and not yet acknowledged (PUBACK).", ["source"]
)
MQTT_BEHIND = Counter(
    "gateway_mqtt_behind_total",
    "Times the in-flight window stayed full longer than behind_after_seconds: the broker is queueing readings "
    "for the gateway (and drops QoS 1 messages beyond its max_queued_messages).",
    ["source"],
)


MQTT_SESSIONS_LOST = Counter(
    "gateway_mqtt_sessions_lost_total",
    "Reconnects where the broker no longer had the source's persistent session: readings published while the "
    "gateway was disconnected were not kept for it.",
    ["source"],
)


def mqtt_session_lost(source: str, broker: str, expiry_seconds: int) -> None:
    MQTT_SESSIONS_LOST.labels(source).inc()
    log.warning(
        "The MQTT broker %s no longer had the session of %s (it should keep it for %d s): readings published "
        "while the gateway was disconnected were not kept for it and are lost, unless another subscriber has them. "
        "Was the broker restarted without persistence, or its session expiry shorter?",
        broker,
        source,
        expiry_seconds,
        extra={"source": source, "peer": broker, "reason": "session-lost"},
    )


def mqtt_connected(source: str, broker: str, session_present: bool) -> None:
    MQTT_CONNECTED.labels(source).set(1)
    log.info(
        "Connected to the MQTT broker %s for %s (%s).",
        broker,
        source,
        "resumed the persistent session" if session_present else "new session",
        extra={"source": source, "peer": broker},
    )


def mqtt_connection_lost(source: str, broker: str, reason: str, retry_in: float) -> None:
    MQTT_CONNECTED.labels(source).set(0)
    MQTT_CONNECT_FAILURES.labels(source).inc()
    log.warning(
        "No connection to the MQTT broker %s for %s: %s; retrying in %.1f s. Unacknowledged readings stay with "
        "the broker and are redelivered.",
        broker,
        source,
        reason,
        retry_in,
        extra={"source": source, "peer": broker, "reason": "mqtt-disconnected"},
    )


def mqtt_inflight(source: str, count: int) -> None:
    MQTT_INFLIGHT.labels(source).set(count)


def mqtt_behind(source: str, broker: str, window: int, seconds: float) -> None:
    MQTT_BEHIND.labels(source).inc()
    log.warning(
        "%s is falling behind the MQTT broker %s: all %d in-flight readings have been waiting for commit for "
        "%.0f s, so the broker is queueing; past its max_queued_messages it drops QoS 1 readings (see "
        "docs/mqtt.md).",
        source,
        broker,
        window,
        seconds,
        extra={"source": source, "peer": broker, "reason": "mqtt-behind"},
    )


def mqtt_caught_up(source: str, broker: str) -> None:
    log.info(
        "%s has caught up with the MQTT broker %s (the in-flight window has room again).",
        source,
        broker,
        extra={"source": source, "peer": broker},
    )


def mqtt_ack_withheld(source: str, broker: str, reason: str) -> None:
    ACKS.labels(source, "withheld").inc()
    log.error(
        "Withheld the PUBACK of a reading from %s on %s: %s. Reconnecting so the broker redelivers it.",
        broker,
        source,
        reason,
        extra={"source": source, "peer": broker, "reason": "mqtt-ack-withheld"},
    )


# -- rule set (issue #6) ----------------------------------------------------------------------------------------

RULES_RELOADS = Counter(
    "gateway_rules_reloads_total", "Rule set reloads (SIGHUP), by result: ok or failed.", ["result"]
)
RULES_SERIAL = Gauge("gateway_rules_serial", "Serial of the rule set in use.")
ROUTE_ACTIONS = Counter(
    "gateway_route_actions_total", "Messages dropped or quarantined by a route of the rule set.", ["action"]
)


def rules_loaded(serial: int) -> None:
    """At start: the serial of the verified rule set in use."""
    RULES_SERIAL.set(serial)


def rules_reloaded(path: str, serial: int, previous: int, key_id: str) -> None:
    RULES_RELOADS.labels("ok").inc()
    RULES_SERIAL.set(serial)
    log.warning(
        "Reloaded the rule set %s: serial %d (was %d), signed by key %s.",
        path,
        serial,
        previous,
        key_id,
        extra={"rules": path, "serial": serial},
    )
    if audit is not None:
        audit("rules.reload", result="ok", rules=path, serial=serial, previous=previous, key_id=key_id)


def rules_reload_failed(path: str, serial: int, reason: str) -> None:
    """The new rule set was refused; ``serial`` is the one that stays in use. ``reason`` names the failed check
    (it never holds message content)."""
    RULES_RELOADS.labels("failed").inc()
    log.error(
        "Refused to reload the rule set %s: %s. Serial %d stays in use.",
        path,
        reason,
        serial,
        extra={"rules": path, "reason": reason},
    )
    if audit is not None:
        audit("rules.reload", result="failed", rules=path, serial=serial, reason=reason)


def route_action(action: str, source: str, peer: str, route: str, reason: str) -> None:
    """A route dropped or quarantined a message (committed, delivered nowhere). A quarantine is logged by
    ``quarantined`` with the other rejects; a drop is logged here."""
    ROUTE_ACTIONS.labels(action).inc()
    if action != "drop":
        return
    log.info(
        "A message from %s on %s was dropped by route %s (committed, delivered nowhere): %s.",
        peer,
        source,
        route,
        reason,
        extra={"source": source, "peer": peer, "route": route},
    )


# -- delivery and retention (issue #7) --------------------------------------------------------------------------

RETENTION_PURGED = Counter("gateway_retention_purged_total", "Journal messages purged by retention.")
RETENTION_PAGES = Counter(
    "gateway_retention_pages_freed_total", "Database pages given back to the file system after purges (SQLite)."
)


def retention_purged(messages: int, pages: int) -> None:
    if messages:
        RETENTION_PURGED.inc(messages)
    if pages:
        RETENTION_PAGES.inc(pages)
    if messages or pages:
        log.info(
            "Retention purged %d delivered or expired message(s) and freed %d page(s).",
            messages,
            pages,
            extra={"purged": messages, "pages": pages},
        )
