"""0x03 security authentication, the SGCC cost-control extension (dlt645.md §5).

Request DATA is ``DI(4) + OP(4) + body`` and a normal 0x83 reply is ``DI(4) + body``; a
refused command comes back as 0xC3 with the SERR word (:class:`~.payloads.SecurityErrorReply`).
:class:`SecurityRequest` and :class:`SecurityReply` carry a typed body chosen by the DI
(table in §5.2); an unknown DI gets a :class:`RawBody`.

Byte order (§5.1, §5.2):

* ESAM byte strings (ciphertext, random numbers, dispersion factor, ESAM serial number, MACs,
  the data of an ESAM file write or read-back, key ciphertext) are kept in ESAM order in the
  Python objects and transmitted reversed (FW-A ``fnDl645B_Inverse``, FW-B ``Exchange``).
* Amounts and purchase counts are binary little-endian integers; amounts are in fen
  (0.01 yuan) and always ``int``.
* A customer number is 6 BCD bytes, low byte first, held as a 12-digit string.
* Key information, the read-back descriptor and the comparison descriptor are passed through
  in wire order (the meter reads them as little-endian fields, FW-B).

Every layout is declared once with ``construct`` and used both ways. Decoding any bytes raises
nothing but :class:`~.errors.PayloadError`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

import construct as cs

from .control import Edition
from .errors import PayloadError
from .payloads import (
    Payload,
    SecurityErrorReply,
    flag_names,
    operator_bytes,
    operator_text,
    register_parser,
)

FUNCTION = 0x03
MAC_SIZE = 4
KEY_RECORD_SIZE = 36
_MAX_U32 = 0xFFFFFFFF

B = TypeVar("B", bound="SecurityBody")


class SecurityDI(IntEnum):
    """Data identifiers of the 0x03 commands (§5.2). ``name.lower()`` is the DI's name."""

    IDENTITY_AUTHENTICATION = 0x070000FF
    VALIDITY_PERIOD = 0x070001FF
    TERMINATE_AUTHENTICATION = 0x070002FF
    INFRARED_AUTHENTICATION = 0x070003FF
    ESAM_WRITE_PLAIN = 0x070004FF
    ESAM_WRITE_CIPHER = 0x070005FF
    ACCOUNT_OPENING = 0x070101FF
    RECHARGE = 0x070102FF
    WALLET_INITIALISATION = 0x070103FF
    KEY_UPDATE = 0x070301FF
    DATA_READ_BACK = 0x078001FF
    DATA_COMPARISON = 0x078002FF
    INFRARED_REQUEST = 0x078003FF
    STATUS_QUERY = 0x078102FF


def security_name(di: int) -> str | None:
    """``"recharge"``, ``"identity_authentication"``, ... or None for a DI not in §5.2."""
    try:
        return SecurityDI(di).name.lower()
    except ValueError:
        return None


# --- construct building blocks ---------------------------------------------------------------


class _Reversed(cs.Adapter):  # type: ignore[misc]
    """An ESAM byte string: ESAM order in Python, reversed on the wire (§5.1)."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> bytes:
        return bytes(obj)[::-1]

    def _encode(self, obj: bytes, context: Any, path: Any) -> bytes:
        return bytes(obj)[::-1]


def _esam(size: int) -> cs.Construct:
    return _Reversed(cs.Bytes(size))


class _AllButLast(cs.Construct):  # type: ignore[misc]
    """The rest of the stream except its last ``keep`` bytes (variable data before a MAC)."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep

    def _parse(self, stream: Any, context: Any, path: Any) -> bytes:
        rest = cs.stream_read_entire(stream, path)
        if len(rest) < self.keep:
            raise cs.StreamError(f"need at least {self.keep} bytes, found {len(rest)}", path=path)
        cs.stream_seek(stream, -self.keep, 1, path)
        return bytes(rest[: len(rest) - self.keep])

    def _build(self, obj: bytes, stream: Any, context: Any, path: Any) -> bytes:
        cs.stream_write(stream, obj, len(obj), path)
        return obj

    def _sizeof(self, context: Any, path: Any) -> int:
        raise cs.SizeofError(path=path)


class _BcdText(cs.Adapter):  # type: ignore[misc]
    """``size`` BCD bytes, low byte first, as a ``2 * size``-digit string."""

    def __init__(self, size: int, what: str) -> None:
        super().__init__(cs.Bytes(size))
        self.what = what

    def _decode(self, obj: bytes, context: Any, path: Any) -> str:
        text = bytes(obj)[::-1].hex()
        if not text.isdigit():
            raise PayloadError(f"{self.what} bytes {bytes(obj).hex(' ')} are not BCD")
        return text

    def _encode(self, obj: str, context: Any, path: Any) -> bytes:
        return bytes.fromhex(obj)[::-1]


class _BcdInt(_BcdText):
    """``size`` BCD bytes, low byte first, as an int."""

    def _decode(self, obj: bytes, context: Any, path: Any) -> int:  # type: ignore[override]
        return int(super()._decode(obj, context, path))

    def _encode(self, obj: int, context: Any, path: Any) -> bytes:  # type: ignore[override]
        return super()._encode(f"{obj:0{2 * self.subcon.length}d}", context, path)


def _customer() -> cs.Construct:
    return _BcdText(6, "customer number")


def _parse(layout: cs.Construct, data: bytes, what: str) -> Any:
    try:
        return layout.parse(bytes(data))
    except cs.ConstructError as exc:
        raise PayloadError(f"{what}: {_construct_message(exc)}") from None


def _build(layout: cs.Construct, values: dict[str, Any], what: str) -> bytes:
    try:
        return bytes(layout.build(values))
    except PayloadError:
        raise
    except (cs.ConstructError, ValueError, TypeError, OverflowError) as exc:
        raise PayloadError(f"{what}: {_construct_message(exc)}") from None


def _construct_message(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- field checks ------------------------------------------------------------------------------


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _check_bytes(obj: object, name: str, size: int | None, what: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise PayloadError(f"{what} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if size is not None and len(value) != size:
        raise PayloadError(f"{what} must be {size} bytes, got {len(value)}")
    _set(obj, name, value)


def _check_uint(value: Any, bits: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise PayloadError(f"{what} {value} does not fit {bits // 8} unsigned byte(s)")


def _check_digits(value: Any, digits: int, what: str) -> None:
    if not isinstance(value, str) or len(value) != digits or not value.isascii() or not value.isdigit():
        raise PayloadError(f"{what} {value!r} is not {digits} decimal digits")


# --- bodies -----------------------------------------------------------------------------------


class SecurityBody:
    """Base of the typed bodies: the bytes after ``DI + OP`` (request) or ``DI`` (reply)."""

    LAYOUT: ClassVar[cs.Construct]
    SIZE: ClassVar[int | None] = None  # exact body size, None when variable
    MIN_SIZE: ClassVar[int] = 0
    WHAT: ClassVar[str] = "a security body"

    def to_bytes(self) -> bytes:
        """The body as plain (de-scrambled) bytes."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return _build(self.LAYOUT, values, self.WHAT)

    @classmethod
    def from_bytes(cls: type[B], data: bytes) -> B:
        """Parse a body; raises :class:`PayloadError` if it does not fit."""
        cls._check_size(bytes(data))
        parsed = _parse(cls.LAYOUT, data, cls.WHAT)
        return cls(**{f.name: parsed[f.name] for f in fields(cls)})  # type: ignore[arg-type]

    @classmethod
    def _check_size(cls, data: bytes) -> None:
        if cls.SIZE is not None and len(data) != cls.SIZE:
            raise PayloadError(f"{cls.WHAT} needs {cls.SIZE} bytes, got {len(data)}")
        if len(data) < cls.MIN_SIZE:
            raise PayloadError(f"{cls.WHAT} needs at least {cls.MIN_SIZE} bytes, got {len(data)}")


@dataclass(frozen=True, slots=True)
class RawBody(SecurityBody):
    """Bytes of a body without a typed layout (unknown DI, or raw by definition), wire order."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct("data" / cs.GreedyBytes)
    WHAT: ClassVar[str] = "a raw security body"
    data: bytes = b""

    def __post_init__(self) -> None:
        _check_bytes(self, "data", None, "raw body")


@dataclass(frozen=True, slots=True)
class EmptyBody(SecurityBody):
    """No bytes after the DI (and operator code)."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(cs.Terminated)
    SIZE: ClassVar[int | None] = 0
    WHAT: ClassVar[str] = "an empty security body"


EMPTY = EmptyBody()


@dataclass(frozen=True, slots=True)
class IdentityAuthRequest(SecurityBody):
    """070000FF request: ciphertext1 (8) + random1 (8) + dispersion factor (8) → L = 0x20.

    The dispersion factor is ``00 00`` + the 6-byte meter number (§5.2, §5.6); build it with
    :meth:`for_meter` and read it back with :attr:`meter_number`.
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "ciphertext1" / _esam(8), "random1" / _esam(8), "dispersion_factor" / _esam(8), cs.Terminated
    )
    SIZE: ClassVar[int | None] = 24
    WHAT: ClassVar[str] = "an identity-authentication request"
    ciphertext1: bytes
    random1: bytes
    dispersion_factor: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "ciphertext1", 8, "ciphertext1")
        _check_bytes(self, "random1", 8, "random1")
        _check_bytes(self, "dispersion_factor", 8, "dispersion factor")

    @staticmethod
    def dispersion_for(meter_number: str) -> bytes:
        """The dispersion factor (ESAM order) of a 12-digit meter number (DI 04000402)."""
        _check_digits(meter_number, 12, "meter number")
        return b"\x00\x00" + bytes.fromhex(meter_number)

    @classmethod
    def for_meter(cls, ciphertext1: bytes, random1: bytes, meter_number: str) -> IdentityAuthRequest:
        """The request for the meter whose number is ``meter_number`` (12 digits)."""
        return cls(ciphertext1, random1, cls.dispersion_for(meter_number))

    @property
    def meter_number(self) -> str | None:
        """The meter number in the dispersion factor, or None if it is not ``00 00`` + 6 BCD bytes."""
        if self.dispersion_factor[:2] != b"\x00\x00":
            return None
        text = self.dispersion_factor[2:].hex()
        return text if text.isdigit() else None


@dataclass(frozen=True, slots=True)
class IdentityAuthReply(SecurityBody):
    """070000FF reply: random2 (4) + ESAM serial number (8) → L = 0x10."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct("random2" / _esam(4), "esam_serial" / _esam(8), cs.Terminated)
    SIZE: ClassVar[int | None] = 12
    WHAT: ClassVar[str] = "an identity-authentication reply"
    random2: bytes
    esam_serial: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "random2", 4, "random2")
        _check_bytes(self, "esam_serial", 8, "ESAM serial number")


@dataclass(frozen=True, slots=True)
class ValidityPeriodRequest(SecurityBody):
    """070001FF request: validity of an identity authentication in minutes (2 BCD, not 0000) + MAC."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "minutes" / _BcdInt(2, "validity period"), "mac" / _esam(MAC_SIZE), cs.Terminated
    )
    SIZE: ClassVar[int | None] = 6
    WHAT: ClassVar[str] = "a validity-period request"
    minutes: int
    mac: bytes

    def __post_init__(self) -> None:
        if isinstance(self.minutes, bool) or not isinstance(self.minutes, int):
            raise PayloadError(f"validity period must be an int of minutes, not {type(self.minutes).__name__}")
        if not 1 <= self.minutes <= 9999:
            raise PayloadError(f"validity period {self.minutes} min is outside 1..9999 (0000 is refused)")
        _check_bytes(self, "mac", MAC_SIZE, "MAC")


@dataclass(frozen=True, slots=True)
class TerminateAuthReply(SecurityBody):
    """070002FF reply: customer number (6 BCD) + remaining money (4, fen) + purchase count (4) + key info (4).

    Money and count are the ESAM wallet's binary values (§5.2 [M]); ``key_info`` is the meter's
    key status word, passed through in wire order.
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "customer_number" / _customer(),
        "remaining" / cs.Int32ul,
        "purchase_count" / cs.Int32ul,
        "key_info" / cs.Bytes(4),
        cs.Terminated,
    )
    SIZE: ClassVar[int | None] = 18
    WHAT: ClassVar[str] = "a terminate-authentication reply"
    customer_number: str
    remaining: int
    purchase_count: int
    key_info: bytes

    def __post_init__(self) -> None:
        _check_digits(self.customer_number, 12, "customer number")
        _check_uint(self.remaining, 32, "remaining money (fen)")
        _check_uint(self.purchase_count, 32, "purchase count")
        _check_bytes(self, "key_info", 4, "key information")


@dataclass(frozen=True, slots=True)
class InfraredAuthRequest(SecurityBody):
    """070003FF request: ciphertext2 (8), answering a 078003FF infrared request."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct("ciphertext2" / _esam(8), cs.Terminated)
    SIZE: ClassVar[int | None] = 8
    WHAT: ClassVar[str] = "an infrared-authentication request"
    ciphertext2: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "ciphertext2", 8, "ciphertext2")


@dataclass(frozen=True, slots=True)
class EsamWriteRequest(SecurityBody):
    """070004FF (plaintext) / 070005FF (ciphertext) request: file no (1) + offset (2) + data + MAC (4).

    ``data`` is written to the ESAM file and, like the MAC, is reversed on the wire (FW-B
    ``Update_ESAM_Bin_Mac``). The offset is a little-endian word.
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "file" / cs.Int8ul,
        "offset" / cs.Int16ul,
        "data" / _Reversed(_AllButLast(MAC_SIZE)),
        "mac" / _esam(MAC_SIZE),
        cs.Terminated,
    )
    MIN_SIZE: ClassVar[int] = 7
    WHAT: ClassVar[str] = "an ESAM file write"
    file: int
    offset: int
    data: bytes
    mac: bytes

    def __post_init__(self) -> None:
        _check_uint(self.file, 8, "file number")
        _check_uint(self.offset, 16, "file offset")
        _check_bytes(self, "data", None, "file data")
        _check_bytes(self, "mac", MAC_SIZE, "MAC")


@dataclass(frozen=True, slots=True)
class RechargeRequest(SecurityBody):
    """070101FF account opening / 070102FF recharge: amount (4) + count (4) + MAC1 + customer (6) + MAC2.

    ``amount`` is in fen, binary little-endian; MAC1 covers amount and count, MAC2 the customer
    number. With DI and operator code L = 0x1E (§5.2).
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "amount" / cs.Int32ul,
        "purchase_count" / cs.Int32ul,
        "mac1" / _esam(MAC_SIZE),
        "customer_number" / _customer(),
        "mac2" / _esam(MAC_SIZE),
        cs.Terminated,
    )
    SIZE: ClassVar[int | None] = 22
    WHAT: ClassVar[str] = "an account-opening/recharge request"
    amount: int
    purchase_count: int
    mac1: bytes
    customer_number: str
    mac2: bytes

    def __post_init__(self) -> None:
        _check_uint(self.amount, 32, "amount (fen)")
        _check_uint(self.purchase_count, 32, "purchase count")
        _check_bytes(self, "mac1", MAC_SIZE, "MAC1")
        _check_digits(self.customer_number, 12, "customer number")
        _check_bytes(self, "mac2", MAC_SIZE, "MAC2")


@dataclass(frozen=True, slots=True)
class WalletInitRequest(SecurityBody):
    """070103FF request: amount (4) + MAC (4) + purchase count (4) + MAC (4).

    The meter requires count 0 and answers otherwise with SERR "purchase-count error" (FW-B
    ``Yc_Preset_Pro``); the codec carries any count so that a simulator can give that answer.
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "amount" / cs.Int32ul,
        "mac1" / _esam(MAC_SIZE),
        "purchase_count" / cs.Int32ul,
        "mac2" / _esam(MAC_SIZE),
        cs.Terminated,
    )
    SIZE: ClassVar[int | None] = 16
    WHAT: ClassVar[str] = "a wallet-initialisation request"
    amount: int
    mac1: bytes
    purchase_count: int = 0
    mac2: bytes = bytes(MAC_SIZE)

    def __post_init__(self) -> None:
        _check_uint(self.amount, 32, "amount (fen)")
        _check_bytes(self, "mac1", MAC_SIZE, "MAC1")
        _check_uint(self.purchase_count, 32, "purchase count")
        _check_bytes(self, "mac2", MAC_SIZE, "MAC2")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One 36-byte key record of a key update: key ciphertext (32, reversed on the wire) + info (4).

    ``info`` stays in wire order; FW-B reads it as state (00 test / 01 production), key number,
    reserved, total number of keys.
    """

    key: bytes
    info: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "key", 32, "key ciphertext")
        _check_bytes(self, "info", 4, "key record info")

    @property
    def state(self) -> int:
        return self.info[0]

    @property
    def number(self) -> int:
        return self.info[1]

    @property
    def total(self) -> int:
        return self.info[3]


class _KeyRecords(cs.Adapter):  # type: ignore[misc]
    def _decode(self, obj: Any, context: Any, path: Any) -> tuple[KeyRecord, ...]:
        return tuple(KeyRecord(bytes(r.key), bytes(r.info)) for r in obj)

    def _encode(self, obj: Any, context: Any, path: Any) -> list[dict[str, bytes]]:
        return [{"key": r.key, "info": r.info} for r in obj]


@dataclass(frozen=True, slots=True)
class KeyUpdateRequest(SecurityBody):
    """070301FF request: n × 36-byte key records + MAC (4); L = 12 + 36·n (FW-B accepts n = 1..4)."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "records" / _KeyRecords(cs.GreedyRange(cs.Struct("key" / _esam(32), "info" / cs.Bytes(4)))),
        "mac" / _esam(MAC_SIZE),
        cs.Terminated,
    )
    MIN_SIZE: ClassVar[int] = KEY_RECORD_SIZE + MAC_SIZE
    WHAT: ClassVar[str] = "a key update"
    records: tuple[KeyRecord, ...]
    mac: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.records, (tuple, list)) or not all(isinstance(r, KeyRecord) for r in self.records):
            raise PayloadError("key update records must be a sequence of KeyRecord")
        _set(self, "records", tuple(self.records))
        if not self.records:
            raise PayloadError("a key update needs at least one key record")
        _check_bytes(self, "mac", MAC_SIZE, "MAC")

    @classmethod
    def _check_size(cls, data: bytes) -> None:
        n = len(data) - MAC_SIZE
        if n < KEY_RECORD_SIZE or n % KEY_RECORD_SIZE:
            raise PayloadError(
                f"{cls.WHAT} needs n x {KEY_RECORD_SIZE}-byte key records + a {MAC_SIZE}-byte MAC, "
                f"got {len(data)} bytes"
            )


@dataclass(frozen=True, slots=True)
class ReadBackRequest(SecurityBody):
    """078001FF request: the 8-byte read-back descriptor, in wire order.

    FW-B reads it as little-endian words: length, offset, file (02 = wallet), directory DF01.
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct("descriptor" / cs.Bytes(8), cs.Terminated)
    SIZE: ClassVar[int | None] = 8
    WHAT: ClassVar[str] = "a data read-back request"
    descriptor: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "descriptor", 8, "read-back descriptor")


@dataclass(frozen=True, slots=True)
class ReadBackReply(SecurityBody):
    """078001FF reply: the descriptor echoed (8, wire order) + data + MAC (4).

    The echo follows FW-B (its comment: "8+Le+4 bytes: read-back identifier, data, MAC").
    ``data`` is reversed on the wire as a whole, which is ESAM order for a binary file; for
    the wallet (file 02) FW-B reverses money, MAC and count one by one, so ``data`` then holds
    count, MAC1, money — still lossless.
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "descriptor" / cs.Bytes(8),
        "data" / _Reversed(_AllButLast(MAC_SIZE)),
        "mac" / _esam(MAC_SIZE),
        cs.Terminated,
    )
    MIN_SIZE: ClassVar[int] = 8 + MAC_SIZE
    WHAT: ClassVar[str] = "a data read-back reply"
    descriptor: bytes
    data: bytes
    mac: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "descriptor", 8, "read-back descriptor")
        _check_bytes(self, "data", None, "read-back data")
        _check_bytes(self, "mac", MAC_SIZE, "MAC")


@dataclass(frozen=True, slots=True)
class ComparisonRequest(SecurityBody):
    """078002FF request: the comparison descriptor incl. address range, wire order.

    FW-B: CPU number (1), key index (1), factor start address (4), data start address (4).
    """

    LAYOUT: ClassVar[cs.Construct] = cs.Struct("descriptor" / cs.GreedyBytes)
    WHAT: ClassVar[str] = "a data-comparison request"
    descriptor: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "descriptor", None, "comparison descriptor")


@dataclass(frozen=True, slots=True)
class InfraredRequest(SecurityBody):
    """078003FF request: random1 (8). The reply is raw ESAM data (FW-B: meter number, ESAM
    serial, encrypted random1, random2)."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct("random1" / _esam(8), cs.Terminated)
    SIZE: ClassVar[int | None] = 8
    WHAT: ClassVar[str] = "an infrared request"
    random1: bytes

    def __post_init__(self) -> None:
        _check_bytes(self, "random1", 8, "random1")


@dataclass(frozen=True, slots=True)
class StatusQueryReply(SecurityBody):
    """078102FF reply: money (4) + MAC + purchase count (4) + MAC + customer number (6) + key info (4)."""

    LAYOUT: ClassVar[cs.Construct] = cs.Struct(
        "remaining" / cs.Int32ul,
        "mac1" / _esam(MAC_SIZE),
        "purchase_count" / cs.Int32ul,
        "mac2" / _esam(MAC_SIZE),
        "customer_number" / _customer(),
        "key_info" / cs.Bytes(4),
        cs.Terminated,
    )
    SIZE: ClassVar[int | None] = 26
    WHAT: ClassVar[str] = "a status-query reply"
    remaining: int
    mac1: bytes
    purchase_count: int
    mac2: bytes
    customer_number: str
    key_info: bytes

    def __post_init__(self) -> None:
        _check_uint(self.remaining, 32, "remaining money (fen)")
        _check_bytes(self, "mac1", MAC_SIZE, "MAC1")
        _check_uint(self.purchase_count, 32, "purchase count")
        _check_bytes(self, "mac2", MAC_SIZE, "MAC2")
        _check_digits(self.customer_number, 12, "customer number")
        _check_bytes(self, "key_info", 4, "key information")


_D = SecurityDI

REQUEST_BODIES: dict[int, type[SecurityBody]] = {
    _D.IDENTITY_AUTHENTICATION: IdentityAuthRequest,
    _D.VALIDITY_PERIOD: ValidityPeriodRequest,
    _D.TERMINATE_AUTHENTICATION: EmptyBody,
    _D.INFRARED_AUTHENTICATION: InfraredAuthRequest,
    _D.ESAM_WRITE_PLAIN: EsamWriteRequest,
    _D.ESAM_WRITE_CIPHER: EsamWriteRequest,
    _D.ACCOUNT_OPENING: RechargeRequest,
    _D.RECHARGE: RechargeRequest,
    _D.WALLET_INITIALISATION: WalletInitRequest,
    _D.KEY_UPDATE: KeyUpdateRequest,
    _D.DATA_READ_BACK: ReadBackRequest,
    _D.DATA_COMPARISON: ComparisonRequest,
    _D.INFRARED_REQUEST: InfraredRequest,
    _D.STATUS_QUERY: EmptyBody,
}
"""Request body type of each DI in §5.2; any other DI takes a :class:`RawBody`."""

REPLY_BODIES: dict[int, type[SecurityBody]] = {
    _D.IDENTITY_AUTHENTICATION: IdentityAuthReply,
    _D.VALIDITY_PERIOD: EmptyBody,
    _D.TERMINATE_AUTHENTICATION: TerminateAuthReply,
    _D.INFRARED_AUTHENTICATION: EmptyBody,
    _D.ESAM_WRITE_PLAIN: EmptyBody,
    _D.ESAM_WRITE_CIPHER: EmptyBody,
    _D.ACCOUNT_OPENING: EmptyBody,
    _D.RECHARGE: EmptyBody,
    _D.WALLET_INITIALISATION: EmptyBody,
    _D.KEY_UPDATE: EmptyBody,
    _D.DATA_READ_BACK: ReadBackReply,
    _D.DATA_COMPARISON: RawBody,
    _D.INFRARED_REQUEST: RawBody,
    _D.STATUS_QUERY: StatusQueryReply,
}
"""Normal-reply body type of each DI in §5.2; any other DI takes a :class:`RawBody`."""


def request_body_type(di: int) -> type[SecurityBody]:
    """The body class of a request with data identifier ``di``."""
    return REQUEST_BODIES.get(di, RawBody)


def reply_body_type(di: int) -> type[SecurityBody]:
    """The body class of a normal reply with data identifier ``di``."""
    return REPLY_BODIES.get(di, RawBody)


# --- envelopes --------------------------------------------------------------------------------

_REQUEST = cs.Struct("di" / cs.Int32ul, "operator" / cs.Bytes(4), "body" / cs.GreedyBytes)
_REPLY = cs.Struct("di" / cs.Int32ul, "body" / cs.GreedyBytes)


def _check_envelope(obj: SecurityRequest | SecurityReply, expected: type[SecurityBody]) -> None:
    _check_uint(obj.di, 32, "DI")
    if type(obj.body) is not expected:
        name = security_name(obj.di) or "unknown DI"
        raise PayloadError(f"DI {obj.di:08X} ({name}) takes a {expected.__name__} body, not {type(obj.body).__name__}")


@dataclass(frozen=True, slots=True)
class SecurityRequest(Payload):
    """0x03: ``DI + OP + body`` (§5.1). ``operator`` is 8 hex digits, C3 first."""

    FUNCTION: ClassVar[int] = FUNCTION
    di: int
    operator: str
    body: SecurityBody = EMPTY

    def __post_init__(self) -> None:
        _set(self, "operator", operator_text(operator_bytes(self.operator)))
        _check_envelope(self, request_body_type(self.di))

    @property
    def name(self) -> str | None:
        """The DI's name (``"recharge"``, ...), None for a DI not in §5.2."""
        return security_name(self.di)

    def to_bytes(self) -> bytes:
        values = {"di": self.di, "operator": operator_bytes(self.operator), "body": self.body.to_bytes()}
        return _build(_REQUEST, values, "a security request")

    @classmethod
    def from_bytes(cls, data: bytes) -> SecurityRequest:
        if len(data) < 8:
            raise PayloadError(f"a security request needs at least 8 data bytes (DI + operator), got {len(data)}")
        p = _parse(_REQUEST, data, "a security request")
        body = request_body_type(p.di).from_bytes(p.body)
        return cls(p.di, operator_text(p.operator), body)


@dataclass(frozen=True, slots=True)
class SecurityReply(Payload):
    """0x83: ``DI + body`` (§5.1)."""

    FUNCTION: ClassVar[int] = FUNCTION
    RESPONSE: ClassVar[bool] = True
    di: int
    body: SecurityBody = EMPTY

    def __post_init__(self) -> None:
        _check_envelope(self, reply_body_type(self.di))

    @property
    def name(self) -> str | None:
        """The DI's name (``"recharge"``, ...), None for a DI not in §5.2."""
        return security_name(self.di)

    def to_bytes(self) -> bytes:
        return _build(_REPLY, {"di": self.di, "body": self.body.to_bytes()}, "a security reply")

    @classmethod
    def from_bytes(cls, data: bytes) -> SecurityReply:
        if len(data) < 4:
            raise PayloadError(f"a security reply needs at least 4 data bytes (DI), got {len(data)}")
        p = _parse(_REPLY, data, "a security reply")
        return cls(p.di, reply_body_type(p.di).from_bytes(p.body))


register_parser(Edition.V2007, FUNCTION, False, False, SecurityRequest.from_bytes)
register_parser(Edition.V2007, FUNCTION, True, False, SecurityReply.from_bytes)


# --- description --------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex().upper()
    if isinstance(value, KeyRecord):
        return {
            "key": _plain(value.key),
            "info": _plain(value.info),
            "state": value.state,
            "number": value.number,
            "total": value.total,
        }
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def describe_body(body: SecurityBody) -> dict[str, Any]:
    """The fields of a body as JSON-ready values (bytes as upper-case hex, money as int fen)."""
    out: dict[str, Any] = {f.name: _plain(getattr(body, f.name)) for f in fields(body)}  # type: ignore[arg-type]
    if isinstance(body, IdentityAuthRequest):
        out["meter_number"] = body.meter_number
    elif isinstance(body, KeyUpdateRequest):
        out["key_count"] = len(body.records)
    return out


def describe_security(payload: Payload) -> dict[str, Any]:
    """A 0x03 payload as a JSON-ready dict: ``di``, ``name``, ``operator``, ``body`` and the body's fields.

    Also accepts a :class:`~.payloads.SecurityErrorReply` (``error_code`` and ``errors``).
    """
    if isinstance(payload, SecurityErrorReply):
        return {"name": "security_error", "error_code": int(payload.flags), "errors": flag_names(payload.flags)}
    if not isinstance(payload, (SecurityRequest, SecurityReply)):
        raise TypeError(f"not a 0x03 security payload: {type(payload).__name__}")
    out: dict[str, Any] = {"di": f"{payload.di:08X}", "name": payload.name}
    if isinstance(payload, SecurityRequest):
        out["operator"] = payload.operator
    out["body"] = type(payload.body).__name__
    out.update(describe_body(payload.body))
    return out


__all__ = [
    "EMPTY",
    "FUNCTION",
    "KEY_RECORD_SIZE",
    "MAC_SIZE",
    "REPLY_BODIES",
    "REQUEST_BODIES",
    "ComparisonRequest",
    "EmptyBody",
    "EsamWriteRequest",
    "IdentityAuthReply",
    "IdentityAuthRequest",
    "InfraredAuthRequest",
    "InfraredRequest",
    "KeyRecord",
    "KeyUpdateRequest",
    "RawBody",
    "ReadBackReply",
    "ReadBackRequest",
    "RechargeRequest",
    "SecurityBody",
    "SecurityDI",
    "SecurityReply",
    "SecurityRequest",
    "StatusQueryReply",
    "TerminateAuthReply",
    "ValidityPeriodRequest",
    "WalletInitRequest",
    "describe_body",
    "describe_security",
    "reply_body_type",
    "request_body_type",
    "security_name",
]
