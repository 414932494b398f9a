"""0x03 security authentication payloads (protocols/dlt645/security.py, dlt645.md §5).

Round trips for every body type (directly and through whole frames), the wire layouts that
§5.2 pins down (recharge L = 0x1E, identity authentication L = 0x20 / 0x10, validity
period L = 0x0E), ESAM byte strings reversed on the wire, SERR replies in both forms (§5.4),
and decoding of arbitrary bytes raising nothing but PayloadError.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.dlt645.control import Edition
from protocols.dlt645.errors import PayloadError
from protocols.dlt645.frame import Frame, decode_frame, encode_frame
from protocols.dlt645.payloads import (
    SecurityErrorReply,
    SecurityFlags,
    build_frame,
    encode_payload,
    parse_payload,
)
from protocols.dlt645.security import (
    EMPTY,
    REPLY_BODIES,
    REQUEST_BODIES,
    ComparisonRequest,
    EmptyBody,
    EsamWriteRequest,
    IdentityAuthReply,
    IdentityAuthRequest,
    InfraredAuthRequest,
    InfraredRequest,
    KeyRecord,
    KeyUpdateRequest,
    RawBody,
    ReadBackReply,
    ReadBackRequest,
    RechargeRequest,
    SecurityBody,
    SecurityDI,
    SecurityReply,
    SecurityRequest,
    StatusQueryReply,
    TerminateAuthReply,
    ValidityPeriodRequest,
    WalletInitRequest,
    describe_security,
)

ADDRESS = "123456789012"
ADDRESS_WIRE = "12 90 78 56 34 12"

FAST = settings(max_examples=60, deadline=None)


def raw(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


u32 = st.integers(0, 0xFFFFFFFF)
digits12 = st.text("0123456789", min_size=12, max_size=12)
operators = raw(4).map(lambda b: b.hex().upper())
addresses = digits12

BODIES: dict[type[SecurityBody], st.SearchStrategy[Any]] = {
    EmptyBody: st.just(EMPTY),
    RawBody: st.builds(RawBody, st.binary(max_size=200)),
    IdentityAuthRequest: st.builds(IdentityAuthRequest, raw(8), raw(8), raw(8)),
    IdentityAuthReply: st.builds(IdentityAuthReply, raw(4), raw(8)),
    ValidityPeriodRequest: st.builds(ValidityPeriodRequest, st.integers(1, 9999), raw(4)),
    TerminateAuthReply: st.builds(TerminateAuthReply, digits12, u32, u32, raw(4)),
    InfraredAuthRequest: st.builds(InfraredAuthRequest, raw(8)),
    EsamWriteRequest: st.builds(
        EsamWriteRequest, st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.binary(max_size=200), raw(4)
    ),
    RechargeRequest: st.builds(RechargeRequest, u32, u32, raw(4), digits12, raw(4)),
    WalletInitRequest: st.builds(WalletInitRequest, u32, raw(4), u32, raw(4)),
    KeyUpdateRequest: st.builds(
        KeyUpdateRequest, st.lists(st.builds(KeyRecord, raw(32), raw(4)), min_size=1, max_size=6).map(tuple), raw(4)
    ),
    ReadBackRequest: st.builds(ReadBackRequest, raw(8)),
    ReadBackReply: st.builds(ReadBackReply, raw(8), st.binary(max_size=200), raw(4)),
    ComparisonRequest: st.builds(ComparisonRequest, st.binary(max_size=40)),
    InfraredRequest: st.builds(InfraredRequest, raw(8)),
    StatusQueryReply: st.builds(StatusQueryReply, u32, raw(4), u32, raw(4), digits12, raw(4)),
}


def _known(table: dict[int, type[SecurityBody]]) -> st.SearchStrategy[tuple[int, Any]]:
    return st.sampled_from(sorted(table.items())).flatmap(lambda kv: st.tuples(st.just(kv[0]), BODIES[kv[1]]))


def _unknown(table: dict[int, type[SecurityBody]]) -> st.SearchStrategy[tuple[int, Any]]:
    return st.tuples(u32.filter(lambda di: di not in table), BODIES[RawBody])


requests = st.one_of(_known(REQUEST_BODIES), _unknown(REQUEST_BODIES)).flatmap(
    lambda di_body: st.builds(SecurityRequest, st.just(di_body[0]), operators, st.just(di_body[1]))
)
replies = st.one_of(_known(REPLY_BODIES), _unknown(REPLY_BODIES)).map(lambda di_body: SecurityReply(*di_body))


def _through_wire(address: str, payload: Any) -> Any:
    frame = build_frame(address, payload)
    wire = encode_frame(frame.address, frame.control.byte, frame.data)
    return parse_payload(decode_frame(wire))


# --- round trips -----------------------------------------------------------------------------


def test_every_body_type_has_a_strategy() -> None:
    used = set(REQUEST_BODIES.values()) | set(REPLY_BODIES.values()) | {RawBody}
    assert used == set(BODIES)


@pytest.mark.parametrize("cls", list(BODIES), ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_body_round_trip(cls: type[SecurityBody], data: st.DataObject) -> None:
    body = data.draw(BODIES[cls])
    wire = body.to_bytes()
    assert cls.from_bytes(wire) == body
    if cls.SIZE is not None:
        assert len(wire) == cls.SIZE


@FAST
@given(requests, addresses)
def test_request_round_trip_through_frames(request: SecurityRequest, address: str) -> None:
    assert SecurityRequest.from_bytes(request.to_bytes()) == request
    assert build_frame(address, request).control.byte == 0x03
    assert _through_wire(address, request) == request
    json.dumps(describe_security(request))


@FAST
@given(replies, addresses)
def test_reply_round_trip_through_frames(reply: SecurityReply, address: str) -> None:
    assert SecurityReply.from_bytes(reply.to_bytes()) == reply
    assert build_frame(address, reply).control.byte == 0x83
    assert _through_wire(address, reply) == reply
    json.dumps(describe_security(reply))


def test_unknown_di_parses_to_raw_body() -> None:
    req = parse_payload(Frame(ADDRESS, 0x03, bytes.fromhex("FF0000FF 00000000 0102"), Edition.V2007))
    assert req == SecurityRequest(0xFF0000FF, "00000000", RawBody(b"\x01\x02"))
    assert req.name is None
    rep = parse_payload(Frame(ADDRESS, 0x83, bytes.fromhex("FF0000FF 0102"), Edition.V2007))
    assert rep == SecurityReply(0xFF0000FF, RawBody(b"\x01\x02"))


# --- exact wire layouts ----------------------------------------------------------------------


def test_recharge_request_wire_layout() -> None:
    request = SecurityRequest(
        SecurityDI.RECHARGE,
        "12345678",
        RechargeRequest(
            amount=10000,  # 100.00 yuan
            purchase_count=3,
            mac1=bytes.fromhex("A1A2A3A4"),
            customer_number="112233445566",
            mac2=bytes.fromhex("B1B2B3B4"),
        ),
    )
    plain = request.to_bytes()
    assert plain == bytes.fromhex(
        "FF020107"  # DI 070102FF, DI0 first
        "78563412"  # operator 12345678, C0 first
        "10270000"  # amount 10000 fen, binary little-endian
        "03000000"  # purchase count 3
        "A4A3A2A1"  # MAC1 reversed
        "665544332211"  # customer number, BCD low byte first
        "B4B3B2B1"  # MAC2 reversed
    )
    wire = encode_payload(ADDRESS, request, preamble=0)
    assert wire == bytes.fromhex(
        f"68 {ADDRESS_WIRE} 68 03 1E"
        " 32 35 34 3A  AB 89 67 45  43 5A 33 33  36 33 33 33  D7 D6 D5 D4  99 88 77 66 55 44  E7 E6 E5 E4"
        " B1 16"
    )
    assert wire[9] == 0x1E
    assert sum(wire[:-2]) & 0xFF == wire[-2]
    assert parse_payload(decode_frame(wire)) == request


def test_account_opening_shares_the_recharge_layout() -> None:
    body = RechargeRequest(1, 1, bytes(4), "000000000001", bytes(4))
    opening = SecurityRequest(SecurityDI.ACCOUNT_OPENING, "00000000", body)
    assert len(opening.to_bytes()) == 0x1E
    assert describe_security(opening)["name"] == "account_opening"


def test_identity_authentication_lengths_and_byte_order() -> None:
    body = IdentityAuthRequest.for_meter(bytes(range(8)), bytes(range(8, 16)), ADDRESS)
    assert body.dispersion_factor == bytes.fromhex("0000123456789012")
    assert body.meter_number == ADDRESS
    request = SecurityRequest(SecurityDI.IDENTITY_AUTHENTICATION, "00000000", body)
    wire = encode_payload(ADDRESS, request, preamble=0)
    assert wire[8:10] == b"\x03\x20"
    data = decode_frame(wire).data
    assert data[8:16] == bytes(range(8))[::-1]  # ciphertext1 reversed
    assert data[16:24] == bytes(range(8, 16))[::-1]  # random1 reversed
    assert data[24:32] == bytes.fromhex(ADDRESS_WIRE + " 00 00")  # dispersion factor reversed

    reply = SecurityReply(SecurityDI.IDENTITY_AUTHENTICATION, IdentityAuthReply(b"\x01\x02\x03\x04", bytes(range(8))))
    wire = encode_payload(ADDRESS, reply, preamble=0)
    assert wire[8:10] == b"\x83\x10"
    assert decode_frame(wire).data[4:] == bytes.fromhex("04030201 0706050403020100")
    assert parse_payload(decode_frame(wire)) == reply


def test_dispersion_factor_that_is_not_a_meter_number() -> None:
    assert IdentityAuthRequest(bytes(8), bytes(8), bytes.fromhex("0100123456789012")).meter_number is None
    assert IdentityAuthRequest(bytes(8), bytes(8), bytes.fromhex("00001234567890AB")).meter_number is None
    with pytest.raises(PayloadError):
        IdentityAuthRequest.for_meter(bytes(8), bytes(8), "12345")


def test_validity_period_layout() -> None:
    request = SecurityRequest(SecurityDI.VALIDITY_PERIOD, "00000000", ValidityPeriodRequest(30, b"\x01\x02\x03\x04"))
    assert request.to_bytes()[8:] == bytes.fromhex("3000 04030201")  # 0030 min, low byte first; MAC reversed
    assert len(request.to_bytes()) == 0x0E
    # FW-B's success reply is the DI alone: 68+addr+68+83+04+FF010007+CS+16
    reply = parse_payload(Frame(ADDRESS, 0x83, bytes.fromhex("FF010007"), Edition.V2007))
    assert reply == SecurityReply(SecurityDI.VALIDITY_PERIOD)


def test_money_and_customer_number_in_replies() -> None:
    terminate = TerminateAuthReply("000012345678", 123456, 7, b"\x0f\x00\x00\x00")
    assert terminate.to_bytes() == bytes.fromhex("785634120000 40E20100 07000000 0F000000")
    status = StatusQueryReply(5000, b"MAC1", 2, b"MAC2", "000000000042", bytes(4))
    expected = b"".join(
        (bytes.fromhex("88130000"), b"1CAM", bytes.fromhex("02000000"), b"2CAM", bytes.fromhex("420000000000 00000000"))
    )
    assert status.to_bytes() == expected


def test_esam_write_and_read_back_reverse_their_data() -> None:
    write = EsamWriteRequest(file=0x0B, offset=0x0102, data=b"\x01\x02\x03", mac=b"\xaa\xbb\xcc\xdd")
    assert write.to_bytes() == bytes.fromhex("0B 0201 030201 DDCCBBAA")
    back = ReadBackReply(bytes.fromhex("0500000006000100"), b"\x01\x02\x03\x04\x05", b"\xaa\xbb\xcc\xdd")
    assert back.to_bytes() == bytes.fromhex("0500000006000100 0504030201 DDCCBBAA")


def test_key_update_layout() -> None:
    records = (KeyRecord(bytes(range(32)), b"\x01\x03\x00\x14"), KeyRecord(bytes(32), b"\x01\x04\x00\x14"))
    body = KeyUpdateRequest(records, b"\x01\x02\x03\x04")
    plain = body.to_bytes()
    assert len(plain) == 2 * 36 + 4
    assert plain[:32] == bytes(range(32))[::-1] and plain[32:36] == b"\x01\x03\x00\x14"
    assert plain[-4:] == b"\x04\x03\x02\x01"
    assert len(SecurityRequest(SecurityDI.KEY_UPDATE, "00000000", body).to_bytes()) == 12 + 36 * 2
    assert (records[0].state, records[0].number, records[0].total) == (1, 3, 20)


def test_describe_security() -> None:
    request = SecurityRequest(
        SecurityDI.RECHARGE, "00000001", RechargeRequest(10000, 3, b"\x01\x02\x03\x04", "112233445566", bytes(4))
    )
    assert describe_security(request) == {
        "di": "070102FF",
        "name": "recharge",
        "operator": "00000001",
        "body": "RechargeRequest",
        "amount": 10000,
        "purchase_count": 3,
        "mac1": "01020304",
        "customer_number": "112233445566",
        "mac2": "00000000",
    }
    auth = SecurityRequest(
        SecurityDI.IDENTITY_AUTHENTICATION, "00000000", IdentityAuthRequest.for_meter(bytes(8), bytes(8), ADDRESS)
    )
    described = describe_security(auth)
    assert described["name"] == "identity_authentication"
    assert described["dispersion_factor"] == "0000123456789012"
    assert described["meter_number"] == ADDRESS


# --- SERR (0xC3) -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "flags"),
    [
        ("0801", SecurityFlags.AUTHENTICATION | SecurityFlags.SUSPENDED),  # 2 bytes, low first (FW-A)
        ("FF0801", SecurityFlags.AUTHENTICATION | SecurityFlags.SUSPENDED),  # FF lo hi (FW-B)
        ("0200", SecurityFlags.REPEAT_RECHARGE),
        ("FF2000", SecurityFlags.PURCHASE_COUNT),
        ("4000", SecurityFlags.HOARDING_LIMIT),
    ],
)
def test_serr_reply(data: str, flags: SecurityFlags) -> None:
    wire = encode_frame(ADDRESS, 0xC3, bytes.fromhex(data))
    reply = parse_payload(decode_frame(wire))
    assert isinstance(reply, SecurityErrorReply)
    assert reply.flags == flags
    assert describe_security(reply)["error_code"] == int(flags)


def test_serr_reply_of_wrong_length() -> None:
    for data in ("", "08", "080100", "FE0801"):
        with pytest.raises(PayloadError):
            parse_payload(Frame(ADDRESS, 0xC3, bytes.fromhex(data), Edition.V2007))


# --- validation ------------------------------------------------------------------------------

INVALID: list[Callable[[], Any]] = [
    lambda: RechargeRequest(100.0, 1, bytes(4), "000000000001", bytes(4)),  # type: ignore[arg-type]
    lambda: RechargeRequest(-1, 1, bytes(4), "000000000001", bytes(4)),
    lambda: RechargeRequest(1 << 32, 1, bytes(4), "000000000001", bytes(4)),
    lambda: RechargeRequest(1, 1, bytes(3), "000000000001", bytes(4)),
    lambda: RechargeRequest(1, 1, bytes(4), "00000000001", bytes(4)),
    lambda: RechargeRequest(1, 1, bytes(4), "00000000000A", bytes(4)),
    lambda: ValidityPeriodRequest(0, bytes(4)),
    lambda: ValidityPeriodRequest(10000, bytes(4)),
    lambda: IdentityAuthRequest(bytes(8), bytes(7), bytes(8)),
    lambda: KeyUpdateRequest((), bytes(4)),
    lambda: KeyRecord(bytes(31), bytes(4)),
    lambda: EsamWriteRequest(256, 0, b"", bytes(4)),
    lambda: SecurityRequest(SecurityDI.RECHARGE, "00000000", RawBody(bytes(22))),
    lambda: SecurityRequest(SecurityDI.TERMINATE_AUTHENTICATION, "00000000", RawBody(b"")),
    lambda: SecurityRequest(0x070000FF, "0000000", IdentityAuthRequest(bytes(8), bytes(8), bytes(8))),
    lambda: SecurityReply(SecurityDI.STATUS_QUERY),
    lambda: SecurityReply(-1, RawBody(b"")),
]


@pytest.mark.parametrize("make", INVALID)
def test_invalid_values_raise_payload_error(make: Callable[[], Any]) -> None:
    with pytest.raises(PayloadError):
        make()


@pytest.mark.parametrize(
    ("di", "body", "message"),
    [
        (SecurityDI.RECHARGE, "00" * 21, "22 bytes"),
        (SecurityDI.RECHARGE, "00" * 12 + "0A0000000000" + "00" * 4, "customer number .* not BCD"),
        (SecurityDI.VALIDITY_PERIOD, "0000 00000000", "0000 is refused"),
        (SecurityDI.VALIDITY_PERIOD, "1A00 00000000", "not BCD"),
        (SecurityDI.KEY_UPDATE, "00" * 39, "36-byte key records"),
        (SecurityDI.TERMINATE_AUTHENTICATION, "00", "0 bytes"),
        (SecurityDI.ESAM_WRITE_PLAIN, "00" * 6, "at least 7"),
    ],
)
def test_bad_request_bodies(di: int, body: str, message: str) -> None:
    data = di.to_bytes(4, "little") + bytes(4) + bytes.fromhex(body)
    with pytest.raises(PayloadError, match=message):
        parse_payload(Frame(ADDRESS, 0x03, data, Edition.V2007))


def test_operator_is_normalised() -> None:
    assert SecurityRequest(SecurityDI.STATUS_QUERY, "abcdef01").operator == "ABCDEF01"


# --- arbitrary bytes -------------------------------------------------------------------------


def _parse_quietly(frame: Frame) -> None:
    try:
        payload = parse_payload(frame)
    except PayloadError:
        return
    json.dumps(describe_security(payload))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=255), st.sampled_from([0x03, 0x83, 0xC3]))
def test_arbitrary_bytes_raise_only_payload_error(data: bytes, control: int) -> None:
    _parse_quietly(Frame(ADDRESS, control, data, Edition.V2007))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(SecurityDI)), raw(4), st.binary(max_size=80), st.booleans())
def test_arbitrary_bodies_of_known_dis_raise_only_payload_error(
    di: SecurityDI, operator: bytes, body: bytes, response: bool
) -> None:
    head = di.to_bytes(4, "little")
    data = head + body if response else head + operator + body
    _parse_quietly(Frame(ADDRESS, 0x83 if response else 0x03, data, Edition.V2007))


# --- registration ----------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["protocols.dlt645.payloads", "protocols.dlt645.security", "protocols.dlt645"])
def test_importing_any_module_registers_the_parsers(first: str) -> None:
    code = (
        f"import {first}\n"
        "from protocols.dlt645.frame import Frame\n"
        "from protocols.dlt645.payloads import parse_payload\n"
        "p = parse_payload(Frame('123456789012', 0x83, bytes.fromhex('FF010007')))\n"
        "assert type(p).__name__ == 'SecurityReply', p\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
