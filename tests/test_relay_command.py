"""Relay commands through the service: each verified by status word 3 (dlt645.md §3.4)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import Policy
from gateway.service import CommandService, MeterEntry, _relay_confirmed
from protocols.dlt645 import METER_TZ, RelayExecution
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

START = datetime(2026, 11, 24, 10, 0, tzinfo=METER_TZ)  # a Tuesday morning: trips allowed
A = "000000000001"
BIT6 = 1 << 6


@pytest.fixture
async def rig(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(A)])], clock, seed=3)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    service = await CommandService(
        store, {A: MeterEntry(A, "bus0")}, {"bus0": link}, now=clock.now, policy=Policy()
    ).start()
    yield clock, fleet, store, service
    await service.stop()
    await link.stop()
    await store.close()


async def run(store, service, key, action):
    cmd, _ = await service.submit(key, "relay", A, {"action": action}, "ops")
    await service.drain()
    return await store.get(cmd.id)


async def test_close_allowed_is_confirmed_by_the_command_bit_not_by_the_contact(rig):
    _, fleet, store, service = rig
    trip = await run(store, service, "trip", "trip")
    assert trip.state is State.CONFIRMED and trip.result["status_word_3"] & BIT6
    allowed = await run(store, service, "allow", "close-allowed")
    assert allowed.state is State.CONFIRMED, await store.events(command_id=allowed.id)
    assert allowed.result["relay_open"] is True  # still open: the customer presses the button
    assert not allowed.result["status_word_3"] & BIT6  # but no trip is commanded any more
    assert fleet.state(A)["relay"] == "close_allowed"


async def test_close_allowed_that_did_not_take_is_not_confirmed(rig, monkeypatch):
    """If status word 3 still says "trip commanded", the command is not called a success."""
    from firmware_stubs.relay import Relay

    _, _, store, service = rig
    await run(store, service, "trip", "trip")
    original = Relay.command

    def ignore_close_allowed(self, n1, *args, **kwargs):
        return original(self, 0x1A if n1 == 0x1B else n1, *args, **kwargs)  # it trips again instead

    monkeypatch.setattr(Relay, "command", ignore_close_allowed)
    allowed = await run(store, service, "allow", "close-allowed")
    assert allowed.state is State.FAILED
    assert (await store.events(command_id=allowed.id))[-1].detail["reason"] == "a trip is still commanded"


async def test_a_trip_is_not_confirmed_by_an_alarm_that_was_already_on(rig, monkeypatch):
    """An alarm-on earlier leaves status word 3's pre-trip alarm bit set; a trip whose frame never
    reached the meter must not read as done because of it (it ends ``unknown``: the bit could also
    be a delayed trip of an earlier attempt, a person looks). Sent and answered, it is confirmed."""
    from gateway.link import Link as LinkClass

    clock, fleet, store, service = rig
    assert (await run(store, service, "alarm", "alarm-on")).state is State.CONFIRMED
    original = LinkClass.transact
    blocked = True

    async def lose_relay_frames(self, address, payload, *args, **kwargs):
        if blocked and getattr(payload, "FUNCTION", None) == 0x1C:
            from gateway.errors import NoReply

            raise NoReply(address, "function 0x1C", 3)
        return await original(self, address, payload, *args, **kwargs)

    monkeypatch.setattr(LinkClass, "transact", lose_relay_frames)
    until = clock.now() + timedelta(seconds=2)
    cmd, _ = await service.submit("trip-lost", "relay", A, {"action": "trip"}, "ops", valid_until=until)
    for _ in range(200):
        clock.advance(timedelta(seconds=1))
        await asyncio.sleep(0.01)
        got = await store.get(cmd.id)
        if got.state.final:
            break
    got = await store.get(cmd.id)
    assert fleet.state(A)["relay"] == "closed"
    assert got.state is State.UNKNOWN, await store.events(command_id=cmd.id)
    blocked = False
    assert (await run(store, service, "trip-ok", "trip")).state is State.CONFIRMED
    assert fleet.state(A)["relay"] == "open"


def test_relay_confirmed_reads_the_pre_trip_alarm_only_with_the_meters_reply():
    alarm = {"pre_trip_alarm": True, "relay_trip_commanded": False}
    assert _relay_confirmed("trip", alarm, None, replied=True)[0]  # short reply form, trip delay running
    assert not _relay_confirmed("trip", alarm, None, replied=False)[0]
    assert _relay_confirmed("trip", {}, RelayExecution.DELAYED_TRIP_LARGE_CURRENT)[0]
    assert not _relay_confirmed("trip", {"pre_trip_alarm": False}, RelayExecution.DIRECT_TRIP)[0]
    assert _relay_confirmed("trip", {"relay_trip_commanded": True}, None, replied=False)[0]


async def test_a_relay_refused_because_the_meters_clock_is_ahead_says_so(rig):
    """A meter whose clock is past the validity end refuses the frame; the 1-byte reply form
    reports "password". The refusal's reason names the real cause (dlt645.md §4.1)."""
    from simulator.faults import Fault, FaultSpec

    _, fleet, store, service = rig
    # A refusal for another reason (power hold set at the meter, unknown to the gateway): no clock hint.
    fleet.meter(A).meter.relay.hold = True
    held = await run(store, service, "trip-held", "trip")
    assert held.state is State.REFUSED
    assert "reason" not in (await store.events(command_id=held.id))[-1].detail
    fleet.meter(A).meter.relay.hold = False

    fleet.inject(A, FaultSpec(Fault.CLOCK_JUMP, seconds=86_400))  # a day ahead
    refused = await run(store, service, "trip-ahead", "trip")
    assert refused.state is State.REFUSED
    last = (await store.events(command_id=refused.id))[-1].detail
    assert last["by"] == "meter" and "clock is 1 day, 0:00:00 ahead" in last["reason"] and "time sync" in last["reason"]
    assert fleet.state(A)["relay"] == "closed"
