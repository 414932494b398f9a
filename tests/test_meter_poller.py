"""The meter poller (gateway/poller.py) against simulated meters on an in-memory line.

Meter events over the real Mosquitto on 127.0.0.1:1883 (own topic prefix); the ledger is a
real SQLite file, and the observation table also on the real PostgreSQL (own schema). Time is
a virtual clock the tests move: the meters consume and the ladder moves only when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from simline import SimLineTransport
from test_gateway_mqtt_northbound import HAVE_BROKER, Probe, new_prefix

from firmware_stubs.meter import CostMode
from firmware_stubs.wallet import Limits
from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.northbound_mqtt import MqttNorthbound
from gateway.policy import Policy
from gateway.poller import MeterEvent, PollConfig, Poller, balance_alarms, balance_level, relay_from_status
from gateway.service import CommandService, MeterEntry, ServiceConfig
from protocols.dlt645 import METER_TZ, Deframer
from simulator.bus import LineTiming
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import BusSpec, Fleet, MeterSpec

START = datetime(2026, 11, 24, 8, 0, tzinfo=METER_TZ)  # a Tuesday morning
M1, M2, M3, M4, M5, M6 = (f"{n:012d}" for n in range(1, 7))
SHOP = M1
"""A local cost-control shop drawing 2 kW with 9.00 yuan: alarm 1 at 5.00, alarm 2 at 2.00, no overdraft."""
SHOP_LIMITS = Limits(alarm_1=500, alarm_2=200, overdraft=0, hoarding=0, close_allowed=0)
NO_QUIET_HOURS = Policy(quiet_start=dtime(0, 0), quiet_end=dtime(0, 0), weekend_quiet=False)
FAST = LinkConfig(gap_s=0.0, td_max_s=0.05, margin_s=0.05, inter_byte_s=0.15, retries=2, backoff_s=0.01)
SLOW_LINE = LineTiming(baud=9600, td_distribution="fixed", td_min_ms=20, td_max_ms=20)
"""Real line timing (each transaction ~40 ms): a poll round takes long enough to submit into."""


@dataclass
class Bench:
    clock: VirtualClock
    fleet: Fleet
    transport: SimLineTransport
    link: Link
    store: Store
    service: CommandService
    poller: Poller
    events: list[MeterEvent] = field(default_factory=list)

    def names(self, address: str | None = None) -> list[str]:
        """The events so far, as ``relay:<state>`` / ``<alarm>`` (of one meter, or all)."""
        return [
            f"relay:{e.payload['relay']}" if e.topic == "relay" else e.payload["alarm"]
            for e in self.events
            if address is None or e.address == address
        ]

    def truth(self, address: str) -> dict[str, Any]:
        return self.fleet.state(address)

    async def hours(self, n: int) -> None:
        """Let n virtual hours pass, polling once an hour."""
        for _ in range(n):
            self.clock.advance(timedelta(hours=1))
            await self.poller.poll_once()


def shop(**extra: Any) -> MeterSpec:
    return MeterSpec(SHOP, balance=Decimal("9.00"), load="constant", watts=2000, limits=SHOP_LIMITS, **extra)


@contextlib.asynccontextmanager
async def bench(
    tmp_path: Path,
    specs: list[MeterSpec],
    *,
    timing: LineTiming | None = None,
    poll: PollConfig | None = None,
    store: Store | None = None,
    config: ServiceConfig | None = None,
    wallets: dict[str, str] | None = None,
) -> AsyncIterator[Bench]:
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", specs, timing=timing)], clock, seed=7)
    transport = SimLineTransport(fleet.buses["bus0"])
    link = await Link(transport, FAST, name="bus0").start()
    store = store or await Store.sqlite(tmp_path / "ledger.sqlite").open()
    entries = {
        s.address: MeterEntry(
            s.address,
            "bus0",
            mode="remote" if s.mode is CostMode.REMOTE else "local",
            wallet=(wallets or {}).get(s.address, s.wallet_unit.value),
        )
        for s in specs
    }
    config = config or ServiceConfig(retry_delay=timedelta(seconds=1), poll_s=0.01)
    service = await CommandService(
        store, entries, {"bus0": link}, now=clock.now, policy=NO_QUIET_HOURS, config=config
    ).start()
    poller = Poller(service, poll or PollConfig(interval_s=0))
    b = Bench(clock, fleet, transport, link, store, service, poller)
    poller.listeners.append(b.events.append)
    try:
        yield b
    finally:
        await poller.stop()
        await service.stop()
        await link.stop()
        await store.close()


# --- the ladder and the status word, by themselves ------------------------------------------------------------


def test_balance_ladder_follows_prepaid_1_4():
    t = {"alarm_1": 500, "alarm_2": 200, "overdraft": 0}
    assert [balance_level(r, 0, t) for r in (501, 500, 201, 200, 1, 0)] == [
        "normal",
        "alarm_1",
        "alarm_1",
        "alarm_2",
        "alarm_2",
        "overdraft",  # no overdraft allowed: at zero the meter trips for good
    ]
    with_overdraft = {**t, "overdraft": 1000}
    assert balance_level(0, 0, with_overdraft) == "zero"
    assert balance_level(0, 999, with_overdraft) == "zero"
    assert balance_level(0, 1000, with_overdraft) == "overdraft"
    assert balance_alarms(0, 300, with_overdraft) == ["balance_alarm_1", "balance_alarm_2", "balance_zero"]
    assert balance_alarms(0, 0, t) == ["balance_alarm_1", "balance_alarm_2", "balance_zero", "overdraft"]
    assert balance_alarms(600, 0, t) == [] and balance_alarms(150, 0, {"alarm_1": 0, "alarm_2": 0}) == []
    # status word 3: bit 4 the contact, bit 6 the command
    assert [relay_from_status(w) for w in (0x0000, 0x0050, 0x0010, 0x1040, None)] == [
        "closed",
        "open",
        "close-allowed",
        "closed",  # a trip commanded but not executed yet (delay): the contact is still closed
        None,
    ]


# --- events over the real broker ------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_BROKER, reason="no MQTT broker listening on 127.0.0.1:1883")
async def test_local_meter_running_out_of_credit_is_reported_over_mqtt(tmp_path: Path):
    async with bench(tmp_path, [shop(), MeterSpec(M2)]) as b:
        prefix = new_prefix()
        probe = await Probe(1883, prefix).start()
        nb = MqttNorthbound(b.service, "127.0.0.1", 1883, prefix, backoff_initial=0.05, backoff_max=0.3)
        nb.watch(b.poller)
        try:
            await nb.start()
            await nb.wait_connected(5)
            baseline = await b.poller.poll_once()
            assert baseline[SHOP] is not None and baseline[SHOP].state["level"] == "normal"
            assert b.events == []  # the first look is the baseline: nothing changed yet

            await b.hours(4)  # 9.00 - 4 h x 2 kW x 0.50: at alarm 1 (5.00)
            assert b.truth(SHOP)["remaining_money"] == "5.00"
            assert b.names() == ["balance_alarm_1"]
            await b.hours(3)  # at alarm 2 the meter opens the relay itself (local pre-trip)
            assert b.truth(SHOP)["relay"] != "closed"
            assert b.names() == ["balance_alarm_1", "relay:open", "balance_alarm_2"]
            b.fleet.press_button(SHOP)  # the customer restores it with the button (prepaid.md §1.4)
            await b.hours(1)
            assert b.truth(SHOP)["relay"] == "closed"
            await b.hours(1)  # 2.00 at 2 kW: gone within the hour; no overdraft allowed: it trips for good
            assert b.truth(SHOP)["relay"] != "closed" and b.truth(SHOP)["remaining_money"] == "0.00"
            assert b.names() == [
                "balance_alarm_1",
                "relay:open",
                "balance_alarm_2",
                "relay:closed",
                "relay:open",
                "balance_zero",
                "overdraft",
            ]
            assert b.names(M2) == []

            await probe.until(lambda: len(probe.on("events/alarms")) == 4, what="4 balance alarms")
            await probe.until(lambda: len(probe.on("events/relay")) == 3, what="3 relay events")
            alarms, relays = probe.on("events/alarms"), probe.on("events/relay")
            assert [a["alarm"] for a in alarms] == ["balance_alarm_1", "balance_alarm_2", "balance_zero", "overdraft"]
            assert all(a["source"] == "meter" and a["by"] == "meter" and a["address"] == SHOP for a in alarms)
            first = alarms[0]
            assert (first["threshold"], first["remaining_money"], first["level"]) == ("5.00", "5.00", "alarm_1")
            assert first["severity"] == "warning" and alarms[-1]["severity"] == "critical"
            assert [r["relay"] for r in relays] == ["open", "closed", "open"]
            assert all(r["source"] == "meter" and r["command_id"] is None for r in relays)
            last = relays[-1]
            assert (last["relay_open"], last["previous_relay"], last["remaining_money"]) == (True, "closed", "0.00")
            assert last["level"] == "overdraft" and datetime.fromisoformat(last["at"]) == b.clock.now()

            # A top-up lifts it over every threshold again: one balance_restored.
            await b.service.submit("shop-pays", "topup", SHOP, {"amount": "50.00"}, "counter")
            await b.service.drain()
            await b.poller.poll_once([SHOP])
            await probe.until(lambda: len(probe.on("events/alarms")) == 5, what="balance_restored")
            restored = probe.on("events/alarms")[-1]
            assert restored["alarm"] == "balance_restored" and restored["remaining_money"] == "50.00"
            assert restored["cleared"] == ["balance_alarm_1", "balance_alarm_2", "balance_zero", "overdraft"]
        finally:
            await nb.aclose()
            with contextlib.suppress(Exception):
                await probe.client.publish(f"{prefix}/status", b"", qos=1, retain=True, timeout=2)  # type: ignore[union-attr]
            await probe.aclose()


@pytest.mark.skipif(not HAVE_BROKER, reason="no MQTT broker listening on 127.0.0.1:1883")
async def test_command_relay_events_say_source_command(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2)]) as b:
        prefix = new_prefix()
        probe = await Probe(1883, prefix).start()
        nb = MqttNorthbound(b.service, "127.0.0.1", 1883, prefix, backoff_initial=0.05, backoff_max=0.3)
        nb.watch(b.poller)
        try:
            await nb.start()
            await nb.wait_connected(5)
            await b.poller.poll_once()
            await b.service.submit("trip-1", "relay", M1, {"action": "trip"}, "ops")
            await b.service.drain()
            b.clock.advance(timedelta(minutes=15))
            await b.poller.poll_once()
            (trip,) = await probe.until(lambda: probe.on("events/relay"), what="the trip's relay event")
            assert (trip["source"], trip["action"], trip["relay"], trip["relay_open"]) == (
                "command",
                "trip",
                "open",
                True,
            )
            await asyncio.sleep(0.2)
            assert len(probe.on("events/relay")) == 1  # the poll that saw it open says nothing more
            assert b.events == [] and b.truth(M1)["relay"] == "open"
        finally:
            await nb.aclose()
            with contextlib.suppress(Exception):
                await probe.client.publish(f"{prefix}/status", b"", qos=1, retain=True, timeout=2)  # type: ignore[union-attr]
            await probe.aclose()


# --- silent meters ----------------------------------------------------------------------------------------------


async def test_silent_meter_is_reported_once_then_back_and_does_not_block_the_others(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2), MeterSpec(M3)]) as b:
        await b.poller.poll_once()
        baseline_at = b.clock.now()
        b.fleet.meter(M2).inject(FaultSpec(Fault.NO_REPLY), b.clock.now())
        b.clock.advance(timedelta(minutes=15))
        began = time.monotonic()
        seen = await b.poller.poll_once()
        took = time.monotonic() - began
        assert b.names() == ["meter_silent"] and b.events[0].address == M2
        assert seen[M1] is not None and seen[M1].answering and seen[M3] is not None and seen[M3].answering
        assert seen[M2] is not None and not seen[M2].answering and seen[M2].answered_at == baseline_at
        # The silent meter costs its line one read with one retry (two timeouts), not more.
        assert took < 2.0, took
        silent = b.events[0].payload
        assert silent["severity"] == "critical" and datetime.fromisoformat(silent["answered_at"]) == baseline_at

        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once()
        assert b.names() == ["meter_silent"]  # still silent: not reported again

        # A restarted poller (the observation is in the ledger) does not report it again either.
        restarted = Poller(b.service, PollConfig(interval_s=0))
        restarted.listeners.append(b.events.append)
        b.clock.advance(timedelta(minutes=15))
        await restarted.poll_once([M2])
        assert b.names() == ["meter_silent"]

        b.fleet.meter(M2).clear(Fault.NO_REPLY, b.clock.now())
        b.clock.advance(timedelta(minutes=15))
        back = (await restarted.poll_once([M2]))[M2]
        assert b.names() == ["meter_silent", "meter_back"]
        assert back is not None and back.answering and back.answered_at == b.clock.now()
        payload = b.events[-1].payload
        assert payload["alarm"] == "meter_back" and payload["severity"] == "info"
        assert datetime.fromisoformat(payload["silent_since"]) == baseline_at + timedelta(minutes=15)
        assert payload["relay"] == "closed"


async def test_silent_after_two_polls(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1)], poll=PollConfig(interval_s=0, silent_after=2)) as b:
        await b.poller.poll_once()
        b.fleet.meter(M1).inject(FaultSpec(Fault.NO_REPLY), b.clock.now())
        await b.poller.poll_once()
        assert b.names() == [] and (await b.store.observation(M1)).answering  # type: ignore[union-attr]
        await b.poller.poll_once()
        assert b.names() == ["meter_silent"]


# --- commands in flight -----------------------------------------------------------------------------------------


async def test_a_meter_with_a_command_at_work_is_not_polled_and_its_trip_is_no_meter_event(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2)], timing=SLOW_LINE) as b:
        await b.poller.poll_once()
        await b.service.submit("trip-1", "relay", M1, {"action": "trip"}, "ops")
        while not (await b.store.meter_activity(M1, b.clock.now())).busy:
            await asyncio.sleep(0.005)
        assert await b.poller.poll_meter(b.service.meters[M1]) is None  # the trip holds the meter
        assert b.poller.stats.skipped_busy == 1
        await b.service.drain()
        (trip,) = await b.store.commands(address=M1)
        assert trip.state is State.CONFIRMED and b.truth(M1)["relay"] == "open"
        b.clock.advance(timedelta(minutes=15))
        seen = await b.poller.poll_meter(b.service.meters[M1])
        assert seen is not None and seen.state["relay"] == "open"
        assert b.events == []  # the command reported its trip; the poller takes the new state silently

        # What the meter does after that is the meter's again: a close-allowed by command, then the
        # customer's button press, which only the poller can see.
        await b.service.submit("allow-1", "relay", M1, {"action": "close-allowed"}, "ops")
        await b.service.drain()
        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once([M1])
        assert b.events == []
        assert b.fleet.press_button(M1)
        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once([M1])
        assert b.names() == ["relay:closed"]
        assert b.events[0].payload["previous_relay"] == "close-allowed"


async def test_a_command_during_a_poll_discards_that_poll(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2)], timing=SLOW_LINE) as b:
        await b.poller.poll_once()
        b.clock.advance(timedelta(minutes=15))
        written = len(b.transport.written)
        polling = asyncio.create_task(b.poller.poll_meter(b.service.meters[M1]))
        while len(b.transport.written) == written:  # the poll's first read is on the wire
            await asyncio.sleep(0.002)
        await b.service.submit("trip-2", "relay", M1, {"action": "trip"}, "ops")
        assert await polling is None  # the trip ran in the middle of it: nothing recorded
        await b.service.drain()
        assert b.poller.stats.discarded == 1 and b.events == []
        before = await b.store.observation(M1)
        assert before is not None and before.state["relay"] == "closed"  # still the baseline's
        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once([M1])
        assert b.events == [] and (await b.store.observation(M1)).state["relay"] == "open"  # type: ignore[union-attr]


def _interleaved(written: list[bytes], command: list[bytes]) -> list[str]:
    """Frames on the wire between a command's first and last request (its requests matched in order)."""
    pending = [w for w in command if w in written]
    assert pending, "the command's frames are not on the wire"
    others: list[str] = []
    started = False
    for wire in written:
        if pending and wire == pending[0]:
            started = True
            pending.pop(0)
            if not pending:
                break
        elif started:
            others.extend(f.address for f in Deframer().feed(wire))
    assert not pending, "the command's frames are not all on the wire in order"
    return others


async def test_the_poller_yields_to_a_command_submitted_while_it_polls(tmp_path: Path):
    specs = [MeterSpec(a) for a in (M1, M2, M3, M4, M5, M6)]
    async with bench(tmp_path, specs, timing=SLOW_LINE) as b:
        start = len(b.transport.written)
        rounds = asyncio.create_task(b.poller.poll_once())
        while len(b.transport.written) - start < 3:  # the poll is under way (on M1)
            await asyncio.sleep(0.002)
        command, _ = await b.service.submit("pay-6", "topup", M6, {"amount": "20.00"}, "counter")
        await b.service.drain()
        assert not rounds.done(), "the top-up waited for the poll round"
        polled_meanwhile = b.poller.stats.polls
        await rounds
        done = await b.store.get(command.id)
        assert done is not None and done.state is State.CONFIRMED
        assert b.truth(M6)["remaining_money"] == "120.00"
        # On the wire, between the top-up's first and last request (its frames are in its audit
        # trail): at most one poll read (the one already queued when it started), not one between
        # each of its transactions.
        frames = [bytes.fromhex(f) for e in await b.store.events(command_id=command.id) for f in e.frames]
        between = _interleaved(b.transport.written[start:], frames)
        assert len(between) <= 1, between
        assert len([f for f in frames if f in b.transport.written]) >= 4  # count, balance, auth, recharge, ...
        assert polled_meanwhile < 6 and b.poller.stats.yielded >= 1


# --- persistence on both ledgers ------------------------------------------------------------------------------

PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg_available() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request, tmp_path):
    if request.param == "sqlite":
        s = await Store.sqlite(tmp_path / "ledger.sqlite").open()
        yield s
        await s.close()
        return
    if not _pg_available():
        pytest.skip("PostgreSQL is not listening on 127.0.0.1:5432 (.ci/services starts it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    s = await Store.postgres(PG_DSN, schema=schema).open()
    yield s
    await s.close()
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def test_observations_survive_a_restart_on_both_ledgers(tmp_path: Path, ledger: Store):
    async with bench(tmp_path, [shop()], store=ledger) as b:
        await b.poller.poll_once()
        await b.hours(4)
        assert b.names() == ["balance_alarm_1"]
        kept = await b.store.observation(SHOP)
        assert kept is not None and kept.answering and kept.at == b.clock.now()
        assert kept.state["remaining_fen"] == 500 and kept.state["thresholds_fen"] == {
            "alarm_1": 500,
            "alarm_2": 200,
            "overdraft": 0,
        }
        # A new poller on the same ledger (a restarted gateway) goes on from there: the thresholds
        # come from the ledger (no re-read), and alarm 1 is not reported again.
        fresh = Poller(b.service, PollConfig(interval_s=0))
        fresh.listeners.append(b.events.append)
        written = len(b.transport.written)
        b.clock.advance(timedelta(hours=1))
        await fresh.poll_once()
        assert len(b.transport.written) - written == 3  # status word, remaining money, overdraft
        assert b.names() == ["balance_alarm_1"]
        b.clock.advance(timedelta(hours=2))
        await fresh.poll_once()
        assert b.names() == ["balance_alarm_1", "relay:open", "balance_alarm_2"]


async def test_the_background_loop_spreads_a_line_over_the_interval(tmp_path: Path):
    specs = [MeterSpec(a) for a in (M1, M2, M3, M4)]
    async with bench(tmp_path, specs, poll=PollConfig(interval_s=0.4)) as b:
        await b.poller.start()
        await asyncio.sleep(0.05)
        assert b.poller.stats.polls == 0  # the first poll one spacing (0.1 s) after the start
        await asyncio.sleep(0.5)
        polls = b.poller.stats.polls
        assert 3 <= polls <= 6, polls  # one meter every 0.1 s, not all at once
        await asyncio.sleep(0.45)
        assert b.poller.stats.rounds >= 1 and all([await b.store.observation(a) for a in (M1, M2, M3, M4)])


async def test_remote_meters_are_polled_for_the_relay_only(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1, mode=CostMode.REMOTE)]) as b:
        seen = (await b.poller.poll_once())[M1]
        assert seen is not None and seen.state["relay"] == "closed" and seen.state.get("remaining_fen") is None
        assert len(b.transport.written) == 1


async def test_two_pollers_on_one_ledger_report_a_change_once(tmp_path: Path):
    """Two gateways on one ledger polling the same meter at once: the first to record it reports."""
    async with bench(tmp_path, [shop()]) as b:
        other = Poller(b.service, PollConfig(interval_s=0))
        other.listeners.append(b.events.append)
        await b.poller.poll_once()
        b.clock.advance(timedelta(hours=4))  # down to alarm 1
        entry = b.service.meters[SHOP]
        results = await asyncio.gather(b.poller.poll_meter(entry), other.poll_meter(entry))
        assert b.names() == ["balance_alarm_1"]
        assert sorted(r is None for r in results) == [False, True]
        assert b.poller.stats.discarded + other.stats.discarded == 1


async def test_a_meter_another_gateway_polled_recently_is_not_read_again(tmp_path: Path):
    """Two gateways on one ledger: the background loop skips a meter polled (by either) less than
    half an interval ago, so the two read each meter about once per interval, not twice."""
    async with bench(tmp_path, [MeterSpec(M1)]) as b:
        other = Poller(b.service, PollConfig(interval_s=600))
        entry = b.service.meters[M1]
        assert await other.poll_meter(entry, fresh_within=300) is not None  # the other gateway's poll
        writes = len(b.transport.written)
        b.clock.advance(timedelta(seconds=299))
        assert await b.poller.poll_meter(entry, fresh_within=300) is None
        assert b.poller.stats.skipped_fresh == 1 and len(b.transport.written) == writes  # nothing sent
        b.clock.advance(timedelta(seconds=2))
        assert await b.poller.poll_meter(entry, fresh_within=300) is not None


# --- configuration and the running gateway ----------------------------------------------------------------------


def test_poll_section_of_the_configuration():
    from gateway.config import ConfigError, build

    bus = [{"name": "b", "url": "tcp://127.0.0.1:7000", "meters": {"from": 1, "to": 2}}]
    assert build({"bus": bus}).poll == PollConfig(interval_s=900.0, retries=1, silent_after=1)
    cfg = build({"bus": bus, "poll": {"interval_s": 60, "retries": 0, "silent_after": 3}}).poll
    assert (cfg.interval_s, cfg.retries, cfg.silent_after) == (60.0, 0, 3)
    assert build({"bus": bus, "poll": {"interval_s": 0}}).poll.interval_s == 0  # off
    for bad, message in (
        ({"interval": 5}, "unknown key"),
        ({"interval_s": -1}, "must not be negative"),
        ({"silent_after": 0}, "at least 1"),
        ({"retries": "two"}, "not an integer"),
    ):
        with pytest.raises(ConfigError, match=message):
            build({"bus": bus, "poll": bad})


@pytest.mark.skipif(not HAVE_BROKER, reason="no MQTT broker listening on 127.0.0.1:1883")
async def test_the_gateway_runs_the_poller_and_publishes_its_events(tmp_path: Path):
    from gateway.app import Gateway
    from gateway.config import build
    from simulator.transports.tcp import serve_tcp

    fleet = Fleet([BusSpec("line-1", [MeterSpec(M1), MeterSpec(M2)])], VirtualClock(START, 0), seed=1)
    endpoint = await serve_tcp(fleet.buses["line-1"], "127.0.0.1", 0)
    prefix = new_prefix()
    probe = await Probe(1883, prefix).start()
    config = build(
        {
            "store": {"sqlite": str(tmp_path / "gw.sqlite")},
            "api": {"listen": "127.0.0.1:0"},
            "mqtt": {"url": f"mqtt://127.0.0.1:1883/{prefix}"},
            "poll": {"interval_s": 0.4},
            "bus": [{"name": "line-1", "url": f"tcp://127.0.0.1:{endpoint.port}", "td_max_ms": 50, "meters": [M1, M2]}],
        }
    )
    gateway = await Gateway(config).start()
    try:
        assert gateway.poller is not None
        await probe.until(lambda: gateway.poller.stats.rounds >= 1, timeout=10, what="a first round")  # type: ignore[union-attr]
        fleet.meter(M2).inject(FaultSpec(Fault.NO_REPLY), fleet.now())
        alarm = (await probe.until(lambda: probe.on("events/alarms"), timeout=10, what="meter_silent"))[0]
        assert (alarm["alarm"], alarm["address"], alarm["source"]) == ("meter_silent", M2, "meter")
        observed = await gateway.store.observation(M1)  # type: ignore[union-attr]
        assert observed is not None and observed.answering and observed.state["relay"] == "closed"
    finally:
        await gateway.stop()
        with contextlib.suppress(Exception):
            await probe.client.publish(f"{prefix}/status", b"", qos=1, retain=True, timeout=2)  # type: ignore[union-attr]
        await probe.aclose()
        await endpoint.aclose()
