"""Lines behind MQTT DTUs: request bytes to ``<prefix>/<id>/down``, reply bytes from ``<prefix>/<id>/up``.

One :class:`MqttTransport` per DTU id; all of them on the same broker share one
:class:`MqttConnection` (one aiomqtt client: 100 DTUs are one TCP connection, not 100). The
connection subscribes ``<prefix>/+/up`` once per prefix (QoS 1) and routes each message to the
transport(s) of its id; messages for ids nobody opened are counted and dropped.

aiomqtt 2.x (shared/reference/deps.md §1) does not reconnect by itself, so the connection runs
its own loop: on :class:`aiomqtt.MqttError` it waits (exponential backoff with jitter),
connects with a fresh client, resubscribes every prefix, and only then counts as connected.
While it is down:

* ``write`` raises :class:`~gateway.errors.LinkDown` at once (a request is never dropped
  silently, the scheduler retries), and so does a write whose PUBACK had not come when the
  connection dropped — that request may or may not have reached the DTU;
* a ``read`` that is waiting wakes with :class:`LinkDown`, and new reads raise it too
  (bytes received before the drop are still returned first);
* ``open()`` asks for a connection attempt now (not after the backoff) and waits for its
  outcome: connected, or :class:`~gateway.errors.LinkDown` as soon as that attempt fails
  (a refused connection fails at once, as a TCP converter's does), at most ``open_timeout``
  seconds (a broker that accepts the TCP connection but never answers). An attempt made for
  ``open()`` comes at least ``retry_spacing`` (default ``backoff_initial``) after a failed
  one, and transports asking at once share one attempt: no reconnection storm.

Publishes are QoS 1 and wait for the PUBACK, at most ``publish_timeout`` seconds (a publish
waiting for a PUBACK can hang when the connection drops, so the connection loop fails every
one still waiting on disconnect). At most 20 publishes are in flight at once: mosquitto's
default ``max_inflight_messages`` is 20, and beyond it messages are lost silently. The client's
"N pending publish calls" warnings are silenced; closing cancels the consumer task first.

Per message, publishes, PUBACKs, received messages and socket writes bypass aiomqtt's
machinery (tasks, events and queues per message) and go to its paho client directly
(:class:`_Direct`, on the event loop's thread; measured by ``bench/mqtt.py``); connecting,
subscribing, keep-alive and noticing a lost connection stay with aiomqtt. Nagle is off on the
socket (TCP_NODELAY), and several packets due at once leave corked as one TCP segment.

Sessions are clean (``clean_session=True``): replies published while the gateway was
disconnected are not replayed later (they would only be late replies, dropped anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import aiomqtt
import paho.mqtt.client as paho_mqtt

from ..errors import LinkDown
from ._stream import InboxTransport

log = logging.getLogger(__name__)

BROKER_INFLIGHT_LIMIT = 20
"""mosquitto's default ``max_inflight_messages``; more QoS>0 messages in flight are lost silently."""

DEFAULT_PORT = 1883


def _quiet_logger() -> logging.Logger:
    client_log = logging.getLogger(f"{__name__}.client")
    client_log.setLevel(logging.ERROR)  # hides "There are N pending publish calls." warnings
    return client_log


def _no_delay(client: aiomqtt.Client) -> None:
    """Turn Nagle off: paho leaves it on, so a request sent right after a PUBACK waits ~40 ms
    for the broker's delayed ACK (measured: 44 ms per publish on loopback, 0.3 ms without)."""
    paho = getattr(client, "_client", None)
    sock = paho.socket() if paho is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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

    aiomqtt spends more per message than the rest of a transaction: each publish is a task
    (``asyncio.wait_for``) waiting on an ``asyncio.Event``, each received message becomes an
    ``aiomqtt.Message`` with a validated ``Topic`` that goes through a queue and a new task per
    message, and each packet queued for writing wakes the loop through its self-pipe
    (``call_soon_threadsafe``) before the socket is written. On the loop thread this does the
    same with less:

    * :meth:`publish` gives paho the message and returns a future resolved by paho's
      ``on_publish`` (the PUBACK), failed by :meth:`fail_all` when the connection is gone;
    * received messages go from paho's ``on_message`` straight to ``on_message(topic, payload)``;
    * packets queued during one pass of the event loop are written together at the end of it
      (``call_soon``), one ``loop_write`` for all, corked into one TCP segment when there are
      several; if the socket cannot take them all, aiomqtt's own writer takes over until it can.

    Subscribing, keep-alive, connecting (paho's ``connect`` runs in an executor thread: its
    writes still go through aiomqtt) and disconnect detection (``client.messages`` raising
    :class:`aiomqtt.MqttError`) are unchanged. :meth:`install` returns None, and everything
    goes through aiomqtt as before, if the client does not look as expected.
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

    # --- paho callbacks (on the loop thread, inside paho's read and write calls) ---------------

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
            log.exception("mqtt: failed to handle a message")

    def _register_write(self, client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self._thread:
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


def _granted(result: Any) -> bool:
    """Whether a SUBACK granted every subscription (3.1.1: QoS 0..2, 0x80 = failure; 5: reason codes)."""
    for code in result if isinstance(result, list | tuple) else [result]:
        failure = getattr(code, "is_failure", None)
        if failure if failure is not None else int(code) >= 0x80:
            return False
    return True


def check_topic_level(value: str, what: str, *, multi: bool = False) -> str:
    """Validate a topic prefix (``multi``: several levels) or one level; raises ValueError."""
    value = value.strip("/") if multi else value
    if not value:
        raise ValueError(f"empty MQTT {what}")
    if "+" in value or "#" in value:
        raise ValueError(f"MQTT {what} {value!r} must not contain wildcards (+ or #)")
    if not multi and "/" in value:
        raise ValueError(f"MQTT {what} {value!r} must be one topic level (no '/')")
    if multi and "" in value.split("/"):
        raise ValueError(f"MQTT {what} {value!r} has an empty level")
    if "\x00" in value:
        raise ValueError(f"MQTT {what} {value!r} contains NUL")
    return value


@dataclass
class MqttStats:
    """Counters of a shared connection."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    messages_in: int = 0
    unknown_ids: int = 0
    published: int = 0
    publish_failures: int = 0
    inflight: int = 0
    """Publishes sent and waiting for their PUBACK now."""
    peak_inflight: int = 0
    """The most there have been at once (never above the connection's ``max_inflight``)."""


class MqttConnection:
    """One MQTT client shared by every DTU transport on a broker; reconnects by itself.

    Get the process-wide one for a broker with :meth:`shared` (what :class:`MqttTransport`
    and ``open_transport`` use), or make your own and pass it as ``connection=``.
    """

    _shared: ClassVar[dict[tuple[str, int, str | None], MqttConnection]] = {}

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        username: str | None = None,
        password: str | None = None,
        identifier: str | None = None,
        qos: int = 1,
        max_inflight: int = BROKER_INFLIGHT_LIMIT,
        keepalive: int = 30,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        publish_timeout: float = 5.0,
        seed: int | None = None,
        retry_spacing: float | None = None,
    ) -> None:
        if not 1 <= max_inflight <= BROKER_INFLIGHT_LIMIT:
            raise ValueError(f"max_inflight must be 1..{BROKER_INFLIGHT_LIMIT} (the broker's limit)")
        if qos not in (1, 2):
            raise ValueError("qos must be 1 or 2 (requests must not be lost silently)")
        self.host = host
        self.port = port
        self.username = username
        self.identifier = identifier or f"meterlink-gw-{uuid.uuid4().hex[:12]}"
        self.qos = qos
        self.max_inflight = max_inflight
        self.keepalive = keepalive
        self.publish_timeout = publish_timeout
        self.stats = MqttStats()
        self.last_error = "not started"
        self._password = password
        self._backoff = (backoff_initial, backoff_max)
        self._spacing = backoff_initial if retry_spacing is None else retry_spacing
        self._jitter = random.Random(seed)
        self._logger = _quiet_logger()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._attempts = 0  # connection attempts started
        self._failed = 0  # number of the last attempt that failed before being up
        self._last_failure = float("-inf")  # loop time the last attempt failed
        self._poke = asyncio.Event()  # open() wants an attempt now
        self._outcome = asyncio.Condition()
        self._routes: dict[tuple[str, str], set[MqttTransport]] = {}
        self._prefixes: dict[str, int] = {}  # prefix -> transports using it
        self._subscribed: set[str] = set()
        self._sub_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: set[asyncio.Future[Any]] = set()
        self._direct: _Direct | None = None
        self._users = 0
        self._shared_key: tuple[str, int, str | None] | None = None

    @property
    def url(self) -> str:
        user = f"{self.username}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{user}{host}:{self.port}"

    @property
    def connected(self) -> bool:
        """Connected and subscribed to every prefix in use."""
        return self._client is not None and self._up.is_set()

    @property
    def users(self) -> int:
        """Transports currently attached."""
        return self._users

    def __repr__(self) -> str:
        return f"MqttConnection({self.url}, connected={self.connected}, users={self._users})"

    @classmethod
    def shared(
        cls, host: str, port: int = DEFAULT_PORT, *, username: str | None = None, password: str | None = None
    ) -> MqttConnection:
        """The connection of this event loop to ``host:port`` (as ``username``), made on first use.

        It closes itself when the last transport using it closes.
        """
        loop = asyncio.get_running_loop()
        key = (host, port, username)
        conn = cls._shared.get(key)
        if conn is None or conn._closing or (conn._loop is not None and conn._loop is not loop):
            conn = cls(host, port, username=username, password=password)
            conn._shared_key = key
            cls._shared[key] = conn
        return conn

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the connection loop (idempotent; needs a running event loop)."""
        if self._closing:
            raise LinkDown(f"{self.url}: connection closed")
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name=f"mqtt {self.url}")

    async def wait_connected(self, timeout: float) -> None:
        """Until connected: one attempt is made now if it is down (see :meth:`attempt_now`).

        LinkDown as soon as an attempt started from now on fails, or after ``timeout`` seconds.
        """
        self.start()
        if self.connected:
            return
        # An attempt already running may have started before the broker came back: its
        # failure does not count, only that of one started from now on.
        first = self._attempts + 1
        self._poke.set()
        try:
            async with asyncio.timeout(timeout):
                async with self._outcome:
                    while not self.connected:
                        if self._failed >= first:
                            raise LinkDown(f"{self.url}: broker not reachable: {self.last_error}")
                        if self._task is None or self._task.done():
                            raise LinkDown(f"{self.url}: connection closed")
                        await self._outcome.wait()
        except TimeoutError:
            raise LinkDown(f"{self.url}: broker not reachable within {timeout:g} s: {self.last_error}") from None

    async def _announce(self) -> None:
        async with self._outcome:
            self._outcome.notify_all()

    async def aclose(self) -> None:
        """Cancel the consumer (disconnecting), fail every pending publish; idempotent."""
        self._closing = True
        if self._shared_key is not None and MqttConnection._shared.get(self._shared_key) is self:
            del MqttConnection._shared[self._shared_key]
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transports in self._routes.values():
            for t in transports:
                t._inbox.wake()
        await self._announce()

    async def __aenter__(self) -> MqttConnection:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self._password,
            identifier=self.identifier,
            clean_session=True,
            keepalive=self.keepalive,
            logger=self._logger,
            max_inflight_messages=self.max_inflight,
            max_concurrent_outgoing_calls=self.max_inflight,
        )
        client.pending_calls_threshold = 10 * self.max_inflight
        return client

    async def _run(self) -> None:
        initial, maximum = self._backoff
        backoff = initial
        while not self._closing:
            client = self._new_client()
            was_up = False
            self._attempts += 1
            attempt = self._attempts
            self._poke.clear()
            try:
                async with client:
                    _no_delay(client)
                    self._direct = _Direct.install(client, self._deliver)
                    self._client = client
                    async with self._sub_lock:
                        self._subscribed.clear()
                        for prefix in list(self._prefixes):
                            granted = await client.subscribe(f"{prefix}/+/up", qos=self.qos)
                            if _granted(granted):
                                self._subscribed.add(prefix)
                            else:
                                log.warning("mqtt %s refused the subscription %s/+/up", self.url, prefix)
                    self.stats.connects += 1
                    backoff = initial
                    was_up = True
                    self._up.set()
                    await self._announce()
                    log.info("mqtt %s connected as %s", self.url, self.identifier)
                    async for message in client.messages:
                        self._on_message(message)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc) or type(exc).__name__
                if was_up:
                    log.warning("mqtt %s lost: %s", self.url, self.last_error)
                else:
                    self.stats.connect_failures += 1
                    log.debug("mqtt %s not reachable: %s", self.url, self.last_error)
            except OSError as exc:  # aiomqtt wraps most, not necessarily all, socket errors
                self.last_error = str(exc) or type(exc).__name__
                if not was_up:
                    self.stats.connect_failures += 1
            finally:
                self._client = None
                self._up.clear()
                self._subscribed.clear()
                if was_up:
                    self.stats.disconnects += 1
                for task in list(self._inflight):  # their PUBACKs died with the connection
                    task.cancel()
                if self._direct is not None:
                    self._direct.fail_all()
                    self._direct = None
                for transports in self._routes.values():  # waiting reads raise LinkDown now
                    for t in transports:
                        t._inbox.wake()
                if not was_up:
                    self._failed = attempt
                    self._last_failure = asyncio.get_running_loop().time()
            if self._closing:
                break
            await self._announce()
            await self._pause(backoff * (0.5 + self._jitter.random()), self._spacing)
            backoff = min(backoff * 2, maximum)

    async def _pause(self, delay: float, spacing: float) -> None:
        """The backoff before the next attempt, cut short when :meth:`wait_connected` asks for one
        (but a failed attempt is followed by at least ``spacing`` seconds of rest)."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._poke.wait()
        rest = self._last_failure + spacing - loop.time()
        if rest > 0:
            await asyncio.sleep(rest)

    # --- used by MqttTransport ----------------------------------------------------------

    def _attach(self, transport: MqttTransport) -> None:
        self._routes.setdefault((transport.prefix, transport.ident), set()).add(transport)
        self._prefixes[transport.prefix] = self._prefixes.get(transport.prefix, 0) + 1
        self._users += 1
        self.start()

    async def _detach(self, transport: MqttTransport) -> None:
        key = (transport.prefix, transport.ident)
        routes = self._routes.get(key)
        if routes is None or transport not in routes:
            return
        routes.discard(transport)
        if not routes:
            del self._routes[key]
        self._users -= 1
        left = self._prefixes[transport.prefix] - 1
        if left:
            self._prefixes[transport.prefix] = left
        else:
            del self._prefixes[transport.prefix]
            async with self._sub_lock:
                client = self._client
                unused = transport.prefix not in self._prefixes  # nobody took it up meanwhile
                if unused and client is not None and transport.prefix in self._subscribed:
                    self._subscribed.discard(transport.prefix)
                    with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                        await client.unsubscribe(f"{transport.prefix}/+/up", timeout=self.publish_timeout)
        if self._users == 0 and self._shared_key is not None:
            await self.aclose()

    def _ready(self, prefix: str) -> bool:
        return self.connected and prefix in self._subscribed

    async def _subscribe(self, prefix: str, timeout: float) -> None:
        """Wait until connected and subscribed to ``<prefix>/+/up``; LinkDown after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._ready(prefix):
            if loop.time() > deadline:
                raise LinkDown(f"{self.url}: not subscribed to {prefix}/+/up within {timeout:g} s: {self.last_error}")
            await self.wait_connected(max(0.0, deadline - loop.time()))
            async with self._sub_lock:
                client = self._client
                if client is None or not self._up.is_set() or prefix in self._subscribed:
                    continue
                try:
                    granted = await client.subscribe(f"{prefix}/+/up", qos=self.qos, timeout=self.publish_timeout)
                except aiomqtt.MqttError as exc:
                    self.last_error = str(exc) or type(exc).__name__
                    await asyncio.sleep(0.05)  # the connection is probably dropping; the loop reconnects
                    continue
                if not _granted(granted):
                    raise LinkDown(f"{self.url}: the broker refused the subscription {prefix}/+/up ({granted})")
                if client is self._client:
                    self._subscribed.add(prefix)

    def _on_message(self, message: aiomqtt.Message) -> None:
        self._deliver(message.topic.value, message.payload)

    def _deliver(self, topic: str, payload: Any) -> None:
        self.stats.messages_in += 1
        if not topic.endswith("/up"):
            return
        prefix, _, ident = topic[: -len("/up")].rpartition("/")
        transports = self._routes.get((prefix, ident))
        if not transports:
            self.stats.unknown_ids += 1
            return
        if isinstance(payload, str):
            payload = payload.encode("latin-1")
        if not isinstance(payload, bytes | bytearray):
            return
        data = bytes(payload)
        for t in transports:
            t._inbox.feed(data)

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish and wait for the broker's PUBACK; LinkDown if that is not sure to have happened."""
        if not self.connected:
            raise LinkDown(f"{self.url}: not connected ({self.last_error})")
        async with self._slots:  # never more than the broker's in-flight limit
            client = self._client
            if client is None or not self._up.is_set():
                raise LinkDown(f"{self.url}: not connected ({self.last_error})")
            stats = self.stats
            stats.inflight += 1
            stats.peak_inflight = max(stats.peak_inflight, stats.inflight)
            try:
                if self._direct is not None:
                    await self._publish_direct(self._direct, topic, payload)
                    stats.published += 1
                    return
                task = asyncio.ensure_future(client.publish(topic, payload, qos=self.qos, timeout=self.publish_timeout))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
                try:
                    await asyncio.wait({task})
                except asyncio.CancelledError:
                    task.cancel()
                    raise
            finally:
                stats.inflight -= 1
        if task.cancelled():
            self.stats.publish_failures += 1
            raise LinkDown(f"{self.url}: connection lost before the broker acknowledged {topic}; it may not have gone")
        exc = task.exception()
        if exc is not None:
            self.stats.publish_failures += 1
            raise LinkDown(f"{self.url}: publish to {topic} failed: {exc or type(exc).__name__}") from exc
        self.stats.published += 1

    async def _publish_direct(self, direct: _Direct, topic: str, payload: bytes) -> None:
        """:meth:`publish` through :class:`_Direct`: the same outcomes, without a task per publish."""
        try:
            mid, future = direct.publish(topic, payload, self.qos)
        except (aiomqtt.MqttError, ValueError) as exc:
            self.stats.publish_failures += 1
            raise LinkDown(f"{self.url}: publish to {topic} failed: {exc or type(exc).__name__}") from exc
        if future is None:
            return
        timer = direct.loop.call_later(self.publish_timeout, _time_out, future)
        try:
            await future
        except _ConnectionLost:
            self.stats.publish_failures += 1
            raise LinkDown(
                f"{self.url}: connection lost before the broker acknowledged {topic}; it may not have gone"
            ) from None
        except TimeoutError:
            self.stats.publish_failures += 1
            raise LinkDown(f"{self.url}: publish to {topic} failed: Operation timed out") from None
        finally:
            timer.cancel()
            if direct.acks.get(mid) is future:
                del direct.acks[mid]


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class MqttTransport(InboxTransport):
    """The line behind one MQTT DTU: writes go to ``<prefix>/<ident>/down``, reads come from ``.../up``.

    ``prefix`` may have several levels (``site-a/dtu``); ``ident`` is one level. Without
    ``connection=``, the process-wide :meth:`MqttConnection.shared` one for the broker is used
    (and closed with its last transport); a given connection is never closed by the transport.
    ``baud`` is the line speed behind the DTU when known (only used to derive timeouts).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        prefix: str = "meterlink",
        ident: str = "",
        *,
        username: str | None = None,
        password: str | None = None,
        connection: MqttConnection | None = None,
        open_timeout: float = 10.0,
        baud: int | None = None,
    ) -> None:
        super().__init__()
        if baud is not None and (not isinstance(baud, int) or baud < 0):
            raise ValueError(f"baud {baud!r} must be a positive integer")
        self.baud = baud
        self.prefix = check_topic_level(prefix, "topic prefix", multi=True)
        self.ident = check_topic_level(ident, "DTU id")
        if connection is not None:
            host, port, username = connection.host, connection.port, connection.username
        self.host = host
        self.port = port
        self.username = username
        self.open_timeout = open_timeout
        self._password = password
        self._given = connection
        self._conn: MqttConnection | None = None
        self._closed = True
        user = f"{username}@" if username else ""
        shown = f"[{host}]" if ":" in host else host
        self.url = f"mqtt://{user}{shown}:{port}/{self.prefix}/{self.ident}"

    @property
    def line_key(self) -> tuple[object, ...]:
        """The DTU: broker and topics (whoever logs in, the same topics reach the same DTU)."""
        return ("mqtt", self.host.lower(), self.port, self.prefix, self.ident)

    @property
    def down_topic(self) -> str:
        return f"{self.prefix}/{self.ident}/down"

    @property
    def up_topic(self) -> str:
        return f"{self.prefix}/{self.ident}/up"

    @property
    def connection(self) -> MqttConnection | None:
        """The shared connection while open."""
        return self._conn

    def __repr__(self) -> str:
        return f"MqttTransport({self.url!r}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        return not self._closed and self._conn is not None and self._conn._ready(self.prefix)

    def _check(self) -> None:
        if self._closed or self._conn is None:
            raise LinkDown(f"{self.url}: not open")
        if not self._conn._ready(self.prefix):
            raise LinkDown(f"{self.url}: broker connection down ({self._conn.last_error})")

    async def open(self) -> None:
        """Attach to the shared connection and wait until it is subscribed; LinkDown if the broker stays away.

        After a LinkDown, calling it again waits for the reconnection; the transport stays
        attached meanwhile (the connection keeps reconnecting with its backoff). Only a first
        ``open()`` that fails detaches again.
        """
        attached = False
        if self._conn is None:
            conn = self._given or MqttConnection.shared(
                self.host, self.port, username=self.username, password=self._password
            )
            conn._attach(self)
            self._conn = conn
            self._closed = False
            self._inbox.discard()
            attached = True
        try:
            await self._conn._subscribe(self.prefix, self.open_timeout)
        except BaseException:
            if attached:
                await self.close()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._closed = True
        self._inbox.discard()
        self._inbox.wake()
        if conn is not None:
            await conn._detach(self)

    async def write(self, data: bytes) -> None:
        self._check()
        assert self._conn is not None
        await self._conn.publish(self.down_topic, bytes(data))
