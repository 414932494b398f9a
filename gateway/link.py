"""Per-line scheduling: one transaction at a time on a half-duplex RS-485 line.

A :class:`Link` owns one transport and a priority queue. Operator commands go before
polling; between transactions the line rests for an inter-frame gap (some meters drop
commands that come too fast, dlt645.md §1.6). Each transaction writes the request with the
meter's wake-up preamble, drops stale input first, waits for a reply within a timeout derived
from the baud rate, the frame sizes and Td max, and checks the reply: the address must be the
one asked, the function and the DI must match (a 0x12 part also its sequence number). A
checksum failure or silence is retried with backoff; an abnormal reply is an answer and is
not retried. 0x12 follow-up frames are fetched and assembled inside the same transaction.

**Timeout.** The reply must have ended by: request wire time + Td max (dlt645.md §1.6) + the
wire time of the longest reply the request can get (:func:`reply_bound`: from the DI table's
value size for reads, a block's bound, the fixed reply of every other function, §2.1, §7.1)
+ ``margin_s`` (+ ``security_extra_s`` for 0x03 and 0x1C, §1.6: ESAM operations are slow).
Wire time is 11 bits a byte (8E1, §1.1, §9) at the transport's baud rate; when the
transport does not know it (``tcp://`` without ``?baud=``, MQTT and DTU lines), at
``LinkConfig.baud``, else the meter profile's (:class:`~gateway.client.MeterClient` passes
it), else 2400 (§1.1). While bytes keep arriving the deadline moves on (Tb, §1.6).

**Late replies.** Many replies carry nothing that says which request they answer (0x94,
0x9C, 0x93, every abnormal reply: §2.1), so a reply that comes after its timeout could be
taken for the next request's. Hence: after a transaction in which an attempt went without
its reply (timeout, garbage, a reply rejected, or the line lost after the request left), the
line is not used again until it has been quiet for a guard time, by default the failed
request's own reply window (Td max + its reply's wire time + margin, + the ESAM allowance
for security commands); whatever arrives meanwhile is discarded and counted
(``LinkStats.late_bytes``), and every byte restarts the guard (at most
``late_guard_max_s`` in all: a line that never falls quiet is used anyway, with the checks
above still in force). Retries of one request need no guard: a late reply to an earlier
attempt of the same request is an answer to that very request.

A reply later than the guard would still be taken for the next request's if that request goes
to the same meter with the same function. So a meter that lost a reply stays *unsynced* until
a reply that names its request (a read's DI) comes from it; before the next request to it
whose reply names nothing (a write, a relay command, a clear, a freeze...), the link first
reads its communication address (04000401; 1997: C032) and sends the request only once that
read is answered (normally or abnormally: the function tells it from a late reply). A meter
answers one request after another and the line delivers in order, so whatever it still owed
the lost request came before that answer and was discarded. The read and its reply are in the
transaction's frames (the audit trail). It costs one read after a lost reply, nothing otherwise.

**Lost line.** A transport that goes down during a transaction (converter, DTU or broker gone:
the MQTT and TCP transports raise :class:`~gateway.errors.LinkDown`) is reopened in the
background with backoff, and the request is sent again once it is back; that does not use up
a retry. The wait is the line's, not each transaction's: the line has one down-since time
(set when a transaction first finds it down, or when ``start`` cannot open it), and a
transaction waits only for what is left of ``reconnect_s`` (default 30 s) since then. Once the
line has been down that long, the transaction waiting and every queued or new one fail at
once with LinkDown (a dead line costs its queue about ``reconnect_s`` in all, not
``reconnect_s`` per job); reopening goes on in the background, and when the transport is back
the next transaction is sent as usual. The down-since time ends when a transaction gets
through the transport again (a reply, or silence from the meter), not merely when it reopens
(a line that drops again at once is still the same outage).

**Deadlines.** A request may carry a deadline (``deadline`` of :meth:`Link.submit`, a
:func:`time.monotonic` instant; :class:`~gateway.client.MeterClient` derives it from a
command's validity end, ``not_after``). It is not sent after that instant: neither first (it
waited in the queue or for the line), nor again after a reconnect, nor as a retry after
silence. It then fails with :class:`Expired` (whose ``sent`` says whether an earlier attempt
went out and may have reached the meter). A reply already on its way is still awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from enum import IntEnum

from protocols.dlt645 import (
    BROADCAST,
    DI_1997,
    DI_2007,
    Deframer,
    Dlt645Error,
    Edition,
    ErrorReply,
    Frame,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    SecurityErrorReply,
    address_matches,
    build_frame,
    encode_frame,
    is_wildcard,
    parse_payload,
)
from protocols.dlt645.edition1997 import Read1997Request
from protocols.dlt645.followup import FollowUpAssembler
from protocols.dlt645.payloads import Payload
from protocols.dlt645.relay import RelayErrorReply
from protocols.dlt645.security import reply_body_type

from .errors import GatewayError, LinkDown, MeterRefused, NoReply, ReplyMismatch, WrongMeter
from .transports.base import Transport

log = logging.getLogger(__name__)

REOPEN_PAUSE_MAX_S = 1.0
"""Longest pause between reopening attempts of a lost line (the first is ``LinkConfig.backoff_s``): a
line that is back is used again within about this long."""
REOPEN_TIMEOUT_S = 30.0
"""Bound of one reopening attempt (the transports have shorter timeouts of their own)."""


class Expired(LinkDown):
    """A request not sent, or not sent again, because its deadline came first (module docs,
    "Deadlines"): it waited for its turn, for a lost line to come back, or for a retry.

    ``sent``: an earlier attempt went out (it may have reached the meter); ``cause``: what it
    was waiting out (the line's LinkDown, the last attempt's NoReply), if anything. It is a
    :class:`~gateway.errors.LinkDown` so that a caller which retries a lost line later retries
    this too, and its own validity check then ends the command (the command service settles a
    sent top-up by its purchase count, a relay command by status word 3).
    """

    def __init__(self, address: str, what: str, sent: bool, cause: BaseException | None = None) -> None:
        how = "not sent again (an earlier attempt went out)" if sent else "not sent"
        why = f" (waiting out: {cause})" if cause is not None else ""
        super().__init__(f"{what} to meter {address} {how}: its deadline has passed{why}")
        self.address = address
        self.what = what
        self.sent = sent
        self.cause = cause


BITS_PER_BYTE = 11  # 8E1 (dlt645.md §1.1, §9)
DEFAULT_BAUD = 2400
"""Wire speed assumed when neither the transport, the line's configuration nor the meter profile
gives one: SGCC meters' RS-485 ports are 2400 bps by default (dlt645.md §1.1)."""

FRAME_OVERHEAD = 12
"""68, address (6), 68, C, L, CS, 16 (dlt645.md §1.2, §1.3)."""
REPLY_PREAMBLE_MAX = 4
"""A meter puts 0..4 FE before its reply (dlt645.md §1.2)."""
READ_DATA_MAX = 200
"""Data bytes in one read reply frame; a longer value comes in 0x12 follow-up frames (the 1997 text's
L <= 200 for reads, dlt645.md §1.2, §2.1: meters split what does not fit)."""


class Priority(IntEnum):
    """Queue order: lower runs first."""

    COMMAND = 0
    """Operator commands (top-up, relay, tariff)."""
    INTERACTIVE = 1
    """A person waiting at the CLI or API."""
    POLL = 2
    """Background reading."""


@dataclass
class LinkConfig:
    """Timing and retry policy of one line."""

    gap_s: float = 0.05
    """Silence between transactions."""
    td_max_s: float = 0.5
    """Longest meter turnaround (dlt645.md §1.6: 20 ms <= Td <= 500 ms)."""
    margin_s: float = 0.25
    """Added to every timeout (converters, DTUs, scheduling jitter)."""
    inter_byte_s: float = 0.5
    """Once a reply has started, how long a silence may last before it is given up (Tb)."""
    retries: int = 2
    """Extra attempts after the first (3 tries on RS-485, prepaid.md §5.3 [A])."""
    backoff_s: float = 0.1
    """Pause before the first retry; doubles each time."""
    security_extra_s: float = 1.5
    """ESAM operations are slow on real meters (dlt645.md §1.6: allow >= 1-2 s)."""
    baud: int | None = None
    """Wire speed of the line when the transport does not know it (``tcp://`` without ``?baud=``,
    MQTT and DTU lines); None: the meter profile's, else :data:`DEFAULT_BAUD`."""
    late_guard_s: float | None = None
    """Quiet time the line needs after a transaction whose reply went missing or was rejected,
    before the next request goes out (module docs, "Late replies"). None: the failed request's own
    reply window (Td max + its reply's wire time + margin, + ``security_extra_s`` for security
    commands); 0: no guard."""
    late_guard_max_s: float = 10.0
    """The guard gives up waiting for quiet after this long (a line with continuous noise)."""
    reconnect_s: float = 30.0
    """How long the line may be down (since it was found down, whichever transaction found it) while
    transactions wait for it to come back (reopened with backoff); after that they fail with
    LinkDown at once until it is back (module docs, "Lost line"); 0: fail at once."""


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    frame: Frame = field(compare=False)
    preamble: int = field(compare=False)
    expect_reply: bool = field(compare=False)
    retries: int = field(compare=False)
    future: asyncio.Future = field(compare=False)
    baud: int | None = field(default=None, compare=False)
    deadline: float | None = field(default=None, compare=False)
    """Not sent (again) after this :func:`time.monotonic` instant (module docs, "Deadlines")."""
    wrote: bool = field(default=False, compare=False)
    """An attempt of it has been written (it may have reached the meter)."""


@dataclass
class LinkStats:
    """Counters of one line."""

    transactions: int = 0
    attempts: int = 0
    timeouts: int = 0
    wrong_meter: int = 0
    mismatched: int = 0
    discarded_bytes: int = 0
    """Input dropped unread: before each request, and during late-reply guards."""
    echoes: int = 0
    link_errors: int = 0
    guards: int = 0
    """Late-reply guards waited (module docs)."""
    syncs: int = 0
    """Address reads before a DI-less request to a meter that lost a reply (module docs)."""
    late_bytes: int = 0
    """Bytes that arrived during a late-reply guard (discarded: a late reply is never matched)."""
    reconnects: int = 0
    """Times the line was reopened after it was found down."""
    expired: int = 0
    """Requests not sent (again) because their deadline had passed."""


@dataclass
class Exchange:
    """A completed transaction: the request, the (assembled) reply, and the frames on the wire."""

    request: Frame
    reply: Frame | None
    payload: Payload | None
    frames: list[bytes]
    attempts: int


def reply_bound(request: Frame) -> int:
    """The most bytes a reply to ``request`` can take on the wire (FE preamble included); 0: none comes.

    Reads (2007 0x11, 1997 0x01): DI + the value size of the DI table (dlt645.md §3; a block of a
    variable count: its limit, else one full frame, :data:`READ_DATA_MAX`; a DI the table does not
    know: one full frame). 0x12/0x02 follow-up parts: one full frame. 0x03 security: DI + the
    reply body of its DI (§5.2). Every other function: its fixed reply (§2.1, §7.1). An abnormal
    reply (ERR, or SERR for 0x03) is never longer than that.
    """
    if request.address == BROADCAST:
        return 0  # nobody answers it (dlt645.md §1.5)
    f = request.function
    data = _reply_data_bound(request, f)
    return REPLY_PREAMBLE_MAX + FRAME_OVERHEAD + max(data, 2)  # ERR (1) / SERR (2) at least


def _reply_data_bound(request: Frame, f: int) -> int:
    if request.edition is Edition.V1997:
        if f == 0x01:
            return 2 + _value_bound(DI_1997, request.data[:2], 2)
        return {0x04: 0, 0x0A: 6, 0x0C: 1, 0x0F: 8, 0x10: 0}.get(f, READ_DATA_MAX)  # 0x02, 0x03 (re-read): a frame
    if f == 0x11:
        return 4 + _value_bound(DI_2007, request.data[:4], 4)
    if f == 0x03:
        if len(request.data) < 4:
            return READ_DATA_MAX
        size = getattr(reply_body_type(int.from_bytes(request.data[:4], "little")), "SIZE", None)
        return 4 + (size if size is not None else READ_DATA_MAX - 4)
    fixed = {0x13: 6, 0x14: 0, 0x15: 0, 0x16: 0, 0x17: 1, 0x18: 4, 0x19: 0, 0x1A: 0, 0x1B: 0, 0x1C: 2, 0x1D: 1}
    return fixed.get(f, READ_DATA_MAX)  # 0x12 follow-up parts and anything unknown: a full frame


def _value_bound(table: object, di_bytes: bytes, width: int) -> int:
    """The most value bytes one reply frame carries for this DI (see :func:`reply_bound`)."""
    room = READ_DATA_MAX - width
    if len(di_bytes) < width:
        return room
    item = table.get(int.from_bytes(di_bytes, "little"))  # type: ignore[attr-defined]
    if item is None:
        return room
    if item.size is not None:
        return min(item.size, room)
    fmt = item.format
    step = getattr(getattr(fmt, "item", None), "size", None)
    limit = getattr(fmt, "limit", None)
    if step and limit:
        return min(step * limit, room)
    return room


class Link:
    """One RS-485 line: a transport, a priority queue and one transaction at a time."""

    def __init__(self, transport: Transport, config: LinkConfig | None = None, name: str | None = None) -> None:
        self.transport = transport
        self.config = config or LinkConfig()
        self.name = name or transport.url
        self.stats = LinkStats()
        self._queue: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._worker: asyncio.Task[None] | None = None
        self._last_end = 0.0
        self._dirty: tuple[Frame, int | None] | None = None
        """The request (and its baud hint) of the last transaction that lost a reply: the next one guards."""
        self._unsynced: set[str] = set()
        """Meters that may still owe a reply (module docs, "Late replies")."""
        self._reopen_pause = max(self.config.backoff_s, 0.01)
        """The next pause before reopening a lost transport; reset when a transaction gets through."""
        self._down_since: float | None = None
        self._down_error: LinkDown | None = None
        self._usable = asyncio.Event()
        """Set unless the transport was lost and has not been reopened since."""
        self._usable.set()
        self._reopener: asyncio.Task[None] | None = None

    @property
    def down_since(self) -> float | None:
        """When the line was found down (:func:`time.monotonic`), if no transaction has got through
        since; None while it works (module docs, "Lost line")."""
        return self._down_since

    async def start(self, *, require_open: bool = False) -> Link:
        """Open the transport and start the worker.

        If the transport cannot be opened, each transaction tries again (a gateway that starts
        while a converter or broker is down); with ``require_open`` the LinkDown is raised
        instead (a one-shot command: report it at once).
        """
        try:
            await self.transport.open()
        except LinkDown as exc:
            if require_open:
                raise
            self._lost(exc)
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name=f"link {self.name}")
        return self

    async def stop(self) -> None:
        """Stop the worker, fail queued jobs, close the transport."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._reopener is not None:
            self._reopener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reopener
            self._reopener = None
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(LinkDown(f"line {self.name} stopped"))
        await self.transport.close()

    async def __aenter__(self) -> Link:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def submit(
        self,
        frame: Frame,
        *,
        priority: Priority = Priority.INTERACTIVE,
        preamble: int = 4,
        expect_reply: bool = True,
        retries: int | None = None,
        baud: int | None = None,
        deadline: float | None = None,
    ) -> asyncio.Future[Exchange]:
        """Queue a request; the future gives its :class:`Exchange` or a typed error.

        ``baud``: the meter's wire speed (its profile's), used for timeouts when neither the
        transport nor :attr:`LinkConfig.baud` knows the line's. ``deadline``: a
        :func:`time.monotonic` instant after which the request is not sent, first or again
        (after a reconnect, or as a retry): it fails with :class:`Expired` (module docs).
        """
        if self._worker is None:
            raise GatewayError(f"line {self.name} is not started")
        fut: asyncio.Future[Exchange] = asyncio.get_running_loop().create_future()
        tries = self.config.retries if retries is None else retries
        job = _Job(int(priority), next(self._seq), frame, preamble, expect_reply, tries, fut, baud, deadline)
        self._queue.put_nowait(job)
        return fut

    async def transact(
        self,
        address: str,
        payload: Payload,
        *,
        priority: Priority = Priority.INTERACTIVE,
        preamble: int = 4,
        retries: int | None = None,
        baud: int | None = None,
        deadline: float | None = None,
    ) -> Exchange:
        """Send ``payload`` to ``address`` and wait for the checked reply (none for broadcast).

        ``deadline``: see :meth:`submit`.
        """
        frame = build_frame(address, payload)
        return await self.submit(
            frame,
            priority=priority,
            preamble=preamble,
            expect_reply=address != BROADCAST,
            retries=retries,
            baud=baud,
            deadline=deadline,
        )

    # --- timing -----------------------------------------------------------------------------------

    def line_baud(self, hint: int | None = None) -> int:
        """The wire speed timeouts are computed at: the transport's, the configuration's, ``hint``
        (the meter profile's), else :data:`DEFAULT_BAUD`; 0 for a line without wire time (in memory)."""
        baud = self.transport.baud
        if baud is not None:
            return baud
        return self.config.baud or hint or DEFAULT_BAUD

    def wire_s(self, nbytes: int, baud: int) -> float:
        """Seconds ``nbytes`` take on the wire at ``baud`` (11 bits a byte, dlt645.md §9)."""
        return nbytes * BITS_PER_BYTE / baud if baud > 0 else 0.0

    def reply_window_s(self, request: Frame, baud: int) -> float:
        """From the end of the request to the latest end of its reply: Td max + the longest reply's
        wire time + margin (+ the ESAM allowance for 0x03 and 0x1C, dlt645.md §1.6)."""
        cfg = self.config
        extra = cfg.security_extra_s if _is_security(request) else 0.0
        return cfg.td_max_s + self.wire_s(reply_bound(request), baud) + cfg.margin_s + extra

    def timeout_s(self, request: Frame, sent_len: int, baud: int) -> float:
        """From the start of writing the request to the latest end of its reply."""
        return self.wire_s(sent_len, baud) + self.reply_window_s(request, baud)

    # --- the worker -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            if job.future.cancelled():
                continue
            try:
                result = await self._execute(job)
            except asyncio.CancelledError:
                if not job.future.done():
                    job.future.set_exception(LinkDown(f"line {self.name} stopped"))
                raise
            except Exception as exc:
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                if not job.future.done():
                    job.future.set_result(result)

    async def _rest(self) -> None:
        wait = self._last_end + self.config.gap_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _execute(self, job: _Job) -> Exchange:
        """Run one transaction; a typed error carries the frames that were on the wire (``.frames``)."""
        frames: list[bytes] = []
        try:
            return await self._exchange(job, frames)
        except GatewayError as exc:
            exc.frames = tuple(frames)  # type: ignore[attr-defined]
            raise

    async def _exchange(self, job: _Job, frames: list[bytes]) -> Exchange:
        self.stats.transactions += 1
        request = job.frame
        self._check_deadline(job, request, None)  # expired while queued: not even the guard is waited
        await self._guard()
        if job.expect_reply and request.address in self._unsynced and not _reply_names_request(request):
            await self._sync(request, job, frames)
        wire = encode_frame(request.address, request.control.byte, request.data, job.preamble)
        frames.append(wire)
        reply, attempts = await self._send(request, wire, job, frames, job.expect_reply)
        if reply is None:
            return Exchange(request, None, None, frames, attempts)
        if attempts == 1 and _reply_names_request(request) and not reply.control.abnormal:
            self._unsynced.discard(request.address)  # it answered a request that its reply names
        payload = parse_payload(reply)
        if isinstance(payload, (ErrorReply, SecurityErrorReply, RelayErrorReply)):
            raise MeterRefused(reply.address, payload.error(), _describe(request), _di(request))
        if isinstance(payload, ReadReply) and reply.control.follow_up:
            reply, payload = await self._follow_up(request, reply, payload, job, frames)
        return Exchange(request, reply, payload, frames, attempts)

    async def _send(
        self, request: Frame, wire: bytes, job: _Job, frames: list[bytes], expect_reply: bool
    ) -> tuple[Frame | None, int]:
        """Send ``request`` until a reply to it is accepted; the reply and the number of attempts.

        Silence, garbage or a rejected reply: retried ``job.retries`` times with backoff, then the
        typed error. The line lost: waited for (:meth:`_await_line`), then sent again without
        using a retry. Nothing is sent after the job's deadline (:class:`Expired`).
        """
        failures = 0
        attempts = 0
        cause: GatewayError | None = None
        while True:
            self._check_deadline(job, request, cause)
            await self._await_line(job, request)
            attempts += 1
            try:
                reply = await self._attempt(request, wire, job, frames, expect_reply)
            except LinkDown as exc:
                self._dirty = (request, job.baud)  # the request may have left: its reply may still come
                self._unsynced.add(request.address)
                log.info("line %s: %s (attempt %d)", self.name, exc, attempts)
                self._lost(exc)
                cause = exc
                continue
            except (NoReply, WrongMeter, ReplyMismatch) as exc:
                self._got_through()
                self._dirty = (request, job.baud)
                self._unsynced.add(request.address)
                failures += 1
                log.info("line %s: %s (attempt %d of %d)", self.name, exc, failures, job.retries + 1)
                if failures > job.retries:
                    if isinstance(exc, NoReply):
                        raise NoReply(request.address, _describe(request), attempts, _di(request)) from None
                    raise
                cause = exc
                await asyncio.sleep(self.config.backoff_s * (2 ** (failures - 1)))
                continue
            self._got_through()
            return reply, attempts

    async def _sync(self, request: Frame, job: _Job, frames: list[bytes]) -> None:
        """Read the meter's address before ``request`` (module docs, "Late replies"): any reply it
        still owed comes before the answer and is discarded. Its failure is the request's."""
        if request.edition is Edition.V1997:
            read = build_frame(request.address, Read1997Request(SYNC_DI_1997))
        else:
            read = build_frame(request.address, ReadRequest(SYNC_DI_2007))
        wire = encode_frame(read.address, read.control.byte, read.data, job.preamble)
        frames.append(wire)
        # Reads are safe to repeat: a meter still busy with the reply it owed may miss the first.
        retries = max(job.retries, SYNC_RETRIES)
        sync = _Job(job.priority, -1, read, job.preamble, True, retries, job.future, job.baud, job.deadline)
        self.stats.syncs += 1
        try:
            await self._send(read, wire, sync, frames, True)
        except Expired as exc:
            raise Expired(request.address, _describe(request), job.wrote, exc.cause) from None
        except LinkDown:
            raise  # the line, not the meter: callers wait for it as for any lost line
        except NoReply as exc:
            raise NoReply(
                request.address,
                f"{_describe(request)} (not sent: the address read before it got no reply)",
                exc.attempts,
            ) from None
        except GatewayError as exc:
            raise ReplyMismatch(
                f"meter {request.address}: {_describe(request)} not sent: the address read before it failed: {exc}"
            ) from None
        self._unsynced.discard(request.address)

    def _check_deadline(self, job: _Job, request: Frame, cause: BaseException | None) -> None:
        """:class:`Expired` if the job's deadline has passed (nothing more of it may be sent)."""
        if job.deadline is not None and time.monotonic() >= job.deadline:
            self.stats.expired += 1
            log.info("line %s: %s to %s: deadline passed, not sent", self.name, _describe(request), request.address)
            raise Expired(request.address, _describe(request), job.wrote, cause)

    # --- a lost line ------------------------------------------------------------------------------

    def _lost(self, exc: LinkDown) -> None:
        """The transport is gone: start the outage clock (unless it runs) and reopen in the background."""
        self._down_error = exc
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("line %s is down: %s", self.name, exc)
        self._usable.clear()
        if self._reopener is None or self._reopener.done():
            self._reopener = asyncio.create_task(self._reopen(), name=f"reopen {self.name}")

    def _got_through(self) -> None:
        """A transaction went through the transport: the outage (if any) is over."""
        self._reopen_pause = max(self.config.backoff_s, 0.01)
        if self._down_since is not None:
            log.info("line %s works again after %.1f s", self.name, time.monotonic() - self._down_since)
            self._down_since = None
            self._down_error = None

    async def _await_line(self, job: _Job, request: Frame) -> None:
        """While the transport is lost and not reopened: wait for it, for what is left of
        ``reconnect_s`` since the line went down (the line's clock, not the job's), and not
        beyond the job's deadline. After that, LinkDown (or :class:`Expired`) at once."""
        cfg = self.config
        while not self._usable.is_set():
            since = self._down_since if self._down_since is not None else time.monotonic()
            error = self._down_error or LinkDown(f"line {self.name} is down")
            self._check_deadline(job, request, error)
            now = time.monotonic()
            end = since + cfg.reconnect_s
            if now >= end:
                if cfg.reconnect_s > 0:
                    raise LinkDown(
                        f"{error} (line {self.name} down for {now - since:.1f} s, reconnect_s {cfg.reconnect_s:g} s)"
                    )
                raise LinkDown(str(error))
            if job.deadline is not None:
                end = min(end, job.deadline)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(end - now):
                    await self._usable.wait()

    async def _reopen(self) -> None:
        """Reopen the transport with backoff until it is up (runs while the line is lost)."""
        tr = self.transport
        while True:
            # The pause grows across reopens until a transaction gets through: a peer that accepts
            # the connection and drops it at once is not hammered with reconnects and resends.
            await asyncio.sleep(self._reopen_pause)
            self._reopen_pause = min(self._reopen_pause * 2, REOPEN_PAUSE_MAX_S)
            try:
                if not tr.connected:
                    async with asyncio.timeout(REOPEN_TIMEOUT_S):
                        await tr.open()
            except LinkDown as again:
                self._down_error = again
                continue
            except TimeoutError:
                continue
            except Exception:
                log.exception("line %s: reopening failed unexpectedly", self.name)
                continue
            self.stats.reconnects += 1
            since = self._down_since
            if since is not None:
                log.info("line %s reopened after %.1f s", self.name, time.monotonic() - since)
            self._usable.set()
            return

    async def _guard(self) -> None:
        """After a lost reply: wait until the line has been quiet for the guard time, dropping what comes."""
        dirty, self._dirty = self._dirty, None
        if dirty is None:
            return
        request, hint = dirty
        cfg = self.config
        guard = cfg.late_guard_s if cfg.late_guard_s is not None else self.reply_window_s(request, self.line_baud(hint))
        tr = self.transport
        if guard <= 0 or not tr.connected:
            return  # a new connection starts empty (the transports drop what an old one had)
        self.stats.guards += 1
        late = tr.discard_input()
        start = time.monotonic()
        quiet_from = start if late else self._last_end
        give_up = start + cfg.late_guard_max_s
        while True:
            now = time.monotonic()
            left = min(quiet_from + guard, give_up) - now
            if left <= 0:
                break
            try:
                chunk = await tr.read(left)
            except LinkDown:
                break  # the attempt reconnects
            if chunk:
                late += len(chunk)
                quiet_from = time.monotonic()
        if late:
            self.stats.late_bytes += late
            self.stats.discarded_bytes += late
            log.info(
                "line %s: %d byte(s) after the lost reply to %s discarded (never matched to the next request)",
                self.name,
                late,
                _describe(request),
            )
        if quiet_from + guard > give_up:
            log.warning("line %s: no quiet %g s within %g s; sending anyway", self.name, guard, cfg.late_guard_max_s)

    async def _attempt(
        self, request: Frame, wire: bytes, job: _Job, frames: list[bytes], expect_reply: bool
    ) -> Frame | None:
        self.stats.attempts += 1
        await self._rest()
        tr = self.transport
        baud = self.line_baud(job.baud)
        try:
            if not tr.connected:
                await tr.open()
            self.stats.discarded_bytes += tr.discard_input()
            job.wrote = True
            await tr.write(wire)
        except LinkDown:
            self.stats.link_errors += 1
            self._last_end = time.monotonic()
            raise
        sent = time.monotonic()
        try:
            if not expect_reply:
                # Nobody answers a broadcast; leave the line quiet for Td max (dlt645.md §9).
                await asyncio.sleep(self.wire_s(len(wire), baud) + self.config.td_max_s)
                return None
            return await self._await_reply(request, len(wire), sent, frames, baud)
        finally:
            self._last_end = time.monotonic()

    async def _await_reply(self, request: Frame, sent_len: int, sent: float, frames: list[bytes], baud: int) -> Frame:
        cfg = self.config
        deadline = sent + self.timeout_s(request, sent_len, baud)
        deframer = Deframer(request.edition)
        wrong: WrongMeter | None = None
        mismatch: ReplyMismatch | None = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                for frame in deframer.flush():
                    checked = self._check(request, frame, frames)
                    if isinstance(checked, Frame):
                        return checked
                self.stats.timeouts += 1
                if wrong is not None:
                    raise wrong
                if mismatch is not None:
                    raise mismatch
                raise NoReply(request.address, _describe(request), 1, _di(request))
            try:
                chunk = await self.transport.read(deadline - now)
            except LinkDown:
                self.stats.link_errors += 1
                raise
            if not chunk:
                continue
            # Bytes are arriving: keep waiting while they do (a long reply at a low baud rate).
            deadline = max(deadline, time.monotonic() + cfg.inter_byte_s + self.wire_s(len(chunk), baud))
            for frame in deframer.feed(chunk):
                checked = self._check(request, frame, frames)
                if isinstance(checked, Frame):
                    return checked
                if isinstance(checked, WrongMeter):
                    wrong = checked
                elif isinstance(checked, ReplyMismatch):
                    mismatch = checked

    def _check(self, request: Frame, frame: Frame, frames: list[bytes]) -> Frame | GatewayError | None:
        """The reply if ``frame`` answers ``request``; otherwise why not (logged, never accepted)."""
        if not frame.control.response:
            self.stats.echoes += 1  # our own request echoed by the bus
            return None
        frames.append(encode_frame(frame.address, frame.control.byte, frame.data, 0))
        asked = request.address
        if frame.address != asked and not (is_wildcard(asked) and address_matches(asked, frame.address)):
            self.stats.wrong_meter += 1
            log.warning("line %s: reply from meter %s while waiting for %s: rejected", self.name, frame.address, asked)
            return WrongMeter(asked, frame.address)
        if frame.function != request.function:
            self.stats.mismatched += 1
            return ReplyMismatch(f"reply function 0x{frame.function:02X} to a 0x{request.function:02X} request")
        if not frame.control.abnormal and request.function in (0x11, 0x12, 0x03, 0x01, 0x02):
            size = 2 if request.function in (0x01, 0x02) else 4
            if len(request.data) >= size and frame.data[:size] != request.data[:size]:
                self.stats.mismatched += 1
                return ReplyMismatch(
                    f"reply for DI {frame.data[:size][::-1].hex().upper()}, "
                    f"asked {request.data[:size][::-1].hex().upper()}"
                )
            if (
                request.function == 0x12
                and request.edition is Edition.V2007
                and len(request.data) >= 5
                and len(frame.data) >= 5
                and frame.data[-1] != request.data[4]
            ):
                # 0x92 ends with the part's SEQ (dlt645.md §2.1): another part (a late one) is no answer
                self.stats.mismatched += 1
                return ReplyMismatch(f"follow-up part {frame.data[-1]} arrived, asked for part {request.data[4]}")
        return frame

    async def _follow_up(
        self, request: Frame, first: Frame, payload: ReadReply, job: _Job, frames: list[bytes]
    ) -> tuple[Frame, ReadReply]:
        asm = FollowUpAssembler(payload.di)
        asm.add(payload, True)
        last = first
        while not asm.done:
            nxt = asm.next_request()
            assert isinstance(nxt, ReadFollowUpRequest)
            follow = build_frame(request.address, nxt)
            wire = encode_frame(follow.address, follow.control.byte, follow.data, job.preamble)
            frames.append(wire)
            for attempt in range(job.retries + 1):
                try:
                    reply, _ = await self._send(follow, wire, job, frames, True)
                    assert reply is not None
                    part = parse_payload(reply)
                    if isinstance(part, ErrorReply):
                        raise MeterRefused(reply.address, part.error(), _describe(follow), _di(follow))
                    asm.add(part, reply.control.follow_up)
                except Dlt645Error as exc:
                    # Not the part asked for: asked again, as any other failed attempt is.
                    self._dirty = (follow, job.baud)
                    self.stats.mismatched += 1
                    log.info("line %s: %s (follow-up attempt %d of %d)", self.name, exc, attempt + 1, job.retries + 1)
                    if attempt == job.retries:
                        raise ReplyMismatch(str(exc)) from None
                    await asyncio.sleep(self.config.backoff_s * (2**attempt))
                    continue
                last = reply
                break
        return last, ReadReply(payload.di, asm.value)


SYNC_DI_2007 = 0x04000401
"""Communication address (dlt645.md §3): read before a DI-less request to a meter that lost a reply."""
SYNC_DI_1997 = 0xC032
SYNC_RETRIES = 2
"""At least this many retries for that read, whatever the request's own (it is idempotent)."""


def _reply_names_request(request: Frame) -> bool:
    """Whether a normal reply to ``request`` names it (a read's DI, a security reply's DI)."""
    if request.edition is Edition.V1997:
        return request.function in (0x01, 0x02)
    return request.function in (0x11, 0x12, 0x03)


def _is_security(request: Frame) -> bool:
    """0x03 security authentication (2007; 1997's 0x03 is a re-read) and 0x1C relay control."""
    return request.function == 0x1C or (request.function == 0x03 and request.edition is Edition.V2007)


_DI_FUNCTIONS = {0x11: 4, 0x12: 4, 0x14: 4, 0x03: 4, 0x01: 2, 0x02: 2, 0x04: 2}
"""Functions whose request data starts with a DI, and its size (2007: 4 bytes; 1997: 2)."""


def _di(request: Frame) -> int | None:
    """The data identifier a request is about, if it has one."""
    size = _DI_FUNCTIONS.get(request.function)
    if size is None or len(request.data) < size:
        return None
    return int.from_bytes(request.data[:size], "little")


def _describe(request: Frame) -> str:
    """``function 0x11 DI 00010000`` (1997: ``function 0x01 DI 9010``), or just the function."""
    di = _di(request)
    if di is None:
        return f"function 0x{request.function:02X}"
    width = 2 * _DI_FUNCTIONS[request.function]
    return f"function 0x{request.function:02X} DI {di:0{width}X}"


__all__ = ["DEFAULT_BAUD", "Exchange", "Expired", "Link", "LinkConfig", "LinkStats", "Priority", "reply_bound"]
