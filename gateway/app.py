"""The daemon: one owner for every long-lived task, an orderly start and a draining stop.

Start: journal (migrations applied), rule set and its destinations, pipeline, delivery workers, listeners,
telemetry. Stop (SIGTERM/SIGINT): stop accepting, let in-flight messages be committed and acknowledged within
the drain timeout, commit what is queued, stop the workers, close sinks, close the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from datetime import timedelta
from pathlib import Path

from gateway import __version__, telemetry
from gateway.audit import AuditLog
from gateway.config import GatewayConfig
from gateway.contracts import BrokerSource, Sink, Source
from gateway.crypto import load_keyring
from gateway.delivery import build_workers
from gateway.deliveryproc import DeliveryProcess
from gateway.errors import ConfigError, GatewayError, UnavailableError
from gateway.http import TelemetryServer
from gateway.journal import Journal
from gateway.journal.retention import run_retention
from gateway.normalisers import build_normalisers
from gateway.pipeline import Pipeline
from gateway.rules import LoadedRules, RuleSet, load_rule_set
from gateway.sdnotify import Notifier
from gateway.worker import current_role

log = logging.getLogger(__name__)

OUTBOX_GAUGE_INTERVAL = 5.0


class Gateway:
    def __init__(self, config: GatewayConfig, base_dir: Path, config_path: Path | None = None) -> None:
        self.config = config
        self.base_dir = base_dir
        self.journal = Journal(
            config.journal.url,
            group_commit_max=config.journal.group_commit_max,
            dedup_window=timedelta(seconds=config.journal.dedup_window_seconds),
            pool_size=config.journal.pool_size,
            keyring=load_keyring(config.encryption),
        )
        # Decrypted, signature-verified, validated and rollback-checked; its serial is remembered as accepted.
        self.loaded: LoadedRules = load_rule_set(config, base_dir, accept=True)
        self.rules: RuleSet = self.loaded.rules
        self._reload_lock = asyncio.Lock()
        self._tg: asyncio.TaskGroup | None = None
        # False when run() ended without closing the journal (it did not answer): the process must exit at once
        # (a thread may still wait on the database) and not with 0.
        self.stopped_cleanly = True
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._open_sinks: list[Sink] = []
        # A worker of `workers = N` (gateway/supervisor.py), or None for the single-process daemon.
        self.role = current_role()
        # With several workers on SQLite only worker 0 delivers: another delivering process would only queue for
        # SQLite's one write lock. On MySQL each worker delivers (claims are SELECT ... SKIP LOCKED).
        self.delivers = self.role is None or self.role.primary or not config.journal.url.startswith("sqlite")
        # The delivery child runs the config file's text and the rule set this process verified (handed over,
        # never read from disk); without a file (a config built in memory) delivery runs inline.
        self.delivery_process = (
            DeliveryProcess(config_path, self.journal, self.loaded)
            if self.delivers and config_path is not None and config.delivery.isolation == "process"
            else None
        )
        self.sinks: list[Sink] = (
            [d.build(name) for name, d in self.rules.destinations.items()]
            if self.delivers and self.delivery_process is None
            else []
        )
        self.pipeline = Pipeline(
            self.journal,
            self.loaded.router,
            normalisers=build_normalisers(config),
            validate_fhir=config.normalise.validate_fhir,
        )
        self.sources: list[Source] = [s.build(self.pipeline) for s in config.sources]
        self.workers = build_workers(self.journal, self.sinks, config.delivery)
        # A worker serves its metrics and readiness on a loopback port of its own, which it names to the
        # supervisor in its READY=1; the supervisor serves the configured address (gateway/supervisor.py).
        listen = config.telemetry.listen if self.role is None else "127.0.0.1:0"
        self.telemetry = TelemetryServer(listen, self.health) if config.telemetry.listen else None
        self.ready = asyncio.Event()
        telemetry.BUILD.info({"version": __version__, "instance": config.instance})
        self.notifier = Notifier()
        self.audit_log = AuditLog(Path(config.audit_log)) if config.audit_log else None
        self.rules_digest = self.loaded.sha256
        telemetry.rules_loaded(self.loaded.serial)

    async def health(self) -> tuple[bool, str]:
        """Readiness: listeners bound and rules loaded (``ready``), and the journal answers a round trip (not
        a count: counting a large journal on every probe would make the probe slow)."""
        if not self.ready.is_set():
            return False, "starting"
        try:
            await asyncio.wait_for(self.journal.ping(), 5.0)
        except UnavailableError as exc:  # its text is ours and the database's reason (no message content)
            return False, f"journal unavailable: {exc}"
        except (GatewayError, TimeoutError, Exception) as exc:  # health must answer, whatever broke
            return False, f"journal unavailable: {type(exc).__name__}"
        # An MQTT source without its broker does not make the instance unready: its MLLP and DICOM listeners
        # still serve, and a load balancer must not take them out of rotation. The body says so, for the operator.
        # Nor does a delivery process being restarted: what is acknowledged is in the journal and waits for it.
        notes = []
        offline = [s.name for s in self.sources if isinstance(s, BrokerSource) and not s.broker_connected()]
        if offline:
            notes.append("no MQTT broker connection for " + ", ".join(sorted(offline)))
        if self.delivery_process is not None and self.delivery_process.down:
            notes.append("the delivery process is not running (restarting; see the log)")
        return True, "; ".join(["ok", *notes])

    def _audit(self, action: str, **fields: str | int) -> None:
        """Record an audit event in a worker thread (it fsyncs); a failure is logged, never fatal."""
        if self.audit_log is None:
            return
        log_ = self.audit_log

        def write() -> None:
            try:
                log_.append(action, f"gateway:{self.config.instance}", **fields)
            except OSError as exc:
                log.error("Could not write the audit trail %s: %s.", log_.path, exc.strerror or exc)

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Called from an adapter's own thread (pynetdicom runs one per association): already off the event
            # loop, so write here.
            write()
            return
        loop.run_in_executor(None, write)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set. Raises ConfigError/TransientError when something cannot start."""
        telemetry.audit = self._audit if self.audit_log is not None else None
        await self.journal.open()
        started_sinks = self._open_sinks  # an inline reload adds and removes sinks here
        started_sources: list[Source] = []
        try:
            for sink in self.sinks:
                await sink.start()
                started_sinks.append(sink)
            # Bind every listener before any task starts, so a port in use is a plain ConfigError (exit 2),
            # not an error inside a task group with half the daemon running.
            if self.telemetry is not None:
                await self.telemetry.start()
            for src in self.sources:
                await src.start()
                started_sources.append(src)
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for w in self.workers:
                    self._worker_tasks.append(tg.create_task(w.run(), name=f"delivery[{w.sink.name}]"))
                if self.delivery_process is not None:
                    tg.create_task(self.delivery_process.run(), name="delivery-process")
                waker = tg.create_task(self._wake_workers(), name="delivery-waker")
                watchdog = tg.create_task(self.notifier.watchdog(), name="systemd-watchdog")
                # Once per host, not once per worker: both read (and retention deletes) the whole journal.
                once = self.role is None or self.role.primary
                gauges = tg.create_task(self._outbox_gauges() if once else asyncio.sleep(0), name="outbox-gauges")
                retention = tg.create_task(
                    run_retention(self.journal, self.config.retention) if once else asyncio.sleep(0), name="retention"
                )
                self.ready.set()
                self._audit(
                    "gateway.start",
                    version=__version__,
                    rules=str(self.config.rules_path(self.base_dir)),
                    rules_sha256=self.rules_digest,
                    rules_serial=self.loaded.serial,
                    rules_key_id=self.loaded.key_id,
                    **self._worker_fields(),
                )
                self.notifier.ready(f"serving {len(self.sources)} source(s)", *self._supervisor_fields())
                log.info(
                    "The gateway %s is ready: %d source(s), %d destination(s), delivery %s.",
                    self.config.instance,
                    len(self.sources),
                    len(self.rules.destinations),
                    "in a child process"
                    if self.delivery_process is not None
                    else ("in this process" if self.delivers else "by worker 0"),
                )
                await stop.wait()
                self.notifier.stopping("draining in-flight messages")
                self._audit("gateway.stop", reason="signal", **self._worker_fields())
                log.info(
                    "Stopping: no new connections; draining in-flight messages (up to %g s).",
                    self.config.drain_timeout_seconds,
                )
                await self._stop_sources(started_sources)
                started_sources = []
                for w in self.workers:
                    w.stop()
                if self.delivery_process is not None:
                    await self.delivery_process.stop(self.config.drain_timeout_seconds)
                waker.cancel()
                watchdog.cancel()
                gauges.cancel()
                retention.cancel()
        finally:
            await self._stop_sources(started_sources)
            if self.telemetry is not None:
                await self.telemetry.stop()
            for sink in started_sinks:
                with contextlib.suppress(Exception):
                    await sink.close()
            # The journal commits whatever is queued before it closes; shielded so a second signal cannot cut
            # the last commit in half, and bounded: a database that hangs (no answer, no error) would otherwise
            # hold the process, with /healthz already gone, until it answers again. What that commit held was
            # not acknowledged; its senders resend (and a commit that did land is recognised as a duplicate).
            closing = asyncio.ensure_future(self.journal.close())
            try:
                await asyncio.wait_for(asyncio.shield(closing), self.config.drain_timeout_seconds)
            except TimeoutError:
                self.stopped_cleanly = False
                log.error(
                    "The journal did not finish its last commit within %g s (the database does not answer); "
                    "stopping without it. The messages of that commit were not acknowledged: their senders "
                    "resend them.",
                    self.config.drain_timeout_seconds,
                )
                return
            log.info("The gateway has stopped.")

    async def reload_rules(self) -> bool:
        """SIGHUP: load, decrypt, verify, validate and compile the rule set, then swap it in one assignment.

        On any failure the running rule set stays, and a log line, ``gateway_rules_reloads_total{result="failed"}``
        and an audit record say which check failed. A message already routed keeps its decision (the pipeline
        reads the router once per message). When the destinations changed, the delivery process is restarted
        (or, with inline delivery, sinks and workers are swapped) so it delivers to the new ones. Returns whether
        the new set is in use."""
        async with self._reload_lock:  # two quick SIGHUPs: the second reload starts after the first is done
            return await self._reload_rules()

    async def _reload_rules(self) -> bool:
        old = self.loaded
        path = str(self.config.rules_path(self.base_dir))
        serving = self.ready.is_set()  # a SIGHUP during start must not announce READY before the listeners
        if serving:
            self.notifier.notify(
                "RELOADING=1", "STATUS=reloading the rule set", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"
            )
        try:
            try:
                new = await asyncio.get_running_loop().run_in_executor(
                    None, functools.partial(load_rule_set, self.config, self.base_dir, accept=True)
                )
            except ConfigError as exc:
                # The log line names the file already; a key path inside it (routes[2].to) stays in the reason.
                telemetry.rules_reload_failed(path, old.serial, exc.reason if exc.path == path else str(exc))
                return False
            self.loaded, self.rules, self.rules_digest = new, new.rules, new.sha256
            self.pipeline.router = new.router
            if new.rules.destinations != old.rules.destinations and self.delivers:
                if self.delivery_process is not None:
                    self.delivery_process.restart(new)
                else:
                    await self._swap_inline_delivery(path)
            telemetry.rules_reloaded(path, new.serial, old.serial, new.key_id)
            return True
        finally:
            if serving:
                self.notifier.notify(
                    "READY=1", f"STATUS=serving {len(self.sources)} source(s), rules serial {self.loaded.serial}"
                )

    async def _swap_inline_delivery(self, path: str) -> None:
        """Inline delivery after a reload that changed destinations: start the new sinks and their workers, then
        stop the old workers (each finishes its round) and close their sinks. Items are leased, so the short
        overlap of an old and a new worker for one destination delivers nothing twice. If a new sink cannot
        start, delivery carries on with the old ones (routing already uses the new set) until a restart."""
        tg = self._tg
        if tg is None:  # not serving yet: run() starts whatever sinks and workers it finds
            self.sinks = [d.build(name) for name, d in self.rules.destinations.items()]
            self.workers = build_workers(self.journal, self.sinks, self.config.delivery)
            return
        started: list[Sink] = []
        try:
            for dest in (d.build(name) for name, d in self.rules.destinations.items()):
                await dest.start()
                started.append(dest)
        except Exception as exc:  # the supervisor boundary: a destination that cannot start must not stop us
            for opened in started:
                with contextlib.suppress(Exception):
                    await opened.close()
            log.error(
                "The reloaded rule set %s is routing, but its destinations could not start (%s); delivery goes on "
                "to the previous destinations until a restart.",
                path,
                type(exc).__name__,
            )
            return
        old_workers, old_tasks, old_sinks = self.workers, self._worker_tasks, self.sinks
        self._open_sinks.extend(started)
        self.sinks = started
        self.workers = build_workers(self.journal, started, self.config.delivery)
        self._worker_tasks = [tg.create_task(w.run(), name=f"delivery[{w.sink.name}]") for w in self.workers]
        for w in old_workers:
            w.stop()
        await asyncio.gather(*old_tasks, return_exceptions=True)
        for old in old_sinks:
            with contextlib.suppress(Exception):
                await old.close()
            if old in self._open_sinks:
                self._open_sinks.remove(old)
        log.info("Delivery now runs to %d destination(s) of the reloaded rule set.", len(self.sinks))

    def _worker_fields(self) -> dict[str, str | int]:
        return {} if self.role is None else {"worker": self.role.index}

    def _supervisor_fields(self) -> list[str]:
        """What a supervisor needs in READY=1: where this worker's /metrics and /readyz are."""
        if self.role is None or self.telemetry is None:
            return []
        return [f"X_GATEWAY_TELEMETRY=127.0.0.1:{self.telemetry.bound_port}"]

    async def _outbox_gauges(self) -> None:
        """Outbox depth and oldest age per destination, every few seconds (not on scrape: the HTTP handler
        must not wait on the database)."""
        while True:
            try:
                state = await self.journal.outbox_state()
                for name in list(self.rules.destinations):  # read each time: a reload may change them
                    pending, oldest = state.get(name, (0, 0.0))
                    telemetry.outbox_state(name, pending, oldest)
            except GatewayError as exc:
                log.warning("Could not read the outbox state for the metrics: %s", exc)
            except Exception as exc:  # the supervisor boundary: a metrics task must never end the daemon
                telemetry.internal_error("Reading the outbox state for the metrics failed unexpectedly", exc)
            await asyncio.sleep(OUTBOX_GAUGE_INTERVAL)

    async def _stop_sources(self, sources: list[Source]) -> None:
        if sources:
            await asyncio.gather(*(s.stop(self.config.drain_timeout_seconds) for s in sources))

    async def _wake_workers(self) -> None:
        while True:
            await self.journal.committed.wait()
            self.journal.committed.clear()
            for w in self.workers:
                w.wake()
            if self.delivery_process is not None:
                self.delivery_process.wake()
