"""``parse_value``: the text a user gives for a DI, per the DI's format (``encode write``, ``write``)."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dlt645 import METER_TZ, Edition, PartialTime, ValueFormatError, parse_value, table_for
from protocols.dlt645.formats import DateTime, Number, parse_format
from protocols.dlt645.values import value_from_json


def item(code: str):
    return table_for(Edition.V2007 if len(code) == 8 else Edition.V1997).lookup(int(code, 16))


def encoded(code: str, text: str) -> bytes:
    it = item(code)
    return it.encode(parse_value(it.format, text))


# --- the review's failing examples -------------------------------------------------------------


def test_time_only():
    assert parse_value(item("04000102").format, "12:00:00") == time(12, 0, 0)
    assert encoded("04000102", "12:34:56") == bytes.fromhex("56 34 12")  # ss mm hh
    assert encoded("04000102", "12:34") == bytes.fromhex("00 34 12")
    assert encoded("04000102", "123456") == bytes.fromhex("56 34 12")  # compact hhmmss
    assert encoded("C011", "00:00:00") == bytes(3)  # 1997 time, midnight is a time


@pytest.mark.parametrize("text", ["0100", '{"day":1,"hour":0}', '{"hour": 0, "day": 1}', " 0100 "])
def test_settlement_day_ddhh(text):
    assert parse_value(item("04000B01").format, text) == PartialTime(day=1, hour=0)
    assert encoded("04000B01", text) == bytes.fromhex("00 01")  # hh DD
    assert encoded("C117", text) == bytes.fromhex("00 01")


def test_settlement_day_not_set_and_99():
    assert encoded("04000B02", '{"day":99,"hour":99}') == bytes.fromhex("99 99")
    assert encoded("04000B02", "9999") == bytes.fromhex("99 99")
    assert parse_value(item("04000B02").format, "null") is None
    assert encoded("04000B02", "null") == bytes(2)


def test_ladder_table_json():
    text = (
        '{"thresholds":[2880,"4800.00",0,0,0,0],"prices":[0.5,0.55,0.8,0,0,0,0],'
        '"settlement_dates":[{"month":1,"day":1,"hour":0},{"month":99,"day":99,"hour":99},'
        '"010100",null]}'
    )
    value = parse_value(item("040605FF").format, text)
    assert value["thresholds"][1] == Decimal("4800.00") and isinstance(value["prices"][0], Decimal)
    assert value["settlement_dates"] == [PartialTime(1, 1, 0), PartialTime(99, 99, 99), PartialTime(1, 1, 0), None]
    raw = item("040605FF").encode(value)
    assert len(raw) == 64 and raw[0:4] == bytes.fromhex("00 80 28 00") and raw[24:28] == bytes.fromhex("00 50 00 00")
    assert raw[52:55] == bytes.fromhex("00 01 01") and raw[55:58] == bytes.fromhex("99 99 99")


# --- every kind of format ---------------------------------------------------------------------


def test_numbers_are_exact():
    assert parse_value(Number("XXXXXX.XX"), "20.00") == Decimal("20.00")
    assert parse_value(Number("XXXXXX.XX"), "0.1") == Decimal("0.1")
    for bad in ("abc", "", "NaN", "1e999999", "1.234", "-1"):
        with pytest.raises(ValueFormatError):
            parse_value(Number("XXXXXX.XX"), bad)


def test_json_floats_never_appear():
    # A JSON number is read as Decimal: 0.1 stays 0.1, and a Python float is refused outright.
    value = parse_value(item("040502FF").format, "[0.1, 0.2]")
    assert value == [Decimal("0.1"), Decimal("0.2")] and all(isinstance(v, Decimal) for v in value)
    with pytest.raises(ValueFormatError, match="float"):
        value_from_json(Number("XX.XX"), 0.5)
    with pytest.raises(ValueFormatError):
        parse_value(item("040502FF").format, "[NaN]")


def test_datetimes():
    fmt = item("04000106").format  # YYMMDDhhmm
    assert parse_value(fmt, "2024-03-15T12:30") == datetime(2024, 3, 15, 12, 30, tzinfo=METER_TZ)
    assert parse_value(fmt, "2403151230") == datetime(2024, 3, 15, 12, 30, tzinfo=METER_TZ)
    utc = parse_value(fmt, "2024-03-15T04:30+00:00")
    assert fmt.encode(utc) == bytes.fromhex("30 12 15 03 24")  # converted to meter time
    with pytest.raises(ValueFormatError, match="seconds"):
        parse_value(fmt, "2024-03-15T12:30:15")  # would be silently dropped
    with pytest.raises(ValueFormatError):
        parse_value(fmt, "2099-13-01T00:00")
    with pytest.raises(ValueFormatError, match=r"2000\.\.2099"):
        parse_value(fmt, "1999-12-31T00:00")
    with pytest.raises(ValueFormatError):
        parse_value(DateTime("YYMMDDhhmmss"), "2024-03-15T12:30:15.5")


def test_dates_with_weekday():
    fmt = item("04000101").format  # YYMMDDWW
    assert parse_value(fmt, "2024-03-15") == date(2024, 3, 15)
    assert encoded("04000101", "2024-03-17") == bytes.fromhex("00 17 03 24")  # Sunday: WW 0
    assert encoded("04000101", "24031505") == bytes.fromhex("05 15 03 24")  # compact, Friday
    with pytest.raises(ValueFormatError, match="Friday"):
        parse_value(fmt, "24031503")  # compact with the wrong weekday
    with pytest.raises(ValueFormatError):
        parse_value(fmt, "2024-03-15T12:00")  # a date has no time


def test_clock_errors():
    fmt = item("04000102").format
    for bad in ("25:00:00", "12:00:00+08:00", "12:00:00.5", "noon", "null", '{"hour":12}', "1234567"):
        with pytest.raises(ValueFormatError):
            parse_value(fmt, bad)
    with pytest.raises(ValueFormatError, match="seconds"):
        parse_value(parse_format("hhmm"), "12:00:30")


@pytest.mark.parametrize(
    "text",
    [
        '{"day":1}',  # missing hour
        '{"day":1,"hour":0,"month":1}',  # a field DDhh does not have
        '{"day":32,"hour":0}',
        '{"day":1,"hour":"0"}',
        '{"day":true,"hour":0}',
        "01",
        "2024-03-15",
        "0132",  # hour 32
        "[1, 0]",
        '{"day":1,',
    ],
)
def test_partial_errors(text):
    with pytest.raises(ValueFormatError):
        parse_value(item("04000B01").format, text)


def test_status_words():
    fmt = item("04000503").format
    assert parse_value(fmt, "656") == 656
    assert parse_value(fmt, "0x0290") == 0x0290
    assert fmt.encode(parse_value(fmt, '{"meter_type":2,"pre_trip_alarm":true,"relay_open":true}')) == bytes.fromhex(
        "90 02"
    )
    assert parse_value(fmt, '{"raw":656,"meter_type":2}') == 656  # decode output
    with pytest.raises(ValueFormatError, match="disagrees"):
        parse_value(fmt, '{"raw":656,"meter_type":1}')
    for bad in ('{"nope":1}', "65536", "1.5", '{"raw":"x"}'):
        with pytest.raises(ValueFormatError):
            parse_value(fmt, bad)


def test_text_formats():
    assert encoded("04000402", "123") == bytes.fromhex("23 01 00 00 00 00")  # BCD12 meter number
    assert encoded("04000C03", "02 123456") == bytes.fromhex("56 34 12 02")  # HEX4, spaces allowed
    assert item("04000403").decode(encoded("04000403", " ABC-123")) == "ABC-123"  # ASCII keeps its text
    assert encoded("04000703", "9600") == b"\x20"  # baud
    for code, bad in [("04000402", "12a"), ("04000C03", "zz"), ("04000703", "9601"), ("04000703", "fast")]:
        with pytest.raises(ValueFormatError):
            encoded(code, bad)


@pytest.mark.parametrize(
    "text",
    [
        '{"thresholds":[0,0,0,0,0,0],"prices":[0,0,0,0,0,0,0]}',  # missing settlement_dates
        '{"thresholds":[0,0,0,0,0],"prices":[0,0,0,0,0,0,0],"settlement_dates":[null,null,null,null]}',
        '{"thresholds":[0,0,0,0,0,0],"prices":[0,0,0,0,0,0,0],"settlement_dates":[null,null,null,null],"x":1}',
        '{"thresholds":[0,0,0,0,0,-1],"prices":[0,0,0,0,0,0,0],"settlement_dates":[null,null,null,null]}',
        '{"thresholds":[0,0,0,0,0,0],"prices":[0,0,0,0,0,0,0],"settlement_dates":[{"month":13,"day":1,"hour":0},'
        "null,null,null]}",
        "[1,2,3]",
        "2880",
    ],
)
def test_record_errors(text):
    with pytest.raises(ValueFormatError):
        parse_value(item("040605FF").format, text)


def test_record_error_names_the_field():
    text = '{"thresholds":[0,0,0,0,0,0],"prices":[0,0,0,0,0,0,"x"],"settlement_dates":[null,null,null,null]}'
    with pytest.raises(ValueFormatError, match=r"prices: \[6\]"):
        parse_value(item("040605FF").format, text)


# --- time-of-use tables (MMDDNN zones, hhmmNN periods) -------------------------------------------


def test_time_zone_table_json_and_digits():
    text = '[{"month":1,"day":1,"table":1}, "070102", {"table":1,"day":1,"month":9}, null]'
    value = parse_value(item("04020000").format, text)
    assert value == [
        {"month": 1, "day": 1, "table": 1},
        {"month": 7, "day": 1, "table": 2},
        {"month": 9, "day": 1, "table": 1},
        None,
    ]
    assert encoded("04020000", text) == bytes.fromhex("01 01 01  02 01 07  01 01 09  00 00 00")


def test_day_table_json():
    text = '[{"hour":0,"minute":0,"tariff":4},{"hour":8,"minute":0,"tariff":2},"230004"]'
    assert encoded("04020001", text) == bytes.fromhex("04 00 00  02 00 08  04 00 23")


@pytest.mark.parametrize(
    ("code", "text", "message"),
    [
        ("04020000", '[{"month":1,"day":1}]', "exactly the fields month, day, table"),
        ("04020000", '[{"month":1,"day":1,"table":"1"}]', "table"),
        ("04020000", '[{"month":1,"day":1,"table":1.0}]', "not an integer"),
        ("04020000", '[{"month":2,"day":30,"table":1}]', "not a date"),
        ("04020000", '["0101"]', "6 digits"),
        ("04020000", "[" + ",".join(['"010101"'] * 15) + "]", "at most 14"),
        ("04020001", '[{"hour":1,"minute":0,"tariff":64}]', "tariff = 64"),
        ("04020001", '{"hour":1,"minute":0,"tariff":1}', "list"),
        ("04020001", "010001", "JSON"),
    ],
)
def test_time_of_use_errors_say_what_is_wrong(code, text, message):
    with pytest.raises(ValueFormatError, match=message):
        parse_value(item(code).format, text)


def test_only_text_is_parsed():
    with pytest.raises(ValueFormatError):
        parse_value(Number("XX.XX"), 1)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.datetimes(datetime(2000, 1, 2), datetime(2099, 12, 30)), st.integers(-12, 12))
def test_iso_datetimes_in_any_zone(when, hours):
    fmt = DateTime("YYMMDDhhmmss")
    zoned = when.replace(microsecond=0, tzinfo=timezone(timedelta(hours=hours)))
    value = parse_value(fmt, zoned.isoformat())
    assert fmt.decode(fmt.encode(value)) == zoned.astimezone(METER_TZ)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_arbitrary_text_raises_only_value_errors(text):
    for code in ("04000102", "04000B01", "040605FF", "04000503", "04000101", "04001001", "04020000", "04020008"):
        try:
            encoded(code, text)
        except ValueFormatError:
            pass
