"""Interoperability with the PyPI ``dlt645`` package (pinned 3.2.0, a test-only dependency).

Both directions of the read transaction (0x11 / 0x91) and of read-address (0x13 / 0x93):
frames that ``dlt645`` builds must decode in ours, and frames ours builds must decode in
``dlt645`` and be answered by its simulated meter (``MeterServerService.handle_request``,
which works without a transport). ``MeterClientService`` is driven through an in-memory
transport whose "meter" is our codec, so its own request builder and reply parser are used.

Address order (shared/reference/peers.md §1): ``dlt645`` puts the address string's bytes
on the wire in written order, whereas ours (and the standard, dlt645.md §1.2) sends the
nameplate low byte first. So ``dlt645`` is handed :func:`wire_order` of our address.

The ``test_deviation_*`` tests pin where ``dlt645`` departs from dlt645.md; if one of them
starts failing after a ``dlt645`` upgrade, the deviation was fixed upstream.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.dlt645.control import Edition
from protocols.dlt645.errors import FrameError, PayloadError, ValueFormatError
from protocols.dlt645.formats import Number, StatusWord
from protocols.dlt645.frame import decode_frame
from protocols.dlt645.payloads import (
    ErrorReply,
    ReadAddressReply,
    ReadAddressRequest,
    ReadReply,
    ReadRequest,
    encode_payload,
    parse_payload,
)
from protocols.dlt645.read import decode_read_reply, encode_read_request
from protocols.dlt645.table import DI_2007

dlt645 = pytest.importorskip("dlt645")

from dlt645 import CtrlCode, DLT645Protocol, MeterClientService, MeterServerService  # noqa: E402
from dlt645.model.data.define import DIMap  # noqa: E402

dlt645.disable_logging()  # off by default in 3.2.0; make sure a test run stays quiet

# --- helpers -----------------------------------------------------------------------------------

COMBINED_ACTIVE = 0x00000000  # signed (dlt645.md §3.2)
FORWARD_ACTIVE = 0x00010000  # unsigned
VOLTAGE_A = 0x02010100  # XXX.X V
FREQUENCY = 0x02800002  # XX.XX Hz

# Golden vectors from the peers.md §1 smoke check (dlt645 given "123456781012").
GOLDEN_REQUEST = bytes.fromhex("FEFEFEFE 68 123456781012 68 11 04 33333333 E7 16".replace(" ", ""))
GOLDEN_REPLY_50_50 = bytes.fromhex("FEFEFEFE 68 123456781012 68 91 08 33333333 83833333 D7 16".replace(" ", ""))

addresses = st.text("0123456789", min_size=12, max_size=12)
preambles = st.integers(0, 4)
# XXXXXX.XX magnitudes dlt645 can carry: it reserves the top bit as a sign for every number.
energy_units = st.integers(0, 79_999_999)
signed_energy_units = st.integers(-79_999_999, 79_999_999)

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire_order(address: str) -> str:
    """The string to hand ``dlt645`` so that it sends our 12-digit ``address``."""
    return bytes.fromhex(address)[::-1].hex()


def from_units(units: int, decimals: int) -> Decimal:
    return Decimal(units).scaleb(-decimals)


def exact(value: float) -> Decimal:
    """A float that ``dlt645`` returned, as the decimal it stands for (shortest repr)."""
    return Decimal(repr(value))


@functools.cache
def server() -> Any:
    """One ``dlt645`` simulated meter (building one deep-copies its DI map: ~0.7 s)."""
    return MeterServerService(None)


@functools.cache
def client() -> Any:
    return MeterClientService(None)


def their_server(address: str) -> Any:
    srv = server()
    srv.set_address(wire_order(address))
    return srv


def their_client(address: str, meter: Callable[[bytes], bytes | None] | None = None) -> Any:
    cli = client()
    cli.set_address(wire_order(address))
    cli.client = Loopback(meter) if meter is not None else None
    return cli


class Loopback:
    """A ``dlt645`` client transport that hands each request to ``meter`` and returns its reply."""

    def __init__(self, meter: Callable[[bytes], bytes | None]) -> None:
        self.meter = meter
        self.sent: list[bytes] = []

    def _ensure_connection(self) -> bool:
        return True

    def send_request(self, frame: bytes) -> bytes | None:
        self.sent.append(bytes(frame))
        return self.meter(bytes(frame))


def our_meter(address: str, values: dict[int, Any]) -> Callable[[bytes], bytes | None]:
    """A meter built from our codec: decode the request, answer reads of ``values``."""

    def answer(raw: bytes) -> bytes | None:
        frame = decode_frame(raw)
        request = parse_payload(frame)
        if isinstance(request, ReadAddressRequest):
            return encode_payload(address, ReadAddressReply(address))
        assert isinstance(request, ReadRequest), request
        assert frame.address == address
        item = DI_2007.lookup(request.di)
        return encode_payload(address, ReadReply(request.di, item.encode(values[request.di])))

    return answer


def our_reply(address: str, di: int, value: Any, preamble: int = 4) -> bytes:
    """A 0x91 reply built with the general path (payloads + table)."""
    return encode_payload(address, ReadReply(di, DI_2007.lookup(di).encode(value)), preamble=preamble)


def general_decode(raw: bytes) -> tuple[str, int, Any]:
    """(address, DI, value) of a read reply through the general path, to cross-check the fast one."""
    frame = decode_frame(raw)
    payload = parse_payload(frame)
    assert isinstance(payload, ReadReply)
    return frame.address, payload.di, DI_2007.lookup(payload.di).decode(payload.value)


def common_number_dis(di3: int) -> list[int]:
    """Non-block DIs of class ``di3`` both tables define as the same number format."""
    out = []
    for item in DI_2007:
        theirs = DIMap.get(item.di)
        if (
            item.di >> 24 == di3
            and not item.block
            and isinstance(item.format, Number)
            and theirs is not None
            and not isinstance(theirs, list)
            and theirs.data_format == item.format.spec
        ):
            out.append(item.di)
    return sorted(out)


ENERGY_DIS = common_number_dis(0x00)
VARIABLE_DIS = common_number_dis(0x02)


def test_pinned_version() -> None:
    assert dlt645.__version__ == "3.2.0"


def test_common_dis_exist() -> None:
    assert COMBINED_ACTIVE in ENERGY_DIS and FORWARD_ACTIVE in ENERGY_DIS
    assert VOLTAGE_A in VARIABLE_DIS and FREQUENCY in VARIABLE_DIS


def test_common_number_formats_agree() -> None:
    """Every Number-format DI both tables know has the same notation in both."""
    for item in DI_2007:
        theirs = DIMap.get(item.di)
        if theirs is None or isinstance(theirs, list) or not isinstance(item.format, Number):
            continue
        assert theirs.data_format == item.format.spec, (
            f"{item.code}: ours {item.format.spec}, theirs {theirs.data_format}"
        )


# --- golden vectors and the address trap --------------------------------------------------------


def test_golden_vectors_both_sides() -> None:
    ours_address = "121078563412"  # what dlt645's "123456781012" means on the wire
    assert wire_order(ours_address) == "123456781012"
    assert encode_read_request(ours_address, COMBINED_ACTIVE) == GOLDEN_REQUEST
    assert bytes(DLT645Protocol.build_frame(bytes.fromhex("123456781012"), CtrlCode.ReadData, bytes(4))) == (
        GOLDEN_REQUEST
    )
    assert our_reply(ours_address, COMBINED_ACTIVE, Decimal("50.50")) == GOLDEN_REPLY_50_50
    address, item, value = decode_read_reply(GOLDEN_REPLY_50_50)
    assert (address, item.di, value) == (ours_address, COMBINED_ACTIVE, Decimal("50.50"))


def test_address_trap_dlt645_sends_written_order() -> None:
    """``set_address("123456789012")`` on dlt645 is meter 129078563412 to us: dlt645.md §1.2
    sends nameplate 123456789012 as ``12 90 78 56 34 12``, dlt645 as ``12 34 56 78 90 12``."""
    cli = their_client("129078563412")
    assert bytes(cli.address) == bytes.fromhex("123456789012")
    raw = bytes(DLT645Protocol.build_frame(cli.address, CtrlCode.ReadData, bytes(4)))
    assert raw[5:11] == bytes.fromhex("123456789012")
    assert decode_frame(raw).address == "129078563412"
    assert encode_read_request("123456789012", 0)[5:11] == bytes.fromhex("129078563412")


# --- dlt645 builds, ours decodes ----------------------------------------------------------------


@HYPOTHESIS
@given(address=addresses, di=st.integers(0, 0xFFFFFFFF), preamble=preambles)
def test_their_read_request_decodes_in_ours(address: str, di: int, preamble: int) -> None:
    wire = bytes.fromhex(wire_order(address))
    raw = bytes(DLT645Protocol.build_frame(wire, CtrlCode.ReadData, struct.pack("<I", di), preamble))
    frame = decode_frame(raw)
    assert frame.address == address
    assert frame.control.byte == 0x11
    assert frame.edition is Edition.V2007
    assert parse_payload(frame) == ReadRequest(di)
    # ... and ours builds the very same bytes.
    assert encode_read_request(address, di, preamble) == raw


@HYPOTHESIS
@given(address=addresses, units=signed_energy_units)
def test_their_meter_combined_energy_decodes_exactly(address: str, units: int) -> None:
    value = from_units(units, 2)
    srv = their_server(address)
    assert srv.set_00(COMBINED_ACTIVE, float(value))
    reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, COMBINED_ACTIVE))))
    got_address, item, got = decode_read_reply(reply)
    assert (got_address, item.di, got) == (address, COMBINED_ACTIVE, value)
    assert isinstance(got, Decimal) and got.as_tuple().exponent == -2
    assert general_decode(reply) == (address, COMBINED_ACTIVE, value)
    # Byte-identical to the reply ours builds for the same value (both send 4 FE).
    assert our_reply(address, COMBINED_ACTIVE, value) == reply


@HYPOTHESIS
@given(address=addresses, di=st.sampled_from(ENERGY_DIS), units=energy_units)
def test_their_meter_energy_decodes_exactly(address: str, di: int, units: int) -> None:
    value = from_units(units, 2)
    srv = their_server(address)
    assert srv.set_00(di, float(value))
    reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, di))))
    got_address, item, got = decode_read_reply(reply)
    assert (got_address, item.di, got) == (address, di, value)
    assert general_decode(reply) == (address, di, value)
    assert our_reply(address, di, value) == reply


@pytest.mark.parametrize("di", VARIABLE_DIS, ids=lambda di: f"{di:08X}")
@pytest.mark.parametrize("share", [0, 1, 7, 13, 50, 99, 100])
def test_their_meter_variables_decode_exactly(di: int, share: int) -> None:
    """Every common 02 item, at 0 .. 100 % of the largest magnitude dlt645 allows."""
    fmt = DI_2007.lookup(di).format
    assert isinstance(fmt, Number)
    limit = 8 * 10 ** (fmt.digits - 1) - 1  # dlt645 keeps the top bit for the sign
    if (di >> 16) == 0x0206:
        limit = 999  # power factor: dlt645 refuses |PF| > 0.999
    value = from_units(limit * share // 100, fmt.decimals)
    address = "000012345678"
    srv = their_server(address)
    assert srv.set_02(di, float(value))
    reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, di))))
    assert decode_read_reply(reply)[2] == value
    assert general_decode(reply) == (address, di, value)
    assert our_reply(address, di, value) == reply


@HYPOTHESIS
@given(address=addresses, tenths=st.integers(0, 7999), hundredths=st.integers(0, 7999))
def test_their_meter_voltage_and_frequency(address: str, tenths: int, hundredths: int) -> None:
    srv = their_server(address)
    for di, value in ((VOLTAGE_A, from_units(tenths, 1)), (FREQUENCY, from_units(hundredths, 2))):
        assert srv.set_02(di, float(value))
        reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, di))))
        assert decode_read_reply(reply) == (address, DI_2007.lookup(di), value)


@HYPOTHESIS
@given(address=addresses, units=energy_units)
def test_their_client_request_decodes_in_ours_and_reads_our_reply(address: str, units: int) -> None:
    """``MeterClientService.read_00`` against a meter made of our codec, through a loopback."""
    value = from_units(units, 2)
    cli = their_client(address, our_meter(address, {FORWARD_ACTIVE: value}))
    item = cli.read_00(FORWARD_ACTIVE)
    assert item is not None
    assert exact(item.value) == value
    (sent,) = cli.client.sent
    assert parse_payload(decode_frame(sent)) == ReadRequest(FORWARD_ACTIVE)
    assert decode_frame(sent).address == address


def test_their_client_reads_voltage_from_our_meter() -> None:
    address = "000000000001"
    cli = their_client(address, our_meter(address, {VOLTAGE_A: Decimal("230.4")}))
    item = cli.read_02(VOLTAGE_A)
    assert item is not None and exact(item.value) == Decimal("230.4")


# --- ours builds, dlt645 decodes ----------------------------------------------------------------


@HYPOTHESIS
@given(address=addresses, di=st.integers(0, 0xFFFFFFFF), preamble=preambles)
def test_our_read_request_decodes_in_theirs(address: str, di: int, preamble: int) -> None:
    raw = encode_read_request(address, di, preamble)
    frame = DLT645Protocol.deserialize(raw)
    assert bytes(frame.addr) == bytes.fromhex(wire_order(address))
    assert frame.ctrl_code == CtrlCode.ReadData
    assert bytes(frame.data) == struct.pack("<I", di)
    assert len(frame.preamble) == preamble
    assert DLT645Protocol.serialize(frame) == raw  # their re-encoding is byte-identical


@HYPOTHESIS
@given(address=addresses, units=signed_energy_units, preamble=preambles)
def test_our_reply_decodes_in_theirs(address: str, units: int, preamble: int) -> None:
    value = from_units(units, 2)
    raw = our_reply(address, COMBINED_ACTIVE, value, preamble)
    frame = DLT645Protocol.deserialize(raw)
    assert bytes(frame.addr) == bytes.fromhex(wire_order(address))
    assert frame.ctrl_code == 0x91
    assert bytes(frame.data) == struct.pack("<I", COMBINED_ACTIVE) + DI_2007.lookup(COMBINED_ACTIVE).encode(value)
    item = their_client(address).handle_response(frame)
    assert item is not None and exact(item.value) == value


@HYPOTHESIS
@given(address=addresses, di=st.sampled_from(ENERGY_DIS), units=energy_units)
def test_their_meter_answers_our_request(address: str, di: int, units: int) -> None:
    value = from_units(units, 2)
    srv = their_server(address)
    assert srv.set_00(di, float(value))
    reply = srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, di, preamble=0)))
    assert reply is not None
    assert decode_read_reply(bytes(reply))[2] == value
    # And their client, on their meter's reply to our request, agrees.
    item = their_client(address).handle_response(DLT645Protocol.deserialize(bytes(reply)))
    assert item is not None and exact(item.value) == value


@pytest.mark.parametrize("di", [VOLTAGE_A, FREQUENCY], ids=lambda di: f"{di:08X}")
def test_our_variable_reply_decodes_in_theirs(di: int) -> None:
    value = Decimal("49.98") if di == FREQUENCY else Decimal("219.7")
    address = "202401010001"
    item = their_client(address).handle_response(DLT645Protocol.deserialize(our_reply(address, di, value)))
    assert item is not None and exact(item.value) == value


def test_read_address_both_ways() -> None:
    address = "202401010001"
    # Their meter answers 0x13; ours reads its address from the data field and the header.
    srv = their_server(address)
    request = encode_payload("AAAAAAAAAAAA", ReadAddressRequest())
    reply = bytes(srv.handle_request(DLT645Protocol.deserialize(request)))
    frame = decode_frame(reply)
    assert frame.address == address
    assert parse_payload(frame) == ReadAddressReply(address)
    # Their client reads our meter's 0x93 and adopts the (wire-order) address.
    cli = their_client("000000000000", our_meter(address, {}))
    item = cli.read_address()
    assert item is not None
    assert bytes(cli.address) == bytes.fromhex(wire_order(address))
    assert item.value == wire_order(address)  # dlt645 reports the written-order string


# --- where dlt645 deviates from dlt645.md (pinned) -------------------------------------------


def test_deviation_unsigned_values_above_799999_99() -> None:
    """dlt645 treats the top bit of every number as a sign (dlt645.md §3.1 reserves it for
    signed items): an unsigned 900000.00 kWh from us reads as -100000.0 there, and its meter
    refuses to hold more than 799999.99."""
    address = "000000000042"
    raw = our_reply(address, FORWARD_ACTIVE, Decimal("900000.00"))
    assert decode_read_reply(raw)[2] == Decimal("900000.00")
    item = their_client(address).handle_response(DLT645Protocol.deserialize(raw))
    assert item is not None and item.value == -100000.0
    assert not their_server(address).set_00(FORWARD_ACTIVE, 900000.0)


def test_deviation_negative_value_for_unsigned_item() -> None:
    """dlt645's meter accepts -5.00 kWh forward (unsigned) energy and sets the top bit; the
    bytes ``00 05 00 80`` are valid unsigned BCD, so ours (per the standard) reads 800005.00."""
    address = "000000000042"
    srv = their_server(address)
    try:
        assert srv.set_00(FORWARD_ACTIVE, -5.0)
        reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, FORWARD_ACTIVE))))
        assert decode_read_reply(reply)[2] == Decimal("800005.00")
        # On the signed combined-active item the same bytes are -5.00 in both.
        assert srv.set_00(COMBINED_ACTIVE, -5.0)
        reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, COMBINED_ACTIVE))))
        assert decode_read_reply(reply)[2] == Decimal("-5.00")
    finally:
        srv.set_00(FORWARD_ACTIVE, 0.0)
        srv.set_00(COMBINED_ACTIVE, 0.0)


def test_deviation_non_bcd_value_is_silently_accepted_by_theirs() -> None:
    """A value byte with a nibble above 9: ours raises, dlt645 returns a number anyway."""
    address = "000000000042"
    raw = encode_payload(address, ReadReply(FORWARD_ACTIVE, bytes.fromhex("0A000000")))
    with pytest.raises(ValueFormatError):
        decode_read_reply(raw)
    item = their_client(address).handle_response(DLT645Protocol.deserialize(raw))
    assert item is not None and isinstance(item.value, float)


def _their_answer(address: str, to: bytes, di: int = COMBINED_ACTIVE) -> bytes | None:
    srv = their_server(address)
    request = DLT645Protocol.build_frame(to, CtrlCode.ReadData, struct.pack("<I", di))
    reply = srv.handle_request(DLT645Protocol.deserialize(request))
    return None if reply is None else bytes(reply)


def test_deviation_foreign_address_gets_an_error_reply() -> None:
    """A meter stays silent for a frame to another address; dlt645 answers 0xD1 ERR=01."""
    reply = _their_answer("000000000001", bytes.fromhex("000000000002")[::-1])
    assert reply is not None
    frame = decode_frame(reply)
    assert frame.address == "000000000002"
    assert parse_payload(frame) == ErrorReply(0x01, 0x11)
    with pytest.raises(PayloadError):
        decode_read_reply(reply)


def test_deviation_broadcast_read_is_answered() -> None:
    """§1.5: meters never reply to 99..99; dlt645 answers a read to it, with 99..99 as address."""
    reply = _their_answer("000000000001", bytes.fromhex("999999999999"))
    assert reply is not None
    assert decode_read_reply(reply)[0] == "999999999999"


def test_deviation_wildcard_replies() -> None:
    """§1.5: a wildcard read is answered with the meter's real address; dlt645 echoes AA..AA,
    and it refuses a partial wildcard (high bytes AA, low bytes the meter's) with ERR=01."""
    address = "000012345678"
    reply = _their_answer(address, bytes.fromhex("AAAAAAAAAAAA"))
    assert reply is not None
    assert decode_read_reply(reply)[0] == "AAAAAAAAAAAA"
    partial = _their_answer(address, bytes.fromhex("AAAA12345678")[::-1])
    assert partial is not None
    assert parse_payload(decode_frame(partial)) == ErrorReply(0x01, 0x11)


def test_unknown_di_is_err_02_in_both() -> None:
    """Their meter lacks the prepaid balance 00900200: ERR=02 'no requested data' (§2.2)."""
    assert 0x00900200 not in DIMap and 0x00900200 in DI_2007
    address = "000000000001"
    reply = _their_answer(address, bytes.fromhex(wire_order(address)), 0x00900200)
    assert reply is not None
    assert parse_payload(decode_frame(reply)) == ErrorReply(0x02, 0x11)


def test_status_word_passes_through_their_bcd_string() -> None:
    """dlt645 models 04000503 as a 4-digit BCD string ("XXXX"), ours as a 16-bit bitmap;
    the bytes agree only while every nibble is a decimal digit."""
    address = "000000000001"
    srv = their_server(address)
    assert srv.set_04(0x04000503, "0010")
    reply = bytes(srv.handle_request(DLT645Protocol.deserialize(encode_read_request(address, 0x04000503))))
    value = decode_read_reply(reply)[2]
    assert isinstance(value, StatusWord) and value.raw == 0x0010 and value["relay_open"]


def test_their_deserialize_accepts_a_non_bcd_address_ours_rejects() -> None:
    raw = bytes(DLT645Protocol.build_frame(bytes.fromhex("FF0000000000"), CtrlCode.ReadData, bytes(4)))
    assert bytes(DLT645Protocol.deserialize(raw).addr) == bytes.fromhex("FF0000000000")
    with pytest.raises(FrameError):
        decode_frame(raw)
