"""The REST API (gateway/api.py) through FastAPI's TestClient, against a real CommandService on SQLite.

Most tests do not start the service: commands stay ``accepted`` and the ledger (``store``) says
what was recorded. The end-to-end test starts the service with an in-memory line to the
simulator (:class:`simline.SimLineTransport`) and checks the meter's ground truth
(``fleet.state``). The TestClient runs as a context manager, so the app, the ledger's calls, the
lines and the service share one event loop (its ``portal``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from simline import SimLineTransport

from gateway.api import create_api
from gateway.ledger import Command, State, Store
from gateway.link import Link, LinkConfig
from gateway.service import CommandService, MeterEntry, ServiceConfig
from simulator.clock import VirtualClock
from simulator.fleet import Fleet
from simulator.scenario import from_flags

KEY = "ops-key-0123456789"
AUDITOR_KEY = "auditor-key-9876543210"
KEYS = {"ops": KEY, "auditor": AUDITOR_KEY}
OPS = {"X-API-Key": KEY}
A1, A2, A3, R1 = "000000000001", "000000000002", "000000000003", "000000000009"
UNMANAGED = "000000000077"

FAST = LinkConfig(
    gap_s=0.0, td_max_s=0.05, margin_s=0.05, inter_byte_s=0.15, retries=2, backoff_s=0.01, security_extra_s=0.1
)


def registry() -> dict[str, MeterEntry]:
    meters = {a: MeterEntry(a, "bus0") for a in (A1, A2, A3)}
    meters[R1] = MeterEntry(R1, "bus1", mode="remote", power_hold=True)
    return meters


@dataclasses.dataclass
class Api:
    client: TestClient
    service: CommandService
    store: Store

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a coroutine function in the app's event loop."""
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    def commands(self) -> list[Command]:
        return self.run(lambda: self.store.commands(limit=1000))

    def events(self) -> list[Any]:
        return self.run(lambda: self.store.events())

    def post(self, body: Any, *, headers: dict[str, str] | None = None, path: str = "/commands") -> Any:
        return self.client.post(path, json=body, headers=OPS if headers is None else headers)


def open_api(
    tmp_path: Path,
    *,
    meters: dict[str, MeterEntry] | None = None,
    links: dict[str, Link] | None = None,
    config: ServiceConfig | None = None,
    **api_kw: Any,
) -> Iterator[Api]:
    store = Store.sqlite(tmp_path / "ledger.sqlite")
    service = CommandService(store, meters if meters is not None else registry(), links or {}, config=config)
    api_kw.setdefault("api_keys", KEYS)
    api_kw.setdefault("groups", {"feeder-7": [A1, A2], "broken": [A1, UNMANAGED], "empty": []})
    app = create_api(service, **api_kw)
    with TestClient(app) as client:
        api = Api(client, service, store)
        api.run(store.open)
        try:
            yield api
        finally:
            api.run(service.stop)
            api.run(store.close)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from open_api(tmp_path)


def topup(address: str = A1, amount: Any = "50.00", **extra: Any) -> dict[str, Any]:
    return {"kind": "topup", "address": address, "params": {"amount": amount}, **extra}


# --- the OpenAPI document ---------------------------------------------------------------------------------------


def test_openapi_document_lists_the_endpoints_and_the_api_key_scheme(api: Api):
    reply = api.client.get("/openapi.json")
    assert reply.status_code == 200
    doc = reply.json()
    assert doc["info"]["title"] == "meterlink gateway API"
    assert set(doc["paths"]) == {
        "/commands",
        "/commands/batch",
        "/commands/{command_id}",
        "/commands/{command_id}/events",
        "/meters",
        "/meters/{address}",
        "/meters/{address}/notices",
        "/meters/{address}/wallet",
        "/audit",
        "/health",
    }
    assert doc["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The gateway's API key. Required for every call that changes something.",
    }
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            if method in ("post", "put", "patch", "delete"):
                assert op["security"] == [{"ApiKey": []}], (method, path)
            else:
                assert "security" not in op, (method, path)  # reads are open unless configured
    post = doc["paths"]["/commands"]["post"]
    assert {"200", "201", "401", "403", "409", "422"} <= set(post["responses"])
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert examples["topup"]["value"]["params"] == {"amount": "50.00"}
    assert "Idempotency-Key" in {p["name"] for p in post["parameters"]}
    props = doc["components"]["schemas"]["TopupParams"]["properties"]
    amount = next(b for b in props["amount"].get("anyOf", [props["amount"]]) if b.get("type") == "string")
    assert amount["examples"] == ["50.00"] and "yuan" in amount["description"]
    energy = next(b for b in props["energy_kwh"].get("anyOf", [props["energy_kwh"]]) if b.get("type") == "string")
    assert "kWh" in energy["description"]
    assert "rate_per_s" in doc["paths"]["/commands/batch"]["post"]["description"]
    assert "text/csv" in doc["paths"]["/audit"]["get"]["responses"]["200"]["content"]
    assert api.client.get("/docs").status_code == 200


def test_openapi_marks_reads_secured_when_reads_need_a_key(tmp_path: Path):
    for api in open_api(tmp_path, read_requires_key=True):
        doc = api.client.get("/openapi.json").json()
        assert doc["paths"]["/commands"]["get"]["security"] == [{"ApiKey": []}]
        assert "security" not in doc["paths"]["/health"]["get"]


# --- authentication -------------------------------------------------------------------------------------------


def test_changes_need_a_key_401_without_403_wrong(api: Api):
    missing = api.post(topup(), headers={})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "ApiKey"
    assert "X-API-Key" in missing.json()["detail"]
    wrong = api.post(topup(), headers={"X-API-Key": "not-the-key"})
    assert wrong.status_code == 403
    assert "not-the-key" not in wrong.text
    empty = api.post(topup(), headers={"X-API-Key": ""})
    assert empty.status_code == 401
    batch = api.post({"kind": "time_sync", "group": "feeder-7"}, headers={}, path="/commands/batch")
    assert batch.status_code == 401
    assert api.commands() == [] and api.events() == []


def test_reads_are_open_by_default(api: Api):
    assert api.client.get("/commands").status_code == 200
    assert api.client.get("/meters", headers={"X-API-Key": "wrong"}).status_code == 200
    assert api.client.get("/health").json() == {"status": "ok", "open_commands": 0}


def test_reads_need_a_key_when_configured(tmp_path: Path):
    for api in open_api(tmp_path, read_requires_key=True):
        for path in ("/commands", "/meters", f"/meters/{A1}", "/audit", "/commands/x", "/commands/x/events"):
            assert api.client.get(path).status_code == 401, path
            assert api.client.get(path, headers={"X-API-Key": "wrong"}).status_code == 403, path
        assert api.client.get("/commands", headers=OPS).status_code == 200
        assert api.client.get("/audit", headers={"X-API-Key": AUDITOR_KEY}).status_code == 200
        assert api.client.get("/health").status_code == 200  # liveness needs no key


def test_the_actor_is_the_key_name_and_the_key_is_never_recorded(api: Api):
    reply = api.post(topup(), headers={"X-API-Key": AUDITOR_KEY})
    assert reply.status_code == 201
    assert reply.json()["actor"] == "api:auditor"
    (event,) = api.events()
    assert event.actor == "api:auditor"
    audit = api.client.get("/audit?format=csv").text + api.client.get("/audit").text
    everything = reply.text + audit + api.client.get("/commands").text
    assert KEY not in everything and AUDITOR_KEY not in everything


def test_unnamed_keys_record_a_fingerprint_not_the_key(tmp_path: Path):
    for api in open_api(tmp_path, api_keys={KEY}):
        reply = api.post(topup())
        assert reply.status_code == 201
        actor = reply.json()["actor"]
        assert actor.startswith("api:key-") and len(actor) == len("api:key-") + 10
        assert KEY[:4] not in actor
        assert api.commands()[0].actor == actor
        assert api.post(topup(A2)).json()["actor"] == actor  # stable per key


# --- submitting one command -----------------------------------------------------------------------------------


def test_topup_is_recorded_201_and_a_replay_returns_the_first_200(api: Api):
    first = api.post(topup(idempotency_key="order-1"))
    assert first.status_code == 201
    body = first.json()
    assert first.headers["Location"] == f"/commands/{body['id']}"
    assert body["kind"] == "topup" and body["address"] == A1 and body["state"] == "accepted"
    assert body["params"] == {"amount_fen": 5000, "amount": "50.00", "opening": False}
    assert body["actor"] == "api:ops" and body["idempotency_key"] == "order-1"
    again = api.post(topup(idempotency_key="order-1"))
    assert again.status_code == 200
    assert again.json() == body
    also = api.post(topup(amount=50, idempotency_key="order-1"))  # the same amount, as a number
    assert (also.status_code, also.json()["id"]) == (200, body["id"])
    assert len(api.commands()) == 1 and len(api.events()) == 1


def test_idempotency_key_header_is_an_alternative_to_the_body_field(api: Api):
    first = api.post(topup(), headers={**OPS, "Idempotency-Key": "hdr-1"})
    assert first.status_code == 201 and first.json()["idempotency_key"] == "hdr-1"
    again = api.post(topup(idempotency_key="hdr-1"))
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    differ = api.post(topup(idempotency_key="hdr-2"), headers={**OPS, "Idempotency-Key": "hdr-3"})
    assert differ.status_code == 422 and "differ" in differ.json()["detail"]
    assert len(api.commands()) == 1


def test_same_key_with_a_different_body_is_409_and_nothing_is_recorded(api: Api):
    assert api.post(topup(idempotency_key="order-2")).status_code == 201
    for changed in (
        topup(amount="60.00", idempotency_key="order-2"),
        topup(A2, idempotency_key="order-2"),
        {"kind": "time_sync", "address": A1, "idempotency_key": "order-2"},
        topup(idempotency_key="order-2", valid_until=(datetime.now(UTC) + timedelta(hours=1)).isoformat()),
    ):
        reply = api.post(changed)
        assert reply.status_code == 409, changed
        assert "order-2" in reply.json()["detail"]
    assert len(api.commands()) == 1 and len(api.events()) == 1


def test_without_an_idempotency_key_a_repeated_post_is_the_first_command(api: Api):
    first = api.post(topup())
    assert first.status_code == 201, first.text
    repeats = [api.post(topup()) for _ in range(2)]
    assert [r.status_code for r in repeats] == [200, 200]
    assert {r.json()["id"] for r in repeats} == {first.json()["id"]}
    assert first.json()["idempotency_key"].startswith(f"auto:topup:{A1}:")
    assert len(api.commands()) == 1
    # A different amount, or another meter, is another command.
    assert api.post(topup(amount="20.00")).status_code == 201
    assert api.post(topup(address=A2)).status_code == 201
    assert len(api.commands()) == 3


def test_a_repeat_with_a_relative_validity_is_the_first_command(api: Api):
    """A client that says "valid for 5 minutes" sends another end time with each repeat; without
    a key of its own it is still the same request (and a repeated top-up must never pay twice)."""

    def relay(minutes: float) -> Any:
        until = (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()
        return api.post({"kind": "relay", "address": A1, "params": {"action": "trip"}, "valid_until": until})

    first = relay(5)
    assert first.status_code == 201, first.text
    again = relay(5.5)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    paid = api.post(topup(valid_until=(datetime.now(UTC) + timedelta(hours=1)).isoformat()))
    repeat = api.post(topup(valid_until=(datetime.now(UTC) + timedelta(hours=2)).isoformat()))
    assert (repeat.status_code, repeat.json()["id"]) == (200, paid.json()["id"])
    assert len(api.commands()) == 2


def test_derived_keys_anchor_on_the_last_other_command_of_the_kind(api: Api):
    def relay(action: str) -> Any:
        return api.post({"kind": "relay", "address": A1, "params": {"action": action}})

    trip = relay("trip")
    assert relay("trip").json()["id"] == trip.json()["id"]  # a repeat
    close = relay("direct-close")
    assert close.status_code == 201
    again = relay("trip")  # trip, close, trip: the second trip is a new command
    assert again.status_code == 201 and again.json()["id"] != trip.json()["id"]
    assert relay("trip").json()["id"] == again.json()["id"]
    assert relay("direct-close").json()["id"] != close.json()["id"]


@pytest.mark.parametrize(
    ("sent", "recorded"),
    [("50.00", 5000), ("50", 5000), (50, 5000), (50.5, 5050), ("0.01", 1), (999999.99, 99999999), ("1e3", 100000)],
)
def test_amounts_as_strings_or_exact_numbers(api: Api, sent: Any, recorded: int):
    reply = api.post(topup(amount=sent))
    assert reply.status_code == 201, reply.text
    assert reply.json()["params"]["amount_fen"] == recorded
    assert reply.json()["params"]["amount"] == f"{recorded / 100:.2f}"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(topup(amount="1.234"), id="three-decimals"),
        pytest.param(topup(amount=1.234), id="three-decimals-number"),
        pytest.param(topup(amount="-5"), id="negative"),
        pytest.param(topup(amount="abc"), id="not-a-number"),
        pytest.param(topup(amount=1e30), id="1e30"),
        pytest.param(topup(amount="1e30"), id="1e30-string"),
        pytest.param(topup(amount=10**40), id="huge-int"),
        pytest.param(topup(amount="NaN"), id="nan"),
        pytest.param(topup(amount="Infinity"), id="infinity"),
        pytest.param(topup(amount="0.00"), id="zero"),
        pytest.param(topup(amount="1000000.00"), id="too-much"),
        pytest.param(topup(amount=True), id="bool"),
        pytest.param(topup(amount=None), id="null"),
        pytest.param(topup(amount=["50"]), id="list"),
        pytest.param(topup(amount=""), id="empty"),
        pytest.param({"kind": "topup", "address": A1, "params": {}}, id="no-amount"),
        pytest.param({"kind": "topup", "address": A1}, id="no-params"),
        pytest.param(
            {"kind": "topup", "address": A1, "params": {"amount": "5", "amount_fen": 500}}, id="unknown-param"
        ),
        pytest.param({"kind": "credit", "address": A1, "params": {"amount": "5"}}, id="unknown-kind"),
        pytest.param({"address": A1, "params": {"amount": "5"}}, id="no-kind"),
        pytest.param(topup(UNMANAGED), id="unknown-meter"),
        pytest.param(topup("12345678901X"), id="bad-address"),
        pytest.param(topup("1234567890123"), id="long-address"),
        pytest.param(topup(""), id="empty-address"),
        pytest.param(topup("AAAAAAAAAAAA"), id="broadcast-address"),
        pytest.param(topup(valid_until="2030-01-01T12:00:00"), id="valid-until-without-zone"),
        pytest.param(topup(valid_until="tomorrow"), id="valid-until-not-a-time"),
        pytest.param(topup(valid_until="2001-01-01T12:00:00+08:00"), id="valid-until-past"),
        pytest.param(topup(idempotency_key=""), id="empty-key"),
        pytest.param(topup(idempotency_key="k" * 201), id="long-key"),
        pytest.param(topup(extra="field"), id="unknown-field"),
        pytest.param({"kind": "relay", "address": A1, "params": {"action": "explode"}}, id="relay-action"),
        pytest.param({"kind": "relay", "address": A1, "params": {"action": "trip", "n2": 256}}, id="relay-n2"),
        pytest.param(
            {"kind": "relay", "address": A1, "params": {"action": "trip"}, "valid_until": "2099-01-01T00:00:00+08:00"},
            id="relay-valid-for-decades",
        ),
        pytest.param({"kind": "tariff", "address": A1, "params": {"prices": []}}, id="tariff-empty"),
        pytest.param({"kind": "tariff", "address": A1, "params": {"prices": ["0.12345"]}}, id="tariff-decimals"),
        pytest.param({"kind": "tariff", "address": A1, "params": {"prices": ["1"] * 13}}, id="tariff-13"),
        pytest.param(
            {"kind": "tariff", "address": A1, "params": {"prices": ["1"], "switch_at": "2030-01-01T00:00"}},
            id="tariff-switch-without-zone",
        ),
        pytest.param(
            {"kind": "tariff", "address": A1, "params": {"tou": {"zones": [{"month": 1, "day": 1, "table": 1}]}}},
            id="tou-no-day-tables",
        ),
        pytest.param(
            {
                "kind": "tariff",
                "address": A1,
                "params": {
                    "tou": {
                        "zones": [{"month": 1, "day": 1, "table": 1}],
                        "day_tables": [[{"hour": 0, "minute": 0, "tariff": 5}]],
                    }
                },
            },
            id="tou-tariff-5",
        ),
        pytest.param(
            {
                "kind": "tariff",
                "address": A1,
                "params": {
                    "tou": {
                        "zones": [{"month": 1, "day": 1, "table": "1"}],
                        "day_tables": [[{"hour": 0, "minute": 0, "tariff": 1}]],
                    }
                },
            },
            id="tou-string-number",
        ),
        pytest.param({"kind": "params", "address": A1, "params": {}}, id="params-none"),
        pytest.param({"kind": "params", "address": A1, "params": {"alarm_1": "-1"}}, id="params-negative"),
        pytest.param({"kind": "params", "address": A1, "params": {"alarm_9": "1"}}, id="params-unknown"),
        pytest.param({"kind": "time_sync", "address": A1, "params": {"x": 1}}, id="time-sync-params"),
        pytest.param([topup()], id="a-list"),
        pytest.param("topup", id="a-string"),
    ],
)
def test_bad_input_is_422_and_nothing_is_recorded(api: Api, body: Any):
    reply = api.post(body)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert detail
    if isinstance(detail, list):
        assert all({"loc", "msg", "type"} <= set(d) for d in detail)
    assert api.commands() == [] and api.events() == []


def test_bad_input_messages_say_what_is_wrong(api: Api):
    def detail(body: Any) -> str:
        return json.dumps(api.post(body).json()["detail"])

    assert "more than 2 decimals" in detail(topup(amount="1.234"))
    assert "out of range" in detail(topup(amount=1e30))
    assert "not a decimal amount" in detail(topup(amount="abc"))
    assert "timezone" in detail(topup(valid_until="2030-01-01T12:00:00"))
    assert f"meter {UNMANAGED} is not managed" in detail(topup(UNMANAGED))
    assert "valid_until is in the past" in detail(topup(valid_until="2001-01-01T00:00:00Z"))
    late = (datetime.now(UTC) + timedelta(hours=24, minutes=5)).isoformat()
    assert "at most 24 hours" in detail(
        {"kind": "relay", "address": A1, "params": {"action": "trip"}, "valid_until": late}
    )
    soon = (datetime.now(UTC) + timedelta(hours=23)).isoformat()
    assert (
        api.post({"kind": "relay", "address": A1, "params": {"action": "alarm-on"}, "valid_until": soon}).status_code
        == 201
    )
    assert "'credit'" in detail({"kind": "credit", "address": A1, "params": {}})


def test_malformed_json_is_a_clear_422(api: Api):
    reply = api.client.post(
        "/commands", content=b'{"kind": "topup",', headers={**OPS, "Content-Type": "application/json"}
    )
    assert reply.status_code == 422
    assert "not valid JSON" in reply.json()["detail"][0]["msg"]
    assert api.commands() == []


def test_other_kinds_are_recorded_normalised(api: Api):
    relay = api.post({"kind": "relay", "address": "1", "params": {"action": "trip"}})
    assert relay.status_code == 201
    assert relay.json()["address"] == A1  # short addresses are padded
    assert relay.json()["params"] == {"action": "trip", "n2": 0, "arrears": None}
    assert relay.json()["valid_until"] is not None  # relay commands expire (30 minutes)
    tariff = api.post(
        {"kind": "tariff", "address": A2, "params": {"prices": ["0.5883", 0.2883], "switch_at": "2030-01-01T00:00Z"}}
    )
    assert tariff.status_code == 201, tariff.text
    assert tariff.json()["params"] == {
        "prices": ["0.5883", "0.2883"],
        "switch_at": "2030-01-01T08:00:00+08:00",
        "set": "backup",
    }
    params = api.post({"kind": "params", "address": A3, "params": {"alarm_1": "20", "alarm_2": 5}})
    assert params.json()["params"] == {"alarm_1": "20.00", "alarm_2": "5.00"}
    sync = api.post({"kind": "time_sync", "address": A3})
    assert (sync.status_code, sync.json()["params"]) == (201, {})
    until = datetime.now(UTC) + timedelta(hours=2)
    timed = api.post(topup(valid_until=until.isoformat()))
    assert datetime.fromisoformat(timed.json()["valid_until"]) == until


def test_a_tou_tariff_is_accepted_and_normalised(api: Api):
    tou = {
        "day_tables": [
            [{"tariff": 4, "hour": 0, "minute": 0}, {"hour": 8, "minute": 0, "tariff": 2}],
            [{"hour": 0, "minute": 0, "tariff": 3}],
        ],
        "zones": [{"month": 1, "day": 1, "table": 1}, {"table": 2, "month": 7, "day": 1}],
    }
    reply = api.post(
        {"kind": "tariff", "address": "2", "params": {"tou": tou, "tou_switch_at": "2030-01-01T00:00:00Z"}}
    )
    assert reply.status_code == 201, reply.text
    assert reply.json()["params"] == {
        "set": "backup",
        "tou": {
            "zones": [{"month": 1, "day": 1, "table": 1}, {"month": 7, "day": 1, "table": 2}],
            "day_tables": [
                [{"hour": 0, "minute": 0, "tariff": 4}, {"hour": 8, "minute": 0, "tariff": 2}],
                [{"hour": 0, "minute": 0, "tariff": 3}],
            ],
        },
        "tou_switch_at": "2030-01-01T08:00:00+08:00",  # in the meter's zone
    }
    [command] = api.commands()
    assert command.params["tou"]["zones"][1] == {"month": 7, "day": 1, "table": 2}
    bad = api.post(
        {"kind": "tariff", "address": A1, "params": {"tou": {**tou, "zones": [{"month": 7, "day": 1, "table": 3}]}}}
    )
    assert bad.status_code == 422 and "table must be an integer 1..2" in json.dumps(bad.json()["detail"])
    assert len(api.commands()) == 1
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]
    assert {"zones", "day_tables"} <= set(schema["TouScheduleParams"]["properties"])
    assert "tou_switch_at" in schema["TariffParams"]["properties"]


# --- batches --------------------------------------------------------------------------------------------------


def test_batch_of_addresses_records_one_command_per_meter(api: Api):
    body = {"kind": "tariff", "addresses": [A1, "2", A3], "params": {"prices": ["0.5"]}, "idempotency_key": "t-12"}
    reply = api.post(body, path="/commands/batch")
    assert reply.status_code == 201, reply.text
    assert reply.headers["X-Batch-Id"] == "t-12"
    items = reply.json()
    assert [c["address"] for c in items] == [A1, A2, A3]
    assert {c["batch"] for c in items} == {"t-12"}
    assert [c["idempotency_key"] for c in items] == [f"t-12:{a}" for a in (A1, A2, A3)]
    assert {c["actor"] for c in items} == {"api:ops"}
    again = api.post(body, path="/commands/batch")
    assert again.status_code == 200
    assert [c["id"] for c in again.json()] == [c["id"] for c in items]
    listed = api.client.get("/commands", params={"batch": "t-12"}).json()
    assert sorted(c["id"] for c in listed) == sorted(c["id"] for c in items)
    assert len(api.commands()) == 3


def test_batch_interrupted_half_way_is_completed_by_sending_it_again(api: Api):
    first = api.post({"kind": "time_sync", "addresses": [A1], "idempotency_key": "s-1"}, path="/commands/batch")
    assert first.status_code == 201
    whole = api.post({"kind": "time_sync", "addresses": [A1, A2], "idempotency_key": "s-1"}, path="/commands/batch")
    assert whole.status_code == 201
    assert whole.json()[0]["id"] == first.json()[0]["id"]
    assert len(api.commands()) == 2


def test_batch_of_a_group(api: Api):
    reply = api.post({"kind": "time_sync", "group": "feeder-7"}, path="/commands/batch")
    assert reply.status_code == 201
    items = reply.json()
    assert [c["address"] for c in items] == [A1, A2]
    batch = reply.headers["X-Batch-Id"]
    assert batch.startswith("batch-") and {c["batch"] for c in items} == {batch}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"kind": "time_sync", "addresses": [A1, UNMANAGED, A2]}, id="unmanaged-meter"),
        pytest.param({"kind": "time_sync", "addresses": [A1, "12345X", A2]}, id="malformed-address"),
        pytest.param({"kind": "time_sync", "addresses": [A1, "1"]}, id="listed-twice"),
        pytest.param({"kind": "time_sync", "addresses": []}, id="empty-list"),
        pytest.param({"kind": "time_sync", "group": "broken"}, id="group-with-unmanaged-meter"),
        pytest.param({"kind": "time_sync", "group": "empty"}, id="empty-group"),
        pytest.param({"kind": "time_sync", "group": "nope"}, id="unknown-group"),
        pytest.param({"kind": "time_sync", "group": "feeder-7", "addresses": [A1]}, id="both"),
        pytest.param({"kind": "time_sync"}, id="neither"),
        pytest.param({"kind": "topup", "addresses": [A1, A2], "params": {"amount": "1.234"}}, id="bad-amount"),
        pytest.param({"kind": "topup", "addresses": [A1, R1], "params": {"amount": "-5"}}, id="negative-amount"),
        pytest.param(
            {"kind": "time_sync", "addresses": [A1], "valid_until": "2030-01-01T00:00:00"}, id="valid-until-no-zone"
        ),
        pytest.param({"kind": "time_sync", "addresses": [A1], "idempotency_key": "k" * 190}, id="long-prefix"),
    ],
)
def test_batch_with_any_bad_part_is_422_and_nothing_is_recorded(api: Api, body: dict[str, Any]):
    reply = api.post(body, path="/commands/batch")
    assert reply.status_code == 422, reply.text
    assert api.commands() == [] and api.events() == []


def test_batch_error_names_the_bad_address(api: Api):
    reply = api.post({"kind": "time_sync", "addresses": [A1, A2, UNMANAGED]}, path="/commands/batch")
    assert reply.json()["detail"] == f"addresses[2]: meter {UNMANAGED} is not managed by this gateway"


def test_batch_conflicting_with_an_earlier_command_is_409_and_records_nothing(api: Api):
    assert api.post(topup(A2, idempotency_key="p:000000000002")).status_code == 201
    body = {"kind": "topup", "addresses": [A1, A2, A3], "params": {"amount": "10"}, "idempotency_key": "p"}
    reply = api.post(body, path="/commands/batch")
    assert reply.status_code == 409
    assert len(api.commands()) == 1


# --- queries --------------------------------------------------------------------------------------------------


def test_command_queries(api: Api):
    t1 = api.post(topup(A1)).json()
    t2 = api.post(topup(A2)).json()
    s1 = api.post({"kind": "time_sync", "address": A1}).json()
    listed = api.client.get("/commands").json()
    assert [c["id"] for c in listed] == [s1["id"], t2["id"], t1["id"]]  # newest first
    by_meter = api.client.get("/commands", params={"address": "1"}).json()
    assert {c["id"] for c in by_meter} == {t1["id"], s1["id"]}
    assert len(api.client.get("/commands", params={"state": "accepted"}).json()) == 3
    assert api.client.get("/commands", params={"state": "confirmed"}).json() == []
    page = api.client.get("/commands", params={"limit": 1, "offset": 1}).json()
    assert [c["id"] for c in page] == [t2["id"]]
    assert api.client.get("/commands", params={"state": "done"}).status_code == 422
    assert api.client.get("/commands", params={"limit": 0}).status_code == 422
    assert api.client.get("/commands", params={"address": "12X"}).status_code == 422

    one = api.client.get(f"/commands/{t1['id']}")
    assert one.status_code == 200 and one.json() == t1
    events = api.client.get(f"/commands/{t1['id']}/events").json()
    assert [(e["state"], e["actor"], e["command_id"]) for e in events] == [("accepted", "api:ops", t1["id"])]
    assert events[0]["detail"] == {"params": {"amount_fen": 5000, "opening": False}}
    missing = api.client.get("/commands/nope")
    assert missing.status_code == 404 and missing.json() == {"detail": "no command nope"}
    assert api.client.get("/commands/nope/events").status_code == 404
    assert api.client.get("/nothing-here").status_code == 404
    assert api.client.get("/health").json() == {"status": "ok", "open_commands": 3}


def test_meter_registry_and_meter_state(api: Api):
    meters = api.client.get("/meters").json()
    assert [m["address"] for m in meters] == [A1, A2, A3, R1]
    assert meters[3] == {
        "address": R1,
        "bus": "bus1",
        "mode": "remote",
        "profile": "sgcc-2013",
        "power_hold": True,
        "residential": True,
    }
    fresh = api.client.get(f"/meters/{R1}").json()
    assert fresh["wallet_balance"] is None and fresh["last_topup"] is None and fresh["open_commands"] == []

    api.run(lambda: api.store.book(R1, 5025, "topup", "manual-1", datetime.now(UTC)))
    pending = api.post(topup(R1, "10.00")).json()
    detail = api.client.get("/meters/9").json()
    assert detail["mode"] == "remote" and detail["wallet_balance"] == "50.25"
    assert [c["id"] for c in detail["open_commands"]] == [pending["id"]]

    done = confirm(api, pending["id"], result={"balance_after": "60.25", "outcome": "booked"})
    detail = api.client.get(f"/meters/{R1}").json()
    assert detail["last_topup"]["id"] == done.id and detail["last_topup"]["state"] == "confirmed"
    assert detail["last_topup"]["result"] == {"balance_after": "60.25", "outcome": "booked"}
    assert detail["open_commands"] == []

    assert api.client.get(f"/meters/{UNMANAGED}").status_code == 404
    assert api.client.get("/meters/12X").status_code == 422


# --- audit ----------------------------------------------------------------------------------------------------

FRAMES = ["fefefefe68010000000000681c10", "68010000000000689c00"]


def confirm(api: Api, command_id: str, result: dict[str, Any], frames: list[str] | None = None) -> Command:
    """Execute a command by hand, as the service does: claim it, record sent, then confirmed."""

    async def run() -> Command:
        now = datetime.now(UTC)
        claimed = [c for c in await api.store.claim("gw-test", now, timedelta(minutes=1), 100) if c.id == command_id]
        (command,) = claimed
        command = await api.store.transition(command, "gw-test", State.SENT, now, detail={"step": "send"})
        return await api.store.transition(
            command, "gw-test", State.CONFIRMED, now, result=result, frames=frames, detail={"verified": True}
        )

    return api.run(run)


def test_audit_json_and_csv_say_who_what_when_frames_outcome(api: Api):
    before = datetime.now(UTC) - timedelta(seconds=1)
    cmd = api.post(topup(idempotency_key="audit-1")).json()
    other = api.post({"kind": "time_sync", "address": A2}, headers={"X-API-Key": AUDITOR_KEY}).json()
    confirm(api, cmd["id"], {"outcome": "applied", "purchase_count": 2}, FRAMES)

    rows = api.client.get("/audit").json()
    assert [(r["command_id"], r["state"]) for r in rows] == [
        (cmd["id"], "accepted"),
        (other["id"], "accepted"),
        (cmd["id"], "sent"),
        (cmd["id"], "confirmed"),
    ]
    accepted, _, sent, confirmed = rows
    assert accepted["requested_by"] == accepted["actor"] == "api:ops"
    assert confirmed["requested_by"] == "api:ops" and confirmed["actor"] == "gw-test"
    assert rows[1]["requested_by"] == "api:auditor" and rows[1]["kind"] == "time_sync"
    assert (accepted["kind"], accepted["address"], accepted["params"]) == (
        "topup",
        A1,
        {"amount_fen": 5000, "amount": "50.00", "opening": False},
    )
    assert accepted["outcome"] == confirmed["outcome"] == "confirmed"
    assert confirmed["result"] == {"outcome": "applied", "purchase_count": 2}
    assert confirmed["frames"] == FRAMES and sent["frames"] == []
    assert sent["detail"] == {"step": "send"}
    assert before <= datetime.fromisoformat(accepted["at"]) <= datetime.now(UTC)
    assert [r["event_id"] for r in rows] == sorted(r["event_id"] for r in rows)

    only = api.client.get("/audit", params={"command_id": other["id"]}).json()
    assert [r["command_id"] for r in only] == [other["id"]]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert api.client.get("/audit", params={"since": future}).json() == []
    assert len(api.client.get("/audit", params={"until": future, "since": before.isoformat()}).json()) == 4
    assert len(api.client.get("/audit", params={"limit": 2}).json()) == 2

    reply = api.client.get("/audit", params={"format": "csv"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/csv")
    assert reply.headers["content-disposition"].startswith('attachment; filename="meterlink-audit-')
    table = list(csv.DictReader(io.StringIO(reply.text)))
    assert list(table[0]) == [
        "event_id",
        "at",
        "command_id",
        "requested_by",
        "actor",
        "kind",
        "address",
        "params",
        "state",
        "outcome",
        "result",
        "detail",
        "frames",
    ]
    assert len(table) == 4
    last = table[3]
    assert (last["command_id"], last["state"], last["outcome"], last["actor"]) == (
        cmd["id"],
        "confirmed",
        "confirmed",
        "gw-test",
    )
    assert last["requested_by"] == "api:ops" and last["kind"] == "topup" and last["address"] == A1
    assert json.loads(last["params"]) == {"amount_fen": 5000, "amount": "50.00", "opening": False}
    assert json.loads(last["result"]) == {"outcome": "applied", "purchase_count": 2}
    assert json.loads(last["detail"]) == {"verified": True}
    assert last["frames"].split() == FRAMES
    assert datetime.fromisoformat(last["at"]) == datetime.fromisoformat(rows[3]["at"])


def test_an_energy_wallet_top_up_says_kwh(api: Api):
    api.service.meters[A3] = dataclasses.replace(api.service.meters[A3], wallet="energy")
    reply = api.post({"kind": "topup", "address": A3, "params": {"energy_kwh": "12.50"}})
    assert reply.status_code == 201, reply.text
    assert reply.json()["params"] == {"energy_hundredths": 1250, "energy_kwh": "12.50", "opening": False}
    for params in ({"amount": "5.00"}, {}, {"amount": "5.00", "energy_kwh": "1.00"}, {"energy_kwh": "1.234"}):
        assert api.post({"kind": "topup", "address": A3, "params": params}).status_code == 422, params
    assert api.post({"kind": "topup", "address": A1, "params": {"energy_kwh": "1.00"}}).status_code == 422
    assert len(api.commands()) == 1


def test_audit_by_meter_and_customer_and_in_pages(api: Api):
    """prepaid.md §5.3: reports by command and by customer; a long export comes in pages."""
    api.service.meters[A2].customer = "cust-42"
    one = api.post(topup(idempotency_key="p-1")).json()
    two = api.post(topup(A2, idempotency_key="p-2")).json()
    three = api.post(topup(A2, "7.00", idempotency_key="p-3")).json()
    by_meter = api.client.get("/audit", params={"address": A2}).json()
    assert [r["command_id"] for r in by_meter] == [two["id"], three["id"]]
    assert {r["address"] for r in by_meter} == {A2}
    by_customer = api.client.get("/audit", params={"customer": "cust-42"}).json()
    assert [r["command_id"] for r in by_customer] == [two["id"], three["id"]]
    assert api.client.get("/audit", params={"customer": "nobody"}).status_code == 422
    assert one["id"] not in {r["command_id"] for r in by_customer}

    first = api.client.get("/audit", params={"limit": 2})
    assert len(first.json()) == 2 and first.headers["x-next-after"] == str(first.json()[-1]["event_id"])
    rest = api.client.get("/audit", params={"limit": 2, "after_id": first.headers["x-next-after"]})
    assert [r["command_id"] for r in rest.json()] == [three["id"]] and "x-next-after" not in rest.headers
    csv_page = api.client.get("/audit", params={"limit": 1, "format": "csv"})
    assert csv_page.headers["x-next-after"]


def test_audit_bad_queries_are_422(api: Api):
    assert api.client.get("/audit", params={"since": "2030-01-01T00:00:00"}).status_code == 422  # no zone
    assert api.client.get("/audit", params={"format": "xml"}).status_code == 422
    reversed_window = {"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}
    assert api.client.get("/audit", params=reversed_window).status_code == 422


# --- end to end -------------------------------------------------------------------------------------------------


def test_topup_through_the_api_reaches_the_meter_once(tmp_path: Path):
    scenario = from_flags(2, 1, timing=False)
    fleet = Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)
    link = Link(SimLineTransport(fleet.buses["bus0"]), dataclasses.replace(FAST), name="bus0")
    meters = {a: MeterEntry(a, "bus0") for a in (A1, A2)}
    config = ServiceConfig(retry_delay=timedelta(milliseconds=50), poll_s=0.01)
    for api in open_api(tmp_path, meters=meters, links={"bus0": link}, config=config):
        api.run(link.start)
        try:
            api.run(api.service.start)
            before = fleet.state(A1)
            assert (before["remaining_money"], before["purchase_count"]) == ("100.00", 1)
            body = topup(A1, "50.00", idempotency_key="e2e-1")
            first = api.post(body)
            assert first.status_code == 201
            api.run(api.service.drain)

            done = api.client.get(f"/commands/{first.json()['id']}").json()
            assert done["state"] == "confirmed", done
            assert done["result"]["outcome"] == "applied"
            assert (done["result"]["amount"], done["result"]["balance_after"]) == ("50.00", "150.00")
            after = fleet.state(A1)
            assert (after["remaining_money"], after["purchase_count"]) == ("150.00", 2)

            replay = api.post(body)
            assert replay.status_code == 200 and replay.json() == done
            api.run(api.service.drain)
            assert fleet.state(A1)["remaining_money"] == "150.00"  # once
            assert fleet.state(A2)["remaining_money"] == "100.00"  # nobody else
            assert len(api.commands()) == 1

            meter = api.client.get(f"/meters/{A1}").json()
            assert meter["last_topup"]["id"] == done["id"] and meter["open_commands"] == []
            rows = api.client.get("/audit", params={"command_id": done["id"]}).json()
            assert [r["state"] for r in rows] == ["accepted", "sent", "confirmed"]
            assert rows[-1]["frames"] and all(bytes.fromhex(f) for f in rows[-1]["frames"])
            assert rows[1]["detail"]["purchase_count"] == 2  # recorded before the recharge left
            assert api.client.get("/health").json() == {"status": "ok", "open_commands": 0}
        finally:
            api.run(api.service.stop)
            api.run(link.stop)
