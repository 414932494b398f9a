"""Remote cost control: daily charges from the daily freeze, wallet at zero, grace, arrears trip."""

from __future__ import annotations

import asyncio
from datetime import datetime, time, timedelta
from decimal import Decimal

from remotekit import REMOTE, START, at, into_arrears
from simline import SimLineTransport

from gateway.billing import RemoteBilling, RemoteTariff
from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import Policy
from gateway.service import CommandService, MeterEntry
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec


async def make(tmp_path, watts: int = 1000):
    from firmware_stubs.meter import CostMode

    clock = VirtualClock(START, 0)
    spec = MeterSpec(REMOTE, mode=CostMode.REMOTE, load="constant", watts=watts)
    fleet = Fleet([BusSpec("bus0", [spec, MeterSpec("000000000002")])], clock, seed=1)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    meters = {REMOTE: MeterEntry(REMOTE, "bus0", mode="remote"), "000000000002": MeterEntry("000000000002", "bus0")}
    # Trips allowed in the daytime on weekdays only; 12 h grace.
    policy = Policy(quiet_start=time(22, 0), quiet_end=time(6, 0), grace=timedelta(hours=12))
    service = await CommandService(store, meters, {"bus0": link}, now=clock.now, policy=policy).start()
    return clock, fleet, link, store, service


async def finish(link, store, service):
    await service.stop()
    await link.stop()
    await store.close()


async def test_daily_charge_is_priced_from_the_freeze_and_booked_once(tmp_path):
    clock, fleet, link, store, service = await make(tmp_path)
    try:
        await service.submit("t", "topup", REMOTE, {"amount": "30.00"}, "counter")
        await service.drain()
        billing = RemoteBilling(service, RemoteTariff((Decimal("0.6"), Decimal("0.5"), Decimal("0.5"), Decimal("0.3"))))
        clock.advance(timedelta(hours=13))  # past midnight: the first daily freeze
        first = await billing.run(clock.now())
        assert REMOTE in first.skipped and "baseline" in first.skipped[REMOTE]
        clock.advance(timedelta(days=1))
        second = await billing.run(clock.now())
        # 1 kW for 24 h between the two freezes, priced per tariff period of the meter's TOU
        # schedule (valley 23-07 = 8 h at 0.3, peak 08-11 and 18-23 = 8 h at 0.5, flat 9 h... )
        frozen = fleet.meter(REMOTE).meter.daily
        t_now, t_before = frozen[0].energy.forward, frozen[1].energy.forward
        used = [Decimal(a - b).scaleb(-2) for a, b in zip(t_now[1:], t_before[1:], strict=True)]
        assert sum(used) == Decimal("24.00")
        expected = int(sum(u * p for u, p in zip(used, billing.tariff.prices, strict=True)).scaleb(2))
        assert second.charged == {REMOTE: expected}
        assert await store.wallet(REMOTE) == 3000 - expected
        again = await billing.run(clock.now())  # same freeze: nothing booked twice
        assert again.charged == {} and await store.wallet(REMOTE) == 3000 - expected
    finally:
        await finish(link, store, service)


async def test_wallet_at_zero_trips_after_the_grace_period_and_a_top_up_restores(tmp_path):
    clock, fleet, link, store, service = await make(tmp_path, watts=2000)
    try:
        await service.submit("t", "topup", REMOTE, {"amount": "5.00"}, "counter")
        await service.drain()
        billing = RemoteBilling(service)
        clock.advance(timedelta(hours=13))  # Wednesday 01:00
        await billing.run(clock.now())
        clock.advance(timedelta(days=1))  # Thursday 01:00: 48 kWh x 0.5 = 24.00 charged
        run = await billing.run(clock.now())
        assert run.charged[REMOTE] == 2400 and await store.wallet(REMOTE) == 500 - 2400
        assert run.trips == []  # grace period starts now
        clock.advance(timedelta(hours=13))  # Thursday 14:00: grace (12 h) over, daytime
        run = await billing.run(clock.now())
        assert run.trips == [REMOTE]
        await service.drain()
        trip = next(c for c in await store.commands(address=REMOTE) if c.kind.value == "relay")
        assert trip.state is State.CONFIRMED
        assert fleet.state(REMOTE)["relay"] == "open"
        # Paying more than the debt restores supply automatically (prepaid.md §5.1).
        await service.submit("pay", "topup", REMOTE, {"amount": "50.00"}, "app")
        await service.drain()
        assert fleet.state(REMOTE)["relay"] == "closed"
        assert await store.wallet(REMOTE) == 500 - 2400 + 5000
    finally:
        await finish(link, store, service)


async def test_the_grace_period_survives_a_gateway_restart(tmp_path):
    clock, _fleet, link, store, service = await make(tmp_path, watts=2000)
    try:
        await service.submit("t", "topup", REMOTE, {"amount": "5.00"}, "counter")
        await service.drain()
        billing = RemoteBilling(service)
        clock.advance(timedelta(hours=13))
        await billing.run(clock.now())
        clock.advance(timedelta(days=1))  # Thursday 01:00: the wallet goes below zero
        await billing.run(clock.now())
        reached_zero = await store.zero_since(REMOTE)
        assert reached_zero == clock.now().astimezone(reached_zero.tzinfo)
        # A new gateway process (new service, new billing: nothing in memory) on the same ledger.
        service.zero_since.clear()
        fresh = RemoteBilling(service)
        clock.advance(timedelta(hours=13))  # 13 h after zero: the 12 h grace has run
        run = await fresh.run(clock.now())
        assert run.trips == [REMOTE]
        await service.submit("pay", "topup", REMOTE, {"amount": "50.00"}, "app")
        await service.drain()
        assert await store.zero_since(REMOTE) is None
    finally:
        await finish(link, store, service)


async def make_default_policy(tmp_path, watts: int = 2000):
    """The service with the default policy (quiet 18:00-09:00, weekends, 48 h grace)."""
    from firmware_stubs.meter import CostMode

    clock = VirtualClock(START, 0)
    spec = MeterSpec(REMOTE, mode=CostMode.REMOTE, load="constant", watts=watts)
    fleet = Fleet([BusSpec("bus0", [spec])], clock, seed=1)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    meters = {REMOTE: MeterEntry(REMOTE, "bus0", mode="remote")}
    service = await CommandService(store, meters, {"bus0": link}, now=clock.now).start()
    return clock, fleet, link, store, service


async def test_a_restart_loses_no_days_charge(tmp_path):
    """The baseline freeze is in the ledger: the first run of a new process charges the day."""
    clock, _fleet, link, store, service = await make(tmp_path)
    try:
        await service.submit("t", "topup", REMOTE, {"amount": "100.00"}, "counter")
        await service.drain()
        at(clock, 1, 0, 30)
        first = await RemoteBilling(service).run(clock.now())
        assert "baseline" in first.skipped[REMOTE]
        at(clock, 2, 0, 30)
        restarted = RemoteBilling(service)  # a new process: nothing in memory
        run = await restarted.run(clock.now())
        assert run.charged == {REMOTE: 1200}  # 24 kWh x 0.50
        again = await RemoteBilling(service).run(clock.now())
        assert again.charged == {} and await store.wallet(REMOTE) == 10000 - 1200
    finally:
        await finish(link, store, service)


async def test_default_policy_defers_the_arrears_trip_past_quiet_hours_instead_of_refusing_it(tmp_path):
    """Billing runs at 00:30, inside the default quiet hours: the trip waits for 09:00 and goes."""
    clock, fleet, link, store, service = await make_default_policy(tmp_path)
    try:
        await service.submit("t", "topup", REMOTE, {"amount": "5.00"}, "counter")
        await service.drain()
        billing = RemoteBilling(service)
        at(clock, 1, 0, 30)  # Wednesday 00:30: baseline
        await billing.run(clock.now())
        at(clock, 2, 0, 30)  # Thursday 00:30: 48 kWh charged, wallet below zero, grace starts
        await billing.run(clock.now())
        assert await store.wallet(REMOTE) < 0
        at(clock, 4, 0, 30)  # Saturday 00:30: 48 h of grace have run, but it is the weekend
        run = await billing.run(clock.now())
        assert run.trips == [REMOTE]
        trip = next(c for c in await store.commands(address=REMOTE) if c.params.get("arrears"))
        assert trip.not_before == datetime.combine(START.date() + timedelta(days=6), time(9, 0), tzinfo=METER_TZ)
        assert (await billing.run(clock.now())).trips == []  # one pending trip is enough
        at(clock, 5, 12)  # Sunday noon: still waiting, nothing refused
        await asyncio.sleep(0.2)
        assert (await store.get(trip.id)).state is State.ACCEPTED
        assert fleet.state(REMOTE)["relay"] == "closed"
        at(clock, 6, 9, 1)  # Monday 09:01
        await service.drain()
        assert (await store.get(trip.id)).state is State.CONFIRMED
        assert fleet.state(REMOTE)["relay"] == "open"
    finally:
        await finish(link, store, service)


async def test_a_deferred_arrears_trip_is_not_sent_once_the_customer_has_paid(tmp_path):
    clock, fleet, link, store, service = await make_default_policy(tmp_path)
    try:
        billing = await into_arrears(service, clock, 0, 30)
        at(clock, 4, 0, 30)  # Saturday: the trip is deferred to Monday 09:00
        assert (await billing.run(clock.now())).trips == [REMOTE]
        await service.submit("pay", "topup", REMOTE, {"amount": "100.00"}, "app")
        for _ in range(200):  # the payment is booked at once; the trip waits for Monday
            if (await store.get_by_key("pay")).state is State.CONFIRMED:
                break
            await asyncio.sleep(0.02)
        at(clock, 6, 9, 1)
        await service.drain()
        trip = next(c for c in await store.commands(address=REMOTE) if c.params.get("arrears"))
        assert trip.state is State.REFUSED
        events = await store.events(command_id=trip.id)
        assert events[-1].detail["rule"] == "paid"
        assert fleet.state(REMOTE)["relay"] == "closed"
    finally:
        await finish(link, store, service)


async def test_an_arrears_trip_refused_for_power_hold_is_tried_again_after_the_hold_ends(tmp_path):
    clock, fleet, link, store, service = await make(tmp_path, watts=2000)
    try:
        await service.submit("t", "topup", REMOTE, {"amount": "5.00"}, "counter")
        await service.submit("hold", "relay", REMOTE, {"action": "power-hold-on"}, "ops")
        await service.drain()
        billing = RemoteBilling(service)
        at(clock, 1, 1)
        await billing.run(clock.now())
        at(clock, 2, 1)
        await billing.run(clock.now())
        at(clock, 2, 14)  # grace (12 h) over, daytime: the trip is refused for the power hold
        assert (await billing.run(clock.now())).trips == [REMOTE]
        await service.drain()
        first = next(c for c in await store.commands(address=REMOTE) if c.params.get("arrears"))
        assert first.state is State.REFUSED
        assert (await store.events(command_id=first.id))[-1].detail["rule"] == "power_hold"
        assert (await billing.run(clock.now())).trips == []  # not again the same day
        await service.submit("release", "relay", REMOTE, {"action": "power-hold-off"}, "ops")
        await service.drain()
        at(clock, 3, 14)
        assert (await billing.run(clock.now())).trips == [REMOTE]
        await service.drain()
        assert fleet.state(REMOTE)["relay"] == "open"
    finally:
        await finish(link, store, service)


async def test_power_hold_set_by_a_command_survives_a_restart(tmp_path):
    _clock, _fleet, link, store, service = await make(tmp_path)
    try:
        await service.submit("hold", "relay", REMOTE, {"action": "power-hold-on"}, "ops")
        await service.drain()
        service.power_hold.clear()  # a new process knows only the ledger
        await service.submit("trip", "relay", REMOTE, {"action": "trip"}, "ops")
        await service.drain()
        trip = await store.get_by_key("trip")
        assert trip.state is State.REFUSED
        assert (await store.events(command_id=trip.id))[-1].detail["rule"] == "power_hold"
    finally:
        await finish(link, store, service)


async def test_a_restore_lost_in_a_crash_is_submitted_at_the_next_start(tmp_path):
    """Top-up booked, gateway dies before submitting the restore: start() finds and sends it."""
    clock, fleet, link, store, service = await make(tmp_path, watts=2000)
    try:
        billing = await into_arrears(service, clock, 1, 0)
        at(clock, 2, 14)
        await billing.run(clock.now())
        await service.drain()
        assert fleet.state(REMOTE)["relay"] == "open"
        await service.stop()
        # The top-up's wallet entry is booked, and the process dies before the restore exists.
        await store.book(REMOTE, 10000, "topup", "topup:lost-restore", clock.now())
        assert not [c for c in await store.commands(address=REMOTE) if c.params.get("restore_for")]
        service2 = await CommandService(
            store, service.meters, service.links, now=clock.now, policy=service.policy
        ).start()
        try:
            await service2.drain()
            restore = [c for c in await store.commands(address=REMOTE) if c.params.get("restore_for")]
            assert [c.state for c in restore] == [State.CONFIRMED]
            assert fleet.state(REMOTE)["relay"] == "closed"
            assert await service2.reconcile_remote() == []  # nothing more to do
        finally:
            await service2.stop()
    finally:
        await finish(link, store, service)


async def test_lines_are_billed_at_the_same_time(tmp_path):
    """Each line is half duplex, but billing does not wait for one line before the next."""
    from firmware_stubs.meter import CostMode

    clock = VirtualClock(START, 0)
    specs = [
        BusSpec(f"bus{i}", [MeterSpec(f"00000000000{i + 1}", mode=CostMode.REMOTE, load="constant", watts=1000)])
        for i in range(2)
    ]
    fleet = Fleet(specs, clock, seed=1)
    log: list[tuple[str, str]] = []

    class Watched(SimLineTransport):
        async def write(self, data: bytes) -> None:
            log.append((self.bus.name, "start"))
            await asyncio.sleep(0.05)  # a slow line
            await super().write(data)

    links = {}
    for name in fleet.buses:
        line = Watched(fleet.buses[name])
        links[name] = await Link(line, LinkConfig(td_max_s=0.1, margin_s=0.1)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    meters = {f"00000000000{i + 1}": MeterEntry(f"00000000000{i + 1}", f"bus{i}", mode="remote") for i in range(2)}
    service = await CommandService(store, meters, links, now=clock.now).start()
    try:
        at(clock, 1, 1)  # past midnight: each meter has a daily freeze (two reads per meter)
        run = await RemoteBilling(service).run(clock.now())
        assert set(run.skipped) == set(meters) and all("baseline" in v for v in run.skipped.values())
        first_of_bus1 = log.index(("bus1", "start"))
        last_of_bus0 = max(i for i, entry in enumerate(log) if entry == ("bus0", "start"))
        assert first_of_bus1 < last_of_bus0, log  # interleaved, not one line after the other
    finally:
        await service.stop()
        for link in links.values():
            await link.stop()
        await store.close()
