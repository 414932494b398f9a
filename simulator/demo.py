"""``meterlink demo``: a simulated day of prepaid operations, verified against ground truth.

One command, no service needed. It starts a simulated fleet (50 meters on two lines, each
served on a localhost TCP port like an RS-485-to-Ethernet converter) and the gateway with a
SQLite ledger in a temporary directory, talking over real sockets. Then it runs a day:
top-ups (one of them retried after a lost reply, one submitted twice), a tariff change, a
meter running out of credit and tripping, a top-up restoring it, a remote cost-control
customer's wallet, a trip refused at night, and a meter that does not answer. It ends with a
summary of what happened and a check of the ledger against every meter's true state.

The demo is the one module that drives both halves (like an integration test): the gateway
itself never imports the simulator.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from firmware_stubs.wallet import Limits
from gateway.billing import RemoteBilling
from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import Policy
from gateway.poller import MeterEvent, PollConfig, Poller
from gateway.service import CommandService, MeterEntry, ServiceConfig
from gateway.transports import TcpClientTransport
from protocols.dlt645 import METER_TZ

from .clock import VirtualClock
from .faults import Fault, FaultSpec
from .fleet import BusSpec, Fleet, MeterSpec
from .transports.tcp import serve_tcp

START = datetime(2026, 11, 24, 7, 0, tzinfo=METER_TZ)  # a Tuesday
RUNS_OUT = "000000000007"
SILENT = "000000000050"
REMOTE = "000000000042"
RETRIED = "000000000003"
NIGHT_TRIP = "000000000011"


@dataclass
class Outcome:
    """One line of the summary."""

    operation: str
    expected: str
    observed: str
    ok: bool


@dataclass
class DemoReport:
    """What the demo did and verified."""

    meters: int
    buses: int
    virtual_start: str
    virtual_end: str
    commands: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    mismatches: int = 0
    mismatch_details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "meters": self.meters,
            "buses": self.buses,
            "virtual_start": self.virtual_start,
            "virtual_end": self.virtual_end,
            "commands": self.commands,
            "outcomes": [o.__dict__ for o in self.outcomes],
            "verified": all(o.ok for o in self.outcomes) and self.mismatches == 0,
            "mismatches": self.mismatches,
            "mismatch_details": self.mismatch_details,
            "seconds": round(self.seconds, 2),
        }


def _fleet_specs(meters: int) -> list[BusSpec]:
    specs = []
    for n in range(1, meters + 1):
        address = f"{n:012d}"
        spec = MeterSpec(address=address, balance=Decimal("80.00"), load="residential")
        if address == RUNS_OUT:
            # A shop drawing 2 kW with little credit: it runs out in the afternoon.
            spec.balance = Decimal("9.00")
            spec.watts = 2000
            spec.load = "constant"
            spec.limits = Limits(alarm_1=500, alarm_2=0, overdraft=0, hoarding=0, close_allowed=0)
            spec.external_relay = True  # closes by itself after a top-up (prepaid.md §1.5)
        if address == REMOTE:
            spec.mode = spec.mode.__class__("remote")
        specs.append(spec)
    half = (meters + 1) // 2
    return [BusSpec("line-1", specs[:half]), BusSpec("line-2", specs[half:])]


class Demo:
    """The day, step by step."""

    def __init__(self, meters: int, progress: Any) -> None:
        self.meter_count = meters
        self.progress = progress
        self.clock = VirtualClock(START, 0)
        self.fleet = Fleet(_fleet_specs(meters), self.clock, seed=2026)
        self.report = DemoReport(meters, 2, START.isoformat(), "")
        self.expected_topups: dict[str, list[int]] = {}
        self.tariff_meters: list[str] = []
        self.remote_expected = 0
        self.initial: dict[str, dict[str, Any]] = {}
        self.meter_events: list[MeterEvent] = []

    def say(self, text: str) -> None:
        stamp = self.clock.now().astimezone(METER_TZ).strftime("%H:%M")
        self.progress(f"[{stamp}] {text}")

    def outcome(self, operation: str, expected: str, observed: str, ok: bool) -> None:
        self.report.outcomes.append(Outcome(operation, expected, observed, ok))
        self.say(f"{'ok ' if ok else 'FAIL'} {operation}: {observed}")

    async def settle(self, step: timedelta = timedelta(seconds=5), limit: int = 400) -> None:
        """Let the gateway finish open commands, moving virtual time for its retries.

        Time moves ``step`` at a time only while no command is at work (the open ones wait for
        a retry), at most ``limit`` times; a slow machine gets up to 60 s of real time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        steps = 0
        while steps < limit and loop.time() < deadline:
            await asyncio.sleep(0.01)
            if await self.store.open_commands() == 0 and not self.service._tasks:
                return
            if not self.service._tasks:
                self.clock.advance(step)
                steps += 1
            self.service._wake.set()
        still = [
            f"{c.kind.value} {c.address} {c.state.value} attempts {c.attempts}"
            for c in await self.store.commands(limit=10_000)
            if not c.state.final
        ]
        running = [t.get_name() for t in self.service._tasks]
        raise TimeoutError(f"the gateway did not finish its commands: {'; '.join(still)} {running}")

    async def run(self) -> DemoReport:
        began = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="meterlink-demo-") as tmp:
            endpoints = [await serve_tcp(bus, "127.0.0.1", 0) for bus in self.fleet.buses.values()]
            self.store = await Store.sqlite(Path(tmp) / "ledger.sqlite").open()
            links = {}
            for name, ep in zip(self.fleet.buses, endpoints, strict=True):
                config = LinkConfig(td_max_s=0.1, margin_s=0.1, gap_s=0.0, retries=2, backoff_s=0.02)
                links[name] = await Link(TcpClientTransport(ep.host, ep.port), config, name=name).start()
            registry = {a: MeterEntry(a, sim.bus or "line-1") for a, sim in self.fleet.meters.items()}
            registry[REMOTE].mode = "remote"
            self.service = CommandService(
                self.store,
                registry,
                links,
                now=self.clock.now,
                policy=Policy(),
                config=ServiceConfig(retry_delay=timedelta(seconds=30), max_attempts=3),
            )
            await self.service.start()
            # The meter poller reports what meters do by themselves; its first look is the baseline.
            self.poller = Poller(self.service, PollConfig(interval_s=0))
            self.poller.listeners.append(self.meter_events.append)
            await self.poller.poll_once([RUNS_OUT])
            self.say(
                f"fleet of {self.meter_count} meters on 2 lines "
                f"({', '.join(e.description.split(' ')[0] for e in endpoints)}); ledger in SQLite"
            )
            for a in self.fleet.meters:
                self.initial[a] = self.fleet.state(a)
            # The remote customer's history in the ledger: 20.00 paid a week ago, 40.00 of
            # consumption billed, the wallet at -20.00 since three days ago.
            await self.store.book(REMOTE, 2000, "topup", "demo:remote-opening", START - timedelta(days=7))
            await self.store.book(REMOTE, -4000, "daily charge", "demo:remote-charges", START - timedelta(days=3))
            self.remote_expected = 2000 - 4000 + 2500
            try:
                await self.day()
                await self.verify()
            finally:
                await self.service.stop()
                for link in links.values():
                    await link.stop()
                for ep in endpoints:
                    await ep.aclose()
                await self.store.close()
        self.report.virtual_end = self.clock.now().astimezone(METER_TZ).isoformat()
        self.report.seconds = time.monotonic() - began
        return self.report

    async def topup(self, address: str, amount: str, key: str, actor: str = "counter-1") -> Any:
        command, _ = await self.service.submit(key, "topup", address, {"amount": amount}, actor)
        return command

    async def day(self) -> None:
        svc = self.service
        # 07:00 - 08:00: the morning's top-ups at the counter.
        self.say("morning top-ups for 19 customers")
        for n in range(1, 21):
            address = f"{n:012d}"
            if address == RUNS_OUT:
                continue
            amount = f"{10 * (1 + n % 5)}.00"
            await self.topup(address, amount, f"counter-1:2026-11-24:{n}")
            self.expected_topups.setdefault(address, []).append(int(Decimal(amount) * 100))
        await self.settle()
        confirmed = [c for c in await self.store.commands(state=State.CONFIRMED) if c.kind.value == "topup"]
        self.outcome("19 top-ups", "19 confirmed, read back", f"{len(confirmed)} confirmed", len(confirmed) == 19)

        # The same request submitted twice (a double click): one command, applied once.
        first = await self.topup(RETRIED, "30.00", "app:order-77")
        again, created = await svc.submit("app:order-77", "topup", RETRIED, {"amount": "30.00"}, "app")
        self.expected_topups.setdefault(RETRIED, []).append(3000)
        # ... and its recharge reply is lost on the line: the gateway resends the same purchase
        # count, the meter answers "repeat recharge", and the top-up counts once (dlt645.md §5.3).
        self.fleet.meter(RETRIED).faults.add(FaultSpec(Fault.TRUNCATED, remaining=1, function=0x03))
        await self.settle()
        final = await self.store.get(first.id)
        outcome = (final.result or {}).get("outcome") if final else None
        self.outcome(
            "top-up submitted twice, reply lost once",
            "one command, applied once",
            f"same command: {again.id == first.id and not created}; state {final.state if final else '?'} ({outcome})",
            again.id == first.id and not created and final is not None and final.state is State.CONFIRMED,
        )

        # 09:00: the daily billing finds the remote customer (REMOTE) below zero for longer
        # than the 48 h grace period: an arrears trip, checked by the policy like any other.
        self.clock.advance(timedelta(hours=2))
        billed = await RemoteBilling(svc).run(self.clock.now())
        await self.settle()
        relay = self.fleet.state(REMOTE)["relay"]
        self.outcome(
            "remote customer in arrears",
            "tripped once the grace period has run",
            f"trip submitted: {billed.trips == [REMOTE]}; relay {relay}",
            billed.trips == [REMOTE] and relay == "open",
        )

        # New prices for line 1 from 10:00 (backup set + switch time, read back).
        switch = (self.clock.now() + timedelta(hours=1)).astimezone(METER_TZ).replace(minute=0, second=0, microsecond=0)
        line1 = [a for a, sim in self.fleet.meters.items() if sim.bus == "line-1" and a != SILENT]
        for a in line1:
            await svc.submit(
                f"tariff-2026-11:{a}",
                "tariff",
                a,
                {"prices": ["0.6800", "0.5800", "0.5000", "0.3200"], "switch_at": switch.isoformat()},
                "tariff-team",
                batch="tariff-2026-11",
            )
        self.say(f"tariff change for {len(line1)} meters on line-1, switching at {switch:%H:%M}")
        await self.settle()
        tariffs = await self.store.commands(batch="tariff-2026-11", limit=1000)
        ok = sum(c.state is State.CONFIRMED for c in tariffs)
        self.outcome("tariff change", f"{len(line1)} confirmed by read-back", f"{ok} confirmed", ok == len(line1))
        self.tariff_meters = line1

        # The afternoon passes; meter 7 draws 2 kW and runs out of credit.
        for _ in range(8):
            self.clock.advance(timedelta(hours=1))
        state = self.fleet.state(RUNS_OUT)
        await self.poller.poll_once([RUNS_OUT])
        seen = [e.payload for e in self.meter_events if e.address == RUNS_OUT]
        reported = [p.get("alarm") or f"relay {p['relay']}" for p in seen]
        self.outcome(
            "meter out of credit",
            "trips itself (local cost control), the poller reports it",
            f"{RUNS_OUT} relay {state['relay']}, balance {state['remaining_money']}, overdraft {state['overdraft']}; "
            f"events: {', '.join(reported) or 'none'}",
            state["relay"] != "closed" and any(p.get("relay_open") and p["source"] == "meter" for p in seen),
        )

        # 17:00: the shop owner pays; the top-up restores supply (external relay closes).
        await self.topup(RUNS_OUT, "50.00", "counter-2:2026-11-24:shop")
        self.expected_topups.setdefault(RUNS_OUT, []).append(5000)
        await self.settle()
        state = self.fleet.state(RUNS_OUT)
        self.outcome(
            "top-up restores supply",
            "relay closed again",
            f"relay {state['relay']}, balance {state['remaining_money']}",
            state["relay"] == "closed",
        )

        # A remote cost-control customer: the ledger is the wallet; a top-up books money and,
        # for a customer cut off for arrears, restores supply (prepaid.md §1.1, §5.1).
        _, _ = await svc.submit("app:remote-1", "topup", REMOTE, {"amount": "25.00"}, "app")
        await self.settle()
        wallet = await self.store.wallet(REMOTE)
        relay = self.fleet.state(REMOTE)["relay"]
        self.outcome(
            "remote customer pays",
            "25.00 booked, supply restored",
            f"wallet {Decimal(wallet or 0).scaleb(-2)}, relay {relay}",
            wallet == 500 and relay == "closed",
        )

        # 22:30: a trip requested at night is refused by the policy and never sent.
        self.clock.advance(timedelta(hours=5, minutes=30))
        night, _ = await svc.submit(
            "ops:night-trip", "relay", NIGHT_TRIP, {"action": "trip", "arrears": True}, "ops-desk"
        )
        await self.settle()
        night = await self.store.get(night.id)
        events = await self.store.events(command_id=night.id) if night else []
        reason = events[-1].detail.get("reason") if events else None
        relay = self.fleet.state(NIGHT_TRIP)["relay"]
        self.outcome(
            "trip at night",
            "refused by policy, relay stays closed",
            f"{night.state if night else '?'}: {reason}; relay {relay}",
            night is not None and night.state is State.REFUSED and relay == "closed",
        )

        # A meter that does not answer: the top-up fails cleanly after its retries, money untouched.
        self.fleet.meter(SILENT).faults.add(FaultSpec(Fault.NO_REPLY))
        silent, _ = await svc.submit("counter-1:2026-11-24:silent", "topup", SILENT, {"amount": "40.00"}, "counter-1")
        await self.settle(step=timedelta(seconds=20))
        silent = await self.store.get(silent.id)
        self.outcome(
            "meter that does not answer",
            "failed after retries, nothing applied",
            f"{silent.state if silent else '?'} after {silent.attempts if silent else '?'} attempts",
            silent is not None and silent.state is State.FAILED,
        )
        self.fleet.meter(SILENT).faults.clear()
        # The next morning.
        morning = (self.clock.now().astimezone(METER_TZ) + timedelta(days=1)).replace(hour=8, minute=0, second=0)
        if morning - self.clock.now() > timedelta(days=1):
            morning -= timedelta(days=1)
        self.clock.advance(morning - self.clock.now())

    async def verify(self) -> None:
        """Ledger versus meters: every confirmed top-up applied exactly once, nothing else moved."""
        mismatches: list[str] = []
        commands = await self.store.commands(limit=10_000)
        counts: dict[str, int] = {}
        for c in commands:
            counts[c.state.value] = counts.get(c.state.value, 0) + 1
        self.report.commands = counts
        booked: dict[str, list[int]] = {}
        for c in commands:
            if (
                c.kind.value == "topup"
                and c.state is State.CONFIRMED
                and self.service.meters[c.address].mode == "local"
            ):
                booked.setdefault(c.address, []).append(int(c.params["amount_fen"]))
        for address, sim in self.fleet.meters.items():
            if self.service.meters[address].mode != "local":
                continue
            before, after = self.initial[address], self.fleet.state(address)
            wallet = sim.meter.wallet
            applied = wallet.purchases[: after["purchase_count"] - before["purchase_count"]]
            meter_amounts = sorted(p.amount for p in applied)
            ledger_amounts = sorted(booked.get(address, []))
            if meter_amounts != ledger_amounts:
                mismatches.append(f"{address}: meter applied {meter_amounts}, ledger confirmed {ledger_amounts}")
            expected = sorted(self.expected_topups.get(address, []))
            if address != SILENT and ledger_amounts != expected:
                mismatches.append(f"{address}: expected top-ups {expected}, ledger confirmed {ledger_amounts}")
        # The new prices are what the meters of line 1 charge now (their true state, not the read-back).
        new_prices = (6800, 5800, 5000, 3200)
        for address in self.tariff_meters:
            meter = self.fleet.meter(address).meter
            meter.advance(self.clock.now())
            if tuple(meter.tariff.prices.prices[:4]) != new_prices:
                mismatches.append(f"{address}: meter charges {meter.tariff.prices.prices[:4]}, not the new prices")
        # The remote customer's wallet is what the ledger's entries add up to.
        entries = await self.store.wallet(REMOTE)
        if entries != self.remote_expected:
            mismatches.append(f"{REMOTE}: ledger wallet {entries}, expected {self.remote_expected}")
        self.report.mismatches = len(mismatches)
        self.report.mismatch_details = mismatches
        self.say(f"verified {len(self.fleet.meters)} meters against the ledger: {len(mismatches)} mismatches")


def _table(report: DemoReport) -> str:
    width = max(len(o.operation) for o in report.outcomes)
    lines = [f"{'operation':<{width}}  ok    observed", f"{'-' * width}  ----  {'-' * 40}"]
    for o in report.outcomes:
        lines.append(f"{o.operation:<{width}}  {'yes ' if o.ok else 'NO  '}  {o.observed}")
    lines.append("")
    lines.append("commands by state: " + ", ".join(f"{k} {v}" for k, v in sorted(report.commands.items())))
    lines.append(f"ledger versus meters: {report.mismatches} mismatches")
    lines.append(f"virtual time {report.virtual_start} .. {report.virtual_end}, {report.seconds:.1f} s real")
    return "\n".join(lines)


@click.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--meters", type=click.IntRange(50, 2000), default=50, show_default=True)
def demo(as_json: bool, meters: int) -> None:
    """Run a simulated day of prepaid operations and verify it against the meters."""

    def progress(text: str) -> None:
        click.echo(text, err=as_json)

    try:
        report = asyncio.run(Demo(meters, progress).run())
    except (OSError, TimeoutError) as exc:
        click.echo(f"meterlink demo: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        click.echo("")
        click.echo(_table(report))
    if report.mismatches or not all(o.ok for o in report.outcomes):
        sys.exit(1)
