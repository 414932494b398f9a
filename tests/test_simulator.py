"""The fleet simulator as a whole: scenarios, the admin interface, determinism, TCP/MQTT, the CLI.

* Scenario files (TOML) and ``from_flags``: what they build, and ``ScenarioError`` messages
  that say where a mistake is.
* The admin HTTP/JSON interface with FastAPI's ``TestClient``: ground truth, load and time
  controls with exact kWh and yuan, faults, the relay button, 404 and 422.
* Determinism: the same scenario and seed give the same fleet after the same advances.
* The issue's "done when", in-process: 100 meters on TCP; a master of our own reads energy and
  balance, tops a meter up through the real 0x03 flow (identity authentication, recharge with
  MasterStation MACs), trips it with an encrypted 0x1C and closes it again, and the admin view
  follows. The ``dlt645`` 3.2.0 client reads the same energy over TCP.
* The real ``meterlink sim`` process, and the MQTT bridge against the real Mosquitto.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from protocols.dlt645 import (
    METER_TZ,
    Deframer,
    EncryptedRelayControlRequest,
    Frame,
    Password,
    RelayCommand,
    RelayControlReply,
    SecurityErrorReply,
    build_frame,
    decode_read_reply,
    encode_read_request,
    parse_payload,
)
from protocols.dlt645.security import IdentityAuthReply, SecurityDI, SecurityReply, SecurityRequest
from protocols.esam import MasterStation
from simulator.admin import create_app
from simulator.bus import LineTiming
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import Fleet
from simulator.scenario import Scenario, ScenarioError, build, from_flags, load
from simulator.transports.tcp import serve_tcp

T0 = datetime(2026, 3, 10, 9, 0, tzinfo=METER_TZ)  # a Tuesday, 09:00: one TOU period until 11:00
ENERGY = 0x00010000  # forward active energy, total (kWh, 2 decimals)
MONEY = 0x00900200  # remaining money (yuan, 2 decimals)
OPERATOR = "00000001"
TIMEOUT = 5.0


def addr(n: int) -> str:
    return f"{n:012d}"


def fleet_of(scenario: Scenario) -> Fleet:
    return Fleet(scenario.buses, VirtualClock(scenario.start, scenario.speed), scenario.seed)


def stepped(meters: int, buses: int = 1, **kw: Any) -> Fleet:
    """A fleet on a stepped clock (speed 0) from T0, line timing off."""
    return fleet_of(from_flags(meters, buses, timing=False, start=T0, speed=0, **kw))


def money(text: str) -> Decimal:
    """A yuan or kWh decimal string with exactly two places."""
    value = Decimal(text)
    assert value.as_tuple().exponent == -2, text
    return value


# --- scenarios -------------------------------------------------------------------------------------

SCENARIO = """
[fleet]
seed = 7
start = "2026-03-10T09:00:00+08:00"
speed = 0

[defaults]
balance = "50.00"
load = "constant"
watts = 400
mode_mix = { local = 1, remote = 1 }
limits = { alarm_1 = "30.00", alarm_2 = "15.00" }

[[bus]]
name = "north"
meters = 4
baud = 9600
timing = false

[[bus]]
name = "south"
addresses = ["000000000101", "102"]
td_ms = [30, 40]
faults = [{ kind = "no_reply", remaining = 2 }]

[[meter]]
address = "000000000002"
mode = "remote"
faults = [{ kind = "bad_checksum", probability = 0.5 }]

[[meter]]
address = "102"
mode = "local"
balance = "3.00"
profile = "fw-b"
load = "residential"
purchase_count = 7
customer = "123456789012"
"""


def test_scenario_file_defaults_buses_overrides_and_faults(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(SCENARIO, encoding="utf-8")
    sc = load(path)
    assert (sc.seed, sc.start, sc.speed, sc.meter_count) == (7, T0, 0.0, 6)
    north, south = sc.buses
    assert north.name == "north" and [m.address for m in north.meters] == [addr(n) for n in (1, 2, 3, 4)]
    assert south.name == "south" and [m.address for m in south.meters] == [addr(101), addr(102)]
    assert north.timing == LineTiming(baud=9600, td_min_ms=20, td_max_ms=500, enabled=False)
    assert south.timing == LineTiming(baud=2400, td_min_ms=30, td_max_ms=40, enabled=True)
    assert north.faults == [] and south.faults == [FaultSpec(Fault.NO_REPLY, remaining=2)]

    specs = {m.address: m for b in sc.buses for m in b.meters}
    for spec in specs.values():  # the defaults reach every meter
        assert spec.watts == 400 and (spec.limits.alarm_1, spec.limits.alarm_2) == (3000, 1500)
    m2, m102 = specs[addr(2)], specs[addr(102)]
    assert (m2.mode.value, m2.load) == ("remote", "constant")
    assert m2.faults == [FaultSpec(Fault.BAD_CHECKSUM, probability=0.5)]
    assert (m102.mode.value, m102.profile, m102.load, m102.balance) == (
        "local",
        "fw-b",
        "residential",
        Decimal("3.00"),
    )
    assert (m102.purchase_count, m102.customer) == (7, "123456789012")
    assert all(specs[addr(n)].balance == Decimal("50.00") and specs[addr(n)].faults == [] for n in (1, 3, 4, 101))

    fleet = fleet_of(sc)  # and the fleet is what the file says
    assert set(fleet.buses) == {"north", "south"} and len(fleet.meters) == 6
    state = fleet.state(addr(2))
    assert (state["bus"], state["mode"], state["faults"]) == ("north", "remote", ["bad_checksum"])
    assert fleet.state(addr(102))["purchase_count"] == 7 and fleet.meter(addr(102)).profile.name == "fw-b"
    assert fleet.state(addr(1))["remaining_money"] == "50.00"
    assert fleet.buses["south"].faults.get(Fault.NO_REPLY) == FaultSpec(Fault.NO_REPLY, remaining=2)
    assert fleet.now() == T0


def test_mode_mix_is_seeded_and_an_explicit_mode_wins() -> None:
    def doc(seed: int) -> dict[str, Any]:
        return {
            "fleet": {"seed": seed},
            "defaults": {"mode_mix": {"local": 0.8, "remote": 0.2}},
            "bus": [{"meters": 200}],
            "meter": [{"address": "7", "mode": "local"}, {"address": "8", "mode": "remote"}],
        }

    def modes(seed: int) -> list[str]:
        return [m.mode.value for m in build(doc(seed)).buses[0].meters]

    first = modes(3)
    assert first == modes(3)  # seeded
    assert first != modes(4)
    assert 15 <= first.count("remote") <= 70  # about a fifth of 200
    assert (first[6], first[7]) == ("local", "remote")
    only_local = build({"defaults": {"mode_mix": {"local": 1}}, "bus": [{"meters": 30}]})
    assert {m.mode.value for m in only_local.buses[0].meters} == {"local"}


def test_timing_flag_overrides_the_file() -> None:
    doc = {"bus": [{"meters": 1, "timing": True}, {"meters": 1}]}
    assert [b.timing.enabled for b in build(doc).buses] == [True, True]
    assert [b.timing.enabled for b in build(doc, timing=False).buses] == [False, False]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[fleet]\nsede = 1", "fleet: unknown setting(s) sede"),
        ("[fleets]\nseed = 1", "scenario: unknown section(s) fleets"),
        ("[defaults]\nbalanse = '1.00'", "defaults: unknown setting(s) balanse"),
        ("[[bus]]\nmeter = 3", "bus[0]: unknown setting(s) meter"),
        ("[[bus]]\nmeters = 1\n[[meter]]\naddress = '1'\ncolour = 'red'", "meter[0]: unknown setting(s) colour"),
        ("[defaults]\nbalance = 'lots'", "meter 000000000001.balance: 'lots' is not a decimal amount"),
        ("[defaults]\nbalance = 1.005", "meter 000000000001.balance: 1.005 needs at most 2 decimals"),
        ("[defaults]\nlimits = { alarm_1 = 'x' }", "meter 000000000001.limits.alarm_1: 'x' is not a decimal"),
        ("[defaults]\nlimits = { alarm_3 = '1.00' }", "meter 000000000001.limits: unknown limit(s) alarm_3"),
        ("[fleet]\nstart = '2026-03-10T09:00:00'", "fleet.start needs a timezone"),
        ("[fleet]\nstart = 2026-03-10T09:00:00", "fleet.start needs a timezone"),
        ("[fleet]\nstart = 'tomorrow'", "fleet.start: 'tomorrow' is not ISO 8601"),
        ("[fleet]\nspeed = -1", "fleet.speed: -1 must be >= 0"),
        ("[fleet]\nseed = 'x'", "fleet.seed: 'x' is not an integer"),
        ("[[bus]]\nmeters = -1", "bus[0].meters: -1 must be >= 0"),
        ("[[bus]]\nmeters = 'two'", "bus[0].meters: 'two' is not an integer"),
        ("[[bus]]\nmeters = 1\nbaud = 2401", "bus[0].baud: 2401 is not one of"),
        ("[[bus]]\nmeters = 1\ntiming = 'no'", "bus[0].timing: 'no' is not true or false"),
        ("[[bus]]\nmeters = 1\ntd_ms = [500, 20]", "bus[0].td_ms: need 0 <= min <= max"),
        ("[[bus]]\nmeters = 1\n[[bus]]\naddresses = ['1']", "bus[1]: meter 000000000001 is already on bus bus0"),
        ("[[bus]]\nname = 'a'\nmeters = 1\n[[bus]]\nname = 'a'\nmeters = 1", "bus[1].name: bus 'a' is defined twice"),
        ("[[bus]]\naddresses = ['12345x']", "bus[0].addresses[0]: address '12345x'"),
        ("[[bus]]\naddresses = ['AAAAAAAAAAAA']", "bus[0].addresses[0]: AAAAAAAAAAAA is not a meter address"),
        ("[[bus]]\nmeters = 1\n[[meter]]\nbalance = '1.00'", "meter[0]: needs an address"),
        ("[[bus]]\nmeters = 1\n[[meter]]\naddress = '9'", "meter[0]: meter 000000000009 is on no bus"),
        ("[defaults]\nmode = 'prepaid'", "meter 000000000001.mode: 'prepaid' is not one of local, remote"),
        # Remote cost control keeps no wallet (prepaid.md §1.1): a balance or count given for a remote meter.
        (
            "[defaults]\nmode = 'remote'\nbalance = '5.00'",
            "defaults.balance: meter 000000000001 is a remote cost-control meter, which keeps no wallet",
        ),
        (
            "[[bus]]\nmeters = 1\n[[meter]]\naddress = '1'\nmode = 'remote'\npurchase_count = 1",
            "meter 000000000001.purchase_count: meter 000000000001 is a remote cost-control meter",
        ),
        (
            "[defaults]\nmode = 'remote'\n[[bus]]\nmeters = 1\n[[meter]]\naddress = '1'\nbalance = '5.00'",
            "meter 000000000001.balance: meter 000000000001 is a remote cost-control meter",
        ),
        ("[defaults]\nmode_mix = { local = 'x' }", "meter 000000000001.mode_mix.local: 'x' is not a number"),
        ("[defaults]\nmode_mix = { cheap = 1 }", "meter 000000000001.mode_mix: unknown mode(s) cheap"),
        ("[defaults]\nprofile = 'acme'", "meter 000000000001.profile: 'acme' is not one of"),
        ("[defaults]\nload = 'nuclear'", "meter 000000000001.load: 'nuclear' is not one of"),
        ("[defaults]\npurchase_count = 'x'", "meter 000000000001.purchase_count: 'x' is not an integer"),
        ("[defaults]\ncustomer = '12'", "meter 000000000001.customer: '12' is not a 12-digit customer number"),
        ("[defaults]\nfaults = [{ kind = 'meteor' }]", "meter 000000000001.faults[0]: kind must be one of"),
        ("[defaults]\nfaults = ['no_reply']", "meter 000000000001.faults[0]: expected a table"),
        ("[defaults]\nfaults = [{ kind = 'no_reply', remainig = 1 }]", "faults[0]: unknown setting(s) remainig"),
        ("[defaults]\nfaults = [{ kind = 'no_reply', remaining = 0 }]", "faults[0].remaining: 0 must be >= 1"),
        ("[[bus]]\nmeters = 1\nfaults = [{ kind = 'no_reply', probability = 2.0 }]", "bus[0].faults[0].probability"),
        ("bus = 3", "bus: expected an array of tables"),
        (
            "[[bus]]\nmeters = 1\ntd_ms = { distribution = 'fixed', min = 20, max = 500, fixed = 900 }",
            "bus[0].td_ms.fixed: 900.0 is outside min..max",
        ),
        (
            "[defaults]\ntariff = { steps = { thresholds = ['2400'], increments = ['0', '0.05'] } }",
            "thresholds need settlement_dates",
        ),
    ],
)
def test_scenario_errors_name_the_place(text: str, where: str) -> None:
    with pytest.raises(ScenarioError) as err:
        build(tomllib.loads(text))
    assert where in str(err.value)


def test_scenario_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"cannot read scenario .*missing\.toml"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet\nseed = 1\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"bad\.toml"):
        load(bad)


def test_from_flags_spreads_addresses_over_buses() -> None:
    sc = from_flags(100, 3)
    assert [b.name for b in sc.buses] == ["bus0", "bus1", "bus2"]
    assert [len(b.meters) for b in sc.buses] == [34, 33, 33]
    addresses = [m.address for b in sc.buses for m in b.meters]
    assert addresses == [addr(n) for n in range(1, 101)]
    assert sc.buses[1].meters[0].address == "000000000035" and sc.buses[2].meters[-1].address == "000000000100"
    assert sc.start is not None and sc.start.tzinfo is not None
    assert all(b.timing.enabled for b in sc.buses)
    with pytest.raises(ScenarioError):
        from_flags(0, 1)
    with pytest.raises(ScenarioError):
        from_flags(2, 3)


# --- admin interface -------------------------------------------------------------------------------


@pytest.fixture
def admin() -> tuple[Fleet, TestClient]:
    doc = {
        "fleet": {"seed": 5, "start": T0.isoformat(), "speed": 0},
        "defaults": {"load": "constant", "watts": 0},
        "bus": [{"meters": 3, "timing": False}],
        "meter": [{"address": "3", "balance": "10.10"}],
    }
    fleet = fleet_of(build(doc))
    return fleet, TestClient(create_app(fleet))


def test_admin_get_meter(admin: tuple[Fleet, TestClient]) -> None:
    _, client = admin
    r = client.get("/meters/000000000001")
    assert r.status_code == 200
    body = r.json()
    assert body["address"] == "000000000001" and body["bus"] == "bus0" and body["mode"] == "local"
    assert money(body["remaining_money"]) == Decimal("100.00") and money(body["overdraft"]) == 0
    assert body["purchase_count"] == 1 and body["relay"] == "closed"
    assert money(body["energy_kwh"]) == 0
    assert client.get("/meters/1").json()["address"] == "000000000001"  # short form accepted
    assert client.get("/meters").json()[:2] == [
        {"address": addr(1), "bus": "bus0"},
        {"address": addr(2), "bus": "bus0"},
    ]
    assert client.get("/summary").json()["meters"] == 3
    assert client.get("/time").json() == {"time": T0.isoformat(), "speed": 0.0}


def test_admin_unknown_meter_is_404_and_bad_bodies_are_422(admin: tuple[Fleet, TestClient]) -> None:
    _, client = admin
    assert client.get("/meters/000000000999").status_code == 404
    assert client.get("/meters/not-an-address").status_code == 404
    assert client.put("/meters/000000000999/load", json={"watts": 5}).status_code == 404
    assert client.post("/meters/000000000999/button").status_code == 404
    assert client.put("/meters/000000000001/load", json={"watts": "lots"}).status_code == 422
    assert client.put("/meters/000000000001/load", json={}).status_code == 422
    assert client.post("/time/advance", json={"seconds": -5}).status_code == 422
    assert (
        client.post("/time/advance", content=b"{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    assert client.post("/meters/000000000001/faults", json={"kind": "meteor"}).status_code == 422
    assert client.post("/meters/000000000001/faults", json={"kind": "no_reply", "remaining": 0}).status_code == 422
    assert client.put("/time/speed", json={"speed": -1}).status_code == 422


def test_admin_load_and_time_move_energy_and_money_exactly(admin: tuple[Fleet, TestClient]) -> None:
    fleet, client = admin
    a = addr(1)
    tariff = fleet.meter(a).meter.tariff
    price = tariff.price_at(T0)  # 1e-4 yuan/kWh; one TOU period 09:00-11:00, first step
    assert price == tariff.price_at(T0 + timedelta(hours=1, minutes=30))
    before = client.put(f"/meters/{a}/load", json={"watts": 1000}).json()
    assert before["power_w"] == 1000
    assert client.post("/time/advance", json={"seconds": 3600}).json()["time"] == (T0 + timedelta(hours=1)).isoformat()
    after = client.get(f"/meters/{a}").json()
    assert money(after["energy_kwh"]) - money(before["energy_kwh"]) == Decimal("1.00")
    assert money(before["remaining_money"]) - money(after["remaining_money"]) == Decimal(price).scaleb(-4) * 1
    client.put(f"/meters/{a}/load", json={"watts": 2000})
    client.post("/time/advance", json={"seconds": 1800})
    later = client.get(f"/meters/{a}").json()
    assert money(later["energy_kwh"]) == money(after["energy_kwh"]) + Decimal("1.00")
    assert money(later["remaining_money"]) == money(after["remaining_money"]) - Decimal(price).scaleb(-4)
    assert client.get(f"/meters/{addr(2)}").json()["energy_kwh"] == "0.00"  # 0 W: untouched
    back = client.put(f"/meters/{a}/load", json={"watts": None}).json()
    assert back["power_w"] == 0  # back to the profile (constant 0 W here)


def test_admin_button_closes_a_close_allowed_relay(admin: tuple[Fleet, TestClient]) -> None:
    _, client = admin
    a = addr(3)  # 10.10 yuan: below alarm 1 (20.00), above alarm 2 (10.00)
    assert client.post(f"/meters/{a}/button").json()["closed"] is False  # closed already: nothing to do
    client.put(f"/meters/{a}/load", json={"watts": 1000})
    client.post("/time/advance", json={"seconds": 3600})  # 0.50 yuan: crosses alarm 2, pre-trip
    tripped = client.get(f"/meters/{a}").json()
    assert tripped["relay"] == "close_allowed" and tripped["power_w"] == 0
    client.post("/time/advance", json={"seconds": 3600})
    assert client.get(f"/meters/{a}").json()["energy_kwh"] == tripped["energy_kwh"]  # no supply, no energy
    pressed = client.post(f"/meters/{a}/button").json()
    assert pressed["closed"] is True and pressed["relay"] == "closed" and pressed["power_w"] == 1000


async def test_admin_faults_reach_the_line(admin: tuple[Fleet, TestClient]) -> None:
    fleet, client = admin
    a = addr(1)
    bus = fleet.buses["bus0"]
    request = Frame(a, 0x11, ENERGY.to_bytes(4, "little"))

    def replies(chunks: list[Any]) -> list[Frame]:
        d = Deframer()
        return [f for c in chunks for f in d.feed(c.data)] + d.flush()

    state = client.post(f"/meters/{a}/faults", json={"kind": "no_reply", "remaining": 1}).json()
    assert state["faults"] == ["no_reply"]
    assert await bus.transact(request) == []  # fired once
    assert len(replies(await bus.transact(request))) == 1
    assert client.get(f"/meters/{a}").json()["faults"] == []

    assert client.post(f"/meters/{a}/faults", json={"kind": "relay_malfunction"}).json()["faults"] == [
        "relay_malfunction"
    ]
    assert fleet.meter(a).meter.relay.malfunction
    assert client.delete(f"/meters/{a}/faults", params={"kind": "relay_malfunction"}).json()["faults"] == []
    assert not fleet.meter(a).meter.relay.malfunction

    r = client.post("/buses/bus0/faults", json={"kind": "bad_checksum"})
    assert r.json() == {"bus": "bus0", "faults": ["bad_checksum"]}
    chunks = await bus.transact(request)
    assert chunks and replies(chunks) == []  # bytes on the line, but no valid frame
    assert client.delete("/buses/bus0/faults").json() == {"bus": "bus0", "faults": []}
    assert len(replies(await bus.transact(request))) == 1
    assert client.post("/buses/nope/faults", json={"kind": "no_reply"}).status_code == 404
    assert client.delete("/buses/nope/faults").status_code == 404
    assert client.delete(f"/meters/{addr(999)}/faults").status_code == 404


# --- determinism -----------------------------------------------------------------------------------

MIXED = {
    "fleet": {"seed": 11, "start": "2026-07-03T22:10:00+08:00", "speed": 0},
    "defaults": {"mode_mix": {"local": 0.7, "remote": 0.3}, "balance": "30.00"},
    "bus": [
        {"name": "a", "meters": 8, "timing": False},
        {"name": "b", "meters": 4, "timing": False},
    ],
    "meter": [
        {"address": "2", "load": "commercial"},
        {"address": "3", "load": "pv"},
        {"address": "9", "load": "commercial", "balance": "2.00"},
        {"address": "12", "clock_offset_s": 90.0, "drift_ppm": 40.0},
    ],
}


def run(doc: dict[str, Any]) -> list[dict[str, dict[str, Any]]]:
    fleet = fleet_of(build(doc))
    states = []
    for step in (timedelta(hours=5), timedelta(days=1, minutes=37), timedelta(seconds=1), timedelta(days=9)):
        fleet.advance(step)
        states.append({a: fleet.state(a) for a in fleet.meters})
    return states


def test_same_scenario_and_seed_give_identical_fleets() -> None:
    first, second = run(MIXED), run(MIXED)
    assert first == second
    assert first[-1][addr(1)]["energy_kwh"] != "0.00"
    other = run({**MIXED, "fleet": {**MIXED["fleet"], "seed": 12}})
    assert [s[addr(1)]["energy_kwh"] for s in other] != [s[addr(1)]["energy_kwh"] for s in first]


# --- the issue's "done when", in-process over TCP --------------------------------------------------


class Master:
    """A master station of our own on one TCP connection: one request, one reply frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.deframer = Deframer()

    @classmethod
    async def connect(cls, port: int) -> Master:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def exchange(self, raw: bytes) -> Frame:
        self.writer.write(raw)
        await self.writer.drain()
        while True:
            data = await asyncio.wait_for(self.reader.read(4096), TIMEOUT)
            assert data, "the simulator closed the connection"
            frames = self.deframer.feed(data)
            if frames:
                assert len(frames) == 1
                return frames[0]

    async def read(self, address: str, di: int) -> Decimal:
        frame = await self.exchange(encode_read_request(address, di))
        got_address, item, value = decode_read_reply(frame.encode(0))
        assert got_address == address and item.di == di
        return value

    async def send(self, address: str, payload: Any) -> Any:
        return parse_payload(await self.exchange(build_frame(address, payload).encode()))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_done_when_read_top_up_trip_and_close_over_tcp() -> None:
    fleet = stepped(100)
    assert len(fleet.meters) == 100
    http = TestClient(create_app(fleet))
    http.post("/time/advance", json={"seconds": 6 * 3600})  # some consumption, different per meter
    async with await serve_tcp(fleet.buses["bus0"], "127.0.0.1", 0) as endpoint:
        master = await Master.connect(endpoint.port)
        try:
            for n in (1, 42, 77, 100):
                truth = http.get(f"/meters/{addr(n)}").json()
                assert await master.read(addr(n), ENERGY) == money(truth["energy_kwh"]) > 0
                assert await master.read(addr(n), MONEY) == money(truth["remaining_money"]) < 100

            # Top-up through the real 0x03 flow: identity authentication, then recharge.
            a = addr(42)
            before = http.get(f"/meters/{a}").json()
            counter = itertools.count(1)
            station = MasterStation(random=lambda n: next(counter).to_bytes(n, "big"))
            auth, pending = station.start_auth(a)
            reply = await master.send(a, SecurityRequest(SecurityDI.IDENTITY_AUTHENTICATION, OPERATOR, auth))
            assert isinstance(reply, SecurityReply) and isinstance(reply.body, IdentityAuthReply)
            session = station.finish_auth(pending, reply.body)
            count = before["purchase_count"] + 1
            body = session.recharge(5_000, count, before["customer"])
            reply = await master.send(a, SecurityRequest(SecurityDI.RECHARGE, OPERATOR, body))
            assert isinstance(reply, SecurityReply) and reply.di == SecurityDI.RECHARGE
            expected = money(before["remaining_money"]) + Decimal("50.00")
            assert await master.read(a, MONEY) == expected
            after = http.get(f"/meters/{a}").json()
            assert money(after["remaining_money"]) == expected and after["purchase_count"] == count
            replayed = await master.send(a, SecurityRequest(SecurityDI.RECHARGE, OPERATOR, body))
            assert isinstance(replayed, SecurityErrorReply)  # the same purchase count again: refused
            assert http.get(f"/meters/{a}").json()["remaining_money"] == after["remaining_money"]

            # Encrypted 0x1C (level 98): trip, then direct close.
            valid_until = fleet.now().astimezone(METER_TZ).replace(microsecond=0) + timedelta(hours=1)
            password = Password(0x98, "000000")
            trip = session.control_block(RelayCommand.TRIP, 0, valid_until)
            reply = await master.send(a, EncryptedRelayControlRequest(password, OPERATOR, trip))
            assert isinstance(reply, RelayControlReply)
            assert http.get(f"/meters/{a}").json()["relay"] == "open"
            close = session.control_block(RelayCommand.DIRECT_CLOSE, 0, valid_until)
            reply = await master.send(a, EncryptedRelayControlRequest(password, OPERATOR, close))
            assert isinstance(reply, RelayControlReply)
            assert http.get(f"/meters/{a}").json()["relay"] == "closed"
            assert http.get(f"/meters/{addr(41)}").json()["relay"] == "closed"  # nobody else moved
        finally:
            await master.close()
    stats = fleet.buses["bus0"].stats
    assert stats.unanswered == 0 and stats.firmware_errors == 0 and stats.collisions == 0


async def test_dlt645_client_reads_energy_from_a_simulated_meter() -> None:
    dlt645 = pytest.importorskip("dlt645")
    dlt645.disable_logging()
    fleet = stepped(20)
    fleet.advance(timedelta(hours=9))
    a = addr(17)
    truth = fleet.state(a)["energy_kwh"]
    assert money(truth) > 0

    def their_read(port: int) -> Any:
        cli = dlt645.MeterClientService.new_tcp_client("127.0.0.1", port, 3.0)
        cli.set_address(bytes.fromhex(a)[::-1].hex())  # dlt645 sends the address as written
        try:
            return cli.read_00(ENERGY)
        finally:
            cli.client.disconnect()

    async with await serve_tcp(fleet.buses["bus0"], "127.0.0.1", 0) as endpoint:
        item = await asyncio.to_thread(their_read, endpoint.port)
    assert item is not None
    assert Decimal(str(item.value)).quantize(Decimal("0.01")) == Decimal(truth)


# --- MQTT (the real Mosquitto) ---------------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not _listening(1883), reason="no MQTT broker on 127.0.0.1:1883 (CI starts Mosquitto)")
async def test_mqtt_bridge_answers_a_read() -> None:
    import aiomqtt

    from simulator.transports.mqtt import start_mqtt_bridge

    fleet = stepped(5)
    fleet.advance(timedelta(hours=2))
    prefix = f"meterlink-test/sim-{uuid.uuid4().hex}"
    a = addr(4)
    bridge = await start_mqtt_bridge(fleet.buses, "mqtt://127.0.0.1:1883", None, prefix)
    try:
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"test-{uuid.uuid4().hex[:8]}") as master:
            await master.subscribe(f"{prefix}/bus0/up", qos=1)
            await master.publish(f"{prefix}/bus0/down", encode_read_request(a, MONEY), qos=1)

            async def first() -> bytes:
                async for message in master.messages:
                    return bytes(message.payload)
                raise AssertionError("no message")

            payload = await asyncio.wait_for(first(), TIMEOUT)
    finally:
        await bridge.aclose()
    address, item, value = decode_read_reply(payload)
    assert (address, item.di) == (a, MONEY)
    assert value == Decimal(fleet.state(a)["remaining_money"])


# --- the real CLI ----------------------------------------------------------------------------------

METERLINK = Path(sys.executable).with_name("meterlink")
needs_cli = pytest.mark.skipif(not METERLINK.exists(), reason="the meterlink script is not installed in this venv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [str(METERLINK), "sim", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def _lines(stream: Any) -> queue.Queue[str | None]:
    """Lines of a pipe as they come (None at its end), read by a daemon thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_over_tcp(port: int, address: str, di: int) -> Decimal:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(encode_read_request(address, di))
        d = Deframer()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            frames = d.feed(s.recv(4096))
            if frames:
                return decode_read_reply(frames[0].encode(0))[2]
    raise AssertionError("no reply")


@needs_cli
def test_cli_serves_tcp_and_admin_and_stops_cleanly_on_sigint() -> None:
    port = _free_port()
    args = ["--meters", "100", "--tcp", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"]
    proc = _cli(*args, "--no-timing", "--summary-every", "0", "--speed", "0")
    try:
        out = _lines(proc.stdout)
        seen: list[str] = []
        admin_url = None
        deadline = time.monotonic() + 20
        while admin_url is None:
            try:
                line = out.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no endpoints printed in time: {seen}") from None
            assert line is not None, f"meterlink sim ended early: {seen} {proc.stderr.read()}"
            seen.append(line)
            if line.strip().startswith("admin: "):
                admin_url = line.split("admin: ", 1)[1].strip().replace("{address}", "")
        assert seen[0].startswith("meterlink sim: 100 meters on 1 bus")
        assert any(f"tcp://127.0.0.1:{port}" in line for line in seen)
        assert ":0/" not in admin_url  # the real port, not the 0 asked for

        energy = _read_over_tcp(port, addr(100), ENERGY)
        balance = _read_over_tcp(port, addr(100), MONEY)
        with urllib.request.urlopen(admin_url + addr(100), timeout=TIMEOUT) as r:
            truth = json.load(r)
        assert truth["address"] == addr(100)
        assert (energy, balance) == (Decimal(truth["energy_kwh"]), Decimal(truth["remaining_money"]))

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        rest = []
        while (line := out.get(timeout=TIMEOUT)) is not None:
            rest.append(line)
        assert rest[-1].strip() == "meterlink sim: stopped"
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_cli
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give a scenario file or --meters N"),
        (["--meters", "5"], "choose at least one transport"),
        (["/nonexistent/fleet.toml", "--tcp", "127.0.0.1:0"], "cannot read scenario /nonexistent/fleet.toml"),
        (["--meters", "5", "--tcp", "nowhere"], "'nowhere' is not HOST:PORT"),
        (["--meters", "5", "--tcp", "127.0.0.1:99999"], "is not HOST:PORT"),
        (["BAD", "--tcp", "127.0.0.1:0"], "fleet: unknown setting(s) sede"),
    ],
)
def test_cli_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    if args and args[0] == "BAD":
        bad = tmp_path / "bad.toml"
        bad.write_text("[fleet]\nsede = 3\n", encoding="utf-8")
        args = [str(bad), *args[1:]]
    proc = _cli(*args)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in stderr and "Traceback" not in stdout
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], stderr


def test_the_rollover_fault_takes_its_parameters_from_the_admin_interface_and_scenarios(
    admin: tuple[Fleet, TestClient],
) -> None:
    fleet, client = admin
    a = addr(1)
    reply = client.post(
        f"/meters/{a}/faults", json={"kind": "rollover", "headroom_hundredths": 5, "registers": ["forward", "reverse"]}
    )
    assert reply.status_code == 200, reply.text
    meter = fleet.meter(a).meter
    assert meter.forward[0] == meter.reverse[0] == 99_999_999 - 5  # 0.01 kWh below 999999.99, five times
    assert sum(meter.forward[1:5]) == meter.forward[0] and sum(meter.reverse[1:5]) == meter.reverse[0]
    bad = client.post(f"/meters/{a}/faults", json={"kind": "rollover", "registers": ["sideways"]})
    assert bad.status_code == 422 and "sideways" in bad.text
    text = '[[bus]]\nmeters = 1\nfaults = [{kind = "rollover", headroom_hundredths = 3, registers = ["reactive"]}]\n'
    [spec] = build(tomllib.loads(text)).buses[0].faults
    assert (spec.headroom_hundredths, spec.registers) == (3, ("reactive",))
    with pytest.raises(ScenarioError, match="registers"):
        build(tomllib.loads(text.replace('"reactive"', '"sideways"')))


# --- from_flags: addresses, tariffs and faults (meterlink sim --first-address, --price(s), --fault) ----------


def test_from_flags_numbers_the_meters_from_the_first_address() -> None:
    sc = from_flags(5, 2, first_address="000000001001")
    assert [[m.address for m in b.meters] for b in sc.buses] == [
        [addr(n) for n in (1001, 1002, 1003)],
        [addr(1004), addr(1005)],
    ]
    assert [m.address for b in from_flags(3).buses for m in b.meters] == [addr(1), addr(2), addr(3)]  # the default
    assert [m.address for b in from_flags(2, first_address="7").buses for m in b.meters] == [addr(7), addr(8)]
    # two simulators on disjoint ranges
    low = {m.address for b in from_flags(100).buses for m in b.meters}
    high = {m.address for b in from_flags(100, first_address=addr(101)).buses for m in b.meters}
    assert not low & high and len(low | high) == 200
    assert [m.address for m in from_flags(1, first_address="999999999998").buses[0].meters] == ["999999999998"]
    for meters, first, message in [
        (1, "12345678901234", r"^first_address: .*12 digits"),
        (1, "999999999999", r"^first_address: .*broadcast"),
        (1, "AAAAAAAAAAAA", r"^first_address: .*wildcard"),
        (3, "999999999997", r"^first_address: 3 meters from 999999999997 would end at 999999999999, past 999999999998"),
    ]:
        with pytest.raises(ScenarioError, match=message):
            from_flags(meters, first_address=first)


def test_from_flags_tariff_is_the_scenario_tariff_table() -> None:
    from firmware_stubs.tariff import DEFAULT_TOU, PriceSet

    prices = ["0.8000", "0.6000", "0.5000", "0.3000"]
    fleet = stepped(3, tariff={"prices": prices})
    for sim in fleet.meters.values():
        assert sim.meter.tariff.prices == sim.meter.tariff.backup_prices == PriceSet((8000, 6000, 5000, 3000))
        assert sim.meter.tariff.tou == DEFAULT_TOU  # time of use on the default schedule
    # the same as the [defaults] tariff of a scenario file
    doc = {"defaults": {"tariff": {"prices": prices}}, "bus": [{"meters": 3}]}
    assert [m.tariff for m in build(doc).buses[0].meters] == [
        m.tariff for m in from_flags(3, tariff={"prices": prices}).buses[0].meters
    ]
    # a flat price: every TOU tariff costs the same, exactly (Decimal from the string)
    flat = stepped(1, tariff={"prices": ["0.6123"] * 4}, load_kind="constant")
    assert flat.meter(addr(1)).meter.tariff.prices == PriceSet((6123,) * 4)
    with pytest.raises(ScenarioError, match=r"^tariff\.prices: price of T1 = 0\.12345 .*4 decimals"):
        from_flags(1, tariff={"prices": ["0.12345"] * 4})
    with pytest.raises(ScenarioError, match=r"^tariff\.prices: a price set holds 4\.\.12 prices"):
        from_flags(1, tariff={"prices": ["0.5", "0.5", "0.5"]})
    with pytest.raises(ScenarioError, match=r"^tariff\.prices\[1\]: 'x' is not a decimal number"):
        from_flags(1, tariff={"prices": ["0.5", "x", "0.5", "0.5"]})


def test_from_flags_faults_are_scenario_faults_on_every_meter() -> None:
    from simulator.scenario import fault_table

    assert fault_table("no_reply") == {"kind": "no_reply"}
    assert fault_table("bad_checksum:probability=0.2, function=0x01") == {
        "kind": "bad_checksum",
        "probability": 0.2,
        "function": 1,
    }
    assert fault_table("rollover:headroom_hundredths=5,registers=forward+reverse") == {
        "kind": "rollover",
        "headroom_hundredths": 5,
        "registers": ["forward", "reverse"],
    }
    flags = ["no_reply:remaining=3", "late_reply:delay_ms=800"]
    sc = from_flags(4, 2, faults=[fault_table(f) for f in flags])
    expected = [FaultSpec(Fault.NO_REPLY, remaining=3), FaultSpec(Fault.LATE_REPLY, delay_ms=800)]
    assert all(m.faults == expected for b in sc.buses for m in b.meters)
    assert all(not b.faults for b in sc.buses)  # per meter: each meter counts its own `remaining`
    doc = {"defaults": {"faults": [fault_table(f) for f in flags]}, "bus": [{"meters": 4}]}
    assert [m.faults for m in build(doc).buses[0].meters] == [expected] * 4  # as [defaults] faults
    fleet = stepped(2, faults=[fault_table("no_reply:remaining=1")])
    assert [fleet.state(addr(n))["faults"] for n in (1, 2)] == [["no_reply"], ["no_reply"]]
    # the function code (as the admin interface's): a lost recharge reply only
    [spec] = from_flags(1, faults=[fault_table("no_reply:function=3")]).buses[0].meters[0].faults
    assert spec.function == 3
    for text, message in [
        ("nope", r"^faults\[0\]: kind must be one of no_reply, "),
        ("no_reply:remaining=0", r"^faults\[0\]\.remaining: 0 must be >= 1"),
        ("bad_checksum:probability=1.5", r"^faults\[0\]\.probability: 1\.5 must be in 0\.\.1"),
        ("late_reply:delay=3", r"^faults\[0\]: unknown setting\(s\) delay"),
        ("late_reply:delay_ms=fast", r"^faults\[0\]\.delay_ms: 'fast' is not an integer"),
        ("no_reply:function=32", r"^faults\[0\]\.function: 32 must be in 0\.\.31"),
        ("rollover:registers=sideways", r"^faults\[0\]: rollover registers must be among"),
    ]:
        with pytest.raises(ScenarioError, match=message):
            from_flags(1, faults=[fault_table(text)])
    for text in ("no_reply:remaining", "no_reply:=3", "no_reply:kind=late_reply", "no_reply:remaining=1,remaining=2"):
        with pytest.raises(ScenarioError, match=r"^fault 'no_reply:"):
            fault_table(text)
