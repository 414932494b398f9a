"""Relay commands through the service: each verified by status word 3 (dlt645.md §3.4)."""

from __future__ import annotations

from datetime import datetime

import pytest
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import Policy
from gateway.service import CommandService, MeterEntry
from protocols.dlt645 import METER_TZ
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
