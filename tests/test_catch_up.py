"""Catching a meter up goes from event to event, and gives what stepping through the load gives.

A meter far behind (a summary after ``POST /time/advance``, a read of a meter nobody observed
for a month) integrates its load from interval to interval: an interval ends at a tariff
boundary, a relay timer, the daily freeze or an energy threshold (step, wallet state), never
at a 15-minute load slot or an hourly freeze. These tests pin the pieces that make that exact:
the bulk energy of a load profile equals stepping through its slots, the integer TOU lookup
equals the datetime one, and a residential day costs a handful of intervals. (That one jump
equals many small steps is tests/test_meter_observation.py.)
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_stubs.load import ConstantLoad, OverrideLoad, energies_between, energy_between
from firmware_stubs.meter import Meter, MeterConfig, to_ms
from firmware_stubs.tariff import DEFAULT_TOU, TouSchedule
from protocols.dlt645 import METER_TZ
from simulator.load_profiles import make_load

START = datetime(2026, 3, 10, 9, 0, tzinfo=METER_TZ)
T0 = to_ms(START)


def stepped_energy(load, a: int, b: int) -> tuple[int, int]:
    """Forward and reverse mJ by walking power_at piece by piece (the reference)."""
    fwd = rev = 0
    while a < b:
        watts, until = load.power_at(a)
        end = min(b, max(until, a + 1))
        if watts > 0:
            fwd += watts * (end - a)
        elif watts < 0:
            rev -= watts * (end - a)
        a = end
    return fwd, rev


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["residential", "commercial", "pv", "constant"]),
    seed=st.integers(0, 10_000),
    index=st.integers(1, 100_000),
    start=st.integers(-40 * 86_400_000, 400 * 86_400_000),
    cuts=st.lists(st.integers(0, 3 * 86_400_000), min_size=1, max_size=12),
    pinned=st.sampled_from([None, None, 0, 1234, -800]),
)
def test_profile_energies_equal_stepping_through_the_slots(kind, seed, index, start, cuts, pinned) -> None:
    load = make_load(kind, seed, index, None, pinned)
    a = T0 + start
    bounds = sorted({a, *(a + c for c in cuts)})
    expected = [stepped_energy(load, x, y) for x, y in pairwise(bounds)]
    assert load.energies(bounds) == expected
    assert energies_between(load, bounds) == expected
    assert load.energy(bounds[0], bounds[-1]) == stepped_energy(load, bounds[0], bounds[-1])


def test_generic_loads_without_a_fast_path_are_summed_from_power_at() -> None:
    class Steps:
        def power_at(self, t_ms: int) -> tuple[int, int]:
            minute = t_ms // 60_000
            return (minute % 7) * 300 - 600, (minute + 1) * 60_000

    load = Steps()
    bounds = [T0 + 17, T0 + 3_600_000, T0 + 3_600_001, T0 + 9_000_000]
    expected = [stepped_energy(load, x, y) for x, y in pairwise(bounds)]
    assert energies_between(load, bounds) == expected
    assert any(f for f, _ in expected) and any(r for _, r in expected)  # both directions occur
    assert energy_between(OverrideLoad(load), T0, T0 + 7_654_321) == stepped_energy(load, T0, T0 + 7_654_321)
    assert energy_between(OverrideLoad(load, -50), T0, T0 + 1000) == (0, 50_000)
    assert ConstantLoad(20).energy(T0, T0 + 1000) == (20_000, 0)


SUMMER = TouSchedule(
    zones=((1, 1, 1), (3, 15, 2), (7, 1, 3), (11, 1, 1)),
    day_tables=(
        ((0, 0, 4), (8, 0, 2), (22, 0, 4)),
        ((7, 0, 3), (8, 0, 2), (11, 0, 3), (18, 0, 2), (23, 0, 4)),
        ((7, 0, 3), (8, 0, 2), (11, 0, 3), (18, 0, 2), (23, 0, 4)),  # same periods, another table
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    schedule=st.sampled_from([DEFAULT_TOU, SUMMER]),
    offset_ms=st.integers(-400 * 86_400_000, 800 * 86_400_000),
)
def test_integer_tou_lookup_equals_the_datetime_one(schedule: TouSchedule, offset_ms: int) -> None:
    local = START + timedelta(milliseconds=offset_ms)
    wall = to_ms(local) + 8 * 3_600_000  # METER_TZ wall-clock milliseconds
    tariff, change = schedule.at_wall_ms(wall)
    assert tariff == schedule.tariff_at(local)
    assert change - 8 * 3_600_000 == to_ms(schedule.next_change(local))


def intervals_per_day(kind: str, days: int) -> float:
    meter = Meter(MeterConfig("000000000001", balance_fen=10**7), make_load(kind, 1, 7), START)
    calls = 0
    original = meter._after_step

    def counting(t: int) -> None:
        nonlocal calls
        calls += 1
        original(t)

    meter._after_step = counting  # type: ignore[method-assign]
    meter.advance(START + timedelta(days=days))
    assert len(meter.hourly) == min(254, 24 * days) and len(meter.daily) == days
    return calls / days


def test_a_day_of_a_residential_meter_is_a_handful_of_intervals() -> None:
    # DEFAULT_TOU has 5 switch points a day, plus the daily freeze: 6 intervals, not one per
    # 15-minute slot (96) or per hourly freeze (24). Stepping per slot took 86 a day.
    for kind in ("residential", "commercial", "pv"):
        assert intervals_per_day(kind, 30) <= 7, kind
