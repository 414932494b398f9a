"""Disconnection notices: recorded through the API, kept in the ledger, counted by the policy."""

from __future__ import annotations

from datetime import datetime, time, timedelta

import pytest
from fastapi.testclient import TestClient
from simline import SimLineTransport

from gateway.api import create_api
from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import Policy
from gateway.service import CommandService, MeterEntry
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

START = datetime(2026, 11, 24, 10, 0, tzinfo=METER_TZ)  # Tuesday morning
A = "000000000001"
KEY = "notice-test-key-1"


async def test_arrears_trip_waits_for_the_notice_period_even_across_a_restart(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(A)])], clock, seed=5)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    policy = Policy(quiet_start=time(22, 0), quiet_end=time(6, 0), weekend_quiet=False, require_notice=True)

    def new_service() -> CommandService:
        return CommandService(store, {A: MeterEntry(A, "bus0")}, {"bus0": link}, now=clock.now, policy=policy)

    service = await new_service().start()
    try:
        no_notice, _ = await service.submit("arrears-1", "relay", A, {"action": "trip", "arrears": True}, "ops")
        await service.drain()
        events = await store.events(command_id=no_notice.id)
        assert (await store.get(no_notice.id)).state is State.REFUSED and events[-1].detail["rule"] == "notice"
        await service.record_notice(A, "ops", clock.now(), "SMS: supply will be cut in 7 days")
        await service.stop()
        # A restart: the new service knows nothing in memory; the ledger has the notice.
        clock.advance(timedelta(days=7, minutes=1))
        service = await new_service().start()
        trip, _ = await service.submit("arrears-2", "relay", A, {"action": "trip", "arrears": True}, "ops")
        await service.drain()
        assert (await store.get(trip.id)).state is State.CONFIRMED
        assert fleet.state(A)["relay"] == "open"
    finally:
        await service.stop()
        await link.stop()
        await store.close()


@pytest.fixture
async def api(tmp_path):
    store = await Store.sqlite(tmp_path / "a.sqlite").open()
    service = CommandService(store, {A: MeterEntry(A, "bus0")}, {}, now=lambda: START)
    client = TestClient(create_api(service, api_keys={"ops": KEY}))
    yield client, store
    await store.close()


async def test_notice_endpoint_records_and_validates(api):
    client, store = api
    assert client.post(f"/meters/{A}/notices", json={}).status_code == 401
    ok = client.post(f"/meters/{A}/notices", json={"text": "letter"}, headers={"X-API-Key": KEY})
    assert ok.status_code == 201 and ok.json()["actor"] == "api:ops"
    assert await store.last_notice(A) == START
    future = (START + timedelta(days=1)).isoformat()
    bad = client.post(f"/meters/{A}/notices", json={"sent_at": future}, headers={"X-API-Key": KEY})
    assert bad.status_code == 422
    naive = client.post(f"/meters/{A}/notices", json={"sent_at": "2026-11-24T09:00:00"}, headers={"X-API-Key": KEY})
    assert naive.status_code == 422
    unknown = client.post("/meters/000000000099/notices", json={}, headers={"X-API-Key": KEY})
    assert unknown.status_code == 404
