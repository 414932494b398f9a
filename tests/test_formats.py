"""Value formats: BCD numbers, dates and times, hex, digits, ASCII, baud, status words, blocks, records."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocols.dlt645.errors import Dlt645Error, ValueFormatError
from protocols.dlt645.formats import (
    BAUD_RATES,
    METER_TZ,
    Ascii,
    Baud,
    Bits,
    DateTime,
    Digits,
    Hex,
    ListOf,
    Number,
    PartialTime,
    Record,
    StatusWord,
    parse_format,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bcd(n: int) -> int:
    return n // 10 * 16 + n % 10


# --- Number -------------------------------------------------------------------------------

# (spec, digits in the notation, decimals, bytes)
NUMBER_SPECS = [
    ("XXXXXX.XX", 8, 2, 4),
    ("XXX.X", 4, 1, 2),
    ("XX.XX", 4, 2, 2),
    ("X.XXX", 4, 3, 2),
    ("XXX.XXX", 6, 3, 3),
    ("XX.XXXX", 6, 4, 3),
    ("XXXX.XXXX", 8, 4, 4),
    ("NN", 2, 0, 1),
    ("NNNN", 4, 0, 2),
    ("NNNNNN", 6, 0, 3),
    ("XXX", 3, 0, 2),  # 1997 voltage: 3 digits in 2 bytes, a leading zero digit on the wire
    # also in the DI tables
    ("XXXX", 4, 0, 2),
    ("XXXXXX", 6, 0, 3),
    ("XXXXXXXX", 8, 0, 4),
]
SIGNS = [False, True]
NUMBER_CASES = [(spec, n, d, size, signed) for spec, n, d, size in NUMBER_SPECS for signed in SIGNS]
NUMBER_IDS = [f"{c[0]}{'-signed' if c[4] else ''}" for c in NUMBER_CASES]


def number_limit(n: int, signed: bool) -> int:
    """Largest magnitude in units of the last digit: n digits; signed gives up the top bit (§3.1)."""
    if signed and n % 2 == 0:
        return 8 * 10 ** (n - 1) - 1  # the top digit shares its nibble with the sign bit: at most 7
    return 10**n - 1  # odd n: the sign bit lives in the leading (padding) zero digit


@pytest.mark.parametrize(("spec", "n", "d", "size", "signed"), NUMBER_CASES, ids=NUMBER_IDS)
def test_number_shape(spec, n, d, size, signed):
    fmt = Number(spec, signed)
    assert fmt.size == size and fmt.decimals == d
    assert parse_format(spec, signed).size == size
    assert isinstance(parse_format(spec, signed), Number)


@pytest.mark.parametrize(("spec", "n", "d", "size", "signed"), NUMBER_CASES, ids=NUMBER_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_number_value_round_trip(spec, n, d, size, signed, data):
    fmt = Number(spec, signed)
    limit = number_limit(n, signed)
    units = data.draw(st.integers(-limit if signed else 0, limit), label="units")
    value = Decimal(units).scaleb(-d) if d else units
    raw = fmt.encode(value)
    assert len(raw) == size
    decoded = fmt.decode(raw)
    assert decoded == value
    if d:
        assert isinstance(decoded, Decimal) and decoded.as_tuple().exponent == -d
    else:
        assert type(decoded) is int
    # the same value as int / str / Decimal encodes the same way
    assert fmt.encode(str(value)) == raw
    assert fmt.encode(Decimal(str(value))) == raw
    # sign rule (§3.1): negative = positive with the top bit of the top (last on the wire) byte set
    if units < 0:
        positive = fmt.encode(-value)
        assert raw[-1] & 0x80 and not positive[-1] & 0x80
        assert raw[:-1] + bytes((raw[-1] & 0x7F,)) == positive


@pytest.mark.parametrize(("spec", "n", "d", "size", "signed"), NUMBER_CASES, ids=NUMBER_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_number_bytes_round_trip(spec, n, d, size, signed, data):
    """Any well-formed BCD value decodes and re-encodes to the same bytes."""
    fmt = Number(spec, signed)
    low = data.draw(st.lists(st.integers(0, 99).map(bcd), min_size=size - 1, max_size=size - 1), label="low")
    top_limit = 9 if n % 2 else (79 if signed else 99)  # odd n: leading digit is 0
    top = bcd(data.draw(st.integers(0, top_limit), label="top"))
    negative = signed and data.draw(st.booleans(), label="negative")
    raw = bytes([*low, top | (0x80 if negative else 0)])
    assume(not (negative and not any(raw[:-1]) and top == 0))  # -0 re-encodes as +0
    assert fmt.encode(fmt.decode(raw)) == raw


@pytest.mark.parametrize(("spec", "n", "d", "size", "signed"), NUMBER_CASES, ids=NUMBER_IDS)
def test_number_out_of_range(spec, n, d, size, signed):
    fmt = Number(spec, signed)
    limit = number_limit(n, signed)
    top = Decimal(limit).scaleb(-d) if d else limit
    step = Decimal(1).scaleb(-d) if d else 1
    assert fmt.decode(fmt.encode(top)) == top
    with pytest.raises(ValueFormatError):
        fmt.encode(top + step)
    if signed:
        assert fmt.decode(fmt.encode(-top)) == -top
        with pytest.raises(ValueFormatError):
            fmt.encode(-top - step)
    else:
        with pytest.raises(ValueFormatError, match="unsigned"):
            fmt.encode(-step)


def test_odd_digit_number_range():
    """Regression: XXX (3 digits, 2 bytes) accepted 1000..9999, writing a 4th digit into the field."""
    fmt = Number("XXX")
    assert fmt.encode(100) == b"\x00\x01"  # V17b: B611 = 0100 V
    assert fmt.encode(999) == b"\x99\x09"
    for value in (1000, 1234, 9999):
        with pytest.raises(ValueFormatError):
            fmt.encode(value)
    signed = Number("XXX", signed=True)
    assert signed.encode(-999) == b"\x99\x89"
    assert signed.decode(b"\x99\x89") == -999


def test_odd_digit_decode_is_symmetric_with_encode():
    """Regression: B611 raw 34 12 decoded to 1234, which encode refuses (3 digits in XXX)."""
    fmt = Number("XXX")
    with pytest.raises(ValueFormatError, match="4 digits"):
        fmt.decode(b"\x34\x12")
    assert fmt.decode(b"\x34\x02") == 234
    signed = Number("XXX", signed=True)
    with pytest.raises(ValueFormatError):
        signed.decode(b"\x34\x92")  # sign bit, then a 1 in the padding digit
    assert signed.decode(b"\x34\x82") == -234


def test_number_sign_bit_examples():
    energy = Number("XXXXXX.XX", signed=True)
    assert energy.encode(Decimal("-0.01")) == b"\x01\x00\x00\x80"
    assert energy.decode(b"\x01\x00\x00\x80") == Decimal("-0.01")
    assert energy.encode(Decimal("-799999.99")) == b"\x99\x99\x99\xf9"
    assert energy.decode(b"\x56\x34\x12\x80") == Decimal("-1234.56")
    # the same bytes unsigned: 0x80 is just the digits 8 and 0
    assert Number("XXXXXX.XX").decode(b"\x56\x34\x12\x80") == Decimal("801234.56")
    power = Number("XX.XXXX", signed=True)
    assert power.decode(b"\x00\x50\x81") == Decimal("-1.5000")
    # negative zero decodes to (minus) zero and re-encodes as +0
    assert energy.decode(b"\x00\x00\x00\x80") == 0
    assert energy.encode(energy.decode(b"\x00\x00\x00\x80")) == bytes(4)


@pytest.mark.parametrize("value", [1.0, 0.5, -2.25, float("nan"), float("inf"), 0.0])
def test_number_rejects_floats(value):
    for spec, *_ in NUMBER_SPECS:
        with pytest.raises(ValueFormatError):
            Number(spec).encode(value)
        with pytest.raises(ValueFormatError):
            Number(spec, signed=True).encode(value)


@pytest.mark.parametrize("value", ["abc", "", "1,5", "NaN", "Infinity", "-inf", None, b"12", [1], "12.345"])
def test_number_rejects_non_numbers(value):
    with pytest.raises(ValueFormatError):
        Number("XX.XX", signed=True).encode(value)


def test_number_too_many_decimals():
    fmt = Number("XXX.X")
    assert fmt.encode("1.50") == fmt.encode("1.5") == fmt.encode(Decimal("1.5000"))
    with pytest.raises(ValueFormatError, match="decimals"):
        fmt.encode("1.55")
    with pytest.raises(ValueFormatError, match="decimals"):
        Number("NN").encode(Decimal("1.5"))


def test_number_huge_exponents():
    """Regression: '1e999999' raised decimal.Overflow, not ValueFormatError."""
    for value in ("1e999999", "-1e999999", Decimal("9E+999999"), "1e-999999", "1E+100"):
        with pytest.raises(ValueFormatError):
            Number("XX.XX", signed=True).encode(value)


@FAST
@given(st.text(max_size=12))
def test_number_encode_arbitrary_text(text):
    try:
        raw = Number("XXXXXX.XX", signed=True).encode(text)
    except ValueFormatError:
        return
    assert Number("XXXXXX.XX", signed=True).decode(raw) == Decimal(text)


@pytest.mark.parametrize(("spec", "n", "d", "size", "signed"), NUMBER_CASES, ids=NUMBER_IDS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_number_decode_arbitrary_bytes(spec, n, d, size, signed, data):
    fmt = Number(spec, signed)
    raw = data.draw(st.binary(min_size=size, max_size=size), label="raw")
    plain = raw[:-1] + bytes((raw[-1] & 0x7F,)) if signed else raw
    valid = all(b >> 4 <= 9 and b & 0xF <= 9 for b in plain)
    padded = n % 2 == 1  # odd digit count: the top nibble is a padding zero
    if valid and padded and plain[-1] >> 4:
        with pytest.raises(ValueFormatError, match="digits"):
            fmt.decode(raw)
    elif valid:
        value = fmt.decode(raw)
        assert abs(value) == Number(spec).decode(plain)
        assert fmt.decode(fmt.encode(value)) == value  # whatever decodes re-encodes
    else:
        with pytest.raises(ValueFormatError, match="not BCD"):
            fmt.decode(raw)


def test_number_invalid_bcd_and_size():
    with pytest.raises(ValueFormatError, match="not BCD"):
        Number("XXXXXX.XX").decode(b"\x0a\x00\x00\x00")
    with pytest.raises(ValueFormatError, match="not BCD"):
        Number("XX.XX", signed=True).decode(b"\x00\x8a")  # sign bit stripped, 0A left
    with pytest.raises(ValueFormatError, match="not BCD"):
        Number("NN").decode(b"\xf0")
    for raw in (b"", b"\x00", b"\x00\x00\x00", b"\x00" * 5):
        with pytest.raises(ValueFormatError, match="needs 4 bytes"):
            Number("XXXXXX.XX").decode(raw)


# --- DateTime -----------------------------------------------------------------------------

_dt = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59))
_dates = st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31))


@FAST
@given(_dt.map(lambda d: d.replace(microsecond=0)))
def test_datetime_round_trip_seconds(value):
    fmt = DateTime("YYMMDDhhmmss")
    aware = value.replace(tzinfo=METER_TZ)
    raw = fmt.encode(aware)
    assert len(raw) == 6
    assert raw == bytes(bcd(int(value.strftime(f))) for f in ("%S", "%M", "%H", "%d", "%m", "%y"))
    assert fmt.decode(raw) == aware
    assert fmt.decode(raw).tzinfo is METER_TZ
    assert fmt.encode(value) == raw  # a naive time is meter time


@FAST
@given(_dt)
def test_datetime_round_trip_minutes_and_hours(value):
    minutes = DateTime("YYMMDDhhmm")
    v = value.replace(second=0, microsecond=0, tzinfo=METER_TZ)
    assert minutes.decode(minutes.encode(v)) == v
    hours = DateTime("YYMMDDhh")
    v = v.replace(minute=0)
    assert hours.decode(hours.encode(v)) == v


@FAST
@given(_dt.map(lambda d: d.replace(microsecond=0)), st.integers(-14, 14))
def test_datetime_other_zones_are_converted(value, offset):
    fmt = DateTime("YYMMDDhhmmss")
    zoned = value.replace(tzinfo=timezone(timedelta(hours=offset)))
    meter = zoned.astimezone(METER_TZ)
    assume(2000 <= meter.year <= 2099)
    assert fmt.decode(fmt.encode(zoned)) == zoned  # the same instant
    assert fmt.encode(zoned) == fmt.encode(meter.replace(tzinfo=None))


@FAST
@given(_dates)
def test_date_round_trip(value):
    assert DateTime("YYMMDD").decode(DateTime("YYMMDD").encode(value)) == value
    ww = DateTime("YYMMDDWW")
    raw = ww.encode(value)
    assert raw[0] == (value.weekday() + 1) % 7  # WW first on the wire, 0 = Sunday
    assert ww.decode(raw) == value


def test_weekday_encoding():
    fmt = DateTime("YYMMDDWW")
    assert fmt.encode(date(2024, 1, 7)) == bytes.fromhex("00 07 01 24")  # Sunday
    assert fmt.encode(date(2024, 1, 8)) == bytes.fromhex("01 08 01 24")  # Monday
    assert fmt.encode(datetime(2024, 1, 13, 12, 0)) == bytes.fromhex("06 13 01 24")  # Saturday


@FAST
@given(st.times().map(lambda t: t.replace(microsecond=0)))
def test_clock_round_trip(value):
    fmt = DateTime("hhmmss")
    assert fmt.decode(fmt.encode(value)) == value
    short = DateTime("hhmm")
    assert short.decode(short.encode(value.replace(second=0))) == value.replace(second=0)


def test_clock_midnight_is_not_unset():
    """Regression: 00:00:00 (all-zero bytes) decoded to None, though it is a valid clock value."""
    assert DateTime("hhmmss").encode(time(0, 0, 0)) == b"\x00\x00\x00"
    assert DateTime("hhmmss").decode(b"\x00\x00\x00") == time(0, 0, 0)
    assert DateTime("hhmm").decode(b"\x00\x00") == time(0, 0)


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ("MMDDhh", PartialTime(month=12, day=31, hour=23)),
        ("MMDDhh", PartialTime(month=1, day=1, hour=0)),
        ("DDhh", PartialTime(day=1, hour=0)),
        ("DDhh", PartialTime(day=28, hour=12)),
        ("MMDD", PartialTime(month=2, day=29)),
        ("MMDDhhmm", PartialTime(month=6, day=15, hour=8, minute=30)),
    ],
)
def test_partial_time_round_trip(spec, value):
    fmt = DateTime(spec)
    assert fmt.decode(fmt.encode(value)) == value


@FAST
@given(st.integers(1, 12), st.integers(1, 31), st.integers(0, 23))
def test_partial_time_property(month, day, hour):
    fmt = DateTime("MMDDhh")
    value = PartialTime(month=month, day=day, hour=hour)
    assert fmt.encode(value) == bytes((bcd(hour), bcd(day), bcd(month)))
    assert fmt.decode(fmt.encode(value)) == value


@pytest.mark.parametrize("spec", ["YYMMDDhhmmss", "YYMMDDhhmm", "YYMMDDhh", "YYMMDD", "YYMMDDWW", "MMDDhh", "DDhh"])
def test_all_zero_is_unset(spec):
    fmt = DateTime(spec)
    assert fmt.decode(bytes(fmt.size)) is None
    assert fmt.encode(None) == bytes(fmt.size)


@pytest.mark.parametrize(
    ("spec", "raw"),
    [
        ("YYMMDDhhmmss", "00 00 00 01 13 24"),  # month 13
        ("YYMMDDhhmmss", "00 00 00 00 01 24"),  # day 0
        ("YYMMDDhhmmss", "00 00 24 01 01 24"),  # hour 24
        ("YYMMDDhhmmss", "60 00 00 01 01 24"),  # second 60
        ("YYMMDDhhmmss", "00 60 00 01 01 24"),  # minute 60
        ("YYMMDDhhmmss", "00 00 00 30 02 24"),  # 30 February
        ("YYMMDDhhmmss", "00 00 00 29 02 23"),  # 29 February of a common year
        ("YYMMDD", "31 04 24"),  # 31 April
        ("YYMMDDWW", "07 01 01 24"),  # weekday 7
        ("hhmmss", "00 00 24"),
        ("YYMMDDhhmmss", "0A 00 00 01 01 24"),  # not BCD
        ("YYMMDD", "01 01 2F"),
        ("MMDDhh", "00 32 01"),  # day 32
    ],
)
def test_datetime_invalid(spec, raw):
    with pytest.raises(ValueFormatError):
        DateTime(spec).decode(bytes.fromhex(raw))


def test_datetime_encode_errors():
    fmt = DateTime("YYMMDDhhmmss")
    for value in (
        datetime(1999, 12, 31, 23, 59),
        datetime(2100, 1, 1),
        date(2024, 1, 1),
        time(1, 2, 3),
        PartialTime(1, 1, 1, 1),
        "2024-01-01",
        0,
    ):
        with pytest.raises(ValueFormatError):
            fmt.encode(value)
    with pytest.raises(ValueFormatError):
        DateTime("MMDDhh").encode(PartialTime(month=13, day=1, hour=0))
    for raw in (b"", bytes(5), bytes(7)):
        with pytest.raises(ValueFormatError, match="needs 6 bytes"):
            fmt.decode(raw)
    with pytest.raises(ValueError):
        DateTime("YYMMDDxx")
    with pytest.raises(ValueError):
        DateTime("")


@pytest.mark.parametrize(
    "spec", ["YYMMDDhhmmss", "YYMMDDhhmm", "YYMMDD", "YYMMDDWW", "hhmmss", "hhmm", "MMDDhh", "DDhh"]
)
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_datetime_decode_arbitrary_bytes(spec, data):
    fmt = DateTime(spec)
    raw = data.draw(st.binary(min_size=fmt.size, max_size=fmt.size))
    try:
        value = fmt.decode(raw)
    except ValueFormatError:
        return
    if value is None:
        return
    if spec != "YYMMDDWW" or not fmt.warnings(raw):
        assert fmt.encode(value) == raw
    else:  # a weekday that does not match the date: decoded, flagged, re-encoded with the right one
        assert fmt.encode(value)[1:] == raw[1:] and fmt.encode(value)[0] != raw[0]


def test_weekday_mismatch_is_flagged_not_dropped():
    fmt = DateTime("YYMMDDWW")
    right = bytes.fromhex("05 15 03 24")  # 2024-03-15 is a Friday: WW = 5
    wrong = bytes.fromhex("03 15 03 24")
    assert fmt.decode(right) == fmt.decode(wrong) == date(2024, 3, 15)
    assert fmt.warnings(right) == []
    [warning] = fmt.warnings(wrong)
    assert "WW = 3" in warning and "Friday" in warning and "WW = 5" in warning
    assert fmt.warnings(bytes(4)) == []  # unset
    assert DateTime("YYMMDDhhmm").warnings(bytes.fromhex("00 12 15 03 24")) == []
    block = ListOf(fmt, 2)
    assert block.warnings(right + wrong) == [f"[1] {warning}"]
    record = Record([("a", fmt), ("b", fmt)])
    assert record.warnings(wrong + right) == [f"a: {warning}"]


# --- Hex, Digits, Ascii -------------------------------------------------------------------


@FAST
@given(st.integers(1, 8).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_hex_round_trip(raw):
    fmt = Hex(f"HEX{len(raw)}", len(raw))
    text = fmt.decode(raw)
    assert text == raw[::-1].hex().upper()
    assert fmt.encode(text) == raw
    assert fmt.encode(text.lower()) == raw


def test_hex_errors():
    fmt = parse_format("HEX4")
    assert isinstance(fmt, Hex) and fmt.size == 4
    assert fmt.encode("12345678") == b"\x78\x56\x34\x12"
    for bad in ("1234567", "123456789A", "zz345678", 12345678, None):
        with pytest.raises(ValueFormatError):
            fmt.encode(bad)
    with pytest.raises(ValueFormatError):
        fmt.decode(b"\x00\x00\x00")


@FAST
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.text("0123456789", min_size=1, max_size=2 * n))))
def test_digits_round_trip(case):
    size, text = case
    fmt = Digits(f"BCD{2 * size}", size)
    raw = fmt.encode(text)
    assert len(raw) == size
    assert fmt.decode(raw) == text.zfill(2 * size)


def test_digits_errors():
    fmt = parse_format("BCD12")
    assert isinstance(fmt, Digits) and fmt.size == 6
    assert fmt.encode("123456789012") == bytes.fromhex("12 90 78 56 34 12")
    assert fmt.decode(bytes.fromhex("12 90 78 56 34 12")) == "123456789012"
    for bad in ("1234567890123", "12345678901A", "", "-1", 123, None, "１２３", "²"):
        with pytest.raises(ValueFormatError):
            fmt.encode(bad)
    with pytest.raises(ValueFormatError, match="not BCD"):
        fmt.decode(bytes.fromhex("1A 00 00 00 00 00"))


_ascii_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=1).flatmap(
    lambda first: st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
        lambda rest: (first + rest).strip()
    )
)


@FAST
@given(_ascii_text)
def test_ascii_round_trip(text):
    fmt = Ascii("ASCII32", 32)
    raw = fmt.encode(text)
    assert len(raw) == 32
    assert raw[: len(text)] == text.encode()[::-1]  # sent reversed, NUL padding at the end
    assert fmt.decode(raw) == text


def test_ascii_errors():
    fmt = parse_format("ASCII4")
    assert isinstance(fmt, Ascii)
    assert fmt.encode("ab") == b"ba\x00\x00"
    with pytest.raises(ValueFormatError):
        fmt.encode("abcde")
    for bad in ("é", None, 12):
        with pytest.raises(ValueFormatError):
            fmt.encode(bad)
    with pytest.raises(ValueFormatError):
        fmt.decode(b"\xff\x00\x00\x00")
    with pytest.raises(ValueFormatError):
        fmt.decode(b"ab")


# --- Baud, Bits -----------------------------------------------------------------------------


@pytest.mark.parametrize(("bit", "baud"), sorted(BAUD_RATES.items()))
def test_baud_round_trip(bit, baud):
    fmt = parse_format("BAUD")
    assert isinstance(fmt, Baud)
    assert fmt.encode(baud) == bytes((bit,))
    assert fmt.decode(bytes((bit,))) == baud


@pytest.mark.parametrize("byte", [b for b in range(256) if b not in BAUD_RATES])
def test_baud_rejects_undefined_words(byte):
    with pytest.raises(ValueFormatError):
        Baud().decode(bytes((byte,)))


def test_baud_rejects_other_rates():
    for rate in (300, 2401, 38400, 0, -1):
        with pytest.raises(ValueFormatError):
            Baud().encode(rate)
    with pytest.raises(ValueFormatError):
        Baud().decode(b"\x08\x08")


LAYOUT = {"15": "top", "9-8": "kind", "4": "relay_open", "2-1": "supply", "0": "flag"}


def test_bits_decode_fields():
    fmt = Bits("BITS16:test", 2, LAYOUT)
    word = fmt.decode(b"\x15\x82")  # 0x8215 = 1000 0010 0001 0101
    assert word.raw == 0x8215
    assert word["top"] is True and word["kind"] == 2 and word["relay_open"] is True
    assert word["supply"] == 2 and word["flag"] is True
    assert fmt.encode(word) == b"\x15\x82"
    assert fmt.encode({"top": True, "kind": 2, "relay_open": True, "supply": 2, "flag": True}) == b"\x15\x82"
    assert fmt.encode({"kind": 3}) == b"\x00\x03"
    assert fmt.encode(0x8215) == b"\x15\x82"


@FAST
@given(st.integers(0, 0xFFFF))
def test_bits_round_trip(word):
    fmt = Bits("BITS16:test", 2, LAYOUT)
    raw = word.to_bytes(2, "little")
    decoded = fmt.decode(raw)
    assert decoded.raw == word
    assert fmt.encode(decoded) == raw
    assert fmt.encode(word) == raw
    assert decoded == StatusWord(word, {})  # equality is by raw value
    covered = 0x8000 | 0x0300 | 0x0010 | 0x0006 | 0x0001
    assert fmt.encode(dict(decoded.fields)) == (word & covered).to_bytes(2, "little")


def test_bits_errors():
    fmt = Bits("BITS16:test", 2, LAYOUT)
    with pytest.raises(ValueFormatError, match="not a field"):
        fmt.encode({"nope": 1})
    with pytest.raises(ValueFormatError, match="does not fit"):
        fmt.encode({"kind": 4})
    with pytest.raises(ValueFormatError, match="does not fit"):
        fmt.encode({"flag": 2})
    with pytest.raises(ValueFormatError):
        fmt.encode(0x10000)
    with pytest.raises(ValueFormatError):
        fmt.encode(-1)
    with pytest.raises(ValueFormatError):
        fmt.decode(b"\x00")
    with pytest.raises(ValueError):
        parse_format("BITS16:undefined")
    word = parse_format("BITS16:x", status_words={"x": LAYOUT})
    assert isinstance(word, Bits) and word.size == 2


# --- ListOf, Record -------------------------------------------------------------------------

_energy = Number("XXXXXX.XX")
_energy_values = st.integers(0, 99999999).map(lambda u: Decimal(u).scaleb(-2))


@FAST
@given(st.lists(_energy_values, max_size=8))
def test_list_of_n_round_trip(values):
    fmt = ListOf(_energy, None)
    assert fmt.size is None and fmt.spec == "XXXXXX.XX*n"
    raw = fmt.encode(values)
    assert len(raw) == 4 * len(values)
    assert fmt.decode(raw) == values


@FAST
@given(st.lists(_energy_values, min_size=5, max_size=5))
def test_list_of_fixed_round_trip(values):
    fmt = ListOf(_energy, 5)
    assert fmt.size == 20
    assert fmt.decode(fmt.encode(values)) == values
    assert fmt.encode(values) == b"".join(_energy.encode(v) for v in values)


def test_list_of_errors():
    with pytest.raises(ValueFormatError, match="whole number"):
        ListOf(_energy, None).decode(bytes(6))
    with pytest.raises(ValueFormatError):
        ListOf(_energy, 5).decode(bytes(16))
    with pytest.raises(ValueFormatError, match="needs 5 values"):
        ListOf(_energy, 5).encode([0] * 4)
    for bad in ("1234", b"\x00", 5, None):
        with pytest.raises(ValueFormatError):
            ListOf(_energy, None).encode(bad)
    with pytest.raises(ValueError):
        ListOf(ListOf(_energy, None), None)
    with pytest.raises(ValueFormatError):
        ListOf(_energy, 2).encode([0, 1.5])


TRIP = Record(
    [
        ("time", DateTime("YYMMDDhhmmss")),
        ("operator", Hex("HEX4", 4)),
        ("forward", Number("XXXXXX.XX")),
        ("q", ListOf(Number("XXXXXX.XX"), 4)),
    ]
)


@FAST
@given(
    _dt.map(lambda d: d.replace(microsecond=0, tzinfo=METER_TZ)),
    st.binary(min_size=4, max_size=4).map(lambda b: b.hex().upper()),
    _energy_values,
    st.lists(_energy_values, min_size=4, max_size=4),
)
def test_record_round_trip(when, operator, forward, q):
    assert TRIP.size == 6 + 4 + 4 + 16
    value = {"time": when, "operator": operator, "forward": forward, "q": q}
    raw = TRIP.encode(value)
    assert len(raw) == TRIP.size
    assert TRIP.decode(raw) == value
    assert raw[10:14] == Number("XXXXXX.XX").encode(forward)


def test_record_errors():
    value = {"time": None, "operator": "00000000", "forward": 0, "q": [0, 0, 0, 0]}
    assert TRIP.decode(TRIP.encode(value)) == {**value, "forward": Decimal("0.00"), "q": [Decimal("0.00")] * 4}
    with pytest.raises(ValueFormatError, match="lacks"):
        TRIP.encode({"time": None})
    with pytest.raises(ValueFormatError):
        TRIP.encode([None, "00000000", 0, [0, 0, 0, 0]])
    with pytest.raises(ValueFormatError):
        TRIP.decode(bytes(29))
    with pytest.raises(ValueFormatError):
        TRIP.encode({**value, "forward": -1})


@FAST
@given(st.binary(min_size=30, max_size=30))
def test_record_decode_arbitrary_bytes(raw):
    try:
        TRIP.decode(raw)
    except Dlt645Error:
        pass


def test_parse_format_dispatch():
    assert isinstance(parse_format("XXXXXX.XX"), Number)
    assert parse_format("XX.XXXX", signed=True).signed
    assert isinstance(parse_format("NNNN"), Number)
    assert isinstance(parse_format("YYMMDDhhmm"), DateTime)
    assert isinstance(parse_format("BAUD"), Baud)
    assert isinstance(parse_format("HEX4"), Hex)
    assert isinstance(parse_format("BCD12"), Digits)
    assert isinstance(parse_format("ASCII32"), Ascii)
    with pytest.raises(ValueError):
        parse_format("nonsense")
