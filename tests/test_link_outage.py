"""A lost line and request deadlines (gateway/link.py, "Lost line" and "Deadlines").

The wait for a lost line is the line's: one down-since time, so a dead line fails its whole queue
within about ``reconnect_s`` (it once cost ``reconnect_s`` per queued job, serially). A request
with a deadline (a command's validity end, ``MeterClient(..., not_after=)``) is never sent after it:
not first, not again after a reconnect, not as a retry. Everything runs on the in-memory line
(:class:`simline.SimLineTransport`) to simulated meters; the simulator says what reached them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from simline import SimLineTransport

from gateway.client import MeterClient, Reading
from gateway.errors import LinkDown, NoReply
from gateway.ledger import State, Store
from gateway.link import REOPEN_PAUSE_MAX_S, Expired, Link, LinkConfig
from gateway.service import CommandService, MeterEntry, ServiceConfig
from protocols.dlt645 import Deframer, ReadRequest, RelayCommand
from protocols.dlt645.security import SecurityDI
from simulator.bus import Bus
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import BusSpec, Fleet, MeterSpec
from simulator.scenario import from_flags

A1 = "000000000001"
MONEY = 0x00900200

FAST = LinkConfig(gap_s=0.0, td_max_s=0.05, margin_s=0.05, inter_byte_s=0.15, backoff_s=0.01, security_extra_s=0.1)


def config(**changes: object) -> LinkConfig:
    return dataclasses.replace(FAST, **changes)


@pytest.fixture
def fleet() -> Fleet:
    scenario = from_flags(3, 1, timing=False)
    return Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)


@pytest.fixture
def bus(fleet: Fleet) -> Bus:
    return fleet.buses["bus0"]


def is_recharge(data: bytes) -> bool:
    frames = Deframer().feed(data)
    return any(f.function == 0x03 and int.from_bytes(f.data[:4], "little") == SecurityDI.RECHARGE for f in frames)


def recharges(bus: Bus) -> int:
    """Recharge frames that reached the meters."""
    return sum(
        1
        for r in bus.history
        if r.request.function == 0x03 and int.from_bytes(r.request.data[:4], "little") == SecurityDI.RECHARGE
    )


class CuttableLine(SimLineTransport):
    """An in-memory line that goes down right after writing a frame ``cut`` selects (the frame reaches
    the bus, so the meter acts on it; its reply is lost), and comes back ``back_after`` s later."""

    def __init__(self, bus: Bus, cut: Callable[[bytes], bool] | None = None, back_after: float = 1.0) -> None:
        super().__init__(bus)
        self.cut = cut
        self.back_after = back_after
        self.cut_at: float | None = None

    async def write(self, data: bytes) -> None:
        await super().write(data)
        if self.cut is not None and self.cut(data):
            self.cut = None
            self.down = True
            self.cut_at = time.monotonic()
            asyncio.get_running_loop().call_later(self.back_after, setattr, self, "down", False)


async def read_once_back(client: MeterClient, within: float = 10.0) -> Reading:
    """Read MONEY as soon as the line works again (the link reopens it in the background)."""
    end = time.monotonic() + within
    while True:
        try:
            return await client.read(MONEY)
        except LinkDown:
            assert time.monotonic() < end, "the line did not come back into use"
            await asyncio.sleep(0.05)


# --- one outage clock per line --------------------------------------------------------------------


async def test_a_dead_line_fails_all_its_queued_jobs_within_about_reconnect_s(bus: Bus):
    """Eight queued reads and one that comes half-way through: all fail with LinkDown once the line
    has been down reconnect_s (1 s), not one after another (that took 8 s and more); a read while it
    stays down fails at once; once it is back, reads go through again."""
    reconnect, n = 1.0, 8
    transport = SimLineTransport(bus)
    transport.down = True  # down from the start: start() cannot open it
    async with Link(transport, config(reconnect_s=reconnect, retries=0), name="dead") as link:
        client = MeterClient(link, A1)
        began = time.monotonic()
        ended: list[float] = []

        async def one() -> BaseException | Reading:
            try:
                return await client.read(MONEY)
            except LinkDown as exc:
                return exc
            finally:
                ended.append(time.monotonic() - began)

        queued = [asyncio.ensure_future(one()) for _ in range(n)]
        await asyncio.sleep(reconnect / 2)
        late = asyncio.ensure_future(one())
        results = await asyncio.gather(*queued, late)
        assert all(isinstance(r, LinkDown) for r in results), results
        assert min(ended) >= 0.9 * reconnect  # the line was waited for ...
        assert max(ended) < reconnect + 1.5  # ... once, by all of them (n x reconnect_s before the fix)
        assert "line dead down for" in str(results[-1]) and "reconnect_s 1 s" in str(results[-1])
        assert link.down_since is not None

        began = time.monotonic()
        with pytest.raises(LinkDown):
            await client.read(MONEY)
        assert time.monotonic() - began < reconnect / 2  # at once: the line has been down for reconnect_s
        assert transport.written == []  # nothing ever reached the line

        transport.down = False
        assert (await read_once_back(client)).value == Decimal("100.00")
        assert link.down_since is None and link.stats.reconnects == 1
        assert (await client.read(MONEY)).value == Decimal("100.00")  # normal service


async def test_a_line_back_within_reconnect_s_lets_the_waiting_jobs_through(bus: Bus):
    transport = SimLineTransport(bus)
    async with Link(transport, config(reconnect_s=10.0, retries=0)) as link:
        client = MeterClient(link, A1)
        await client.read(MONEY)
        transport.down = True
        reads = [asyncio.ensure_future(client.read(MONEY)) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert not any(r.done() for r in reads)  # waiting for the line, none failed
        assert link.down_since is not None
        transport.down = False
        values = await asyncio.wait_for(asyncio.gather(*reads), 10)
        assert [v.value for v in values] == [Decimal("100.00")] * 3
        assert link.down_since is None  # a transaction got through: the outage is over
        assert link.stats.reconnects == 1

        # A new outage has its own clock: waited for again, not failed at once.
        transport.down = True
        reading = asyncio.ensure_future(client.read(MONEY))
        await asyncio.sleep(0.3)
        assert not reading.done()
        transport.down = False
        assert (await asyncio.wait_for(reading, 10)).value == Decimal("100.00")


async def test_a_line_that_drops_again_at_once_is_the_same_outage(bus: Bus):
    """Reopened, but the next attempt loses it again: the outage clock keeps running (it ends only
    when a transaction gets through), so the waiting read still fails about reconnect_s after the
    line first went down."""

    class Flapping(SimLineTransport):
        async def open(self) -> None:
            self.down = False  # opens ...
            await super().open()

        async def write(self, data: bytes) -> None:
            self.down = True  # ... and is gone again at every write
            await super().write(data)

        @property
        def connected(self) -> bool:
            return False

    reconnect = 1.0
    transport = Flapping(bus)
    async with Link(transport, config(reconnect_s=reconnect, retries=0)) as link:
        began = time.monotonic()
        with pytest.raises(LinkDown):
            await MeterClient(link, A1).read(MONEY)
        assert time.monotonic() - began < reconnect + 1.5
        assert link.stats.reconnects >= 2  # it was reopened, and lost again


async def test_a_peer_that_accepts_and_drops_is_not_hammered(bus: Bus):
    """Reopened and lost again at every write: the reopen pause grows across the reopens (it
    resets only when a transaction gets through), so 3 s cost a handful of reconnects and
    resends, not one every backoff_s (0.01 s here: before, a reconnect and a resend every few ms)."""

    class Flapping(SimLineTransport):
        writes = 0

        async def open(self) -> None:
            self.down = False
            await super().open()

        async def write(self, data: bytes) -> None:
            Flapping.writes += 1
            self.down = True
            await super().write(data)

    async with Link(Flapping(bus), config(reconnect_s=3.0, retries=0)) as link:
        with pytest.raises(LinkDown):
            await MeterClient(link, A1).read(MONEY)
        assert 2 <= link.stats.reconnects <= 8, link.stats
        assert Flapping.writes <= 9
        assert link._reopen_pause == REOPEN_PAUSE_MAX_S  # grown to its cap; reset when one gets through


# --- deadlines ----------------------------------------------------------------------------------


async def test_a_job_whose_deadline_passes_while_the_line_is_down_is_never_sent(bus: Bus):
    transport = SimLineTransport(bus)
    transport.down = True
    async with Link(transport, config(reconnect_s=10.0)) as link:
        began = time.monotonic()
        with pytest.raises(Expired) as caught:
            await link.transact(A1, ReadRequest(MONEY), deadline=time.monotonic() + 0.3)
        waited = time.monotonic() - began
        assert 0.3 <= waited < 3.0  # at its deadline, not after the line's reconnect_s (10 s)
        assert not caught.value.sent and isinstance(caught.value.cause, LinkDown)
        assert "not sent: its deadline has passed" in str(caught.value)
        # a job queued behind it, already past its deadline, is not sent when the line is back either
        transport.down = False
        with pytest.raises(Expired):
            await link.transact(A1, ReadRequest(MONEY), deadline=time.monotonic() - 1)
        assert transport.written == [] and len(bus.history) == 0
        assert link.stats.expired == 2


async def test_a_job_past_its_deadline_is_not_resent_after_a_reconnect(bus: Bus):
    """The read leaves, the line goes down before its reply; it comes back after the deadline: the
    read fails with Expired (sent) at its deadline and is not sent again."""
    transport = CuttableLine(bus, cut=lambda data: True, back_after=1.0)
    async with Link(transport, config(reconnect_s=10.0, retries=2)) as link:
        began = time.monotonic()
        with pytest.raises(Expired) as caught:
            await link.transact(A1, ReadRequest(MONEY), deadline=time.monotonic() + 0.3)
        assert time.monotonic() - began < 0.9  # at its deadline, before the line came back (1 s)
        assert caught.value.sent  # it went out once: it may have reached the meter
        assert len(transport.written) == 1
        client = MeterClient(link, A1)
        assert (await read_once_back(client)).value == Decimal("100.00")
        assert len(transport.written) == 2  # that read only: the expired one was never sent again


async def test_the_deadline_stops_retries_after_silence(fleet: Fleet, bus: Bus):
    transport = SimLineTransport(bus)
    async with Link(transport, config(retries=5)) as link:  # ~0.1 s a silent attempt, 6 attempts
        fleet.inject(A1, FaultSpec(Fault.NO_REPLY, remaining=10))
        with pytest.raises(Expired) as caught:
            await link.transact(A1, ReadRequest(MONEY), deadline=time.monotonic() + 0.15)
        assert caught.value.sent and isinstance(caught.value.cause, NoReply)
        assert 1 <= len(transport.written) < 6


@pytest.mark.parametrize(("back_after", "validity", "resent"), [(0.2, 5.0, True), (1.2, 0.4, False)])
async def test_a_recharge_lost_with_its_line_is_resent_only_within_not_after(
    fleet: Fleet, bus: Bus, back_after: float, validity: float, resent: bool
):
    """The recharge reaches the meter (applied), the line goes down before the reply. Back within
    ``not_after``: sent again, the meter answers "repeat recharge": ``duplicate``, the money added
    once. Back after it: Expired (sent), never sent again; the purchase count then shows it applied.

    The client's clock is the fleet's virtual one, days away from the wall clock: ``not_after`` is
    read on it."""
    transport = CuttableLine(bus, cut=is_recharge, back_after=back_after)
    async with Link(transport, config(reconnect_s=10.0)) as link:
        client = MeterClient(link, A1, clock=fleet.clock.now)
        before = fleet.state(A1)
        n = before["purchase_count"] + 1
        await client.session()
        not_after = fleet.clock.now() + timedelta(seconds=validity)
        if resent:
            result = await client.top_up(2000, n, before["customer"], not_after=not_after)
            assert result.outcome == "duplicate"
            assert recharges(bus) == 2
        else:
            with pytest.raises(Expired) as caught:
                await client.top_up(2000, n, before["customer"], not_after=not_after)
            assert caught.value.sent
            assert transport.cut_at is not None and time.monotonic() - transport.cut_at < back_after
            await read_once_back(client)
            assert await client.purchase_count() == n  # it was applied: settled by its count
            assert recharges(bus) == 1
        after = fleet.state(A1)
        assert after["purchase_count"] == n
        assert Decimal(after["remaining_money"]) == Decimal(before["remaining_money"]) + Decimal("20.00")


async def test_relay_commands_are_bounded_by_their_valid_until_on_the_clients_clock(fleet: Fleet, bus: Bus):
    transport = SimLineTransport(bus)
    async with Link(transport, dataclasses.replace(FAST)) as link:
        client = MeterClient(link, A1, clock=fleet.clock.now)
        await client.relay(RelayCommand.TRIP)  # valid 10 min on the (virtual) clock: sent
        assert fleet.state(A1)["relay"] == "open"
        sent = len(transport.written)
        with pytest.raises(Expired) as caught:
            await client.relay(RelayCommand.DIRECT_CLOSE, fleet.clock.now() - timedelta(minutes=1))
        assert not caught.value.sent
        assert len(transport.written) == sent  # nothing went out
        assert fleet.state(A1)["relay"] == "open"
        with pytest.raises(Expired):  # and the wall clock is the default
            await MeterClient(link, A1).write_mac(0x04001001, Decimal("30.00"), not_after=datetime.now(UTC))
        assert len(transport.written) == sent


# --- the command service ------------------------------------------------------------------------


async def test_a_topup_whose_line_is_lost_past_its_validity_is_settled_not_resent(tmp_path: Path):
    """The command service passes a top-up's valid_until to the client (and its own clock, days
    away from the wall clock here). The recharge leaves, the line goes down until after the validity
    end: the recharge is not sent again; the service's validity check reads the purchase count once
    the line is back and confirms it (before, the link resent it after the reconnect: ``duplicate``)."""
    meters = Fleet([BusSpec("line", [MeterSpec(A1)])], VirtualClock(datetime(2026, 11, 24, 10, tzinfo=UTC), 0))
    bus = meters.buses["line"]
    transport = CuttableLine(bus, cut=is_recharge, back_after=3.0)
    link = await Link(transport, config(reconnect_s=10.0, retries=1), name="line").start()
    store = await Store.sqlite(tmp_path / "ledger.sqlite").open()
    t0 = time.monotonic()
    base = datetime(2026, 11, 24, 10, tzinfo=UTC)

    def clock() -> datetime:
        return base + timedelta(seconds=time.monotonic() - t0)

    service = CommandService(
        store,
        {A1: MeterEntry(A1, "line")},
        {"line": link},
        now=clock,
        config=ServiceConfig(retry_delay=timedelta(seconds=0.2), poll_s=0.01),
    )
    before = meters.state(A1)
    command, _ = await service.submit(
        "T", "topup", A1, {"amount": "20.00"}, "test", valid_until=clock() + timedelta(seconds=1.5)
    )
    await service.start()
    try:
        await service.drain(30)
    finally:
        await service.stop()
        await link.stop()
    done = await store.get(command.id)
    events = await store.events(command_id=command.id)
    await store.close()
    assert done is not None and done.state is State.CONFIRMED, (done, [e.detail for e in events])
    assert done.result is not None and done.result["outcome"] == "applied before its validity ended"
    assert any("Expired" in str(e.detail.get("error", "")) for e in events)
    assert recharges(bus) == 1
    after = meters.state(A1)
    assert after["purchase_count"] == before["purchase_count"] + 1
    assert Decimal(after["remaining_money"]) == Decimal(before["remaining_money"]) + Decimal("20.00")
