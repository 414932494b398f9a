"""Seeded load profiles: residential, commercial and PV, weekday and weekend (prepaid.md §6.1).

Golden values pin the exact watts of a few seeded meters (they were computed with the profile
code of commit d719421, before the catch-up rewrite; PV's weekend values after its household
base took the weekend shape), so a change of the model shows up here. The shape checks are the
§6.1 defaults, marked [A] there: a residential evening peak 18:00-22:00 at 2-4x the daily mean,
a morning peak, low nights, flatter and later weekends; a commercial 09:00-21:00 plateau with
little at night; a PV household exporting around noon; residential daily energy lognormal with
median 6 kWh and sigma_ln 0.6.
"""

from __future__ import annotations

import math
import statistics
from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_stubs.meter import Meter, MeterConfig, to_ms
from protocols.dlt645 import METER_TZ
from simulator.load_profiles import SLOT_MS, make_load

MONDAY = datetime(2026, 3, 2, tzinfo=METER_TZ)
SATURDAY = datetime(2026, 3, 7, tzinfo=METER_TZ)
HOUR_MS = 3_600_000


def day_wh(load, day: datetime) -> tuple[int, int]:
    """(forward, reverse) Wh over the local day (rounded down)."""
    f, r = load.energy(to_ms(day), to_ms(day + timedelta(days=1)))
    return f // HOUR_MS, r // HOUR_MS


def hourly_mean_w(loads: list, day: datetime) -> list[float]:
    """The mean power of each local hour of ``day`` over ``loads``."""
    out = []
    for h in range(24):
        start = to_ms(day + timedelta(hours=h))
        out.append(statistics.fmean(sum(load.energy(start, start + HOUR_MS)) / HOUR_MS for load in loads))
    return out


# --- golden -----------------------------------------------------------------------------------------


def test_golden_residential_commercial_and_pv_meters() -> None:
    res, com, pv = make_load("residential", 1, 7), make_load("commercial", 1, 8), make_load("pv", 1, 9)
    assert (res.daily_wh, com.daily_wh, pv.daily_wh) == (5507, 41206, 14575)
    first = to_ms(MONDAY)
    assert [res.power_at(first + k * SLOT_MS)[0] for k in range(8)] == [93, 65, 79, 76, 60, 75, 58, 55]
    assert [com.power_at(first + k * SLOT_MS)[0] for k in range(8)] == [231, 227, 321, 305, 199, 197, 238, 310]
    noon = to_ms(MONDAY + timedelta(hours=12))
    assert [pv.power_at(noon + k * SLOT_MS)[0] for k in range(4)] == [-1523, -1649, -1510, -1612]
    assert (day_wh(res, MONDAY), day_wh(res, SATURDAY)) == ((5661, 0), (5967, 0))
    assert (day_wh(com, MONDAY), day_wh(com, SATURDAY)) == ((42025, 0), (26182, 0))
    assert (day_wh(pv, MONDAY), day_wh(pv, SATURDAY)) == ((3393, 11955), (3205, 11378))


def test_the_same_seed_and_meter_give_the_same_load_and_others_differ() -> None:
    a, b = make_load("residential", 3, 12), make_load("residential", 3, 12)
    c, d = make_load("residential", 3, 13), make_load("residential", 4, 12)
    t = to_ms(MONDAY)
    slots = [t + k * SLOT_MS for k in range(96)]
    assert [a.power_at(s) for s in slots] == [b.power_at(s) for s in slots]
    assert [a.power_at(s) for s in slots] != [c.power_at(s) for s in slots]
    assert [a.power_at(s) for s in slots] != [d.power_at(s) for s in slots]


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["residential", "commercial", "pv"]),
    index=st.integers(1, 10_000),
    slot=st.integers(0, 4 * 365 * 96),
    within=st.integers(0, SLOT_MS - 1),
)
def test_power_holds_for_the_whole_slot_whichever_instant_asks(kind: str, index: int, slot: int, within: int) -> None:
    load = make_load(kind, 2, index)
    start = to_ms(MONDAY) + slot * SLOT_MS
    assert load.power_at(start + within) == load.power_at(start)
    assert load.power_at(start)[1] == start + SLOT_MS


# --- shapes (prepaid.md §6.1 [A]) -----------------------------------------------------------------------


def test_residential_evening_peak_morning_peak_quiet_night_and_a_flatter_later_weekend() -> None:
    loads = [make_load("residential", 9, i) for i in range(1, 201)]
    weekday, weekend = hourly_mean_w(loads, MONDAY), hourly_mean_w(loads, SATURDAY)
    mean = statistics.fmean(weekday)
    evening = statistics.fmean(weekday[18:22])
    assert 2 * mean <= evening <= 4 * mean  # "main evening peak 18:00-22:00 at 2-4x the daily mean"
    assert max(weekday[6:9]) > 1.2 * statistics.fmean(weekday[9:11])  # morning peak 06:30-08:30
    assert max(weekday[1:5]) < 0.5 * mean  # night base
    assert weekend[7] < weekday[7]  # weekends later ...
    assert statistics.fmean(weekend[9:17]) > statistics.fmean(weekday[9:17])  # ... and flatter
    assert max(weekend) - min(weekend) < max(weekday) - min(weekday)


def test_commercial_plateau_from_9_to_21_little_at_night_and_a_quieter_weekend() -> None:
    loads = [make_load("commercial", 9, i) for i in range(1, 201)]
    weekday, weekend = hourly_mean_w(loads, MONDAY), hourly_mean_w(loads, SATURDAY)
    mean = statistics.fmean(weekday)
    assert min(weekday[9:21]) > 1.4 * mean and max(weekday[0:6]) < 0.25 * mean
    assert 0.55 < sum(weekend) / sum(weekday) < 0.65  # weekends at 0.6 of a weekday
    daily = statistics.fmean(sum(day_wh(load, MONDAY)) for load in loads)
    assert 15_000 <= daily <= 60_000  # small shops 15-60 kWh/day


def test_pv_exports_around_noon_and_imports_at_night() -> None:
    loads = [make_load("pv", 9, i) for i in range(1, 101)]
    weekday = hourly_mean_w([_Signed(load) for load in loads], MONDAY)
    assert all(w < 0 for w in weekday[8:16])  # export through the middle of the day
    assert all(w > 0 for w in weekday[:6] + weekday[19:])  # the household draws at night
    assert weekday.index(min(weekday)) in (11, 12)  # deepest around noon
    # The bell integrates to the meter's daily generation: export + the base it covers by day.
    load = loads[0]
    fwd, rev = load.energy(to_ms(MONDAY), to_ms(MONDAY + timedelta(days=1)))
    assert 0.7 * load.daily_wh < rev / HOUR_MS < load.daily_wh
    # A PV meter's reverse register counts the export, its forward register the imports.
    meter = Meter(MeterConfig("000000000001"), make_load("pv", 9, 1), MONDAY)
    meter.advance(MONDAY + timedelta(days=1))
    assert meter.reverse[0] == rev // (HOUR_MS * 10) and meter.forward[0] == fwd // (HOUR_MS * 10)


class _Signed:
    """A load's net power (forward - reverse) through ``energy``, for hourly means of PV."""

    def __init__(self, load) -> None:
        self.load = load

    def energy(self, a: int, b: int) -> tuple[int, int]:
        f, r = self.load.energy(a, b)
        return f - r, 0


def test_residential_daily_energy_is_lognormal_with_median_6_kwh() -> None:
    daily = [make_load("residential", 5, i).daily_wh for i in range(1, 4001)]
    assert 5_700 <= statistics.median(daily) <= 6_300
    assert 0.55 <= statistics.pstdev(math.log(d) for d in daily) <= 0.65
