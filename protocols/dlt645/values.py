"""Values typed by a person: the text a user gives for a data identifier, as a typed value.

One parser for every value format of the DI tables (``meterlink encode write``, ``meterlink
write``), driven by the item's :class:`~.formats.ValueFormat`:

* numbers: ``20.00``, ``-1.5`` (exact: parsed as Decimal, never float);
* date/times: ISO 8601 for formats with a year (``2024-03-15T12:30``, ``2024-03-15``), a naive
  time is the meter's zone; clock times ``12:00:00`` / ``12:00``; year-less dates and times
  (``MMDDhh``, ``DDhh``) as a JSON object ``{"day": 1, "hour": 0}``; every date/time format
  also takes its compact digit form in reading order (``0100`` for ``DDhh`` 01 00, ``1200``
  for ``hhmm``); ``null`` is "not set" (all zeros) except for clock times;
* status words: an integer (``656``, ``0x0290``) or a JSON object of named fields;
* time-of-use table entries: ``MMDDNN`` as ``{"month": 7, "day": 1, "table": 2}`` and
  ``hhmmNN`` as ``{"hour": 8, "minute": 0, "tariff": 2}``, or their 6 digits in reading order
  (``070102``); ``null`` is an unused (all-zero) entry;
* blocks and records (ladder tables, trip records): JSON lists and objects whose members
  follow the same rules (numbers may be JSON numbers or strings); a whole freeze record takes
  an object of the groups it carries (a group left out is sent empty);
* hex (``HEXn`` and the opaque ``BYTES``), BCD digits and ASCII: the text itself.

What ``meterlink decode`` prints as ``value`` is accepted back (ISO times, objects for
year-less dates, ``{"raw": ..., ...}`` for status words), so decode → parse → encode gives the
same bytes. Values finer than the format (seconds for ``YYMMDDhhmm``) are refused rather than
dropped. The result is checked by encoding it: whatever :func:`parse_value` returns encodes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import ValueFormatError
from .formats import (
    _CLOCK_PATTERNS,
    _DATE_PATTERNS,
    _DATETIME_PATTERNS,
    Ascii,
    Baud,
    Bits,
    DateTime,
    Digits,
    Groups,
    Hex,
    ListOf,
    Number,
    Opaque,
    PartialTime,
    Record,
    TouEntry,
    ValueFormat,
    _bcd_bytes,
)

_PARTIAL_NAMES = {"MM": "month", "DD": "day", "hh": "hour", "mm": "minute"}
_FINER = {"YYMMDDhh": ("minute", "second"), "YYMMDDhhmm": ("second",), "YYMMDDhhmmss": (), "hhmm": ("second",)}
_INT = re.compile(r"[+-]?(0[xX][0-9A-Fa-f]+|[0-9]+)")


def parse_value(fmt: ValueFormat, text: str) -> Any:
    """The value ``text`` stands for in format ``fmt``, ready for ``fmt.encode``.

    Raises :class:`~.errors.ValueFormatError` (a ``Dlt645Error``) when ``text`` is not a value
    of ``fmt`` or does not fit it.
    """
    if not isinstance(text, str):
        raise ValueFormatError(f"a value is given as text, not {type(text).__name__}")
    value = _from_text(fmt, text)
    fmt.encode(value)  # refuses what does not fit (range, length, count)
    return value


def value_from_json(fmt: ValueFormat, obj: Any) -> Any:
    """The typed value of a decoded JSON document ``obj`` in format ``fmt`` (see the module doc).

    JSON numbers should be parsed as Decimal (``json.loads(..., parse_float=Decimal)``);
    floats are refused. The result is not checked against ranges: ``fmt.encode`` does that.
    """
    if isinstance(obj, float):
        raise ValueFormatError(f"{obj!r}: floats are not accepted (parse JSON with parse_float=Decimal)")
    if isinstance(fmt, Number):
        if isinstance(obj, bool) or not isinstance(obj, (int, Decimal, str)):
            raise ValueFormatError(f"{_show(obj)} is not a number ({fmt.spec})")
        return _number(obj) if isinstance(obj, str) else obj
    if isinstance(fmt, DateTime):
        return _datetime_json(fmt, obj)
    if isinstance(fmt, (Hex, Opaque)):
        if not isinstance(obj, str):
            raise ValueFormatError(f"{_show(obj)} is not hex text ({fmt.spec})")
        return re.sub(r"\s", "", obj)
    if isinstance(fmt, Digits):
        if isinstance(obj, int) and not isinstance(obj, bool) and obj >= 0:
            return str(obj)
        if not isinstance(obj, str):
            raise ValueFormatError(f"{_show(obj)} is not a string of digits ({fmt.spec})")
        return obj
    if isinstance(fmt, Ascii):
        if not isinstance(obj, str):
            raise ValueFormatError(f"{_show(obj)} is not text ({fmt.spec})")
        return obj
    if isinstance(fmt, Baud):
        return _int(obj, f"{_show(obj)} is not a baud rate in bits per second")
    if isinstance(fmt, Bits):
        return _bits_json(fmt, obj)
    if isinstance(fmt, TouEntry):
        return _tou_json(fmt, obj)
    if isinstance(fmt, ListOf):
        if not isinstance(obj, list):
            raise ValueFormatError(f"{fmt.spec} needs a JSON list, not {_show(obj)}")
        return [_at(f"[{i}]", fmt.item, v) for i, v in enumerate(obj)]
    if isinstance(fmt, Record):
        if not isinstance(obj, Mapping):
            raise ValueFormatError(f"a record needs a JSON object with {_names(fmt)}, not {_show(obj)}")
        names = [n for n, _ in fmt.fields]
        unknown = [k for k in obj if k not in names]
        if unknown:
            raise ValueFormatError(f"unknown record field(s) {', '.join(map(str, unknown))}; fields are {_names(fmt)}")
        missing = [n for n in names if n not in obj]
        if missing:
            raise ValueFormatError(f"record lacks field(s) {', '.join(missing)}")
        return {name: _at(name, f, obj[name]) for name, f in fmt.fields}
    if isinstance(fmt, Groups):
        names = [n for n, _ in fmt.groups]
        if not isinstance(obj, Mapping):
            raise ValueFormatError(f"a whole record needs a JSON object of its groups ({', '.join(names)})")
        unknown = [str(k) for k in obj if k not in names]
        if unknown:
            raise ValueFormatError(f"unknown group(s) {', '.join(unknown)}; groups are {', '.join(names)}")
        return {name: _at(name, f, obj[name]) for name, f in fmt.groups if name in obj}
    raise ValueFormatError(f"no text form for format {fmt.spec}")


# --- helpers -----------------------------------------------------------------------------------


def _from_text(fmt: ValueFormat, text: str) -> Any:
    if isinstance(fmt, Ascii):
        return text  # spaces are part of the text
    stripped = text.strip()
    if isinstance(fmt, (Hex, Opaque)):
        return re.sub(r"\s", "", stripped)
    if isinstance(fmt, Digits):
        return stripped
    if stripped[:1] in ("{", "[", '"') or stripped == "null":
        return value_from_json(fmt, _json(stripped))
    if isinstance(fmt, Number):
        return _number(stripped)
    if isinstance(fmt, DateTime):
        return _datetime_text(fmt, stripped)
    if isinstance(fmt, (Baud, Bits)):
        return _int(stripped, f"{stripped!r} is not an integer ({fmt.spec})")
    if isinstance(fmt, TouEntry):
        return _tou_json(fmt, stripped)
    raise ValueFormatError(f"{fmt.spec} needs a JSON value, e.g. {_example(fmt)}")


def _json(text: str) -> Any:
    def no_constant(name: str) -> Any:
        raise ValueFormatError(f"{name} is not a value")

    try:
        return json.loads(text, parse_float=Decimal, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise ValueFormatError(f"not valid JSON: {exc}") from None


def _at(where: str, fmt: ValueFormat, obj: Any) -> Any:
    try:
        return value_from_json(fmt, obj)
    except ValueFormatError as exc:
        raise ValueFormatError(f"{where}: {exc}") from None


def _show(obj: Any) -> str:
    try:
        return json.dumps(obj, default=str)[:60]
    except (TypeError, ValueError):
        return repr(obj)[:60]


def _names(fmt: Record) -> str:
    return ", ".join(n for n, _ in fmt.fields)


def _number(text: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueFormatError(f"{text!r} is not a number") from None
    if not value.is_finite():
        raise ValueFormatError(f"{text!r} is not a finite number")
    return value


def _int(obj: Any, message: str) -> int:
    if isinstance(obj, int) and not isinstance(obj, bool):
        return obj
    if isinstance(obj, str) and _INT.fullmatch(obj.strip()):
        return int(obj.strip(), 0) if "x" in obj.lower() else int(obj.strip())
    raise ValueFormatError(message)


def _example(fmt: ValueFormat) -> str:
    if isinstance(fmt, DateTime):
        if fmt.partial:
            parts = {_PARTIAL_NAMES.get(f, f): 1 for f in fmt.fields}
            return f"{json.dumps(parts)} or {2 * fmt.size} digits {fmt.spec}"
        if fmt.spec in _CLOCK_PATTERNS:
            return "12:00:00" if fmt.spec == "hhmmss" else "12:00"
        if fmt.spec in _DATE_PATTERNS:
            return "2024-03-15"
        return "2024-03-15T12:30:00"
    if isinstance(fmt, Record):
        return "{" + ", ".join(f'"{n}": ...' for n, _ in fmt.fields) + "}"
    if isinstance(fmt, Groups):
        return "{" + ", ".join(f'"{n}": ...' for n, _ in fmt.groups) + "}"
    if isinstance(fmt, TouEntry):
        return json.dumps(dict.fromkeys(fmt.names, 1))
    if isinstance(fmt, ListOf):
        if isinstance(fmt.item, TouEntry):
            return f"[{_example(fmt.item)}, ...]"
        return f"[... {fmt.count if fmt.count is not None else 'n'} values ...]"
    return fmt.spec


def _datetime_text(fmt: DateTime, text: str) -> Any:
    if text.isascii() and text.isdigit() and len(text) == 2 * fmt.size:
        return _compact(fmt, text)
    if fmt.partial:
        raise ValueFormatError(f"{text!r} is not a {fmt.spec} value: give {_example(fmt)}")
    try:
        if fmt.spec in _DATETIME_PATTERNS:
            value: Any = datetime.fromisoformat(text)
            if value.tzinfo is None:
                value = value.replace(tzinfo=fmt.tz)
        elif fmt.spec in _DATE_PATTERNS:
            value = date.fromisoformat(text)
        else:
            value = time.fromisoformat(text)
            if value.tzinfo is not None:
                raise ValueFormatError(f"{text!r}: a meter clock time has no zone")
    except ValueError as exc:
        if isinstance(exc, ValueFormatError):
            raise
        raise ValueFormatError(f"{text!r} is not a {fmt.spec} value: give e.g. {_example(fmt)}") from None
    finer = [a for a in (*_FINER.get(fmt.spec, ()), "microsecond") if getattr(value, a, 0)]
    if finer:
        raise ValueFormatError(f"{text!r} has {finer[0]}s, which {fmt.spec} cannot hold")
    return value


def _compact(fmt: DateTime, digits: str) -> Any:
    raw = _bcd_bytes(digits)
    value = fmt.decode(raw)  # range checks, leap days; all zeros is None ("not set")
    problems = fmt.warnings(raw)
    if problems:
        raise ValueFormatError(f"{digits}: {problems[0]}")
    return value


def _datetime_json(fmt: DateTime, obj: Any) -> Any:
    if obj is None:
        if fmt.spec in _CLOCK_PATTERNS:
            raise ValueFormatError(f"a clock time ({fmt.spec}) has no 'not set' value: give e.g. {_example(fmt)}")
        return None
    if isinstance(obj, str):
        return _datetime_text(fmt, obj.strip())
    if isinstance(obj, Mapping) and fmt.partial:
        allowed = {_PARTIAL_NAMES[f]: f for f in fmt.fields if f in _PARTIAL_NAMES}
        unknown = [k for k in obj if k not in allowed]
        if unknown or len(allowed) != len(fmt.fields):
            raise ValueFormatError(f"{_show(obj)}: {fmt.spec} takes the fields {', '.join(allowed)}")
        missing = [k for k in allowed if k not in obj]
        if missing:
            raise ValueFormatError(f"{_show(obj)} lacks {', '.join(missing)} for {fmt.spec}")
        fields: dict[str, int] = {}
        for key, v in obj.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueFormatError(f"{key} = {_show(v)} is not an integer")
            fields[key] = v
        return PartialTime(**fields)
    raise ValueFormatError(f"{_show(obj)} is not a {fmt.spec} value: give {_example(fmt)}")


def _tou_json(fmt: TouEntry, obj: Any) -> dict[str, int] | None:
    """A time-of-use entry from JSON: null, an object of its fields, or its 6 digits."""
    if obj is None:
        return None
    if isinstance(obj, str):
        digits = obj.strip()
        if not (digits.isascii() and digits.isdigit() and len(digits) == 2 * (fmt.size or 0)):
            raise ValueFormatError(f"{obj!r} is not a {fmt.spec} value: give {_example(fmt)} or 6 digits")
        return fmt.decode(_bcd_bytes(digits))
    if not isinstance(obj, Mapping):
        raise ValueFormatError(f"{_show(obj)} is not a {fmt.spec} value: give {_example(fmt)}")
    unknown = [str(k) for k in obj if k not in fmt.names]
    missing = [n for n in fmt.names if n not in obj]
    if unknown or missing:
        raise ValueFormatError(f"{_show(obj)}: {fmt.spec} takes exactly the fields {', '.join(fmt.names)}")
    out: dict[str, int] = {}
    for name in fmt.names:
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueFormatError(f"{name} = {_show(v)} is not an integer")
        out[name] = v
    return out


def _bits_json(fmt: Bits, obj: Any) -> Any:
    if not isinstance(obj, Mapping):
        return _int(obj, f"{_show(obj)} is not a status word: give an integer or an object of fields")
    if "raw" not in obj:
        return dict(obj)
    word = _int(obj["raw"], f"raw = {_show(obj['raw'])} is not an integer")
    if not 0 <= word < 1 << (8 * (fmt.size or 0)):
        raise ValueFormatError(f"raw = {word} does not fit {fmt.size} bytes")
    decoded = fmt.decode(word.to_bytes(fmt.size or 0, "little")).fields
    for name, v in obj.items():
        if name == "raw":
            continue
        if name not in decoded:
            raise ValueFormatError(f"{name!r} is not a field of {fmt.spec}")
        if isinstance(v, (bool, int)) and int(v) == int(decoded[name]):
            continue
        raise ValueFormatError(f"field {name} = {_show(v)} disagrees with raw = {word}")
    return word


__all__ = ["parse_value", "value_from_json"]
