"""Value formats of data identifiers: BCD numbers, dates and times, status words, records.

A format is named by the notation of the standard (``XXXXXX.XX``, ``YYMMDDhhmm``, ...; see
dlt645.md §3.1 and §6) and turns the plain (de-scrambled) value bytes into exact Python
values and back. Multi-byte values are least-significant byte first on the wire. Numbers
decode to ``int`` or ``Decimal``, never ``float``. Signed numbers carry the sign in the top
bit of the most significant byte (§3.1). Meter clocks have no zone: times are given the
meter's zone, China Standard Time (UTC+8) unless a caller says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal, DecimalException, InvalidOperation
from typing import Any

from .errors import ValueFormatError

METER_TZ: tzinfo = timezone(timedelta(hours=8), "CST")
"""Zone of meter clocks: DL/T 645 meters keep Beijing time, which has no daylight saving."""


class ValueFormat:
    """Base of all value formats: ``decode`` plain bytes, ``encode`` a value."""

    spec: str
    size: int | None  # bytes, or None when variable

    def decode(self, raw: bytes) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def warnings(self, raw: bytes) -> list[str]:
        """What is odd about ``raw`` although it decodes (a weekday that does not match the date).

        Call it only for bytes that :meth:`decode` accepts; the default finds nothing.
        """
        return []

    def _check_size(self, raw: bytes) -> None:
        if self.size is not None and len(raw) != self.size:
            raise ValueFormatError(f"{self.spec} needs {self.size} bytes, got {len(raw)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _bcd_text(raw: bytes, spec: str) -> str:
    text = raw[::-1].hex()
    if not text.isdigit():
        raise ValueFormatError(f"{raw.hex(' ')} is not BCD (format {spec})")
    return text


def _bcd_bytes(digits: str) -> bytes:
    return bytes.fromhex(digits)[::-1]


class Number(ValueFormat):
    """Unsigned or signed BCD number with implied decimals: ``XXXXXX.XX``, ``NNNN``."""

    __slots__ = ("_limit", "_padded", "_scale", "decimals", "digits", "signed", "size", "spec")

    def __init__(self, spec: str, signed: bool = False) -> None:
        whole, _, frac = spec.partition(".")
        self.spec = spec
        # An odd count (1997 voltage ``XXX`` in 2 bytes) has a leading zero digit on the wire.
        count = len(whole) + len(frac)
        self.digits = count + count % 2
        self._padded = count != self.digits
        self.decimals = len(frac)
        self.size = self.digits // 2
        self.signed = signed
        self._scale = Decimal(1).scaleb(-self.decimals)
        # A signed value gives up the top bit of the top digit: at most 7 in it (unless that
        # digit is the leading zero of an odd count, which leaves all ``count`` digits free).
        self._limit = (8 * 10 ** (count - 1) if signed and count == self.digits else 10**count) - 1

    def decode(self, raw: bytes) -> int | Decimal:
        if len(raw) != self.size:
            raise ValueFormatError(f"{self.spec} needs {self.size} bytes, got {len(raw)}")
        negative = False
        if self.signed and raw[-1] & 0x80:
            negative = True
            raw = raw[:-1] + bytes((raw[-1] & 0x7F,))
        text = raw[::-1].hex()
        if not text.isdigit():
            raise ValueFormatError(f"{raw.hex(' ')} is not BCD (format {self.spec})")
        if self._padded and text[0] != "0":
            # The leading digit of an odd count is padding: a value there would not re-encode.
            raise ValueFormatError(f"{text} has {self.digits} digits, {self.spec} only {self.digits - 1}")
        if self.decimals:
            d = self.decimals
            value: int | Decimal = Decimal(f"{'-' if negative else ''}{text[:-d]}.{text[-d:]}")
        else:
            value = -int(text) if negative else int(text)
        return value

    def scaled(self, value: int | Decimal | str) -> int:
        """``value`` as an integer count of the format's least significant digit."""
        if isinstance(value, bool):
            raise ValueFormatError("a boolean is not a number")
        try:
            exact = Decimal(value) if not isinstance(value, Decimal) else value
        except (InvalidOperation, TypeError, ValueError):
            raise ValueFormatError(f"{value!r} is not a number") from None
        if isinstance(value, float):
            raise ValueFormatError("floats are not accepted: pass int, Decimal or str")
        if not exact.is_finite():
            raise ValueFormatError(f"{value!r} is not finite")
        try:
            units = exact.scaleb(self.decimals)
            whole = units == units.to_integral_value()
        except DecimalException:  # an exponent beyond the decimal context (1e999999)
            raise ValueFormatError(f"{value} does not fit {self.spec}") from None
        if not whole:
            raise ValueFormatError(f"{value} has more than {self.decimals} decimals ({self.spec})")
        return int(units)

    def encode(self, value: int | Decimal | str) -> bytes:
        units = self.scaled(value)
        if units < 0 and not self.signed:
            raise ValueFormatError(f"{value} is negative but {self.spec} is unsigned")
        if abs(units) > self._limit:
            raise ValueFormatError(f"{value} does not fit {self.spec}")
        raw = bytearray(_bcd_bytes(f"{abs(units):0{self.digits}d}"))
        if units < 0:
            raw[-1] |= 0x80
        return bytes(raw)


@dataclass(frozen=True, slots=True)
class PartialTime:
    """A recurring time without a year, e.g. a settlement date ``MMDDhh`` or day ``DDhh``."""

    month: int | None = None
    day: int | None = None
    hour: int | None = None
    minute: int | None = None


_TIME_FIELDS = {"YY": (0, 99), "MM": (1, 12), "DD": (1, 31), "WW": (0, 6), "hh": (0, 23), "mm": (0, 59), "ss": (0, 59)}
_DATETIME_PATTERNS = {"YYMMDDhhmmss", "YYMMDDhhmm", "YYMMDDhh"}
_DATE_PATTERNS = {"YYMMDD", "YYMMDDWW"}
_CLOCK_PATTERNS = {"hhmmss", "hhmm"}


class DateTime(ValueFormat):
    """A BCD date/time written in reading order (``YYMMDDhhmm``) and sent reversed.

    All-zero bytes decode to ``None`` (an unset time). Years are 2000 + YY. In a pattern
    without a year that is not a clock time (``MMDDhh``, ``DDhh``, ...), any field may also be
    99, the "not set" marker SGCC meters write into unused settlement days and ladder settlement
    dates; it is kept as 99 in the :class:`PartialTime` both ways.
    """

    __slots__ = ("fields", "partial", "size", "spec", "tz")

    def __init__(self, spec: str, tz: tzinfo = METER_TZ) -> None:
        fields = [spec[i : i + 2] for i in range(0, len(spec), 2)]
        if not fields or any(f not in _TIME_FIELDS for f in fields):
            raise ValueError(f"unknown date/time format {spec}")
        self.spec = spec
        self.size = len(fields)
        self.fields = fields
        self.tz = tz
        self.partial = "YY" not in fields and spec not in _CLOCK_PATTERNS

    def decode(self, raw: bytes) -> datetime | date | time | PartialTime | None:
        self._check_size(raw)
        if not any(raw) and self.spec not in _CLOCK_PATTERNS:  # all-zero is midnight on a clock
            return None
        text = _bcd_text(raw, self.spec)
        values = {f: int(text[2 * i : 2 * i + 2]) for i, f in enumerate(self.fields)}
        for f, v in values.items():
            if v == 99 and self.partial:
                continue  # "not set"
            lo, hi = _TIME_FIELDS[f]
            if not lo <= v <= hi:
                raise ValueFormatError(f"{f} = {v} is out of range in {self.spec} value {text}")
        try:
            if self.spec in _DATETIME_PATTERNS:
                return datetime(
                    2000 + values["YY"],
                    values["MM"],
                    values["DD"],
                    values["hh"],
                    values.get("mm", 0),
                    values.get("ss", 0),
                    tzinfo=self.tz,
                )
            if self.spec in _DATE_PATTERNS:
                return date(2000 + values["YY"], values["MM"], values["DD"])
            if self.spec in _CLOCK_PATTERNS:
                return time(values["hh"], values["mm"], values.get("ss", 0))
        except ValueError as exc:
            raise ValueFormatError(f"{text} is not a valid {self.spec}: {exc}") from None
        return PartialTime(values.get("MM"), values.get("DD"), values.get("hh"), values.get("mm"))

    def warnings(self, raw: bytes) -> list[str]:
        """A weekday ``WW`` that is not the weekday of the date it comes with (``YYMMDDWW``)."""
        if "WW" not in self.fields or "YY" not in self.fields:
            return []
        value = self.decode(raw)
        if value is None:
            return []
        sent = int(_bcd_text(raw, self.spec)[2 * self.fields.index("WW") :][:2])
        expected = _field_of(value, "WW")
        if sent == expected:
            return []
        day = value.strftime("%A") if isinstance(value, date) else "?"
        return [f"weekday WW = {sent} on the wire, but {value.isoformat()[:10]} is a {day} (WW = {expected})"]

    def encode(self, value: datetime | date | time | PartialTime | None) -> bytes:
        if value is None:
            return bytes(self.size)
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(self.tz)
        parts = []
        for f in self.fields:
            try:
                v = _field_of(value, f)
            except AttributeError:
                raise ValueFormatError(f"{value!r} has no {f} for format {self.spec}") from None
            if v is None:
                raise ValueFormatError(f"{value!r} lacks {f} for format {self.spec}")
            lo, hi = _TIME_FIELDS[f]
            if not lo <= v <= hi and not (v == 99 and self.partial):
                raise ValueFormatError(f"{f} = {v} is out of range for {self.spec}")
            parts.append(f"{v:02d}")
        return _bcd_bytes("".join(parts))


def _field_of(value: Any, f: str) -> int | None:
    if f == "YY":
        year = value.year
        if not 2000 <= year <= 2099:
            raise ValueFormatError(f"year {year} is outside 2000..2099")
        return year - 2000
    if f == "WW":
        return (value.weekday() + 1) % 7  # 0 = Sunday (dlt645.md §3.4)
    name = {"MM": "month", "DD": "day", "hh": "hour", "mm": "minute", "ss": "second"}[f]
    return getattr(value, name)


TOU_ENTRY_PATTERNS: Mapping[str, tuple[str, str, str]] = {
    "MMDDNN": ("month", "day", "table"),
    "hhmmNN": ("hour", "minute", "tariff"),
}
"""The entries of time-of-use tables: a yearly time zone (``MMDDNN``: start date and the day
table that runs from it) and a daily period (``hhmmNN``: start time and its tariff number)."""

_TOU_RANGES = {"month": (1, 12), "day": (1, 31), "hour": (0, 23), "minute": (0, 59), "table": (1, 8), "tariff": (1, 63)}
# table 1..8: at most 8 day tables (DI0 = 01..08 of 0401xxxx/0402xxxx; prepaid.md §1.3,
# SY03A MAXSIDUANTB); tariff 1..63: the tariffs DI1 = 01..3F can count (dlt645.md §3.2).


class TouEntry(ValueFormat):
    """One entry of a time-zone or daily-period table, 3 BCD bytes in reading order, sent reversed.

    ``MMDDNN`` decodes to ``{"month", "day", "table"}`` (a time zone starting on that date,
    running day table NN) and ``hhmmNN`` to ``{"hour", "minute", "tariff"}`` (a period starting
    at that time with tariff NN). The date must exist in a leap year (29 February may start a
    zone). All-zero bytes decode to ``None``: an unused entry, like an unset date/time.
    """

    __slots__ = ("names", "size", "spec")

    def __init__(self, spec: str) -> None:
        if spec not in TOU_ENTRY_PATTERNS:
            raise ValueError(f"unknown time-of-use entry format {spec}")
        self.spec = spec
        self.size = 3
        self.names = TOU_ENTRY_PATTERNS[spec]

    def decode(self, raw: bytes) -> dict[str, int] | None:
        self._check_size(raw)
        if not any(raw):
            return None
        text = _bcd_text(raw, self.spec)
        value = {name: int(text[2 * i : 2 * i + 2]) for i, name in enumerate(self.names)}
        self._check(value, text)
        return value

    def _check(self, value: Mapping[str, int], shown: str) -> None:
        for name, v in value.items():
            lo, hi = _TOU_RANGES[name]
            if not lo <= v <= hi:
                raise ValueFormatError(f"{name} = {v} is out of range {lo}..{hi} in {self.spec} value {shown}")
        if "month" in value:
            try:
                date(2000, value["month"], value["day"])  # a leap year
            except ValueError:
                raise ValueFormatError(f"{value['month']:02d}-{value['day']:02d} is not a date ({self.spec})") from None

    def encode(self, value: Mapping[str, int] | None) -> bytes:
        if value is None:
            return bytes(self.size)
        if not isinstance(value, Mapping):
            raise ValueFormatError(f"a {self.spec} entry needs {', '.join(self.names)}, not {type(value).__name__}")
        if set(value) != set(self.names):
            raise ValueFormatError(f"a {self.spec} entry has exactly the fields {', '.join(self.names)}")
        for name in self.names:
            v = value[name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueFormatError(f"{name} = {v!r} is not an integer")
        self._check(value, repr(dict(value)))
        return _bcd_bytes("".join(f"{value[n]:02d}" for n in self.names))


class Hex(ValueFormat):
    """Opaque bytes as hex digits in reading order (``HEX4``: an operator code)."""

    __slots__ = ("size", "spec")

    def __init__(self, spec: str, size: int) -> None:
        self.spec = spec
        self.size = size

    def decode(self, raw: bytes) -> str:
        self._check_size(raw)
        return raw[::-1].hex().upper()

    def encode(self, value: str) -> bytes:
        try:
            raw = bytes.fromhex(value)[::-1]
        except (TypeError, ValueError):
            raise ValueFormatError(f"{value!r} is not hex") from None
        self._check_size(raw)
        return raw


class Opaque(ValueFormat):
    """Bytes whose layout no source gives (``BYTES``): any length, shown as hex in wire order.

    For records that dlt645.md names without a layout (the event records of §3.7): the bytes
    are kept exactly, in the order the meter sent them (no field is reversed, since no field is
    known), so ``decode(encode(x)) == x`` and ``encode(decode(raw)) == raw`` for any bytes.
    """

    __slots__ = ()
    spec = "BYTES"
    size = None

    def decode(self, raw: bytes) -> str:
        return bytes(raw).hex().upper()

    def encode(self, value: str) -> bytes:
        if not isinstance(value, str):
            raise ValueFormatError(f"{value!r} is not hex text ({self.spec})")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise ValueFormatError(f"{value!r} is not hex bytes ({self.spec})") from None


class Digits(ValueFormat):
    """BCD digits kept as text, leading zeros included (``BCD12``: meter and customer numbers)."""

    __slots__ = ("size", "spec")

    def __init__(self, spec: str, size: int) -> None:
        self.spec = spec
        self.size = size

    def decode(self, raw: bytes) -> str:
        self._check_size(raw)
        return _bcd_text(raw, self.spec)

    def encode(self, value: str) -> bytes:
        digits = isinstance(value, str) and value.isascii() and value.isdigit()
        if not digits or len(value) > 2 * (self.size or 0):
            raise ValueFormatError(f"{value!r} is not at most {2 * (self.size or 0)} digits")
        return _bcd_bytes(value.zfill(2 * (self.size or 0)))


class Ascii(ValueFormat):
    """ASCII text, sent reversed like every multi-byte value and padded with NUL (``ASCII32``)."""

    __slots__ = ("size", "spec")

    def __init__(self, spec: str, size: int) -> None:
        self.spec = spec
        self.size = size

    def decode(self, raw: bytes) -> str:
        self._check_size(raw)
        try:
            return raw[::-1].decode("ascii").strip("\x00 ")
        except UnicodeDecodeError:
            raise ValueFormatError(f"{raw.hex(' ')} is not ASCII") from None

    def encode(self, value: str) -> bytes:
        try:
            text = value.encode("ascii")
        except (AttributeError, UnicodeEncodeError):
            raise ValueFormatError(f"{value!r} is not ASCII text") from None
        if len(text) > (self.size or 0):
            raise ValueFormatError(f"{value!r} is longer than {self.size} bytes")
        return text.rjust(self.size or 0, b"\x00")[::-1]


BAUD_RATES = {0x02: 600, 0x04: 1200, 0x08: 2400, 0x10: 4800, 0x20: 9600, 0x40: 19200}
"""Baud-rate feature word: one bit per speed (FW-A, FW-B; dlt645.md §2.1, 0x17)."""


class Baud(ValueFormat):
    """The baud-rate feature word (``BAUD``): a bitmap with exactly one bit, as bits per second."""

    spec = "BAUD"
    size = 1

    def decode(self, raw: bytes) -> int:
        self._check_size(raw)
        try:
            return BAUD_RATES[raw[0]]
        except KeyError:
            raise ValueFormatError(f"baud feature word {raw[0]:02X} is not one of the defined bits") from None

    def encode(self, value: int) -> bytes:
        for bit, baud in BAUD_RATES.items():
            if baud == value:
                return bytes((bit,))
        raise ValueFormatError(f"{value} bps has no feature-word bit")


@dataclass(frozen=True, slots=True)
class StatusWord:
    """A status word: its raw value and its named bits (bool) and multi-bit fields (int)."""

    raw: int
    fields: Mapping[str, bool | int] = field(compare=False)

    def __getitem__(self, name: str) -> bool | int:
        return self.fields[name]


class Bits(ValueFormat):
    """A status word of named bits (``BITS16:running_status_3``), sent low byte first."""

    __slots__ = ("layout", "size", "spec")

    def __init__(self, spec: str, size: int, layout: Mapping[str, str]) -> None:
        self.spec = spec
        self.size = size
        # layout: "15" -> name, or "9-8" -> name for a multi-bit field.
        parsed = []
        for bits, name in layout.items():
            hi, _, lo = bits.partition("-")
            parsed.append((name, int(lo or hi), int(hi)))
        self.layout = tuple(sorted(parsed, key=lambda p: -p[2]))

    def decode(self, raw: bytes) -> StatusWord:
        self._check_size(raw)
        word = int.from_bytes(raw, "little")
        fields: dict[str, bool | int] = {}
        for name, lo, hi in self.layout:
            v = (word >> lo) & ((1 << (hi - lo + 1)) - 1)
            fields[name] = bool(v) if hi == lo else v
        return StatusWord(word, fields)

    def encode(self, value: StatusWord | int | Mapping[str, bool | int]) -> bytes:
        if isinstance(value, StatusWord):
            word = value.raw
        elif isinstance(value, int):
            word = value
        else:
            word = 0
            known = {name: (lo, hi) for name, lo, hi in self.layout}
            for name, v in value.items():
                if not isinstance(v, (bool, int)):
                    raise ValueFormatError(f"{name} = {v!r} is not an int or bool")
                if name not in known:
                    raise ValueFormatError(f"{name!r} is not a field of {self.spec}")
                lo, hi = known[name]
                if not 0 <= int(v) < (1 << (hi - lo + 1)):
                    raise ValueFormatError(f"{name} = {v} does not fit bits {hi}-{lo}")
                word |= int(v) << lo
        if not 0 <= word < (1 << (8 * (self.size or 0))):
            raise ValueFormatError(f"{word} does not fit {self.size} bytes")
        return word.to_bytes(self.size or 0, "little")


class ListOf(ValueFormat):
    """A block: ``count`` values of one format, or as many as the bytes hold (``count=None``).

    ``limit`` caps a variable block (``count=None``): at most that many values, both ways (a
    time-zone table holds up to 14 zones).
    """

    __slots__ = ("count", "item", "limit", "size", "spec")

    def __init__(self, item: ValueFormat, count: int | None, limit: int | None = None) -> None:
        if item.size is None:
            raise ValueError("a block needs a fixed-size item format")
        if limit is not None and (count is not None or isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValueError("a limit needs a variable count and is an integer")
        self.item = item
        self.count = count
        self.limit = limit
        self.spec = f"{item.spec}*{count if count is not None else 'n'}" + (f"<={limit}" if limit is not None else "")
        self.size = item.size * count if count is not None else None

    def decode(self, raw: bytes) -> list[Any]:
        step = self.item.size or 1
        if self.count is None:
            if len(raw) % step:
                raise ValueFormatError(f"{len(raw)} bytes is not a whole number of {self.item.spec} values")
            if self.limit is not None and len(raw) // step > self.limit:
                raise ValueFormatError(f"{len(raw) // step} values; {self.spec} holds at most {self.limit}")
        else:
            self._check_size(raw)
        return [self.item.decode(raw[i : i + step]) for i in range(0, len(raw), step)]

    def warnings(self, raw: bytes) -> list[str]:
        step = self.item.size or 1
        return [f"[{i // step}] {w}" for i in range(0, len(raw), step) for w in self.item.warnings(raw[i : i + step])]

    def encode(self, value: Sequence[Any]) -> bytes:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueFormatError(f"a block needs a list of values, not {type(value).__name__}")
        if self.count is not None and len(value) != self.count:
            raise ValueFormatError(f"block {self.spec} needs {self.count} values, got {len(value)}")
        if self.limit is not None and len(value) > self.limit:
            raise ValueFormatError(f"block {self.spec} holds at most {self.limit} values, got {len(value)}")
        return b"".join(self.item.encode(v) for v in value)


class Record(ValueFormat):
    """A record of named fields, each a format (or a fixed list of one), e.g. a trip record."""

    __slots__ = ("fields", "size", "spec")

    def __init__(self, fields: Sequence[tuple[str, ValueFormat]]) -> None:
        self.fields = tuple(fields)
        sizes = [f.size for _, f in self.fields]
        self.size = None if None in sizes else sum(s for s in sizes if s is not None)
        self.spec = "{" + ", ".join(f"{n}: {f.spec}" for n, f in self.fields) + "}"

    def decode(self, raw: bytes) -> dict[str, Any]:
        self._check_size(raw)
        out: dict[str, Any] = {}
        pos = 0
        for name, fmt in self.fields:
            size = fmt.size if fmt.size is not None else len(raw) - pos
            out[name] = fmt.decode(raw[pos : pos + size])
            pos += size
        return out

    def warnings(self, raw: bytes) -> list[str]:
        found: list[str] = []
        pos = 0
        for name, fmt in self.fields:
            size = fmt.size if fmt.size is not None else len(raw) - pos
            found += [f"{name}: {w}" for w in fmt.warnings(raw[pos : pos + size])]
            pos += size
        return found

    def encode(self, value: Mapping[str, Any]) -> bytes:
        if not isinstance(value, Mapping):
            raise ValueFormatError(f"a record needs a mapping of fields, not {type(value).__name__}")
        missing = [n for n, _ in self.fields if n not in value]
        if missing:
            raise ValueFormatError(f"record lacks field(s) {', '.join(missing)}")
        return b"".join(fmt.encode(value[name]) for name, fmt in self.fields)


GROUP_SEPARATOR = 0xAA
"""Byte between the groups of a whole freeze record (dlt645.md §3.6): never a BCD byte."""


class Groups(ValueFormat):
    """A whole freeze record (DI1 = FF): its groups in DI1 order, each followed by one ``AA``.

    dlt645.md §3.6: "FF = whole record with AA separators between groups (FW-B)". FW-B's
    ``ReadFreezedRec`` ends every group with ``AA``, the last one included, and sends a group
    that the freeze mode word leaves out (or that a single-phase meter lacks: the reactive and
    demand groups) as nothing but its ``AA``. ``AA`` cannot occur inside BCD data (its digits
    are not decimal, nor is it a signed BCD top byte), so the split is unambiguous.

    Decodes to a dict of the groups that carry data; a group sent empty is left out of the dict
    (an all-zero time stays in, as None). Accepts the record with or without the final ``AA``
    and encodes FW-B's form (every group followed by ``AA``).
    """

    __slots__ = ("groups", "size", "spec")

    def __init__(self, groups: Sequence[tuple[str, ValueFormat]]) -> None:
        self.groups = tuple(groups)
        if not self.groups:
            raise ValueError("a grouped record needs at least one group")
        self.size = None
        self.spec = "AA{" + ", ".join(f"{n}: {f.spec}" for n, f in self.groups) + "}"

    def decode(self, raw: bytes) -> dict[str, Any]:
        parts = bytes(raw).split(bytes((GROUP_SEPARATOR,)))
        n = len(self.groups)
        if len(parts) == n + 1 and parts[-1] == b"":
            parts.pop()  # FW-B: the last group is followed by AA too
        if len(parts) != n:
            raise ValueFormatError(f"{len(parts)} AA-separated groups, this record has {n}")
        return {name: fmt.decode(part) for (name, fmt), part in zip(self.groups, parts, strict=True) if part}

    def warnings(self, raw: bytes) -> list[str]:
        parts = bytes(raw).split(bytes((GROUP_SEPARATOR,)))
        found: list[str] = []
        for (name, fmt), part in zip(self.groups, parts, strict=False):
            if part:
                found += [f"{name}: {w}" for w in fmt.warnings(part)]
        return found

    def encode(self, value: Mapping[str, Any]) -> bytes:
        if not isinstance(value, Mapping):
            raise ValueFormatError(f"a grouped record needs a mapping of groups, not {type(value).__name__}")
        names = [n for n, _ in self.groups]
        unknown = [str(k) for k in value if k not in names]
        if unknown:
            raise ValueFormatError(f"unknown group(s) {', '.join(unknown)}; groups are {', '.join(names)}")
        out = bytearray()
        for name, fmt in self.groups:
            if name in value:
                part = fmt.encode(value[name])
                if not part:
                    raise ValueFormatError(f"group {name} encodes to no bytes: leave it out instead")
                if GROUP_SEPARATOR in part:
                    raise ValueFormatError(f"group {name} contains the separator byte AA")
                out += part
            out.append(GROUP_SEPARATOR)
        return bytes(out)


_NUMBER = re.compile(r"^[XN]+(\.X+)?$")
_SIZED = re.compile(r"^(HEX|BCD|ASCII)(\d+)$")


def parse_format(
    spec: str, signed: bool = False, status_words: Mapping[str, Mapping[str, str]] | None = None
) -> ValueFormat:
    """The format named by ``spec`` (``XXXXXX.XX``, ``YYMMDDhhmm``, ``HEX4``, ``BYTES``, ``BITS16:name``...)."""
    if _NUMBER.match(spec):
        return Number(spec, signed)
    if spec == Opaque.spec:
        return Opaque()
    if spec == "BAUD":
        return Baud()
    m = _SIZED.match(spec)
    if m:
        kind, n = m.group(1), int(m.group(2))
        if kind == "HEX":
            return Hex(spec, n)
        if kind == "BCD":
            return Digits(spec, n // 2)
        return Ascii(spec, n)
    if spec.startswith("BITS"):
        width, _, name = spec[4:].partition(":")
        layout = (status_words or {}).get(name)
        if layout is None:
            raise ValueError(f"status word layout {name!r} is not defined")
        return Bits(spec, int(width) // 8, layout)
    if spec in TOU_ENTRY_PATTERNS:
        return TouEntry(spec)
    return DateTime(spec)
