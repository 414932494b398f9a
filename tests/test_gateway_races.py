"""Races and edge cases found in review: each of these once went wrong.

* an arrears trip whose reply is lost, and the customer pays before the retry: supply comes back;
* a close that ran before a deferred trip does not hide the restore after it;
* a billing run that read an old baseline books nothing over a newer one (no day charged twice);
* power hold set through another gateway on the same ledger blocks this one's trip;
* the frames of a refused exchange are in the audit trail;
* a time sync across midnight does not leave the meter a day behind.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, time, timedelta

import pytest
from crashkit import PG_DSN, postgres_available
from remotekit import REMOTE, START, at, into_arrears
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import Policy
from gateway.service import CommandService, MeterEntry, ServiceConfig
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

R = REMOTE
M = "000000000002"
DAYTIME = Policy(quiet_start=time(22, 0), quiet_end=time(6, 0), grace=timedelta(hours=12))


async def until(predicate, what: str) -> None:
    for _ in range(500):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def remote_fleet(clock: VirtualClock) -> Fleet:
    from firmware_stubs.meter import CostMode

    return Fleet([BusSpec("bus0", [MeterSpec(R, mode=CostMode.REMOTE, load="constant", watts=2000)])], clock, seed=1)


class LossyRelay(SimLineTransport):
    """Loses the meter's replies to 0x1C while ``drop`` is set (the meter still acts)."""

    drop = False
    _dropping = False

    async def write(self, data: bytes) -> None:
        body = data.lstrip(b"\xfe")
        self._dropping = self.drop and body[8] & 0x1F == 0x1C
        await super().write(data)

    async def read(self, timeout: float) -> bytes:
        if self._dropping:
            await asyncio.sleep(min(timeout, 0.05))
            self.discard_input()
            return b""
        return await super().read(timeout)


async def test_customer_who_pays_while_a_trip_reply_is_lost_gets_supply_back(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = remote_fleet(clock)
    line = LossyRelay(fleet.buses["bus0"])
    link = await Link(line, LinkConfig(td_max_s=0.05, margin_s=0.05, retries=1)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    svc = await CommandService(
        store,
        {R: MeterEntry(R, "bus0", mode="remote")},
        {"bus0": link},
        now=clock.now,
        policy=DAYTIME,
        config=ServiceConfig(retry_delay=timedelta(minutes=10)),
    ).start()
    try:
        billing = await into_arrears(svc, clock, 1)
        at(clock, 2, 14)
        line.drop = True  # the trip acts, its replies are lost: it waits for a retry
        assert (await billing.run(clock.now())).trips == [R]
        trip = next(c for c in await store.commands(address=R) if c.params.get("arrears"))

        async def waiting() -> bool:
            current = await store.get(trip.id)
            return current.state is State.SENT and current.not_before is not None

        await until(waiting, "the trip to wait for its retry")
        line.drop = False
        assert fleet.state(R)["relay"] == "open"
        await svc.submit("pay", "topup", R, {"amount": "100.00"}, "app")

        async def paid() -> bool:
            return (await store.get_by_key("pay")).state is State.CONFIRMED

        await until(paid, "the payment")
        at(clock, 2, 14, 30)
        await svc.drain()
        assert fleet.state(R)["relay"] == "closed"
        restores = [c for c in await store.commands(address=R) if c.params.get("restore_for")]
        assert [c.state for c in restores] == [State.CONFIRMED]
    finally:
        await svc.stop()
        await link.stop()
        await store.close()


async def test_a_close_that_ran_before_a_deferred_trip_does_not_hide_the_restore(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = remote_fleet(clock)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    svc = await CommandService(store, {R: MeterEntry(R, "bus0", mode="remote")}, {"bus0": link}, now=clock.now).start()
    try:
        billing = await into_arrears(svc, clock, 0, 30)
        at(clock, 4, 0, 30)  # Saturday: the trip is deferred to Monday 09:00
        assert (await billing.run(clock.now())).trips == [R]
        at(clock, 5, 12)  # Sunday: an operator closes the (closed) relay anyway
        await svc.submit("ops-close", "relay", R, {"action": "direct-close"}, "ops")

        async def closed() -> bool:
            return (await store.get_by_key("ops-close")).state.final

        await until(closed, "the operator's close")
        at(clock, 6, 9, 1)  # Monday: the trip runs
        await svc.drain()
        assert fleet.state(R)["relay"] == "open"
        at(clock, 6, 12)
        await svc.submit("pay", "topup", R, {"amount": "100.00"}, "app")
        await svc.drain()
        assert fleet.state(R)["relay"] == "closed"
    finally:
        await svc.stop()
        await link.stop()
        await store.close()


_NO_PG = postgres_available()


@pytest.mark.parametrize(
    "dialect", ["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(_NO_PG is not None, reason=_NO_PG or ""))]
)
async def test_a_billing_run_with_an_old_baseline_books_nothing(tmp_path, dialect):
    schema = f"test_settle_{uuid.uuid4().hex[:10]}"
    opened = Store.sqlite(tmp_path / "l.sqlite") if dialect == "sqlite" else Store.postgres(PG_DSN, schema)
    store = await opened.open()
    day = datetime(2026, 11, 25, tzinfo=METER_TZ)
    now = day + timedelta(days=2, minutes=30)
    try:
        await store.book(R, 10000, "topup", "t", now)
        assert not await store.settle(R, None, day - timedelta(days=1), ["0"] * 4, None, now)
        assert not await store.settle(R, None, day, ["9"] * 4, None, now)  # a baseline exists: not replaced
        old = (await store.baseline(R))[0]
        # Gateway B settles freeze D+1 from baseline D-1 (two days) ...
        b_ref = f"daily:{R}:{day + timedelta(days=1)}"
        assert await store.settle(R, old, day + timedelta(days=1), ["48", "0", "0", "0"], (-2400, "daily", b_ref), now)
        # ... gateway A, which read baseline D-1 before that, settles freeze D: nothing happens.
        a_ref = f"daily:{R}:{day}"
        assert not await store.settle(R, old, day, ["24", "0", "0", "0"], (-1200, "daily", a_ref), now)
        assert await store.wallet(R) == 10000 - 2400
        assert (await store.baseline(R))[0] == day + timedelta(days=1)
    finally:
        await store.close()
        if dialect == "postgres":
            import psycopg

            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def test_power_hold_set_through_another_gateway_blocks_a_trip(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(M)])], clock, seed=1)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store_a = await Store.sqlite(tmp_path / "l.sqlite").open()
    store_b = await Store.sqlite(tmp_path / "l.sqlite").open()
    meters = {M: MeterEntry(M, "bus0")}
    a = CommandService(store_a, meters, {"bus0": link}, now=clock.now, policy=DAYTIME, owner="A")
    b = CommandService(store_b, dict(meters), {"bus0": link}, now=clock.now, policy=DAYTIME, owner="B")
    try:
        await a.start()
        await a.submit("close", "relay", M, {"action": "direct-close"}, "op")  # A has looked at this meter
        await a.drain()
        await a.stop()
        await b.start()
        await b.submit("hold", "relay", M, {"action": "power-hold-on"}, "op")
        await b.drain()
        await b.stop()
        a._stopping = False
        await a.start()
        await a.submit("trip", "relay", M, {"action": "trip"}, "op")
        await a.drain()
        trip = await store_a.get_by_key("trip")
        assert trip.state is State.REFUSED
        # refused by the policy, not by the meter
        assert (await store_a.events(command_id=trip.id))[-1].detail["rule"] == "power_hold"
    finally:
        await a.stop()
        await link.stop()
        await store_a.close()
        await store_b.close()


async def test_a_refused_exchange_is_in_the_audit_trail(tmp_path):
    """A trip the meter refuses (power hold on the meter, not known to this gateway's policy)."""
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(M)])], clock, seed=1)
    line = SimLineTransport(fleet.buses["bus0"])
    link = await Link(line, LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    svc = await CommandService(store, {M: MeterEntry(M, "bus0")}, {"bus0": link}, now=clock.now, policy=DAYTIME).start()
    try:
        fleet.meter(M).meter.relay.hold = True  # set on the meter behind the gateway's back
        before = len(line.written)
        await svc.submit("trip", "relay", M, {"action": "trip"}, "op")
        await svc.drain()
        trip = await store.get_by_key("trip")
        assert trip.state is State.REFUSED
        audited = [f for e in await store.events(command_id=trip.id) for f in e.frames]
        on_the_line = [w.hex() for w in line.written[before:]]
        assert on_the_line and all(any(w in a for a in audited) for w in on_the_line)
        replies = [bytes.fromhex(f).lstrip(b"\xfe")[8] for f in audited]
        assert 0xDC in replies  # the meter's refusal of the 0x1C
    finally:
        await svc.stop()
        await link.stop()
        await store.close()


class SlowLine(SimLineTransport):
    """Each request takes 2 s of (virtual) time: a slow line near midnight."""

    clock: VirtualClock

    async def write(self, data: bytes) -> None:
        self.clock.advance(timedelta(seconds=2))
        await super().write(data)


async def test_a_time_sync_across_midnight_leaves_the_meter_on_the_right_day(tmp_path):
    clock = VirtualClock(datetime(2026, 11, 24, 23, 59, 52, tzinfo=METER_TZ), 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(R)])], clock, seed=3)
    line = SlowLine(fleet.buses["bus0"])
    line.clock = clock
    link = await Link(line, LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    svc = await CommandService(store, {R: MeterEntry(R, "bus0")}, {"bus0": link}, now=clock.now).start()
    try:
        meter = fleet.meter(R).meter
        meter.advance(clock.now())
        meter.clock.jump(-120, meter.now_ms)
        cmd, _ = await svc.submit("sync", "time_sync", R, {}, "ops")
        await svc.drain()
        assert (await store.get(cmd.id)).state is State.CONFIRMED
        meter.advance(clock.now())
        assert abs((meter.local_time() - clock.now()).total_seconds()) < 10
    finally:
        await svc.stop()
        await link.stop()
        await store.close()


async def test_a_deferred_trip_stays_valid_for_the_whole_daytime_window(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = remote_fleet(clock)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    svc = await CommandService(store, {R: MeterEntry(R, "bus0", mode="remote")}, {"bus0": link}, now=clock.now).start()
    try:
        billing = await into_arrears(svc, clock, 1)
        at(clock, 4, 1, 30)  # Saturday night, grace over: deferred to Monday 09:00, valid until 18:00
        assert (await billing.run(clock.now())).trips == [R]
        trip = next(c for c in await store.commands(address=R) if c.params.get("arrears"))
        monday = START.date() + timedelta(days=6)
        assert trip.not_before == datetime.combine(monday, time(9), METER_TZ)
        assert trip.valid_until == datetime.combine(monday, time(18), METER_TZ)
        at(clock, 6, 17, 30)  # a busy line: it gets its turn late in the afternoon, still valid
        await svc.drain()
        assert (await store.get(trip.id)).state is State.CONFIRMED
        assert fleet.state(R)["relay"] == "open"
    finally:
        await svc.stop()
        await link.stop()
        await store.close()
