"""The meter's own clock drives its freezes and stamps its records.

A real meter freezes at *its* midnight and *its* whole hours and stamps trips, closes, purchases,
programming records and freezes with *its* clock (prepaid.md §1.7; dlt645.md §3.6, §3.7). When
the clock changes (a time set 04000101/04000102, a broadcast time sync, the clock_jump fault of
simulator/faults.py) the freezes follow it: a freeze time the clock jumps over is written at once,
the next ones are scheduled from the new reading. (Before, the freeze times were computed once
and records carried true time: after a +13 h jump the meter passed its own midnight without a
daily freeze.)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from meterkit import T0, Bench

from firmware_stubs.clock import MeterClock
from firmware_stubs.meter import to_ms
from protocols.dlt645 import METER_TZ, WriteReply
from protocols.dlt645.relay import RelayCommand as N1
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import Fleet
from simulator.scenario import build

H = timedelta(hours=1)
AFTERNOON = datetime(2024, 3, 1, 15, 0, tzinfo=METER_TZ)


def daily_times(b: Bench) -> list[datetime]:
    """Times of the daily freezes as the meter serves them (05060001..), newest first."""
    return [b.read(0x05060001 + n) for n in range(len(b.meter.daily))]


def hourly_times(b: Bench) -> list[datetime]:
    return [b.read(0x05040001 + n) for n in range(len(b.meter.hourly))]


def test_a_13_hour_jump_over_midnight_writes_the_daily_freeze_and_moves_the_next_ones() -> None:
    b = Bench(watts=1000, start=AFTERNOON)
    b.wait(minutes=30)  # 15:30, hourly freeze 15:00 not yet (it was the start), none daily
    assert len(b.meter.daily) == 0 and len(b.meter.hourly) == 0
    b.meter.jump_clock(13 * 3600)  # meter now reads 04:30 on 2 March
    assert b.meter.local_time() == datetime(2024, 3, 2, 4, 30, tzinfo=METER_TZ)
    # Its own midnight passed: the daily freeze is there at once, stamped with the meter's midnight.
    assert daily_times(b) == [datetime(2024, 3, 2, 0, 0, tzinfo=METER_TZ)]
    # And the hours it jumped over, 16:00 .. 04:00, each stamped with its whole hour.
    assert hourly_times(b) == [datetime(2024, 3, 2, 4, tzinfo=METER_TZ) - n * H for n in range(13)]
    frozen = b.read(0x05060101)[0]
    assert frozen == Decimal("0.50")  # the registers at the jump (30 min at 1 kW)
    # The next freezes are due by the new reading: the meter's next midnight is 19.5 true hours on.
    b.at(AFTERNOON + timedelta(minutes=30) + timedelta(hours=19, minutes=30) - timedelta(milliseconds=1))
    assert len(b.meter.daily) == 1
    b.wait(milliseconds=1)
    assert daily_times(b)[0] == datetime(2024, 3, 3, 0, 0, tzinfo=METER_TZ)
    assert len(b.meter.daily) == 2
    # Not at the true midnight of 2 March (the old schedule): nothing happened there.


def test_a_clock_set_back_over_midnight_freezes_at_the_meters_midnight_again() -> None:
    b = Bench(watts=500, start=datetime(2024, 3, 1, 23, 50, tzinfo=METER_TZ), factory_mode=True)
    b.wait(minutes=20)  # 00:10: the daily freeze of 2 March written
    assert daily_times(b) == [datetime(2024, 3, 2, 0, 0, tzinfo=METER_TZ)]
    # A master sets the time back to 23:00 of 1 March (level 98, class 2 parameter, §5.5).
    assert isinstance(b.write_cipher(0x04000101, datetime(2024, 3, 1).date()), WriteReply)
    assert isinstance(b.write_cipher(0x04000102, datetime(2024, 3, 1, 23, 0).time()), WriteReply)
    assert b.meter.local_time().replace(microsecond=0) == datetime(2024, 3, 1, 23, 0, tzinfo=METER_TZ)
    b.wait(minutes=59, seconds=59)
    assert len(b.meter.daily) == 1  # the meter reads 23:59:59
    b.wait(seconds=1)
    assert daily_times(b)[:2] == [datetime(2024, 3, 2, 0, 0, tzinfo=METER_TZ)] * 2  # its midnight again
    assert b.read(0x05040001) == datetime(2024, 3, 2, 0, 0, tzinfo=METER_TZ)


def test_records_carry_the_meters_clock_not_true_time() -> None:
    ahead = timedelta(minutes=10, seconds=30)
    b = Bench(watts=2000, clock_offset_s=ahead.total_seconds(), start=T0)
    b.wait(minutes=20)
    meter_now = (b.now + ahead).replace(microsecond=0)
    assert b.meter.local_time().replace(microsecond=0) == meter_now
    assert b.recharge(1000, 2) is not None and b.meter.wallet.count == 2
    assert b.read(0x03330101) == meter_now.replace(second=0)  # purchase time YYMMDDhhmm
    b.control(N1.TRIP, operator="00001234")
    trip = b.read(0x1D00FF01)
    assert trip["time"] == meter_now and trip["operator"] == "00001234"
    b.wait(minutes=1)
    assert isinstance(b.write_mac(0x04001001, Decimal("30.00")), WriteReply)
    assert b.read(0x03300001)["time"] == meter_now + timedelta(minutes=1)
    # The hourly freeze is due when the meter's clock reads 11:00, stamped 11:00.
    b.at(datetime(2024, 3, 1, 11, 0, tzinfo=METER_TZ) - ahead)
    assert b.read(0x05040001) == datetime(2024, 3, 1, 11, 0, tzinfo=METER_TZ)
    b.at(datetime(2024, 3, 2, 0, 0, tzinfo=METER_TZ) - ahead)
    assert b.read(0x05060001) == datetime(2024, 3, 2, 0, 0, tzinfo=METER_TZ)


def test_freezes_of_a_drifting_clock_are_stamped_with_whole_hours_of_that_clock() -> None:
    b = Bench(watts=1000, drift_ppm=250.0, start=T0)  # gains 21.6 s a day
    b.wait(days=3)
    stamps = [s.time_ms for s in b.meter.hourly]
    assert all(ms % 3_600_000 == 0 for ms in stamps)
    assert stamps == sorted(stamps, reverse=True) and len(set(stamps)) == len(stamps) == 72
    assert [d.energy.time_ms % 86_400_000 for d in b.meter.daily] == [16 * 3_600_000] * 3  # 00:00 UTC+8
    # The meter's midnight comes before true midnight: 3 days x 21.6 s early, at the third.
    third = b.meter.daily[0].energy.time_ms
    assert to_ms(datetime(2024, 3, 4, tzinfo=METER_TZ)) == third


def test_a_broadcast_sync_across_a_whole_hour_writes_that_hourly_freeze() -> None:
    b = Bench(watts=1000, start=datetime(2024, 3, 1, 10, 57, tzinfo=METER_TZ))
    b.wait(minutes=1)
    assert b.meter.broadcast_sync(to_ms(datetime(2024, 3, 1, 11, 1, tzinfo=METER_TZ)))
    assert hourly_times(b) == [datetime(2024, 3, 1, 11, 0, tzinfo=METER_TZ)]
    b.wait(minutes=58, seconds=59)
    assert len(b.meter.hourly) == 1
    b.wait(seconds=1)
    assert hourly_times(b)[0] == datetime(2024, 3, 1, 12, 0, tzinfo=METER_TZ)


# --- the clock_jump fault (simulator/faults.py) ------------------------------------------------------


START = datetime(2026, 3, 10, 15, 0, tzinfo=METER_TZ)


def fleet_of(faults: list[dict[str, Any]] | None = None, bus_faults: list[dict[str, Any]] | None = None) -> Fleet:
    meter = {"address": "000000000002", "faults": faults} if faults else None
    doc: dict[str, Any] = {
        "fleet": {"seed": 3, "start": START.isoformat(), "speed": 0},
        "defaults": {"load": "constant", "watts": 1000},
        "bus": [{"name": "b", "meters": 3, "timing": False, "faults": bus_faults or []}],
    }
    if meter:
        doc["meter"] = [meter]
    s = build(doc)
    return Fleet(s.buses, VirtualClock(s.start, s.speed), s.seed)


def meter_time(fleet: Fleet, address: str) -> datetime:
    return datetime.fromisoformat(fleet.state(address)["meter_time"])


def test_the_clock_jump_fault_moves_the_meter_clock_and_its_freezes() -> None:
    fleet = fleet_of()
    a = "000000000001"
    fleet.advance(timedelta(minutes=30))
    fleet.inject(a, FaultSpec(Fault.CLOCK_JUMP, seconds=13 * 3600))
    assert meter_time(fleet, a) == START + timedelta(hours=13, minutes=30)
    assert meter_time(fleet, "000000000003") == START + timedelta(minutes=30)  # only that meter
    m = fleet.meter(a).meter
    assert len(m.daily) == 1 and m.daily[0].energy.time_ms == to_ms(datetime(2026, 3, 11, tzinfo=METER_TZ))
    fleet.advance(timedelta(hours=19, minutes=30))  # the meter reads 00:00 of 12 March
    assert meter_time(fleet, a) == datetime(2026, 3, 12, tzinfo=METER_TZ)
    assert len(m.daily) == 2 and m.daily[0].energy.time_ms == to_ms(datetime(2026, 3, 12, tzinfo=METER_TZ))
    assert meter_time(fleet, "000000000003") == datetime(2026, 3, 11, 11, 0, tzinfo=METER_TZ)
    assert len(fleet.meter("000000000003").meter.daily) == 1  # its own midnight, 9 h after START


def test_a_backward_clock_jump_fault_lets_the_meter_repeat_the_hours() -> None:
    fleet = fleet_of()
    a = "000000000001"
    fleet.advance(timedelta(hours=2))  # hourly freezes 16:00, 17:00
    m = fleet.meter(a).meter
    fleet.meter(a).inject(FaultSpec(Fault.CLOCK_JUMP, seconds=-5400), fleet.now())  # 17:00 -> 15:30
    assert meter_time(fleet, a) == START + timedelta(minutes=30)
    fleet.advance(timedelta(hours=2))
    assert meter_time(fleet, a) == START + timedelta(hours=2, minutes=30)
    stamps = [datetime.fromtimestamp(s.time_ms / 1000, METER_TZ).hour for s in m.hourly]
    assert stamps == [17, 16, 17, 16]


def test_clock_jump_faults_in_a_scenario_and_on_a_bus() -> None:
    jump = {"kind": "clock_jump"}
    fleet = fleet_of(faults=[{**jump, "seconds": 400}], bus_faults=[{**jump, "seconds": 60}])
    # The bus fault reaches every meter; meter 2 also has its own jump.
    assert meter_time(fleet, "000000000001") == START + timedelta(seconds=60)
    assert meter_time(fleet, "000000000002") == START + timedelta(seconds=460)
    fleet.inject("b", FaultSpec(Fault.CLOCK_JUMP, seconds=-60))
    assert meter_time(fleet, "000000000003") == START


# --- broadcast time sync: the rules as a property (dlt645.md §2.1 0x08; prepaid.md §4.1) --------------

MINUTE = 60_000


@settings(max_examples=300, deadline=None)
@given(
    start=st.one_of(
        st.integers(to_ms(datetime(2024, 1, 1, tzinfo=METER_TZ)), to_ms(datetime(2030, 1, 1, tzinfo=METER_TZ))),
        st.builds(  # the edges: a few minutes around a local midnight
            lambda day, off: to_ms(datetime(2024, 1, 1, tzinfo=METER_TZ)) + day * 86_400_000 + off,
            st.integers(0, 2000),
            st.integers(-30 * MINUTE, 30 * MINUTE),
        ),
    ),
    offset_ms=st.integers(-20 * MINUTE, 20 * MINUTE),
    drift=st.sampled_from([0.0, 30.5, -80.0]),
    syncs=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 10 * MINUTE), st.integers(0, 3 * 86_400_000)),  # time before the sync
            st.one_of(st.integers(-6 * MINUTE, 6 * MINUTE), st.sampled_from([-300_000, 300_000, 300_001])),
        ),
        max_size=10,
    ),
    guards=st.lists(st.integers(-2 * 86_400_000, 2 * 86_400_000), max_size=2),
    near_guard=st.booleans(),
)
# The edges of the midnight guard, to the millisecond (the guard once counted whole minutes: 23:55:30
# was 5 minutes from midnight by minute and a sync was applied there).
@example(
    start=to_ms(datetime(2025, 6, 1, 23, 55, 30, 0, tzinfo=METER_TZ)),
    offset_ms=0,
    drift=0.0,
    syncs=[(0, MINUTE)],
    guards=[],
    near_guard=False,
)
@example(
    start=to_ms(datetime(2025, 6, 1, 23, 55, 0, 0, tzinfo=METER_TZ)),
    offset_ms=0,
    drift=0.0,
    syncs=[(0, MINUTE)],
    guards=[],
    near_guard=False,
)
@example(
    start=to_ms(datetime(2025, 6, 2, 0, 4, 59, 999000, tzinfo=METER_TZ)),
    offset_ms=0,
    drift=0.0,
    syncs=[(0, MINUTE)],
    guards=[],
    near_guard=False,
)
@example(
    start=to_ms(datetime(2025, 6, 2, 0, 5, 0, 0, tzinfo=METER_TZ)),
    offset_ms=0,
    drift=0.0,
    syncs=[(0, MINUTE)],
    guards=[],
    near_guard=False,
)
def test_broadcast_sync_applies_within_5_minutes_once_a_day_away_from_midnight_and_settlement(
    start: int, offset_ms: int, drift: float, syncs: list[tuple[int, int]], guards: list[int], near_guard: bool
) -> None:
    clock = MeterClock(start, offset_ms, drift)
    t = start
    last_day = None
    guard_ms = [clock.meter_ms(start) + g for g in guards]
    for gap, correction in syncs:
        t += gap
        current = clock.meter_ms(t)
        if near_guard and guard_ms:
            guard_ms[0] = current + correction // 2  # a settlement instant right next to the reading
        wall = datetime(1970, 1, 1, 8, tzinfo=METER_TZ) + timedelta(milliseconds=current)
        midnight = wall.replace(hour=0, minute=0, second=0, microsecond=0)
        to_midnight = min(wall - midnight, midnight + timedelta(days=1) - wall)
        expected = (
            abs(correction) <= 5 * MINUTE
            and wall.date() != last_day
            and to_midnight >= timedelta(minutes=5)
            and all(abs(current - g) >= 5 * MINUTE for g in guard_ms)
        )
        assert clock.broadcast_sync(current + correction, t, guard_ms) is expected
        assert clock.meter_ms(t) == (current + correction if expected else current)
        if expected:
            last_day = wall.date()
