"""The MQTT northbound against a real broker, a real SQLite ledger and a simulated meter line.

Most tests use the Mosquitto on 127.0.0.1:1883 (skipped if nothing listens there), each under
its own topic prefix. The broker-restart test starts a private ``mosquitto`` on a free port,
kills it with commands in flight and starts it again on the same port (never the machine's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.northbound_mqtt import MqttNorthbound
from gateway.policy import Policy
from gateway.service import CommandService, MeterEntry
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import Fleet
from simulator.scenario import from_flags

MOSQUITTO = "/usr/sbin/mosquitto"
M1, M2, M3, M4 = "000000000001", "000000000002", "000000000003", "000000000004"
HOLD = M4
"""The customer on power hold (保电): trips are refused by the policy."""
NO_QUIET_HOURS = Policy(quiet_start=dtime(0, 0), quiet_end=dtime(0, 0), weekend_quiet=False)
"""Trips allowed at any hour, so the tests do not depend on the wall clock."""


def broker_listening(port: int = 1883) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


HAVE_BROKER = broker_listening()
needs_broker = pytest.mark.skipif(not HAVE_BROKER, reason="no MQTT broker listening on 127.0.0.1:1883")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_prefix() -> str:
    return f"meterlink-nb-test/{uuid.uuid4().hex[:12]}"


# --- the gateway under test ---------------------------------------------------------------------


@dataclass
class Gateway:
    fleet: Fleet
    store: Store
    service: CommandService
    links: dict[str, Link]

    def truth(self, address: str) -> tuple[Decimal, int]:
        """Remaining money and purchase count, from the simulated meter itself."""
        state = self.fleet.state(address)
        return Decimal(state["remaining_money"]), int(state["purchase_count"])


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, meters: int = 4) -> AsyncIterator[Gateway]:
    scenario = from_flags(meters, 1, timing=False)
    fleet = Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)
    store = await Store.sqlite(tmp_path / "ledger.db").open()
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    entries = {a: MeterEntry(a, "bus0", power_hold=(a == HOLD)) for a in fleet.meters}
    service = CommandService(store, entries, {"bus0": link}, policy=NO_QUIET_HOURS)
    await service.start()
    try:
        yield Gateway(fleet, store, service, {"bus0": link})
    finally:
        await service.stop()
        await link.stop()
        await store.close()


# --- a head-end client ------------------------------------------------------------------------------


@dataclass
class Probe:
    """Sends commands and records everything published under the prefix; reconnects by itself."""

    port: int
    prefix: str
    identifier: str = field(default_factory=lambda: f"probe-{uuid.uuid4().hex[:10]}")
    clean_session: bool = True
    mqtt5: bool = False
    extra: tuple[str, ...] = ()
    messages: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(topic, JSON payload or text, message properties)."""
    client: aiomqtt.Client | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def start(self) -> Probe:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.up.wait(), 5)
        return self

    async def _run(self) -> None:
        while True:
            kwargs: dict[str, Any] = (
                {"protocol": aiomqtt.ProtocolVersion.V5} if self.mqtt5 else {"clean_session": self.clean_session}
            )
            client = aiomqtt.Client("127.0.0.1", self.port, identifier=self.identifier, **kwargs)
            try:
                async with client:
                    for topic in (f"{self.prefix}/#", *self.extra):
                        await client.subscribe(topic, qos=1)
                    self.client = client
                    self.up.set()
                    async for m in client.messages:
                        raw = m.payload.decode(errors="replace") if isinstance(m.payload, bytes) else m.payload
                        try:
                            payload = json.loads(raw)
                        except (TypeError, ValueError):
                            payload = raw
                        self.messages.append((m.topic.value, payload, m.properties))
            except aiomqtt.MqttError:
                pass
            finally:
                self.client = None
                self.up.clear()
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def send(
        self, command: dict[str, Any] | bytes, *, retain: bool = False, properties: Any = None, timeout: float = 2
    ) -> None:
        assert self.client is not None, "probe not connected"
        payload = command if isinstance(command, bytes) else json.dumps(command).encode()
        await self.client.publish(
            f"{self.prefix}/commands", payload, qos=1, retain=retain, properties=properties, timeout=timeout
        )

    def on(self, topic: str) -> list[Any]:
        return [p for t, p, _ in self.messages if t == f"{self.prefix}/{topic}"]

    def results(self, cid: str) -> list[dict[str, Any]]:
        return self.on(f"results/{cid}")

    def final(self, cid: str) -> list[dict[str, Any]]:
        return [r for r in self.results(cid) if r["status"] in ("confirmed", "failed", "refused", "unknown")]

    async def until(self, check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = [(t.rsplit("/", 2)[-2:], p) for t, p, _ in self.messages[-6:]]
                raise AssertionError(f"timed out waiting for {what or check}; last messages: {tail}")
            await asyncio.sleep(0.01)

    async def deliver(self, commands: list[dict[str, Any]], timeout: float = 8.0) -> None:
        """Send until each command has an answer on its result topic, as a head end does: a command
        published while the gateway is not subscribed is lost, and re-sending is safe (same key)."""
        deadline = time.monotonic() + timeout
        while unanswered := [c for c in commands if not self.results(c["correlation_id"])]:
            assert time.monotonic() < deadline, f"no answer to {[c['correlation_id'] for c in unanswered]}"
            with contextlib.suppress(aiomqtt.MqttError, AssertionError):
                for command in unanswered:
                    await self.send(command)
            with contextlib.suppress(AssertionError):
                await self.until(lambda: all(self.results(c["correlation_id"]) for c in unanswered), 0.5)

    async def outcome(self, cid: str, timeout: float = 5.0) -> dict[str, Any]:
        """The final result of ``cid`` (waits for it)."""
        finals = await self.until(lambda: self.final(cid), timeout, f"the final result of {cid}")
        return finals[0]


def topup(cid: str, address: str, amount: str, **extra: Any) -> dict[str, Any]:
    return {
        "correlation_id": cid,
        "kind": "topup",
        "address": address,
        "params": {"amount": amount},
        "actor": "cashier",
        **extra,
    }


@contextlib.asynccontextmanager
async def northbound(gw: Gateway, port: int = 1883, **kw: Any) -> AsyncIterator[tuple[MqttNorthbound, Probe]]:
    prefix = kw.pop("prefix", None) or new_prefix()
    probe = await Probe(port, prefix, mqtt5=kw.get("mqtt5", False), extra=kw.pop("extra", ())).start()
    nb = MqttNorthbound(gw.service, "127.0.0.1", port, prefix, backoff_initial=0.05, backoff_max=0.3, **kw)
    try:
        await nb.start()
        await nb.wait_connected(5)
        yield nb, probe
    finally:
        await nb.aclose()
        with contextlib.suppress(AssertionError):  # the clean shutdown says offline (retained)
            await probe.until(lambda: probe.on("status")[-1:] == ["offline"], 2)
        if probe.client is not None:  # leave no retained message on the shared broker
            with contextlib.suppress(aiomqtt.MqttError):
                await probe.client.publish(f"{prefix}/status", b"", qos=1, retain=True, timeout=2)
        await probe.aclose()


# --- tests ----------------------------------------------------------------------------------------------


@needs_broker
async def test_topup_accepted_then_confirmed_and_applied_once(tmp_path: Path):
    async with gateway(tmp_path) as gw:
        money, count = gw.truth(M1)
        async with northbound(gw) as (nb, probe):
            assert "meterlink-nb-test" in nb.description and "connected" in nb.description
            await probe.until(lambda: "online" in probe.on("status"), what="status online")
            await probe.send(topup("c-1", M1, "12.34", idempotency_key="receipt-1"))
            final = await probe.outcome("c-1")
            first = probe.results("c-1")[0]
            assert first["status"] == "accepted" and first["correlation_id"] == "c-1"
            assert first["command"]["state"] == "accepted" and first["command"]["idempotency_key"] == "receipt-1"
            assert first["command"]["params"] == {"amount_fen": 1234, "amount": "12.34", "opening": False}
            assert final["status"] == "confirmed" and final["command"]["id"] == first["command"]["id"]
            assert final["command"]["result"]["amount"] == "12.34"
            assert final["command"]["result"]["balance_after"] == str(money + Decimal("12.34"))
            assert [r["status"] for r in probe.results("c-1")] == ["accepted", "confirmed"]
            # every state change on the events topic, with the correlation id
            await probe.until(lambda: any(e["event"] == "confirmed" for e in probe.on("events/commands")))
            events = [e for e in probe.on("events/commands") if e["command"]["id"] == final["command"]["id"]]
            assert events[0]["event"] == "accepted" and events[-1]["event"] == "confirmed"
            assert {"sent"} <= {e["event"] for e in events}
            assert all(e["correlation_ids"] == ["c-1"] for e in events)
            # a command from another channel (the REST API) shows on the events topic only
            other, _ = await gw.service.submit(None, "topup", M2, {"amount": "1.00"}, "rest-user")
            await probe.until(
                lambda: any(
                    e["command"]["id"] == other.id and e["event"] == "confirmed" for e in probe.on("events/commands")
                )
            )
            assert all(
                e["correlation_ids"] == [] for e in probe.on("events/commands") if e["command"]["id"] == other.id
            )
            assert not probe.on("events/alarms")
        assert gw.truth(M1) == (money + Decimal("12.34"), count + 1)  # the meter's own count: applied once
        assert nb._on_change not in gw.service.listeners
        assert "offline" in probe.on("status")  # the clean shutdown said so


@needs_broker
async def test_same_idempotency_key_is_a_duplicate_with_the_first_command(tmp_path: Path):
    async with gateway(tmp_path) as gw:
        money, count = gw.truth(M1)
        async with northbound(gw) as (_nb, probe):
            await probe.send(topup("k-1", M1, "10.00", idempotency_key="receipt-7"))
            first = await probe.outcome("k-1")
            # another correlation id, same key and content: the first command, executed once
            await probe.send(topup("k-2", M1, "10.00", idempotency_key="receipt-7"))
            dup = (await probe.until(lambda: probe.results("k-2")))[0]
            assert dup["status"] == "duplicate" and dup["command"]["id"] == first["command"]["id"]
            assert dup["command"]["state"] == "confirmed"
            # the same key for a different command is refused, not silently answered
            await probe.send(topup("k-3", M1, "99.00", idempotency_key="receipt-7"))
            conflict = (await probe.until(lambda: probe.results("k-3")))[0]
            assert conflict["status"] == "rejected" and "already used for a different command" in conflict["error"]
            # without a key, the correlation id is the key: a redelivery is a duplicate
            await probe.send(topup("k-4", M2, "5.00"))
            await probe.send(topup("k-4", M2, "5.00"))
            await probe.until(lambda: len(probe.results("k-4")) >= 3)
            statuses = [r["status"] for r in probe.results("k-4")]
            assert statuses[:2] == ["accepted", "duplicate"] and statuses.count("confirmed") == 1
            assert probe.results("k-4")[1]["command"]["idempotency_key"] == "mqtt:k-4"
            # a duplicate of a command still running also gets its final outcome
            await probe.send(topup("k-5", M3, "3.00", idempotency_key="receipt-9"))
            await probe.send(topup("k-6", M3, "3.00", idempotency_key="receipt-9"))
            five, six = await probe.outcome("k-5"), await probe.outcome("k-6")
            assert probe.results("k-6")[0]["status"] == "duplicate"
            assert five["command"]["id"] == six["command"]["id"] and six["status"] == "confirmed"
        commands = await gw.store.commands()
        assert sorted(c.idempotency_key for c in commands) == ["mqtt:k-4", "receipt-7", "receipt-9"]
        assert all(c.state is State.CONFIRMED for c in commands)
        assert gw.truth(M1) == (money + Decimal("10.00"), count + 1)


BAD_INPUTS: list[tuple[bytes | dict[str, Any], str, str]] = [
    # (payload, result topic level, expected words in the error)
    (b"not json", "_invalid", "not JSON"),
    (b"\xff\xfe{", "_invalid", "not JSON"),
    (b"[1, 2]", "_invalid", "must be a JSON object"),
    ({"kind": "topup", "address": M1, "params": {"amount": "1"}, "actor": "ops"}, "_invalid", "correlation_id"),
    (topup("a/b", M1, "1.00"), "_invalid", "not usable"),
    ({"correlation_id": "b-1", "address": M1, "actor": "ops"}, "b-1", "kind is required"),
    ({"correlation_id": "b-2", "kind": "explode", "address": M1, "actor": "ops"}, "b-2", "unknown command kind"),
    (topup("b-3", "999999999999", "1.00"), "b-3", "not managed by this gateway"),
    (topup("b-4", "12x", "1.00"), "b-4", "12x"),
    (topup("b-5", M1, "12.345"), "b-5", "at most 2 decimals"),
    (topup("b-6", M1, "-5"), "b-6", "0.01 .. 999999.99"),
    (topup("b-7", M1, "lots"), "b-7", "not a decimal amount"),
    ({**topup("b-8", M1, "1.00"), "params": {}}, "b-8", "not a decimal amount"),
    ({**topup("b-9", M1, "1.00"), "actor": ""}, "b-9", "actor"),
    ({**topup("b-10", M1, "1.00"), "actor": "mallory"}, "b-10", "not allowed"),
    ({**topup("b-11", M1, "1.00"), "amout": "1.00"}, "b-11", "unknown field(s) amout"),
    ({**topup("b-12", M1, "1.00"), "params": "1.00"}, "b-12", "params must be a JSON object"),
    (topup("b-13", M1, "1.00", valid_until="tomorrow"), "b-13", "not ISO 8601"),
    (topup("b-14", M1, "1.00", valid_until="2026-12-01T10:00:00"), "b-14", "time zone"),
    (topup("b-15", M1, "1.00", idempotency_key=7), "b-15", "idempotency_key must be a string"),
    ({**topup("b-16", M1, "1"), "kind": "relay", "params": {"action": "explode"}}, "b-16", "relay action must be"),
    (
        {**topup("b-17", M1, "1"), "kind": "relay", "params": {"action": "trip", "n2": "x"}},
        "b-17",
        "n2 must be an integer",
    ),
    (
        b'{"correlation_id": "b-18", "kind": "topup", "address": "000000000001", "actor": "cashier", '
        b'"params": {"amount": 12.345}}',
        "b-18",
        "at most 2 decimals",
    ),
    ({**topup("b-19", M1, "1"), "kind": "tariff", "params": {"prices": []}}, "b-19", "prices must be a list"),
    ({**topup("b-20", M1, "1"), "kind": "params", "params": {"alarm_9": "1"}}, "b-20", "parameters must be"),
    # MQTT passes params through as sent: they get the same checks as over REST
    ({**topup("b-21", M1, "1.00"), "params": {"amount": "1.00", "opening": "false"}}, "b-21", "true or false"),
    ({**topup("b-22", M1, "1.00"), "params": {"amount": "1.00", "amountt": "5"}}, "b-22", "unknown top-up field"),
    ({**topup("b-23", M1, "1"), "kind": "relay", "params": {"action": "trip", "arrears": "no"}}, "b-23", "true or"),
    ({**topup("b-24", M1, "1"), "kind": "relay", "params": {"action": "trip", "bogus": 1}}, "b-24", "unknown relay"),
    ({**topup("b-25", M1, "1"), "kind": "time_sync", "params": {"x": 1}}, "b-25", "unknown time sync field"),
    ({**topup("b-26", M1, "1"), "kind": "params", "params": {"alarm_1": "99999999"}}, "b-26", "alarm_1"),
    (
        {
            **topup("b-27", M1, "1"),
            "kind": "tariff",
            "params": {"steps": {"thresholds": ["-5", 0, 0, 0, 0, 0], "prices": [0] * 7}},
        },
        "b-27",
        "steps",
    ),
    (
        {
            **topup("b-28", M1, "1"),
            "kind": "relay",
            "params": {"action": "trip"},
            "valid_until": "2020-01-01T00:00+08:00",
        },
        "b-28",
        "in the past",
    ),
]


@needs_broker
async def test_bad_input_is_rejected_with_a_clear_error_and_nothing_recorded(tmp_path: Path):
    prefix = new_prefix()
    async with gateway(tmp_path) as gw:
        money, count = gw.truth(M1)
        # a retained command, waiting on the topic before the gateway subscribes
        async with aiomqtt.Client("127.0.0.1", 1883) as c:
            await c.publish(f"{prefix}/commands", json.dumps(topup("b-ret", M1, "1.00")), qos=1, retain=True)
        try:
            async with northbound(gw, prefix=prefix, allowed_actors={"cashier", "ops"}) as (nb, probe):
                retained = (await probe.until(lambda: probe.results("b-ret")))[0]
                assert retained["status"] == "rejected" and "retained" in retained["error"]
                for payload, _, _ in BAD_INPUTS:
                    await probe.send(payload)
                levels = [level for _, level, _ in BAD_INPUTS]

                def answered() -> bool:
                    invalid = len(probe.results("_invalid")) == levels.count("_invalid")
                    return invalid and all(probe.results(level) for level in levels)

                await probe.until(answered, what="every rejection")
                assert nb.stats.rejected == len(BAD_INPUTS) + 1
                invalid = iter(probe.results("_invalid"))
                for payload, level, words in BAD_INPUTS:
                    answer = next(invalid) if level == "_invalid" else probe.results(level)[-1]
                    assert answer["status"] == "rejected" and answer["command"] is None, (payload, answer)
                    assert words in answer["error"], (payload, answer["error"])
                assert await gw.store.commands() == [] and await gw.store.events() == []  # nothing, not half
                assert not probe.on("events/commands")
                # the gateway still works after the junk
                await probe.send(topup("good", M1, "2.00"))
                assert (await probe.outcome("good"))["status"] == "confirmed"
            assert len(await gw.store.commands()) == 1
            assert gw.truth(M1) == (money + Decimal("2.00"), count + 1)
        finally:
            async with aiomqtt.Client("127.0.0.1", 1883) as c:
                await c.publish(f"{prefix}/commands", b"", qos=1, retain=True)


@needs_broker
async def test_relay_events_and_alarms(tmp_path: Path):
    async with gateway(tmp_path) as gw:
        async with northbound(gw) as (_nb, probe):
            relay = {"kind": "relay", "actor": "ops"}
            await probe.send({**relay, "correlation_id": "r-1", "address": M2, "params": {"action": "trip"}})
            assert (await probe.outcome("r-1"))["status"] == "confirmed"
            trip = (await probe.until(lambda: probe.on("events/relay")))[0]
            assert (trip["address"], trip["action"], trip["relay_open"]) == (M2, "trip", True)
            assert gw.fleet.state(M2)["relay"] == "open"
            await probe.send({**relay, "correlation_id": "r-2", "address": M2, "params": {"action": "direct-close"}})
            assert (await probe.outcome("r-2"))["status"] == "confirmed"
            close = (await probe.until(lambda: probe.on("events/relay")[1:]))[0]
            assert (close["action"], close["relay_open"]) == ("direct-close", False)
            assert gw.fleet.state(M2)["relay"] == "closed"
            # refused by the policy: a power-hold customer is never tripped
            await probe.send({**relay, "correlation_id": "r-3", "address": HOLD, "params": {"action": "trip"}})
            refused = await probe.outcome("r-3")
            assert refused["status"] == "refused" and refused["detail"]["rule"] == "power_hold"
            # failed: a top-up whose validity ended while the meter did not answer: never sent
            gw.fleet.inject(M3, FaultSpec(Fault.NO_REPLY, remaining=10_000))
            gw.service.config.retry_delay = timedelta(seconds=1.5)
            soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
            await probe.send(topup("r-4", M3, "5.00", valid_until=soon))
            assert (await probe.outcome("r-4", timeout=15))["status"] == "failed"
            gw.fleet.clear_faults(M3)
            # unknown: the meter says it took the money but its purchase count did not move
            gw.fleet.inject(M1, FaultSpec(Fault.LOST_TOPUP, remaining=1))
            await probe.send(topup("t-1", M1, "20.00"))
            assert (await probe.outcome("t-1"))["status"] == "unknown"
            alarms = await probe.until(lambda: len(probe.on("events/alarms")) >= 3 and probe.on("events/alarms"))
            by_alarm = {a["alarm"]: a for a in alarms}
            assert by_alarm["refused"]["by"] == "policy" and by_alarm["refused"]["rule"] == "power_hold"
            assert by_alarm["refused"]["address"] == HOLD and "power hold" in by_alarm["refused"]["reason"]
            assert by_alarm["failed"]["severity"] == "warning" and "validity" in by_alarm["failed"]["reason"]
            assert by_alarm["unknown"]["severity"] == "critical" and by_alarm["unknown"]["kind"] == "topup"
            assert "purchase count" in by_alarm["unknown"]["reason"]
            assert len(probe.on("events/relay")) == 2  # refused and failed trips changed nothing
        assert gw.fleet.state(HOLD)["relay"] == "closed" and gw.fleet.state(M3)["relay"] == "closed"


@needs_broker
async def test_mqtt5_correlation_data_and_response_topic(tmp_path: Path):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    replies = f"meterlink-nb-test-replies/{uuid.uuid4().hex[:12]}"
    async with gateway(tmp_path) as gw:
        async with northbound(gw, mqtt5=True, extra=(f"{replies}/#",)) as (_nb, probe):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"{replies}/me"
            props.CorrelationData = b"v5-corr-1"
            command = topup("unused", M1, "1.00")
            del command["correlation_id"]
            await probe.send(command, properties=props)
            await probe.outcome("v5-corr-1")  # CorrelationData named the result topic
            answers = await probe.until(
                lambda: (
                    len([m for m in probe.messages if m[0] == f"{replies}/me"]) >= 2
                    and [m for m in probe.messages if m[0] == f"{replies}/me"]
                )
            )
            assert [p["status"] for _, p, _ in answers] == ["accepted", "confirmed"]
            assert all(m.CorrelationData == b"v5-corr-1" for _, _, m in answers)


async def test_queue_is_bounded_while_the_broker_is_away(tmp_path: Path):
    async with gateway(tmp_path) as gw:
        port = free_port()  # nothing listens there
        nb = MqttNorthbound(gw.service, f"mqtt://127.0.0.1:{port}/site-a/gw", queue_limit=5, backoff_initial=0.05)
        await nb.start()
        try:
            await gw.service.submit(None, "relay", HOLD, {"action": "trip"}, "ops")  # refused: an alarm
            for amount in ("1.00", "2.00"):
                await gw.service.submit(None, "topup", M1, {"amount": amount}, "ops")
            await gw.service.drain(10)
            assert not nb.connected and "not connected" in nb.description
            assert nb.queued == 5 and nb.stats.dropped > 0
            topics = [item.topic for item in nb._out]
            assert "site-a/gw/events/alarms" in topics  # events/commands went first
            assert nb.stats.connect_failures >= 1
        finally:
            await nb.aclose()
    assert nb.prefix == "site-a/gw" and nb.port == port


def test_constructor_checks_its_arguments():
    service: Any = object()
    nb = MqttNorthbound(service, "mqtt://user:p%40ss@broker.example:1884")
    assert (nb.host, nb.port, nb.username, nb._password, nb.prefix) == (
        "broker.example",
        1884,
        "user",
        "p@ss",
        "meterlink/gw",
    )
    assert nb.url == "mqtt://user@broker.example:1884" and "p@ss" not in nb.description
    with pytest.raises(ValueError, match="wildcards"):
        MqttNorthbound(service, "localhost", prefix="a/+/b")
    with pytest.raises(ValueError, match="mqtt://"):
        MqttNorthbound(service, "http://localhost")
    with pytest.raises(ValueError, match="max_inflight"):
        MqttNorthbound(service, "localhost", max_inflight=21)
    with pytest.raises(ValueError, match="identifier"):
        MqttNorthbound(service, "localhost", clean_session=False)


# --- broker restart in the middle of commands ---------------------------------------------------------


class PrivateMosquitto:
    """A broker of our own on a free port, to kill and restart (never the machine's).

    It persists sessions (saved on every change), so the probe's subscription survives the
    kill and it receives results published before it has reconnected, like a real head end
    with a persistent session.
    """

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {tmp}/",
            "autosave_interval 1",
            "autosave_on_changes true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # or it drops to 'mosquitto' and cannot write the temp directory
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while not broker_listening(self.port):
            assert self.proc.poll() is None, "mosquitto exited"
            assert time.monotonic() < deadline, "mosquitto did not start listening"
            await asyncio.sleep(0.01)

    async def freeze(self) -> None:
        """Save the sessions, then stop the process: publishes to it wait for PUBACKs that never come."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGUSR1)  # save sessions now
        await asyncio.sleep(0.05)
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


@pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason=f"{MOSQUITTO} is not installed")
async def test_broker_restart_in_the_middle_of_commands(tmp_path: Path):
    broker = PrivateMosquitto(tmp_path)
    await broker.start()
    plan = [(f"c-{i}", (M1, M2, M3)[i % 3], f"{i + 1}.0{i}") for i in range(8)]
    early, late = plan[:6], plan[6:]  # late: sent while the broker is down, re-sent after
    try:
        async with gateway(tmp_path, meters=3) as gw:
            before = {m: gw.truth(m) for m in (M1, M2, M3)}
            prefix = new_prefix()
            probe = Probe(broker.port, prefix, identifier=f"probe-{uuid.uuid4().hex[:8]}", clean_session=False)
            await probe.start()
            nb = MqttNorthbound(gw.service, "127.0.0.1", broker.port, prefix, backoff_initial=0.05, backoff_max=0.3)
            try:
                await nb.start()
                await nb.wait_connected(5)
                for cid, meter, amount in early:
                    await probe.send(topup(cid, meter, amount))
                await probe.until(lambda: all(probe.results(c) for c, _, _ in early), what="acceptances")
                await probe.until(lambda: any(probe.final(c) for c, _, _ in early), what="a first outcome")
                assert not all(probe.final(c) for c, _, _ in early), "too late: every command had finished"

                await broker.freeze()  # commands still executing, results and events being published...
                await probe.until(lambda: nb.pending > nb.queued, what="publishes waiting for their PUBACK")
                await broker.kill()  # ...and the broker dies under them
                for cid, meter, amount in late:
                    with pytest.raises((aiomqtt.MqttError, AssertionError)):
                        await probe.send(topup(cid, meter, amount), timeout=0.2)
                await probe.until(lambda: not nb.connected, what="the northbound to see the outage")
                await gw.service.drain(10)  # the commands finish while the broker is away...
                assert nb.pending > 0  # ...and their outcomes wait in the queue
                await broker.start()  # same port

                await probe.until(lambda: probe.up.is_set(), what="the probe to reconnect")
                await probe.deliver([topup(cid, meter, amount) for cid, meter, amount in late])
                await probe.send(topup(*early[0]))  # an early one again, to be sure: a duplicate
                for cid, _, _ in plan:
                    await probe.outcome(cid, timeout=10)
                await nb.wait_idle(5)
            finally:
                await nb.aclose()
                await probe.aclose()

            assert nb.stats.disconnects >= 1 and nb.stats.connects >= 2
            assert nb.stats.requeued >= 1 and nb.stats.dropped == 0  # in flight at the kill, published after
            # none lost, none doubled: the ledger and the meters themselves
            commands = await gw.store.commands()
            assert sorted(c.idempotency_key for c in commands) == sorted(f"mqtt:{cid}" for cid, _, _ in plan)
            assert all(c.state is State.CONFIRMED for c in commands)
            for meter in (M1, M2, M3):
                mine = [Decimal(a) for _, m, a in plan if m == meter]
                assert gw.truth(meter) == (before[meter][0] + sum(mine), before[meter][1] + len(mine)), meter
            ids = {c.idempotency_key: c.id for c in commands}
            for cid, _, _ in plan:
                finals = probe.final(cid)
                assert {f["status"] for f in finals} == {"confirmed"}, (cid, finals)
                assert {f["command"]["id"] for f in finals} == {ids[f"mqtt:{cid}"]}
            assert "duplicate" in [r["status"] for r in probe.results(early[0][0])]
            confirmed = {e["command"]["id"] for e in probe.on("events/commands") if e["event"] == "confirmed"}
            assert confirmed == set(ids.values())
    finally:
        await broker.kill()


@pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason=f"{MOSQUITTO} is not installed")
async def test_a_broker_that_stops_acknowledging_is_left_and_rejoined(tmp_path: Path):
    """No PUBACK within the timeout: the publish is cancelled, re-queued, and the connection remade."""
    broker = PrivateMosquitto(tmp_path)
    await broker.start()
    try:
        async with gateway(tmp_path, meters=3) as gw:
            prefix = new_prefix()
            probe = await Probe(broker.port, prefix).start()
            nb = MqttNorthbound(
                gw.service, "127.0.0.1", broker.port, prefix, publish_timeout=0.3, backoff_initial=0.05, backoff_max=0.2
            )
            try:
                await nb.start()
                await nb.wait_connected(5)
                await broker.freeze()
                ids = [(await gw.service.submit(None, "topup", m, {"amount": "1.00"}, "ops"))[0].id for m in (M1, M2)]
                await probe.until(lambda: nb.stats.publish_failures and not nb.connected, what="a PUBACK timeout")
                await gw.service.drain(10)
                broker.thaw()
                await nb.wait_connected(5)
                await nb.wait_idle(5)

                def confirmed() -> set[str]:
                    return {e["command"]["id"] for e in probe.on("events/commands") if e["event"] == "confirmed"}

                await probe.until(lambda: confirmed() == set(ids), what="every outcome, after all")
            finally:
                await nb.aclose()
                await probe.aclose()
            assert nb.stats.disconnects >= 1 and nb.stats.dropped == 0
    finally:
        await broker.kill()
