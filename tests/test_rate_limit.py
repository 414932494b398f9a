"""Batches are rate-limited: the service starts at most rate_per_s commands a second."""

from __future__ import annotations

import itertools
import time
from datetime import datetime

from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.service import CommandService, MeterEntry, ServiceConfig
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.scenario import from_flags

START = datetime(2026, 11, 24, 10, 0, tzinfo=METER_TZ)


async def run_batch(tmp_path, rate: float, n: int = 12) -> tuple[float, list[float]]:
    scenario = from_flags(n, 1, timing=False, start=START)
    clock = VirtualClock(scenario.start, 0)
    from simulator.fleet import Fleet

    fleet = Fleet(scenario.buses, clock, scenario.seed)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05, gap_s=0)).start()
    store = await Store.sqlite(tmp_path / f"rate{rate}.sqlite").open()
    meters = {a: MeterEntry(a, "bus0") for a in fleet.meters}
    service = CommandService(store, meters, {"bus0": link}, now=clock.now, config=ServiceConfig(rate_per_s=rate))
    started: list[float] = []
    service.listeners.append(lambda cmd, info: started.append(time.monotonic()) if info["event"] == "sent" else None)
    for a in meters:
        await service.submit(f"batch:{a}", "params", a, {"alarm_1": "30.00"}, "ops", batch="b1")
    t0 = time.monotonic()
    await service.start()
    await service.drain(30)
    elapsed = time.monotonic() - t0
    assert all(c.state is State.CONFIRMED for c in await store.commands(batch="b1"))
    await service.stop()
    await link.stop()
    await store.close()
    return elapsed, [s - t0 for s in started]


async def test_rate_limit_spreads_a_batch_over_time(tmp_path):
    elapsed, started = await run_batch(tmp_path, rate=5)
    assert len(started) == 12
    # 12 commands at 5 a second: 5 start at once, 5 a second later, 2 a second after that.
    assert elapsed >= 1.9
    for t in started:
        assert sum(1 for u in started if t <= u < t + 0.95) <= 5


async def test_no_rate_limit_runs_at_line_speed(tmp_path):
    elapsed, started = await run_batch(tmp_path, rate=0)
    assert len(started) == 12 and elapsed < 1.9


async def test_a_rate_below_one_a_second_still_runs(tmp_path):
    # 0.5/s: one start in any 2 s (int(0.5) once made it 0: nothing ever started).
    elapsed, started = await run_batch(tmp_path, rate=0.5, n=3)
    assert len(started) == 3 and elapsed >= 3.9
    assert all(b - a >= 1.9 for a, b in itertools.pairwise(started))
