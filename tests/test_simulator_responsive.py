"""The buses keep answering while summaries catch meters up (a summary once held the event loop).

``GET /summary`` after ``POST /time/advance`` and the live summary line of ``meterlink sim``
catch meters up on the event loop that also serves the buses. They yield to the loop by work
done (elapsed time), not by meter count: a 100-meter fleet 30 days behind used to catch up in
one go (the old summary yielded every 500 meters) while a concurrent read got no reply. The
tests replace the summary's timer by a counter, so when it yields is deterministic; nothing
here is timed.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from datetime import datetime, timedelta
from typing import Any

from protocols.dlt645 import METER_TZ, Deframer, Frame
from simulator import cli
from simulator.clock import VirtualClock
from simulator.fleet import CATCH_UP_SLICE_MS, Fleet
from simulator.scenario import build

START = datetime(2026, 3, 10, 9, 0, tzinfo=METER_TZ)
ENERGY = 0x00010000


def fleet_of(meters: int) -> Fleet:
    s = build(
        {
            "fleet": {"seed": 5, "start": START.isoformat(), "speed": 0},
            "defaults": {"load": "residential", "balance": "500.00"},
            "bus": [{"name": "line-1", "meters": meters, "timing": False}],
        }
    )
    return Fleet(s.buses, VirtualClock(s.start, s.speed), s.seed)


def slow_timer(step_s: float = 0.010) -> Any:
    """A timer by which every check of the summary looks like ``step_s`` of work."""
    counter = itertools.count()
    return lambda: next(counter) * step_s


def replies(chunks: list[Any]) -> list[Frame]:
    d = Deframer()
    return [f for c in chunks for f in d.feed(c.data)] + d.flush()


async def test_a_read_is_answered_while_a_summary_catches_up_a_month() -> None:
    fleet = fleet_of(100)
    fleet.advance(timedelta(days=30))
    bus = fleet.buses["line-1"]
    order: list[str] = []

    async def summary() -> None:
        await fleet.summary_async(timer=slow_timer())
        order.append("summary")

    async def read() -> None:
        got = replies(await bus.transact(Frame("000000000100", 0x11, ENERGY.to_bytes(4, "little"))))
        assert len(got) == 1 and got[0].function == 0x11
        order.append("read")

    await asyncio.gather(summary(), read())  # the summary starts first
    assert order == ["read", "summary"]
    now = fleet.now()
    assert all(sim.meter.now_ms == int(now.timestamp() * 1000) for sim in fleet.meters.values())


async def test_one_meter_a_year_behind_is_caught_up_in_slices_and_ends_where_one_jump_ends() -> None:
    fleet, twin = fleet_of(1), fleet_of(1)
    for f in (fleet, twin):
        f.advance(timedelta(days=365))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        await fleet.summary_async(timer=slow_timer())
    finally:
        task.cancel()
    assert ticks >= 365 * 86_400_000 // CATCH_UP_SLICE_MS  # the loop ran between the slices
    twin.summary()  # one jump, no yields
    a, b = fleet.meter("000000000001").meter, twin.meter("000000000001").meter
    assert (a.forward, a.reverse, a.wallet.balance, list(a.daily), list(a.hourly)) == (
        b.forward,
        b.reverse,
        b.wallet.balance,
        list(b.daily),
        list(b.hourly),
    )


async def test_a_summary_that_takes_no_time_does_not_yield() -> None:
    fleet = fleet_of(20)
    fleet.advance(timedelta(days=3))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        await fleet.summary_async(timer=lambda: 0.0)  # by this timer the work is instant
    finally:
        task.cancel()
    assert ticks == 1  # yields by elapsed time, not by meter count


async def test_the_live_summary_line_runs_on_the_loop_and_catches_up_round_robin(monkeypatch: Any) -> None:
    assert inspect.iscoroutinefunction(cli._summary_line)
    fleet = fleet_of(5)
    fleet.advance(timedelta(days=1))
    monkeypatch.setattr(cli, "LIVE_CATCH_UP", 2)
    line = await cli._summary_line(fleet)
    assert "relays: closed 5" in line
    behind = [a for a, sim in fleet.meters.items() if sim.meter.now_ms < int(fleet.now().timestamp() * 1000)]
    assert behind == ["000000000003", "000000000004", "000000000005"]
    await cli._summary_line(fleet)
    behind = [a for a, sim in fleet.meters.items() if sim.meter.now_ms < int(fleet.now().timestamp() * 1000)]
    assert behind == ["000000000005"]
