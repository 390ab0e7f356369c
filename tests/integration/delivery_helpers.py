"""Real peers for delivery tests: a FHIR server (aiohttp) and an MLLP receiver (asyncio) with programmable
failures, plus records shaped like the normaliser's (a Patient and an Observation per message)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from gateway.contracts import Envelope, InputKind
from gateway.delivery import DeliveryWorker
from gateway.ids import uuid7
from gateway.journal import Journal, JournalRecord

FHIR_JSON = "application/fhir+json"


def hl7(control_id: str, patient: str, seq: int) -> bytes:
    return (
        f"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ORU^R01|{control_id}|P|2.5.1\r"
        f"PID|1||{patient}^^^HOSP^MR||Doe^Jane\r"
        f"OBX|1|NM|8867-4^Heart rate^LN||{seq}|/min|||||F\r"
    ).encode()


def patient_record(patient: str, seq: int, destinations: tuple[str, ...]) -> JournalRecord:
    """Message ``seq`` of ``patient``: Patient + Observation(value = seq), ordering key Patient/<id>."""
    mid = uuid7()
    control = f"C{seq:05d}{patient}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": patient, "active": True}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": f"{patient}-{seq}",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                    "subject": {"reference": f"Patient/{patient}"},
                    "effectiveDateTime": "2026-01-01T12:00:00Z",
                    "valueQuantity": {"value": seq},
                }
            },
        ],
    }
    env = Envelope(mid, "test", InputKind.HL7V2, datetime.now(UTC), hl7(control, patient, seq), "127.0.0.1:1")
    return JournalRecord(
        env,
        "accepted",
        message_type="ORU^R01",
        control_id=control,
        fhir=orjson.dumps(bundle),
        destinations=destinations,
        ordering_key=f"Patient/{patient}",
    )


async def drain(journal: Journal, worker: DeliveryWorker, within: float = 30.0) -> None:
    """Run delivery rounds until nothing is pending (retries included)."""
    try:
        async with asyncio.timeout(within):
            while True:
                if await worker.run_once() == 0:
                    if not (await journal.counts()).get("outbox.pending"):
                        return
                    await asyncio.sleep(0.02)  # a retry is not due yet
    except TimeoutError:
        raise AssertionError(f"still pending after {within} s: {await journal.counts()}") from None


class FhirReceiver:
    """A FHIR server on 127.0.0.1 that accepts transaction Bundles (POST /fhir) and PUTs (/fhir/Type/id).

    ``script`` holds actions for the next requests, one each: ``ok``, ``429`` (Retry-After ``retry_after``),
    ``503``, ``500``, ``400`` (with an OperationOutcome), ``401``, ``slow`` (answers after ``slow_seconds``),
    ``drop`` (closes the connection without an answer). With the script empty, ``policy`` (if set) picks the
    action per request, else ``ok``. ``accepted`` lists (patient, seq) of accepted Observations in order."""

    def __init__(self) -> None:
        self.script: deque[str] = deque()
        self.policy: Callable[[dict[str, Any]], str] | None = None
        self.retry_after = "1"
        self.slow_seconds = 2.0
        self.requests: list[tuple[str, datetime]] = []  # (action, time)
        self.accepted: list[tuple[str, int]] = []
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.tokens_issued = 0
        self.token_forms: list[dict[str, str]] = []
        self.valid_tokens: set[str] = set()
        self.require_token = False
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._sleepers: set[asyncio.Task[Any]] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application()
        app.router.add_post("/fhir", self._transaction)
        app.router.add_put("/fhir/{type}/{id}", self._put)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    async def stop(self) -> None:
        # A "slow" handler still asleep when a test ends would keep its connection's socket past the runner's
        # cleanup (aiohttp does not cancel handlers on its own), and the socket's ResourceWarning would then fail
        # whichever later test the garbage collector happens to run in.
        for task in list(self._sleepers):
            task.cancel()
        if self._sleepers:
            await asyncio.wait(list(self._sleepers), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            form["basic"] = base64.b64decode(auth[6:]).decode()
        self.token_forms.append({k: str(v) for k, v in form.items()})
        self.tokens_issued += 1
        token = f"tok{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "bearer", "expires_in": 300})

    async def _act(self, request: web.Request, doc: dict[str, Any]) -> web.StreamResponse | None:
        action = self.script.popleft() if self.script else (self.policy(doc) if self.policy else "ok")
        if self.require_token:
            token = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in self.valid_tokens:
                action = "401"
        self.requests.append((action, datetime.now(UTC)))
        self.headers.append(dict(request.headers))
        if action == "ok":
            return None
        if action == "slow":
            task = asyncio.current_task()
            assert task is not None
            self._sleepers.add(task)
            try:
                await asyncio.sleep(self.slow_seconds)
            finally:
                self._sleepers.discard(task)
            if request.transport is None or request.transport.is_closing():
                # The client gave up waiting: this server drops the work instead of storing it after the fact,
                # so what a test sees does not depend on how long the machine took to get here.
                raise asyncio.CancelledError
            return None
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # the handler ends with its connection
        if action in ("429", "503"):
            return web.Response(status=int(action), headers={"Retry-After": self.retry_after})
        if action == "400":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "Observation.status is required"}],
            }
            return web.Response(status=400, body=orjson.dumps(outcome), content_type=FHIR_JSON)
        return web.Response(status=int(action))

    def _record(self, resources: list[dict[str, Any]]) -> None:
        for r in resources:
            if r.get("resourceType") == "Observation":
                self.accepted.append((r["subject"]["reference"].split("/")[1], int(r["valueQuantity"]["value"])))

    async def _transaction(self, request: web.Request) -> web.StreamResponse:
        doc = orjson.loads(await request.read())
        refusal = await self._act(request, doc)
        if refusal is not None:
            return refusal
        self.bodies.append(doc)
        self._record([e["resource"] for e in doc["entry"]])
        reply = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": {"status": "200 OK"}} for _ in doc["entry"]],
        }
        return web.Response(body=orjson.dumps(reply), content_type=FHIR_JSON)

    async def _put(self, request: web.Request) -> web.StreamResponse:
        doc = orjson.loads(await request.read())
        refusal = await self._act(request, doc)
        if refusal is not None:
            return refusal
        self.bodies.append(doc)
        self._record([doc])
        return web.Response(body=orjson.dumps(doc), content_type=FHIR_JSON)


class MllpReceiver:
    """An MLLP server written for the tests (its own framing, not the project's). ``script`` holds the answer
    to the next messages, one each: ``AA``, ``AE``, ``AR``, ``wrong`` (an AA whose MSA-2 names another control
    id), ``none`` (no answer at all), ``late`` (answers AA after ``late_seconds``); empty: ``AA``.
    ``received`` lists the control ids of every message read; ``accepted`` those answered AA."""

    def __init__(self) -> None:
        self.script: deque[str] = deque()
        self.late_seconds = 1.0
        self.received: list[str] = []
        self.accepted: list[str] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

    @staticmethod
    def ack(control_id: str, code: str, acked: str) -> bytes:
        msg = (
            f"MSH|^~\\&|EHR|HOSP|LAB|HOSP|20260101120000||ACK^R01|A{control_id}|P|2.5.1\r"
            f"MSA|{code}|{acked}|{'bad value' if code == 'AR' else ''}\r"
        )
        if code == "AR":
            msg += "ERR|||207^Application internal error^HL70357|E||||rejected in test\r"
        return b"\x0b" + msg.encode() + b"\x1c\r"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        buf = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\x1c\r" in buf:
                    frame, buf = buf.split(b"\x1c\r", 1)
                    message = frame[frame.index(b"\x0b") + 1 :]
                    control = message.split(b"\r", 1)[0].split(b"|")[9].decode()
                    self.received.append(control)
                    action = self.script.popleft() if self.script else "AA"
                    if action == "none":
                        continue
                    if action == "late":
                        await asyncio.sleep(self.late_seconds)
                        action = "AA"
                    if action == "wrong":
                        writer.write(self.ack(control, "AA", "SOMEONE-ELSE"))
                    else:
                        writer.write(self.ack(control, action, control))
                        if action == "AA":
                            self.accepted.append(control)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


def later_than(t: datetime, seconds: float) -> datetime:
    return t + timedelta(seconds=seconds)
