"""Tariff engine: TOU schedules, price sets, step tables, two sets with switch times (prepaid.md §1.3)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_stubs.tariff import (
    DEFAULT_PRICES,
    DEFAULT_STEPS,
    DEFAULT_TOU,
    FLAT,
    FLAT_TOU,
    PEAK,
    SHARP,
    VALLEY,
    PriceSet,
    StepTable,
    TariffError,
    TariffState,
    TouSchedule,
    UnknownTariffItem,
    cost_of,
    flat_schedule,
)
from protocols.dlt645.formats import METER_TZ, PartialTime
from protocols.dlt645.table import DI_2007

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNSET = PartialTime(99, 99, 99)
NEW_YEAR = (PartialTime(1, 1, 0), UNSET, UNSET, UNSET)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=METER_TZ)


def steps(thresholds, increments=(0, 500, 3000, 0, 0, 0, 0), dates=NEW_YEAR):
    return StepTable(tuple(thresholds), tuple(increments), tuple(dates))


def di_round_trip(di: int, value):
    item = DI_2007.lookup(di)
    return item.decode(item.encode(value))


# --- TOU schedule: golden ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "tariff"),
    [
        # ordinary day (March): valley 23-07, flat 07-08, peak 08-11, flat 11-18, peak 18-23
        (at(2024, 3, 1, 0, 0), VALLEY),
        (at(2024, 3, 1, 6, 59, 59), VALLEY),
        (at(2024, 3, 1, 7, 0), FLAT),
        (at(2024, 3, 1, 7, 59), FLAT),
        (at(2024, 3, 1, 8, 0), PEAK),
        (at(2024, 3, 1, 10, 59), PEAK),
        (at(2024, 3, 1, 11, 0), FLAT),
        (at(2024, 3, 1, 17, 59), FLAT),
        (at(2024, 3, 1, 18, 0), PEAK),
        (at(2024, 3, 1, 19, 30), PEAK),
        (at(2024, 3, 1, 22, 59, 59), PEAK),
        (at(2024, 3, 1, 23, 0), VALLEY),
        (at(2024, 3, 1, 23, 59, 59, 999999), VALLEY),
        # sharp 19-21 in July and August only
        (at(2024, 6, 30, 19, 30), PEAK),
        (at(2024, 7, 1, 18, 59), PEAK),
        (at(2024, 7, 1, 19, 0), SHARP),
        (at(2024, 7, 15, 20, 59), SHARP),
        (at(2024, 7, 15, 21, 0), PEAK),
        (at(2024, 8, 31, 20, 0), SHARP),
        (at(2024, 9, 1, 20, 0), PEAK),
        (at(2024, 7, 1, 3, 0), VALLEY),
        # midnight and new-year wrap
        (at(2024, 12, 31, 23, 30), VALLEY),
        (at(2025, 1, 1, 0, 30), VALLEY),
    ],
)
def test_default_tou_golden(when: datetime, tariff: int) -> None:
    assert DEFAULT_TOU.tariff_at(when) == tariff


def test_tou_uses_the_meter_wall_clock_for_other_zones() -> None:
    assert DEFAULT_TOU.tariff_at(datetime(2024, 7, 1, 11, 30, tzinfo=UTC)) == SHARP  # 19:30 CST
    assert DEFAULT_TOU.next_change(datetime(2024, 3, 1, 0, 0, tzinfo=UTC)) == at(2024, 3, 1, 11, 0)


@pytest.mark.parametrize(
    ("when", "change"),
    [
        (at(2024, 3, 1, 7, 0), at(2024, 3, 1, 8, 0)),  # a switch point itself is not "next"
        (at(2024, 3, 1, 6, 59, 59), at(2024, 3, 1, 7, 0)),
        (at(2024, 3, 1, 22, 0), at(2024, 3, 1, 23, 0)),
        (at(2024, 3, 1, 23, 30), at(2024, 3, 2, 7, 0)),  # same table tomorrow: no midnight stop
        (at(2024, 3, 2, 2, 0), at(2024, 3, 2, 7, 0)),
        (at(2024, 6, 30, 23, 30), at(2024, 7, 1, 0, 0)),  # time-zone boundary at midnight
        (at(2024, 7, 1, 18, 0), at(2024, 7, 1, 19, 0)),
        (at(2024, 7, 1, 19, 0), at(2024, 7, 1, 21, 0)),
        (at(2024, 8, 31, 23, 0), at(2024, 9, 1, 0, 0)),
        (at(2024, 12, 31, 23, 30), at(2025, 1, 1, 7, 0)),
    ],
)
def test_default_tou_next_change(when: datetime, change: datetime) -> None:
    assert DEFAULT_TOU.next_change(when) == change


def test_flat_schedule() -> None:
    assert {FLAT_TOU.tariff_at(at(2024, 5, 5, h, 17)) for h in range(24)} == {FLAT}
    assert FLAT_TOU.next_change(at(2024, 5, 5, 13, 0)) == at(2024, 5, 6, 0, 0)
    assert flat_schedule(1).tariff_at(at(2024, 5, 5, 13, 0)) == 1


def test_zone_before_the_first_start_wraps_from_last_year() -> None:
    schedule = TouSchedule(zones=[(12, 1, 2), (3, 1, 1)], day_tables=[[(0, 0, FLAT)], [(0, 0, VALLEY)]])
    assert schedule.zones == ((3, 1, 1), (12, 1, 2))  # stored sorted
    assert schedule.tariff_at(at(2024, 2, 1, 12, 0)) == VALLEY
    assert schedule.tariff_at(at(2024, 3, 1, 0, 0)) == FLAT
    assert schedule.tariff_at(at(2024, 12, 1, 0, 0)) == VALLEY
    assert schedule.next_change(at(2024, 2, 29, 23, 0)) == at(2024, 3, 1, 0, 0)


@pytest.mark.parametrize(
    ("zones", "tables", "message"),
    [
        ([(1, 1, 1)], [[(7, 0, 3), (7, 14, 2)]], "lasts 14 min"),
        ([(1, 1, 1)], [[(0, 10, 3), (23, 56, 2)]], "lasts 14 min"),  # the wrap-round period
        ([(1, 1, 1)], [[(h, 0, 3) for h in range(15)]], "15 switch points"),
        ([(1, 1, 1)], [[(0, 0, 5)]], "tariff = 5"),
        ([(1, 1, 1)], [[(24, 0, 1)]], "hour = 24"),
        ([(1, 1, 1)], [[]], "0 switch points"),
        ([(1, 1, 3)], [[(0, 0, 1)], [(0, 0, 2)]], "day table = 3"),
        ([(1, 1, 1), (1, 1, 1)], [[(0, 0, 1)]], "two time zones start on 01-01"),
        ([(2, 30, 1)], [[(0, 0, 1)]], "02-30 is not a date"),
        ([(m, d, 1) for m in range(1, 13) for d in (1, 15)][:15], [[(0, 0, 1)]], "15 time zones"),
        ([], [[(0, 0, 1)]], "0 time zones"),
        ([(1, 1, 1)], [[(0, 0, 1)]] * 9, "9 day tables"),
        ([(1, 1, 1)], [[(0, 0, 1.0)]], "must be an int"),
    ],
)
def test_schedule_validation(zones, tables, message: str) -> None:
    with pytest.raises(TariffError, match=message):
        TouSchedule(zones=zones, day_tables=tables)


def test_naive_times_are_refused() -> None:
    with pytest.raises(TariffError, match="naive"):
        DEFAULT_TOU.tariff_at(datetime(2024, 1, 1))
    with pytest.raises(TariffError, match="naive"):
        TariffState().price_at(datetime(2024, 1, 1))
    assert issubclass(TariffError, ValueError)


# --- step tables: golden --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("energy", "increment", "nxt"),
    [
        (0, 0, 288_000),
        (287_999, 0, 288_000),
        (288_000, 500, 480_000),  # the first 2,880.00 kWh are step 1; the next 0.01 kWh is step 2
        (479_999, 500, 480_000),
        (480_000, 3000, None),
        (10**9, 3000, None),
    ],
)
def test_default_steps(energy: int, increment: int, nxt: int | None) -> None:
    assert DEFAULT_STEPS.settlement_mode == "annual"
    assert DEFAULT_STEPS.increment(energy) == increment
    assert DEFAULT_STEPS.next_threshold(energy) == nxt


def test_firmware_style_repeated_thresholds_are_unused() -> None:
    # Money.c defaults: 2880, 4800, 4800, 4800, 4800, 4800 and increments 0, 500, 3000, 3000, ...
    table = steps((288_000, 480_000, 480_000, 480_000, 480_000, 480_000), (0, 500, 3000, 9999, 9999, 9999, 9999))
    assert [table.increment(e) for e in (0, 288_000, 480_000, 10**8)] == [0, 500, 3000, 3000]
    assert table.next_threshold(480_000) is None
    # a repeat in the middle skips a step
    table = steps((100, 200, 200, 300, 0, 0), (0, 1, 2, 3, 4, 5, 6))
    assert [table.increment(e) for e in (99, 100, 199, 200, 299, 300)] == [0, 1, 1, 3, 3, 4]


def test_no_thresholds_means_step_one_only() -> None:
    table = steps((0,) * 6, (7, 500, 0, 0, 0, 0, 0))
    assert table.increment(10**6) == 7
    assert table.next_threshold(0) is None


@pytest.mark.parametrize(
    ("dates", "mode"),
    [
        ((PartialTime(1, 1, 0), UNSET, UNSET, UNSET), "annual"),
        ((UNSET, UNSET, UNSET, PartialTime(12, 28, 23)), "annual"),  # any entry
        ((PartialTime(99, 1, 0), UNSET, UNSET, UNSET), "monthly"),  # first entry, month not set
        ((PartialTime(99, 28, 23), PartialTime(6, 1, 0), UNSET, UNSET), "monthly"),  # first entry decides
        ((UNSET, PartialTime(99, 1, 0), UNSET, UNSET), "none"),  # monthly only in the first entry
        ((PartialTime(1, 29, 0), UNSET, UNSET, UNSET), "none"),  # day 29..31 is not a valid settlement day
        ((PartialTime(99, 29, 0), UNSET, UNSET, UNSET), "none"),
        ((PartialTime(1, 1, 99), UNSET, UNSET, UNSET), "none"),
        ((None, None, None, PartialTime(3, 1, 0)), "annual"),  # None = all-zero entry
        ((None, None, None, None), "none"),
        ((PartialTime(day=5, hour=8), UNSET, UNSET, UNSET), "monthly"),  # None fields = 99
    ],
)
def test_settlement_mode_inference(dates, mode: str) -> None:
    assert steps((288_000, 0, 0, 0, 0, 0), dates=dates).settlement_mode == mode


def test_mode_none_charges_no_step() -> None:
    table = steps((100, 0, 0, 0, 0, 0), (300, 500, 0, 0, 0, 0, 0), (UNSET,) * 4)
    assert table.settlement_mode == "none"
    assert table.increment(0) == table.increment(1000) == 0
    assert table.next_threshold(0) is None
    assert table.next_settlement(at(2024, 1, 1)) is None
    state = TariffState(steps=table, step_energy=5000)
    assert state.price_at(at(2024, 1, 1, 12, 0)) == 5000
    assert state.hundredths_to_next_step() is None


def test_next_settlement() -> None:
    assert DEFAULT_STEPS.next_settlement(at(2024, 6, 15, 12, 0)) == at(2025, 1, 1, 0, 0)
    assert DEFAULT_STEPS.next_settlement(at(2024, 12, 31, 23, 59, 59)) == at(2025, 1, 1, 0, 0)
    assert DEFAULT_STEPS.next_settlement(at(2025, 1, 1, 0, 0)) == at(2026, 1, 1, 0, 0)  # strictly after
    monthly = steps((100, 0, 0, 0, 0, 0), dates=(PartialTime(99, 15, 8), UNSET, UNSET, UNSET))
    assert monthly.next_settlement(at(2024, 12, 20)) == at(2025, 1, 15, 8, 0)
    assert monthly.next_settlement(at(2024, 2, 15, 7, 59)) == at(2024, 2, 15, 8, 0)
    quarterly = steps(
        (100, 0, 0, 0, 0, 0),
        dates=(PartialTime(10, 1, 0), PartialTime(1, 1, 0), PartialTime(4, 1, 0), PartialTime(7, 1, 0)),
    )
    assert quarterly.next_settlement(at(2024, 5, 1)) == at(2024, 7, 1, 0, 0)
    assert quarterly.next_settlement(at(2024, 11, 1)) == at(2025, 1, 1, 0, 0)
    assert quarterly.next_settlement(datetime(2024, 6, 30, 15, 59, tzinfo=UTC)) == at(2024, 7, 1, 0, 0)


@pytest.mark.parametrize(
    ("thresholds", "increments", "dates", "message"),
    [
        ((480_000, 288_000, 0, 0, 0, 0), None, None, "must not decrease"),
        ((288_000, 0, 480_000, 0, 0, 0), None, None, "must come last"),
        ((1, 2, 3, 4, 5), None, None, "needs 6 values"),
        ((-1, 0, 0, 0, 0, 0), None, None, "outside"),
        ((10**8, 0, 0, 0, 0, 0), None, None, "outside"),
        ((1, 0, 0, 0, 0, 0), (0,) * 6, None, "needs 7 values"),
        ((1, 0, 0, 0, 0, 0), (0, 0.05, 0, 0, 0, 0, 0), None, "must be an int"),
        ((1, 0, 0, 0, 0, 0), None, (PartialTime(13, 1, 0), UNSET, UNSET, UNSET), "month = 13"),
        ((1, 0, 0, 0, 0, 0), None, (PartialTime(1, 1, 0, 30), UNSET, UNSET, UNSET), "on the hour"),
        ((1, 0, 0, 0, 0, 0), None, ("0101", UNSET, UNSET, UNSET), "PartialTime"),
    ],
)
def test_step_table_validation(thresholds, increments, dates, message: str) -> None:
    kwargs = {}
    if increments is not None:
        kwargs["increments"] = increments
    if dates is not None:
        kwargs["dates"] = dates
    with pytest.raises(TariffError, match=message):
        steps(thresholds, **kwargs)


# --- prices and cost ------------------------------------------------------------------------


def test_cost_of_identity() -> None:
    # 0.01 kWh at p·1e-4 yuan/kWh costs p·1e-6 yuan: 1 kWh at 0.5000 yuan/kWh is 0.5 yuan.
    assert cost_of(1, 5000) == 5000
    assert cost_of(100, 5000) == 500_000
    with pytest.raises(TariffError):
        cost_of(-1, 5000)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([Decimal("0.5")] * 3, "4..12 prices"),
        ([Decimal("0.5")] * 13, "4..12 prices"),
        ([Decimal("0.12345")] * 4, "at most 4 decimals"),
        ([0.5] * 4, "not float"),
        (["x"] * 4, "not a number"),
        ([Decimal("-0.1")] * 4, "outside"),
        ([Decimal("10000")] * 4, "outside"),
        ("0.5", "list of prices"),
    ],
)
def test_price_validation(values, message: str) -> None:
    state = TariffState()
    with pytest.raises(TariffError, match=message):
        state.write_backup_prices(values)
    assert state.backup_prices is DEFAULT_PRICES  # a refused write changes nothing


def test_integrating_across_a_step_threshold() -> None:
    """The meter's loop: price chunks up to the next threshold; the 288,001st hundredth is step 2."""
    state = TariffState(tou=FLAT_TOU)
    now = at(2024, 3, 1, 12, 0)
    remaining, cost = 288_001, 0
    while remaining:
        room = state.hundredths_to_next_step()
        chunk = remaining if room is None else min(remaining, room)
        cost += cost_of(chunk, state.price_at(now))
        state.add_step_energy(chunk)
        remaining -= chunk
    assert cost == 288_000 * 5000 + 5500
    assert state.step_energy == 288_001


# --- two sets, switches, settlement ------------------------------------------------------------


def test_backup_price_set_switches_at_04000108_time() -> None:
    state = TariffState()
    state.write_backup_prices([Decimal("0.6"), Decimal("0.55"), Decimal("0.45"), Decimal("0.3")])
    switch = at(2024, 5, 1, 0, 0)
    state.set_price_switch(switch)
    assert state.read_price_switch() == switch
    assert state.pending_switches == {"prices": switch}
    assert state.next_boundary(at(2024, 4, 30, 23, 30)) == switch

    assert state.apply_switches(at(2024, 4, 30, 23, 59, 59)) == []
    assert state.price_at(at(2024, 4, 30, 23, 59, 59)) == 5000
    assert state.apply_switches(switch) == ["prices"]
    assert state.read_current_prices() == [Decimal("0.6"), Decimal("0.55"), Decimal("0.45"), Decimal("0.3")]
    assert state.price_at(at(2024, 5, 1, 0, 0)) == 3000  # valley T4
    assert state.price_at(at(2024, 5, 1, 9, 0)) == 5500  # peak T2
    assert state.apply_switches(at(2024, 5, 2)) == []  # once only
    assert state.pending_switches == {}
    assert state.read_price_switch() == switch  # the programmed time still reads back


def test_step_and_tou_switches() -> None:
    state = TariffState()
    state.write_backup_steps(steps((100, 0, 0, 0, 0, 0), (0, 2000, 0, 0, 0, 0, 0)).to_di())
    state.write_backup_tou(FLAT_TOU)
    state.set_step_switch(at(2024, 6, 1, 0, 0))
    state.set_tou_switch(at(2024, 6, 1, 0, 0))
    state.add_step_energy(150)
    assert state.price_at(at(2024, 5, 31, 9, 0)) == 5000
    assert state.apply_switches(at(2024, 6, 1, 0, 0)) == ["tou", "steps"]
    assert state.tou is FLAT_TOU
    assert state.price_at(at(2024, 6, 1, 9, 0)) == 7000  # step energy carried over: step 2
    assert state.step_energy == 150


def test_cancelled_switch_does_not_apply() -> None:
    state = TariffState()
    state.write_backup_prices(["1"] * 4)
    state.set_price_switch(at(2024, 6, 1, 0, 0))
    state.set_price_switch(None)
    assert state.apply_switches(at(2025, 1, 1)) == []
    assert state.read_price_switch() is None


def test_switch_time_must_fit_yymmddhhmm() -> None:
    state = TariffState()
    with pytest.raises(TariffError, match="whole minute"):
        state.set_price_switch(at(2024, 6, 1, 0, 0, 30))
    with pytest.raises(TariffError, match=r"2000\.\.2099"):
        state.set_step_switch(at(2100, 1, 1, 0, 0))
    with pytest.raises(TariffError, match="naive"):
        state.set_step_switch(datetime(2024, 1, 1))
    state.set_step_switch(datetime(2024, 5, 31, 16, 0, tzinfo=UTC))
    assert state.read_step_switch() == at(2024, 6, 1, 0, 0)


def test_settlement_resets_step_energy_on_1_january() -> None:
    state = TariffState(step_energy=300_000, settlement_checked_at=at(2024, 12, 31, 12, 0))
    assert state.price_at(at(2024, 12, 31, 23, 30)) == 5000 + 500
    assert state.next_boundary(at(2024, 12, 31, 23, 30)) == at(2025, 1, 1, 0, 0)
    assert state.settle_if_due(at(2024, 12, 31, 23, 59, 59)) is False
    assert state.step_energy == 300_000
    assert state.settle_if_due(at(2025, 1, 1, 0, 0)) is True
    assert state.step_energy == 0
    assert state.price_at(at(2025, 1, 1, 0, 0)) == 5000
    state.add_step_energy(10)
    assert state.settle_if_due(at(2025, 1, 1, 0, 0)) is False  # once per instant
    assert state.settle_if_due(at(2025, 6, 1)) is False
    assert state.step_energy == 10


def test_settlement_missed_while_off_is_caught_up() -> None:
    state = TariffState(step_energy=5, settlement_checked_at=at(2024, 12, 1))
    assert state.settle_if_due(at(2025, 3, 1)) is True
    assert state.step_energy == 0


def test_first_settlement_check_without_a_start() -> None:
    state = TariffState(step_energy=5)
    assert state.settle_if_due(at(2024, 6, 1)) is False
    assert state.step_energy == 5
    state = TariffState(step_energy=5)
    assert state.settle_if_due(at(2025, 1, 1, 0, 0)) is True
    # a clock set back does not settle, and the window restarts from the earlier time
    assert state.settle_if_due(at(2024, 12, 31, 23, 0)) is False
    state.add_step_energy(7)
    assert state.settle_if_due(at(2025, 1, 1, 0, 0)) is True


def test_stepping_through_boundaries_settles_once_a_year() -> None:
    state = TariffState(step_energy=1, settlement_checked_at=at(2024, 12, 25))
    now, settled, boundaries = at(2024, 12, 25), 0, 0
    while now < at(2025, 1, 5):
        state.apply_switches(now)
        settled += state.settle_if_due(now)
        nxt = state.next_boundary(now)
        assert now < nxt <= now + timedelta(hours=24)
        now, boundaries = nxt, boundaries + 1
    assert settled == 1
    # five switch points a day for 11 days, the 1 January 00:00 settlement, then 5 January 07:00
    assert boundaries == 11 * 5 + 1 + 1


def test_defaults_are_shared_and_copy_on_write() -> None:
    a, b = TariffState(), TariffState()
    assert a.prices is b.prices is a.backup_prices is DEFAULT_PRICES
    assert a.steps is b.steps is DEFAULT_STEPS
    assert a.tou is b.tou is DEFAULT_TOU
    a.write_backup_prices(["0.6"] * 4)
    assert b.backup_prices is DEFAULT_PRICES
    assert DEFAULT_PRICES.prices == (5000,) * 4


# --- DI values ---------------------------------------------------------------------------------


def test_step_table_di_round_trip() -> None:
    """Read 040605FF → encode → decode → write_backup_steps → the same table."""
    table = steps(
        (12_345, 67_890, 67_890, 0, 0, 0),
        (0, 1, 9999_9999, 2, 0, 0, 123),
        (PartialTime(99, 5, 8), None, PartialTime(12, 31, 23), UNSET),
    )
    source = TariffState()
    source.write_backup_steps(table.to_di())
    assert source.backup_steps == table
    value = source.read_backup_steps()
    target = TariffState()
    target.write_backup_steps(di_round_trip(0x040605FF, value))
    assert target.backup_steps == table
    assert target.backup_steps.settlement_mode == "monthly"
    # the defaults too, through the current-set DI
    assert StepTable.from_di(di_round_trip(0x040604FF, TariffState().read_current_steps())) == DEFAULT_STEPS


def test_default_steps_di_value() -> None:
    value = TariffState().read_di(0x040604FF)
    assert value["thresholds"] == [Decimal("2880.00"), Decimal("4800.00")] + [Decimal(0)] * 4
    assert value["prices"] == [Decimal(0), Decimal("0.05"), Decimal("0.3")] + [Decimal(0)] * 4
    assert value["settlement_dates"] == [PartialTime(1, 1, 0), UNSET, UNSET, UNSET]


def test_write_backup_steps_refuses_bad_records() -> None:
    state = TariffState()
    good = DEFAULT_STEPS.to_di()
    with pytest.raises(TariffError, match="must not decrease"):
        state.write_backup_steps({**good, "thresholds": [Decimal(5), Decimal(4), 0, 0, 0, 0]})
    with pytest.raises(TariffError, match="at most 2 decimals"):
        state.write_backup_steps({**good, "thresholds": [Decimal("0.001"), 0, 0, 0, 0, 0]})
    with pytest.raises(TariffError, match="lacks settlement_dates"):
        state.write_backup_steps({"thresholds": good["thresholds"], "prices": good["prices"]})
    assert state.backup_steps is DEFAULT_STEPS


def test_price_and_switch_di_round_trips() -> None:
    state = TariffState()
    state.write_di(0x040502FF, di_round_trip(0x040502FF, [Decimal("0.8123"), "0.6", 1, Decimal("0.2")]))
    assert state.backup_prices == PriceSet((8123, 6000, 10000, 2000))
    assert di_round_trip(0x040502FF, state.read_di(0x040502FF)) == state.read_backup_prices()
    assert di_round_trip(0x040501FF, state.read_di(0x040501FF)) == [Decimal("0.5")] * 4
    assert state.read_di(0x04050201) == Decimal("0.8123")
    assert di_round_trip(0x04050104, state.read_di(0x04050104)) == Decimal("0.5")
    assert state.read_di(0x04050105) is None  # the set prices T1..T4 only
    assert not state.serves(0x04050105)
    assert state.serves(0x04000106) and state.read_di(0x04000106) is None

    assert di_round_trip(0x04000108, state.read_di(0x04000108)) is None  # unset reads as all zero
    switch = at(2024, 7, 1, 0, 0)
    state.write_di(0x04000108, di_round_trip(0x04000108, switch))
    state.write_di(0x04000109, di_round_trip(0x04000109, at(2024, 8, 1, 12, 30)))
    assert di_round_trip(0x04000108, state.read_di(0x04000108)) == switch
    assert di_round_trip(0x04000109, state.read_di(0x04000109)) == at(2024, 8, 1, 12, 30)
    with pytest.raises(UnknownTariffItem, match="not a writable") as refused:
        state.write_di(0x040501FF, [Decimal(1)] * 4)
    assert isinstance(refused.value, KeyError) and isinstance(refused.value, TariffError)
    assert state.read_di(0x00900200) is None  # not a tariff item: the meter looks elsewhere
    assert not state.serves(0x00900200)


# --- properties ------------------------------------------------------------------------------


@st.composite
def day_tables(draw: st.DrawFn) -> list[tuple[int, int, int]]:
    slots = draw(st.lists(st.integers(0, 95), min_size=1, max_size=14, unique=True))
    shift = draw(st.integers(0, 14))  # off the quarter-hour grid, gaps stay >= 15 min
    return [((15 * s + shift) // 60, (15 * s + shift) % 60, draw(st.integers(1, 4))) for s in slots]


@st.composite
def schedules(draw: st.DrawFn) -> TouSchedule:
    tables = draw(st.lists(day_tables(), min_size=1, max_size=8))
    starts = draw(st.lists(st.dates(date(2000, 1, 1), date(2000, 12, 31)), min_size=1, max_size=14, unique=True))
    zones = [(d.month, d.day, draw(st.integers(1, len(tables)))) for d in starts]
    return TouSchedule(zones=zones, day_tables=tables)


ZONES = st.sampled_from([METER_TZ, UTC, timezone(timedelta(hours=-5))])
TIMES = st.datetimes(datetime(2000, 1, 2), datetime(2098, 12, 30), timezones=ZONES)


@FAST
@given(schedule=st.one_of(st.just(DEFAULT_TOU), schedules()), now=TIMES)
def test_tariff_is_constant_until_next_change(schedule: TouSchedule, now: datetime) -> None:
    change = schedule.next_change(now)
    assert now < change <= now + timedelta(hours=24)
    assert change.tzinfo is METER_TZ
    span = change - now
    tariff = schedule.tariff_at(now)
    for i in range(40):
        assert schedule.tariff_at(now + span * i // 40) == tariff
    assert schedule.tariff_at(change - timedelta(microseconds=1)) == tariff


@FAST
@given(schedule=schedules(), now=TIMES)
def test_next_change_of_a_changing_tariff_is_where_it_changes(schedule: TouSchedule, now: datetime) -> None:
    # walking next_change for two days visits every instant where the tariff differs
    end = now + timedelta(days=2)
    t = now
    while t < end:
        nxt = schedule.next_change(t)
        minute = t.astimezone(METER_TZ).replace(second=0, microsecond=0) + timedelta(minutes=1)
        while minute < min(nxt, end):  # minute by minute would be slow: sample each quarter hour
            assert schedule.tariff_at(minute) == schedule.tariff_at(t)
            minute += timedelta(minutes=15)
        t = nxt


@st.composite
def step_tables(draw: st.DrawFn) -> StepTable:
    used = sorted(draw(st.lists(st.integers(1, 10**6), max_size=6)))
    thresholds = used + [0] * (6 - len(used))
    increments = sorted(draw(st.lists(st.integers(0, 10**5), min_size=7, max_size=7)))
    return steps(thresholds, increments)


@FAST
@given(table=step_tables(), energies=st.lists(st.integers(0, 2 * 10**6), min_size=2, max_size=20))
def test_increment_is_non_decreasing_and_constant_below_next_threshold(table: StepTable, energies) -> None:
    energies.sort()
    values = [table.increment(e) for e in energies]
    assert values == sorted(values)
    for e in energies:
        nxt = table.next_threshold(e)
        if nxt is None:
            assert table.increment(e) == table.increment(e + 10**7)
        else:
            assert nxt > e
            assert table.increment(nxt - 1) == table.increment(e)
            assert table.increment(nxt) >= table.increment(e)


@FAST
@given(
    switches=st.fixed_dictionaries(
        {kind: st.none() | st.integers(0, 1000) for kind in ("tou", "prices", "steps")},
    ),
    checks=st.lists(st.integers(0, 1200), max_size=30),
)
def test_switches_apply_exactly_once(switches, checks) -> None:
    base = at(2024, 1, 1)
    state = TariffState()
    state.write_backup_prices(["0.7"] * 4)
    state.write_backup_tou(FLAT_TOU)
    state.write_backup_steps(steps((1, 0, 0, 0, 0, 0)).to_di())
    setters = {"tou": state.set_tou_switch, "prices": state.set_price_switch, "steps": state.set_step_switch}
    for kind, minutes in switches.items():
        setters[kind](None if minutes is None else base + timedelta(minutes=minutes))
    seen: list[str] = []
    last = max(checks, default=0)
    for minutes in sorted(checks):
        now = base + timedelta(minutes=minutes)
        done = state.apply_switches(now)
        for kind in done:
            assert switches[kind] is not None and switches[kind] <= minutes
        seen += done
    assert sorted(seen) == sorted(k for k, m in switches.items() if m is not None and m <= last and checks)
    if checks:
        assert state.apply_switches(base + timedelta(minutes=last)) == []
    assert (state.prices.prices[0] == 7000) == ("prices" in seen)


@FAST
@given(table=step_tables(), start=TIMES)
def test_next_settlement_is_strictly_after_and_within_a_year(table: StepTable, start: datetime) -> None:
    nxt = table.next_settlement(start)
    assert nxt is not None
    assert start < nxt <= start + timedelta(days=366)
    assert (nxt.month, nxt.day, nxt.hour, nxt.minute) == (1, 1, 0, 0)
