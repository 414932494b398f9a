"""RS-485 bus emulation: many simulated meters on one half-duplex line (dlt645.md §1, §9).

A :class:`Bus` takes one request frame at a time (an :class:`asyncio.Lock` plus a
"line busy until" time make it half duplex), hands it to every meter whose address matches,
and returns what comes back on the line as timed :class:`Chunk` s. Transports (TCP, pty,
MQTT) write those chunks with :class:`BusPort`, which owns one :class:`Deframer` per
connection.

Line rules (dlt645.md §1.4, §1.5, §10.1):

* Only requests (D7 = 0) are handled; replies fed back into the bus (echo) are ignored.
* Exact address or valid ``AA`` wildcard (:func:`address_matches`): the meter answers.
  A meter whose profile has ``wildcard_reply_echo`` answers a wildcard with the wildcard
  address instead of its own (some 1997 meters).
* Broadcast ``99..99`` reaches every meter; nobody replies.
* Two or more replies on the line at the same time collide: their bytes are overlaid
  (byte-wise OR, shifted by their start-time difference, like a wired-OR line) and then
  "jammed" until no valid frame remains in the result, so the master sees garbage.
* Replies carry ``profile.reply_preamble`` ``FE`` bytes.

Timing model (real seconds, not the :class:`VirtualClock`; the clock only supplies the
meters' ``now``): with :attr:`LineTiming.enabled`, a request occupies the line for its wire
time (11 bits per byte at ``baud``), the meter starts replying Td later (Td drawn once per
transaction from the configured distribution inside [td_min, td_max]; other meters answering
the same request start within two character times of it), and a chunk is written when its
last byte would have left the wire; the line stays busy until then, so the next request
waits (after LATE_REPLY too: the late reply is still on the line).
With timing disabled everything is immediate except the delays that faults ask for
(LATE_REPLY, BYTE_GAPS), which are the point of those faults.

Link faults (:data:`simulator.faults.LINK_FAULTS`) come from the meter's and the bus's
:class:`FaultSet` and are rolled with a seeded RNG, so a run is reproducible for a seed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, Protocol, runtime_checkable

from protocols.dlt645.address import BROADCAST, address_matches, is_wildcard
from protocols.dlt645.deframer import Deframer
from protocols.dlt645.errors import FrameError
from protocols.dlt645.frame import MIN_FRAME, START, Frame, parse_frame_at
from protocols.dlt645.profile import MeterProfile

from .clock import VirtualClock
from .faults import Fault, FaultSet, FaultSpec

log = logging.getLogger(__name__)

DEFAULT_IDLE_FLUSH = 0.5
"""Seconds of silence after which a connection's deframer drops a half-received frame (Tb max, §1.6)."""

REQUEST_PREAMBLE_GUESS = 4
"""FE bytes assumed before a request when the caller does not say how long it was on the wire."""

TD_DISTRIBUTIONS = ("uniform", "fixed", "lognormal")


@runtime_checkable
class BusMeter(Protocol):
    """What the bus needs from a simulated meter (the fleet provides real ones)."""

    address: str
    profile: MeterProfile
    faults: FaultSet

    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        """The firmware's answer to ``frame`` at ``now``; None = stays silent."""
        ...


@dataclass(frozen=True, slots=True)
class LineTiming:
    """Physical timing of one RS-485 line (dlt645.md §1.1, §1.6, §9).

    ``td_distribution`` picks the meter turnaround Td: ``"uniform"`` in [td_min, td_max],
    ``"fixed"`` at ``td_fixed_ms`` (default td_min), or ``"lognormal"`` with median
    ``td_median_ms`` and shape ``td_sigma``, clipped to the window. ``LineTiming()`` is a
    realistic 2400 bps line; ``LineTiming.off()`` (the bus default) is immediate.
    """

    baud: int = 2400
    bits_per_byte: int = 11
    td_min_ms: float = 20.0
    td_max_ms: float = 500.0
    td_distribution: str = "uniform"
    td_fixed_ms: float | None = None
    td_median_ms: float = 60.0
    td_sigma: float = 0.6
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.baud <= 0 or self.bits_per_byte <= 0:
            raise ValueError("baud and bits_per_byte must be positive")
        if not 0 <= self.td_min_ms <= self.td_max_ms:
            raise ValueError("need 0 <= td_min_ms <= td_max_ms")
        if self.td_distribution not in TD_DISTRIBUTIONS:
            raise ValueError(f"td_distribution must be one of {TD_DISTRIBUTIONS}, not {self.td_distribution!r}")
        if self.td_fixed_ms is not None and self.td_fixed_ms < 0:
            raise ValueError("td_fixed_ms must be >= 0")
        if self.td_median_ms <= 0 or self.td_sigma < 0:
            raise ValueError("td_median_ms must be > 0 and td_sigma >= 0")

    @classmethod
    def off(cls, baud: int = 2400) -> LineTiming:
        """No timing: replies are immediate (fast CI). Fault delays still apply."""
        return cls(baud=baud, enabled=False)

    @property
    def byte_seconds(self) -> float:
        """Wire time of one character (4.583 ms at 2400 8E1)."""
        return self.bits_per_byte / self.baud

    def wire_seconds(self, nbytes: int) -> float:
        """Wire time of ``nbytes`` characters, whether or not timing is enabled."""
        return nbytes * self.bits_per_byte / self.baud

    def sample_td(self, rng: random.Random) -> float:
        """One meter turnaround time Td, in seconds."""
        lo, hi = self.td_min_ms, self.td_max_ms
        if self.td_distribution == "fixed":
            ms = lo if self.td_fixed_ms is None else self.td_fixed_ms
        elif self.td_distribution == "uniform":
            ms = rng.uniform(lo, hi)
        else:
            ms = rng.lognormvariate(math.log(self.td_median_ms), self.td_sigma)
        return min(max(ms, lo), hi) / 1000.0


class Chunk(NamedTuple):
    """Bytes to write back to the master, ``delay`` seconds after the previous chunk."""

    delay: float
    data: bytes


@dataclass(frozen=True, slots=True)
class TransactionRecord:
    """One transaction as it happened on the line (loop-time seconds)."""

    request: Frame
    start: float
    """When the line was free for this request (its first byte)."""
    end: float
    """When the line is free again (last reply byte, or end of the request)."""
    answered: tuple[str, ...]
    """Meters that put a reply on the line."""
    collided: bool
    faults: tuple[tuple[str, Fault], ...]
    chunks: tuple[Chunk, ...]


@dataclass
class BusStats:
    """Counters for a bus summary."""

    requests: int = 0
    """Request frames handled (D7 = 0), broadcasts included."""
    broadcasts: int = 0
    replies: int = 0
    """Replies meters put on the line (faulty and collided ones included)."""
    unanswered: int = 0
    """Non-broadcast requests nobody replied to (no such meter, silent firmware, NO_REPLY)."""
    collisions: int = 0
    ignored: int = 0
    """Frames with D7 = 1 (bus echo of replies), not handled."""
    firmware_errors: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "broadcasts": self.broadcasts,
            "replies": self.replies,
            "unanswered": self.unanswered,
            "collisions": self.collisions,
            "ignored": self.ignored,
            "firmware_errors": self.firmware_errors,
            "faults": dict(sorted(self.faults.items())),
        }


@dataclass(slots=True)
class _Segment:
    start: float  # seconds after the end of the request
    meter: int  # index of the answering meter in this transaction
    data: bytes


class Bus:
    """Meters sharing one half-duplex RS-485 line; one transaction at a time."""

    def __init__(
        self,
        name: str,
        meters: Iterable[BusMeter] = (),
        clock: VirtualClock | None = None,
        timing: LineTiming | None = None,
        seed: int = 0,
        faults: FaultSet | None = None,
        history: int = 256,
    ) -> None:
        self.name = name
        self.clock = clock if clock is not None else VirtualClock()
        self.timing = timing if timing is not None else LineTiming.off()
        self.faults = faults if faults is not None else FaultSet()
        self.seed = seed
        self.stats = BusStats()
        self.history: deque[TransactionRecord] = deque(maxlen=history)
        self._meters: list[BusMeter] = []
        self._index: dict[str, list[BusMeter]] | None = None  # address -> meters, see _at()
        self._lock = asyncio.Lock()
        self._busy_until = 0.0
        # Separate streams, so that adding a fault does not shift every later Td.
        self._td_rng = random.Random(f"{seed}:{name}:td")
        self._fault_rng = random.Random(f"{seed}:{name}:faults")
        seen: set[str] = set()
        for meter in meters:  # add_meter() one by one, without its scan of the line (fleets of 1e5)
            if meter.address in seen:
                raise ValueError(f"bus {self.name}: a meter with address {meter.address} is already connected")
            seen.add(meter.address)
            self._meters.append(meter)

    # --- membership -------------------------------------------------------------------

    @property
    def meters(self) -> dict[str, BusMeter]:
        """The meters on the line by their current address (a fresh dict)."""
        return {m.address: m for m in self._meters}

    def add_meter(self, meter: BusMeter) -> None:
        """Connect a meter to the line. Two meters with one address are refused."""
        if any(m.address == meter.address for m in self._meters):
            raise ValueError(f"bus {self.name}: a meter with address {meter.address} is already connected")
        self._meters.append(meter)
        self._index = None

    def remove_meter(self, meter: BusMeter | str) -> BusMeter:
        """Disconnect a meter (or the meter with that address); returns it."""
        for i, m in enumerate(self._meters):
            if m is meter or m.address == meter:
                self._index = None
                return self._meters.pop(i)
        raise KeyError(meter if isinstance(meter, str) else meter.address)

    def _at(self, address: str) -> list[BusMeter]:
        """The meters whose address is ``address``, in line order, without scanning the line.

        An address index, checked on use: an entry whose meters no longer have that address, or
        a miss, rebuilds it from the meters' current addresses, so a meter whose address changed
        (0x15, or set from outside) is found under its new one. The index is also dropped after
        every broadcast or wildcard transaction (the only requests that can change an address).
        One case it does not see at once: a meter given, from outside, the address another meter
        still answers to is heard at that address only after the next rebuild.
        """
        index = self._index
        if index is not None:
            found = index.get(address)
            if found is not None and all(m.address == address for m in found):
                return found
        index = self._index = {}
        for m in self._meters:
            index.setdefault(m.address, []).append(m)
        return index.get(address, [])

    def __len__(self) -> int:
        return len(self._meters)

    def __contains__(self, address: object) -> bool:
        return any(m.address == address for m in self._meters)

    def __repr__(self) -> str:
        return f"Bus({self.name!r}, meters={len(self._meters)}, timing={'on' if self.timing.enabled else 'off'})"

    def summary(self) -> dict[str, object]:
        """Name, size, timing and counters, JSON-friendly."""
        t = self.timing
        return {
            "name": self.name,
            "meters": len(self._meters),
            "timing": f"{t.baud} bps, Td {t.td_distribution} {t.td_min_ms:g}-{t.td_max_ms:g} ms"
            if t.enabled
            else "off",
            **self.stats.as_dict(),
        }

    # --- transactions -----------------------------------------------------------------

    async def transact(self, request: Frame, raw_len: int | None = None, *, only: str | None = None) -> list[Chunk]:
        """Put ``request`` on the line; return what comes back, as timed chunks.

        ``raw_len`` is the request's size on the wire (preamble included; default: its
        frame length plus 4 FE). ``only`` restricts the listeners to the meter with that
        address (a DTU: one meter behind one modem). The chunks' delays are relative to
        the moment this returns; the bus keeps the line busy until the last one is out.
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            wait = self._busy_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            start = loop.time()
            if raw_len is None:
                raw_len = MIN_FRAME + request.length + REQUEST_PREAMBLE_GUESS
            timing = self.timing
            request_time = timing.wire_seconds(raw_len) if timing.enabled else 0.0
            fired: list[tuple[str, Fault]] = []
            answered: list[str] = []
            chunks: list[Chunk] = []
            collided = False

            if request.control.response:
                self.stats.ignored += 1
            else:
                self.stats.requests += 1
                target = request.address
                exact = target != BROADCAST and not is_wildcard(target)
                if only is not None:
                    listeners = self._at(only)
                elif exact:
                    listeners = self._at(target)  # nobody else can match: no need to ask every meter
                else:
                    listeners = self._meters
                if not exact:
                    self._index = None  # a broadcast or wildcard request may change addresses
                if target == BROADCAST:
                    self.stats.broadcasts += 1
                    now = self.clock.now()
                    for meter in list(listeners):
                        self._respond(meter, request, now)  # delivered; any answer is suppressed
                else:
                    chunks, answered, collided = self._replies(request, listeners, request_time, fired)
                    if not answered:
                        self.stats.unanswered += 1
            # The first chunk's delay already includes the request's wire time.
            end = start + (sum(c.delay for c in chunks) if chunks else request_time)
            self._busy_until = end
            self.history.append(
                TransactionRecord(request, start, end, tuple(answered), collided, tuple(fired), tuple(chunks))
            )
            return chunks

    def _respond(self, meter: BusMeter, request: Frame, now: datetime) -> Frame | None:
        try:
            return meter.respond(request, now)
        except Exception:
            self.stats.firmware_errors += 1
            log.exception("bus %s: meter %s failed on %r", self.name, meter.address, request)
            return None

    def _replies(
        self, request: Frame, listeners: list[BusMeter], request_time: float, fired: list[tuple[str, Fault]]
    ) -> tuple[list[Chunk], list[str], bool]:
        now = self.clock.now()
        target = request.address
        wildcard = is_wildcard(target)
        segments: list[_Segment] = []
        answered: list[str] = []
        td: list[float] = []  # this transaction's turnaround, drawn when the first meter answers
        for meter in list(listeners):
            if not address_matches(target, meter.address):
                continue
            reply = self._respond(meter, request, now)
            if reply is None:
                continue
            if wildcard and meter.profile.wildcard_reply_echo and reply.address == meter.address:
                reply = Frame(target, reply.control, reply.data, reply.edition)
            played = self._play(meter, reply, fired, td)
            if played is None:
                continue
            index = len(answered)
            answered.append(meter.address)
            segments.extend(_Segment(t, index, data) for t, data in played)
        self.stats.replies += len(answered)

        # Overlapping segments from different meters collide (checked against the nominal
        # wire time even when timing is off, so simultaneous replies always collide).
        timing = self.timing
        segments.sort(key=lambda s: (s.start, s.meter))
        clusters: list[list[_Segment]] = []
        cluster_end = -math.inf
        for seg in segments:
            if clusters and seg.start < cluster_end:
                clusters[-1].append(seg)
            else:
                clusters.append([seg])
                cluster_end = -math.inf
            cluster_end = max(cluster_end, seg.start + timing.wire_seconds(len(seg.data)))
        emitted: list[tuple[float, bytes]] = []
        collided = False
        for cluster in clusters:
            if len({s.meter for s in cluster}) == 1:  # one meter's pieces: each on its own
                for s in cluster:
                    emitted.append((s.start + (timing.wire_seconds(len(s.data)) if timing.enabled else 0.0), s.data))
                continue
            collided = True
            self.stats.collisions += 1
            t0 = cluster[0].start
            data = _collide([(round((s.start - t0) / timing.byte_seconds), s.data) for s in cluster])
            emitted.append((t0 + (timing.wire_seconds(len(data)) if timing.enabled else 0.0), data))
        emitted.sort(key=lambda e: e[0])
        chunks: list[Chunk] = []
        previous = -request_time
        for done, data in emitted:
            chunks.append(Chunk(max(done - previous, 0.0), data))
            previous = done
        return chunks, answered, collided

    def _fire(
        self, meter: BusMeter, kind: Fault, fired: list[tuple[str, Fault]], function: int | None = None
    ) -> FaultSpec | None:
        spec = None
        meter_faults = getattr(meter, "faults", None)
        for faults in (meter_faults, self.faults):
            if faults and kind in faults.active:
                spec = faults.fire(kind, self._fault_rng.random(), function)
                if spec is not None:
                    break
        if spec is not None:
            fired.append((meter.address, kind))
            self.stats.faults[kind.value] += 1
        return spec

    def _play(
        self, meter: BusMeter, reply: Frame, fired: list[tuple[str, Fault]], td: list[float]
    ) -> list[tuple[float, bytes]] | None:
        """The reply as (start after the request, bytes) pieces, faults applied; None = silent.

        Td is drawn once per transaction (``td`` holds it); further meters answering the same
        request start within two character times of it (same firmware, same turnaround), so
        simultaneous replies overlap and collide as they do on a real line.
        """
        if self._fire(meter, Fault.NO_REPLY, fired, reply.function):
            return None
        if self._fire(meter, Fault.WRONG_ADDRESS, fired, reply.function):
            reply = Frame(self._other_address(meter, reply.address), reply.control, reply.data, reply.edition)
        preamble = meter.profile.reply_preamble
        raw = bytearray(reply.encode(preamble))
        if self._fire(meter, Fault.BAD_CHECKSUM, fired, reply.function):
            raw[-2] ^= 0xFF
        if self._fire(meter, Fault.TRUNCATED, fired, reply.function):
            body = len(raw) - preamble
            raw = raw[: preamble + self._fault_rng.randint(1, body - 1)]
        timing = self.timing
        if not timing.enabled:
            start = 0.0
        elif not td:
            start = timing.sample_td(self._td_rng)
            td.append(start)
        else:
            start = td[0] + self._td_rng.uniform(0.0, 2 * timing.byte_seconds)
        late = self._fire(meter, Fault.LATE_REPLY, fired, reply.function)
        if late:
            start = (timing.td_max_ms + late.delay_ms) / 1000.0
        gaps = self._fire(meter, Fault.BYTE_GAPS, fired, reply.function)
        if not gaps or len(raw) < 2:
            return [(start, bytes(raw))]
        pieces = min(self._fault_rng.choice((2, 3)), len(raw))
        cuts = sorted(self._fault_rng.sample(range(1, len(raw)), pieces - 1))
        played = []
        for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            played.append((start, bytes(raw[a:b])))
            start += (timing.wire_seconds(b - a) if timing.enabled else 0.0) + gaps.gap_ms / 1000.0
        return played

    def _other_address(self, meter: BusMeter, current: str) -> str:
        """A valid address that is not the meter's: the next meter on the line, else address + 1."""
        others = sorted(m.address for m in self._meters if m.address not in (meter.address, current))
        if others:
            later = [a for a in others if a > meter.address]
            return (later or others)[0]
        base = meter.address if meter.address.isdigit() else "0" * 12
        n = (int(base) + 1) % 10**12
        if f"{n:012d}" in (BROADCAST, current):
            n = (n + 1) % 10**12
        return f"{n:012d}"


def _collide(parts: list[tuple[int, bytes]]) -> bytes:
    """Overlay replies (byte offset, bytes) with a wired-OR, then jam any frame that survived."""
    size = max(offset + len(data) for offset, data in parts)
    buf = bytearray(size)
    for offset, data in parts:
        for i, byte in enumerate(data, offset):
            buf[i] |= byte
    return jam(buf)


def jam(buf: bytes | bytearray) -> bytes:
    """``buf`` changed as little as needed so that it contains no valid frame anywhere."""
    buf = bytearray(buf)
    for _ in range(32):
        spans = valid_frame_spans(buf)
        if not spans:
            return bytes(buf)
        for _start, end in spans:
            buf[end - 2] ^= 0xFF  # the checksum byte
    return b"\xff" * len(buf)  # no 68 at all: nothing can parse


def valid_frame_spans(buf: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) of every complete valid frame found at any 68 in ``buf``."""
    raw = bytes(buf)
    spans = []
    i = raw.find(START)
    while i >= 0:
        try:
            _, end = parse_frame_at(raw, i)
        except FrameError:
            pass
        else:
            spans.append((i, end))
        i = raw.find(START, i + 1)
    return spans


Writer = Callable[[bytes], Awaitable[object] | object]


@dataclass
class PortStats:
    """Counters of one connection."""

    bytes_in: int = 0
    frames_in: int = 0
    chunks_out: int = 0
    bytes_out: int = 0
    write_errors: int = 0


class BusPort:
    """One master's connection to a bus: bytes in, timed replies out, in order.

    ``feed`` is synchronous (call it from a reader callback or a read loop); complete frames
    are queued and a worker task runs them through :meth:`Bus.transact`, sleeping the
    chunks' delays and calling ``write`` (sync or async) for each. After ``idle_flush``
    seconds without bytes a half-received frame is dropped (:meth:`Deframer.flush`).
    Must be created inside a running event loop.
    """

    def __init__(
        self,
        bus: Bus,
        write: Writer,
        *,
        idle_flush: float = DEFAULT_IDLE_FLUSH,
        only: str | None = None,
        name: str = "",
    ) -> None:
        self.bus = bus
        self.only = only
        self.name = name or bus.name
        self.stats = PortStats()
        self.deframer = Deframer()
        self._write = write
        self._idle_flush = idle_flush
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[Frame, int]] = asyncio.Queue()
        self._idle: asyncio.TimerHandle | None = None
        self._worker = self._loop.create_task(self._run(), name=f"bus-port-{self.name}")
        self._closed = False

    def feed(self, data: bytes) -> None:
        """Bytes received from the master."""
        if self._closed or not data:
            return
        self.stats.bytes_in += len(data)
        before = self.deframer.pending + len(data)
        frames = self.deframer.feed(data)
        consumed = before - self.deframer.pending
        self._enqueue(frames, consumed)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.deframer.pending:
            self._idle = self._loop.call_later(self._idle_flush, self.flush)

    def flush(self) -> None:
        """The line went quiet: give up on a partial frame, run any frames behind it."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self._closed:
            self._enqueue(self.deframer.flush(), 0)

    def _enqueue(self, frames: list[Frame], consumed: int) -> None:
        # Attribute preamble/noise bytes to the first frame, for its wire time.
        extra = consumed - sum(MIN_FRAME + f.length for f in frames)
        for frame in frames:
            self.stats.frames_in += 1
            self._queue.put_nowait((frame, MIN_FRAME + frame.length + max(extra, 0)))
            extra = 0

    async def _run(self) -> None:
        while True:
            frame, raw_len = await self._queue.get()
            try:
                chunks = await self.bus.transact(frame, raw_len, only=self.only)
                for delay, data in chunks:
                    if delay > 0:
                        await asyncio.sleep(delay)
                    try:
                        result = self._write(data)
                        if inspect.isawaitable(result):
                            await result
                    except (OSError, RuntimeError) as exc:
                        self.stats.write_errors += 1
                        log.debug("port %s: write failed: %s", self.name, exc)
                        continue
                    self.stats.chunks_out += 1
                    self.stats.bytes_out += len(data)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("port %s: transaction failed", self.name)
            finally:
                self._queue.task_done()

    async def drain(self) -> None:
        """Wait until every queued request has been answered (or not)."""
        await self._queue.join()

    def abort(self) -> None:
        """Stop at once: pending requests and replies are dropped."""
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._worker.cancel()

    async def close(self) -> None:
        """Stop and wait for the worker to end."""
        self.abort()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass


async def serve_stream(
    bus: Bus,
    read: Callable[[], Awaitable[bytes]],
    write: Writer,
    *,
    idle_flush: float = DEFAULT_IDLE_FLUSH,
    only: str | None = None,
    name: str = "",
    drain_on_eof: bool = True,
) -> PortStats:
    """Serve one byte stream on ``bus`` until ``read()`` returns b"" (end of stream).

    At the end, a half-received frame is flushed and (with ``drain_on_eof``) replies still
    due are written before returning; the port's counters are returned.
    """
    port = BusPort(bus, write, idle_flush=idle_flush, only=only, name=name)
    try:
        while data := await read():
            port.feed(data)
        port.flush()
        if drain_on_eof:
            await port.drain()
    finally:
        await port.close()
    return port.stats


def mapping_of(buses: Mapping[str, Bus] | Iterable[Bus]) -> dict[str, Bus]:
    """Buses by name, from a mapping or an iterable of buses."""
    if isinstance(buses, Mapping):
        return dict(buses)
    return {bus.name: bus for bus in buses}
