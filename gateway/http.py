"""A small HTTP endpoint for /metrics (Prometheus text format), /healthz and /readyz, on the loop.

/healthz answers 200 while the process and its event loop are alive (a liveness probe); /readyz answers 200 only
while the gateway can take messages: listeners bound, journal reachable, rules loaded (a readiness probe, what a
load balancer should use).

Deliberately minimal (GET only, one request per connection): it serves a scraper and a load balancer's health
check on a loopback or management address, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import ConfigError

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[tuple[bool, str]]]
MetricsText = Callable[[], Awaitable[bytes]]


class TelemetryServer:
    def __init__(self, listen: str, health: HealthCheck, metrics: MetricsText | None = None) -> None:
        """``health`` is the readiness check: (ready, reason); ``metrics`` the /metrics body (default: this
        process's registry; a supervisor gives its workers' merged metrics)."""
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = int(port)
        self.health = health
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self.port}: {exc.strerror}", "telemetry.listen") from None
        log.info(
            "Metrics and health are served on http://%s:%d/metrics, /healthz and /readyz.", self.host, self.bound_port
        )

    @property
    def bound_port(self) -> int:
        """The port actually bound (differs from ``port`` when that is 0, as for a supervisor's worker)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                body = generate_latest() if self.metrics is None else await self.metrics()
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/health"):
                status, ctype, body = "200 OK", "text/plain; charset=utf-8", b"alive\n"
            elif path == "/readyz":
                ok, text = await self.health()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain; charset=utf-8", (text + "\n").encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
