"""The MQTT publisher: FHIR resources (or whole bundles) out, QoS 1, done only when the broker has PUBACKed.

One connection, opened on first use and again after it breaks. ``deliver_many`` publishes a whole claimed batch
concurrently, up to ``max_inflight`` publishes awaiting their PUBACK at once (paho queues the rest); aiomqtt's
``pending_calls_threshold`` is raised to the same size, since its default of 10 warns on every publish beyond
that. Any failure to publish or to get the PUBACK in time is a TransientError: the outbox retries the item, and
a subscriber may see a resource twice (MQTT QoS 1 is at-least-once; resource ids are stable, so a second copy
replaces the first).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import aiomqtt
import orjson

from adapters.mqtt.client import make_client, read_password, tls_context
from adapters.mqtt.config import MqttPublishConfig
from gateway.contracts import OutboxItem
from gateway.errors import PermanentError, TransientError
from gateway.tls import ReloadableContext

log = logging.getLogger(__name__)


class MqttPublishSink:
    def __init__(self, config: MqttPublishConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.broker = config.address
        self._password: str | None = None
        self._tls: ReloadableContext | None = None
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()
        self._window = asyncio.Semaphore(config.max_inflight)

    async def start(self) -> None:
        """Read the password and TLS files (ConfigError); the connection is made on first delivery, so a broker
        that is down delays delivery, not the daemon."""
        self._password = read_password(self.config)
        self._tls = tls_context(self.config, self.name)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.__aexit__(None, None, None)
            except Exception as exc:  # closing a broken connection: nothing left to save
                log.debug("Closing the MQTT connection of %s failed: %s", self.name, type(exc).__name__)

    async def _connected(self) -> aiomqtt.Client:
        async with self._lock:
            if self._client is not None:
                return self._client
            client = make_client(
                self.config,
                self.config.identifier(self.name),
                password=self._password,
                tls=self._tls.context if self._tls is not None else None,
                clean_start=True,  # the outbox is the durable queue; no broker session needed
                max_inflight_messages=self.config.max_inflight,
            )
            client.pending_calls_threshold = self.config.max_inflight + 1
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                raise TransientError(f"cannot connect to the MQTT broker {self.broker}: {exc}") from None
            self._client = client
            log.info("Connected to the MQTT broker %s for %s.", self.broker, self.name, extra={"peer": self.broker})
            return client

    def messages(self, item: OutboxItem) -> list[tuple[str, bytes]]:
        """(topic, payload) pairs for one outbox item."""
        fields = {"source": item.source, "kind": item.kind.value, "message_id": item.message_id}
        if not item.resources:
            return []
        if self.config.mode == "bundle":
            bundle = {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": r} for r in item.resources],
            }
            return [(self._topic(fields), orjson.dumps(bundle))]
        out = []
        for r in item.resources:
            rt, rid = str(r.get("resourceType", "")), str(r.get("id", ""))
            if not rt or not rid:
                raise PermanentError("a resource without resourceType or id cannot be addressed by the topic")
            out.append((self._topic({**fields, "resource_type": rt, "resource_id": rid}), orjson.dumps(r)))
        return out

    def _topic(self, fields: dict[str, str]) -> str:
        topic = self.config.topic.format(**fields)
        if "+" in topic or "#" in topic or "\x00" in topic:
            raise PermanentError("the topic made from the template contains a wildcard or NUL")
        return topic

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        async with self._window:
            await client.publish(
                topic, payload, qos=1, retain=self.config.retain, timeout=self.config.publish_timeout_seconds
            )

    async def deliver(self, item: OutboxItem) -> None:
        (result,) = await self.deliver_many([item])
        if result is not None:
            raise result

    async def deliver_many(self, items: Sequence[OutboxItem]) -> list[Exception | None]:
        results: list[Exception | None] = []
        planned: list[list[tuple[str, bytes]]] = []
        for item in items:
            try:
                planned.append(self.messages(item))
                results.append(None)
            except PermanentError as exc:
                planned.append([])
                results.append(exc)
        if not any(planned):
            return results
        try:
            client = await self._connected()
        except TransientError as exc:
            return [r if r is not None else exc for r in results]
        outcomes = await asyncio.gather(
            *(asyncio.gather(*(self._publish(client, t, p) for t, p in msgs)) for msgs in planned),
            return_exceptions=True,
        )
        broken = False
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException) and results[i] is None:
                broken = broken or isinstance(outcome, aiomqtt.MqttError)
                results[i] = TransientError(f"publish to {self.broker} not acknowledged: {outcome}")
        if broken:
            await self.close()  # reconnect on the next round
        return results
