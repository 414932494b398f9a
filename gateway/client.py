"""The async meter client: typed reads, writes, relay control and prepaid security operations.

Every method queues its frames on the meter's :class:`~gateway.link.Link` and returns a
typed result, or raises a typed error (:mod:`gateway.errors`). The master-station side of
the (simulated) ESAM comes from :mod:`protocols.esam`; a session is opened on demand and
renewed when it has expired, and renewing does not count as a retry (prepaid.md §5.3).

**Validity ends.** The methods that act on a meter (writes, relay control, top-ups, the time
broadcast, and the session and reads they need) take ``not_after``: no frame of theirs is
sent, first or again (after a reconnect, or as a retry), once the client's clock (``clock``,
by default the wall clock; the command service gives its own) has passed it; they fail with
:class:`~gateway.link.Expired` instead. A relay command is bounded by its own ``valid_until``
(the meter would refuse it after that anyway).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from protocols.dlt645 import (
    BROADCAST,
    DI_1997,
    DI_2007,
    METER_TZ,
    WILDCARD,
    BroadcastTime,
    Dlt645Error,
    Edition,
    EncryptedRelayControlRequest,
    MeterProfile,
    Password,
    ReadAddressReply,
    ReadAddressRequest,
    ReadReply,
    ReadRequest,
    RelayCommand,
    RelayControlReply,
    RelayControlRequest,
    RelayExecution,
    SecurityFlags,
    UnknownDIError,
    WriteRequest,
    normalize_address,
)
from protocols.dlt645.edition1997 import Read1997Reply, Read1997Request, Write1997Request
from protocols.dlt645.profile import SGCC_2013
from protocols.dlt645.security import SecurityDI, SecurityReply, SecurityRequest, StatusQueryReply
from protocols.esam import EsamCryptoError, MasterStation, Session

from .errors import GatewayError, LinkDown, MeterRefused, NoReply, ReplyMismatch, WrongMeter
from .link import Exchange, Link, Priority

FRAME_TAP: ContextVar[list[bytes] | None] = ContextVar("meterlink_frame_tap", default=None)
"""When set (to a list), every frame this task's clients exchange is appended to it: the command
service records them in the audit trail (each ledger event carries the frames since the last)."""


def _tap(frames: Any) -> None:
    tap = FRAME_TAP.get()
    if tap is not None:
        tap.extend(frames)


SESSION_MINUTES = 5
"""Identity authentication stays valid 5 minutes on the meter by default (prepaid.md §2.3)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One value read from a meter."""

    address: str
    di: int
    edition: Edition
    name: str | None
    value: Any
    unit: str | None
    raw: bytes

    @property
    def code(self) -> str:
        return f"{self.di:0{8 if self.edition is Edition.V2007 else 4}X}"


@dataclass(frozen=True, slots=True)
class ReadFailure:
    """A DI that could not be read (:meth:`MeterClient.read_each`): the meter refused it, or no answer."""

    address: str
    di: int
    edition: Edition
    error: GatewayError

    @property
    def code(self) -> str:
        return f"{self.di:0{8 if self.edition is Edition.V2007 else 4}X}"


@dataclass(frozen=True, slots=True)
class WriteResult:
    """A write the meter accepted: the DI, how it was secured (plain, mac, cipher), the frames."""

    address: str
    di: int
    security: str
    frames: tuple[bytes, ...]
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    """A time broadcast sent (nobody answers 99..99: sent is all that is known)."""

    time: datetime
    frames: tuple[bytes, ...]


PROBE_DI = {Edition.V2007: 0x04000401, Edition.V1997: 0xC032}
"""What :meth:`MeterClient.discover` reads from each address it probes: 2007 the communication
address (04000401), 1997 the meter number (C032, a DI every 1997 meter has; dlt645.md §7.3)."""

_ABSENT = (NoReply, WrongMeter)
"""Errors meaning "no meter of this address answered", as opposed to a line that is down."""


PURCHASE_COUNT_DI = 0x03330201
"""Purchase count of the last purchase record (dlt645.md §3.7): the stored count when the meter refuses
the ESAM status query."""


@dataclass(frozen=True, slots=True)
class TopUpResult:
    """What a top-up did (``outcome``):

    * ``applied``: the amount was added;
    * ``duplicate``: the meter had this purchase count already, nothing added (a retry of a top-up
      it applied: success for an idempotent retry, dlt645.md §5.3 rule 3);
    * ``opened_only``: an account opening whose purchase count equals the meter's: the meter only
      marked the account open and stored the customer number; **nothing was added** (§5.3 rule 4).
    """

    address: str
    amount_fen: int
    purchase_count: int
    outcome: str
    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class RelayResult:
    """A relay command the meter accepted, with its 2-byte execution word when the meter sends one."""

    address: str
    command: RelayCommand
    execution: RelayExecution | None
    frames: tuple[bytes, ...]


class NotAMeterNumber(GatewayError):
    """A security operation (identity authentication, level-98/99 writes and relay control, top-ups)
    for a meter whose meter number is not 12 decimal digits: the ESAM keys are diversified by the
    meter number, so none could be derived. Raised before anything is sent."""

    def __init__(self, address: str, meter_number: str) -> None:
        whose = f"its meter number {meter_number}" if meter_number != address else "the address"
        super().__init__(
            f"meter {address}: {whose} is not a meter number of 12 decimal digits, which ESAM security "
            "operations (level 98/99 writes and relay control, top-ups) need; nothing was sent"
        )
        self.address = address
        self.meter_number = meter_number


def _is_meter_number(text: str) -> bool:
    return len(text) == 12 and text.isascii() and text.isdigit()


def _wall_clock() -> datetime:
    return datetime.now(UTC)


def _bound(not_after: datetime | None) -> dict[str, Any]:
    """``_tx`` keywords for ``not_after``: none when it is None."""
    return {} if not_after is None else {"not_after": not_after}


class MeterClient:
    """One meter on one line.

    ``clock``: the time ``not_after`` and a relay command's ``valid_until`` are compared with
    (module docs, "Validity ends"); the wall clock unless given. ``retries``: tries after the
    first for each transaction (None: the line's setting).
    """

    def __init__(
        self,
        link: Link,
        address: str,
        profile: MeterProfile = SGCC_2013,
        master: MasterStation | None = None,
        operator: str = "00000000",
        meter_number: str | None = None,
        priority: Priority = Priority.INTERACTIVE,
        clock: Callable[[], datetime] | None = None,
        retries: int | None = None,
    ) -> None:
        self.link = link
        self.retries = retries
        self.address = normalize_address(address)
        self.profile = profile
        self.master = master if master is not None else MasterStation()
        self.operator = operator
        self.meter_number = meter_number or self.address
        self.priority = priority
        self.clock = clock or _wall_clock
        self._session: Session | None = None
        self._session_until = 0.0

    def deadline(self, not_after: datetime | None) -> float | None:
        """``not_after`` (on :attr:`clock`) as the :func:`time.monotonic` deadline the link takes."""
        if not_after is None:
            return None
        if not_after.tzinfo is None:
            raise GatewayError("not_after needs a time zone")
        return time.monotonic() + (not_after - self.clock()).total_seconds()

    async def _tx(
        self,
        payload: Any,
        *,
        address: str | None = None,
        retries: int | None = None,
        not_after: datetime | None = None,
    ) -> Exchange:
        try:
            exchange = await self.link.transact(
                address or self.address,
                payload,
                priority=self.priority,
                preamble=self.profile.request_preamble,
                retries=self.retries if retries is None else retries,
                baud=self.profile.baud,
                deadline=self.deadline(not_after),
            )
        except GatewayError as exc:
            _tap(getattr(exc, "frames", ()))  # a refusal or a lost reply is audited too
            raise
        _tap(exchange.frames)
        return exchange

    # --- reading -----------------------------------------------------------------------------------

    async def read(self, di: int, *, not_after: datetime | None = None) -> Reading:
        """Read one DI (a block DI gives a list or record); raises typed errors."""
        edition = self.profile.edition
        table = DI_2007 if edition is Edition.V2007 else DI_1997
        item = table.get(di)
        request = ReadRequest(di) if edition is Edition.V2007 else Read1997Request(di)
        exchange = await self._tx(request, **_bound(not_after))
        payload = exchange.payload
        if not isinstance(payload, (ReadReply, Read1997Reply)):
            raise ReplyMismatch(f"unexpected reply {type(payload).__name__} to a read")
        if item is None:
            return Reading(self.address, di, edition, None, None, None, payload.value)
        try:
            value = item.decode(payload.value)
        except Dlt645Error as exc:
            raise ReplyMismatch(f"meter {self.address} sent a bad value for {item.code}: {exc}") from None
        return Reading(self.address, di, edition, item.name, value, item.unit, payload.value)

    async def read_many(self, dis: list[int]) -> list[Reading]:
        """Read several DIs, one transaction each, in order; the first error is raised."""
        return [await self.read(di) for di in dis]

    async def read_each(
        self, dis: list[int], on_result: Callable[[Reading | ReadFailure], None] | None = None
    ) -> list[Reading | ReadFailure]:
        """Read several DIs in order, one result per DI: a :class:`Reading` or a :class:`ReadFailure`.

        A refused DI (or a bad value) does not stop the others. When the meter does not answer
        at all, or the line is down, the DIs not tried yet fail with the same error rather than
        each waiting out its own timeouts and retries. ``on_result`` is called with each result
        as soon as it is known (a CLI prints as it goes).
        """
        out: list[Reading | ReadFailure] = []
        gone: ReadFailure | None = None
        edition = self.profile.edition
        for di in dis:
            result: Reading | ReadFailure
            if gone is not None:
                code = f"{di:0{8 if edition is Edition.V2007 else 4}X}"
                cause = "the line is down" if isinstance(gone.error, LinkDown) else "no valid answer"
                why = GatewayError(f"DI {code} not read: {cause} at DI {gone.code}")
                result = ReadFailure(self.address, di, edition, why)
            else:
                try:
                    result = await self.read(di)
                except (MeterRefused, ReplyMismatch) as exc:
                    result = ReadFailure(self.address, di, edition, exc)
                except (NoReply, WrongMeter, LinkDown) as exc:
                    result = gone = ReadFailure(self.address, di, edition, exc)
            out.append(result)
            if on_result is not None:
                on_result(result)
        return out

    # --- writing ----------------------------------------------------------------------------------------

    def _encode(self, di: int, value: Any) -> bytes:
        table = DI_2007 if self.profile.edition is Edition.V2007 else DI_1997
        try:
            return table.lookup(di).encode(value)
        except UnknownDIError:
            raise
        except Dlt645Error as exc:
            raise GatewayError(f"cannot encode {value!r} for DI {di:08X}: {exc}") from None

    def _written(self, di: int, security: str, exchange: Exchange) -> WriteResult:
        return WriteResult(self.address, di, security, tuple(exchange.frames), exchange.attempts)

    async def write(
        self,
        di: int,
        value: Any,
        *,
        level: int = 0x04,
        password: str = "000000",
        operator: str | None = None,
        not_after: datetime | None = None,
    ) -> WriteResult:
        """Plaintext write (0x14; needs the programming key on real meters, §2.3)."""
        data = self._encode(di, value)
        if self.profile.edition is Edition.V1997:
            request: Any = Write1997Request(di, Password(level, password), data)
        else:
            request = WriteRequest(di, Password(level, password), operator or self.operator, data)
        return self._written(di, "plain", await self._tx(request, **_bound(not_after)))

    async def write_mac(
        self, di: int, value: Any, *, operator: str | None = None, not_after: datetime | None = None
    ) -> WriteResult:
        """Class-1 parameter write: plaintext + MAC at the profile's MAC level (99, §5.5)."""
        await self.session(not_after=not_after)
        data = self._encode(di, value)

        def build() -> WriteRequest:
            assert self._session is not None
            mac = self._session.param_mac(di, data)
            return WriteRequest(di, Password(self.profile.mac_level), operator or self.operator, data + mac)

        return self._written(di, "mac", await self._secure(build, not_after))

    async def write_encrypted(
        self, di: int, value: Any, *, operator: str | None = None, not_after: datetime | None = None
    ) -> WriteResult:
        """Class-2 parameter write: ciphertext + MAC at the profile's cipher level (98, §5.5)."""
        await self.session(not_after=not_after)
        data = self._encode(di, value)

        def build() -> WriteRequest:
            assert self._session is not None
            return WriteRequest(
                di,
                Password(self.profile.cipher_level),
                operator or self.operator,
                self._session.encrypt_param(di, data),
            )

        return self._written(di, "cipher", await self._secure(build, not_after))

    # --- address and time --------------------------------------------------------------------------------

    async def read_address(self) -> str:
        """Read the address of the only meter on the line, through the all-AA wildcard (§1.5).

        2007: read-address (0x13). 1997 has no 0x13 (dlt645.md §7.1): a wildcard read of C032
        (meter number) instead; the meter replies with its real address (§1.5), or, on meters
        with the 1997 wildcard-echo quirk (§10), with AA..AA, and then the meter number it
        sends is taken as its address.
        """
        if self.profile.edition is Edition.V1997:
            exchange = await self._tx(Read1997Request(PROBE_DI[Edition.V1997]), address=WILDCARD)
            reply, payload = exchange.reply, exchange.payload
            if not isinstance(payload, Read1997Reply) or reply is None:
                raise ReplyMismatch("unexpected reply to a wildcard read of C032")
            if reply.address != WILDCARD:
                return reply.address
            try:
                return normalize_address(str(DI_1997.lookup(payload.di).decode(payload.value)))
            except Dlt645Error as exc:
                raise ReplyMismatch(
                    f"the meter echoed the wildcard and its meter number is no address: {exc}"
                ) from None
        exchange = await self._tx(ReadAddressRequest(), address=WILDCARD)
        payload = exchange.payload
        if not isinstance(payload, ReadAddressReply):
            raise ReplyMismatch("unexpected reply to read-address")
        return payload.address

    @classmethod
    async def discover(
        cls,
        link: Link,
        addresses: list[str] | None = None,
        profile: MeterProfile = SGCC_2013,
        *,
        operator: str = "00000000",
    ) -> list[str]:
        """The meters on a line.

        Without ``addresses``: the wildcard read-address (:meth:`read_address`), which works only
        when one meter is alone on the line (replies collide otherwise: the error is raised).
        With them: each is probed with a read of :data:`PROBE_DI` for the profile's edition; a
        meter that answers, even with a refusal, is there; no reply (or another meter's) means
        absent; a line that is down raises :class:`~gateway.errors.LinkDown`.
        """
        if not addresses:
            return [await cls(link, WILDCARD, profile, operator=operator).read_address()]
        found: list[str] = []
        for address in addresses:
            client = cls(link, address, profile, operator=operator)
            try:
                await client.read(PROBE_DI[profile.edition])
            except _ABSENT:
                continue
            except MeterRefused:
                pass  # it answered: it is there
            found.append(client.address)
        return found

    async def broadcast_time(
        self, when: datetime | None = None, *, not_after: datetime | None = None
    ) -> BroadcastResult:
        """Broadcast the time (0x08 to 99..99); meters apply it only within 5 minutes (§4.1)."""
        when = (when or self.clock()).astimezone(METER_TZ).replace(microsecond=0)
        try:
            exchange = await self.link.transact(
                BROADCAST,
                BroadcastTime(when),
                priority=self.priority,
                preamble=self.profile.request_preamble,
                retries=0,
                baud=self.profile.baud,
                deadline=self.deadline(not_after),
            )
        except GatewayError as exc:
            _tap(getattr(exc, "frames", ()))
            raise
        _tap(exchange.frames)
        return BroadcastResult(when, tuple(exchange.frames))

    # --- relay --------------------------------------------------------------------------------------------

    async def relay(
        self,
        command: RelayCommand,
        valid_until: datetime | None = None,
        *,
        n2: int = 0,
        encrypted: bool = True,
        level: int = 0x02,
        password: str = "000000",
        operator: str | None = None,
    ) -> RelayResult:
        """0x1C relay control; encrypted (level 98 through the ESAM) unless ``encrypted=False``.

        ``valid_until`` defaults to 10 minutes from now (:attr:`clock`): a command can never execute
        late. Nothing of it is sent after ``valid_until``, first or again (after a reconnect, or
        as a retry): :class:`~gateway.link.Expired` (the meter would refuse it anyway).
        """
        until = (valid_until or self.clock() + timedelta(minutes=10)).astimezone(METER_TZ)
        until = until.replace(microsecond=0)
        op = operator or self.operator
        if encrypted:
            await self.session(not_after=until)

            def build() -> EncryptedRelayControlRequest:
                assert self._session is not None
                block = self._session.control_block(int(command), n2, until)
                return EncryptedRelayControlRequest(Password(self.profile.cipher_level), op, block)

            exchange = await self._secure(build, until)
        else:
            request = RelayControlRequest(Password(level, password), op, int(command), until, n2)
            exchange = await self._tx(request, **_bound(until))
        payload = exchange.payload
        if not isinstance(payload, RelayControlReply):
            raise ReplyMismatch("unexpected reply to a relay command")
        return RelayResult(self.address, command, payload.execution, tuple(exchange.frames))

    # --- security (0x03) -------------------------------------------------------------------------------------

    async def session(self, *, renew: bool = False, not_after: datetime | None = None) -> Session:
        """A valid identity-authentication session, opened (or renewed) on demand."""
        if not renew and self._session is not None and time.monotonic() < self._session_until:
            return self._session
        if not _is_meter_number(self.meter_number):  # no ESAM keys for it: say so, send nothing
            raise NotAMeterNumber(self.address, self.meter_number)
        request, pending = self.master.start_auth(self.meter_number)
        auth = SecurityRequest(SecurityDI.IDENTITY_AUTHENTICATION, self.operator, request)
        exchange = await self._tx(auth, **_bound(not_after))
        payload = exchange.payload
        if not isinstance(payload, SecurityReply):
            raise ReplyMismatch("unexpected reply to identity authentication")
        self._session = self.master.finish_auth(pending, payload.body)  # type: ignore[arg-type]
        # Renew a little before the meter's 5 minutes run out.
        self._session_until = time.monotonic() + SESSION_MINUTES * 60 - 30
        return self._session

    async def _secure(self, build: Callable[[], Any], not_after: datetime | None = None) -> Exchange:
        """Send a session-bound command (``build`` makes it with the current session); on an
        authentication refusal renew once and resend."""
        try:
            return await self._tx(build(), **_bound(not_after))
        except MeterRefused as refused:
            flags = refused.flags
            if flags is None or not (int(flags) & (SecurityFlags.AUTHENTICATION | 0x04)):
                raise
            if int(flags) & SecurityFlags.SUSPENDED:
                raise
            await self.session(renew=True, not_after=not_after)
            return await self._tx(build(), **_bound(not_after))

    async def meter_time(self) -> datetime:
        """The meter's clock: date (04000101) and time (04000102), in the meter's zone (dlt645.md §3)."""
        date = (await self.read(0x04000101)).value
        clock = (await self.read(0x04000102)).value
        return datetime.combine(date, clock, tzinfo=METER_TZ)

    async def clock_past(self, until: datetime) -> datetime | None:
        """The meter's clock if it reads ``until`` or later, else None (also when it cannot be
        read): why a control frame valid until then was refused, since the meter refuses one
        whose validity end lies in its past and the 1-byte reply form says "password" (dlt645.md §4.1)."""
        try:
            meter_now = await self.meter_time()
        except (GatewayError, Dlt645Error, TypeError, ValueError):
            return None
        return meter_now if meter_now >= until else None

    async def purchase_count(self, *, not_after: datetime | None = None) -> int:
        """The purchase count the meter's ESAM holds (what a recharge or opening is checked against).

        From the ESAM status query (078102FF, dlt645.md §5.2; its MACs verified with the session), or,
        from a meter that refuses that query, the last purchase record (03330201, §3.7).
        """
        await self.session(not_after=not_after)

        def build() -> SecurityRequest:
            return SecurityRequest(SecurityDI.STATUS_QUERY, self.operator)

        for renewed in (False, True):
            try:
                exchange = await self._secure(build, not_after)
            except MeterRefused:
                return int((await self.read(PURCHASE_COUNT_DI, not_after=not_after)).value)
            payload = exchange.payload
            body = getattr(payload, "body", None)
            if not isinstance(payload, SecurityReply) or not isinstance(body, StatusQueryReply):
                raise ReplyMismatch("unexpected reply to a status query")
            assert self._session is not None
            try:
                self._session.check_status(body)
            except EsamCryptoError as exc:
                # The ESAM holds one authentication state (dlt645.md §5.1, "RemoteValid"): another
                # master (a second gateway, a handheld) that authenticated since ours replaced it,
                # and the meter MACs with the new key. Authenticate again and ask once more; a
                # second mismatch is a real fault, and the session is dropped so the next attempt
                # starts afresh.
                if renewed:
                    self._session = None
                    raise ReplyMismatch(
                        f"meter {self.address}: status query reply fails its MAC check: {exc}"
                    ) from None
                await self.session(renew=True, not_after=not_after)
                continue
            return body.purchase_count
        raise AssertionError("unreachable")

    async def top_up(
        self,
        amount_fen: int,
        purchase_count: int,
        customer: str,
        *,
        opening: bool = False,
        operator: str | None = None,
        not_after: datetime | None = None,
    ) -> TopUpResult:
        """Recharge (070102FF) or account opening (070101FF) a local cost-control meter.

        A "repeat recharge" refusal means the meter already applied this purchase count: the
        top-up is reported as ``duplicate``, which is success for an idempotent retry (§10.1).

        An opening first asks the meter's stored purchase count (:meth:`purchase_count`): when it
        equals ``purchase_count`` the meter will only mark the account open, add nothing
        (dlt645.md §5.3 rule 4), and the outcome is ``opened_only``. (Asked before sending: the
        reply to the opening is the same either way, and a retry of an opening that was applied
        finds the counts equal.)

        A recharge whose line is lost while it is on its way is sent again once the line is back
        (like any request, :mod:`gateway.link`), and so is one whose reply does not come (the
        line's retries): the purchase count makes that safe for the money, the meter answers a
        repeat "repeat recharge" (dlt645.md §5.3) and it ends ``duplicate``. Never after
        ``not_after`` (the command's validity end): then :class:`~gateway.link.Expired`, whose
        ``sent`` says whether an earlier attempt went out (the purchase count then settles it).
        """
        di = SecurityDI.ACCOUNT_OPENING if opening else SecurityDI.RECHARGE
        op = operator or self.operator
        await self.session(not_after=not_after)
        opens_only = opening and await self.purchase_count(not_after=not_after) == purchase_count

        def build() -> SecurityRequest:
            assert self._session is not None
            return SecurityRequest(di, op, self._session.recharge(amount_fen, purchase_count, customer, opening))

        try:
            exchange = await self._secure(build, not_after)
        except MeterRefused as refused:
            if refused.flags is not None and int(refused.flags) & SecurityFlags.REPEAT_RECHARGE:
                return TopUpResult(self.address, amount_fen, purchase_count, "duplicate", ())
            raise
        outcome = "opened_only" if opens_only else "applied"
        return TopUpResult(self.address, amount_fen, purchase_count, outcome, tuple(exchange.frames))
