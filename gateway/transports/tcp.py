"""Lines over TCP: a client to an RS-485-to-Ethernet converter, and a server for 4G DTUs that dial in.

**Converter** (:class:`TcpClientTransport`): the gateway connects to ``host:port`` of a
converter in transparent mode; bytes written go onto the line, bytes read came from it.

**4G DTUs** (:class:`DtuServer`): the DTU is the TCP client. Each connection that comes in is a
line, served as one :class:`DtuConnection` (a :class:`~gateway.transports.base.Transport`)
keyed by an id:

* **With registration** (``registration=...``), the id comes from the first bytes the DTU
  sends on connecting (its "registration packet", e.g. ``REG:DTU0001`` or an IMEI):

  - ``bytes`` prefix: the packet is the prefix followed by the id, the printable-ASCII run
    (``!``..``~``) after it, ending at the first other byte (CR, LF, NUL, ... which are
    dropped); a packet whose id runs to the end of the bytes received so far may be split
    across TCP segments, so the id is taken only once a terminator comes or the DTU has been
    silent for ``registration_idle`` seconds (default 0.2);
  - a compiled ``re.Pattern[bytes]``: matched at the start of the stream; the id is the group
    named ``id``, else group 1, else the whole match (decoded as ASCII); a match that ends
    with the bytes received so far is likewise taken after ``registration_idle``;
  - a callable ``f(received: bytes) -> (id, consumed) | None``: ``None`` = need more bytes;
    raise :class:`ValueError` to refuse the DTU.

  A connection that sends something else, or nothing within ``registration_timeout``, is
  dropped. The connection is handed out (:meth:`DtuServer.accept`, ``async for``,
  :meth:`DtuServer.wait_for`) once identified.

* **Heartbeats** are removed from the byte stream before the scheduler sees it. ``heartbeat``
  may be ``bytes`` (exact occurrences, with any CR/LF/NUL right after them, are removed) or a
  compiled pattern (every match is removed); by default, when registration is configured,
  the registration packet counts as a heartbeat too (DTUs commonly repeat it). Each one seen
  bumps :attr:`DtuConnection.heartbeats` and :attr:`DtuConnection.last_heartbeat`. A heartbeat is recognised within one
  received TCP chunk; DTUs send each in one packet. One split across two chunks passes
  through as garbage, which the deframer skips.

* **By heartbeat** (``heartbeat_ident=True``, with ``heartbeat`` and without ``registration``):
  for DTUs that send no registration packet but put their id in every heartbeat. ``heartbeat``
  is then the heartbeat's prefix (bytes) or a pattern with the id in it, as for a
  registration; a new connection waits (up to ``registration_timeout``, default 300 s here:
  heartbeats come every few minutes at most) for its first heartbeat anywhere in what it sends
  (bytes before it are dropped), takes the id from it, and from then on removes that
  heartbeat (prefix + id) from the stream.

* **Without registration**, with ``identify=True`` (what ``dtu://`` bus URLs use), the server
  finds out which line a new connection is by reading the meter address behind it: a DL/T
  645-2007 read-address (0x13) to the all-``AA`` wildcard (dlt645.md §1.5: only one meter
  may be on the line). The connection is labelled with the address in the reply and handed
  out; if no meter answers (after ``identify_attempts``), it is handed out unlabelled and a
  warning is logged. With ``identify=False`` a connection is handed out unlabelled
  (``ident`` is ``None``) as soon as it is accepted, and the caller labels it
  (:meth:`DtuServer.label`).

**A bus on a DTU** is a :class:`DtuTransport` (``dtu://HOST:PORT/ID``): the line of the DTU
with id ``ID`` on a server listening at ``HOST:PORT``. Several buses may name the same listen
address; they then share one :class:`DtuServer` (the gateway makes one per address and
passes it in; a transport without one makes its own, which is what a one-shot CLI command
does). ``open()`` waits up to ``wait`` seconds for the DTU to have dialled in.

A DTU that dials in again under an id that is already connected replaces the old connection,
which is closed (its users get :class:`~gateway.errors.LinkDown`): after a 4G drop-out the old
socket is usually dead but not yet noticed. TCP keepalive is enabled on every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

from protocols.dlt645 import DI_1997, WILDCARD, Deframer, Dlt645Error, decode_frames, encode_frame, normalize_address
from protocols.dlt645.edition1997 import Read1997Reply, Read1997Request
from protocols.dlt645.payloads import build_frame, parse_payload

from ..errors import LinkDown
from ._stream import FeedProtocol, ProtocolTransport, os_reason
from .base import Transport

log = logging.getLogger(__name__)

IDENTIFY_MODES = ("registration", "heartbeat", "meter")
"""How a ``dtu://`` bus recognises its DTU (:class:`DtuTransport`)."""

Registration = bytes | re.Pattern[bytes] | Callable[[bytes], "tuple[str, int] | None"]
"""How a DTU's registration packet is recognised (see the module docs)."""
Heartbeat = bytes | re.Pattern[bytes]

MAX_REGISTRATION = 512
"""Bytes a DTU may send before its registration is recognised; beyond that it is refused."""

REGISTRATION_IDLE = 0.2
"""Silence after which a registration packet without a terminator is taken as complete (it may
have come split across TCP segments: ``REG:DT`` then ``U7``)."""

HEARTBEAT_ID_TIMEOUT = 300.0
"""How long a DTU identified by its heartbeat may take to send the first one."""

READ_ADDRESS = 0x13
"""DL/T 645-2007 read communication address; the reply's control code is 0x93 (dlt645.md §2.1)."""

_ID_BYTE = re.compile(rb"[!-~]+")
_TERMINATORS = b"\r\n\x00"


def _heartbeat_pattern(heartbeat: Heartbeat | None) -> re.Pattern[bytes] | None:
    """Exact bytes (and the CR/LF/NUL after them), or the caller's pattern, as a pattern to remove."""
    if heartbeat is None or isinstance(heartbeat, re.Pattern):
        return heartbeat
    return re.compile(re.escape(heartbeat) + rb"[\r\n\x00]*")


def _keepalive(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


class TcpClientTransport(ProtocolTransport):
    """A TCP connection to a transparent RS-485-to-Ethernet converter.

    ``baud`` is the converter's line speed when known (only used to derive timeouts).
    """

    def __init__(self, host: str, port: int, *, baud: int | None = None, connect_timeout: float = 10.0) -> None:
        super().__init__()
        if not host:
            raise ValueError("no host given")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port {port!r} is not 1..65535")
        self.host = host
        self.port = port
        self.baud = baud
        self.connect_timeout = connect_timeout
        self.url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"

    def __repr__(self) -> str:
        return f"TcpClientTransport({self.host!r}, {self.port})"

    @property
    def line_key(self) -> tuple[object, ...]:
        return ("tcp", self.host.lower(), self.port)

    async def open(self) -> None:
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        protocol = self._new_protocol()
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await loop.create_connection(lambda: protocol, self.host, self.port)
        except TimeoutError as exc:
            raise LinkDown(f"{self.url}: cannot connect: no answer within {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise LinkDown(f"{self.url}: cannot connect: {os_reason(exc)}") from exc
        _keepalive(transport)
        self._attach(protocol)
        log.debug("%s connected", self.url)


class DtuConnection(ProtocolTransport):
    """One DTU that dialled in to a :class:`DtuServer`: a transport to its line.

    It cannot be reopened from this side: once it is lost, wait for the DTU to dial in again
    (:meth:`DtuServer.wait_for`). ``open()`` is a no-op while connected, else LinkDown.
    """

    def __init__(self, server: DtuServer, peer: tuple[Any, ...]) -> None:
        super().__init__()
        self.server = server
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1])) if peer else ("?", 0)
        self.ident: str | None = None
        """The DTU's id (from its registration packet, or set by :meth:`DtuServer.label`)."""
        self.connected_at = time.monotonic()
        self.heartbeats = 0
        self.last_heartbeat: float | None = None
        """``time.monotonic()`` of the last heartbeat (or registration) seen."""
        self._heartbeat: re.Pattern[bytes] | None = _heartbeat_pattern(server.heartbeat)
        self._pending: bytearray | None = bytearray() if server._id_packet is not None else None
        self._timer: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:  # type: ignore[override]
        host, port = self.peer
        return f"tcp-dtu://{self.ident or '?'}@{host}:{port}"

    def __repr__(self) -> str:
        return f"DtuConnection(ident={self.ident!r}, peer={self.peer[0]}:{self.peer[1]}, connected={self.connected})"

    @property
    def registered(self) -> bool:
        """Whether the connection is past registration (always, when none is configured)."""
        return self._pending is None

    async def open(self) -> None:
        if not self.connected:
            raise LinkDown(f"{self.url}: {self._down_reason}; the DTU must dial in again")

    # --- called by the server -----------------------------------------------------------

    def _on_raw(self, data: bytes) -> None:
        if self._pending is None:
            self._inbox.feed(self._filter(data))
            return
        self._pending += data
        self._registration(final=False)

    def _registration(self, *, final: bool) -> None:
        """Look for the registration (or identifying heartbeat) packet in what came so far.

        ``final``: the DTU has been silent for ``registration_idle``: an id running to the end of
        the bytes is complete.
        """
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        pending = self._pending
        if pending is None:
            return
        server = self.server
        if server.heartbeat_ident:
            start = server._find_id_packet(bytes(pending))
            if start:
                del pending[:start]  # nothing else is expected before the first heartbeat
        try:
            found = server._parse_registration(bytes(pending), final=final)
        except ValueError as exc:
            self._refuse(f"bad {'heartbeat' if server.heartbeat_ident else 'registration'} packet: {exc}")
            return
        if found is None:
            if len(pending) > MAX_REGISTRATION:
                self._refuse(f"no registration packet in the first {len(pending)} bytes")
            elif not final and server._may_be_complete(bytes(pending)):
                loop = asyncio.get_running_loop()
                self._idle = loop.call_later(server.registration_idle, self._registration_idle)
            return
        ident, consumed = found
        packet = bytes(pending[:consumed])
        rest = bytes(pending[consumed:])
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
        if server._heartbeat_is_registration:
            self._heartbeat = _heartbeat_pattern(packet.rstrip(_TERMINATORS) or packet)
        self.last_heartbeat = time.monotonic()
        if server.heartbeat_ident:
            self.heartbeats += 1
            log.info("DTU %s identified by its heartbeat from %s:%s", ident, *self.peer)
        else:
            log.info("DTU %s registered from %s:%s", ident, *self.peer)
        server._identified(self, ident)
        if rest:
            self._inbox.feed(self._filter(rest))

    def _registration_idle(self) -> None:
        self._idle = None
        if self._pending is not None and self.connected:
            self._registration(final=True)

    def _filter(self, data: bytes) -> bytes:
        hb = self._heartbeat
        if hb is None or not data:
            return data
        data, n = hb.subn(b"", data)
        if n:
            self.heartbeats += n
            self.last_heartbeat = time.monotonic()
        return data

    def _refuse(self, reason: str) -> None:
        log.warning("DTU from %s:%s refused: %s", *self.peer, reason)
        self._pending = None
        self._drop(f"refused: {reason}")

    def _start_registration_timer(self, timeout: float) -> None:
        if self._pending is not None:
            loop = asyncio.get_running_loop()
            what = "heartbeat" if self.server.heartbeat_ident else "registration packet"
            self._timer = loop.call_later(
                timeout,
                lambda: self._pending is not None and self._refuse(f"no {what} within {timeout:g} s"),
            )

    def _on_lost(self, protocol: FeedProtocol, exc: Exception | None) -> None:
        super()._on_lost(protocol, exc)
        if self._timer is not None:
            self._timer.cancel()
        if self._idle is not None:
            self._idle.cancel()
        self.server._forget(self)

    async def close(self) -> None:
        await super().close()
        self.server._forget(self)


class DtuServer:
    """Accepts 4G DTUs dialling in; each connection becomes a :class:`DtuConnection` keyed by id.

    Use: ``server = await DtuServer("0.0.0.0", 9000, registration=b"REG:").start()``, then
    ``conn = await server.wait_for("DTU0001", 60)`` or ``async for conn in server: ...``.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        *,
        registration: Registration | None = None,
        heartbeat: Heartbeat | None = None,
        registration_timeout: float | None = None,
        identify: bool = False,
        identify_timeout: float = 2.0,
        identify_attempts: int = 3,
        heartbeat_ident: bool = False,
        registration_idle: float = REGISTRATION_IDLE,
    ) -> None:
        if identify and registration is not None:
            raise ValueError("identify (by meter address) is for DTUs without a registration packet")
        if heartbeat_ident and (registration is not None or identify):
            raise ValueError("heartbeat_ident is for DTUs without a registration packet, not read by address")
        if heartbeat_ident and heartbeat is None:
            raise ValueError("heartbeat_ident needs the heartbeat (its prefix, or a pattern with the id)")
        if registration is not None and not isinstance(registration, bytes | re.Pattern) and not callable(registration):
            raise TypeError("registration must be a bytes prefix, a compiled bytes pattern or a callable")
        if isinstance(registration, bytes) and not registration:
            raise ValueError("an empty registration prefix would match anything")
        if isinstance(registration, re.Pattern) and not isinstance(registration.pattern, bytes):
            raise TypeError("the registration pattern must be a bytes pattern (rb'...')")
        if heartbeat is not None and not isinstance(heartbeat, bytes | re.Pattern):
            raise TypeError("heartbeat must be bytes or a compiled bytes pattern")
        if heartbeat == b"":
            raise ValueError("an empty heartbeat would match everywhere")
        self.host = host
        self.requested_port = port
        self.port = port
        """The listening port (the real one after :meth:`start`, when 0 was asked)."""
        self.registration = registration
        self.heartbeat = heartbeat
        self.heartbeat_ident = heartbeat_ident
        """Whether DTUs are identified by the id in their heartbeat (see the module docs)."""
        if registration_timeout is None:
            registration_timeout = HEARTBEAT_ID_TIMEOUT if heartbeat_ident else 30.0
        self.registration_timeout = registration_timeout
        self.registration_idle = registration_idle
        self.identify = identify
        self.identify_timeout = identify_timeout
        self.identify_attempts = identify_attempts
        self._identifying: set[asyncio.Task[None]] = set()
        self._id_packet: Registration | None = heartbeat if heartbeat_ident else registration
        """What a connection is identified by: its registration packet, or its heartbeat."""
        self._heartbeat_is_registration = heartbeat_ident or (heartbeat is None and registration is not None)
        self._server: asyncio.Server | None = None
        self._by_id: dict[str, DtuConnection] = {}
        self._all: set[DtuConnection] = set()
        self._queue: asyncio.Queue[DtuConnection] = asyncio.Queue()
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"tcp-dtu-server://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"DtuServer({self.host!r}, {self.port}, dtus={sorted(self._by_id)})"

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> DtuServer:
        """Start listening (``port=0``: any free port, see :attr:`port`). Raises LinkDown if it cannot."""
        if self._server is not None:
            return self
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(self._new_connection, self.host, self.requested_port)
        except OSError as exc:
            raise LinkDown(f"{self.url}: cannot listen: {os_reason(exc)}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening for DTUs on %s:%s", self.host, self.port)
        return self

    async def aclose(self) -> None:
        """Stop listening and close every DTU connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._identifying):
            task.cancel()
        await asyncio.gather(*self._identifying, return_exceptions=True)
        for conn in list(self._all):
            await conn.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DtuServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- finding connections ----------------------------------------------------------

    @property
    def connections(self) -> list[DtuConnection]:
        """Every open connection, identified or not."""
        return list(self._all)

    @property
    def ids(self) -> list[str]:
        """Ids of the identified connections."""
        return sorted(self._by_id)

    def get(self, ident: str) -> DtuConnection | None:
        """The connected DTU with this id, if any."""
        conn = self._by_id.get(ident)
        return conn if conn is not None and conn.connected else None

    async def wait_for(self, ident: str, timeout: float) -> DtuConnection:
        """The DTU with this id, waiting up to ``timeout`` s for it to dial in; LinkDown if it does not."""
        try:
            async with asyncio.timeout(timeout):
                while (conn := self.get(ident)) is None:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise LinkDown(f"{self.url}: DTU {ident} did not dial in within {timeout:g} s") from None
        return conn

    async def accept(self, timeout: float | None = None) -> DtuConnection:
        """The next connection handed out: identified (with registration) or unlabelled (without)."""
        async with asyncio.timeout(timeout):
            while True:
                conn = await self._queue.get()
                if conn.connected:
                    return conn

    def __aiter__(self) -> DtuServer:
        return self

    async def __anext__(self) -> DtuConnection:
        return await self.accept()

    def label(self, conn: DtuConnection, ident: str) -> None:
        """Give a connection its id (e.g. after reading the meter address behind it)."""
        if not ident:
            raise ValueError("empty DTU id")
        if conn.server is not self:
            raise ValueError("that connection belongs to another server")
        if not conn.connected:
            raise LinkDown(f"{conn.url}: cannot label a closed connection")
        self._identified(conn, ident, announce=False)

    # --- internals --------------------------------------------------------------------

    def _new_connection(self) -> FeedProtocol:
        holder: list[DtuConnection] = []

        def on_data(data: bytes) -> None:
            holder[0]._on_raw(data)

        def on_lost(protocol: FeedProtocol, exc: Exception | None) -> None:
            holder[0]._on_lost(protocol, exc)

        server = self

        class _Protocol(FeedProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                _keepalive(transport)
                conn = DtuConnection(server, transport.get_extra_info("peername") or ())
                holder.append(conn)
                conn._attach(self)
                server._all.add(conn)
                log.debug("DTU connection from %s:%s", *conn.peer)
                if conn.registered and server.identify:
                    task = asyncio.get_running_loop().create_task(server._identify(conn), name=f"identify {conn.url}")
                    server._identifying.add(task)
                    task.add_done_callback(server._identifying.discard)
                elif conn.registered:
                    server._queue.put_nowait(conn)
                else:
                    conn._start_registration_timer(server.registration_timeout)

        return _Protocol(on_data, on_lost)

    async def _identify(self, conn: DtuConnection) -> None:
        """Label a new connection with the address of the meter behind it (0x13 to the wildcard)."""
        address = None
        for _ in range(max(1, self.identify_attempts)):
            try:
                address = await read_meter_address(conn, self.identify_timeout)
            except LinkDown as exc:
                log.info("DTU from %s:%s went away while being identified: %s", *conn.peer, exc)
                return
            if address is not None:
                break
        if address is None:
            log.warning("DTU from %s:%s: no meter answered the read-address; it stays unlabelled", *conn.peer)
            self._queue.put_nowait(conn)
            return
        log.info("DTU from %s:%s identified by its meter address %s", *conn.peer, address)
        self._identified(conn, address)

    def _find_id_packet(self, data: bytes) -> int:
        """Where the first heartbeat (by its prefix or pattern) starts in ``data``; with none yet,
        how many leading bytes cannot be part of one (they are dropped)."""
        packet = self._id_packet
        if isinstance(packet, bytes):
            at = data.find(packet)
            if at >= 0:
                return at
            for keep in range(min(len(packet) - 1, len(data)), 0, -1):  # a prefix cut at the end
                if packet.startswith(data[-keep:]):
                    return len(data) - keep
            return len(data)
        if isinstance(packet, re.Pattern):
            m = packet.search(data)
            return m.start() if m is not None else 0
        return 0

    def _may_be_complete(self, data: bytes) -> bool:
        """Whether ``data`` would give an id if nothing more came (an id running to its end)."""
        try:
            return self._parse_registration(data, final=True) is not None
        except ValueError:
            return False

    def _parse_registration(self, data: bytes, *, final: bool = True) -> tuple[str, int] | None:
        """(id, bytes consumed) of the packet at the start of ``data``; None: need more bytes.

        Without ``final``, a packet whose id runs to the end of ``data`` is not complete yet (the
        rest of the id may be in the next TCP segment).
        """
        reg = self._id_packet
        if isinstance(reg, bytes):
            if len(data) < len(reg):
                if not reg.startswith(data):
                    raise ValueError(f"{data[:32]!r} does not start with {reg!r}")
                return None
            if not data.startswith(reg):
                raise ValueError(f"{data[:32]!r} does not start with {reg!r}")
            m = _ID_BYTE.match(data, len(reg))
            if m is None:
                if len(data) == len(reg):
                    return None
                raise ValueError(f"no id after {reg!r}")
            end = m.end()
            if end == len(data) and not final:
                return None
            while end < len(data) and data[end] in _TERMINATORS:
                end += 1
            return m.group().decode("ascii"), end
        if isinstance(reg, re.Pattern):
            m = reg.match(data)
            if m is None or (m.end() == len(data) and not final):
                return None
            if "id" in reg.groupindex:
                raw = m.group("id")
            elif reg.groups:
                raw = m.group(1)
            else:
                raw = m.group()
            ident = raw.decode("ascii", "replace").strip()
            if not ident:
                raise ValueError(f"empty id in {m.group()!r}")
            return ident, m.end()
        assert reg is not None
        found = reg(data)
        if found is None:
            return None
        ident, consumed = found
        if not ident or not 0 <= consumed <= len(data):
            raise ValueError(f"the registration parser returned {found!r}")
        return ident, consumed

    def _identified(self, conn: DtuConnection, ident: str, *, announce: bool = True) -> None:
        old = self._by_id.get(ident)
        if old is not None and old is not conn:
            log.info("DTU %s dialled in again from %s:%s; dropping the old connection", ident, *conn.peer)
            old.ident = None  # so that forgetting it does not remove the new one
            old._drop(f"DTU {ident} dialled in again; this connection was replaced")
        if conn.ident is not None and conn.ident != ident and self._by_id.get(conn.ident) is conn:
            del self._by_id[conn.ident]
        conn.ident = ident
        self._by_id[ident] = conn
        self._changed.set()
        if announce:
            self._queue.put_nowait(conn)

    def _forget(self, conn: DtuConnection) -> None:
        self._all.discard(conn)
        if conn.ident is not None and self._by_id.get(conn.ident) is conn:
            del self._by_id[conn.ident]
            self._changed.set()


async def read_meter_address(transport: Transport, timeout: float = 2.0) -> str | None:
    """The address of the only meter on a line, through the all-``AA`` wildcard (§1.5).

    First a 2007 read-address (0x13); if nothing answers it, a 1997 wildcard read of C032
    (1997 has no 0x13, dlt645.md §7.1), whose reply carries the meter's address, or, on meters
    with the wildcard-echo quirk (§10), AA..AA and the meter number as its value. Each waits up
    to ``timeout`` seconds (ignoring our own request echoed back and anything else); None if
    neither is answered. LinkDown if the line goes.
    """
    address = await _probe(transport, encode_frame(WILDCARD, READ_ADDRESS, b"", 4), timeout)
    if address is None:
        request = build_frame(WILDCARD, Read1997Request(0xC032))
        address = await _probe(transport, encode_frame(WILDCARD, request.control.byte, request.data, 4), timeout)
    return address


async def _probe(transport: Transport, wire: bytes, timeout: float) -> str | None:
    transport.discard_input()
    await transport.write(wire)
    sent = decode_frames(wire)[0]
    deframer = Deframer()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        chunk = await transport.read(left)
        for frame in deframer.feed(chunk) if chunk else ():
            control = frame.control
            if not control.response or control.abnormal or frame.function != sent.function:
                continue
            if frame.address != WILDCARD:
                return frame.address
            if sent.function == READ_ADDRESS:
                continue
            try:  # the 1997 wildcard-echo quirk: the meter number is the address
                payload = parse_payload(frame)
                if isinstance(payload, Read1997Reply):
                    return normalize_address(str(DI_1997.lookup(payload.di).decode(payload.value)))
            except Dlt645Error:
                continue
    return None


class DtuTransport(Transport):
    """The line behind the DTU with id ``ident`` that dials in to a :class:`DtuServer` at ``host:port``.

    ``server``: a shared server (the gateway passes one per listen address); without it the
    transport makes its own with ``registration`` / ``heartbeat`` (none: DTUs are identified
    by the meter address behind them) and closes it with itself. ``wait``: how long ``open()``
    waits for the DTU to dial in. ``identify``: ``registration`` (the default with
    ``registration``), ``heartbeat`` (the id is in the heartbeat packets, ``heartbeat`` being
    their prefix) or ``meter`` (the default without ``registration``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        ident: str,
        *,
        registration: bytes | None = None,
        heartbeat: bytes | None = None,
        baud: int | None = None,
        wait: float = 5.0,
        server: DtuServer | None = None,
        identify: str | None = None,
    ) -> None:
        if not host:
            raise ValueError("no host given")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port {port!r} is not 1..65535")
        if not ident:
            raise ValueError("no DTU id given")
        if identify is None:
            identify = "registration" if registration is not None else "meter"
        if identify not in IDENTIFY_MODES:
            raise ValueError(f"identify {identify!r} is not one of {', '.join(IDENTIFY_MODES)}")
        if (identify == "registration") != (registration is not None):
            raise ValueError("identify=registration goes with a registration prefix, and only it")
        if identify == "heartbeat" and heartbeat is None:
            raise ValueError("identify=heartbeat needs the heartbeat prefix")
        self.host = host
        self.port = port
        self.ident = ident
        self.identify = identify
        """How the DTU is recognised: ``registration``, ``heartbeat`` or ``meter`` (its meter's address)."""
        self.registration = registration
        self.heartbeat = heartbeat
        self.baud = baud
        self.wait = wait
        self._given = server
        self._server: DtuServer | None = server
        self._conn: DtuConnection | None = None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"dtu://{shown}:{port}/{ident}"

    def __repr__(self) -> str:
        return f"DtuTransport({self.url!r}, connected={self.connected})"

    @property
    def line_key(self) -> tuple[object, ...]:
        """One DTU on one listen address (several DTUs may share the address: that is intended)."""
        return ("dtu", self.host.lower(), self.port, self.ident)

    @property
    def listen_key(self) -> tuple[str, int]:
        """The listen address: buses with the same one share a server."""
        return (self.host, self.port)

    def server_settings(self) -> dict[str, Any]:
        """How the server for this bus must be made (buses sharing one must agree)."""
        return {
            "registration": self.registration,
            "heartbeat": self.heartbeat,
            "identify": self.identify == "meter",
            "heartbeat_ident": self.identify == "heartbeat",
        }

    def make_server(self) -> DtuServer:
        return DtuServer(self.host, self.port, **self.server_settings())

    def use_server(self, server: DtuServer) -> None:
        """Share ``server`` (not closed by this transport); before ``open()``."""
        if (server.host, server.requested_port) != self.listen_key:
            raise ValueError(f"{self.url}: the server listens on {server.host}:{server.requested_port}")
        self._given = self._server = server

    @property
    def server(self) -> DtuServer | None:
        return self._server

    @property
    def connection(self) -> DtuConnection | None:
        """The DTU's current connection, once open."""
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.connected

    async def open(self) -> None:
        if self.connected:
            return
        if self._server is None:
            self._server = self.make_server()
        await self._server.start()
        self._conn = await self._server.wait_for(self.ident, self.wait)

    async def close(self) -> None:
        self._conn = None  # the DTU stays connected to the server, for the next user
        server = self._server
        if server is not None and self._given is None:
            self._server = None
            await server.aclose()

    def _live(self) -> DtuConnection:
        conn = self._conn
        if conn is None:
            raise LinkDown(f"{self.url}: not open")
        return conn

    async def write(self, data: bytes) -> None:
        await self._live().write(data)

    async def read(self, timeout: float) -> bytes:
        return await self._live().read(timeout)

    def discard_input(self) -> int:
        return self._conn.discard_input() if self._conn is not None else 0
