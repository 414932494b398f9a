"""Event records and whole freeze records a simulated meter serves (dlt645.md §3.6, §3.7;
prepaid.md §1.7), read back through the dispatcher and decoded with the DI table's formats.

Each family is driven by the command that makes the event (a write with an operator code, a
trip, a close, a top-up, a clear, a time set), then its count and last record are read over
the wire. The 0330ee records (0330ee01..) are not served: the table holds them as BYTES, a
layout dlt645.md does not give (readout.py), so only their counts are checked here, and the
record the meter keeps is checked on the model itself.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meterkit import OPERATOR, Bench

from firmware_stubs.meter import EventClass, Meter, from_ms
from firmware_stubs.readout import NotServed, read_value
from protocols.dlt645 import (
    BROADCAST,
    DI_2007,
    METER_TZ,
    BroadcastTime,
    DemandResetRequest,
    ErrorFlags,
    ErrorReply,
    EventClearRequest,
    FreezeRequest,
    MeterClearRequest,
    Password,
    ReadReply,
    ReadRequest,
    RelayControlReply,
    WriteReply,
)
from protocols.dlt645.relay import RelayCommand
from protocols.dlt645.security import SecurityReply

LEVEL_02 = Password(0x02, "123456")
LEVEL_04 = Password(0x04, "000000")


def local(*args: int) -> datetime:
    return datetime(*args, tzinfo=METER_TZ)


def no_data(reply: object) -> bool:
    return isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.NO_DATA


def count(m: Meter, kind: EventClass) -> int:
    return m.events[kind].count if kind in m.events else 0


def meter_time(ms: int) -> datetime:
    return from_ms(ms).astimezone(METER_TZ)


# --- trips and closes (1D00 / 1E00) ---------------------------------------------------------------


def test_a_trip_and_a_close_are_read_back_with_time_operator_and_energy() -> None:
    b = Bench(watts=1000)
    b.wait(hours=3)  # 3.00 kWh forward
    assert b.read(0x1D000001) == 0 and no_data(b.send(ReadRequest(0x1D00FF01)))
    assert isinstance(b.control(RelayCommand.TRIP, operator="12345678"), RelayControlReply)
    assert b.read(0x1D000001) == 1
    record = b.read(0x1D00FF01)
    assert record["time"] == local(2024, 3, 1, 13, 0)
    assert record["operator"] == "12345678"
    assert record["forward_active"] == Decimal("3.00") and record["reverse_active"] == Decimal("0.00")
    # The single fields 1D0001nn..1D0008nn say the same (§3.7).
    assert b.read(0x1D000101) == record["time"] and b.read(0x1D000201) == "12345678"
    assert b.read(0x1D000301) == Decimal("3.00")
    b.wait(hours=1)  # open: nothing more is drawn
    assert isinstance(b.control(RelayCommand.DIRECT_CLOSE, operator="0000BEEF"), RelayControlReply)
    b.wait(hours=2)
    assert b.read(0x1E000001) == 1
    close = b.read(0x1E00FF01)
    assert close["time"] == local(2024, 3, 1, 14, 0) and close["operator"] == "0000BEEF"
    assert close["forward_active"] == Decimal("3.00")
    assert b.read(0x1E000301) == Decimal("3.00")
    assert no_data(b.send(ReadRequest(0x1E00FF02)))  # one close so far


# --- purchases (0333) -------------------------------------------------------------------------------


def test_a_top_up_is_the_last_purchase_record() -> None:
    b = Bench(balance_fen=3000)
    b.wait(minutes=30)
    assert isinstance(b.recharge(1250, 2), SecurityReply)
    assert b.read(0x03330201) == 2  # the current purchase count (§3.7)
    record = b.read(0x0333FF01)
    assert record == {
        "time": local(2024, 3, 1, 10, 30),
        "purchase_count": 2,
        "amount": Decimal("12.50"),
        "balance_before": Decimal("30.00"),
        "balance_after": Decimal("42.50"),
        "total_purchased": Decimal("42.50"),
    }
    assert b.read(0x03330302) == Decimal("30.00")  # the one before: the initial balance
    # A top-up is also a programming event with the command's operator code (FW-B ProgramRecord).
    assert b.read(0x03300001)["operator"] == OPERATOR


# --- programming (033000) and table programming (033005/06/0F/10) -----------------------------------


def test_a_parameter_write_is_a_programming_record_with_its_operator() -> None:
    b = Bench()
    b.wait(minutes=7)
    assert isinstance(b.write_mac(0x04001001, Decimal("50.00")), WriteReply)
    assert b.read(0x03300000) == 1
    assert b.read(0x03300001) == {
        "time": local(2024, 3, 1, 10, 7),
        "operator": OPERATOR,
        "data_identifiers": ["04001001"] + ["FFFFFFFF"] * 9,
    }
    # A limit is not a table: no table-programming count moves.
    assert [b.read(0x03300000 | kind << 8) for kind in (0x05, 0x06, 0x0F, 0x10)] == [0, 0, 0, 0]


def test_table_writes_are_counted_in_their_own_class() -> None:
    b = Bench()
    assert isinstance(b.write_mac(0x040502FF, [Decimal("0.6000")] * 4), WriteReply)  # rate-price table
    b.wait(minutes=1)
    ladder = b.read(0x040604FF)
    assert isinstance(b.write_mac(0x040605FF, ladder), WriteReply)  # ladder table
    b.wait(minutes=1)
    assert isinstance(b.write_cipher(0x04020001, [{"hour": 0, "minute": 0, "tariff": 1}]), WriteReply)
    assert isinstance(b.write_cipher(0x04020000, [{"month": 1, "day": 1, "table": 1}]), WriteReply)
    counts = {kind: b.read(0x03300000 | kind << 8) for kind in (0x05, 0x06, 0x0F, 0x10)}
    assert counts == {0x05: 1, 0x06: 1, 0x0F: 1, 0x10: 1}
    assert b.read(0x03300000) == 4  # each write is a programming record too
    last = {kind: log.records[0] for kind, log in b.meter.events.items()}
    assert last[EventClass.PRICES].di == 0x040502FF and last[EventClass.PRICES].operator == OPERATOR
    assert meter_time(last[EventClass.LADDER].time_ms) == local(2024, 3, 1, 10, 1)
    assert last[EventClass.DAY_TABLE].di == 0x04020001 and last[EventClass.TIME_ZONE].di == 0x04020000
    refused = b.write_cipher(0x04020001, [{"hour": 0, "minute": 0, "tariff": 5}])  # T5: refused
    assert isinstance(refused, ErrorReply) and b.read(0x03300500) == 1  # nothing recorded


# --- time setting (033004) --------------------------------------------------------------------------


def test_a_time_set_is_counted_and_a_broadcast_sync_is_not() -> None:
    b = Bench(clock_offset_s=-120)  # two minutes slow
    assert b.read(0x03300400) == 0
    assert isinstance(b.write_cipher(0x04000102, local(2024, 3, 1, 10, 30).time()), WriteReply)
    assert b.read(0x03300400) == 1
    record = b.meter.events[EventClass.TIME_SET].records[0]
    assert record.operator == OPERATOR
    assert meter_time(record.before_ms) == local(2024, 3, 1, 9, 58)  # the slow clock before
    assert meter_time(record.time_ms) == local(2024, 3, 1, 10, 30)  # the time it was set to
    assert b.read(0x03300001)["data_identifiers"][0] == "04000102"  # and a programming record
    # prepaid.md §1.7: "time settings: the last 10, excluding broadcast ones".
    synced = Bench(clock_offset_s=-120)
    assert synced.exchange(BroadcastTime(synced.now), BROADCAST) is None
    assert synced.meter.clock.error_ms(synced.meter.now_ms) == 0  # applied
    assert synced.read(0x03300400) == 0 and synced.read(0x03300000) == 0


# --- meter clear, event clear, demand clear (033001/03/02) -------------------------------------------


def test_a_meter_clear_is_recorded_with_the_energy_before_it() -> None:
    b = Bench(watts=1000, factory_mode=True)
    b.wait(hours=2)
    assert b.read(0x03300100) == 0
    b.send(MeterClearRequest(LEVEL_02, "00C0FFEE"))
    assert b.read(0x00010000) == Decimal("0.00")
    assert b.read(0x03300100) == 1
    record = b.meter.events[EventClass.METER_CLEAR].records[0]
    assert (record.operator, record.forward, meter_time(record.time_ms)) == ("00C0FFEE", 200, local(2024, 3, 1, 12, 0))
    assert b.read(0x03300001)["operator"] == "00C0FFEE"  # the programming record the clear leaves
    assert no_data(b.send(ReadRequest(0x03300101)))  # the record itself: BYTES, no layout (readout.py)
    # A refused clear (level 04) records nothing.
    assert isinstance(b.send(MeterClearRequest(LEVEL_04, OPERATOR)), ErrorReply)
    assert b.read(0x03300100) == 1


def test_event_and_demand_clears_are_counted_with_their_operator() -> None:
    b = Bench(factory_mode=True)
    assert isinstance(b.control(RelayCommand.TRIP), RelayControlReply)
    b.send(EventClearRequest(LEVEL_02, "0000E7E7", 0x1D00FF00))
    b.send(DemandResetRequest(LEVEL_04, "0000D0D0"))
    assert (b.read(0x03300300), b.read(0x03300200)) == (1, 1)
    cleared = b.meter.events[EventClass.EVENT_CLEAR].records[0]
    assert (cleared.operator, cleared.di) == ("0000E7E7", 0x1D00FF00)
    assert b.meter.events[EventClass.DEMAND_CLEAR].records[0].operator == "0000D0D0"


def test_event_classes_the_model_cannot_produce_are_not_served() -> None:
    """Weekend, settlement-day, cover, key-update and abnormal-card events and refunds: no command
    of the model makes them, and the reference does not say what a meter that never had one
    answers (readout.py), so they answer ERR "no data"."""
    b = Bench()
    for di in (0x03300700, 0x03300C00, 0x03300D00, 0x03301200, 0x03301300, 0x03301301, 0x03340001):
        assert DI_2007.get(di) is not None and no_data(b.send(ReadRequest(di))), f"{di:08X}"


# --- whole freeze records (05 xx FF nn, §3.6) ---------------------------------------------------------


def test_whole_freeze_records_carry_the_groups_the_model_freezes() -> None:
    b = Bench(watts=1000)
    b.wait(days=1, hours=1)
    daily = b.read(0x0506FF01)
    assert daily == {
        "time": b.read(0x05060001),
        "forward_active": b.read(0x05060101),
        "reverse_active": b.read(0x05060201),
    }
    assert daily["time"] == local(2024, 3, 2, 0, 0) and daily["forward_active"][0] == Decimal("14.00")
    # Reactive, demand and variable groups: one bare AA each (a single-phase FW-B meter).
    reply = b.send(ReadRequest(0x0506FF01))
    assert isinstance(reply, ReadReply) and reply.value.endswith(b"\xaa" * 9)
    hourly = b.read(0x0504FF01)
    assert hourly == {
        "time": local(2024, 3, 2, 11, 0),
        "forward_active": Decimal("25.00"),
        "reverse_active": Decimal("0.00"),
    }
    assert b.exchange(FreezeRequest(), BROADCAST) is None  # an instantaneous freeze (0x16 broadcast)
    assert b.read(0x0501FF01)["forward_active"][0] == Decimal("25.00")
    assert no_data(b.send(ReadRequest(0x0501FF02)))
    assert no_data(b.send(ReadRequest(0x0500FF01)))  # timed freezes are not modelled


# --- property: every served record DI decodes with the table's format --------------------------------

RECORD_DIS = [
    item.di
    for item in DI_2007
    if "r" in item.access
    and (item.di >> 24 in (0x1D, 0x1E) or item.di >> 16 in (0x0330, 0x0332, 0x0333, 0x0334) or item.di >> 24 == 0x05)
]
"""The §3.7 event and purchase DIs and the §3.6 frozen-data DIs of the table."""

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(1, 60 * 30)),
        st.tuples(st.just("trip"), st.sampled_from(["00000001", "ABCD0123"])),
        st.tuples(st.just("close"), st.sampled_from(["00000002", "0000FFFF"])),
        st.tuples(st.just("top_up"), st.integers(1, 5000)),
        st.tuples(st.just("limit"), st.integers(0, 100)),
        st.tuples(st.just("price"), st.integers(1, 9999)),
        st.tuples(st.just("time"), st.integers(0, 23)),
        st.tuples(st.just("clear"), st.sampled_from(["meter", "event", "demand"])),
        st.tuples(st.just("freeze"), st.just(0)),
    ),
    max_size=12,
)


def _drive(b: Bench, action: tuple[str, Any]) -> None:
    kind, arg = action
    if kind == "wait":
        b.wait(minutes=arg)
    elif kind == "trip":
        b.control(RelayCommand.TRIP, operator=arg)
    elif kind == "close":
        b.control(RelayCommand.DIRECT_CLOSE, operator=arg)
    elif kind == "top_up":
        b.recharge(arg, b.meter.wallet.count + 1)
    elif kind == "limit":
        b.write_mac(0x04001002, Decimal(arg).scaleb(-2) if arg else Decimal("0.00"))
    elif kind == "price":
        b.write_mac(0x040502FF, [Decimal(arg).scaleb(-4)] * 4)
    elif kind == "time":
        b.write_cipher(0x04000102, b.meter.local_time().replace(hour=arg, microsecond=0).time())
    elif kind == "clear":
        request = {
            "meter": MeterClearRequest(LEVEL_02, "0000C1EA"),
            "event": EventClearRequest(LEVEL_02, "0000C1EA"),
            "demand": DemandResetRequest(LEVEL_04, "0000C1EA"),
        }[arg]
        b.send(request)
    else:
        b.exchange(FreezeRequest(), BROADCAST)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=_ACTIONS)
def test_every_served_record_di_decodes_with_the_table_format(actions: list[tuple[str, Any]]) -> None:
    """Property: after any run of commands, every §3.6/§3.7 DI the meter serves is one reply whose
    bytes decode with the DI's own format and encode back to the same bytes; each served count
    is the model's count, and the records served never outnumber it."""
    b = Bench(watts=1500, balance_fen=50_000, factory_mode=True)
    for action in actions:
        _drive(b, action)
    for di in RECORD_DIS:
        item = DI_2007.lookup(di)
        try:
            expected = item.encode(read_value(b.meter, di))
        except NotServed:
            assert no_data(b.send(ReadRequest(di))), f"{di:08X}"
            continue
        reply = b.send(ReadRequest(di))
        assert isinstance(reply, ReadReply) and reply.di == di, f"{di:08X}"
        assert reply.value == expected
        assert item.encode(item.decode(reply.value)) == reply.value, f"{di:08X}"
    m = b.meter
    for kind in EventClass:
        assert b.read(0x03300000 | kind << 8) == count(m, kind)
        assert len(m.events[kind].records if kind in m.events else []) == min(count(m, kind), 10)
    assert b.read(0x1D000001) == m.trip_count and b.read(0x1E000001) == m.close_count
    served_trips = [n for n in range(1, 11) if isinstance(b.send(ReadRequest(0x1D00FF00 | n)), ReadReply)]
    assert len(served_trips) <= m.trip_count
