"""Typed payloads of every function code: what the DATA field of a frame means.

Each payload class knows its function code and direction, turns itself into plain data
bytes (``to_bytes``) and parses them (``from_bytes``). :func:`parse_payload` picks the class
for a decoded :class:`~.frame.Frame`; :func:`build_frame` and :func:`build_reply` go the
other way. Layouts follow dlt645.md §2.1 (2007), §4 (0x1C), §5 (0x03) and §7.1 (1997).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from enum import IntEnum, IntFlag
from typing import Any, ClassVar, TypeVar

from .address import address_from_wire, address_to_wire, normalize_address
from .control import Control, Edition
from .errors import AddressError, Dlt645Error, PayloadError, ValueFormatError
from .formats import BAUD_RATES, DateTime
from .frame import Frame, encode_frame

P = TypeVar("P", bound="Payload")


class Payload:
    """Base of all payloads."""

    FUNCTION: ClassVar[int]
    RESPONSE: ClassVar[bool] = False
    ABNORMAL: ClassVar[bool] = False
    EDITION: ClassVar[Edition] = Edition.V2007

    def to_bytes(self) -> bytes:
        """The plain (de-scrambled) DATA field."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls: type[P], data: bytes) -> P:
        """Parse a plain DATA field; raises :class:`PayloadError` if it does not fit."""
        raise NotImplementedError


_REGISTRY: dict[tuple[Edition, int, bool, bool], type[Payload]] = {}


def register(cls: type[P]) -> type[P]:
    """Class decorator: make ``cls`` the payload of its (edition, function, direction, abnormal)."""
    _REGISTRY[(cls.EDITION, cls.FUNCTION, cls.RESPONSE, cls.ABNORMAL)] = cls
    return cls


# --- helpers -----------------------------------------------------------------------------


def di_bytes(di: int, edition: Edition = Edition.V2007) -> bytes:
    """DI in wire order (DI0 first)."""
    size = 4 if edition is Edition.V2007 else 2
    if not 0 <= di < 1 << (8 * size):
        raise PayloadError(f"DI {di:#x} does not fit {size} bytes")
    return di.to_bytes(size, "little")


def _need(data: bytes, size: int, what: str, exact: bool = True) -> None:
    if (len(data) != size) if exact else (len(data) < size):
        raise PayloadError(f"{what} needs {'' if exact else 'at least '}{size} data bytes, got {len(data)}")


_CLOCK = DateTime("YYMMDDhhmmss")


def encode_clock(value: datetime | None) -> bytes:
    """``ss mm hh DD MM YY`` as sent by 0x08 and in the 0x1C validity field (§2.1, §4.1)."""
    return _CLOCK.encode(value)


def decode_clock(raw: bytes) -> datetime | None:
    """Inverse of :func:`encode_clock`; all zeros is ``None``."""
    try:
        return _CLOCK.decode(raw)
    except ValueFormatError as exc:
        raise PayloadError(str(exc)) from None


PSEUDO_LEVELS = frozenset({0x99, 0x98, 0x97, 0x96})
"""Password levels whose digits the meter ignores: SGCC 99 (plaintext + MAC) and 98 (ciphertext
+ MAC), 97/96 in FW-B's customised build (dlt645.md §2.3)."""


@dataclass(frozen=True, slots=True)
class Password:
    """``PA P0 P1 P2``: password level and 6-digit password (§2.3).

    ``code`` is P2 P1 P0 as hex digits (reading order): the 6 BCD digits of a real password.
    Bytes that are not BCD are kept as they are (``"00AB12"``), never replaced: at the levels
    of :data:`PSEUDO_LEVELS` the meter ignores P0..P2 (§2.3, FW-A/FW-B check no digits there),
    so such a frame is a valid command; at a plaintext level the meter compares the three
    bytes with its stored password (FW-B ``Cmp_Bcd_Inv``) and answers a mismatch as a wrong
    password (ERR bit 2), not as a malformed frame. Either way ``from_bytes(to_bytes())`` is
    the identity for any four bytes.
    """

    level: int = 0x02
    code: str = "000000"

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not 0 <= self.level <= 0xFF:
            raise PayloadError(f"password level {self.level!r} does not fit a byte")
        code = self.code
        if not isinstance(code, str) or len(code) != 6 or not code.isascii() or not _is_hex(code):
            raise PayloadError(f"password {code!r} is not 6 digits")
        object.__setattr__(self, "code", code.upper())

    @property
    def is_bcd(self) -> bool:
        """True when the password is 6 decimal digits, as every real password is."""
        return self.code.isdigit()

    def to_bytes(self) -> bytes:
        return bytes((self.level,)) + bytes.fromhex(self.code)[::-1]

    @classmethod
    def from_bytes(cls, raw: bytes) -> Password:
        _need(raw, 4, "a password")
        return cls(raw[0], raw[1:4][::-1].hex().upper())


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


def operator_bytes(operator: str) -> bytes:
    """Operator code C0..C3 from its 8 hex digits (written C3 first, like every value)."""
    if not isinstance(operator, str) or len(operator) != 8:
        raise PayloadError(f"operator code {operator!r} is not 8 hex digits")
    try:
        raw = bytes.fromhex(operator)
    except ValueError:
        raise PayloadError(f"operator code {operator!r} is not hex") from None
    return raw[::-1]


def operator_text(raw: bytes) -> str:
    """Inverse of :func:`operator_bytes`."""
    return raw[::-1].hex().upper()


class _DiPayload(Payload):
    """DATA = the DI (4 bytes in 2007, 2 in 1997), followed by the value bytes if ``HAS_VALUE``."""

    WHAT: ClassVar[str] = "a payload"
    HAS_VALUE: ClassVar[bool] = False

    def to_bytes(self) -> bytes:
        raw = di_bytes(self.di, self.EDITION)  # type: ignore[attr-defined]
        return raw + self.value if self.HAS_VALUE else raw  # type: ignore[attr-defined]

    @classmethod
    def from_bytes(cls: type[P], data: bytes) -> P:
        size = 4 if cls.EDITION is Edition.V2007 else 2
        _need(data, size, cls.WHAT, exact=not cls.HAS_VALUE)  # type: ignore[attr-defined]
        di = int.from_bytes(data[:size], "little")
        return cls(di, bytes(data[size:])) if cls.HAS_VALUE else cls(di)  # type: ignore[attr-defined,call-arg]


class _OneByte(Payload):
    """DATA = one byte, the payload's only field."""

    WHAT: ClassVar[str] = "a payload"

    def to_bytes(self) -> bytes:
        return bytes((getattr(self, fields(self)[0].name),))  # type: ignore[arg-type]

    @classmethod
    def from_bytes(cls: type[P], data: bytes) -> P:
        _need(data, 1, cls.WHAT)  # type: ignore[attr-defined]
        return cls(data[0])  # type: ignore[call-arg]


# --- abnormal replies ----------------------------------------------------------------------


class ErrorFlags(IntFlag):
    """ERR byte of a 2007 abnormal reply (dlt645.md §2.2)."""

    OTHER = 0x01
    NO_DATA = 0x02
    PASSWORD = 0x04
    BAUD_UNCHANGEABLE = 0x08
    TOO_MANY_TIME_ZONES = 0x10
    TOO_MANY_DAY_PERIODS = 0x20
    TOO_MANY_TARIFFS = 0x40
    RESERVED = 0x80


class ErrorFlags1997(IntFlag):
    """ERR byte of a 1997 abnormal reply (dlt645.md §7.2)."""

    ILLEGAL_DATA = 0x01
    DI_ERROR = 0x02
    PASSWORD = 0x04
    UNUSED = 0x08
    TOO_MANY_TIME_ZONES = 0x10
    TOO_MANY_DAY_PERIODS = 0x20
    TOO_MANY_TARIFFS = 0x40
    RESERVED = 0x80


class SecurityFlags(IntFlag):
    """SERR word of a 0x03 abnormal reply (dlt645.md §5.4)."""

    OTHER = 0x0001
    REPEAT_RECHARGE = 0x0002
    ESAM_VERIFICATION = 0x0004
    AUTHENTICATION = 0x0008
    CUSTOMER_MISMATCH = 0x0010
    PURCHASE_COUNT = 0x0020
    HOARDING_LIMIT = 0x0040
    ADDRESS_ABNORMAL = 0x0080
    SUSPENDED = 0x0100


class RelayErrorFlags(IntFlag):
    """2-byte error word of the newer 0xDC reply form (FW-A, dlt645.md §4.3)."""

    SUSPENDED = 0x0001
    MAC = 0x0002
    PASSWORD = 0x0004
    AUTHENTICATION_TIMEOUT = 0x0008
    VALIDITY_TIME = 0x0010
    TRIP_REFUSED_POWER_HOLD = 0x0020
    AUTO_RESTORE_REFUSED_POWER_HOLD = 0x0040
    AUTO_RESTORE_TIME_INVALID = 0x0080
    AUTO_RESTORE_ALREADY_TRIPPED = 0x0100


def flag_names(flags: IntFlag) -> list[str]:
    """Lower-case names of the bits set in ``flags``, lowest bit first.

    A set bit the flag type does not define is listed as ``reserved_bit_N`` (N from 0), so
    that no bit of an error word goes unreported.
    """
    names = {member.value: member.name.lower() for member in type(flags) if member.name}
    word = int(flags)
    return [names.get(1 << n, f"reserved_bit_{n}") for n in range(word.bit_length()) if word >> n & 1]


class MeterError(Dlt645Error):
    """The meter refused a command: an abnormal reply, as an exception."""

    def __init__(self, reply: Payload) -> None:
        self.reply = reply
        self.flags: IntFlag = reply.flags  # type: ignore[attr-defined]
        self.function: int = getattr(reply, "function", reply.FUNCTION)
        names = ", ".join(flag_names(self.flags)) or "no bits set"
        super().__init__(f"meter refused function 0x{self.function:02X}: {names}")


class MeterSecurityError(MeterError):
    """The meter refused a 0x03 security command (SERR, dlt645.md §5.4)."""


class ErrorReply(Payload):
    """2007 abnormal reply: one ERR byte (§2.2). Registered for every function."""

    RESPONSE = True
    ABNORMAL = True
    FUNCTION = 0

    def __init__(self, err: int, function: int = 0, edition: Edition = Edition.V2007) -> None:
        self.function = function
        self.edition = edition
        self.flags: IntFlag = ErrorFlags(err) if edition is Edition.V2007 else ErrorFlags1997(err)

    @property
    def error_code(self) -> int:
        return int(self.flags)

    def to_bytes(self) -> bytes:
        return bytes((int(self.flags),))

    @classmethod
    def from_bytes(cls, data: bytes) -> ErrorReply:
        _need(data, 1, "an abnormal reply")
        return cls(data[0])

    def error(self) -> MeterError:
        """This refusal as an exception to raise."""
        return MeterError(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ErrorReply) and (self.function, self.flags, self.edition) == (
            other.function,
            other.flags,
            other.edition,
        )

    def __repr__(self) -> str:
        return f"ErrorReply(err=0x{int(self.flags):02X}, function=0x{self.function:02X})"


@register
@dataclass(frozen=True, slots=True)
class SecurityErrorReply(Payload):
    """0xC3: the SERR word of a refused security command, low byte first (§5.1, §5.4)."""

    FUNCTION: ClassVar[int] = 0x03
    RESPONSE: ClassVar[bool] = True
    ABNORMAL: ClassVar[bool] = True
    flags: SecurityFlags

    @property
    def error_code(self) -> int:
        return int(self.flags)

    def to_bytes(self) -> bytes:
        return int(self.flags).to_bytes(2, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> SecurityErrorReply:
        # FW-B sends FF lo hi (3 bytes); the standard form is 2 bytes (§5.1).
        if len(data) == 3 and data[0] == 0xFF:
            data = data[1:]
        _need(data, 2, "a security abnormal reply")
        return cls(SecurityFlags(int.from_bytes(data, "little")))

    def error(self) -> MeterSecurityError:
        """This refusal as an exception to raise."""
        return MeterSecurityError(self)


# --- 0x08 broadcast time --------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class BroadcastTime(Payload):
    """0x08 to 99..99: set the clock, ``ss mm hh DD MM YY`` (§2.1). Meters never reply."""

    FUNCTION: ClassVar[int] = 0x08
    time: datetime

    def to_bytes(self) -> bytes:
        return encode_clock(self.time)

    @classmethod
    def from_bytes(cls, data: bytes) -> BroadcastTime:
        _need(data, 6, "broadcast time")
        value = decode_clock(data)
        if value is None:
            raise PayloadError("broadcast time is all zeros")
        return cls(value)


# --- 0x11 / 0x12 read -----------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class ReadRequest(Payload):
    """0x11: read one DI; some DIs take extra selector bytes (load profile, §2.1)."""

    FUNCTION: ClassVar[int] = 0x11
    di: int
    extra: bytes = b""

    def to_bytes(self) -> bytes:
        return di_bytes(self.di) + self.extra

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadRequest:
        _need(data, 4, "a read request", exact=False)
        return cls(int.from_bytes(data[:4], "little"), bytes(data[4:]))


@register
@dataclass(frozen=True, slots=True)
class ReadReply(_DiPayload):
    """0x91 / 0xB1: DI and value bytes (more frames follow when the follow-up flag is set)."""

    FUNCTION: ClassVar[int] = 0x11
    RESPONSE: ClassVar[bool] = True
    WHAT: ClassVar[str] = "a read reply"
    HAS_VALUE: ClassVar[bool] = True
    di: int
    value: bytes


@register
@dataclass(frozen=True, slots=True)
class ReadFollowUpRequest(Payload):
    """0x12: fetch frame ``seq`` (1, 2, ...) of a long reply (§2.1)."""

    FUNCTION: ClassVar[int] = 0x12
    di: int
    seq: int

    def to_bytes(self) -> bytes:
        return di_bytes(self.di) + bytes((self.seq,))

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadFollowUpRequest:
        _need(data, 5, "a follow-up read request")
        return cls(int.from_bytes(data[:4], "little"), data[4])


@register
@dataclass(frozen=True, slots=True)
class ReadFollowUpReply(Payload):
    """0x92 / 0xB2: DI, the next part of the value and the sequence number (FW-A)."""

    FUNCTION: ClassVar[int] = 0x12
    RESPONSE: ClassVar[bool] = True
    di: int
    value: bytes
    seq: int

    def to_bytes(self) -> bytes:
        return di_bytes(self.di) + self.value + bytes((self.seq,))

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadFollowUpReply:
        _need(data, 5, "a follow-up read reply", exact=False)
        return cls(int.from_bytes(data[:4], "little"), bytes(data[4:-1]), data[-1])


# --- 0x13 / 0x15 address -------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class ReadAddressRequest(Payload):
    """0x13 to AA..AA: which meter is on the line (only one may be, §1.5)."""

    FUNCTION: ClassVar[int] = 0x13

    def to_bytes(self) -> bytes:
        return b""

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadAddressRequest:
        _need(data, 0, "a read-address request")
        return cls()


def _address_payload(data: bytes, what: str) -> str:
    _need(data, 6, what)
    try:
        return address_from_wire(data)
    except AddressError as exc:
        raise PayloadError(str(exc)) from None


@register
@dataclass(frozen=True, slots=True)
class ReadAddressReply(Payload):
    """0x93: the meter's address."""

    FUNCTION: ClassVar[int] = 0x13
    RESPONSE: ClassVar[bool] = True
    address: str

    def to_bytes(self) -> bytes:
        return address_to_wire(self.address)

    @classmethod
    def from_bytes(cls, data: bytes) -> ReadAddressReply:
        return cls(_address_payload(data, "a read-address reply"))


@register
@dataclass(frozen=True, slots=True)
class WriteAddressRequest(Payload):
    """0x15 to AA..AA: set the meter's address."""

    FUNCTION: ClassVar[int] = 0x15
    address: str

    def __post_init__(self) -> None:
        normalize_address(self.address)

    def to_bytes(self) -> bytes:
        return address_to_wire(self.address)

    @classmethod
    def from_bytes(cls, data: bytes) -> WriteAddressRequest:
        return cls(_address_payload(data, "a write-address request"))


# --- 0x14 write -----------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class WriteRequest(Payload):
    """0x14: ``DI + PA P0 P1 P2 + C0..C3 + data`` (§2.1).

    With level 99 ``data`` is the plaintext followed by a 4-byte MAC; with level 98 it is
    ciphertext + MAC (§5.5). The value codec does not strip the MAC: see ``mac_split``.
    """

    FUNCTION: ClassVar[int] = 0x14
    di: int
    password: Password
    operator: str
    data: bytes

    def to_bytes(self) -> bytes:
        return di_bytes(self.di) + self.password.to_bytes() + operator_bytes(self.operator) + self.data

    @classmethod
    def from_bytes(cls, data: bytes) -> WriteRequest:
        _need(data, 12, "a write request", exact=False)
        return cls(
            int.from_bytes(data[:4], "little"),
            Password.from_bytes(data[4:8]),
            operator_text(data[8:12]),
            bytes(data[12:]),
        )

    def mac_split(self) -> tuple[bytes, bytes]:
        """(value bytes, MAC) of a level 99/98 write: the MAC is the last 4 bytes."""
        if len(self.data) < 4:
            raise PayloadError("a MAC-protected write needs at least 4 data bytes")
        return self.data[:-4], self.data[-4:]


class _Empty(Payload):
    """A normal reply with no data."""

    def to_bytes(self) -> bytes:
        return b""

    @classmethod
    def from_bytes(cls: type[P], data: bytes) -> P:
        _need(data, 0, f"reply 0x{cls.FUNCTION | 0x80:02X}")
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register
class WriteReply(_Empty):
    """0x94: write accepted."""

    FUNCTION = 0x14
    RESPONSE = True


@register
class WriteAddressReply(_Empty):
    """0x95: address written."""

    FUNCTION = 0x15
    RESPONSE = True


# --- 0x16 freeze ----------------------------------------------------------------------------

WILD = 99
"""In a freeze command, 99 in a field means 'every' (§2.1 0x16)."""


@register
@dataclass(frozen=True, slots=True)
class FreezeRequest(Payload):
    """0x16: ``mm hh DD MM``; 99 is a wildcard from the high end (all 99 = freeze now)."""

    FUNCTION: ClassVar[int] = 0x16
    minute: int = WILD
    hour: int = WILD
    day: int = WILD
    month: int = WILD

    def __post_init__(self) -> None:
        fields_ = (("month", self.month, 1, 12), ("day", self.day, 1, 31), ("hour", self.hour, 0, 23))
        wild = True  # 99 may only continue a run of 99 from the month down (§2.1 0x16)
        for name, v, lo, hi in (*fields_, ("minute", self.minute, 0, 59)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise PayloadError(f"freeze {name} {v!r} is not an integer")
            if v == WILD:
                if not wild:
                    raise PayloadError(
                        f"freeze {name} is 99 (every) below a set field: 99 only counts from the month down "
                        "(MM; MM DD; MM DD hh; all four)"
                    )
                continue
            wild = False
            if not lo <= v <= hi:
                raise PayloadError(f"freeze {name} {v} is outside {lo}..{hi} (or 99 for every)")

    def to_bytes(self) -> bytes:
        parts = (self.minute, self.hour, self.day, self.month)
        return bytes(int(f"{v:02d}", 16) for v in parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> FreezeRequest:
        _need(data, 4, "a freeze request")
        text = data.hex()
        if not text.isdigit():
            raise PayloadError(f"freeze time {data.hex(' ')} is not BCD")
        return cls(*(int(text[i : i + 2]) for i in range(0, 8, 2)))


@register
class FreezeReply(_Empty):
    """0x96: freeze done."""

    FUNCTION = 0x16
    RESPONSE = True


# --- 0x17 baud ------------------------------------------------------------------------------


def _baud_byte(baud: int) -> int:
    for bit, rate in BAUD_RATES.items():
        if rate == baud:
            return bit
    raise PayloadError(f"{baud} bps has no feature-word bit")


def _baud_of(byte: int) -> int:
    try:
        return BAUD_RATES[byte]
    except KeyError:
        raise PayloadError(f"baud feature word {byte:02X} is not one defined bit") from None


@register
@dataclass(frozen=True, slots=True)
class ChangeBaudRequest(Payload):
    """0x17: the new speed as a one-bit feature word (FW-A, FW-B; not PY-645's BCD, §10)."""

    FUNCTION: ClassVar[int] = 0x17
    baud: int

    def to_bytes(self) -> bytes:
        return bytes((_baud_byte(self.baud),))

    @classmethod
    def from_bytes(cls, data: bytes) -> ChangeBaudRequest:
        _need(data, 1, "a change-baud request")
        return cls(_baud_of(data[0]))


@register
@dataclass(frozen=True, slots=True)
class ChangeBaudReply(Payload):
    """0x97: the feature word echoed; the meter switches after replying (§1.6)."""

    FUNCTION: ClassVar[int] = 0x17
    RESPONSE: ClassVar[bool] = True
    baud: int

    def to_bytes(self) -> bytes:
        return bytes((_baud_byte(self.baud),))

    @classmethod
    def from_bytes(cls, data: bytes) -> ChangeBaudReply:
        _need(data, 1, "a change-baud reply")
        return cls(_baud_of(data[0]))


# --- 0x18 password --------------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class ChangePasswordRequest(Payload):
    """0x18: ``DI (04000C01 + level) + old PWD + new PWD`` (§2.1, §10: not PY-645's DI)."""

    FUNCTION: ClassVar[int] = 0x18
    old: Password
    new: Password

    @property
    def di(self) -> int:
        return 0x04000C01 + self.new.level

    def to_bytes(self) -> bytes:
        return di_bytes(self.di) + self.old.to_bytes() + self.new.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ChangePasswordRequest:
        _need(data, 12, "a change-password request")
        req = cls(Password.from_bytes(data[4:8]), Password.from_bytes(data[8:12]))
        if int.from_bytes(data[:4], "little") != req.di:
            raise PayloadError("change-password DI does not match the new password's level")
        return req


@register
@dataclass(frozen=True, slots=True)
class ChangePasswordReply(Payload):
    """0x98: accepted; with the new password, or with no data (``new`` is None).

    dlt645.md §2.1 gives the reply data as "new PWD per the standard as commonly restated" [L],
    and §11.3 says its payload is known only from indirect sources; like every other accepted
    command of §2.1 (0x94, 0x95, 0x99...) a meter may answer with L = 0. Both forms are
    accepted (any other length is not).
    """

    FUNCTION: ClassVar[int] = 0x18
    RESPONSE: ClassVar[bool] = True
    new: Password | None = None

    def to_bytes(self) -> bytes:
        return b"" if self.new is None else self.new.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ChangePasswordReply:
        if not data:
            return cls(None)
        if len(data) != 4:
            raise PayloadError(f"a change-password reply has 0 or 4 data bytes, got {len(data)}")
        return cls(Password.from_bytes(data))


# --- 0x19 / 0x1A / 0x1B clears ---------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class DemandResetRequest(Payload):
    """0x19: ``PWD + OP`` (FW-B checks L = 8)."""

    FUNCTION: ClassVar[int] = 0x19
    password: Password
    operator: str

    def to_bytes(self) -> bytes:
        return self.password.to_bytes() + operator_bytes(self.operator)

    @classmethod
    def from_bytes(cls, data: bytes) -> DemandResetRequest:
        _need(data, 8, "a demand-reset request")
        return cls(Password.from_bytes(data[:4]), operator_text(data[4:8]))


@register
@dataclass(frozen=True, slots=True)
class MeterClearRequest(Payload):
    """0x1A: ``PWD + OP``, plus ciphertext at SGCC level 98."""

    FUNCTION: ClassVar[int] = 0x1A
    password: Password
    operator: str
    ciphertext: bytes = b""

    def to_bytes(self) -> bytes:
        return self.password.to_bytes() + operator_bytes(self.operator) + self.ciphertext

    @classmethod
    def from_bytes(cls, data: bytes) -> MeterClearRequest:
        _need(data, 8, "a meter-clear request", exact=False)
        return cls(Password.from_bytes(data[:4]), operator_text(data[4:8]), bytes(data[8:]))


@register
@dataclass(frozen=True, slots=True)
class EventClearRequest(Payload):
    """0x1B: ``PWD + OP + DI``; DI FFFFFFFF clears every event log."""

    FUNCTION: ClassVar[int] = 0x1B
    password: Password
    operator: str
    di: int = 0xFFFFFFFF

    def to_bytes(self) -> bytes:
        return self.password.to_bytes() + operator_bytes(self.operator) + di_bytes(self.di)

    @classmethod
    def from_bytes(cls, data: bytes) -> EventClearRequest:
        _need(data, 12, "an event-clear request")
        return cls(Password.from_bytes(data[:4]), operator_text(data[4:8]), int.from_bytes(data[8:12], "little"))


@register
class DemandResetReply(_Empty):
    """0x99."""

    FUNCTION = 0x19
    RESPONSE = True


@register
class MeterClearReply(_Empty):
    """0x9A."""

    FUNCTION = 0x1A
    RESPONSE = True


@register
class EventClearReply(_Empty):
    """0x9B."""

    FUNCTION = 0x1B
    RESPONSE = True


# --- 0x1D multi-function output -------------------------------------------------------------


class OutputSelector(IntEnum):
    """0x1D selector N (§2.1)."""

    CLOCK_SECOND_PULSE = 0x00
    DEMAND_PERIOD = 0x01
    TIME_PERIOD_SWITCH = 0x02


@register
@dataclass(frozen=True, slots=True)
class MultiFunctionOutputRequest(_OneByte):
    """0x1D: choose the multi-function terminal's output."""

    FUNCTION: ClassVar[int] = 0x1D
    WHAT: ClassVar[str] = "a multi-function output request"
    selector: int


@register
@dataclass(frozen=True, slots=True)
class MultiFunctionOutputReply(_OneByte):
    """0x9D: the selector echoed (FW-B)."""

    FUNCTION: ClassVar[int] = 0x1D
    RESPONSE: ClassVar[bool] = True
    WHAT: ClassVar[str] = "a multi-function output reply"
    selector: int


# --- dispatch --------------------------------------------------------------------------------

_SPECIAL: dict[tuple[Edition, int, bool, bool], Any] = {}


def register_parser(edition: Edition, function: int, response: bool, abnormal: bool, parser: Any) -> None:
    """Register a function ``parser(data) -> Payload`` for payloads chosen by content."""
    _SPECIAL[(edition, function, response, abnormal)] = parser


def parse_payload(frame: Frame) -> Payload:
    """The typed payload of ``frame``; raises :class:`PayloadError` if it does not fit."""
    c = frame.control
    key = (frame.edition, c.function, c.response, c.abnormal)
    special = _SPECIAL.get(key)
    if special is not None:
        return special(frame.data)
    cls = _REGISTRY.get(key)
    if cls is not None:
        return cls.from_bytes(frame.data)
    if c.abnormal and c.response:
        _need(frame.data, 1, "an abnormal reply")
        if len(frame.data) != 1:
            raise PayloadError(f"abnormal reply carries {len(frame.data)} bytes, expected 1")
        return ErrorReply(frame.data[0], c.function, frame.edition)
    raise PayloadError(
        f"no payload layout for function 0x{c.function:02X} ({c.direction}) in DL/T 645-{frame.edition.value}"
    )


def build_frame(address: str, payload: Payload, *, follow_up: bool = False) -> Frame:
    """The frame carrying ``payload`` to or from ``address``."""
    if isinstance(payload, ErrorReply):
        control = Control(payload.function, True, True, False)
        edition = payload.edition
    else:
        control = Control(payload.FUNCTION, payload.RESPONSE, payload.ABNORMAL, follow_up)
        edition = payload.EDITION
    return Frame(normalize_address(address), control, payload.to_bytes(), edition)


def encode_payload(address: str, payload: Payload, *, preamble: int = 4, follow_up: bool = False) -> bytes:
    """Wire bytes of the frame carrying ``payload``."""
    frame = build_frame(address, payload, follow_up=follow_up)
    return encode_frame(frame.address, frame.control.byte, frame.data, preamble)


__all__ = [
    "PSEUDO_LEVELS",
    "WILD",
    "BroadcastTime",
    "ChangeBaudReply",
    "ChangeBaudRequest",
    "ChangePasswordReply",
    "ChangePasswordRequest",
    "DemandResetReply",
    "DemandResetRequest",
    "ErrorFlags",
    "ErrorFlags1997",
    "ErrorReply",
    "EventClearReply",
    "EventClearRequest",
    "FreezeReply",
    "FreezeRequest",
    "MeterClearReply",
    "MeterClearRequest",
    "MeterError",
    "MeterSecurityError",
    "MultiFunctionOutputReply",
    "MultiFunctionOutputRequest",
    "OutputSelector",
    "Password",
    "Payload",
    "ReadAddressReply",
    "ReadAddressRequest",
    "ReadFollowUpReply",
    "ReadFollowUpRequest",
    "ReadReply",
    "ReadRequest",
    "RelayErrorFlags",
    "SecurityErrorReply",
    "SecurityFlags",
    "WriteAddressReply",
    "WriteAddressRequest",
    "WriteReply",
    "WriteRequest",
    "build_frame",
    "di_bytes",
    "encode_payload",
    "flag_names",
    "operator_bytes",
    "operator_text",
    "parse_payload",
    "register",
    "register_parser",
]

from . import security  # noqa: E402, F401  (registers the 0x03 payload parsers)
