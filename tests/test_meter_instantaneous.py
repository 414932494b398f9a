"""Instantaneous values and reactive energy consistent with the load (dlt645.md §3.2, §3.3).

A meter reads its customer's load: active power P (signed: export is negative), voltage V
(nominal 220.0 V, a seeded +-2 V wander that changes each minute, a small drop with load),
current I = P / (V PF) (signed), power factor PF (the configured cos phi under load, 1.000 at no
load), apparent power S = |P| / PF, reactive power Q = sqrt(S^2 - P^2) (signed like P) and grid
frequency near 50 Hz. The combined reactive register 00030000 grows with the forward energy at
tan(acos PF), so it too follows the load. Everything is read over the wire.
"""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal

import pytest
from meterkit import Bench

from protocols.dlt645.profile import DLT645_1997
from protocols.dlt645.relay import RelayCommand as N1

V, AMPS, P, Q, S, PF, HZ = 0x02010100, 0x02020100, 0x02030000, 0x02040000, 0x02050000, 0x02060000, 0x02800002


def values(b: Bench) -> dict[str, Decimal]:
    dis = {"V": V, "I": AMPS, "P": P, "Q": Q, "S": S, "PF": PF, "Hz": HZ}
    return {name: b.read(di) for name, di in dis.items()}


@pytest.mark.parametrize("watts", [150, 1000, 2000, 4999, 7300])
def test_voltage_current_power_and_power_factor_agree_with_the_load(watts: int) -> None:
    b = Bench(watts=watts)
    b.wait(minutes=3)
    v = values(b)
    assert v["P"] == Decimal(watts).scaleb(-3)  # kW, 4 decimals: exact
    assert v["PF"] == Decimal("0.950")
    assert Decimal("217.5") <= v["V"] <= Decimal("222.0")  # 220 V +- 2 V, minus the drop under load
    # P = V I PF, to the register resolution of I (1 mA).
    assert abs(v["V"] * v["I"] * v["PF"] - v["P"] * 1000) <= v["V"] * Decimal("0.001")
    assert v["S"] == Decimal(watts * 10_000 // 950).scaleb(-4)  # |P| / PF
    assert abs(float(v["Q"]) - watts / 1000 * math.tan(math.acos(0.95))) <= 0.0002  # P tan(phi)
    assert abs(v["S"] ** 2 - v["P"] ** 2 - v["Q"] ** 2) <= Decimal("0.0003") * v["S"]
    assert Decimal("49.97") <= v["Hz"] <= Decimal("50.03")
    assert b.read(0x0201FF00) == [v["V"], Decimal("0.0"), Decimal("0.0")]
    assert b.read(0x0203FF00) == [v["P"], v["P"], Decimal("0"), Decimal("0")]


def test_export_reads_negative_power_current_and_reactive_power() -> None:
    b = Bench(watts=-1500)
    v = values(b)
    assert v["P"] == Decimal("-1.5000") and v["I"] < 0 and v["Q"] < 0
    assert v["S"] == Decimal("1.5789") and v["PF"] == Decimal("0.950")
    assert b.read(0x04000501)["active_reverse"]
    b.wait(hours=2)
    assert b.read(0x00020000) == Decimal("3.00") and b.read(0x00010000) == Decimal("0.00")


def test_no_load_and_an_open_relay_draw_nothing() -> None:
    idle = Bench(watts=0)
    v = values(idle)
    assert (v["P"], v["I"], v["Q"], v["S"], v["PF"]) == (0, 0, 0, 0, Decimal("1.000"))
    b = Bench(watts=3000)
    b.control(N1.TRIP)
    v = values(b)
    assert (v["P"], v["I"], v["PF"]) == (0, 0, Decimal("1.000"))
    assert Decimal("218.0") <= v["V"] <= Decimal("222.0")  # the supply is still there
    assert not b.read(0x04000501)["active_reverse"]


def test_the_voltage_wanders_each_minute_seeded() -> None:
    a, same, other = Bench(watts=500, seed=11), Bench(watts=500, seed=11), Bench(watts=500, seed=12)
    readings: list[tuple[Decimal, Decimal, Decimal]] = []
    for _ in range(30):
        for b in (a, same, other):
            b.wait(minutes=1)
        readings.append((a.read(V), same.read(V), other.read(V)))
    assert all(x == y for x, y, _ in readings)  # deterministic under the seed
    assert any(x != z for x, _, z in readings)
    assert len({x for x, _, _ in readings}) > 5  # it moves
    assert all(abs(x - Decimal("220.0")) <= Decimal("2.1") for x, _, _ in readings)
    a.wait(seconds=20)
    assert a.read(V) == readings[-1][0]  # constant within the minute


@pytest.mark.parametrize(("power_factor", "kvarh"), [(950, "3.30"), (900, "4.80"), (1000, "0.00")])
def test_reactive_energy_follows_forward_energy_at_tan_phi(power_factor: int, kvarh: str) -> None:
    b = Bench(watts=2000, power_factor=power_factor)
    b.wait(hours=5)  # 10.00 kWh
    assert b.read(0x00010000) == Decimal("10.00")
    assert b.read(0x00030000) == Decimal(kvarh)
    # ... which is the reactive power integrated over the time, to the whole-percent ratio.
    q_kvar = float(b.read(Q))
    assert abs(float(Decimal(kvarh)) - q_kvar * 5) <= 0.005 * 10 + 0.01
    assert b.read(PF) == Decimal(power_factor).scaleb(-3)


def test_reactive_energy_does_not_depend_on_how_often_it_is_read() -> None:
    once, often = Bench(watts=1234), Bench(watts=1234)
    once.wait(hours=7, minutes=13)
    for _ in range(433):
        often.wait(minutes=1)
    assert once.read(0x00010000) == often.read(0x00010000) == Decimal("8.90")
    assert once.read(0x00030000) == often.read(0x00030000) == Decimal("2.93")  # 8.90 kWh x 0.33


def test_a_1997_meter_reads_its_voltage_in_whole_volts() -> None:
    b = Bench(watts=1000, profile=DLT645_1997)
    assert isinstance(b.meter.voltage_dv(), int)
    assert b.meter.voltage_dv() // 10 in range(217, 223)


def test_power_follows_the_profile_slot_by_slot() -> None:
    from simulator.load_profiles import make_load

    load = make_load("residential", 4, 9)
    b = Bench()
    b.meter.load = load
    for minutes in (0, 15, 60, 600, 1200):
        b.at(b.now + timedelta(minutes=minutes))
        watts, _ = load.power_at(b.meter.now_ms)
        assert b.read(P) == Decimal(watts).scaleb(-3)
