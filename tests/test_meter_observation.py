"""The simulator's ground truth must not depend on how often a meter is observed.

A meter advanced to a time in one jump and the same meter advanced there in many small, random
steps (as a gateway's polling does) must hold the same registers, money, freezes and relay
state: energy, tariff periods, price switches, step settlement, wallet thresholds and clock
drift included, and a local trip held by large-current protection until the load's current falls
(prepaid.md §1.5). (PV power once depended on the instant a step started, and the reactive
register on the step size.)
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_stubs.meter import Meter, MeterConfig, to_ms
from firmware_stubs.tariff import DEFAULT_TOU, PriceSet, StepTable, TariffState
from firmware_stubs.wallet import Limits
from protocols.dlt645.formats import METER_TZ, PartialTime
from simulator.load_profiles import make_load

START = datetime(2026, 1, 30, 22, 37, 11, tzinfo=METER_TZ)
DAYS = 12


def build(
    kind: str, watts: int | None, seed: int, drift: float, offset: float, balance: int, large_ma: int = 0
) -> Meter:
    steps = StepTable(
        thresholds=(1500, 3000, 0, 0, 0, 0),
        increments=(0, 700, 3100, 0, 0, 0, 0),
        settlement_dates=(PartialTime(None, 2, 3), None, None, None),
    )
    tariff = TariffState(PriceSet((9000, 7000, 5000, 3000)), steps, DEFAULT_TOU, settlement_checked_at=START)
    tariff.backup_prices = PriceSet((9100, 7100, 5100, 3100))
    tariff.set_price_switch(datetime(2026, 2, 2, 13, 17, tzinfo=METER_TZ))
    config = MeterConfig(
        address="000000000001",
        balance_fen=balance,
        # With large-current protection: no alarms, so the overdraft trip comes with the contact
        # closed and is held until the load's current falls below 2 A (about 420 W).
        limits=Limits(0, 0, 0, 0, 0) if large_ma else Limits(2000, 1000, 500, 0, 0),
        drift_ppm=drift,
        clock_offset_s=offset,
        seed=seed,
        large_current_ma=large_ma,
        large_current_delay_min=45,
    )
    return Meter(config, make_load(kind, seed, 3, None, watts), START, tariff=tariff)


def fingerprint(m: Meter) -> tuple:
    return (
        list(m.forward),
        list(m.reverse),
        m.reactive,
        m.wallet.balance,
        m.tariff.step_energy,
        m.relay.state,
        m.trip_count,
        m.close_count,
        list(m.hourly),
        list(m.daily),
        list(m.settlements),
        list(m.trips),
        list(m.closes),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["residential", "commercial", "pv", "constant"]),
    watts=st.sampled_from([None, None, 0, 1500, 3333]),
    seed=st.integers(0, 10_000),
    drift=st.sampled_from([0.0, 50.0, -37.5]),
    offset=st.sampled_from([0.0, 12.345, -400.0]),
    balance=st.sampled_from([300, 5000, 20000]),
    large_ma=st.sampled_from([0, 0, 2000]),
    step_seed=st.integers(0, 2**32),
)
def test_one_jump_equals_many_small_steps(kind, watts, seed, drift, offset, balance, large_ma, step_seed):
    if kind == "constant" and watts is None:
        watts = 2000
    jumped = build(kind, watts, seed, drift, offset, balance, large_ma)
    stepped = build(kind, watts, seed, drift, offset, balance, large_ma)
    end = to_ms(START + timedelta(days=DAYS))
    jumped.advance(end)
    rng = random.Random(step_seed)
    t = to_ms(START)
    while t < end:  # steps from a millisecond to a day, as a gateway's polls come
        t = min(end, t + rng.choice([1, 999, 60_000, 3_600_000, 7_777_777, 86_400_000]))
        stepped.advance(t)
    assert fingerprint(jumped) == fingerprint(stepped)
