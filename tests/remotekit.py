"""Helpers of the remote cost-control tests: the virtual calendar and a customer in arrears."""

from __future__ import annotations

from datetime import datetime, time, timedelta

from gateway.billing import RemoteBilling
from gateway.service import CommandService
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock

START = datetime(2026, 11, 24, 12, 0, tzinfo=METER_TZ)  # Tuesday noon
REMOTE = "000000000001"


def at(clock: VirtualClock, day_offset: int, hour: int, minute: int = 0) -> None:
    """Move the virtual clock to START's date + day_offset at hour:minute (meter time)."""
    target = datetime.combine(START.date() + timedelta(days=day_offset), time(hour, minute), tzinfo=METER_TZ)
    assert target >= clock.now()
    clock.advance(target - clock.now())


async def into_arrears(service: CommandService, clock: VirtualClock, hour: int, minute: int = 0) -> RemoteBilling:
    """5.00 paid, then billing at hour:minute on days 1 and 2 (2 kW): below zero from day 2."""
    await service.submit("t", "topup", REMOTE, {"amount": "5.00"}, "counter")
    await service.drain()
    billing = RemoteBilling(service)
    at(clock, 1, hour, minute)
    await billing.run(clock.now())
    at(clock, 2, hour, minute)
    await billing.run(clock.now())
    return billing
