"""The buses behind an MQTT broker, like 4G DTUs that tunnel RS-485 bytes over MQTT.

Topics (``<prefix>`` has no wildcards; ``<id>`` is one topic level):

* ``<prefix>/<id>/down`` — master → line. Subscribed with QoS 1 (as ``<prefix>/+/down``).
  The payload is raw bytes as the master would put them on the wire: one frame, part of a
  frame or several frames; every id has its own deframer, so a frame may span messages.
* ``<prefix>/<id>/up`` — line → master. Published with QoS 1, one message per reply
  chunk, after the bus's line timing (a BYTE_GAPS fault gives several messages, a
  collision gives garbage, a silent meter gives nothing).

``<id>`` is a bus name (one DTU per RS-485 segment), or in DTU mode (``dtu=True``) a
meter address: one meter behind each modem, so the request reaches only that meter
(a wildcard request then gets that meter's reply, no collision). Ids are resolved per
message, so meters and buses added later are reachable without resubscribing; messages for
unknown ids are counted and dropped.

aiomqtt 2.x (shared/reference/deps.md §1): reconnecting is manual, so :meth:`_run` loops
with exponential backoff on :class:`aiomqtt.MqttError`; in-flight QoS>0 messages and
concurrent publishes are capped at 20 (mosquitto's default limit, beyond which messages are
lost silently); the "N pending publish calls" warning is silenced; :meth:`aclose` cancels
the consumer task first, then the per-id workers. Per message, publishes, PUBACKs, received
messages and socket writes bypass aiomqtt's per-message tasks and queues and go to its paho
client directly (:class:`_Direct`, measured by ``bench/mqtt.py``); Nagle is off on the socket
(TCP_NODELAY, as the gateway does), and several packets due at once leave as one TCP segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho_mqtt

from ..bus import DEFAULT_IDLE_FLUSH, Bus, BusPort, mapping_of

log = logging.getLogger(__name__)

BROKER_INFLIGHT_LIMIT = 20
"""mosquitto's default ``max_inflight_messages``; exceeding it drops messages silently."""


def _no_delay(client: aiomqtt.Client) -> None:
    """Turn Nagle off on the client's socket, as the gateway's MQTT connection does.

    paho never sets TCP_NODELAY: the reply published right after the PUBACK of a request is a
    second small write with the first one unacknowledged, so it waits for the broker's delayed
    ACK (~40 ms on Linux) on every transaction. Guarded: paho's private client, or a socket
    that is not a plain one (websockets, TLS wrappers that refuse it), leaves Nagle on.
    """
    paho = getattr(client, "_client", None)
    sock = paho.socket() if paho is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _quiet_logger() -> logging.Logger:
    client_log = logging.getLogger(f"{__name__}.client")
    client_log.setLevel(logging.ERROR)  # hides "There are N pending publish calls." warnings
    return client_log


_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux


def _set_cork(sock: socket.socket, on: int) -> bool:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, on)  # type: ignore[arg-type]
    except OSError:
        return False
    return True


class _ConnectionLost(Exception):
    """A PUBACK that will never come: the connection it was due on is gone."""


class _Direct:
    """The per-message fast path on an aiomqtt 2.x client's paho client (profiled with bench/mqtt.py).

    The same as ``gateway.transports.mqtt._Direct`` (the simulator does not import the gateway;
    keep the two in step). aiomqtt spends more per message than the bus and the meter: each
    publish is a task waiting on an ``asyncio.Event``, each received message an
    ``aiomqtt.Message`` through a queue and a new task, each packet to write a wake-up through
    the loop's self-pipe. On the loop thread this does the same with less: :meth:`publish`
    returns a future resolved by paho's ``on_publish`` (failed by :meth:`fail_all` when the
    connection is gone); received messages go from paho's ``on_message`` straight to
    ``on_message(topic, payload)``; packets queued during one pass of the event loop are
    written together at its end, corked into one TCP segment when there are several
    (aiomqtt's writer takes over while the socket is full).
    Subscribing, keep-alive, connecting and disconnect detection stay with aiomqtt;
    :meth:`install` returns None (everything through aiomqtt) if the client is not as expected.
    """

    def __init__(self, paho: paho_mqtt.Client, on_message: Callable[[str, bytes], None]) -> None:
        self.paho = paho
        self.loop = asyncio.get_running_loop()
        self.acks: dict[int, asyncio.Future[None]] = {}
        self._thread = threading.get_ident()
        self._flush_due = False
        self._on_message = on_message
        self._aiomqtt_on_publish = paho.on_publish
        self._aiomqtt_register_write = paho.on_socket_register_write
        paho.on_publish = self._acked
        paho.on_message = self._received
        paho.on_socket_register_write = self._register_write

    @classmethod
    def install(cls, client: aiomqtt.Client, on_message: Callable[[str, bytes], None]) -> _Direct | None:
        paho = getattr(client, "_client", None)
        if not isinstance(paho, paho_mqtt.Client) or paho.on_publish is None or paho.on_socket_register_write is None:
            return None
        return cls(paho, on_message)

    def publish(self, topic: str, payload: bytes, qos: int) -> tuple[int, asyncio.Future[None] | None]:
        """Queue a publish; (mid, future of its PUBACK, or None if already done). Raises MqttError."""
        info = self.paho.publish(topic, payload, qos)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():
            return info.mid, None
        future = self.loop.create_future()
        self.acks[info.mid] = future
        return info.mid, future

    def fail_all(self) -> None:
        """The connection is gone: every PUBACK still awaited fails."""
        acks, self.acks = self.acks, {}
        for future in acks.values():
            if not future.done():
                future.set_exception(_ConnectionLost())

    def _acked(self, client: paho_mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        future = self.acks.pop(mid, None)
        if future is None:
            self._aiomqtt_on_publish(client, userdata, mid, reason, properties)  # one of aiomqtt's own
        elif not future.done():
            future.set_result(None)

    def _received(self, client: paho_mqtt.Client, userdata: Any, message: paho_mqtt.MQTTMessage) -> None:
        try:
            self._on_message(message.topic, message.payload)
        except Exception:  # never into paho: it would drop the connection
            log.exception("mqtt bridge: failed to handle a message")

    def _register_write(self, client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self._thread:  # paho's connect() runs in an executor thread
            self._aiomqtt_register_write(client, userdata, sock)
        elif not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush, client, userdata, sock)

    def _flush(self, client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
        self._flush_due = False
        paho = self.paho
        raw = paho.socket()
        if raw is None:
            return
        # Several packets due (e.g. PUBACKs and publishes of many DTUs): cork the socket so that
        # they leave as one TCP segment, not one segment (and one wake-up of the broker) each.
        cork = _TCP_CORK is not None and isinstance(raw, socket.socket) and len(getattr(paho, "_out_packet", ())) > 1
        if cork:
            cork = _set_cork(raw, 1)  # type: ignore[arg-type]
        try:
            with contextlib.suppress(Exception):  # a broken socket: aiomqtt's writer below meets it and reports it
                paho.loop_write()
        finally:
            if cork:
                _set_cork(raw, 0)  # type: ignore[arg-type]  # sends what was corked, at once
        if paho.want_write():  # the socket is full (or broken): aiomqtt's writer waits until it can write
            self._aiomqtt_register_write(client, userdata, sock)


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


@dataclass
class MqttBridgeStats:
    """Counters of the bridge."""

    connects: int = 0
    connect_failures: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    unknown_ids: int = 0
    replies_out: int = 0
    replies_dropped: int = 0


class MqttBusBridge:
    """Serves buses over MQTT: ``<prefix>/<id>/down`` in, ``<prefix>/<id>/up`` out."""

    def __init__(
        self,
        buses: Mapping[str, Bus] | Iterable[Bus],
        url_or_host: str = "127.0.0.1",
        port: int | None = None,
        prefix: str = "meterlink/sim",
        *,
        dtu: bool = False,
        identifier: str | None = None,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        qos: int = 1,
        max_inflight: int = BROKER_INFLIGHT_LIMIT,
        idle_flush: float = DEFAULT_IDLE_FLUSH,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        publish_timeout: float = 10.0,
        seed: int | None = None,
    ) -> None:
        prefix = prefix.strip("/")
        if not prefix or "+" in prefix or "#" in prefix:
            raise ValueError(f"MQTT topic prefix {prefix!r} must be non-empty and contain no wildcards")
        if not 1 <= max_inflight <= BROKER_INFLIGHT_LIMIT:
            raise ValueError(f"max_inflight must be 1..{BROKER_INFLIGHT_LIMIT} (the broker's limit)")
        if "://" in url_or_host:
            url = urlsplit(url_or_host)
            if url.scheme not in ("mqtt", "tcp"):
                raise ValueError(f"unsupported MQTT URL scheme {url.scheme!r} (use mqtt://host:port)")
            self.host = url.hostname or "127.0.0.1"
            self.port = url.port or port or 1883
            username = username or url.username
            password = password or url.password
        else:
            self.host = url_or_host
            self.port = port or 1883
        self.buses = mapping_of(buses)
        self.prefix = prefix
        self.dtu = dtu
        self.identifier = identifier or f"meterlink-sim-{uuid.uuid4().hex[:12]}"
        self.stats = MqttBridgeStats()
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        """Why the last connection attempt failed (None once connected)."""
        self._failed = asyncio.Event()  # set by each failed connection attempt
        self._username = username
        self._password = password
        self._clean_session = clean_session
        self._qos = qos
        self._max_inflight = max_inflight
        self._idle_flush = idle_flush
        self._backoff = (backoff_initial, backoff_max)
        self._jitter = random.Random(seed)
        self._client: aiomqtt.Client | None = None
        self._ports: dict[str, BusPort] = {}
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[None]] = set()
        self._direct: _Direct | None = None
        self._slots = asyncio.Semaphore(max_inflight)
        self._publish_timeout = publish_timeout
        self._closing = False
        self._logger = _quiet_logger()

    @property
    def description(self) -> str:
        mode = "DTU mode, one id per meter" if self.dtu else "one id per bus"
        return (
            f"mqtt://{self.host}:{self.port} {self.prefix}/<id>/down -> {self.prefix}/<id>/up "
            f"({mode}; buses: {', '.join(self.buses) or 'none'})"
        )

    def __str__(self) -> str:
        return self.description

    def down_topic(self, ident: str) -> str:
        return f"{self.prefix}/{ident}/down"

    def up_topic(self, ident: str) -> str:
        return f"{self.prefix}/{ident}/up"

    def ids(self) -> list[str]:
        """The ids currently reachable (bus names, or meter addresses in DTU mode)."""
        if not self.dtu:
            return list(self.buses)
        return [address for bus in self.buses.values() for address in bus.meters]

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, wait: float | None = 5.0, *, fail_fast: bool = False) -> MqttBusBridge:
        """Start the connection loop; wait up to ``wait`` seconds for the first subscription.

        Raises :class:`TimeoutError` if the broker was not reached in time, with the last
        connection error in its message (the loop keeps retrying in the background; call
        :meth:`aclose` to stop it). ``fail_fast``: raise :class:`ConnectionError` with the reason
        as soon as one attempt fails (refused, unknown host) instead of waiting for a retry
        to succeed. ``wait=None`` returns at once.
        """
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mqtt-bus-bridge")
        if wait is None:
            return self
        where = f"MQTT broker {self.host}:{self.port}"
        waits = {asyncio.ensure_future(self.connected.wait())}
        if fail_fast:
            self._failed.clear()
            waits.add(asyncio.ensure_future(self._failed.wait()))
        try:
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.connected.is_set():
            return self
        if fail_fast and self._failed.is_set():
            raise ConnectionError(f"{where} not reachable: {self.last_error}")
        reason = f": {self.last_error}" if self.last_error else ""
        raise TimeoutError(f"{where} not reached within {wait:g} s{reason}")

    async def aclose(self) -> None:
        """Cancel the consumer (disconnecting cleanly), then every per-id worker."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        ports, self._ports = list(self._ports.values()), {}
        for port in ports:
            await port.close()

    async def __aenter__(self) -> MqttBusBridge:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self._username,
            password=self._password,
            identifier=self.identifier,
            clean_session=self._clean_session,
            logger=self._logger,
            max_inflight_messages=self._max_inflight,
            max_concurrent_outgoing_calls=self._max_inflight,
        )
        client.pending_calls_threshold = 10 * self._max_inflight
        return client

    async def _run(self) -> None:
        initial, maximum = self._backoff
        backoff = initial
        while not self._closing:
            client = self._new_client()
            try:
                async with client:
                    _no_delay(client)
                    self._direct = _Direct.install(client, self._deliver)
                    self._client = client
                    await client.subscribe(f"{self.prefix}/+/down", qos=self._qos)
                    self.stats.connects += 1
                    self.last_error = None
                    backoff = initial
                    self.connected.set()
                    log.info("mqtt bridge connected to %s:%s as %s", self.host, self.port, self.identifier)
                    async for message in client.messages:
                        self._on_message(message)
            except aiomqtt.MqttError as exc:
                if self.connected.is_set():
                    log.warning("mqtt bridge lost %s:%s: %s", self.host, self.port, exc)
                else:
                    self.stats.connect_failures += 1
                    log.debug("mqtt bridge cannot reach %s:%s: %s", self.host, self.port, exc)
                self.last_error = str(exc) or type(exc).__name__
                self._failed.set()
            finally:
                self._client = None
                self.connected.clear()
                for task in list(self._inflight):  # their PUBACKs died with the connection
                    task.cancel()
                if self._direct is not None:
                    self._direct.fail_all()
                    self._direct = None
            if self._closing:
                break
            await asyncio.sleep(backoff * (0.5 + self._jitter.random()))
            backoff = min(backoff * 2, maximum)

    # --- traffic ----------------------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        self._deliver(message.topic.value, message.payload)

    def _deliver(self, topic: str, payload: Any) -> None:
        self.stats.messages_in += 1
        ident = topic[len(self.prefix) + 1 : -len("/down")]
        if isinstance(payload, str):
            payload = payload.encode("latin-1")
        if not isinstance(payload, bytes | bytearray) or not payload:
            return
        port = self._port_for(ident)
        if port is None:
            self.stats.unknown_ids += 1
            log.debug("mqtt bridge: no bus for id %r", ident)
            return
        self.stats.bytes_in += len(payload)
        port.feed(bytes(payload))

    def _route(self, ident: str) -> tuple[Bus, str | None] | None:
        if not self.dtu:
            bus = self.buses.get(ident)
            return (bus, None) if bus is not None else None
        for bus in self.buses.values():
            if ident in bus:
                return bus, ident
        return None

    def _port_for(self, ident: str) -> BusPort | None:
        route = self._route(ident)
        port = self._ports.get(ident)
        if route is None:
            return None
        bus, only = route
        if port is not None and port.bus is bus:
            return port
        if port is not None:  # the meter moved to another bus
            port.abort()
        topic = self.up_topic(ident)

        async def write(data: bytes) -> None:
            await self._publish(topic, data)

        port = BusPort(bus, write, idle_flush=self._idle_flush, only=only, name=f"{bus.name}/mqtt:{ident}")
        self._ports[ident] = port
        return port

    async def _publish(self, topic: str, data: bytes) -> None:
        """Publish one reply chunk; waits for the PUBACK, gives up if the connection drops.

        aiomqtt 2.5.1 does not fail pending publishes when the connection is lost: a publish
        whose PUBACK never came would hang until the client timeout (10 s) and block this
        id's worker. So each publish runs as a task that :meth:`_run` cancels on disconnect.
        """
        client = self._client
        if client is None:
            self.stats.replies_dropped += 1
            return
        if self._direct is not None:
            await self._publish_direct(self._direct, topic, data)
            return
        task = asyncio.ensure_future(client.publish(topic, data, qos=self._qos, timeout=self._publish_timeout))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.cancelled() or task.exception() is not None:
            self.stats.replies_dropped += 1
            log.debug(
                "mqtt bridge: reply on %s dropped: %s", topic, "disconnected" if task.cancelled() else task.exception()
            )
            return
        self.stats.replies_out += 1

    async def _publish_direct(self, direct: _Direct, topic: str, data: bytes) -> None:
        """:meth:`_publish` through :class:`_Direct`: the same outcomes, without a task per publish."""
        async with self._slots:  # as aiomqtt's max_concurrent_outgoing_calls did
            try:
                mid, future = direct.publish(topic, data, self._qos)
            except (aiomqtt.MqttError, ValueError) as exc:
                self.stats.replies_dropped += 1
                log.debug("mqtt bridge: reply on %s dropped: %s", topic, exc)
                return
            if future is not None:
                timer = direct.loop.call_later(self._publish_timeout, _time_out, future)
                try:
                    await future
                except (_ConnectionLost, TimeoutError) as exc:
                    self.stats.replies_dropped += 1
                    reason = "disconnected" if isinstance(exc, _ConnectionLost) else "Operation timed out"
                    log.debug("mqtt bridge: reply on %s dropped: %s", topic, reason)
                    return
                finally:
                    timer.cancel()
                    if direct.acks.get(mid) is future:
                        del direct.acks[mid]
        self.stats.replies_out += 1


async def start_mqtt_bridge(
    buses: Mapping[str, Bus] | Iterable[Bus],
    url_or_host: str = "127.0.0.1",
    port: int | None = None,
    prefix: str = "meterlink/sim",
    *,
    wait: float | None = 5.0,
    fail_fast: bool = False,
    **options: object,
) -> MqttBusBridge:
    """Create and start a :class:`MqttBusBridge` (see its options and :meth:`MqttBusBridge.start`)."""
    bridge = MqttBusBridge(buses, url_or_host, port, prefix, **options)  # type: ignore[arg-type]
    try:
        await bridge.start(wait, fail_fast=fail_fast)
    except BaseException:
        await bridge.aclose()
        raise
    return bridge
