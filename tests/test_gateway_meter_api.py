"""GET /meters/{address} (power hold as the ledger has it, the last observation) and
GET /meters/{address}/wallet, through FastAPI's TestClient against a real CommandService on
SQLite and simulated meters on an in-memory line (one event loop: the client's portal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from remotekit import REMOTE, START, into_arrears
from simline import SimLineTransport

from firmware_stubs.meter import CostMode
from gateway.api import create_api
from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.poller import PollConfig, Poller
from gateway.service import CommandService, MeterEntry, ServiceConfig
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

KEY = "ops-key-0123456789"
OPS = {"X-API-Key": KEY}
LOCAL, HELD = "000000000002", "000000000003"
"""A local cost-control meter, and one configured on power hold."""
UNMANAGED = "000000000077"
FAST = LinkConfig(gap_s=0.0, td_max_s=0.05, margin_s=0.05, inter_byte_s=0.15, retries=2, backoff_s=0.01)


@dataclass
class Api:
    client: TestClient
    service: CommandService
    store: Store
    fleet: Fleet
    clock: VirtualClock

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    def relay(self, address: str, action: str) -> dict[str, Any]:
        body = {"kind": "relay", "address": address, "params": {"action": action}}
        reply = self.client.post("/commands", json=body, headers=OPS)
        assert reply.status_code == 201, reply.text
        self.run(self.service.drain)
        done = self.client.get(f"/commands/{reply.json()['id']}").json()
        assert done["state"] == "confirmed", done
        return done


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    clock = VirtualClock(START, 0)
    specs = [
        MeterSpec(REMOTE, mode=CostMode.REMOTE, load="constant", watts=2000),
        MeterSpec(LOCAL, balance=Decimal("42.50")),
        MeterSpec(HELD),
    ]
    fleet = Fleet([BusSpec("bus0", specs)], clock, seed=3)
    link = Link(SimLineTransport(fleet.buses["bus0"]), FAST, name="bus0")
    store = Store.sqlite(tmp_path / "ledger.sqlite")
    meters = {
        REMOTE: MeterEntry(REMOTE, "bus0", mode="remote"),
        LOCAL: MeterEntry(LOCAL, "bus0"),
        HELD: MeterEntry(HELD, "bus0", power_hold=True),
    }
    config = ServiceConfig(retry_delay=timedelta(milliseconds=50), poll_s=0.01)
    service = CommandService(store, meters, {"bus0": link}, config=config, now=clock.now)
    with TestClient(create_api(service, api_keys={"ops": KEY})) as client:
        a = Api(client, service, store, fleet, clock)
        a.run(store.open)
        a.run(link.start)
        a.run(service.start)
        try:
            yield a
        finally:
            a.run(service.stop)
            a.run(link.stop)
            a.run(store.close)


def test_power_hold_is_what_the_last_confirmed_power_hold_command_left(api: Api):
    fresh = api.client.get(f"/meters/{LOCAL}").json()
    assert (fresh["power_hold"], fresh["power_hold_configured"]) == (False, False)
    api.relay(LOCAL, "power-hold-on")
    held = api.client.get(f"/meters/{LOCAL}").json()
    assert (held["power_hold"], held["power_hold_configured"]) == (True, False)
    assert api.fleet.state(LOCAL)["power_hold"] is True  # the meter agrees
    # the registry lists the configuration
    assert next(m for m in api.client.get("/meters").json() if m["address"] == LOCAL)["power_hold"] is False
    api.clock.advance(timedelta(minutes=1))  # the release ends later than the hold
    api.relay(LOCAL, "power-hold-off")
    assert api.client.get(f"/meters/{LOCAL}").json()["power_hold"] is False
    # A configured power-hold customer stays one whatever the commands did.
    api.relay(HELD, "power-hold-off")
    held_by_config = api.client.get(f"/meters/{HELD}").json()
    assert (held_by_config["power_hold"], held_by_config["power_hold_configured"]) == (True, True)


def test_meter_detail_has_the_last_observation(api: Api):
    assert api.client.get(f"/meters/{LOCAL}").json()["last_observation"] is None
    api.relay(LOCAL, "power-hold-on")
    poller = Poller(api.service, PollConfig(interval_s=0))
    api.run(poller.poll_once)
    seen = api.client.get(f"/meters/{LOCAL}").json()["last_observation"]
    truth = api.fleet.state(LOCAL)
    assert seen["answering"] is True and seen["relay"] == "closed" and seen["relay_open"] is False
    assert seen["power_hold"] is True  # status word 3 bit 12, from the meter itself
    assert (seen["remaining_money"], seen["overdraft"], seen["level"]) == (truth["remaining_money"], "0.00", "normal")
    assert seen["at"] == seen["answered_at"] and seen["silent_since"] is None
    remote = api.client.get(f"/meters/{REMOTE}").json()["last_observation"]
    assert remote["relay"] == "closed" and remote["remaining_money"] is None and remote["level"] is None


def test_wallet_of_a_remote_meter_after_billing_runs(api: Api):
    api.run(into_arrears, api.service, api.clock, 10)
    wallet = api.client.get(f"/meters/{REMOTE}/wallet").json()
    balance = api.run(api.store.wallet, REMOTE)
    assert wallet["address"] == REMOTE and wallet["balance"] == str(Decimal(balance).scaleb(-2))
    entries = wallet["entries"]
    assert wallet["total"] == len(entries) >= 2 and (wallet["limit"], wallet["offset"]) == (100, 0)
    assert [e["kind"] for e in entries][-1] == "topup" and entries[-1]["amount"] == "5.00"
    assert all(e["kind"] == "daily charge" and Decimal(e["amount"]) < 0 for e in entries[:-1])
    assert sum(Decimal(e["amount"]) for e in entries) == Decimal(wallet["balance"]) < 0  # in arrears
    assert [e["at"] for e in entries] == sorted((e["at"] for e in entries), reverse=True)  # newest first
    (topup,) = [c for c in api.run(lambda: api.store.commands(address=REMOTE)) if c.kind.value == "topup"]
    assert topup.state is State.CONFIRMED and entries[-1]["reference"] == f"topup:{topup.id}"
    assert all(e["reference"].startswith(f"daily:{REMOTE}:") for e in entries[:-1])

    page = api.client.get(f"/meters/{REMOTE}/wallet", params={"limit": 1, "offset": 1}).json()
    assert page["total"] == wallet["total"] and page["entries"] == entries[1:2]
    beyond = api.client.get(f"/meters/{REMOTE}/wallet", params={"offset": 1000}).json()
    assert beyond["entries"] == [] and beyond["total"] == wallet["total"]
    assert api.client.get("/meters/1/wallet").json() == wallet  # leading zeros may be left out


def test_wallet_of_unknown_local_and_bad_addresses(api: Api):
    empty = api.client.get(f"/meters/{REMOTE}/wallet").json()
    assert empty == {"address": REMOTE, "balance": None, "total": 0, "limit": 100, "offset": 0, "entries": []}
    local = api.client.get(f"/meters/{LOCAL}/wallet")
    assert local.status_code == 404 and "local cost-control meter" in local.json()["detail"]
    unknown = api.client.get(f"/meters/{UNMANAGED}/wallet")
    assert (
        unknown.status_code == 404 and unknown.json()["detail"] == f"meter {UNMANAGED} is not managed by this gateway"
    )
    assert api.client.get("/meters/12X/wallet").status_code == 422
    assert api.client.get(f"/meters/{REMOTE}/wallet", params={"limit": 0}).status_code == 422
    assert api.client.get(f"/meters/{REMOTE}/wallet", params={"offset": -1}).status_code == 422


def test_openapi_documents_the_wallet_and_the_observation(api: Api):
    doc = api.client.get("/openapi.json").json()
    op = doc["paths"]["/meters/{address}/wallet"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"address", "limit", "offset"}
    assert {"200", "404", "422"} <= set(op["responses"])
    schemas = doc["components"]["schemas"]
    detail = schemas["MeterDetail"]["properties"]
    assert {"last_observation", "power_hold", "power_hold_configured"} <= set(detail)
    assert "last confirmed" in detail["power_hold"]["description"]
    assert {"at", "answering", "relay", "remaining_money", "overdraft", "level"} <= set(
        schemas["ObservationOut"]["properties"]
    )
    assert set(schemas["WalletEntryOut"]["properties"]) == {"at", "amount", "kind", "reference"}
