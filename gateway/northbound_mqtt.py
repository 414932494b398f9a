"""MQTT northbound: commands in, results and events out, for head-end systems and operators.

Topics (``<prefix>`` defaults to ``meterlink/gw``; every message is QoS 1 and JSON, money is a
decimal string in yuan, times are ISO 8601 with a zone):

=========================================  ==========  ===================================================
topic                                      direction   payload
=========================================  ==========  ===================================================
``<prefix>/commands``                      in          one command (below)
``<prefix>/results/<correlation_id>``      out         acceptance, then the final outcome of that command
``<prefix>/results/_invalid``              out         rejections of messages without a usable correlation id
``<prefix>/events/commands``               out         every state change of every command (any channel)
``<prefix>/events/relay``                  out         relay commands confirmed by read-back (``"source": "command"``),
                                                       relay or power-hold changes polls saw (``"source": "meter"``),
                                                       also after a relay command of unknown outcome
``<prefix>/events/alarms``                 out         refusals (policy or meter), commands ending failed/unknown
                                                       (``"source": "command"``); balance alarms and meters that
                                                       stop or start answering, from the poller (``"source": "meter"``)
``<prefix>/status``                        out         ``online`` / ``offline``, retained (last will: offline)
=========================================  ==========  ===================================================

**Command** (``<prefix>/commands``)::

    {"correlation_id": "c-42", "kind": "topup", "address": "000000000001",
     "params": {"amount": "50.00"}, "actor": "cashier-7",
     "idempotency_key": "receipt-981"?, "valid_until": "2026-11-27T10:00:00+08:00"?}

``kind`` is ``topup`` (``params``: ``amount`` yuan, or ``energy_kwh`` for an energy wallet,
``opening``), ``relay`` (``action``: ``trip``, ``direct-close``, ``close-allowed``,
``alarm-on``, ``power-hold-on``, ...; ``n2``, ``arrears``), ``tariff`` (``prices``,
``switch_at``), ``params`` (``alarm_1``, ``alarm_2``, ``overdraft``, ``hoarding``,
``close_allowed``) or ``time_sync``. ``correlation_id`` is 1..128
characters without ``/``, ``+``, ``#``, white space or control characters (a UUID is fine); it
names the result topic. Without ``idempotency_key`` the key is ``mqtt:<correlation_id>``, so a
command re-sent with the same correlation id (a QoS 1 redelivery, or a client that re-sends
after its own reconnect) is never executed twice. Unknown fields are refused (a misspelt
``idempotency_key`` would otherwise make a second top-up). Retained commands are refused.

With MQTT 5 (``mqtt5=True``) a request's ``CorrelationData`` stands in for a missing
``correlation_id`` (when it is UTF-8 and a valid id), and if the request has a
``ResponseTopic``, every result is also published there with the request's
``CorrelationData``. Response topics inside ``<prefix>/`` other than ``<prefix>/results/...``
are refused.

**Results** (``<prefix>/results/<correlation_id>``): first the acceptance::

    {"correlation_id": "c-42", "status": "accepted" | "duplicate" | "rejected" | "error",
     "command": {...} | null, "error": "..."}

``accepted``: recorded now. ``duplicate``: the idempotency key was known; ``command`` is the
*first* command with its current state (its final outcome follows if it is still open).
``rejected``: bad input, with a message saying what is wrong; **nothing was recorded**.
``error``: the gateway failed (e.g. the ledger); nothing was recorded, re-send the same
command. Then, when the command reaches a final state::

    {"correlation_id": "c-42", "status": "confirmed" | "failed" | "refused" | "unknown",
     "command": {...}, "detail": {...}}

``command`` is the ledger's view (``id``, ``idempotency_key``, ``kind``, ``address``,
``params``, ``actor``, ``state``, ``created_at``, ``updated_at``, ``attempts``,
``valid_until``, ``batch``, ``progress``, ``result``); top-up ``params`` carry ``amount``
(yuan) next to the ledger's ``amount_fen``. ``detail`` is what the last state change recorded
(``error``, ``reason``, ``rule``, ``verified`` ...). The map from commands to correlation ids
lives in memory: after a gateway restart, outcomes of commands accepted before it are
published on ``events/commands`` only.

**Events**::

    events/commands  {"event": "sent", "at": ..., "command": {...}, "detail": {...},
                      "correlation_ids": ["c-42"]}
    events/relay     {"source": "command", "address": ..., "action": "trip", "relay": "open",
                      "relay_open": true, "power_hold": false, "command_id": ..., "at": ...,
                      "result": {...}}
    events/alarms    {"source": "command", "alarm": "refused" | "failed" | "unknown",
                      "severity": "warning" | "critical", "by": "policy" | "meter" | "gateway",
                      "rule": "power_hold" | null, "reason": "...", "address": ..., "kind": ...,
                      "command_id": ..., "at": ..., "command": {...}}

``unknown`` is critical: the command may have taken effect (money may have moved) and a person
must reconcile it with the meter.

**Meter events** come from the poller (gateway/poller.py, ``[poll] interval_s``): what a meter
did by itself, e.g. a local cost-control meter that trips for lack of credit::

    events/relay     {"source": "meter", "address": ..., "at": ..., "action": null,
                      "relay": "closed" | "open" | "close-allowed", "previous_relay": "closed",
                      "relay_open": true, "trip_commanded": true, "pre_trip_alarm": false,
                      "power_hold": false, "previous_power_hold": false, "status_word_3": 80,
                      "wallet": "money", "unit": "yuan", "remaining_money": "0.00",
                      "overdraft": "0.00", "remaining_energy": null, "overdraft_energy": null,
                      "level": "overdraft", "command_id": null, "unknown_command_id": null}
    events/alarms    {"source": "meter", "by": "meter", "alarm": "balance_alarm_1" |
                      "balance_alarm_2" | "balance_zero" | "overdraft" | "balance_restored" |
                      "meter_silent" | "meter_back", "severity": "info" | "warning" | "critical",
                      "reason": "...", "address": ..., "at": ..., "relay": ...,
                      "wallet": "money", "unit": "yuan", "remaining_money": "4.80",
                      "overdraft": "0.00", "remaining_energy": null, "overdraft_energy": null,
                      "level": "alarm_1", "rule": null, "kind": null, "command_id": null,
                      "threshold": "5.00"?, "cleared": [...]?, "answered_at": ...?, "silent_since": ...?}

``relay`` is ``close-allowed`` when the relay is open and no trip is commanded any more (the
customer may close it with the button). ``wallet`` is what the meter keeps (``[[meter]]
wallet``): ``money`` (amounts in yuan: ``remaining_money``, ``overdraft``), ``energy`` (an
energy-type meter, prepaid.md §1.8: ``remaining_energy``, ``overdraft_energy`` in kWh, the
money fields null), or null with every amount for remote cost-control meters, which hold no
wallet; ``unit`` says ``yuan`` or ``kWh``. ``level`` is the balance ladder of prepaid.md §1.4
(``normal``, ``alarm_1``, ``alarm_2``, ``zero``, ``overdraft``; null without a wallet). Each
threshold is reported once when the balance falls through it (``threshold`` says where it is,
in ``unit``; a poll that finds it fallen through several reports each, in order),
``balance_restored`` once when a top-up lifts it back over some (``cleared``).
``meter_silent`` (critical) comes after the configured number of polls without an answer
(``answered_at``: its last answer), ``meter_back`` when it answers again (``silent_since``).
A change a relay command confirmed is reported by the command alone (``"source": "command"``,
with the state it read back). A relay command that ended ``unknown`` publishes no relay state
(only its critical ``unknown`` alarm): a change the poller sees after it is a meter event whose
``unknown_command_id`` names that command (it may have made the change). Meters a command is
working on are not polled.

**Delivery.** Results and events are at least once: a message whose PUBACK was lost in a
broker restart is published again after the reconnect, so a client may see a result twice
(deduplicate on ``correlation_id`` + ``status``). While the broker is away they wait in a
bounded queue (``queue_limit``, 10,000; when it is full, the oldest ``events/commands``
message goes first, then the oldest of any) and are published in order after the reconnect.
Commands are received with QoS 1; a client that has no acceptance for a command re-sends it
with the same correlation id (or idempotency key) until it has one.

aiomqtt 2.x does not reconnect (shared/reference/deps.md §1): the connection runs its own loop
with exponential backoff and jitter, resubscribes, republishes ``online`` and then drains the
queue; at most 20 publishes are in flight (mosquitto's ``max_inflight_messages``; beyond it
messages are lost silently); publishes have a timeout and are cancelled and re-queued when the
connection drops (a publish waiting for a PUBACK can hang across a disconnect), and a publish
without its PUBACK in ``publish_timeout`` makes the connection count as broken: it is re-queued
and the connection remade (a message that fails on 5 connections is dropped, logged); the client's
"pending publish calls" warnings are silenced; TCP_NODELAY is set. :meth:`MqttNorthbound.aclose`
cancels the consumer first, processes commands already received, flushes the queue (bounded),
publishes ``offline`` and disconnects.

Access control is the broker's: give the gateway's user write access to ``<prefix>/#`` except
``<prefix>/commands``, and give clients write access to ``<prefix>/commands`` only.
``allowed_actors`` limits the ``actor`` names accepted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt

from .ledger import Command, Kind, State
from .poller import MeterEvent, Poller, hundredths, relay_from_status
from .service import CommandService, InvalidCommand
from .transports.mqtt import BROKER_INFLIGHT_LIMIT, DEFAULT_PORT, _granted, _no_delay, check_topic_level

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "meterlink/gw"
INVALID = "_invalid"
"""Result topic level for messages without a usable correlation id."""
COMMAND_FIELDS = frozenset({"correlation_id", "kind", "address", "params", "actor", "idempotency_key", "valid_until"})
_CORRELATION = re.compile(r"[^/+#\s\x00-\x1f\x7f]{1,128}")
MAX_ATTEMPTS = 5
"""Connections a result or event may fail to be published on before it is dropped (logged)."""
FINAL = frozenset({State.CONFIRMED, State.FAILED, State.REFUSED, State.UNKNOWN})
ALARM_STATES = frozenset({State.REFUSED, State.FAILED, State.UNKNOWN})


def _quiet_logger() -> logging.Logger:
    client_log = logging.getLogger(f"{__name__}.client")
    client_log.setLevel(logging.ERROR)  # hides "There are N pending publish calls." warnings
    return client_log


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def command_view(command: Command) -> dict[str, Any]:
    """The ledger's public view; a top-up's amount also as yuan (decimal string)."""
    view = command.public()
    params = dict(view["params"])
    if command.kind is Kind.TOPUP and "amount_fen" in params:
        params["amount"] = hundredths(params["amount_fen"])
    if command.kind is Kind.TOPUP and "energy_hundredths" in params:
        params["energy_kwh"] = hundredths(params["energy_hundredths"])
    view["params"] = params
    return view


class Rejected(ValueError):
    """A command message that is refused before anything is recorded."""

    def __init__(self, message: str, command: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.command = command


@dataclass(frozen=True, slots=True)
class Reply:
    """Where the results of one request go."""

    correlation_id: str
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass
class _Out:
    seq: int
    topic: str
    payload: bytes
    retain: bool = False
    correlation_data: bytes | None = None
    droppable: bool = False
    attempts: int = 0


@dataclass
class NorthboundStats:
    """Counters, for logs and tests."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    commands_in: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: int = 0
    published: int = 0
    publish_failures: int = 0
    requeued: int = 0
    dropped: int = 0
    last_error: str = "not started"
    by_status: dict[str, int] = field(default_factory=dict)


class MqttNorthbound:
    """Takes commands from ``<prefix>/commands`` into ``service`` and publishes results and events.

    ``url_or_host`` is a host name or ``mqtt://[user[:password]@]host[:port][/prefix]`` (a path
    in the URL is the prefix). Start with :meth:`start`, stop with :meth:`aclose`.
    """

    def __init__(
        self,
        service: CommandService,
        url_or_host: str = "127.0.0.1",
        port: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        *,
        identifier: str | None = None,
        username: str | None = None,
        password: str | None = None,
        allowed_actors: Iterable[str] | None = None,
        clean_session: bool = True,
        mqtt5: bool = False,
        queue_limit: int = 10_000,
        max_inflight: int = BROKER_INFLIGHT_LIMIT,
        keepalive: int = 30,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        publish_timeout: float = 5.0,
        flush_timeout: float = 5.0,
        max_payload: int = 64 * 1024,
        seed: int | None = None,
    ) -> None:
        host = url_or_host
        if "://" in url_or_host:
            parts = urlsplit(url_or_host)
            if parts.scheme != "mqtt":
                raise ValueError(f"MQTT northbound URL must be mqtt://...: {parts.scheme}:// given")
            if not parts.hostname:
                raise ValueError("MQTT northbound URL has no host")
            host = parts.hostname
            try:
                url_port = parts.port
            except ValueError:
                raise ValueError("MQTT northbound URL has a bad port") from None
            if url_port is not None:
                if port is not None and port != url_port:
                    raise ValueError(f"port {port} given and the URL says {url_port}")
                port = url_port
            if parts.username is not None and username is None:
                username = unquote(parts.username)
            if parts.password is not None and password is None:
                password = unquote(parts.password)
            path = parts.path.strip("/")
            if path:
                if prefix not in (DEFAULT_PREFIX, path):
                    raise ValueError(f"prefix {prefix!r} given and the URL says {path!r}")
                prefix = path
            if parts.query or parts.fragment:
                raise ValueError("MQTT northbound URL takes no query or fragment")
        if not host:
            raise ValueError("MQTT northbound needs a broker host")
        if not 1 <= max_inflight <= BROKER_INFLIGHT_LIMIT:
            raise ValueError(f"max_inflight must be 1..{BROKER_INFLIGHT_LIMIT} (the broker's limit)")
        if queue_limit < 1:
            raise ValueError("queue_limit must be at least 1")
        if not clean_session and not identifier:
            raise ValueError("a persistent session (clean_session=False) needs a fixed identifier")
        self.service = service
        self.host = host
        self.port = port or DEFAULT_PORT
        self.prefix = check_topic_level(prefix, "topic prefix", multi=True)
        self.username = username
        self.identifier = identifier or f"meterlink-nb-{uuid.uuid4().hex[:12]}"
        self.allowed_actors = frozenset(allowed_actors) if allowed_actors is not None else None
        self.clean_session = clean_session
        self.mqtt5 = mqtt5
        self.queue_limit = queue_limit
        self.max_inflight = max_inflight
        self.keepalive = keepalive
        self.publish_timeout = publish_timeout
        self.flush_timeout = flush_timeout
        self.max_payload = max_payload
        self.stats = NorthboundStats()
        self._password = password
        self._backoff = (backoff_initial, backoff_max)
        self._jitter = random.Random(seed)
        self._logger = _quiet_logger()
        self._seq = 0
        self._out: collections.deque[_Out] = collections.deque()
        self._out_event = asyncio.Event()
        self._inflight: dict[int, tuple[_Out, asyncio.Task[None]]] = {}
        self._slots = asyncio.Semaphore(max_inflight)
        self._intake: asyncio.Queue[aiomqtt.Message] = asyncio.Queue(1000)
        self._handling = False
        self._replies: dict[str, list[Reply]] = {}
        """Open command id -> where its final outcome goes."""
        self._recent_final: collections.OrderedDict[str, tuple[Command, dict[str, Any]]] = collections.OrderedDict()
        self._submitting: tuple[str, Reply] | None = None
        """(idempotency key, reply) of the command being submitted now, for its ``accepted`` event."""
        self._task: asyncio.Task[None] | None = None
        self._intake_task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._up = asyncio.Event()
        self._stopping = asyncio.Event()
        self._broken = asyncio.Event()
        self._closed = False
        self._pollers: list[Poller] = []

    # --- topics and description ------------------------------------------------------------

    @property
    def commands_topic(self) -> str:
        return f"{self.prefix}/commands"

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    def result_topic(self, correlation_id: str) -> str:
        return f"{self.prefix}/results/{correlation_id}"

    def event_topic(self, name: str) -> str:
        return f"{self.prefix}/events/{name}"

    @property
    def url(self) -> str:
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{user}{host}:{self.port}"

    @property
    def description(self) -> str:
        state = "connected" if self.connected else f"not connected ({self.stats.last_error})"
        return (
            f"MQTT northbound {self.url}: commands on {self.commands_topic}, results on {self.prefix}/results/<id>, "
            f"events on {self.prefix}/events/{{commands,relay,alarms}}; {state}"
        )

    def __repr__(self) -> str:
        return f"MqttNorthbound({self.url}/{self.prefix}, connected={self.connected}, queued={self.queued})"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._up.is_set()

    @property
    def queued(self) -> int:
        """Messages waiting to be published (not counting those in flight)."""
        return len(self._out)

    @property
    def pending(self) -> int:
        """Messages not yet acknowledged by the broker (queued and in flight)."""
        return len(self._out) + len(self._inflight)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self, wait: float = 0.0) -> MqttNorthbound:
        """Listen to the service and connect in the background; wait up to ``wait`` s for the broker.

        The gateway runs without the broker: the connection keeps retrying, results and events queue.
        """
        if self._closed:
            raise RuntimeError("the MQTT northbound is closed")
        if self._task is None:
            self.service.listeners.append(self._on_change)
            self._intake_task = asyncio.create_task(self._intake_loop(), name="mqtt northbound intake")
            self._task = asyncio.create_task(self._run(), name=f"mqtt northbound {self.url}")
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await self.wait_connected(wait)
        return self

    async def wait_connected(self, timeout: float) -> None:
        """Until connected and subscribed; TimeoutError with the last error after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while not self.connected:
                    await self._up.wait()
                    if not self.connected:
                        await asyncio.sleep(0.01)
        except TimeoutError:
            raise TimeoutError(f"{self.url}: not connected within {timeout:g} s: {self.stats.last_error}") from None

    async def wait_idle(self, timeout: float) -> None:
        """Until every queued result and event has its PUBACK (tests, shutdown)."""
        async with asyncio.timeout(timeout):
            while self.pending or not self._intake.empty() or self._handling:
                await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        """Stop taking commands, flush what is queued (bounded), publish ``offline``, disconnect."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.flush_timeout + 2 * self.publish_timeout + 1)
            except (TimeoutError, Exception):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        intake, self._intake_task = self._intake_task, None
        if intake is not None:
            intake.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await intake
        with contextlib.suppress(ValueError):
            self.service.listeners.remove(self._on_change)
        for poller in self._pollers:
            with contextlib.suppress(ValueError):
                poller.listeners.remove(self._on_meter_event)
        self._pollers.clear()
        if self.pending:
            log.warning("mqtt northbound %s closed with %d results/events unpublished", self.url, self.pending)

    def watch(self, poller: Poller) -> None:
        """Publish the poller's meter events (``events/relay`` and ``events/alarms``, ``"source": "meter"``)."""
        if poller not in self._pollers:
            self._pollers.append(poller)
            poller.listeners.append(self._on_meter_event)

    def _on_meter_event(self, event: MeterEvent) -> None:
        """Poller listener: a meter event, queued like the command events (never dropped first)."""
        if self._closed:
            return
        self._enqueue(self.event_topic(event.topic), event.payload)

    async def __aenter__(self) -> MqttNorthbound:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- connection loop ----------------------------------------------------------------------

    def _new_client(self) -> aiomqtt.Client:
        kwargs: dict[str, Any] = {}
        if self.mqtt5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean_session else 24 * 3600
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=self.clean_session, properties=props)
        else:
            kwargs.update(clean_session=self.clean_session)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self._password,
            identifier=self.identifier,
            keepalive=self.keepalive,
            logger=self._logger,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
            max_inflight_messages=self.max_inflight,
            max_concurrent_outgoing_calls=self.max_inflight + 2,
            timeout=self.publish_timeout,
            **kwargs,
        )
        client.pending_calls_threshold = 10 * self.max_inflight
        return client

    async def _run(self) -> None:
        initial, maximum = self._backoff
        backoff = initial
        while not self._stopping.is_set():
            client = self._new_client()
            was_up = False
            try:
                async with client:
                    _no_delay(client)
                    granted = await client.subscribe(self.commands_topic, qos=1, timeout=self.publish_timeout)
                    if not _granted(granted):
                        raise aiomqtt.MqttError(f"the broker refused the subscription {self.commands_topic}")
                    await client.publish(self.status_topic, b"online", qos=1, retain=True, timeout=self.publish_timeout)
                    self._client = client
                    self.stats.connects += 1
                    backoff = initial
                    was_up = True
                    self._up.set()
                    log.info("mqtt northbound %s connected as %s (%d queued)", self.url, self.identifier, self.queued)
                    await self._serve(client)
            except Exception as exc:
                self.stats.last_error = str(exc) or type(exc).__name__
                if not isinstance(exc, aiomqtt.MqttError):
                    log.exception("mqtt northbound %s: unexpected error", self.url)
                elif was_up:
                    log.warning(
                        "mqtt northbound %s lost: %s (%d queued)", self.url, self.stats.last_error, self.pending
                    )
                else:
                    self.stats.connect_failures += 1
                    log.debug("mqtt northbound %s not reachable: %s", self.url, self.stats.last_error)
            finally:
                self._client = None
                self._up.clear()
                if was_up:
                    self.stats.disconnects += 1
                await self._requeue_inflight()
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff * (0.5 + self._jitter.random()))
            backoff = min(backoff * 2, maximum)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Consume and publish until the connection drops (MqttError) or we stop (clean shutdown)."""
        self._broken = asyncio.Event()
        consumer = asyncio.create_task(self._consume(client), name="mqtt northbound consumer")
        publisher = asyncio.create_task(self._publish_loop(client), name="mqtt northbound publisher")
        broken = asyncio.create_task(self._broken.wait())
        stopping = asyncio.create_task(self._stopping.wait())
        tasks = (consumer, publisher, broken, stopping)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in (consumer, publisher):
                if task in done:
                    task.result()  # MqttError: the connection is lost
                    raise aiomqtt.MqttError("message iteration ended")
            if broken in done:
                raise aiomqtt.MqttError(self.stats.last_error)  # reconnect rather than retry on a bad connection
            # Clean shutdown: no new commands, finish those received, flush, say offline.
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_timeout):
                    while not self._intake.empty() or self._handling:
                        await asyncio.sleep(0.01)
                    while self.pending:
                        if publisher.done():
                            publisher.result()
                        await asyncio.sleep(0.01)
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            await client.publish(self.status_topic, b"offline", qos=1, retain=True, timeout=self.publish_timeout)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await task

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            await self._intake.put(message)  # bounded: back-pressure on the connection

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await self._slots.acquire()
            try:
                while not self._out:
                    self._out_event.clear()
                    await self._out_event.wait()
            except BaseException:
                self._slots.release()
                raise
            item = self._out.popleft()
            task = asyncio.create_task(self._publish_one(client, item))
            self._inflight[item.seq] = (item, task)

    async def _publish_one(self, client: aiomqtt.Client, item: _Out) -> None:
        try:
            properties = None
            if item.correlation_data is not None:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties

                properties = Properties(PacketTypes.PUBLISH)
                properties.CorrelationData = item.correlation_data
            await client.publish(
                item.topic, item.payload, qos=1, retain=item.retain, properties=properties, timeout=self.publish_timeout
            )
        except asyncio.CancelledError:
            raise  # the connection dropped: the loop re-queues everything still in flight
        except Exception as exc:
            self.stats.publish_failures += 1
            self.stats.last_error = f"publish to {item.topic}: {exc or type(exc).__name__}"
            item.attempts += 1
            if self._inflight.pop(item.seq, None) is not None:
                if item.attempts >= MAX_ATTEMPTS:
                    self.stats.dropped += 1
                    log.error("mqtt northbound: giving up on %s after %d attempts: %s", item.topic, item.attempts, exc)
                else:
                    self._requeue([item])
            # A publish that fails (no PUBACK in time, or the client already lost its socket) means the
            # connection is bad: reconnect (with backoff) instead of failing the whole queue in a loop.
            self._broken.set()
        else:
            self._inflight.pop(item.seq, None)
            self.stats.published += 1
        finally:
            self._slots.release()

    async def _requeue_inflight(self) -> None:
        """After a disconnect: cancel publishes still waiting for a PUBACK and queue them again, in order."""
        entries = list(self._inflight.values())
        for _, task in entries:
            task.cancel()
        for _, task in entries:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        items = [item for item, _ in self._inflight.values()]
        self._inflight.clear()
        self._slots = asyncio.Semaphore(self.max_inflight)  # a task cancelled before it ran never released its slot
        if items:
            self.stats.requeued += len(items)
            self._requeue(items)

    def _requeue(self, items: list[_Out]) -> None:
        for item in sorted(items, key=lambda i: i.seq, reverse=True):
            self._out.appendleft(item)
        self._out_event.set()

    def _enqueue(
        self, topic: str, payload: dict[str, Any], *, correlation_data: bytes | None = None, droppable: bool = False
    ) -> None:
        if len(self._out) >= self.queue_limit:
            victim = next((i for i, item in enumerate(self._out) if item.droppable), 0)
            dropped = self._out[victim]
            del self._out[victim]
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                log.warning(
                    "mqtt northbound %s: queue full (%d), dropped %s (%d dropped so far)",
                    self.url,
                    self.queue_limit,
                    dropped.topic,
                    self.stats.dropped,
                )
        self._seq += 1
        self._out.append(_Out(self._seq, topic, _json(payload), correlation_data=correlation_data, droppable=droppable))
        self._out_event.set()

    # --- commands in ---------------------------------------------------------------------------

    async def _intake_loop(self) -> None:
        while True:
            message = await self._intake.get()
            self._handling = True
            try:
                await self.handle(message)
            except Exception:
                log.exception("mqtt northbound: a command message failed")
            finally:
                self._handling = False

    def _properties(self, message: aiomqtt.Message) -> tuple[str | None, bytes | None]:
        """MQTT 5 ResponseTopic (if acceptable) and CorrelationData of a request."""
        props = getattr(message, "properties", None)
        if props is None:
            return None, None
        cdata = getattr(props, "CorrelationData", None)
        rtopic = getattr(props, "ResponseTopic", None)
        if cdata is not None and not isinstance(cdata, bytes):
            cdata = bytes(cdata)
        if rtopic is not None:
            rtopic = self._check_response_topic(str(rtopic))
        return rtopic, cdata

    @staticmethod
    def _correlation(data: dict[str, Any], cdata: bytes | None) -> str:
        """The request's correlation id; raises _NoReply if there is no usable one."""
        cid = data.get("correlation_id")
        if cid is None and cdata is not None:
            with contextlib.suppress(UnicodeDecodeError):
                cid = cdata.decode()
        if cid is None:
            raise _NoReply("correlation_id is required (a string that names the result topic)")
        if not isinstance(cid, str) or not _CORRELATION.fullmatch(cid) or cid == INVALID:
            shown = cid[:140] if isinstance(cid, str) else cid
            raise _NoReply(
                f"correlation_id {shown!r} is not usable: 1..128 characters without '/', '+', '#', "
                "white space or control characters"
            )
        return cid

    def _check_response_topic(self, topic: str) -> str | None:
        if (
            not topic
            or len(topic) > 256
            or "+" in topic
            or "#" in topic
            or "\x00" in topic
            or topic.startswith("$")
            or (topic.startswith(f"{self.prefix}/") and not topic.startswith(f"{self.prefix}/results/"))
        ):
            log.warning("mqtt northbound: ignoring the response topic %r", topic)
            return None
        return topic

    def _publish_result(self, reply: Reply, payload: dict[str, Any]) -> None:
        self.stats.by_status[payload["status"]] = self.stats.by_status.get(payload["status"], 0) + 1
        self._enqueue(self.result_topic(reply.correlation_id), payload)
        if reply.response_topic and reply.response_topic != self.result_topic(reply.correlation_id):
            self._enqueue(reply.response_topic, payload, correlation_data=reply.correlation_data)

    async def handle(self, message: aiomqtt.Message) -> None:
        """One message from ``<prefix>/commands``: record it (or reject it) and publish the acceptance."""
        self.stats.commands_in += 1
        rtopic, cdata = self._properties(message)
        raw = message.payload
        try:
            if isinstance(raw, str):
                raw = raw.encode()
            if not isinstance(raw, bytes | bytearray):
                raise _NoReply("the payload must be a JSON object")
            if len(raw) > self.max_payload:
                raise _NoReply(f"the payload is {len(raw)} bytes, more than {self.max_payload}")
            try:
                data = json.loads(bytes(raw).decode("utf-8"), parse_float=Decimal)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _NoReply(f"the payload is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise _NoReply(f"the payload must be a JSON object, not {type(data).__name__}")
            reply = Reply(self._correlation(data, cdata), rtopic, cdata)
        except _NoReply as exc:
            self.stats.rejected += 1
            log.info("mqtt northbound: rejected a command without a usable correlation id: %s", exc)
            self._publish_result(
                Reply(INVALID, rtopic, cdata),
                {"correlation_id": None, "status": "rejected", "command": None, "error": str(exc)},
            )
            return
        try:
            await self._submit(reply, data, bool(message.retain))
        except Rejected as exc:
            self.stats.rejected += 1
            log.info("mqtt northbound: rejected %s: %s", reply.correlation_id, exc)
            self._publish_result(
                reply,
                {
                    "correlation_id": reply.correlation_id,
                    "status": "rejected",
                    "command": exc.command,
                    "error": str(exc),
                },
            )
        except Exception as exc:
            self.stats.errors += 1
            log.exception("mqtt northbound: command %s failed", reply.correlation_id)
            self._publish_result(
                reply,
                {
                    "correlation_id": reply.correlation_id,
                    "status": "error",
                    "command": None,
                    "error": f"gateway error, nothing recorded, send it again: {type(exc).__name__}: {exc}",
                },
            )

    async def _submit(self, reply: Reply, data: dict[str, Any], retained: bool = False) -> None:
        if retained:
            raise Rejected("retained commands are refused (clear the retained message on the commands topic)")
        unknown = sorted(set(data) - COMMAND_FIELDS)
        if unknown:
            raise Rejected(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(COMMAND_FIELDS))})")
        kind = data.get("kind")
        if not isinstance(kind, str) or not kind:
            raise Rejected(f"kind is required: one of {', '.join(k.value for k in Kind)}")
        address = data.get("address")
        if not isinstance(address, str) or not address:
            raise Rejected("address is required (the meter's 12-digit address as a string)")
        params = data.get("params", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise Rejected("params must be a JSON object")
        params = {k: str(v) if isinstance(v, Decimal) else v for k, v in params.items()}
        actor = data.get("actor")
        if not isinstance(actor, str) or not actor.strip():
            raise Rejected("actor (who asks) is required")
        if self.allowed_actors is not None and actor not in self.allowed_actors:
            raise Rejected(f"actor {actor!r} is not allowed to send commands over MQTT")
        key = data.get("idempotency_key")
        if key is None:
            key = f"mqtt:{reply.correlation_id}"
        elif not isinstance(key, str):
            raise Rejected("idempotency_key must be a string")
        valid_until = data.get("valid_until")
        when: datetime | None = None
        if valid_until is not None:
            if not isinstance(valid_until, str):
                raise Rejected("valid_until must be an ISO 8601 string with a zone")
            try:
                when = datetime.fromisoformat(valid_until)
            except ValueError:
                raise Rejected(f"valid_until {valid_until!r} is not ISO 8601") from None
        self._submitting = (key, reply)
        try:
            command, created = await self.service.submit(key, kind, address, params, actor, valid_until=when)
        except (InvalidCommand, ValueError, TypeError, ArithmeticError) as exc:
            # raised by validation, before anything is written
            raise Rejected(str(exc) or type(exc).__name__) from None
        finally:
            self._submitting = None
        if not created:
            try:
                clean = self.service.validate(Kind(kind), self.service.meter(address), params)
                same = command.kind is Kind(kind) and command.address == self.service.meter(address).address
                same = same and command.params == json.loads(_json(clean))
            except (ValueError, TypeError, ArithmeticError):
                same = False
            if not same:
                raise Rejected(
                    f"idempotency key {key!r} was already used for a different command ({command.id}: "
                    f"{command.kind.value} on {command.address})",
                    command_view(command),
                )
        self.stats.accepted += created
        self.stats.duplicates += not created
        self._publish_result(
            reply,
            {
                "correlation_id": reply.correlation_id,
                "status": "accepted" if created else "duplicate",
                "command": command_view(command),
            },
        )
        seen = self._recent_final.get(command.id)
        if command.state.final or seen is not None:
            if seen is not None and not command.state.final:
                final, detail = seen
                self._publish_result(reply, self._final(reply, final, detail))
            return  # a duplicate of a finished command: its state is in the answer
        replies = self._replies.setdefault(command.id, [])
        if reply not in replies:
            replies.append(reply)

    # --- results and events out -------------------------------------------------------------------

    @staticmethod
    def _final(reply: Reply, command: Command, detail: dict[str, Any]) -> dict[str, Any]:
        return {
            "correlation_id": reply.correlation_id,
            "status": command.state.value,
            "command": command_view(command),
            "detail": detail,
        }

    def _on_change(self, command: Command, info: dict[str, Any]) -> None:
        """Service listener: called after every state change (synchronously, in the event loop)."""
        event = str(info.get("event", command.state.value))
        detail = info.get("detail") or {}
        at = self.service.now().isoformat()
        view = command_view(command)
        replies = list(self._replies.get(command.id, []))
        if self._submitting is not None and event == "accepted" and command.idempotency_key == self._submitting[0]:
            replies.append(self._submitting[1])
        self._enqueue(
            self.event_topic("commands"),
            {
                "event": event,
                "at": at,
                "command": view,
                "detail": detail,
                "correlation_ids": [r.correlation_id for r in replies],
            },
            droppable=True,
        )
        if command.state not in FINAL:
            return
        self._recent_final[command.id] = (command, detail)
        while len(self._recent_final) > 10_000:
            self._recent_final.popitem(last=False)
        for reply in self._replies.pop(command.id, []):
            self._publish_result(reply, self._final(reply, command, detail))
        if command.kind is Kind.RELAY and command.state is State.CONFIRMED:
            result = command.result or {}
            self._enqueue(
                self.event_topic("relay"),
                {
                    "source": "command",
                    "address": command.address,
                    "action": command.params.get("action"),
                    "relay": relay_from_status(result.get("status_word_3")),
                    "relay_open": result.get("relay_open"),
                    "power_hold": result.get("power_hold"),
                    "command_id": command.id,
                    "at": at,
                    "result": result,
                },
            )
        if command.state in ALARM_STATES:
            if "rule" in detail:
                by = "policy"
            elif detail.get("by") == "meter" or "serr" in detail:
                by = "meter"
            else:
                by = "gateway"
            self._enqueue(
                self.event_topic("alarms"),
                {
                    "source": "command",
                    "alarm": command.state.value,
                    "severity": "critical" if command.state is State.UNKNOWN else "warning",
                    "by": by,
                    "rule": detail.get("rule"),
                    "reason": detail.get("reason") or detail.get("error") or "",
                    "address": command.address,
                    "kind": command.kind.value,
                    "command_id": command.id,
                    "at": at,
                    "command": view,
                },
            )


class _NoReply(Exception):
    """A message rejected before a correlation id is known: answered on ``results/_invalid``."""


__all__ = ["DEFAULT_PREFIX", "MqttNorthbound", "NorthboundStats", "command_view"]
