"""Energy-type (电量型) wallets, prepaid.md §1.8 and dlt645.md §3.4, §3.5, §3.7.

An energy-type prepaid meter holds remaining **kWh** (00900100, overdraft 00900101), loses
0.01 kWh per 0.01 kWh counted whatever the price, keeps its purchases in the 0332xxnn family
(amounts in kWh), and its limits are the energy DIs 04000F01..04 (alarm 1, alarm 2, hoarding,
overdraft; "04000F0x are energy (kWh) limits and 040010xx are money (元) limits", §3.4). The money
DIs are not its data. The admin interface shows its wallet in kWh. The money paid is converted to
kWh by the master station at the day's price, so a later price change leaves the kWh and the
money account apart: the error class §1.8 asks the simulator to reproduce.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from meterkit import T0, Bench, flat_tariff

from firmware_stubs.tariff import DEFAULT_TOU, PriceSet, TariffState
from firmware_stubs.wallet import Limits, WalletUnit
from protocols.dlt645 import ErrorFlags, ErrorReply, WriteReply
from protocols.dlt645.relay import RelayCommand as N1
from protocols.dlt645.security import SecurityReply
from simulator.clock import VirtualClock
from simulator.fleet import Fleet
from simulator.scenario import build

MONEY_DIS = (0x00900200, 0x00900201, 0x04001001, 0x04001002, 0x04001003, 0x04001004, 0x04001005)
ENERGY_DIS = (0x00900100, 0x00900101, 0x04000F01, 0x04000F02, 0x04000F03, 0x04000F04)


def no_data(reply: Any) -> bool:
    return isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.NO_DATA


def energy_bench(**kw: Any) -> Bench:
    kw.setdefault("balance_fen", 10_000)  # 100.00 kWh
    kw.setdefault("limits", Limits(alarm_1=2_000, alarm_2=1_000, overdraft=500, hoarding=0, close_allowed=0))
    return Bench(wallet_unit=WalletUnit.ENERGY, **kw)


def test_an_energy_wallet_serves_the_energy_dis_and_not_the_money_ones() -> None:
    b = energy_bench()
    assert b.read(0x00900100) == Decimal("100.00") and b.read(0x00900101) == Decimal("0.00")
    assert [b.read(di) for di in (0x04000F01, 0x04000F02, 0x04000F03, 0x04000F04)] == [
        Decimal("20.00"),
        Decimal("10.00"),
        Decimal("0.00"),
        Decimal("5.00"),
    ]
    assert b.read(0x04000503)["meter_type"] == 1  # 01 energy-prepaid (status word 3 bits 9-8)
    for di in MONEY_DIS:
        assert no_data(b.read(di)), hex(di)
    money = Bench()
    for di in ENERGY_DIS:
        assert no_data(money.read(di)), hex(di)
    assert money.read(0x04000503)["meter_type"] == 2


def test_an_energy_wallet_loses_a_hundredth_of_a_kwh_per_hundredth_whatever_the_price() -> None:
    # Four TOU prices and a price switch: the kWh wallet does not see them.
    prices = PriceSet((12_000, 8000, 5000, 2000))
    tariff = TariffState(prices, flat_tariff().steps, DEFAULT_TOU, settlement_checked_at=T0)
    tariff.backup_prices = PriceSet((30_000,) * 4)
    tariff.set_price_switch(T0 + timedelta(hours=30))
    b = energy_bench(watts=1500, tariff=tariff)
    b.wait(days=2, hours=3)
    used = b.meter.forward[0]
    assert used == 1500 * (51 * 100) // 1000  # 1.5 kW x 51 h = 76.50 kWh
    assert b.read(0x00900100) == Decimal("100.00") - Decimal(used).scaleb(-2)
    assert b.meter.wallet.balance == (10_000 - used) * 10_000  # exact, in 1e-6 kWh


def test_energy_purchases_are_0332_records_in_kwh() -> None:
    b = energy_bench(watts=1000)
    b.wait(hours=2)  # 2.00 kWh used: 98.00 left
    assert isinstance(b.recharge(5_000, 2), SecurityReply)  # 50.00 kWh, count 2
    record = b.read(0x0332FF01)
    assert record["purchase_count"] == 2 and record["amount"] == Decimal("50.00")
    assert (record["balance_before"], record["balance_after"]) == (Decimal("98.00"), Decimal("148.00"))
    assert record["total_purchased"] == Decimal("150.00")  # the initial 100.00 kWh and these 50.00
    assert record["time"] == T0 + timedelta(hours=2)
    assert b.read(0x03320201) == 2 and b.read(0x03320501) == Decimal("148.00")
    for di in (0x0333FF01, 0x03330201, 0x03330601):
        assert no_data(b.read(di)), hex(di)
    money = Bench()
    assert no_data(money.read(0x03320201)) and money.read(0x03330201) == 1


def test_energy_limits_are_written_as_04000F0x_and_drive_the_ladder() -> None:
    b = energy_bench(watts=1000, balance_fen=500, limits=Limits(0, 0, 0, 0, 0))
    # Alarm 2 at 3.00 kWh (class 2: ciphertext, dlt645.md §5.5): pre-trip once 2.00 kWh are used.
    assert isinstance(b.write_cipher(0x04000F02, Decimal("3.00")), WriteReply)
    assert isinstance(b.write_cipher(0x04000F01, Decimal("4.00")), WriteReply)
    assert isinstance(b.write_cipher(0x04000F04, Decimal("1.00")), WriteReply)
    assert b.meter.wallet.limits == Limits(alarm_1=400, alarm_2=300, overdraft=100, hoarding=0, close_allowed=0)
    # The money DIs are not this meter's data, whatever the level.
    assert no_data(b.write_mac(0x04001001, Decimal("4.00")))
    assert no_data(b.write_cipher(0x04001003, Decimal("1.00")))
    b.at(T0 + timedelta(hours=1))
    assert b.relay == "closed" and b.meter.ladder().name == "ALARM_1"
    b.at(T0 + timedelta(hours=2))
    assert b.relay == "close_allowed"  # alarm 2: local pre-trip, exactly at 3.00 kWh left
    assert b.meter.trips[0].time_ms == int((T0 + timedelta(hours=2)).timestamp() * 1000)
    assert b.press()
    b.at(T0 + timedelta(hours=5))  # over zero (overdraft limit 1.00 kWh): pre-trip again
    assert b.relay == "close_allowed" and b.read(0x00900100) == Decimal("0.00")
    assert b.press()
    b.at(T0 + timedelta(hours=6))
    assert b.read(0x00900101) == Decimal("1.00") and b.relay == "open"  # overdraft: local trip
    assert b.read(0x04000501)["overdraft"]


def test_the_admin_shows_an_energy_wallet_in_kwh() -> None:
    s = build(
        {
            "fleet": {"seed": 1, "start": T0.isoformat(), "speed": 0},
            "defaults": {"load": "constant", "watts": 1000, "balance": "120.00", "wallet": "energy"},
            "bus": [{"name": "b", "meters": 2, "timing": False}],
            "meter": [{"address": "000000000002", "wallet": "money"}],
        }
    )
    fleet = Fleet(s.buses, VirtualClock(s.start, s.speed), s.seed)
    fleet.advance(timedelta(hours=10))
    energy, money = fleet.state("000000000001"), fleet.state("000000000002")
    assert energy["wallet"] == "energy"
    assert (energy["remaining_energy_kwh"], energy["overdraft_energy_kwh"]) == ("110.00", "0.00")
    assert energy["remaining_money"] is None and energy["overdraft"] is None
    assert money["wallet"] == "money" and money["remaining_money"] == "115.00"
    assert money["remaining_energy_kwh"] is None and money["overdraft_energy_kwh"] is None


def test_kwh_bought_at_the_old_price_outlive_the_money_account_after_a_rise() -> None:
    """prepaid.md §1.8: the money paid is converted to kWh at the day's price; after a price rise
    the meter still shows energy while the same money on a money meter (or in the account) is
    gone: "a customer can be in arrears while the meter still shows energy"."""
    rise = T0 + timedelta(days=1)

    def tariff() -> TariffState:
        t = flat_tariff(5000)
        t.backup_prices = PriceSet((10_000,) * 4)  # 0.50 -> 1.00 yuan/kWh
        t.set_price_switch(rise)
        return t

    paid = 6_000  # 60.00 yuan, converted at 0.50 yuan/kWh to 120.00 kWh on the energy meter
    energy = energy_bench(watts=2500, balance_fen=12_000, limits=Limits(0, 0, 0, 0, 0), tariff=tariff())
    money = Bench(watts=2500, balance_fen=paid, limits=Limits(0, 0, 0, 0, 0), tariff=tariff())
    later = rise + timedelta(hours=6)
    for b in (energy, money):
        b.at(later)
    # 60 kWh before the rise (30.00 yuan), 15 kWh after (15.00 yuan): the money meter has 15.00 left,
    # the energy meter 45.00 kWh (worth 45.00 yuan at the new price): three times the money.
    assert money.read(0x00900200) == Decimal("15.00")
    assert energy.read(0x00900100) == Decimal("45.00")
    money.at(later + timedelta(hours=6))
    energy.at(later + timedelta(hours=6))
    assert money.relay == "open" and money.read(0x00900201) == Decimal("0.00")  # money gone: tripped
    assert energy.relay == "closed" and energy.read(0x00900100) == Decimal("30.00")  # still energy


def test_a_remote_command_still_works_on_an_energy_meter() -> None:
    b = energy_bench(watts=500)
    b.control(N1.TRIP)
    assert b.relay == "open"
    b.control(N1.DIRECT_CLOSE)
    assert b.relay == "closed" and b.read(0x1D00FF01)["operator"] == b.read(0x1E00FF01)["operator"]
