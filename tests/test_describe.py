"""``describe_frame``: the analyser's view of each payload, called directly (no CLI)."""

from __future__ import annotations

from datetime import datetime

import pytest

from protocols.dlt645 import (
    METER_TZ,
    ChangePasswordRequest,
    Edition,
    Frame,
    Password,
    PayloadError,
    RelayCommand,
    RelayControlRequest,
    WriteRequest,
    build_frame,
    describe_frame,
)
from protocols.dlt645.describe import password_level
from protocols.dlt645.edition1997 import ChangeBaud1997Reply, ChangeBaud1997Request, Write1997Request
from protocols.dlt645.security import RechargeRequest, SecurityDI, SecurityReply, SecurityRequest, StatusQueryReply

ADDR = "000000000001"


def describe(control: int, data: bytes | str, edition: Edition | None = None) -> dict:
    raw = bytes.fromhex(data) if isinstance(data, str) else data
    return describe_frame(Frame(ADDR, control, raw, edition))


# --- password levels: as written (--level 99 -> 99) ------------------------------------------


@pytest.mark.parametrize(("byte", "shown"), [(0x99, 99), (0x98, 98), (0x02, 2), (0x04, 4), (0x00, 0), (0xAB, "AB")])
def test_password_level_reads_the_hex_digits(byte, shown):
    assert password_level(byte) == shown


@pytest.mark.parametrize(("level", "shown"), [(0x99, 99), (0x98, 98), (0x02, 2), (0x04, 4)])
def test_password_level_in_writes_and_relay_commands(level, shown):
    write = describe_frame(build_frame(ADDR, WriteRequest(0x04001001, Password(level), "00000000", bytes(8))))
    assert write["password_level"] == shown
    relay = RelayControlRequest(Password(level), "00000000", RelayCommand.TRIP, None)
    assert describe_frame(build_frame(ADDR, relay))["password_level"] == shown
    w97 = describe_frame(build_frame(ADDR, Write1997Request(0xC111, Password(level), b"\x15")))
    assert w97["password_level"] == shown


def test_change_password_levels():
    obj = describe_frame(build_frame(ADDR, ChangePasswordRequest(Password(0x02), Password(0x04, "123456"))))
    assert obj["password_level"] == 2 and obj["new_password_level"] == 4


def test_level_99_write_splits_the_mac_and_98_keeps_ciphertext():
    obj = describe_frame(build_frame(ADDR, WriteRequest(0x04001001, Password(0x99), "00000000", bytes(4) + b"MAC!")))
    assert obj["mac"] == b"MAC!".hex().upper() and obj["value"] == 0
    obj = describe_frame(build_frame(ADDR, WriteRequest(0x04001001, Password(0x98), "00000000", bytes(12))))
    assert obj["ciphertext"] == "00" * 8 and "value" not in obj and "error" not in obj


# --- values that do not fit, and oddities that do ---------------------------------------------


def test_value_that_does_not_fit_is_an_error_with_the_frame_fields():
    obj = describe(0x81, "11 B6 34 12", Edition.V1997)  # B611 XXX: 1234 V has 4 digits
    assert obj["error"].startswith("value of B611 does not fit XXX")
    assert obj["error_type"] == "ValueFormatError"
    assert obj["raw"] == "3412" and "value" not in obj and "value_error" not in obj
    assert obj["di"] == "B611" and obj["name"] == "Voltage, phase A" and obj["control"] == 0x81
    obj = describe(0x91, "00 00 01 00 0A 00 00 00")  # 00010000: not BCD
    assert "not BCD" in obj["error"] and obj["address"] == ADDR and obj["length"] == 8


def test_weekday_mismatch_is_a_warning():
    ok = describe(0x91, "01 01 00 04 05 15 03 24")  # 04000101 = 2024-03-15, WW 5 (Friday)
    assert ok["value"] == "2024-03-15" and "warnings" not in ok and "error" not in ok
    odd = describe(0x91, "01 01 00 04 03 15 03 24")  # WW 3
    assert odd["value"] == "2024-03-15"
    [warning] = odd["warnings"]
    assert "WW = 3" in warning and "Friday" in warning


def test_unknown_di_keeps_raw():
    obj = describe(0x91, "0D 0C 0B 0A 12 34")
    assert obj["name"] is None and obj["raw"] == "1234" and "error" not in obj


def test_payload_that_does_not_fit_raises():
    with pytest.raises(PayloadError):
        describe(0x91, "00 01")


# --- error words -------------------------------------------------------------------------------


def test_error_reply_2007_and_1997():
    assert describe(0xD1, "02")["errors"] == ["no_data"]
    obj = describe(0xC1, "03")  # 1997 (from C): bit0 illegal data, bit1 DI error
    assert obj["edition"] == "1997" and obj["errors"] == ["illegal_data", "di_error"] and obj["error_code"] == 3
    assert describe(0xC4, "80")["errors"] == ["reserved"]


def test_security_error_reserved_bits():
    obj = describe(0xC3, "00 80")  # SERR 0x8000, low byte first
    assert obj["error_code"] == 0x8000 and obj["errors"] == ["reserved_bit_15"]
    assert describe(0xC3, "FF 02 00")["errors"] == ["repeat_recharge"]  # FW-B FF lo hi


def test_relay_error_forms():
    assert describe(0xDC, "04")["errors"] == ["password"]  # L = 1: the ERR byte
    obj = describe(0xDC, "00 FF")  # L = 2: error word 0xFF00
    assert obj["payload"] == "RelayErrorReply" and obj["error_code"] == 0xFF00
    assert obj["errors"] == ["auto_restore_already_tripped"] + [f"reserved_bit_{n}" for n in range(9, 16)]


def test_relay_reply_forms():
    assert "execution" not in describe(0x9C, "")
    obj = describe(0x9C, "04 00")
    assert obj["execution"] == 4 and obj["executed"] == ["direct_trip"]


# --- other payloads ----------------------------------------------------------------------------


def test_relay_valid_until_null():
    obj = describe_frame(build_frame(ADDR, RelayControlRequest(Password(2), "00000000", RelayCommand.TRIP, None)))
    assert obj["valid_until"] is None and obj["relay_command_name"] == "trip"
    until = datetime(2026, 11, 26, 22, 0, tzinfo=METER_TZ)
    obj = describe_frame(build_frame(ADDR, RelayControlRequest(Password(2), "00000000", RelayCommand.TRIP, until)))
    assert obj["valid_until"] == "2026-11-26T22:00:00+08:00"


@pytest.mark.parametrize(("word", "baud"), [(0x08, 2400), (0x20, 9600), (0x03, None)])
def test_1997_baud_change_shows_the_feature_word(word, baud):
    for payload in (ChangeBaud1997Request(word), ChangeBaud1997Reply(word)):
        obj = describe_frame(build_frame(ADDR, payload))
        assert obj["edition"] == "1997" and obj["feature_word"] == word and obj["baud"] == baud


def test_2007_baud_change():
    assert describe(0x17, "20")["baud"] == 9600


def test_freeze():
    assert describe(0x16, "30 12 99 99")["freeze"] == {"minute": 30, "hour": 12, "day": 99, "month": 99}


def test_security_payloads():
    body = RechargeRequest(10000, 2, b"\x01\x02\x03\x04", "000000000777", b"\x05\x06\x07\x08")
    obj = describe_frame(build_frame(ADDR, SecurityRequest(SecurityDI.RECHARGE, "00000001", body)))
    assert obj["payload"] == "SecurityRequest" and obj["di"] == "070102FF" and obj["name"] == "recharge"
    assert obj["amount"] == 10000 and obj["purchase_count"] == 2 and obj["customer_number"] == "000000000777"
    assert obj["mac1"] == "01020304" and obj["operator"] == "00000001"
    reply = StatusQueryReply(12345, bytes(4), 3, bytes(4), "000000000777", b"\x00\x00\x00\x01")
    obj = describe_frame(build_frame(ADDR, SecurityReply(SecurityDI.STATUS_QUERY, reply)))
    assert obj["body"] == "StatusQueryReply" and obj["remaining"] == 12345 and obj["key_info"] == "00000001"
