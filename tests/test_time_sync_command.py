"""Time-sync commands: read the meter's clock, set it (level 98) when it is off, verify by reading back."""

from __future__ import annotations

from datetime import datetime

import pytest
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.service import CommandService, MeterEntry
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

START = datetime(2026, 11, 24, 10, 0, tzinfo=METER_TZ)
A, B = "000000000001", "000000000002"


@pytest.fixture
async def rig(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(A), MeterSpec(B)])], clock, seed=3)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    meters = {a: MeterEntry(a, "bus0") for a in (A, B)}
    service = await CommandService(store, meters, {"bus0": link}, now=clock.now).start()
    yield clock, fleet, store, service
    await service.stop()
    await link.stop()
    await store.close()


def offset_s(fleet: Fleet, address: str, clock: VirtualClock) -> float:
    meter = fleet.meter(address).meter
    meter.advance(clock.now())
    return (meter.local_time() - clock.now()).total_seconds()


@pytest.mark.parametrize("off_s", [-3 * 3600, -120, 20, 26 * 3600])
async def test_a_clock_that_is_off_is_set_on_that_meter_alone(rig, off_s):
    clock, fleet, store, service = rig
    meter = fleet.meter(A).meter
    meter.advance(clock.now())
    meter.clock.jump(off_s, meter.now_ms)
    other = offset_s(fleet, B, clock)
    assert abs(offset_s(fleet, A, clock) - off_s) < 2
    cmd, _ = await service.submit(f"sync{off_s}", "time_sync", A, {}, "ops")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED, await store.events(command_id=cmd.id)
    assert final.result["method"] == "set (level 98)"
    assert abs(final.result["clock_error_before_s"] - off_s) < 2
    assert abs(offset_s(fleet, A, clock)) <= 2
    assert offset_s(fleet, B, clock) == other  # not a broadcast: the other meter is untouched


async def test_a_clock_within_10_s_is_left_alone(rig):
    _clock, _fleet, store, service = rig
    cmd, _ = await service.submit("fine", "time_sync", A, {}, "ops")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED and final.result["method"] == "none needed"
    frames = [bytes.fromhex(f).lstrip(b"\xfe") for e in await store.events(command_id=cmd.id) for f in e.frames]
    assert [f[8] for f in frames] == [0x11, 0x91, 0x11, 0x91] * 2  # the clock read, and read back: no write
