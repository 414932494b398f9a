"""The DL/T 645 slave dispatcher: a request frame and the time in, the meter's reply out.

It follows the meter firmware (FW-A, FW-B in dlt645.md): silence on foreign addresses and on
broadcasts, only reads on wildcards, ERR bits as the firmware gives them, password levels
(02/04 plaintext only with the programming key, i.e. in factory mode; the profile's MAC and
cipher levels through the simulated ESAM, each parameter only at the level of its security
class in the DI table, §5.5), and the 0x03 security commands (§5).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from protocols.dlt645 import (
    BROADCAST,
    DI_1997,
    DI_2007,
    WILDCARD,
    BroadcastTime,
    ChangeBaudReply,
    ChangeBaudRequest,
    DataItem,
    DemandResetReply,
    DemandResetRequest,
    Dlt645Error,
    Edition,
    EncryptedRelayControlRequest,
    ErrorFlags,
    ErrorReply,
    EventClearReply,
    EventClearRequest,
    Frame,
    FreezeReply,
    FreezeRequest,
    MeterClearReply,
    MeterClearRequest,
    MultiFunctionOutputReply,
    MultiFunctionOutputRequest,
    Password,
    PayloadError,
    ReadAddressReply,
    ReadAddressRequest,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    RelayControlReply,
    RelayControlRequest,
    RelayErrorReply,
    SecurityErrorReply,
    SecurityFlags,
    WriteAddressReply,
    WriteAddressRequest,
    WriteReply,
    WriteRequest,
    address_matches,
    build_frame,
    is_wildcard,
    parse_payload,
)
from protocols.dlt645.edition1997 import Read1997Reply, Read1997Request
from protocols.dlt645.followup import split_reply
from protocols.dlt645.payloads import RelayErrorFlags, decode_clock
from protocols.dlt645.security import (
    EMPTY,
    IdentityAuthRequest,
    RechargeRequest,
    SecurityDI,
    SecurityReply,
    SecurityRequest,
    TerminateAuthReply,
    ValidityPeriodRequest,
    WalletInitRequest,
)

from .esam import EsamRefusal
from .meter import CostMode, EventClass, Meter, to_ms
from .readout import LIMIT_DIS, NotServed, read_value
from .relay import RelayRefused
from .tariff import TariffNumberError
from .wallet import Limits, TopUpRefused

MAX_REPLY_DATA = 200
"""Longest DATA field the meter sends before splitting into follow-up frames (§1.2)."""

PLAINTEXT_RELAY = frozenset({0x1B, 0x1C})
"""Plaintext 0x1C may only close (FW-A, ANON-FW; dlt645.md §4.1) unless the profile says otherwise."""

_WILDCARD_OK = frozenset({0x11, 0x12, 0x13, 0x15, 0x01, 0x02})

FUNCTIONS_2007 = frozenset({0x03, 0x08, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x19, 0x1A, 0x1B, 0x1C, 0x1D})
"""The 2007 function codes this meter executes: FW-B's set, 0x03, 0x08, 0x11-0x1D, less 0x18,
which neither cost-control firmware implements (dlt645.md §2.1). Any other code is unknown."""

_RELAY_ERROR_WORD = {
    "power_hold": RelayErrorFlags.TRIP_REFUSED_POWER_HOLD,
    "auto_restore_power_hold": RelayErrorFlags.AUTO_RESTORE_REFUSED_POWER_HOLD,
    "auto_restore_time": RelayErrorFlags.AUTO_RESTORE_TIME_INVALID,
    "already_tripped": RelayErrorFlags.AUTO_RESTORE_ALREADY_TRIPPED,
    "unknown_command": RelayErrorFlags.PASSWORD,
}


class _Err(Exception):
    def __init__(self, flags: ErrorFlags, word: RelayErrorFlags | None = None) -> None:
        super().__init__(flags.name)
        self.flags = flags
        self.word = word


def handle(meter: Meter, frame: Frame, now: datetime) -> Frame | None:
    """The meter's reply to ``frame`` at ``now`` (None: the meter stays silent)."""
    c = frame.control
    if c.response:
        return None  # bus echo: a meter never answers a reply (FW-B)
    target = frame.address
    meter.advance(now)
    if target == BROADCAST:
        _broadcast(meter, frame, now)
        return None
    if not address_matches(target, meter.address):
        return None
    if frame.edition is not meter.profile.edition:
        return None  # a 1997 meter does not understand 2007 codes, and the reverse
    wildcard = is_wildcard(target)
    if wildcard and c.function not in _WILDCARD_OK:
        if not (c.function == 0x03 and len(frame.data) >= 4 and frame.data[2] & 0x80):
            return None  # writes and controls to AA..AA are refused silently (FW-B, §1.5)
    if c.function in (0x13, 0x15) and target != WILDCARD:
        return None  # read/write address require all-AA (FW-B)
    reply_address = target if (wildcard and meter.profile.wildcard_reply_echo) else meter.address
    if frame.edition is Edition.V2007 and c.function not in FUNCTIONS_2007:
        # FW-B answers an unknown command code with ERR 0x02 (dlt645.md §2.2), the only firmware
        # choice the reference records. (A 1997 meter keeps bit 0: §7.2 says nothing about it.)
        return _error(reply_address, frame, ErrorFlags.NO_DATA)
    try:
        payload = parse_payload(frame)
    except PayloadError:
        return _error(reply_address, frame, ErrorFlags.OTHER)  # a known command it cannot execute
    try:
        # The ESAM runs on the meter's own clock (session expiry, lock-out until local midnight).
        reply = _dispatch(meter, frame, payload, meter.local_time())
    except _Err as err:
        if err.word is not None and meter.profile.relay_reply_word:
            return build_frame(reply_address, RelayErrorReply(err.word))
        return _error(reply_address, frame, err.flags)
    if reply is None:
        return None
    if isinstance(reply, tuple):
        payload_out, follow_up = reply
        return build_frame(reply_address, payload_out, follow_up=follow_up)
    return build_frame(reply_address, reply)


def _error(address: str, frame: Frame, flags: ErrorFlags) -> Frame:
    return build_frame(address, ErrorReply(int(flags), frame.function, frame.edition))


def _broadcast(meter: Meter, frame: Frame, now: datetime) -> None:
    try:
        payload = parse_payload(frame)
    except Dlt645Error:
        return
    if isinstance(payload, BroadcastTime):
        meter.broadcast_sync(to_ms(payload.time))
    elif isinstance(payload, FreezeRequest):
        _freeze(meter, payload)


def _freeze(meter: Meter, payload: FreezeRequest) -> None:
    if (payload.minute, payload.hour, payload.day, payload.month) == (99, 99, 99, 99):
        meter.instant.insert(0, meter.snapshot())
        del meter.instant[3:]


def _dispatch(meter: Meter, frame: Frame, payload: Any, now: datetime) -> Any:
    if isinstance(payload, ReadRequest):
        return _read(meter, payload.di, Edition.V2007)
    if isinstance(payload, Read1997Request):
        return _read(meter, payload.di, Edition.V1997)
    if isinstance(payload, ReadFollowUpRequest):
        parts = meter.pending_reads.get(payload.di)
        if not parts or not 1 <= payload.seq < len(parts):
            raise _Err(ErrorFlags.NO_DATA)
        part = parts[payload.seq]
        return part.payload, part.follow_up
    if isinstance(payload, ReadAddressRequest):
        return ReadAddressReply(meter.address)
    if isinstance(payload, WriteRequest):
        _write(meter, payload, now)
        return WriteReply()
    if isinstance(payload, WriteAddressRequest):
        if not meter.config.factory_mode:
            return None  # FW-B also needs the programming key; silent otherwise
        meter.address = payload.address
        return WriteAddressReply()
    if isinstance(payload, FreezeRequest):
        _freeze(meter, payload)
        return FreezeReply()
    if isinstance(payload, ChangeBaudRequest):
        return ChangeBaudReply(payload.baud)
    if isinstance(payload, (DemandResetRequest, MeterClearRequest, EventClearRequest)):
        # dlt645.md §2.3: level 02 for meter clear and event clear, level 04 for demand reset
        # (PY-645 enforces <= 02 / <= 04; ANON-FW takes a plaintext meter clear only at 02).
        highest = 0x04 if isinstance(payload, DemandResetRequest) else 0x02
        if payload.password.level > highest:
            raise _Err(ErrorFlags.PASSWORD)
        _check_plaintext(meter, payload.password, now)
        if isinstance(payload, MeterClearRequest):
            meter.record_event(EventClass.METER_CLEAR, payload.operator)  # with the energy before (§3.7)
            meter.forward[:] = [0] * 5
            meter.reverse[:] = [0] * 5
            meter.record_program(payload.operator, 0)
            return MeterClearReply()
        if isinstance(payload, EventClearRequest):
            meter.trips.clear()
            meter.closes.clear()
            meter.record_event(EventClass.EVENT_CLEAR, payload.operator, di=payload.di)
            return EventClearReply()
        meter.record_event(EventClass.DEMAND_CLEAR, payload.operator)
        return DemandResetReply()
    if isinstance(payload, (RelayControlRequest, EncryptedRelayControlRequest)):
        return _relay(meter, payload, now)
    if isinstance(payload, MultiFunctionOutputRequest):
        return MultiFunctionOutputReply(payload.selector)
    if isinstance(payload, SecurityRequest):
        return _security(meter, frame, payload, now)
    raise _Err(ErrorFlags.OTHER)  # a command this meter cannot execute (FW-B: ERR 0x01)


# --- 0x11 read ------------------------------------------------------------------------------------


def _read(meter: Meter, di: int, edition: Edition) -> Any:
    table = DI_2007 if edition is Edition.V2007 else DI_1997
    item = table.get(di)
    if item is None or "r" not in item.access:
        raise _Err(ErrorFlags.NO_DATA)
    try:
        value = read_value(meter, di) if edition is Edition.V2007 else _read_1997(meter, di)
        raw = item.encode(value)
    except NotServed:
        raise _Err(ErrorFlags.NO_DATA) from None
    except Dlt645Error:
        raise _Err(ErrorFlags.OTHER) from None
    if edition is Edition.V1997:
        return Read1997Reply(di, raw)
    if len(raw) + 4 <= MAX_REPLY_DATA:
        return ReadReply(di, raw)
    parts = split_reply(di, raw, MAX_REPLY_DATA)
    meter.pending_reads = {di: parts}
    return parts[0].payload, parts[0].follow_up


_MAP_1997 = {
    0x9010: 0x00010000,
    0x9011: 0x00010100,
    0x9012: 0x00010200,
    0x9013: 0x00010300,
    0x9014: 0x00010400,
    0x901F: 0x0001FF00,
    0x9020: 0x00020000,
    0x902F: 0x0002FF00,
    0xB611: 0x02010100,
    0xC032: 0x04000402,
    0xC033: 0x0400040E,
}


def _read_1997(meter: Meter, di: int) -> Any:
    mapped = _MAP_1997.get(di)
    if mapped is None:
        raise NotServed
    value = read_value(meter, mapped)
    if di == 0xB611:
        return int(value)  # 1997 voltage has no decimals (dlt645.md §7.3)
    return value


# --- passwords ---------------------------------------------------------------------------------------

LOCK_MS = 24 * 3_600_000


def _check_plaintext(meter: Meter, password: Password, now: datetime) -> None:
    """Plaintext levels need the programming key (factory mode) and the right password (§2.3)."""
    if password.level in (meter.profile.mac_level, meter.profile.cipher_level):
        raise _Err(ErrorFlags.PASSWORD)
    _verify_password(meter, password)
    if not meter.config.factory_mode:
        raise _Err(ErrorFlags.PASSWORD)


def _verify_password(meter: Meter, password: Password) -> None:
    """The right password for its level, unless the level is locked (counts wrong ones)."""
    level = password.level
    count, locked_until = meter.password_errors.get(level, (0, 0))
    if locked_until > meter.now_ms:
        raise _Err(ErrorFlags.PASSWORD)
    expected = meter.config.passwords.get(level)
    if expected is None or password.code != expected:
        count += 1
        # Three wrong passwords lock that level for 24 h (P-YNSJ, FW-C; dlt645.md §2.3).
        meter.password_errors[level] = (0, meter.now_ms + LOCK_MS) if count >= 3 else (count, 0)
        raise _Err(ErrorFlags.PASSWORD)
    meter.password_errors.pop(level, None)


# --- 0x14 write -------------------------------------------------------------------------------------


def _write(meter: Meter, req: WriteRequest, now: datetime) -> None:
    item = DI_2007.get(req.di)
    if item is None or "w" not in item.access:
        raise _Err(ErrorFlags.NO_DATA)
    limit = LIMIT_DIS.get(req.di)
    if limit is not None and limit[0] is not meter.wallet.unit:
        # An energy wallet has 04000F0x (kWh) limits, a money wallet 040010xx (yuan), dlt645.md §3.4:
        # the other family is not this meter's data.
        raise _Err(ErrorFlags.NO_DATA)
    level = req.password.level
    if level in (meter.profile.mac_level, meter.profile.cipher_level) and level != _esam_level(meter, item):
        # Parameter security classes (dlt645.md §5.5, prepaid.md §2.3): class 1 only with the MAC
        # level, class 2 only with the cipher level, neither for a DI without a class (passwords).
        # The meter refuses by its parameter table before the ESAM sees the data, so the session
        # survives and no MAC failure is counted. The reference gives no ERR for this case; bit 2
        # "password error / not authorised" is the one §2.2 gives for permission problems.
        raise _Err(ErrorFlags.PASSWORD)
    try:
        if level == meter.profile.mac_level:
            value_bytes, mac = req.mac_split()
            meter.esam.verify_param(req.di, value_bytes, mac, now)
        elif level == meter.profile.cipher_level:
            value_bytes = meter.esam.decrypt_param(req.di, req.data, now)
        else:
            _check_plaintext(meter, req.password, now)
            value_bytes = req.data
    except EsamRefusal as refusal:
        # MAC failure answers 0xD4 with ERR bit 2; a DI mismatch inside the cipher, bit 1 (§5.5).
        raise _Err(refusal.error_flags) from None
    except PayloadError:
        raise _Err(ErrorFlags.OTHER) from None
    try:
        value = item.decode(value_bytes)
        _apply_write(meter, req.di, value, req.operator)
    except TariffNumberError:
        # A day table naming a tariff the meter lacks: "number of tariffs exceeded" (§2.2 bit 6).
        raise _Err(ErrorFlags.TOO_MANY_TARIFFS) from None
    except (Dlt645Error, ValueError, KeyError):
        raise _Err(ErrorFlags.OTHER) from None
    if limit is None:  # Meter.set_limits records its own programming event
        meter.record_program(req.operator, req.di)


def _esam_level(meter: Meter, item: DataItem) -> int | None:
    """The one ESAM password level that may write ``item``, by its class in the DI table."""
    if item.param_class == 1:
        return meter.profile.mac_level
    if item.param_class == 2:
        return meter.profile.cipher_level
    return None


def _apply_write(meter: Meter, di: int, value: Any, operator: str) -> None:
    limit = LIMIT_DIS.get(di)
    if limit is not None:
        fen = int(value.scaleb(2))  # fen, or 0.01 kWh for an energy wallet
        lim = meter.wallet.limits
        new = Limits(lim.alarm_1, lim.alarm_2, lim.overdraft, lim.hoarding, lim.close_allowed)
        setattr(new, limit[1], fen)
        meter.set_limits(new, operator, di)
        return
    if di == 0x04000101:
        local = meter.local_time()
        new_local = local.replace(year=value.year, month=value.month, day=value.day)
        meter.set_clock(to_ms(new_local), operator)
        return
    if di == 0x04000102:
        local = meter.local_time()
        new_local = local.replace(hour=value.hour, minute=value.minute, second=value.second, microsecond=0)
        meter.set_clock(to_ms(new_local), operator)
        return
    if di == 0x0400040E:
        meter.wallet.customer = value
        return
    if di == 0x04001401:
        meter.trip_delay_min = int(value)
        return
    if di == 0x04001402:
        meter.large_current_ma = int(value.scaleb(3))
        return
    if di == 0x04001403:
        meter.large_current_delay_min = int(value)
        return
    if 0x04000C01 <= di <= 0x04000C0A:
        raise KeyError(di)  # passwords are changed with 0x18 in factory mode only
    # prices, ladders, the backup time-zone table and day tables (04020000..08), switch times;
    # raises KeyError if unknown
    meter.tariff.write_di(di, value)


# --- 0x1C relay ---------------------------------------------------------------------------------------


def _relay(meter: Meter, req: RelayControlRequest | EncryptedRelayControlRequest, now: datetime) -> Any:
    profile = meter.profile
    if isinstance(req, EncryptedRelayControlRequest):
        if req.password.level != profile.cipher_level:
            raise _Err(ErrorFlags.PASSWORD, RelayErrorFlags.PASSWORD)
        try:
            plain = meter.esam.decrypt_control(req.block, now)
        except EsamRefusal as refusal:
            raise _Err(refusal.error_flags, refusal.relay_flags) from None
        n1, n2 = plain[0], plain[1]
        valid_until = decode_clock(plain[2:8])
    else:
        try:
            _check_password_only(meter, req.password)
        except _Err:
            raise _Err(ErrorFlags.PASSWORD, RelayErrorFlags.PASSWORD) from None
        if req.command not in PLAINTEXT_RELAY and not profile.plaintext_trip:
            raise _Err(ErrorFlags.PASSWORD, RelayErrorFlags.PASSWORD)
        n1, n2, valid_until = req.command, req.n2, req.valid_until
    # The meter refuses a command whose validity end has passed, by its own clock (FW-A).
    if valid_until is None or meter.local_time() > valid_until:
        raise _Err(ErrorFlags.PASSWORD, RelayErrorFlags.VALIDITY_TIME)
    large = meter.large_current()  # an internal relay above 04001402 (prepaid.md §1.5)
    try:
        execution = meter.relay.command(
            n1,
            n2,
            meter.now_ms,
            meter.ladder(),
            meter.trip_delay_min,
            large,
            meter.large_current_delay_min,
            operator=req.operator,
        )
    except RelayRefused as refused:
        raise _Err(ErrorFlags.PASSWORD, _RELAY_ERROR_WORD.get(refused.reason, RelayErrorFlags.PASSWORD)) from None
    meter._drain_relay_events(req.operator)
    return RelayControlReply(execution if profile.relay_reply_word else None)


def _check_password_only(meter: Meter, password: Password) -> None:
    """Plaintext 0x1C: level <= 04 and the right password (FW-A), no programming key needed."""
    if password.level > 0x04:
        raise _Err(ErrorFlags.PASSWORD)
    _verify_password(meter, password)  # the same 3-strike lock-out as the other plaintext commands


# --- 0x03 security ----------------------------------------------------------------------------------


def _security(meter: Meter, frame: Frame, req: SecurityRequest, now: datetime) -> Any:
    di = req.di
    try:
        if di == SecurityDI.IDENTITY_AUTHENTICATION:
            assert isinstance(req.body, IdentityAuthRequest)
            return SecurityReply(di, meter.esam.authenticate(req.body, now))
        if di == SecurityDI.VALIDITY_PERIOD:
            assert isinstance(req.body, ValidityPeriodRequest)
            meter.esam.set_validity(req.body, now)
            return SecurityReply(di, EMPTY)
        if di == SecurityDI.TERMINATE_AUTHENTICATION:
            meter.esam.terminate(now)
            w = meter.wallet
            if meter.mode is not CostMode.LOCAL:
                # The reply's layout is fixed (dlt645.md §5.2); a remote cost-control meter keeps no
                # wallet (prepaid.md §1.1), so its money and count are 0 [A: no firmware source].
                return SecurityReply(di, TerminateAuthReply(w.customer, 0, 0, meter.esam.key_info))
            return SecurityReply(di, TerminateAuthReply(w.customer, w.remaining_fen, w.count, meter.esam.key_info))
        if di in (SecurityDI.RECHARGE, SecurityDI.ACCOUNT_OPENING):
            assert isinstance(req.body, RechargeRequest)
            if meter.mode is not CostMode.LOCAL:
                raise _SecErr(SecurityFlags.OTHER)  # remote cost control keeps no wallet (§5.6)
            meter.esam.verify_recharge(di, req.body, now)
            body = req.body
            meter.apply_top_up(body.amount, body.purchase_count, body.customer_number, di == SecurityDI.ACCOUNT_OPENING)
            meter.record_program(req.operator, di)
            return SecurityReply(di, EMPTY)
        if di == SecurityDI.WALLET_INITIALISATION:
            assert isinstance(req.body, WalletInitRequest)
            if meter.mode is not CostMode.LOCAL:
                raise _SecErr(SecurityFlags.OTHER)
            meter.esam.verify_wallet_init(req.body, now)
            if req.body.purchase_count != 0:
                raise _SecErr(SecurityFlags.PURCHASE_COUNT)
            meter.initialise_wallet(req.body.amount, req.operator)
            meter.record_program(req.operator, di)
            return SecurityReply(di, EMPTY)
        if di == SecurityDI.STATUS_QUERY:
            if meter.mode is not CostMode.LOCAL:
                raise _SecErr(SecurityFlags.OTHER)
            w = meter.wallet
            return SecurityReply(di, meter.esam.status_reply(w.remaining_fen, w.count, w.customer, now))
    except EsamRefusal as refusal:
        return SecurityErrorReply(refusal.flags)
    except TopUpRefused as refused:
        return SecurityErrorReply(refused.flags)
    except _SecErr as err:
        return SecurityErrorReply(err.flags)
    return SecurityErrorReply(SecurityFlags.OTHER)


class _SecErr(Exception):
    def __init__(self, flags: SecurityFlags) -> None:
        super().__init__(flags.name)
        self.flags = flags
