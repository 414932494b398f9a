"""``meterlink decode`` / ``meterlink encode``: the §8.1 vectors and the CLI contract."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from click.testing import CliRunner

from gateway.cli import cli
from protocols.dlt645 import (
    Edition,
    Frame,
    Password,
    RelayCommand,
    RelayControlRequest,
    build_frame,
    dumps,
)
from protocols.dlt645.security import RechargeRequest, SecurityDI, SecurityReply, SecurityRequest

V = {
    "V1": "FE FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16",
    "V2": "FE FE FE FE 68 02 00 31 08 22 20 68 11 04 32 55 B3 35 D1 16",
    "V3": "68 AA AA AA AA AA AA 68 11 04 33 33 34 33 AE 16",
    "V4": "68 01 72 00 72 00 00 68 91 08 33 33 34 33 33 33 33 33 E7 16",
    "V5": "68 76 02 02 47 02 02 68 91 08 33 33 34 33 35 33 33 33 C9 16",
    "V6": "68 90 78 56 34 12 00 68 11 04 33 33 33 33 55 16",
    "V7": "68 78 56 34 12 00 00 68 11 04 33 34 34 35 C9 16",
    "V8": "68 67 45 23 01 00 00 68 11 02 44 E9 E0 16",
    "V9": "FE FE FE FE 68 43 10 00 11 34 00 68 11 04 33 34 34 35 4D 16",
    "V10": "FE FE FE FE 68 43 10 00 11 34 00 68 91 06 33 34 34 35 CA 55 EE 16",
    "V11": "FE FE FE FE 68 43 10 00 11 34 00 68 D1 06 33 34 34 35 CA 55 EE 16",
    "V12": "FE FE FE FE 68 43 10 00 11 34 00 68 D1 01 31 6B 16",
    "V13a": "FE FE FE FE 68 43 10 00 11 34 00 68 11 04 33 33 39 35 51 16",
    "V13b": "FE FE FE FE 68 43 10 00 11 34 00 68 11 04 35 33 B3 35 CD 16",
    "V14": "FE FE FE FE 68 00 51 44 18 11 17 68 91 06 35 33 B3 35 36 83 45 16",
    "V15": "68 60 64 02 09 22 04 68 91 0A 33 32 34 35 47 56 33 33 33 33 97 16",
    "V16a": "68 AA AA AA AA AA AA 68 14 2E 33 35 D5 37 33 6C 85 89 33 33 33 33 34 33 55 33 55 33 55 33 33 58 33 33 "
    "58 33 33 58 33 33 33 88 33 33 33 88 33 33 33 88 33 43 33 43 33 43 C6 16",
    "V17a": "68 03 00 00 00 00 00 68 01 02 44 E9 03 16",
    "V17b": "68 03 00 00 00 00 00 68 81 04 44 E9 33 34 EC 16",
    "V18a": "68 63 01 43 03 00 00 68 01 02 43 C3 83 16",
    "V18b": "68 54 07 13 00 80 13 68 01 02 43 C3 DA 16",
    "V18c": "68 54 07 13 00 80 13 68 81 06 43 C3 34 33 33 33 2B 16",
}

# (vector, address, edition, control, direction, length, di, value, unit)
EXPECTED = [
    ("V1", "AAAAAAAAAAAA", "2007", 0x13, "request", 0, None, None, None),
    ("V2", "202208310002", "2007", 0x11, "request", 4, "028022FF", None, None),
    ("V3", "AAAAAAAAAAAA", "2007", 0x11, "request", 4, "00010000", None, "kWh"),
    ("V4", "000072007201", "2007", 0x91, "response", 8, "00010000", Decimal("0.00"), "kWh"),
    ("V5", "020247020276", "2007", 0x91, "response", 8, "00010000", Decimal("0.02"), "kWh"),
    ("V6", "001234567890", "2007", 0x11, "request", 4, "00000000", None, "kWh"),
    ("V7", "000012345678", "2007", 0x11, "request", 4, "02010100", None, "V"),
    ("V9", "003411001043", "2007", 0x11, "request", 4, "02010100", None, "V"),
    ("V10", "003411001043", "2007", 0x91, "response", 6, "02010100", Decimal("229.7"), "V"),
    ("V13a", "003411001043", "2007", 0x11, "request", 4, "02060000", None, None),
    ("V13b", "003411001043", "2007", 0x11, "request", 4, "02800002", None, "Hz"),
    ("V14", "171118445100", "2007", 0x91, "response", 6, "02800002", Decimal("50.03"), "Hz"),
    ("V15", "042209026460", "2007", 0x91, "response", 10, "0201FF00", [Decimal("231.4"), 0, 0], "V"),
    ("V16a", "AAAAAAAAAAAA", "2007", 0x14, "request", 46, "04A20200", None, None),
    ("V17a", "000000000003", "1997", 0x01, "request", 2, "B611", None, "V"),
    ("V17b", "000000000003", "1997", 0x81, "response", 4, "B611", 100, "V"),
    ("V18a", "000003430163", "1997", 0x01, "request", 2, "9010", None, "kWh"),
    ("V18b", "138000130754", "1997", 0x01, "request", 2, "9010", None, "kWh"),
    ("V18c", "138000130754", "1997", 0x81, "response", 6, "9010", Decimal("0.01"), "kWh"),
]


def run(*args: str, stdin: str | None = None) -> tuple[int, list[dict]]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [json.loads(line, parse_float=Decimal) for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


@pytest.mark.parametrize("vector,address,edition,control,direction,length,di,value,unit", EXPECTED)
def test_decode_vectors(vector, address, edition, control, direction, length, di, value, unit):
    code, [obj] = run("decode", V[vector])
    assert code == 0
    assert obj["address"] == address
    assert obj["edition"] == edition
    assert obj["control"] == control
    assert obj["function_code"] == control & 0x1F
    assert obj["direction"] == direction
    assert obj["abnormal"] is False
    assert obj["length"] == length
    assert obj.get("di") == di
    if value is not None:
        assert obj["value"] == value
    else:
        assert "value" not in obj
    if unit is not None:
        assert obj["unit"] == unit


def test_decode_abnormal_reply_v12():
    code, [obj] = run("decode", V["V12"])
    assert code == 0
    assert obj["abnormal"] is True and obj["control"] == 0xD1
    assert obj["error_code"] == 0xFE
    assert "no_data" in obj["errors"] and "other" not in obj["errors"]


@pytest.mark.parametrize("vector", ["V11", "V8"])
def test_decode_invalid_vectors_exit_nonzero(vector):
    code, [obj] = run("decode", V[vector])
    assert code == 1
    assert "error" in obj


def test_decode_checksum_error_is_named():
    _, [obj] = run("decode", V["V11"])
    assert obj["error_type"] == "ChecksumError"


def test_decode_jw97_unscrambled_frame_is_rejected():
    code, [obj] = run("decode", "FE FE 68 18 46 25 44 00 00 68 01 02 11 B6 03 16")
    assert code == 1 and "checksum" in obj["error"]


def test_decode_several_concatenated_without_spaces():
    joined = (V["V9"] + V["V10"]).replace(" ", "")
    code, objs = run("decode", joined)
    assert code == 0
    assert [o["control"] for o in objs] == [0x11, 0x91]


def test_decode_stdin():
    code, objs = run("decode", "-", stdin=V["V17a"] + "\n" + V["V17b"] + "\n")
    assert code == 0
    assert [o["di"] for o in objs] == ["B611", "B611"]


def test_decode_force_edition():
    code, [obj] = run("decode", "--edition", "1997", V["V8"])
    assert code == 1 and "error" in obj  # 0x11 is no 1997 function


@pytest.mark.parametrize("junk", ["zz", "68 12", "123", "FE FE"])
def test_decode_garbage_is_an_error_not_a_traceback(junk):
    code, [obj] = run("decode", junk)
    assert code == 1 and "error" in obj


def test_encode_read_matches_vector():
    result = CliRunner().invoke(cli, ["encode", "read", "003411001043", "02010100"])
    assert result.exit_code == 0
    assert result.output.strip() == V["V9"]


def test_encode_read_no_preamble_and_1997():
    result = CliRunner().invoke(cli, ["encode", "read", "--preamble", "0", "--edition", "1997", "3", "B611"])
    assert result.output.strip() == V["V17a"]
    result = CliRunner().invoke(cli, ["encode", "read", "--preamble", "0", "AAAAAAAAAAAA", "00010000"])
    assert result.output.strip() == V["V3"]


def test_encode_read_address_matches_v1():
    result = CliRunner().invoke(cli, ["encode", "read-address"])
    assert result.output.strip() == V["V1"]


def test_encode_time_round_trips():
    result = CliRunner().invoke(cli, ["encode", "time", "--at", "2026-11-26T21:30:05+08:00"])
    assert result.exit_code == 0
    _, [obj] = run("decode", result.output)
    assert obj["address"] == "999999999999" and obj["function_code"] == 0x08
    assert obj["time"] == "2026-11-26T21:30:05+08:00"


def test_encode_relay_round_trips():
    result = CliRunner().invoke(
        cli, ["encode", "relay", "000000000001", "direct-close", "--valid-until", "2026-11-26T22:00:00+08:00"]
    )
    assert result.exit_code == 0, result.output
    code, [obj] = run("decode", result.output)
    assert code == 0
    assert obj["function_code"] == 0x1C and obj["length"] == 16
    assert obj["relay_command"] == 0x1C
    assert obj["password_level"] == 2
    assert obj["operator"] == "00000000"
    assert obj["valid_until"] == "2026-11-26T22:00:00+08:00"


def test_encode_write_round_trips_value():
    result = CliRunner().invoke(cli, ["encode", "write", "000000000001", "04001001", "20.00", "--level", "04"])
    assert result.exit_code == 0, result.output
    _, [obj] = run("decode", result.output)
    assert obj["di"] == "04001001" and obj["value"] == Decimal("20.00") and obj["password_level"] == 4


@pytest.mark.parametrize(
    "args",
    [
        ["encode", "read", "12345678901X", "00010000"],
        ["encode", "read", "000000000001", "0001000"],
        ["encode", "write", "000000000001", "04001001", "abc"],
        ["encode", "write", "000000000001", "04001001", "1.234"],
        ["encode", "relay", "000000000001", "explode"],
        ["encode", "time", "--at", "yesterday"],
    ],
)
def test_user_mistakes_give_one_clear_error(args):
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, SystemExit)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Error" in result.output


# --- frames built for the tests below ---------------------------------------------------------


def hexof(payload, address: str = "000000000001") -> str:
    return build_frame(address, payload).encode(0).hex(" ").upper()


def frame_hex(control: int, data: str, edition: Edition | None = None) -> str:
    return Frame("000000000001", control, bytes.fromhex(data), edition).encode(0).hex(" ").upper()


def encode(*args: str) -> str:
    result = CliRunner().invoke(cli, ["encode", *args])
    assert result.exit_code == 0, result.output
    return result.output.strip()


# --- decode: --edition, error replies, 0x03, 0x1C ---------------------------------------------


def test_decode_edition_override_succeeds():
    wire = encode("time", "--at", "2026-11-26T21:30:05+08:00")
    _, [guessed] = run("decode", wire)
    assert guessed["edition"] == "2007" and guessed["payload"] == "BroadcastTime"
    code, [forced] = run("decode", "--edition", "1997", wire)
    assert code == 0
    assert forced["edition"] == "1997" and forced["payload"] == "BroadcastTime1997"
    assert forced["time"] == "2026-11-26T21:30:05+08:00"


def test_decode_relay_error_replies_both_forms():
    code, [short] = run("decode", frame_hex(0xDC, "04"))
    assert code == 0 and short["length"] == 1 and short["errors"] == ["password"] and short["error_code"] == 4
    code, [word] = run("decode", frame_hex(0xDC, "20 00"))
    assert code == 0 and word["length"] == 2 and word["payload"] == "RelayErrorReply"
    assert word["errors"] == ["trip_refused_power_hold"]
    _, [reserved] = run("decode", frame_hex(0xDC, "00 FF"))
    assert reserved["errors"] == ["auto_restore_already_tripped"] + [f"reserved_bit_{n}" for n in range(9, 16)]


def test_decode_relay_reply_with_execution_word():
    code, [obj] = run("decode", frame_hex(0x9C, "04 01"))
    assert code == 0 and obj["length"] == 2
    assert obj["execution"] == 0x0104 and obj["executed"] == ["direct_trip", "power_hold"]


def test_decode_security_error_bits():
    code, [obj] = run("decode", frame_hex(0xC3, "22 00"))
    assert code == 0 and obj["error_code"] == 0x22 and obj["errors"] == ["repeat_recharge", "purchase_count"]
    _, [reserved] = run("decode", frame_hex(0xC3, "00 80"))
    assert reserved["errors"] == ["reserved_bit_15"]


def test_decode_security_payloads_as_json():
    body = RechargeRequest(10000, 2, bytes.fromhex("01020304"), "000000000777", bytes.fromhex("05060708"))
    code, [req] = run("decode", hexof(SecurityRequest(SecurityDI.RECHARGE, "00000001", body)))
    assert code == 0 and req["function_code"] == 3 and req["payload"] == "SecurityRequest"
    assert req["di"] == "070102FF" and req["name"] == "recharge" and req["body"] == "RechargeRequest"
    assert (req["amount"], req["purchase_count"], req["customer_number"]) == (10000, 2, "000000000777")
    assert req["mac1"] == "01020304" and req["mac2"] == "05060708"
    code, [rep] = run("decode", hexof(SecurityReply(SecurityDI.RECHARGE)))
    assert code == 0 and rep["payload"] == "SecurityReply" and rep["name"] == "recharge" and rep["body"] == "EmptyBody"


def test_decode_valid_until_null():
    payload = RelayControlRequest(Password(0x02), "00000000", RelayCommand.TRIP, None)
    code, [obj] = run("decode", hexof(payload))
    assert code == 0 and obj["valid_until"] is None and obj["relay_command_name"] == "trip"


@pytest.mark.parametrize(
    ("control", "err", "names"),
    [(0xC1, "02", ["di_error"]), (0xC4, "04", ["password"]), (0xCC, "09", ["illegal_data", "unused"])],
)
def test_decode_1997_abnormal_replies(control, err, names):
    code, [obj] = run("decode", frame_hex(control, err))
    assert code == 0 and obj["edition"] == "1997" and obj["abnormal"] is True
    assert obj["errors"] == names and obj["error_code"] == int(err, 16)


def test_decode_1997_baud_change():
    _, [req] = run("decode", frame_hex(0x0C, "08"))
    assert req["edition"] == "1997" and req["feature_word"] == 8 and req["baud"] == 2400
    _, [rep] = run("decode", frame_hex(0x8C, "20"))
    assert rep["feature_word"] == 0x20 and rep["baud"] == 9600


def test_decode_weekday_mismatch_is_reported():
    code, [obj] = run("decode", frame_hex(0x91, "01 01 00 04 03 15 03 24"))
    assert code == 0 and obj["value"] == "2024-03-15" and "Friday" in obj["warnings"][0]


# --- decode: every frame is reported -------------------------------------------------------------


def test_decode_goes_on_after_bad_frames():
    good = V["V17b"]
    bad_sum = good[:-5] + "EE 16"
    code, objs = run("decode", bad_sum, good, "01 02", "FE FE", good, "68 12")
    assert code == 1
    assert len(objs) == 5
    assert objs[0]["error_type"] == "ChecksumError" and objs[0]["offset"] == 0
    assert objs[1]["value"] == 100 and "error" not in objs[1]
    assert "unexpected byte 01" in objs[2]["error"] and objs[2]["offset"] == 32
    assert objs[3]["value"] == 100
    assert "error" in objs[4] and objs[4]["error_type"] == "IncompleteFrameError"


def test_decode_resyncs_after_a_broken_header():
    # 68 followed by garbage that is not frame-shaped: the search restarts after that 68.
    code, objs = run("decode", "68 00 01 " + V["V17b"])
    assert code == 1 and "error" in objs[0] and objs[-1]["value"] == 100


def test_decode_all_good_exits_zero():
    code, objs = run("decode", V["V10"], V["V17b"], V["V12"])
    assert code == 0 and len(objs) == 3 and not any("error" in o for o in objs)


def test_decode_value_that_does_not_fit_fails_with_frame_fields():
    code, objs = run("decode", "68 03 00 00 00 00 00 68 81 04 44 E9 67 45 31 16", V["V17b"])
    assert code == 1
    bad, good = objs
    assert "does not fit XXX" in bad["error"] and bad["error_type"] == "ValueFormatError"
    assert bad["di"] == "B611" and bad["raw"] == "3412" and bad["control"] == 0x81 and bad["offset"] == 0
    assert "value" not in bad and "value_error" not in bad
    assert good["value"] == 100


# --- encode write: values per the DI's format -------------------------------------------------


@pytest.mark.parametrize(
    ("di", "value", "printed"),
    [
        ("04000102", "12:00:00", "12:00:00"),
        ("04000102", "12:30", "12:30:00"),
        ("04000B01", "0100", {"day": 1, "hour": 0}),
        ("04000B01", '{"day":1,"hour":0}', {"day": 1, "hour": 0}),
        ("04000101", "2024-03-15", "2024-03-15"),
        ("04000106", "2024-03-15T12:30", "2024-03-15T12:30:00+08:00"),
        ("04000503", '{"meter_type":2,"relay_open":true}', None),
        ("04000703", "9600", 9600),
        ("04000402", "123", "000000000123"),
    ],
)
def test_encode_write_values(di, value, printed):
    force = ["--force"] if di == "04000503" else []  # a status word is read-only (the table's access)
    wire = encode("write", *force, "000000000001", di, value)
    code, [obj] = run("decode", wire)
    assert code == 0 and obj["di"] == di and "error" not in obj
    if printed is not None:
        assert obj["value"] == printed


def test_encode_write_ladder_table_with_mac():
    value = (
        '{"thresholds":[2880,4800,0,0,0,0],"prices":["0.5000",0.55,0.8,0,0,0,0],'
        '"settlement_dates":[{"month":1,"day":1,"hour":0},{"month":99,"day":99,"hour":99},'
        '{"month":99,"day":99,"hour":99},{"month":99,"day":99,"hour":99}]}'
    )
    wire = encode("write", "000000000001", "040605FF", value, "--level", "99", "--mac", "01020304")
    code, [obj] = run("decode", wire)
    assert code == 0 and obj["length"] == 12 + 64 + 4
    assert obj["password_level"] == 99 and obj["mac"] == "01020304"
    assert obj["value"]["thresholds"][:2] == [Decimal("2880.00"), Decimal("4800.00")]
    assert obj["value"]["prices"][:3] == [Decimal("0.5000"), Decimal("0.5500"), Decimal("0.8000")]
    assert obj["value"]["settlement_dates"][0] == {"month": 1, "day": 1, "hour": 0}
    # and what decode printed is a valid VALUE again: the same frame
    again = encode("write", "000000000001", "040605FF", dumps(obj["value"]), "--level", "99", "--mac", "01020304")
    assert again == wire


def test_encode_write_time_zone_and_day_tables():
    zones = '[{"month":1,"day":1,"table":1},{"month":7,"day":1,"table":2}]'
    wire = encode("write", "000000000001", "04020000", zones)  # plaintext: decode shows the value
    code, [obj] = run("decode", wire)
    assert code == 0 and obj["di"] == "04020000" and obj["length"] == 12 + 6
    assert obj["value"] == [{"month": 1, "day": 1, "table": 1}, {"month": 7, "day": 1, "table": 2}]
    assert encode("write", "000000000001", "04020000", dumps(obj["value"])) == wire
    periods = '[{"hour":0,"minute":0,"tariff":4},{"hour":8,"minute":0,"tariff":2}]'
    _, [obj] = run("decode", encode("write", "000000000001", "04020002", periods))
    assert obj["di"] == "04020002" and obj["value"][1] == {"hour": 8, "minute": 0, "tariff": 2}


def test_encode_write_1997_settlement_day():
    wire = encode("write", "--edition", "1997", "3", "C117", "2500")
    _, [obj] = run("decode", wire)
    assert obj["di"] == "C117" and obj["value"] == {"day": 25, "hour": 0} and obj["password_level"] == 4


@pytest.mark.parametrize("level", ["99", "98", "02", "04"])
def test_password_level_is_printed_as_entered(level):
    wire = encode("relay", "000000000001", "trip", "--level", level, "--valid-until", "2026-11-26T22:00:00+08:00")
    _, [obj] = run("decode", wire)
    assert obj["password_level"] == int(level)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["relay", "AAAAAAAAAAAA", "trip"], "wildcard"),
        (["relay", "999999999999", "trip"], "broadcast"),
        (["read", "12AA56789012", "00010000"], "not a valid wildcard"),
        (["read", "999999999999", "00010000"], "broadcast"),
        (["write", "AAAAAAAAAAAA", "04001001", "1"], "wildcard"),
        (["write", "999999999999", "04001001", "1"], "broadcast"),
        (["write", "--edition", "1997", "AAAAAAAAAAAA", "C111", "15"], "wildcard"),
        (["write", "000000000001", "04000102", "25:00:00"], "04000102"),
        (["write", "000000000001", "04000106", "2024-03-15T12:30:15"], "seconds"),
        (["write", "000000000001", "04000B01", '{"day":1}'], "hour"),
        (["write", "000000000001", "04000B01", "13:00"], "DDhh"),
        (["write", "000000000001", "040605FF", '{"thresholds":[1]}'], "record"),
        (["write", "000000000001", "040605FF", "{oops"], "JSON"),
        (["write", "000000000001", "04020000", '[{"month":1,"day":1,"table":9}]'], "table = 9"),
        (["write", "000000000001", "04020001", "[" + ",".join(['"000001"'] * 15) + "]"], "at most 14"),
    ],
)
def test_encode_refusals_are_clear(args, message):
    result = CliRunner().invoke(cli, ["encode", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error" in result.output
    assert message in result.output


def test_encode_wildcard_reads_are_still_allowed():
    assert encode("read", "--preamble", "0", "AAAAAAAAAAAA", "00010000") == V["V3"]
    _, [obj] = run("decode", encode("read", "AAAA12345678", "00010000"))
    assert obj["address"] == "AAAA12345678"


# --- decode: one error object per invalid frame ------------------------------------------------


def test_decode_truncated_input_is_one_error():
    # Review finding: "6868" printed two error objects (one per 68) for one truncated frame.
    code, objs = run("decode", "6868")
    assert code == 1 and len(objs) == 1
    assert objs[0]["error_type"] == "IncompleteFrameError" and objs[0]["offset"] == 0


def _frame_bytes(vector: str) -> bytes:
    raw = bytes.fromhex(V[vector])
    return raw[raw.index(0x68) :]


@pytest.mark.parametrize("vector", sorted(set(V) - {"V8", "V11"}))
def test_every_cut_of_a_frame_is_one_error(vector):
    """A frame cut after any byte is one error, alone or after a good frame (§8.1 vectors)."""
    whole = _frame_bytes(vector)
    good = V["V17b"]
    for cut in range(1, len(whole)):
        part = whole[:cut].hex()
        code, objs = run("decode", part)
        assert code == 1 and len(objs) == 1 and "error" in objs[0], (cut, objs)
        code, objs = run("decode", good, part)
        assert code == 1 and len(objs) == 2, (cut, objs)
        assert objs[0]["value"] == 100 and "error" in objs[1] and objs[1]["offset"] == 16


def test_a_cut_frame_before_a_good_one_is_one_error():
    # The cut frame's own 68s (the second start byte) are not reported as frames of their own.
    cut = _frame_bytes("V10")[:13]
    code, objs = run("decode", cut.hex(), V["V17b"], V["V10"])
    assert code == 1 and len(objs) == 3
    assert "error" in objs[0] and objs[0]["offset"] == 0
    assert objs[1]["value"] == 100 and objs[2]["value"] == Decimal("229.7")


def test_decode_change_password_reply_without_data():
    # Review finding: an L = 0 reply 0x98 failed "a password needs 4 data bytes, got 0".
    code, [obj] = run("decode", frame_hex(0x98, ""))
    assert code == 0 and "error" not in obj
    assert obj["payload"] == "ChangePasswordReply" and obj["length"] == 0
    code, [obj] = run("decode", frame_hex(0x98, "04 56 34 12"))
    assert code == 0 and obj["new_password_level"] == 4


# --- encode write: read-only DIs, passwords ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["000000000001", "00010000", "1.00"],  # forward active energy (§3.2)
        ["000000000001", "00900200", "1.00"],  # remaining money (§3.5)
        ["--raw", "000000000001", "00010000", "00010000"],
        ["--edition", "1997", "3", "9010", "1.00"],
    ],
)
def test_encode_write_refuses_a_read_only_di(args):
    result = CliRunner().invoke(cli, ["encode", "write", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "read-only" in errors[0] and "--force" in errors[0]
    forced = CliRunner().invoke(cli, ["encode", "write", "--force", *args])
    assert forced.exit_code == 0, forced.output
    _, [obj] = run("decode", forced.output)
    assert obj["function_code"] in (0x14, 0x04) and obj["di"] == args[-2]


def test_encode_write_of_a_di_the_table_does_not_know_is_not_refused():
    wire = encode("write", "--raw", "000000000001", "04A20200", "0102")  # V16a's vendor DI
    _, [obj] = run("decode", wire)
    assert obj["di"] == "04A20200" and obj["name"] is None and obj["raw"] == "0102"


def test_encode_passwords():
    # At 96..99 the digits are ignored by the meter: any hex is sent as given.
    wire = encode("write", "--preamble", "0", "--level", "98", "--password", "FFFFFF", "--raw", "1", "04001001", "00")
    assert bytes.fromhex(wire)[14:18] == bytes((0x98 + 0x33, 0x32, 0x32, 0x32))  # 98 FF FF FF, +33
    result = CliRunner().invoke(cli, ["encode", "write", "1", "04001001", "1", "--password", "12345A"])
    assert result.exit_code == 2 and "6 decimal digits" in result.output


@pytest.mark.parametrize(
    ("options", "blamed"),
    [
        (["--level", "99", "--mac", "12"], "--mac"),  # not 4 bytes
        (["--level", "99", "--mac", "0102030405"], "--mac"),
        (["--level", "99", "--mac", "XYZ"], "--mac"),
        (["--level", "99"], "--mac"),  # level 99 carries a MAC: a frame without one is unreadable
        (["--level", "04", "--mac", "01020304"], "--mac"),  # plaintext levels carry none
        (["--level", "98"], "--level"),  # ciphertext: only with --raw
        (["--level", "ZZ"], "--level"),
        (["--operator", "1"], "--operator"),
        (["--edition", "1997", "--mac", "01020304"], "--mac"),
    ],
)
def test_encode_write_option_mistakes_name_the_option(options: list[str], blamed: str):
    di = "C010" if "1997" in options else "04001001"
    result = CliRunner().invoke(cli, ["encode", "write", *options, "003411001043", di, "20"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {blamed}" in result.output
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(result.exception, SystemExit)


def test_encode_write_mac_levels_build_what_decode_reads():
    for level in ("99", "97"):
        wire = encode("write", "003411001043", "04001001", "20", "--level", level, "--mac", "0A0B0C0D")
        code, [obj] = run("decode", wire)
        assert code == 0 and obj["mac"] == "0A0B0C0D" and obj["password_level"] == int(level)
    wire = encode("write", "003411001043", "04001001", "AABBCCDD", "--level", "98", "--raw", "--mac", "01020304")
    code, [obj] = run("decode", wire)
    assert obj["length"] == 12 + 4 + 4 and obj["password_level"] == 98


def test_encode_trip_auto_restore_needs_a_restore_delay():
    """FW-A refuses N2 = 0 for 0x1D/0x1E (dlt645.md §4.1); --force builds it anyway."""
    result = CliRunner().invoke(cli, ["encode", "relay", "000000000001", "trip-auto-restore"])
    assert result.exit_code == 2 and "Invalid value for --n2" in result.output
    wire = encode("relay", "000000000001", "trip-auto-restore-alt", "--n2", "3")
    code, [obj] = run("decode", wire)
    assert code == 0 and obj["relay_command"] == 0x1E
    forced = CliRunner().invoke(cli, ["encode", "relay", "000000000001", "trip-auto-restore", "--force"])
    assert forced.exit_code == 0


def test_decode_errors_all_carry_an_error_type():
    code, objs = run("decode", "68AAAAAAAAAAAA68110433333433AE16", "0011")
    assert code == 1 and objs[1]["error_type"] == "StrayBytes" and objs[1]["offset"] == 16
    code, [obj] = run("decode", "zz")
    assert code == 1 and obj["error_type"] == "InputError"
    code, [obj] = run("decode", "FEFE")
    assert code == 1 and obj["error_type"] == "InputError"
