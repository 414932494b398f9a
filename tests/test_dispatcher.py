"""The meter's DL/T 645 slave dispatcher (firmware_stubs/dispatcher.py).

Addressing (dlt645.md §1.5), ERR bits (§2.2), password levels and lock-out (§2.3), MAC- and
cipher-protected writes (§5.5), follow-up reads (§2.1), the 0x03 SERR answers (§5, prepaid.md
§1.6, §2.4) and the 1997 edition (§7). Every request and reply goes over the wire.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from meterkit import ADDRESS, CUSTOMER, OPERATOR, Bench

from firmware_stubs import dispatcher
from firmware_stubs.dispatcher import handle
from firmware_stubs.esam import SUSPEND_AFTER
from firmware_stubs.meter import CostMode
from firmware_stubs.readout import NotServed, read_value
from firmware_stubs.tariff import FLAT_TOU, PriceSet, StepTable, TariffState, TouSchedule
from firmware_stubs.wallet import Limits
from protocols.dlt645 import (
    BROADCAST,
    DI_1997,
    DI_2007,
    METER_TZ,
    WILDCARD,
    BroadcastTime,
    DemandResetReply,
    DemandResetRequest,
    Edition,
    EncryptedRelayControlRequest,
    ErrorFlags,
    ErrorFlags1997,
    ErrorReply,
    EventClearReply,
    EventClearRequest,
    FreezeRequest,
    MeterClearReply,
    MeterClearRequest,
    PartialTime,
    Password,
    Read1997Reply,
    Read1997Request,
    ReadAddressReply,
    ReadAddressRequest,
    ReadFollowUpReply,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    RelayControlReply,
    SecurityErrorReply,
    SecurityFlags,
    WriteReply,
    WriteRequest,
    decode_frame,
    encode_frame,
    parse_payload,
)
from protocols.dlt645.followup import FollowUpAssembler
from protocols.dlt645.profile import DLT645_1997, FW_B, SGCC_2013, MeterProfile
from protocols.dlt645.relay import RelayCommand as N1
from protocols.dlt645.security import EMPTY, RechargeRequest, SecurityDI, SecurityReply, SecurityRequest
from protocols.esam import MasterStation, Session

LEVEL_04 = Password(0x04, "000000")


def err(reply: object, flags: ErrorFlags) -> bool:
    return isinstance(reply, ErrorReply) and reply.flags == flags


def serr(reply: object, flags: SecurityFlags) -> bool:
    return isinstance(reply, SecurityErrorReply) and reply.flags == flags


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=METER_TZ)


# --- addressing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["000000000002", "AAAAAAAAAA02", "100000000001"])
def test_a_foreign_address_gets_no_answer(address: str) -> None:
    b = Bench()
    assert b.exchange(ReadRequest(0x00900200), address) is None
    assert b.exchange(ReadAddressRequest(), address) is None


@pytest.mark.parametrize("address", [WILDCARD, "AAAAAAAAAA01", "AAAA00000001"])
def test_a_wildcard_read_is_answered_with_the_real_address(address: str) -> None:
    b = Bench(balance_fen=1234)
    reply = b.exchange(ReadRequest(0x00900200), address)
    assert reply is not None and reply.address == ADDRESS
    assert b.send(ReadRequest(0x00900200), address) == ReadReply(
        0x00900200, DI_2007.lookup(0x00900200).encode(Decimal("12.34"))
    )


def test_read_address_needs_the_all_aa_wildcard() -> None:
    b = Bench()
    reply = b.exchange(ReadAddressRequest(), WILDCARD)
    assert reply is not None and reply.address == ADDRESS
    assert b.send(ReadAddressRequest(), WILDCARD) == ReadAddressReply(ADDRESS)
    assert b.exchange(ReadAddressRequest(), ADDRESS) is None
    assert b.exchange(ReadAddressRequest(), "AAAAAAAAAA01") is None


def test_wildcard_writes_and_controls_are_refused_silently() -> None:
    b = Bench(watts=1000)
    session = b.ensure_session()
    raw = DI_2007.lookup(0x04001001).encode(Decimal("50.00"))
    write = WriteRequest(0x04001001, Password(0x99, "000000"), OPERATOR, raw + session.param_mac(0x04001001, raw))
    assert b.send(write, WILDCARD) is None
    assert b.send(write, "AAAAAAAAAA01") is None
    assert b.meter.wallet.limits.alarm_1 == 2000
    block = session.control_block(N1.TRIP, 0, (b.now + timedelta(minutes=5)).replace(microsecond=0))
    assert b.send(EncryptedRelayControlRequest(Password(0x98, "000000"), OPERATOR, block), WILDCARD) is None
    assert b.relay == "closed"
    # The same frames to the real address work.
    assert isinstance(b.send(write), WriteReply)
    assert isinstance(
        b.send(EncryptedRelayControlRequest(Password(0x98, "000000"), OPERATOR, block)), RelayControlReply
    )
    assert b.relay == "open"


def test_a_broadcast_is_never_answered() -> None:
    b = Bench(watts=1000, factory_mode=True)
    assert b.exchange(ReadRequest(0x00900200), BROADCAST) is None
    assert b.exchange(ReadAddressRequest(), BROADCAST) is None
    raw = DI_2007.lookup(0x04001401).encode(9)
    assert b.exchange(WriteRequest(0x04001401, LEVEL_04, OPERATOR, raw), BROADCAST) is None
    assert b.meter.trip_delay_min == 0
    assert b.exchange(FreezeRequest(), BROADCAST) is None  # 0x16 is a broadcast command: it applies
    assert len(b.meter.instant) == 1


def broadcast(b: Bench, meter_time: datetime) -> None:
    assert b.exchange(BroadcastTime(meter_time), BROADCAST) is None


def test_broadcast_time_corrects_a_small_error_once_a_day() -> None:
    b = Bench(clock_offset_s=-120)  # two minutes slow
    assert b.meter.clock.error_ms(b.meter.now_ms) == -120_000
    broadcast(b, b.now)
    assert b.meter.clock.error_ms(b.meter.now_ms) == 0
    assert b.read(0x04000102) == b.now.time()

    b.wait(hours=1)
    broadcast(b, b.now + timedelta(minutes=1))  # a second correction the same day is ignored
    assert b.meter.clock.error_ms(b.meter.now_ms) == 0

    b.wait(days=1)
    broadcast(b, b.now + timedelta(minutes=1))  # a new day
    assert b.meter.clock.error_ms(b.meter.now_ms) == 60_000


def test_broadcast_time_ignores_an_error_over_5_minutes() -> None:
    b = Bench(clock_offset_s=-301)
    broadcast(b, b.now)
    assert b.meter.clock.error_ms(b.meter.now_ms) == -301_000
    ok = Bench(clock_offset_s=-299)
    broadcast(ok, ok.now)
    assert ok.meter.clock.error_ms(ok.meter.now_ms) == 0


@pytest.mark.parametrize(
    ("when", "applied"),
    [
        (local(2024, 3, 1, 23, 56), False),
        (local(2024, 3, 2, 0, 0), False),
        (local(2024, 3, 2, 0, 4), False),
        (local(2024, 3, 1, 23, 54), True),
        (local(2024, 3, 2, 0, 6), True),
    ],
)
def test_broadcast_time_is_ignored_within_5_minutes_of_midnight(when: datetime, applied: bool) -> None:
    """Midnight is also the monthly settlement instant (day 1, 00:00) of this meter."""
    b = Bench(clock_offset_s=-60)
    b.at(when + timedelta(seconds=60))  # the meter reads ``when``
    broadcast(b, b.now)
    assert (b.meter.clock.error_ms(b.meter.now_ms) == 0) is applied


@pytest.mark.parametrize(
    ("when", "applied"),
    [
        (local(2024, 3, 5, 14, 56), False),
        (local(2024, 3, 5, 15, 0), False),
        (local(2024, 3, 5, 15, 4, 59), False),
        (local(2024, 3, 5, 14, 54, 59), True),
        (local(2024, 3, 5, 15, 5), True),
        (local(2024, 3, 4, 15, 0), True),  # the day before: only the settlement instant is guarded
    ],
)
def test_broadcast_time_is_ignored_within_5_minutes_of_a_step_settlement(when: datetime, applied: bool) -> None:
    """dlt645.md §2.1 0x08: "not within ±5 min of a settlement time"; here a monthly step
    settlement on day 5 at 15:00 (prepaid.md §1.3). Before, only midnight was guarded."""
    steps = StepTable((1000, 0, 0, 0, 0, 0), (0, 500, 0, 0, 0, 0, 0), (PartialTime(99, 5, 15), None, None, None))
    tariff = TariffState(PriceSet((5000,) * 4), steps, FLAT_TOU, settlement_checked_at=local(2024, 3, 1, 10, 0))
    b = Bench(clock_offset_s=-60, tariff=tariff)
    b.at(when + timedelta(seconds=60))  # the meter reads ``when``
    broadcast(b, b.now)
    assert (b.meter.clock.error_ms(b.meter.now_ms) == 0) is applied


# --- plaintext clears: levels (dlt645.md §2.3) ------------------------------------------------------

LEVEL_02 = Password(0x02, "123456")


def test_a_plaintext_meter_clear_needs_level_02_in_factory_mode() -> None:
    b = Bench(watts=1000, factory_mode=True)
    b.wait(hours=2)
    assert b.meter.forward[0] == 200
    # Level 04 with its right password: meter clear is a level-02 operation (§2.3).
    assert err(b.send(MeterClearRequest(LEVEL_04, OPERATOR)), ErrorFlags.PASSWORD)
    assert err(b.send(EventClearRequest(LEVEL_04, OPERATOR)), ErrorFlags.PASSWORD)
    assert b.meter.forward[0] == 200
    assert isinstance(b.send(MeterClearRequest(LEVEL_02, OPERATOR)), MeterClearReply)
    assert b.meter.forward == [0] * 5
    assert b.read(0x03300001)["operator"] == OPERATOR
    assert isinstance(b.send(EventClearRequest(LEVEL_02, OPERATOR)), EventClearReply)
    # Demand reset is level 04 (§2.3).
    assert isinstance(b.send(DemandResetRequest(LEVEL_04, OPERATOR)), DemandResetReply)
    # Outside factory mode (no programming key) none of them, at any level.
    field = Bench(watts=1000)
    assert err(field.send(MeterClearRequest(LEVEL_02, OPERATOR)), ErrorFlags.PASSWORD)
    assert err(field.send(DemandResetRequest(LEVEL_04, OPERATOR)), ErrorFlags.PASSWORD)


# --- ERR bits ------------------------------------------------------------------------------------


def test_an_unknown_di_answers_err_no_data() -> None:
    b = Bench()
    assert DI_2007.get(0x0A0B0C0D) is None
    assert err(b.send(ReadRequest(0x0A0B0C0D)), ErrorFlags.NO_DATA)
    assert err(b.send(ReadRequest(0x1D00FF01)), ErrorFlags.NO_DATA)  # in the table, but no trip yet


def raw_request(b: Bench, function: int, data: bytes, edition: Edition | None = None) -> ErrorReply | None:
    """Send a request frame with any function code; the meter's parsed reply."""
    frame = decode_frame(encode_frame(ADDRESS, function, data), edition)
    reply = handle(b.meter, frame, b.now)
    if reply is None:
        return None
    parsed = parse_payload(decode_frame(encode_frame(reply.address, reply.control.byte, reply.data)))
    assert isinstance(parsed, ErrorReply), parsed
    return parsed


# dlt645.md §2.1: FW-B dispatches 0x03, 0x08 and 0x11-0x1D; neither firmware has 0x18.
EXECUTED_2007 = {0x03, 0x08, *range(0x11, 0x18), *range(0x19, 0x1E)}


def test_the_executed_function_codes_are_the_reference_ones() -> None:
    assert dispatcher.FUNCTIONS_2007 == EXECUTED_2007


@pytest.mark.parametrize("profile", [SGCC_2013, FW_B], ids=lambda p: p.name)
@given(function=st.integers(0x00, 0x1F).filter(lambda f: f not in EXECUTED_2007), data=st.binary(max_size=16))
@settings(max_examples=40, deadline=None)
def test_an_unknown_function_code_answers_err_0x02(profile: MeterProfile, function: int, data: bytes) -> None:
    """FW-B answers an unknown command code with ERR 0x02 (dlt645.md §2.2), whatever the data."""
    b = Bench(profile=profile)
    reply = raw_request(b, function, data, Edition.V2007)
    assert reply is not None and reply.flags == ErrorFlags.NO_DATA and reply.function == function


def test_unknown_codes_on_the_wire_and_known_codes_with_bad_data() -> None:
    b = Bench()
    for function in (0x18, 0x1E, 0x1F):  # decoded as 2007 frames without a hint (0x18: no firmware has it)
        reply = raw_request(b, function, b"\x01\x02\x03\x04")
        assert reply is not None and reply.flags == ErrorFlags.NO_DATA, hex(function)
    # A command the meter knows but cannot execute (a 3-byte DI) stays ERR 0x01 (§2.2).
    reply = raw_request(b, 0x11, b"\x00\x00\x01")
    assert reply is not None and reply.flags == ErrorFlags.OTHER
    # A 1997 meter keeps bit 0 for a code it does not know (§7.2 says nothing else).
    old = Bench(profile=DLT645_1997)
    reply = raw_request(old, 0x05, b"\x10\x90")
    assert reply is not None and reply.flags == ErrorFlags1997.ILLEGAL_DATA and reply.edition is Edition.V1997


def test_remaining_money_is_not_served_in_remote_cost_control() -> None:
    b = Bench(mode=CostMode.REMOTE)
    assert err(b.send(ReadRequest(0x00900200)), ErrorFlags.NO_DATA)
    assert err(b.send(ReadRequest(0x00900201)), ErrorFlags.NO_DATA)
    assert b.read(0x00010000) == Decimal("0.00")  # energy is still read
    assert serr(b.recharge(100, 2), SecurityFlags.OTHER)


def test_a_remote_meter_keeps_no_wallet_whatever_its_configuration() -> None:
    """prepaid.md §1.1: in remote cost control the master station holds the balance; the meter
    "keeps no money register". A balance and purchase count in its configuration do not apply."""
    b = Bench(mode=CostMode.REMOTE, watts=2000, balance_fen=10_000, purchase_count=1)
    assert b.meter.wallet.balance == 0 and b.meter.wallet.count == 0 and not b.meter.wallet.purchases
    b.wait(days=3)
    assert b.meter.wallet.balance == 0 and b.relay == "closed"  # nothing deducts, nothing trips
    # The end of an authentication answers its fixed layout with no money and no purchases.
    b.login()
    reply = b.send(SecurityRequest(SecurityDI.TERMINATE_AUTHENTICATION, OPERATOR, EMPTY))
    assert isinstance(reply, SecurityReply)
    assert (reply.body.customer_number, reply.body.remaining, reply.body.purchase_count) == (CUSTOMER, 0, 0)
    # No wallet registers, purchase records or status query; the relay follows the master.
    for di in (0x00900200, 0x00900201, 0x00900100, 0x03330201, 0x0333FF01, 0x03320201):
        assert err(b.send(ReadRequest(di)), ErrorFlags.NO_DATA), hex(di)
    b.login()
    assert serr(b.send(SecurityRequest(SecurityDI.STATUS_QUERY, OPERATOR, EMPTY)), SecurityFlags.OTHER)
    assert b.read(0x04000503)["meter_type"] == 0 and b.read(0x04000501)["remote_cost_control"]
    assert isinstance(b.control(N1.TRIP), RelayControlReply) and b.relay == "open"
    # A local meter configured the same way answers its wallet.
    local = Bench(balance_fen=10_000, purchase_count=1)
    local.login()
    reply = local.send(SecurityRequest(SecurityDI.TERMINATE_AUTHENTICATION, OPERATOR, EMPTY))
    assert (reply.body.remaining, reply.body.purchase_count) == (10_000, 1)


def test_an_unset_switch_time_reads_as_zeros() -> None:
    """04000108 is served by both cost-control firmwares (dlt645.md §3.8); unset, it is all zero."""
    b = Bench()
    reply = b.send(ReadRequest(0x04000108))
    assert isinstance(reply, ReadReply) and reply.value == bytes(5)


# --- writes: levels 99 and 98, plaintext, passwords ---------------------------------------------------


def test_level_99_write_with_a_valid_mac() -> None:
    b = Bench()
    programs = b.meter.program_count
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)
    assert b.meter.wallet.limits.alarm_1 == 5000
    assert b.read(0x04001001) == Decimal("50.00")
    assert b.meter.programs[0].operator == OPERATOR and b.meter.programs[0].di == 0x04001001
    assert b.meter.program_count == programs + 1  # one write, one programming record


def test_level_99_write_with_a_bad_mac_is_refused_and_counted() -> None:
    b = Bench()
    assert err(b.write_mac(0x04001001, Decimal("50.00"), good=False), ErrorFlags.PASSWORD)
    assert b.meter.wallet.limits.alarm_1 == 2000
    assert b.meter.esam.mac_failures(b.now) == 1
    assert not b.meter.esam.authenticated(b.now)  # a MAC failure ends the session (§2.5)
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)  # after a new login


def test_level_98_write_of_the_customer_number() -> None:
    b = Bench()
    assert isinstance(b.write_cipher(0x0400040E, "000000009999"), WriteReply)
    assert b.read(0x0400040E) == "000000009999"
    assert serr(b.recharge(100, 2), SecurityFlags.CUSTOMER_MISMATCH)
    assert isinstance(b.recharge(100, 2, "000000009999"), SecurityReply)


def test_level_98_block_for_another_di_is_refused() -> None:
    b = Bench()
    session = b.ensure_session()
    blob = session.encrypt_param(0x04001004, DI_2007.lookup(0x04001004).encode(Decimal("1.00")))
    reply = b.send(WriteRequest(0x04001003, Password(0x98, "000000"), OPERATOR, blob))  # both class 2
    assert err(reply, ErrorFlags.NO_DATA)  # the embedded DI differs (§5.5)
    limits = b.meter.wallet.limits
    assert limits.overdraft == 0 and limits.hoarding == Limits().hoarding


def test_a_mac_write_needs_a_session() -> None:
    b = Bench()
    session = Session(ADDRESS, MasterStation().keys_for(ADDRESS), bytes(4), bytes(8))
    raw = DI_2007.lookup(0x04001001).encode(Decimal("50.00"))
    reply = b.send(
        WriteRequest(0x04001001, Password(0x99, "000000"), OPERATOR, raw + session.param_mac(0x04001001, raw))
    )
    assert err(reply, ErrorFlags.PASSWORD)
    assert b.meter.wallet.limits.alarm_1 == 2000


def plain_write(b: Bench, password: Password, minutes: int = 9) -> object:
    raw = DI_2007.lookup(0x04001401).encode(minutes)
    return b.send(WriteRequest(0x04001401, password, OPERATOR, raw))


def test_a_plaintext_write_needs_the_programming_key() -> None:
    b = Bench()
    assert err(plain_write(b, LEVEL_04), ErrorFlags.PASSWORD)
    assert b.meter.trip_delay_min == 0
    factory = Bench(factory_mode=True)
    assert isinstance(plain_write(factory, LEVEL_04), WriteReply)
    assert factory.meter.trip_delay_min == 9


def test_three_wrong_passwords_lock_the_level_for_24_hours() -> None:
    b = Bench(factory_mode=True)
    wrong = Password(0x04, "111111")
    for _ in range(3):
        assert err(plain_write(b, wrong), ErrorFlags.PASSWORD)
    assert err(plain_write(b, LEVEL_04), ErrorFlags.PASSWORD)  # locked: even the right one
    assert b.meter.trip_delay_min == 0
    assert isinstance(plain_write(b, Password(0x02, "123456"), 3), WriteReply)  # another level
    b.wait(hours=23, minutes=59)
    assert err(plain_write(b, LEVEL_04), ErrorFlags.PASSWORD)
    b.wait(minutes=1)
    assert isinstance(plain_write(b, LEVEL_04), WriteReply)
    assert b.meter.trip_delay_min == 9


def test_two_wrong_passwords_do_not_lock() -> None:
    b = Bench(factory_mode=True)
    for _ in range(2):
        assert err(plain_write(b, Password(0x04, "111111")), ErrorFlags.PASSWORD)
    assert isinstance(plain_write(b, LEVEL_04), WriteReply)


# --- parameter security classes (dlt645.md §5.5, prepaid.md §2.3) -----------------------------------

CLASS_1 = [0x04001001, 0x04001002, 0x04000108, 0x04000109, 0x040502FF, 0x040605FF]
"""Class 1 per dlt645.md §5.5 (FW-A's level-99 list): plaintext + MAC."""
CLASS_2 = [0x04001003, 0x04001004, 0x04001005, 0x0400040E, 0x04000306, 0x04000F04]
"""Class 2 per dlt645.md §5.5 (level 98): ciphertext + MAC."""


def limit_state(b: Bench) -> tuple[object, ...]:
    """What a refused parameter write must leave alone."""
    m = b.meter
    return (m.wallet.limits, m.wallet.customer, m.program_count, m.tariff.pending_switches, m.esam.mac_failures(b.now))


def test_a_class_2_parameter_written_with_a_mac_is_refused() -> None:
    b = Bench()
    before = limit_state(b)
    for di in (0x04001003, 0x04001004, 0x04001005):
        # A valid MAC over a valid value: the level, not the MAC, is wrong (the gateway's old habit).
        assert err(b.write_mac(di, Decimal("5.00")), ErrorFlags.PASSWORD), hex(di)
    assert err(b.write_mac(0x0400040E, "000000009999"), ErrorFlags.PASSWORD)
    assert limit_state(b) == before  # nothing applied, no programming record, no MAC failure
    assert b.meter.esam.authenticated(b.now)  # refused by the parameter table: the session survives
    assert isinstance(b.write_cipher(0x04001003, Decimal("5.00")), WriteReply)
    assert b.meter.wallet.limits.overdraft == 500


def test_a_class_1_parameter_written_as_ciphertext_is_refused() -> None:
    b = Bench()
    before = limit_state(b)
    assert err(b.write_cipher(0x04001001, Decimal("50.00")), ErrorFlags.PASSWORD)
    assert err(b.write_cipher(0x04000108, local(2024, 3, 2, 0, 0)), ErrorFlags.PASSWORD)
    assert err(b.write_cipher(0x040502FF, [Decimal("0.6000")] * 4), ErrorFlags.PASSWORD)
    assert limit_state(b) == before and b.meter.tariff.backup_prices == b.meter.tariff.prices
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)
    assert b.meter.wallet.limits.alarm_1 == 5000


def test_classes_follow_the_profile_levels() -> None:
    """FW-B's build uses 97/96 for MAC/cipher (§2.3): the classes map onto those levels."""
    b = Bench(profile=FW_B)
    assert b.meter.profile.mac_level == 0x97 and b.meter.profile.cipher_level == 0x96
    assert err(b.write_mac(0x04001003, Decimal("5.00")), ErrorFlags.PASSWORD)
    assert isinstance(b.write_cipher(0x04001003, Decimal("5.00")), WriteReply)
    assert err(b.write_cipher(0x04001001, Decimal("50.00")), ErrorFlags.PASSWORD)
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)
    # The 2013 levels mean nothing special to this meter: plaintext levels, no programming key.
    session = b.ensure_session()
    raw = DI_2007.lookup(0x04001001).encode(Decimal("40.00"))
    reply = b.send(
        WriteRequest(0x04001001, Password(0x99, "000000"), OPERATOR, raw + session.param_mac(0x04001001, raw))
    )
    assert err(reply, ErrorFlags.PASSWORD) and b.meter.wallet.limits.alarm_1 == 5000


def test_a_password_cannot_be_written_through_the_esam_levels() -> None:
    """Passwords (04000C0x) have no class: neither ESAM level writes them."""
    b = Bench()
    assert DI_2007.lookup(0x04000C05).param_class is None
    assert err(b.write_mac(0x04000C05, "04123456"), ErrorFlags.PASSWORD)
    assert err(b.write_cipher(0x04000C05, "04123456"), ErrorFlags.PASSWORD)
    assert b.meter.config.passwords[0x04] == "000000"


def test_a_read_only_di_is_not_writable_at_any_level() -> None:
    b = Bench()
    assert "w" not in DI_2007.lookup(0x00900200).access
    session = b.ensure_session()
    raw = DI_2007.lookup(0x00900200).encode(Decimal("999.00"))
    mac = session.param_mac(0x00900200, raw)
    assert err(b.send(WriteRequest(0x00900200, Password(0x99, "000000"), OPERATOR, raw + mac)), ErrorFlags.NO_DATA)
    assert b.balance_fen == 3000 and b.meter.esam.mac_failures(b.now) == 0


WRITABLE = sorted(item.di for item in DI_2007 if "w" in item.access)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(di=st.sampled_from(WRITABLE), mac_level=st.booleans(), data=st.binary(min_size=0, max_size=40))
def test_a_write_at_a_level_its_class_does_not_allow_is_refused(di: int, mac_level: bool, data: bytes) -> None:
    """Property: whatever the DI and the bytes, an ESAM level its class does not name gives ERR
    bit 2 and changes nothing (no value, no programming record, no MAC failure, no lost session)."""
    item = DI_2007.lookup(di)
    allowed = {1: True, 2: False}.get(item.param_class)  # True: MAC level; None: no ESAM level
    assume(allowed is not mac_level)
    b = Bench()
    session = b.ensure_session()
    if mac_level:
        request = WriteRequest(di, Password(0x99, "000000"), OPERATOR, data + session.param_mac(di, data))
    else:
        request = WriteRequest(di, Password(0x98, "000000"), OPERATOR, session.encrypt_param(di, data))
    t = b.meter.tariff
    before = (limit_state(b), b.meter.trip_delay_min, t.backup_prices, t.backup_steps, t.backup_tou)
    # The energy-wallet limits 04000F0x are not a money meter's data at all (dlt645.md §3.4).
    expected = ErrorFlags.NO_DATA if di >> 8 == 0x04000F else ErrorFlags.PASSWORD
    assert err(b.send(request), expected)
    after = (limit_state(b), b.meter.trip_delay_min, t.backup_prices, t.backup_steps, t.backup_tou)
    assert after == before and b.meter.esam.authenticated(b.now)


# --- programming records (033000xx, dlt645.md §2.3, §3.7, prepaid.md §1.7) ------------------------------


def test_programming_records_carry_time_operator_and_di() -> None:
    b = Bench()
    count = b.read(0x03300000)
    assert err(b.send(ReadRequest(0x03300001)), ErrorFlags.NO_DATA)  # nothing programmed yet
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)
    b.wait(minutes=5, seconds=7)
    assert isinstance(b.write_cipher(0x04001003, Decimal("5.00")), WriteReply)
    assert b.read(0x03300000) == count + 2
    last, before = b.read(0x03300001), b.read(0x03300002)
    assert last == {
        "time": local(2024, 3, 1, 10, 5, 7),
        "operator": OPERATOR,
        "data_identifiers": ["04001003"] + ["FFFFFFFF"] * 9,
    }
    assert before["time"] == local(2024, 3, 1, 10, 0) and before["data_identifiers"][0] == "04001001"
    assert err(b.send(ReadRequest(0x03300003)), ErrorFlags.NO_DATA)  # only two so far
    # On the wire: 6 + 4 + 10 x 4 = 50 bytes, the DI sent DI0 first like every DI (§3.1).
    reply = b.send(ReadRequest(0x03300001))
    assert isinstance(reply, ReadReply) and len(reply.value) == 50
    assert reply.value[:10] == bytes.fromhex("07 05 10 01 03 24 CD AB 00 00")
    assert reply.value[10:14] == bytes.fromhex("03 10 00 04") and reply.value[14:] == b"\xff" * 36


def test_the_last_ten_programming_records_are_kept() -> None:
    b = Bench(factory_mode=True)
    for minutes in range(1, 13):
        assert isinstance(plain_write(b, LEVEL_04, minutes), WriteReply)
        b.wait(minutes=1)
    assert b.read(0x03300001)["time"] == local(2024, 3, 1, 10, 11)  # the 12th write
    assert b.read(0x0330000A)["time"] == local(2024, 3, 1, 10, 2)  # the 3rd: two fell out
    assert DI_2007.get(0x0330000B) is None and err(b.send(ReadRequest(0x0330000B)), ErrorFlags.NO_DATA)


# --- agreed freezes at a switch (0502/0505/0507, dlt645.md §3.6, prepaid.md §1.3) ----------------------


def test_a_price_switch_is_frozen_as_05050001_not_as_an_instantaneous_freeze() -> None:
    b = Bench(watts=1000)
    switch = local(2024, 3, 1, 11, 0)
    assert isinstance(b.write_mac(0x040502FF, [Decimal("0.6000")] * 4), WriteReply)
    assert isinstance(b.write_mac(0x04000108, switch), WriteReply)
    assert err(b.send(ReadRequest(0x05050001)), ErrorFlags.NO_DATA)  # not switched yet
    b.at(switch + timedelta(hours=1))
    assert b.read(0x05050001) == switch
    block = b.read(0x05050101)  # forward active total, T1..T4 at the switch
    assert len(block) == 5 and block[0] == Decimal("1.00") and sum(block[1:]) == Decimal("1.00")
    assert b.read(0x05050201)[0] == Decimal("0.00")
    assert b.read(0x00010000) == Decimal("2.00")  # the freeze kept the value at the switch
    assert err(b.send(ReadRequest(0x05010001)), ErrorFlags.NO_DATA)  # 0x16-only list untouched
    assert err(b.send(ReadRequest(0x05070001)), ErrorFlags.NO_DATA)  # no ladder switch
    assert err(b.send(ReadRequest(0x05050002)), ErrorFlags.NO_DATA)  # one price switch so far


def test_switch_freezes_keep_two_per_kind() -> None:
    b = Bench(watts=1000)
    switches = [local(2024, 3, 1, 11, 0), local(2024, 3, 1, 12, 0), local(2024, 3, 1, 13, 0)]
    for n, at in enumerate(switches, 1):
        assert isinstance(b.write_mac(0x040502FF, [Decimal(f"0.{5 + n}000")] * 4), WriteReply)
        assert isinstance(b.write_mac(0x04000108, at), WriteReply)
        b.at(at + timedelta(minutes=30))
    assert b.read(0x05050001) == switches[2] and b.read(0x05050002) == switches[1]
    assert b.read(0x05050102)[0] == Decimal("2.00")
    assert DI_2007.get(0x05050003) is None  # capacity 2 (§3.6): the first switch fell out


def test_ladder_and_time_zone_switches_have_their_own_freezes() -> None:
    b = Bench(watts=2000)
    ladder = b.read(0x040604FF)
    assert isinstance(b.write_mac(0x040605FF, ladder), WriteReply)
    assert isinstance(b.write_mac(0x04000109, local(2024, 3, 1, 10, 30)), WriteReply)
    b.meter.tariff.write_backup_tou(FLAT_TOU)
    assert isinstance(b.write_cipher(0x04000106, local(2024, 3, 1, 11, 0)), WriteReply)  # class 2
    b.at(local(2024, 3, 1, 12, 0))
    assert b.read(0x05070001) == local(2024, 3, 1, 10, 30)
    assert b.read(0x05070101)[0] == Decimal("1.00")
    assert b.read(0x05020001) == local(2024, 3, 1, 11, 0)
    assert b.read(0x05020101)[0] == Decimal("2.00")
    assert err(b.send(ReadRequest(0x05050001)), ErrorFlags.NO_DATA)  # no price switch
    assert err(b.send(ReadRequest(0x05030001)), ErrorFlags.NO_DATA)  # day tables switch with the zones


# --- time-of-use schedule: 0401xxxx first (running) set, 0402xxxx second (backup) set -------------------


def test_both_schedule_sets_are_served() -> None:
    b = Bench()  # FLAT_TOU: one zone, one day table, T3 all day
    for zones, first_table in ((0x04010000, 0x04010001), (0x04020000, 0x04020001)):
        assert b.read(zones) == [{"month": 1, "day": 1, "table": 1}]
        assert b.read(first_table) == [{"hour": 0, "minute": 0, "tariff": 3}]
        assert err(b.read(first_table + 1), ErrorFlags.NO_DATA)  # no day table 2 in this set


def test_the_first_set_is_not_writable() -> None:
    b = Bench()
    reply = b.write_cipher(0x04010001, [{"hour": 0, "minute": 0, "tariff": 1}])
    assert err(reply, ErrorFlags.NO_DATA)
    assert b.read(0x04010001) == [{"hour": 0, "minute": 0, "tariff": 3}]


def test_a_day_table_with_a_tariff_beyond_t4_answers_err_too_many_tariffs() -> None:
    b = Bench()
    before = b.meter.tariff.backup_tou
    assert err(b.write_cipher(0x04020001, [{"hour": 0, "minute": 0, "tariff": 5}]), ErrorFlags.TOO_MANY_TARIFFS)
    assert b.meter.tariff.backup_tou is before


@pytest.mark.parametrize(
    ("di", "value"),
    [
        (0x04020003, [{"hour": 0, "minute": 0, "tariff": 1}]),  # day table 2 is not there yet
        (0x04020000, [{"month": 1, "day": 1, "table": 2}]),  # a zone naming a missing day table
        (0x04020000, [{"month": 1, "day": 1, "table": 1}, {"month": 1, "day": 1, "table": 1}]),  # same start
        (0x04020000, [{"month": 1, "day": 1, "table": 1}, None]),  # an unused entry
        (0x04020000, []),  # no zone
        (0x04020001, [{"hour": 0, "minute": 0, "tariff": 1}, {"hour": 0, "minute": 10, "tariff": 2}]),  # 10 min
    ],
)
def test_a_schedule_the_meter_cannot_run_is_refused(di: int, value: list[object]) -> None:
    b = Bench()
    before = b.meter.tariff.backup_tou
    assert err(b.write_cipher(di, value), ErrorFlags.OTHER)
    assert b.meter.tariff.backup_tou is before


def test_04000107_programs_the_same_tou_switch() -> None:
    b = Bench()
    at = local(2024, 3, 1, 11, 0)
    assert isinstance(b.write_cipher(0x04000107, at), WriteReply)
    assert b.read(0x04000106) == at and b.read(0x04000107) == at
    assert err(b.write_mac(0x04000107, at), ErrorFlags.PASSWORD)  # class 2, like 04000106


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[list[dict[str, int]]], list[dict[str, int]]]:
    """A schedule a meter runs: 1..8 day tables of 1..14 periods at least 15 min apart (the
    wrap-round one too), tariffs T1..T4; 1..14 zones with distinct start dates naming them."""
    n_tables = draw(st.integers(1, 8))
    tables = []
    for _ in range(n_tables):
        slots = draw(st.lists(st.integers(0, 95), min_size=1, max_size=14, unique=True))
        shift = draw(st.integers(0, 14))
        starts = sorted((15 * slot + shift) % 1440 for slot in slots)
        tables.append([{"hour": m // 60, "minute": m % 60, "tariff": draw(st.integers(1, 4))} for m in starts])
    days = draw(
        st.lists(
            st.dates(datetime(2000, 1, 1).date(), datetime(2000, 12, 31).date()), min_size=1, max_size=14, unique=True
        )
    )
    zones = [{"month": d.month, "day": d.day, "table": draw(st.integers(1, n_tables))} for d in sorted(days)]
    return tables, zones


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=schedules(),
    switch_di=st.sampled_from([0x04000106, 0x04000107]),
    instants=st.lists(
        st.datetimes(datetime(2024, 3, 2), datetime(2026, 3, 1), timezones=st.just(METER_TZ)), min_size=1, max_size=20
    ),
)
def test_a_written_schedule_switches_in_and_the_meter_follows_it(
    schedule: tuple[list[list[dict[str, int]]], list[dict[str, int]]], switch_di: int, instants: list[datetime]
) -> None:
    """Property: day tables 1..n and the zone table written to the backup set (class 2, level 98),
    then a switch time: from then on the meter's tariff_at is the written schedule's."""
    tables, zones = schedule
    b = Bench()
    for n, table in enumerate(tables, 1):
        assert isinstance(b.write_cipher(0x04020000 + n, table), WriteReply), n
    assert isinstance(b.write_cipher(0x04020000, zones), WriteReply)
    assert b.read(0x04020000) == zones and b.read(0x04020000 + len(tables)) == tables[-1]
    assert b.meter.tariff.tou == FLAT_TOU  # nothing runs before the switch
    switch = local(2024, 3, 1, 11, 0)
    assert isinstance(b.write_cipher(switch_di, switch), WriteReply)
    b.at(switch + timedelta(minutes=1))
    expected = TouSchedule(
        zones=tuple((z["month"], z["day"], z["table"]) for z in zones),
        day_tables=tuple(tuple((p["hour"], p["minute"], p["tariff"]) for p in t) for t in tables),
    )
    assert b.read(0x04010000) == zones
    assert [b.read(0x04010000 + n) for n in range(1, len(tables) + 1)] == tables
    for when in instants:
        assert b.meter.tariff.tariff_at(when) == expected.tariff_at(when), when
    assert b.read(0x05020001) == switch  # the time-zone switch freeze (§3.6)


# --- follow-up reads ---------------------------------------------------------------------------------


def served_sizes(b: Bench) -> dict[int, int]:
    sizes = {}
    for item in DI_2007:
        if "r" not in item.access:
            continue
        try:
            sizes[item.di] = len(item.encode(read_value(b.meter, item.di)))
        except NotServed:
            continue
    return sizes


def read_long(b: Bench, di: int) -> bytes:
    assembler = FollowUpAssembler(di)
    while (request := assembler.next_request()) is not None:
        reply = b.exchange(request)
        assert reply is not None
        payload = b.send(request)
        assert isinstance(payload, (ReadReply, ReadFollowUpReply))
        assembler.add(payload, reply.control.follow_up)
    return assembler.value


def busy_bench() -> Bench:
    """A meter with something in every log: freezes, a purchase, programming records."""
    b = Bench(watts=1000)
    b.wait(days=3)
    assert isinstance(b.recharge(100, 2), SecurityReply)
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)
    return b


def test_the_longest_served_value_fits_one_frame() -> None:
    """No DI this meter serves is over 200 bytes (the longest is a 64/70-byte ladder table or
    the 50-byte programming record), so every real read is one 0x91 frame with the whole value;
    the follow-up path is exercised below with a smaller limit. If this fails, a new DI needs
    follow-up frames at the real limit: read it with read_long here instead."""
    b = busy_bench()
    sizes = served_sizes(b)
    assert sizes[0x03300001] == 50 and sizes[0x0333FF01] == 23
    di = max(sizes, key=lambda d: sizes[d])
    assert sizes[di] + 4 <= dispatcher.MAX_REPLY_DATA
    reply = b.exchange(ReadRequest(di))
    assert reply is not None and not reply.control.follow_up
    payload = b.send(ReadRequest(di))
    assert isinstance(payload, ReadReply) and payload.value == DI_2007.lookup(di).encode(read_value(b.meter, di))


def test_follow_up_mechanism_with_a_small_frame_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """No served DI exceeds 200 bytes, so shrink the limit to exercise 0x11 + 0x12 end to end."""
    b = Bench(watts=1000)
    b.wait(hours=5)
    assert b.recharge(100, 2) is not None
    monkeypatch.setattr(dispatcher, "MAX_REPLY_DATA", 12)
    di = 0x0333FF01  # the last purchase record, 23 bytes
    value = read_long(b, di)
    assert value == DI_2007.lookup(di).encode(read_value(b.meter, di))
    assert DI_2007.lookup(di).decode(value)["amount"] == Decimal("1.00")
    assert err(b.send(ReadFollowUpRequest(di, 9)), ErrorFlags.NO_DATA)


# --- 0x03 security: SERR ----------------------------------------------------------------------------


def test_recharge_without_identity_authentication() -> None:
    b = Bench()
    stale = Session(ADDRESS, MasterStation().keys_for(ADDRESS), bytes(4), bytes(8))
    reply = b.send(SecurityRequest(SecurityDI.RECHARGE, OPERATOR, stale.recharge(100, 2, CUSTOMER)))
    assert serr(reply, SecurityFlags.AUTHENTICATION)
    assert b.balance_fen == 3000 and b.meter.wallet.count == 1


def test_recharge_after_the_session_timed_out() -> None:
    b = Bench()
    session = b.login()
    b.wait(minutes=5)
    reply = b.send(SecurityRequest(SecurityDI.RECHARGE, OPERATOR, session.recharge(100, 2, CUSTOMER)))
    assert serr(reply, SecurityFlags.AUTHENTICATION)
    assert b.balance_fen == 3000


def test_duplicate_recharge() -> None:
    b = Bench()
    assert isinstance(b.recharge(500, 2), SecurityReply)
    assert serr(b.recharge(500, 2), SecurityFlags.REPEAT_RECHARGE)
    assert b.balance_fen == 3500 and b.meter.wallet.count == 2
    assert b.read(0x03330201) == 2


@pytest.mark.parametrize("count", [0, 1, 2, 4, 1000])
def test_purchase_count_gap_or_stale(count: int) -> None:
    b = Bench()
    assert isinstance(b.recharge(500, 2), SecurityReply)
    expected = SecurityFlags.REPEAT_RECHARGE if count == 2 else SecurityFlags.PURCHASE_COUNT
    assert serr(b.recharge(500, count), expected)
    assert b.balance_fen == 3500 and b.meter.wallet.count == 2


def test_customer_number_mismatch_is_checked_before_the_count() -> None:
    b = Bench()
    assert serr(b.recharge(500, 2, "000000000778"), SecurityFlags.CUSTOMER_MISMATCH)
    assert serr(b.recharge(500, 1, "000000000778"), SecurityFlags.CUSTOMER_MISMATCH)
    assert b.balance_fen == 3000 and b.meter.wallet.customer == CUSTOMER


def test_account_opening_does_not_check_the_customer_number() -> None:
    b = Bench(balance_fen=0, opened=False, purchase_count=0, customer="000000000000")
    assert serr(b.recharge(500, 1), SecurityFlags.OTHER)  # a recharge needs an opened account
    assert isinstance(b.recharge(500, 1, CUSTOMER, opening=True), SecurityReply)
    assert b.meter.wallet.customer == CUSTOMER and b.balance_fen == 500 and b.meter.wallet.count == 1
    assert isinstance(b.recharge(300, 2), SecurityReply)
    assert b.balance_fen == 800


def test_hoarding_limit() -> None:
    b = Bench(balance_fen=3000, limits=Limits(hoarding=4000))
    assert serr(b.recharge(1001, 2), SecurityFlags.HOARDING_LIMIT)
    assert b.balance_fen == 3000 and b.meter.wallet.count == 1
    assert isinstance(b.recharge(1000, 2), SecurityReply)


def test_a_bad_recharge_mac_is_an_esam_verification_failure() -> None:
    b = Bench()
    session = b.login()
    body = session.recharge(100, 2, CUSTOMER)
    forged = RechargeRequest(99_999, 2, body.mac1, CUSTOMER, body.mac2)  # amount changed after the MAC
    assert serr(b.send(SecurityRequest(SecurityDI.RECHARGE, OPERATOR, forged)), SecurityFlags.ESAM_VERIFICATION)
    assert b.balance_fen == 3000 and b.meter.esam.mac_failures(b.now) == 1


def fail_mac(b: Bench) -> object:
    session = b.login()
    body = session.recharge(100, 2, CUSTOMER)
    forged = RechargeRequest(body.amount, body.purchase_count, bytes(4), CUSTOMER, body.mac2)
    reply = b.send(SecurityRequest(SecurityDI.RECHARGE, OPERATOR, forged))
    b.session = None  # a MAC failure ends the session
    return reply


def suspend(b: Bench) -> None:
    for _ in range(SUSPEND_AFTER):
        assert serr(fail_mac(b), SecurityFlags.ESAM_VERIFICATION)


def auth_reply(b: Bench) -> object:
    req, _ = b.station.start_auth(ADDRESS)
    return b.send(SecurityRequest(SecurityDI.IDENTITY_AUTHENTICATION, OPERATOR, req))


def test_200_mac_failures_suspend_until_local_midnight() -> None:
    b = Bench()
    for _ in range(SUSPEND_AFTER - 1):
        assert serr(fail_mac(b), SecurityFlags.ESAM_VERIFICATION)
    assert isinstance(b.recharge(100, 2), SecurityReply)  # 199 failures: still working
    assert serr(fail_mac(b), SecurityFlags.ESAM_VERIFICATION)  # the 200th
    assert serr(auth_reply(b), SecurityFlags.SUSPENDED)
    assert b.read(0x00900200) == Decimal("31.00")  # plain reads still work
    b.at(local(2024, 3, 1, 23, 59, 59))
    assert serr(auth_reply(b), SecurityFlags.SUSPENDED)
    b.at(local(2024, 3, 2, 0, 0))
    assert isinstance(b.recharge(100, 3), SecurityReply)
    assert b.balance_fen == 3200


def test_suspension_also_refuses_remote_control_and_mac_writes() -> None:
    b = Bench(watts=1000)
    session = b.login()
    suspend(b)
    block = session.control_block(N1.TRIP, 0, (b.now + timedelta(minutes=5)).replace(microsecond=0))
    reply = b.send(EncryptedRelayControlRequest(Password(0x98, "000000"), OPERATOR, block))
    assert err(reply, ErrorFlags.PASSWORD)
    assert b.relay == "closed"


def test_suspension_clears_at_midnight_of_the_meter_clock() -> None:
    """The lock-out clears at 00:00 of the meter's own clock (prepaid.md §2.4), here 10 min fast."""
    b = Bench(clock_offset_s=600)
    suspend(b)
    assert serr(auth_reply(b), SecurityFlags.SUSPENDED)
    b.at(local(2024, 3, 1, 23, 49, 59))  # the meter reads 23:59:59
    assert serr(auth_reply(b), SecurityFlags.SUSPENDED)
    b.at(local(2024, 3, 1, 23, 50))  # the meter reads 00:00 on 2 March
    assert isinstance(auth_reply(b), SecurityReply)


# --- DL/T 645-1997 ------------------------------------------------------------------------------------


def test_a_1997_meter_answers_1997_reads() -> None:
    b = Bench(watts=1000, profile=DLT645_1997)
    b.wait(hours=3)
    reply = b.send(Read1997Request(0x9010))
    assert isinstance(reply, Read1997Reply) and reply.di == 0x9010
    assert DI_1997.lookup(0x9010).decode(reply.value) == Decimal("3.00")
    block = b.send(Read1997Request(0x901F))
    assert isinstance(block, Read1997Reply)
    assert DI_1997.lookup(0x901F).decode(block.value)[0] == Decimal("3.00")
    assert DI_1997.lookup(0xC032).decode(b.send(Read1997Request(0xC032)).value) == ADDRESS  # type: ignore[union-attr]
    # An unknown 1997 DI: ERR bit 1 (DI error), in the 1997 sense.
    unknown = b.send(Read1997Request(0x9999))
    assert isinstance(unknown, ErrorReply) and unknown.flags == ErrorFlags1997.DI_ERROR
    assert unknown.edition is Edition.V1997
    # A 2007 read means nothing to a 1997 meter.
    assert b.exchange(ReadRequest(0x00010000)) is None


def test_a_1997_meter_echoes_the_wildcard_address() -> None:
    b = Bench(profile=DLT645_1997)
    reply = b.exchange(Read1997Request(0x9010), WILDCARD)
    assert reply is not None and reply.address == WILDCARD


def test_a_2007_meter_ignores_1997_reads() -> None:
    b = Bench()
    assert b.exchange(Read1997Request(0x9010)) is None
