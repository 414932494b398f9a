"""Every function's payloads: parse(build(x)) == x through whole frames, and the layouts of §2, §4, §7."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dlt645 import (
    BroadcastTime,
    ChangeBaudReply,
    ChangeBaudRequest,
    ChangePasswordReply,
    ChangePasswordRequest,
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
    MeterError,
    MultiFunctionOutputReply,
    MultiFunctionOutputRequest,
    Password,
    PayloadError,
    ReadAddressReply,
    ReadAddressRequest,
    ReadFollowUpReply,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    RelayCommand,
    RelayControlReply,
    RelayControlRequest,
    RelayErrorReply,
    RelayExecution,
    SecurityErrorReply,
    SecurityFlags,
    WriteAddressReply,
    WriteAddressRequest,
    WriteReply,
    WriteRequest,
    build_frame,
    decode_frame,
    parse_payload,
)
from protocols.dlt645.edition1997 import (
    BroadcastTime1997,
    ChangeBaud1997Reply,
    ChangeBaud1997Request,
    ChangePassword1997Reply,
    ChangePassword1997Request,
    DemandReset1997Reply,
    DemandReset1997Request,
    Read1997Reply,
    Read1997Request,
    ReadFollowUp1997Reply,
    ReadFollowUp1997Request,
    Reread1997Request,
    Write1997Reply,
    Write1997Request,
    WriteAddress1997Reply,
    WriteAddress1997Request,
)
from protocols.dlt645.formats import METER_TZ
from protocols.dlt645.payloads import ErrorFlags1997, RelayErrorFlags, flag_names

addresses = st.text("0123456789", min_size=12, max_size=12)
di4 = st.integers(0, 0xFFFFFFFF)
di2 = st.integers(0, 0xFFFF)
byte = st.integers(0, 255)
# A password's three bytes are kept exactly, BCD or not (the meter ignores them at 96..99 and
# refuses a mismatch at the other levels as a wrong password, dlt645.md §2.3).
password_codes = st.one_of(
    st.text("0123456789", min_size=6, max_size=6),
    st.binary(min_size=3, max_size=3).map(lambda b: b.hex().upper()),
)
passwords = st.builds(Password, st.sampled_from([0, 1, 2, 3, 4, 9, 0x96, 0x97, 0x98, 0x99]), password_codes)
operators = st.binary(min_size=4, max_size=4).map(lambda b: b.hex().upper())
clocks = st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31, 23, 59, 59)).map(
    lambda d: d.replace(microsecond=0, tzinfo=METER_TZ)
)
bauds = st.sampled_from([600, 1200, 2400, 4800, 9600, 19200])
_FREEZE_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12)]  # minute, hour, day, month


@st.composite
def freezes(draw) -> FreezeRequest:
    """Valid 0x16 requests: 99 (every) only from the month down (§2.1)."""
    wild = draw(st.integers(0, 4))  # how many fields, from the month down, are 99
    values = [draw(st.integers(lo, hi)) for lo, hi in _FREEZE_RANGES]
    for k in range(wild):
        values[3 - k] = 99
    return FreezeRequest(*values)


# Abnormal replies: 2007 functions 0x11..0x1D (0x03 answers with SERR, 0x1C may use a word).
error_replies_2007 = st.builds(
    lambda err, function: ErrorReply(err, function, Edition.V2007), byte, st.integers(0x11, 0x1D)
)
error_replies_1997 = st.builds(
    lambda err, function: ErrorReply(err, function, Edition.V1997),
    byte,
    st.sampled_from([0x01, 0x02, 0x04, 0x0A, 0x0C, 0x0F, 0x10]),
)

payloads_2007 = st.one_of(
    st.builds(BroadcastTime, clocks),
    st.builds(ReadRequest, di4, st.binary(max_size=6)),
    st.builds(ReadReply, di4, st.binary(max_size=200)),
    st.builds(ReadFollowUpRequest, di4, byte),
    st.builds(ReadFollowUpReply, di4, st.binary(max_size=200), byte),
    st.just(ReadAddressRequest()),
    st.builds(ReadAddressReply, addresses),
    st.builds(WriteRequest, di4, passwords, operators, st.binary(max_size=200)),
    st.just(WriteReply()),
    st.builds(WriteAddressRequest, addresses),
    st.just(WriteAddressReply()),
    freezes(),
    st.just(FreezeReply()),
    st.builds(ChangeBaudRequest, bauds),
    st.builds(ChangeBaudReply, bauds),
    st.builds(ChangePasswordRequest, passwords, passwords.filter(lambda p: p.level <= 9)),
    st.builds(ChangePasswordReply, st.none() | passwords),
    st.builds(DemandResetRequest, passwords, operators),
    st.just(DemandResetReply()),
    st.builds(MeterClearRequest, passwords, operators, st.binary(max_size=40)),
    st.just(MeterClearReply()),
    st.builds(EventClearRequest, passwords, operators, di4),
    st.just(EventClearReply()),
    st.builds(MultiFunctionOutputRequest, byte),
    st.builds(MultiFunctionOutputReply, byte),
    st.builds(
        RelayControlRequest, passwords.filter(lambda p: p.level < 0x98), operators, byte, st.none() | clocks, byte
    ),
    st.builds(EncryptedRelayControlRequest, st.just(Password(0x98)), operators, st.binary(min_size=20, max_size=20)),
    st.builds(RelayControlReply, st.none() | st.integers(0, 0xFFFF).map(RelayExecution)),
    st.builds(RelayErrorReply, st.integers(0, 0xFFFF).map(RelayErrorFlags)),
    error_replies_2007,
    st.builds(SecurityErrorReply, st.integers(0, 0xFFFF).map(SecurityFlags)),
)

payloads_1997 = st.one_of(
    st.builds(Read1997Request, di2),
    st.builds(Read1997Reply, di2, st.binary(max_size=200)),
    st.builds(ReadFollowUp1997Request, di2),
    st.builds(ReadFollowUp1997Reply, di2, st.binary(max_size=200)),
    st.just(Reread1997Request()),
    st.builds(Write1997Request, di2, passwords, st.binary(max_size=100)),
    st.just(Write1997Reply()),
    st.builds(WriteAddress1997Request, addresses),
    st.just(WriteAddress1997Reply()),
    st.builds(ChangeBaud1997Request, byte),
    st.builds(ChangeBaud1997Reply, byte),
    st.builds(ChangePassword1997Request, passwords, passwords),
    st.builds(ChangePassword1997Reply, st.binary(max_size=8)),
    st.builds(DemandReset1997Request, passwords),
    st.just(DemandReset1997Reply()),
    error_replies_1997,
)
# 0x08 is the same in both editions and guessed as 2007: 1997 only when the edition is forced.
payloads_1997_forced = st.one_of(payloads_1997, st.builds(BroadcastTime1997, clocks))


def edition_of(payload) -> Edition:
    return payload.edition if isinstance(payload, ErrorReply) else payload.EDITION


@settings(max_examples=400)
@given(addresses, st.one_of(payloads_2007, payloads_1997_forced), st.integers(0, 4))
def test_every_payload_round_trips_through_the_wire(address, payload, preamble):
    frame = build_frame(address, payload)
    wire = frame.encode(preamble)
    decoded = decode_frame(wire, edition_of(payload))
    assert decoded == frame
    assert parse_payload(decoded) == payload
    assert type(parse_payload(decoded)) is type(payload)


@given(addresses, payloads_2007)
def test_edition_is_derived_from_the_control_code(address, payload):
    wire = build_frame(address, payload).encode()
    assert decode_frame(wire).edition is Edition.V2007


@given(addresses, payloads_1997)
def test_1997_edition_is_derived_from_the_control_code(address, payload):
    wire = build_frame(address, payload).encode()
    assert decode_frame(wire).edition is Edition.V1997


@settings(max_examples=300)
@given(st.integers(0, 255), st.binary(max_size=60), st.sampled_from(list(Edition)))
def test_arbitrary_data_raises_only_codec_errors(control, data, edition):
    frame = Frame("000000000001", control, data, edition)
    try:
        parse_payload(frame)
    except Dlt645Error:
        pass


@given(addresses, st.integers(0, 255), st.sampled_from([0x11, 0x14, 0x19]))
def test_abnormal_reply_is_a_typed_error(address, err, function):
    frame = Frame(address, 0xC0 | function, bytes([err]))
    payload = parse_payload(frame)
    assert isinstance(payload, ErrorReply)
    assert payload.error_code == err and payload.function == function
    exc = payload.error()
    assert isinstance(exc, MeterError) and isinstance(exc, Dlt645Error)
    assert exc.flags == ErrorFlags(err)


def test_abnormal_1997_reply_uses_1997_names():
    payload = parse_payload(Frame("000000000001", 0xC1, b"\x02"))
    assert payload.flags.name == "DI_ERROR"


def test_relay_plaintext_layout_matches_esph_example():
    # ESPH/FW-B: PA=02, password 123456, operator 0, N1, N2=0, validity ss mm hh DD MM YY (§4.1)
    req = RelayControlRequest(
        Password(0x02, "123456"),
        "00000000",
        RelayCommand.DIRECT_CLOSE,
        datetime(2026, 11, 26, 22, 30, 15, tzinfo=METER_TZ),
    )
    assert req.to_bytes() == bytes.fromhex("02 56 34 12 00000000 1C 00 15 30 22 26 11 26")
    frame = build_frame("000000000001", req)
    assert frame.length == 16 and frame.control.byte == 0x1C
    assert req.expired(datetime(2026, 11, 26, 22, 30, 16, tzinfo=METER_TZ))
    assert not req.expired(datetime(2026, 11, 26, 22, 30, 15, tzinfo=METER_TZ))


def test_relay_encrypted_form_is_28_bytes_and_reversed():
    block = bytes(range(20))
    req = EncryptedRelayControlRequest(Password(0x98), "00000001", block)
    data = req.to_bytes()
    assert len(data) == 28 and data[0] == 0x98 and data[8:] == block[::-1]


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"", RelayControlReply()),
        (b"\x04\x00", RelayControlReply(RelayExecution.DIRECT_TRIP)),
    ],
)
def test_relay_reply_both_forms(data, expected):
    assert parse_payload(Frame("000000000001", 0x9C, data)) == expected


def test_relay_error_both_forms():
    short = parse_payload(Frame("000000000001", 0xDC, b"\x04"))
    assert isinstance(short, ErrorReply) and short.flags == ErrorFlags.PASSWORD
    word = parse_payload(Frame("000000000001", 0xDC, b"\x20\x00"))
    assert isinstance(word, RelayErrorReply) and word.flags == RelayErrorFlags.TRIP_REFUSED_POWER_HOLD


def test_relay_request_of_wrong_length_is_refused():
    with pytest.raises(PayloadError):
        parse_payload(Frame("000000000001", 0x1C, bytes(17)))


def test_broadcast_time_wire_order_is_seconds_first():
    # §2.1, §10: ss mm hh DD MM YY (not PY-645's natural order)
    t = datetime(2026, 11, 26, 21, 30, 5, tzinfo=METER_TZ)
    assert BroadcastTime(t).to_bytes() == bytes.fromhex("05 30 21 26 11 26")


def test_freeze_wire_order_and_wildcards():
    assert FreezeRequest(0, 0, 99, 99).to_bytes() == bytes.fromhex("00 00 99 99")  # daily at 00:00
    assert FreezeRequest().to_bytes() == bytes.fromhex("99 99 99 99")  # instantaneous


def test_change_baud_uses_firmware_feature_bits_not_bcd():
    assert ChangeBaudRequest(9600).to_bytes() == b"\x20"  # FW-A/FW-B; PY-645 would send 0x32 (§10)


def test_change_password_di_is_04000c01_plus_level():
    req = ChangePasswordRequest(Password(0, "000000"), Password(4, "123456"))
    assert req.to_bytes()[:4] == (0x04000C05).to_bytes(4, "little")


@given(st.binary(min_size=4, max_size=4))
def test_a_password_keeps_its_bytes(raw):
    """Any PA P0 P1 P2 parses, and builds back to the same bytes (no digit is replaced)."""
    password = Password.from_bytes(raw)
    assert password.to_bytes() == raw and password.level == raw[0]
    assert password.code == raw[1:4][::-1].hex().upper()
    assert password.is_bcd == all(b >> 4 < 10 and b & 15 < 10 for b in raw[1:4])


@pytest.mark.parametrize("level", [0x96, 0x97, 0x98, 0x99, 0x02, 0x04])
def test_non_bcd_password_digits_survive_a_frame(level):
    # Review finding: at 96..99 digits that are not BCD were silently replaced by 000000.
    data = bytes.fromhex("01 10 00 04") + bytes((level,)) + bytes.fromhex("AB CD EF") + bytes(4) + bytes(8)
    request = parse_payload(Frame("000000000001", 0x14, data))
    assert isinstance(request, WriteRequest)
    assert request.password == Password(level, "EFCDAB") and not request.password.is_bcd
    assert request.to_bytes() == data


def test_password_text_is_checked():
    assert Password(0x98, "abcdef") == Password(0x98, "ABCDEF")  # hex digits, any case
    for bad in ("12345", "1234567", "12345G", "12 456", 123456):
        with pytest.raises(PayloadError):
            Password(0x04, bad)
    with pytest.raises(PayloadError):
        Password(0x100, "000000")


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"", ChangePasswordReply()), (bytes.fromhex("04 56 34 12"), ChangePasswordReply(Password(4, "123456")))],
)
def test_change_password_reply_with_and_without_data(data, expected):
    """0x98: L = 0 (accepted, nothing more) or L = 4 (the new password), dlt645.md §2.1 [L]."""
    reply = parse_payload(Frame("000000000001", 0x98, data))
    assert reply == expected and reply.to_bytes() == data


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_change_password_reply_of_another_length_is_refused(size):
    with pytest.raises(PayloadError, match="0 or 4 data bytes"):
        parse_payload(Frame("000000000001", 0x98, bytes(size)))


def test_write_mac_split():
    req = WriteRequest(0x04001001, Password(0x99), "00000000", bytes.fromhex("00200000DEADBEEF"))
    assert req.mac_split() == (bytes.fromhex("00200000"), bytes.fromhex("DEADBEEF"))


def test_1997_reread_is_told_apart_from_2007_security():
    frame = decode_frame(bytes.fromhex("68 01 00 00 00 00 00 68 03 00 D4 16"))
    assert frame.edition is Edition.V1997
    assert isinstance(parse_payload(frame), Reread1997Request)


def test_broadcast_time_1997_when_forced():
    t = datetime(2026, 11, 26, 21, 30, 5, tzinfo=METER_TZ)
    frame = build_frame("999999999999", BroadcastTime1997(t))
    assert frame.edition is Edition.V1997 and frame.data == bytes.fromhex("05 30 21 26 11 26")
    assert decode_frame(frame.encode()).edition is Edition.V2007  # 0x08 alone says nothing
    assert parse_payload(decode_frame(frame.encode(), Edition.V1997)) == BroadcastTime1997(t)


@pytest.mark.parametrize(
    "fields",
    [
        (0, 0, 1, 31),  # month 31 (review: was accepted)
        (0, 0, 1, 13),
        (0, 0, 1, 0),
        (0, 0, 0, 1),  # day 0
        (0, 0, 32, 99),
        (0, 24, 99, 99),
        (60, 99, 99, 99),
        (0, 99, 1, 1),  # 99 below a set field
        (99, 0, 99, 99),
        (0, 0, 99, 5),
    ],
)
def test_freeze_request_fields_are_validated(fields):
    with pytest.raises(PayloadError):
        FreezeRequest(*fields)
    wire = bytes(int(f"{v:02d}", 16) for v in fields)
    with pytest.raises(PayloadError):
        parse_payload(Frame("000000000001", 0x16, wire))


@pytest.mark.parametrize(
    "fields",
    [(0, 0, 1, 1), (59, 23, 31, 12), (30, 12, 15, 99), (30, 12, 99, 99), (30, 99, 99, 99), (99, 99, 99, 99)],
)
def test_freeze_request_valid_fields(fields):
    assert parse_payload(Frame("000000000001", 0x16, FreezeRequest(*fields).to_bytes())) == FreezeRequest(*fields)


def test_flag_names_lists_undefined_bits():
    assert flag_names(SecurityFlags(0x8000)) == ["reserved_bit_15"]
    assert flag_names(SecurityFlags(0x8002)) == ["repeat_recharge", "reserved_bit_15"]
    assert flag_names(RelayErrorFlags(0xFF00)) == ["auto_restore_already_tripped"] + [
        f"reserved_bit_{n}" for n in range(9, 16)
    ]
    assert flag_names(ErrorFlags(0x80)) == ["reserved"]  # named in §2.2
    assert flag_names(ErrorFlags1997(0x09)) == ["illegal_data", "unused"]
    assert flag_names(RelayExecution(0x10C0)) == ["reserved_bit_6", "reserved_bit_7", "reserved_bit_12"]
    assert flag_names(ErrorFlags(0)) == []


@given(st.integers(0, 0xFFFF))
def test_flag_names_account_for_every_bit(word):
    names = flag_names(SecurityFlags(word))
    assert len(names) == bin(word).count("1")


@pytest.mark.parametrize(
    ("operator", "message"),
    [("123", "not 8 hex digits"), ("0000000001", "not 8 hex digits"), ("0000000G", "not hex"), ("", "not 8")],
)
def test_operator_code_errors_say_what_is_wrong(operator: str, message: str):
    from protocols.dlt645.payloads import operator_bytes

    with pytest.raises(PayloadError, match=message):
        operator_bytes(operator)
