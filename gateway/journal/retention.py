"""Retention: old messages whose deliveries are finished are purged in batches, and the space is given back.

Every ``interval_seconds``: messages received more than ``delivered_days`` ago with every outbox item done or
dropped (accepted and not_mapped ones), and quarantined ones older than ``quarantined_days``, are deleted with
their outbox rows, ``batch_size`` per transaction so that ingest never waits long behind a purge. Pending items
and dead letters keep their message: they are not finished. Then, on SQLite, the freed pages are returned to
the file system (``Journal.reclaim_space``), so the file shrinks. On MySQL/MariaDB InnoDB keeps the freed pages
in the tablespace and reuses them for new rows: at a steady rate the journal stops growing; an
``OPTIMIZE TABLE messages`` in a maintenance window shrinks the file (docs/delivery.md says why we do not
partition).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from gateway import telemetry
from gateway.config import RetentionConfig
from gateway.errors import GatewayError
from gateway.journal import STATUS_ACCEPTED, STATUS_NOT_MAPPED, STATUS_QUARANTINED, Journal, utcnow

log = logging.getLogger(__name__)

PAUSE_BETWEEN_BATCHES = 0.05  # seconds: lets queued commits go first between two purge transactions


async def purge_once(journal: Journal, config: RetentionConfig) -> tuple[int, int]:
    """One retention pass; returns (messages purged, pages given back)."""
    purged = 0
    now = utcnow()
    plans = []
    if config.delivered_days > 0:
        plans.append((now - timedelta(days=config.delivered_days), [STATUS_ACCEPTED, STATUS_NOT_MAPPED]))
    if config.quarantined_days > 0:
        plans.append((now - timedelta(days=config.quarantined_days), [STATUS_QUARANTINED]))
    for before, statuses in plans:
        while True:
            n = await journal.purge_messages(before, statuses, config.batch_size)
            purged += n
            if n < config.batch_size:
                break
            await asyncio.sleep(PAUSE_BETWEEN_BATCHES)
    pages = 0
    if purged:
        while n := await journal.reclaim_space():
            pages += n
            await asyncio.sleep(PAUSE_BETWEEN_BATCHES)
    return purged, pages


async def run_retention(journal: Journal, config: RetentionConfig) -> None:
    """The daemon's retention task: a pass now, then one every ``interval_seconds``. A failed pass is logged
    and tried again at the next interval."""
    if config.delivered_days <= 0 and config.quarantined_days <= 0:
        return
    while True:
        try:
            purged, pages = await purge_once(journal, config)
            telemetry.retention_purged(purged, pages)
        except GatewayError as exc:
            log.warning("The retention purge failed; it runs again in %.0f s: %s", config.interval_seconds, exc)
        except Exception as exc:  # the supervisor boundary: a failed purge must never end the daemon
            telemetry.internal_error("The retention purge failed unexpectedly; it runs again later", exc)
        await asyncio.sleep(config.interval_seconds)
