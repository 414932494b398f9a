"""The gateway's Link (scheduler, timeouts, retries, reply checks) and MeterClient against the simulator.

Every test talks to simulated meters through a real transport path: the in-memory
:class:`simline.SimLineTransport`, TCP, a pty opened through ``serial://`` (parity N), or MQTT
through Mosquitto (127.0.0.1:1883, a unique topic prefix per test; skipped if nothing listens).
The simulator's ground truth (``fleet.state``) and its bus counters (``bus.stats``,
``bus.history``) say what really happened on the line. The broker-restart test runs its own
``mosquitto`` on a free port and never touches the machine's broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simline import SimLineTransport

from gateway.client import FRAME_TAP, BroadcastResult, MeterClient, WriteResult
from gateway.errors import GatewayError, LinkDown, MeterRefused, NoReply, ReplyMismatch, WrongMeter
from gateway.link import DEFAULT_BAUD, Link, LinkConfig, Priority, reply_bound
from gateway.transports import MqttConnection, MqttTransport, TcpClientTransport, Transport, open_transport
from protocols.dlt645 import (
    BROADCAST,
    DI_2007,
    PROFILES,
    WILDCARD,
    BroadcastTime,
    Deframer,
    ErrorFlags,
    ErrorReply,
    Frame,
    Password,
    ReadAddressRequest,
    ReadFollowUpRequest,
    ReadRequest,
    RelayCommand,
    RelayControlRequest,
    WriteRequest,
    build_frame,
    encode_frame,
    parse_payload,
)
from protocols.dlt645.edition1997 import Read1997Request
from protocols.dlt645.followup import split_reply
from protocols.dlt645.profile import SGCC_2013
from protocols.dlt645.security import SecurityDI, SecurityRequest
from protocols.esam import MasterStation
from simulator.bus import Bus, BusMeter, LineTiming
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSet, FaultSpec
from simulator.fleet import Fleet
from simulator.scenario import from_flags
from simulator.transports import open_pty_bus, serve_tcp, start_mqtt_bridge

A1, A2, A3 = "000000000001", "000000000002", "000000000003"
ENERGY = 0x00010000  # forward active energy, total (XXXXXX.XX kWh)
VOLTAGE = 0x02010100  # phase A voltage (XXX.X V)
MONEY = 0x00900200  # remaining money (XXXXXX.XX yuan)
ADDRESS = 0x04000401  # communication address (12 digits)
ENERGY_WALLET = 0x00900100  # served only by energy-wallet meters: ERR "no data" on ours
MOSQUITTO = "/usr/sbin/mosquitto"

FAST = LinkConfig(
    gap_s=0.0,
    td_max_s=0.05,
    margin_s=0.05,
    inter_byte_s=0.15,
    retries=2,
    backoff_s=0.01,
    security_extra_s=0.1,
)
"""Short timeouts for the in-memory line (replies are immediate with timing off)."""


def broker_listening(port: int = 1883) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


HAVE_BROKER = broker_listening()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_fleet(meters: int = 3, buses: int = 1) -> Fleet:
    scenario = from_flags(meters, buses, timing=False)
    return Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)


def config(**changes: object) -> LinkConfig:
    return dataclasses.replace(FAST, **changes)


@pytest.fixture
def fleet() -> Fleet:
    return make_fleet()


@pytest.fixture
def bus(fleet: Fleet) -> Bus:
    return fleet.buses["bus0"]


@pytest.fixture
async def sim_link(bus: Bus) -> AsyncIterator[Link]:
    """A Link with short timeouts on an in-memory line to the fleet's bus."""
    async with Link(SimLineTransport(bus), dataclasses.replace(FAST)) as link:
        yield link


def written(link: Link) -> list[bytes]:
    transport = link.transport
    assert isinstance(transport, SimLineTransport)
    return transport.written


# --- every transport ------------------------------------------------------------------------

KINDS = ["sim", "tcp", "pty", "mqtt"]


@pytest.fixture(params=KINDS)
async def line(request: pytest.FixtureRequest, fleet: Fleet, bus: Bus) -> AsyncIterator[Link]:
    """A started Link to the fleet's bus over each kind of transport."""
    kind = request.param
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sim":
            transport: Transport = SimLineTransport(bus)
        elif kind == "tcp":
            tcp = await serve_tcp(bus, "127.0.0.1", 0)
            stack.push_async_callback(tcp.aclose)
            transport = open_transport(f"tcp://127.0.0.1:{tcp.port}")
        elif kind == "pty":
            endpoint = open_pty_bus(bus)
            stack.push_async_callback(endpoint.aclose)
            transport = open_transport(f"serial://{endpoint.device_path}?parity=N")
        else:
            if not HAVE_BROKER:
                pytest.skip("no MQTT broker listening on 127.0.0.1:1883")
            prefix = f"meterlink-link-test/{uuid.uuid4().hex[:12]}"
            bridge = await start_mqtt_bridge(fleet.buses, "mqtt://127.0.0.1:1883", None, prefix)
            stack.push_async_callback(bridge.aclose)
            transport = open_transport(f"mqtt://127.0.0.1:1883/{prefix}/{bus.name}")
        link = Link(transport, LinkConfig(gap_s=0.005))
        await link.start()
        stack.push_async_callback(link.stop)
        assert transport.connected
        yield link


async def test_reads_of_several_dis_from_several_meters(line: Link, fleet: Fleet):
    for address in (A1, A2, A3):
        client = MeterClient(line, address)
        energy, voltage, money, own = await client.read_many([ENERGY, VOLTAGE, MONEY, ADDRESS])
        truth = fleet.state(address)
        assert (energy.di, energy.unit, energy.value) == (ENERGY, "kWh", Decimal(truth["energy_kwh"]))
        meter = fleet.meter(address).meter
        assert (voltage.di, voltage.unit, voltage.value) == (VOLTAGE, "V", Decimal(meter.voltage_dv()).scaleb(-1))
        assert (money.di, money.unit, money.value) == (MONEY, "yuan", Decimal(truth["remaining_money"]))
        assert (own.di, own.value) == (ADDRESS, address)
        assert {r.address for r in (energy, voltage, money, own)} == {address}
    assert line.stats.transactions == 12 and line.stats.timeouts == 0


async def test_top_up_applied_then_duplicate(line: Link, fleet: Fleet):
    before = fleet.state(A2)
    assert (before["remaining_money"], before["purchase_count"]) == ("100.00", 1)
    client = MeterClient(line, A2, priority=Priority.COMMAND)
    first = await client.top_up(5000, 2, before["customer"])
    assert (first.outcome, first.amount_fen, first.purchase_count) == ("applied", 5000, 2)
    assert first.frames  # request and reply as they went on the wire
    again = await client.top_up(5000, 2, before["customer"])
    assert again.outcome == "duplicate"
    after = fleet.state(A2)
    assert (after["remaining_money"], after["purchase_count"]) == ("150.00", 2)  # applied exactly once
    assert (await client.read(MONEY)).value == Decimal("150.00")
    assert fleet.state(A1)["remaining_money"] == "100.00"  # nobody else


async def test_account_opening_reports_what_the_meter_did(sim_link: Link, fleet: Fleet):
    """Opening with the meter's own purchase count only marks the account open (dlt645.md §5.3
    rule 4): reported as ``opened_only``, not ``applied``, since no money was added."""
    client = MeterClient(sim_link, A1, priority=Priority.COMMAND)
    before = fleet.state(A1)
    assert before["purchase_count"] == 1  # an open account
    result = await client.top_up(5000, 1, before["customer"], opening=True)
    assert result.outcome == "opened_only"
    assert fleet.state(A1)["remaining_money"] == before["remaining_money"]  # nothing added

    wallet = fleet.meter(A2).meter.wallet  # a meter fresh from the factory: count 0, no purchase, not opened
    wallet.count, wallet.opened = 0, False
    wallet.purchases.clear()
    client = MeterClient(sim_link, A2, priority=Priority.COMMAND)
    first = await client.top_up(5000, 1, "123456789012", opening=True)
    assert first.outcome == "applied"
    after = fleet.state(A2)
    assert (after["remaining_money"], after["purchase_count"], after["customer"]) == ("150.00", 1, "123456789012")
    again = await client.top_up(5000, 1, "123456789012", opening=True)  # e.g. a retry whose reply was lost
    assert again.outcome == "opened_only"
    assert fleet.state(A2)["remaining_money"] == "150.00"  # added once

    # The count is the ESAM's (status query 078102FF), not the last purchase record's: this meter's
    # wallet was reset to count 0 with its old record (count 1) still there.
    wallet = fleet.meter(A3).meter.wallet
    wallet.count, wallet.opened = 0, False
    assert (await MeterClient(sim_link, A3).read(0x03330201)).value == 1
    client = MeterClient(sim_link, A3, priority=Priority.COMMAND)
    assert await client.purchase_count() == 0
    assert (await client.top_up(5000, 1, "123456789012", opening=True)).outcome == "applied"
    assert fleet.state(A3)["remaining_money"] == "150.00"


async def test_a_second_master_taking_the_esam_session_does_not_fail_the_first(sim_link: Link, fleet: Fleet):
    """Two gateways (or a gateway and a handheld) on one meter: each authentication replaces the
    ESAM's session (dlt645.md §5.1), so the first master's cached session is stale; its status
    query reply then fails the MAC check with the old key, and it authenticates again instead of
    failing the command."""
    first = MeterClient(sim_link, A1, priority=Priority.COMMAND)
    second = MeterClient(sim_link, A1, priority=Priority.COMMAND)
    count = fleet.state(A1)["purchase_count"]
    assert await first.purchase_count() == count
    stale = first._session
    assert await second.purchase_count() == count  # the meter now holds the second's session
    assert await first.purchase_count() == count
    assert first._session is not stale  # it renewed
    customer = fleet.state(A1)["customer"]
    before = fleet.state(A1)["remaining_money"]
    assert (await second.top_up(100, count + 1, customer)).outcome == "applied"
    assert (await first.top_up(200, count + 2, customer)).outcome == "applied"  # refused once, renewed
    assert fleet.state(A1)["purchase_count"] == count + 2
    assert Decimal(fleet.state(A1)["remaining_money"]) == Decimal(before) + Decimal("3.00")


class NoStatusQuery(MeterClient):
    """A meter that refuses the ESAM status query (078102FF)."""

    async def _tx(self, payload, **kw):  # type: ignore[no-untyped-def, override]
        if isinstance(payload, SecurityRequest) and payload.di == SecurityDI.STATUS_QUERY:
            raise MeterRefused(self.address, ValueError("refused"), "function 0x03")
        return await super()._tx(payload, **kw)


async def test_purchase_count_falls_back_to_the_purchase_record(sim_link: Link, fleet: Fleet):
    client = NoStatusQuery(sim_link, A1, priority=Priority.COMMAND)
    assert await client.purchase_count() == 1  # 03330201
    before = fleet.state(A1)
    assert (await client.top_up(5000, 1, before["customer"], opening=True)).outcome == "opened_only"
    assert fleet.state(A1)["remaining_money"] == before["remaining_money"]


async def test_encrypted_trip_and_direct_close(line: Link, fleet: Fleet):
    client = MeterClient(line, A3, priority=Priority.COMMAND)
    assert fleet.state(A3)["relay"] == "closed"
    tripped = await client.relay(RelayCommand.TRIP)
    assert tripped.command is RelayCommand.TRIP and tripped.frames
    assert tripped.frames[0][4 + 8] == 0x1C  # a 0x1C frame ...
    assert fleet.state(A3)["relay"] == "open"
    closed = await client.relay(RelayCommand.DIRECT_CLOSE)
    assert closed.command is RelayCommand.DIRECT_CLOSE
    state = fleet.state(A3)
    assert state["relay"] == "closed"
    assert state["esam"]["authentications"] == 1  # ... both in one session at level 98
    assert fleet.state(A1)["relay"] == "closed"


# --- faults, on every kind of transport ----------------------------------------------------

FAULT_KINDS = ["sim", "tcp", "pty", "mqtt"]


@pytest.fixture(params=FAULT_KINDS)
async def fault_line(request: pytest.FixtureRequest, fleet: Fleet, bus: Bus) -> AsyncIterator[Link]:
    """A Link with short timeouts (:data:`FAST`) to the fleet's bus: in memory, over TCP to the
    simulator's TCP server, over a pty (``serial://``), or over MQTT through the real broker and
    the simulator's bridge; each at a fast baud rate, so that wire time (the simulator's line
    timing is off) does not stretch the timeouts."""
    kind = request.param
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sim":
            transport: Transport = SimLineTransport(bus)
        elif kind == "tcp":
            tcp = await serve_tcp(bus, "127.0.0.1", 0)
            stack.push_async_callback(tcp.aclose)
            transport = open_transport(f"tcp://127.0.0.1:{tcp.port}?baud=115200")
        elif kind == "pty":
            endpoint = open_pty_bus(bus)
            stack.push_async_callback(endpoint.aclose)
            transport = open_transport(f"serial://{endpoint.device_path}?parity=N&baud=115200")
        else:
            if not HAVE_BROKER:
                pytest.skip("no MQTT broker listening on 127.0.0.1:1883")
            prefix = f"meterlink-fault-test/{uuid.uuid4().hex[:12]}"
            bridge = await start_mqtt_bridge(fleet.buses, "mqtt://127.0.0.1:1883", None, prefix)
            stack.push_async_callback(bridge.aclose)
            transport = open_transport(f"mqtt://127.0.0.1:1883/{prefix}/{bus.name}?baud=115200")
        link = Link(transport, dataclasses.replace(FAST))
        await link.start(require_open=True)
        stack.push_async_callback(link.stop)
        yield link


@pytest.mark.parametrize("retries", [0, 2, 3])
async def test_no_reply_is_retried_then_no_reply(fault_line: Link, fleet: Fleet, bus: Bus, retries: int):
    fault_line.config.retries = retries
    fleet.inject(A1, FaultSpec(Fault.NO_REPLY))
    with pytest.raises(NoReply) as info:
        await MeterClient(fault_line, A1).read(ENERGY)
    assert info.value.attempts == retries + 1
    assert info.value.address == A1 and "DI 00010000" in str(info.value)
    assert bus.stats.requests == retries + 1  # every attempt reached the line ...
    assert bus.stats.faults["no_reply"] == retries + 1  # ... and the meter stayed silent each time
    if isinstance(fault_line.transport, SimLineTransport):
        assert len(written(fault_line)) == retries + 1
    assert fault_line.stats.timeouts == retries + 1


async def test_bad_checksum_once_is_retried_and_succeeds(fault_line: Link, fleet: Fleet, bus: Bus):
    fleet.inject(A1, FaultSpec(Fault.BAD_CHECKSUM, remaining=1))
    exchange = await fault_line.transact(A1, ReadRequest(MONEY))
    assert exchange.attempts == 2
    assert exchange.payload.value == bytes.fromhex("00000100")  # 100.00 yuan, BCD low byte first
    assert bus.stats.faults["bad_checksum"] == 1 and bus.stats.requests == 2
    assert (await MeterClient(fault_line, A1).read(MONEY)).value == Decimal("100.00")


async def test_wrong_address_is_never_accepted(fault_line: Link, fleet: Fleet, bus: Bus):
    fleet.inject(A1, FaultSpec(Fault.WRONG_ADDRESS))
    client = MeterClient(fault_line, A1)
    with pytest.raises(WrongMeter) as info:
        await client.read(ADDRESS)
    assert (info.value.asked, info.value.answered) == (A1, A2)
    assert bus.stats.requests == FAST.retries + 1  # retried, and rejected every time
    assert fault_line.stats.wrong_meter == FAST.retries + 1
    fleet.clear_faults(A1)
    reading = await client.read(ADDRESS)
    assert (reading.address, reading.value) == (A1, A1)


async def test_wrong_address_once_then_the_right_meter(fault_line: Link, fleet: Fleet, bus: Bus):
    fleet.inject(A1, FaultSpec(Fault.WRONG_ADDRESS, remaining=1))
    exchange = await fault_line.transact(A1, ReadRequest(ADDRESS))
    assert exchange.attempts == 2 and exchange.reply is not None and exchange.reply.address == A1
    assert fault_line.stats.wrong_meter == 1


async def test_late_reply_is_not_matched_to_the_next_request(fault_line: Link, fleet: Fleet, bus: Bus):
    client = MeterClient(fault_line, A1)
    fault_line.config.retries = 0
    money_truth = Decimal(fleet.state(A1)["remaining_money"])
    assert money_truth != Decimal(A1)  # the two DIs' values differ

    # The bus sends a LATE_REPLY td_max + delay_ms after the request: 0.25 s here.
    bus.timing = dataclasses.replace(bus.timing, td_min_ms=0, td_max_ms=50)

    # 1. Without the late-reply guard, the DI check alone: the late reply arrives while the next
    #    request (another DI) waits for its own reply, and is rejected.
    fault_line.config.late_guard_s = 0
    fleet.inject(A1, FaultSpec(Fault.LATE_REPLY, remaining=1, delay_ms=200))
    with pytest.raises(NoReply):
        await client.read(ADDRESS)  # times out after ~0.1 s
    fault_line.config.td_max_s = 2.0  # the next read waits long enough to see the late reply arrive
    reading = await client.read(MONEY)
    assert (reading.di, reading.value) == (MONEY, money_truth)
    assert fault_line.stats.mismatched == 1  # the late 04000401 reply was seen and rejected
    assert fault_line.stats.guards == 0

    # 2. The late reply arrives between transactions: dropped before the next request goes out.
    fault_line.config.td_max_s = FAST.td_max_s
    fault_line.config.late_guard_s = None
    fleet.inject(A1, FaultSpec(Fault.LATE_REPLY, remaining=1, delay_ms=200))
    with pytest.raises(NoReply):
        await client.read(MONEY)
    await asyncio.sleep(0.3)
    reading = await client.read(ADDRESS)
    assert (reading.di, reading.value) == (ADDRESS, A1)
    assert fault_line.stats.discarded_bytes > 0
    assert fault_line.stats.mismatched == 1


async def test_late_relay_ack_is_not_taken_for_the_next_command(fault_line: Link, fleet: Fleet, bus: Bus):
    """A 0x9C carries no DI: before the guard, a trip's late ack was the reply to the next 0x1C."""
    client = MeterClient(fault_line, A1, priority=Priority.COMMAND)
    fault_line.config.retries = 0
    await client.session()
    bus.timing = dataclasses.replace(bus.timing, td_min_ms=0, td_max_ms=50)
    # The trip's window is ~0.2 s (Td max + margin + the ESAM allowance); its ack comes at 0.25 s.
    fleet.inject(A1, FaultSpec(Fault.LATE_REPLY, remaining=1, delay_ms=200))
    with pytest.raises(NoReply):
        await client.relay(RelayCommand.TRIP)
    assert fleet.state(A1)["relay"] == "open"  # the meter did trip; only its ack was late
    # A plaintext direct-close with a wrong password: the meter refuses it. The late 0x9C of the
    # trip arrives while it waits and must not be taken for its acceptance.
    with pytest.raises(MeterRefused, match="refused function 0x1C"):
        await client.relay(RelayCommand.DIRECT_CLOSE, encrypted=False, level=0x02, password="999999")
    assert fleet.state(A1)["relay"] == "open"
    assert fault_line.stats.guards == 1 and fault_line.stats.late_bytes > 0


async def test_an_ack_later_than_the_guard_is_not_taken_for_the_next_command(fault_line: Link, fleet: Fleet, bus: Bus):
    """A 0x9C that comes long after the guard (a slow DTU, a busy meter) is still not the next
    0x1C's reply: the meter that lost a reply is read first (its address, a reply that names its
    request), and the ack it still owed comes before that read's answer."""
    client = MeterClient(fault_line, A1, priority=Priority.COMMAND)
    fault_line.config.retries = 0
    await client.session()
    bus.timing = dataclasses.replace(bus.timing, td_min_ms=0, td_max_ms=50)
    fleet.inject(A1, FaultSpec(Fault.LATE_REPLY, remaining=1, delay_ms=400))  # beyond the ~0.2 s guard
    with pytest.raises(NoReply):
        await client.relay(RelayCommand.TRIP)
    assert fleet.state(A1)["relay"] == "open"
    reads_before = bus.stats.requests
    with pytest.raises(MeterRefused, match="refused function 0x1C"):
        await client.relay(RelayCommand.DIRECT_CLOSE, encrypted=False, level=0x02, password="999999")
    assert fleet.state(A1)["relay"] == "open"
    assert fault_line.stats.syncs == 1 and bus.stats.requests >= reads_before + 2  # the read, then the close
    # Synced again: the next DI-less command goes without a read.
    await client.relay(RelayCommand.ALARM_ON)
    assert fault_line.stats.syncs == 1


async def test_late_error_reply_is_not_taken_for_the_next_read(fault_line: Link, fleet: Fleet, bus: Bus):
    """An abnormal reply (0xD1 ERR) carries no DI: before the guard, a refusal that came late was
    taken as the refusal of the next read."""
    client = MeterClient(fault_line, A1)
    fault_line.config.retries = 0
    bus.timing = dataclasses.replace(bus.timing, td_min_ms=0, td_max_ms=50)
    # The read times out after ~0.1 s; the meter's "no data" for 00900100 comes at 0.15 s.
    fleet.inject(A1, FaultSpec(Fault.LATE_REPLY, remaining=1, delay_ms=100))
    with pytest.raises(NoReply):
        await client.read(ENERGY_WALLET)
    reading = await client.read(MONEY)
    assert (reading.di, reading.value) == (MONEY, Decimal(fleet.state(A1)["remaining_money"]))
    assert fault_line.stats.guards == 1 and fault_line.stats.late_bytes > 0
    # Without a lost reply there is no guard: the next transactions go at once.
    before = fault_line.stats.guards
    await client.read(MONEY)
    assert fault_line.stats.guards == before


async def test_late_reply_guard_waits_for_a_quiet_line(sim_link: Link, fleet: Fleet, bus: Bus):
    """The guard lasts until the line has been quiet for the failed request's reply window."""
    client = MeterClient(sim_link, A1)
    sim_link.config.retries = 0
    window = sim_link.reply_window_s(build_frame(A1, ReadRequest(MONEY)), 0)
    assert window == pytest.approx(FAST.td_max_s + FAST.margin_s)
    fleet.inject(A1, FaultSpec(Fault.NO_REPLY, remaining=1))
    with pytest.raises(NoReply):
        await client.read(MONEY)
    failed_at = time.monotonic()
    await client.read(MONEY)
    assert time.monotonic() - failed_at >= window * 0.9  # quiet for the window before the next request
    assert sim_link.stats.guards == 1 and sim_link.stats.late_bytes == 0
    sim_link.config.late_guard_s = 0  # configurable: none
    fleet.inject(A1, FaultSpec(Fault.NO_REPLY, remaining=1))
    with pytest.raises(NoReply):
        await client.read(MONEY)
    await client.read(MONEY)
    assert sim_link.stats.guards == 1


async def test_truncated_reply_is_retried(fault_line: Link, fleet: Fleet, bus: Bus):
    fault_line.config.inter_byte_s = 0.05
    fleet.inject(A2, FaultSpec(Fault.TRUNCATED, remaining=1))
    exchange = await fault_line.transact(A2, ReadRequest(ADDRESS))
    assert exchange.attempts == 2
    assert bus.stats.faults["truncated"] == 1
    fleet.inject(A2, FaultSpec(Fault.TRUNCATED))
    with pytest.raises(NoReply) as info:
        await fault_line.transact(A2, ReadRequest(ADDRESS))
    assert info.value.attempts == FAST.retries + 1


async def test_writes_and_broadcasts_return_typed_results_and_feed_the_frame_tap(sim_link: Link, fleet: Fleet):
    client = MeterClient(sim_link, A1)
    tap: list[bytes] = []
    token = FRAME_TAP.set(tap)
    try:
        written_ = await client.write_mac(0x04001001, Decimal("30.00"))
        assert isinstance(written_, WriteResult)
        assert (written_.address, written_.di, written_.security, written_.attempts) == (A1, 0x04001001, "mac", 1)
        assert len(written_.frames) == 2 and all(isinstance(f, bytes) for f in written_.frames)  # request, reply
        sent = await client.broadcast_time(fleet.now() + timedelta(minutes=1))
        assert isinstance(sent, BroadcastResult) and len(sent.frames) == 1
        assert sent.time.tzinfo is not None and sent.time.microsecond == 0
    finally:
        FRAME_TAP.reset(token)
    # the tap saw the session's frames, the write's and the broadcast's, in order
    assert tap[-3:] == [*written_.frames, *sent.frames] and len(tap) > 3


class EchoLine(SimLineTransport):
    """A half-duplex adapter that hears its own transmission: every request comes back first."""

    async def write(self, data: bytes) -> None:
        self._rx.put_nowait(data)  # the echo, before the meter's reply
        await super().write(data)


async def test_own_request_echoed_back_is_ignored(fleet: Fleet, bus: Bus):
    async with Link(EchoLine(bus), config()) as link:
        client = MeterClient(link, A1)
        reading = await client.read(ADDRESS)  # the echo has this address, function and DI too
        assert (reading.di, reading.value) == (ADDRESS, A1)
        assert link.stats.echoes == 1 and link.stats.mismatched == 0 and link.stats.attempts == 1
        fleet.inject(A1, FaultSpec(Fault.NO_REPLY))
        link.config.retries = 1
        with pytest.raises(NoReply):  # only the echo came back: silence, never a reply
            await client.read(MONEY)
        assert link.stats.echoes == 3 and link.stats.timeouts == 2
    alone = make_fleet(3, 2).buses["bus1"]  # meter 3 alone
    async with Link(EchoLine(alone), config()) as link:
        assert await MeterClient(link, WILDCARD).read_address() == A3  # the AA..AA echo is no answer
        assert link.stats.echoes == 1


async def test_byte_gaps_within_inter_byte_timeout_are_assembled(sim_link: Link, fleet: Fleet, bus: Bus):
    sim_link.config.inter_byte_s = 0.25
    fleet.inject(A3, FaultSpec(Fault.BYTE_GAPS, gap_ms=80))  # well within inter_byte_s
    client = MeterClient(sim_link, A3)
    for di, expected in ((ADDRESS, A3), (MONEY, Decimal("100.00"))):
        exchange = await sim_link.transact(A3, ReadRequest(di))
        assert exchange.attempts == 1
        assert (await client.read(di)).value == expected
    assert bus.stats.faults["byte_gaps"] == 4
    assert sim_link.stats.timeouts == 0


async def test_byte_gaps_beyond_inter_byte_timeout_are_given_up(sim_link: Link, fleet: Fleet, bus: Bus):
    sim_link.config.retries = 0
    sim_link.config.inter_byte_s = 0.1
    fleet.inject(A3, FaultSpec(Fault.BYTE_GAPS, gap_ms=400, remaining=1))
    with pytest.raises(NoReply):
        await sim_link.transact(A3, ReadRequest(ADDRESS))


async def test_abnormal_reply_is_meter_refused_without_retries(sim_link: Link, bus: Bus):
    with pytest.raises(MeterRefused) as info:
        await MeterClient(sim_link, A1).read(ENERGY_WALLET)
    assert info.value.address == A1
    assert info.value.flags is not None and int(info.value.flags) == int(ErrorFlags.NO_DATA)
    assert bus.stats.requests == 1 and sim_link.stats.attempts == 1


async def test_plaintext_trip_is_refused_without_retries(sim_link: Link, fleet: Fleet, bus: Bus):
    with pytest.raises(MeterRefused) as info:
        await MeterClient(sim_link, A1).relay(RelayCommand.TRIP, encrypted=False)
    assert info.value.flags is not None and int(info.value.flags) & 0x04
    assert bus.stats.requests == 1
    assert fleet.state(A1)["relay"] == "closed"


async def test_wildcard_read_address():
    fleet = make_fleet(3, 2)  # bus0: meters 1 and 2; bus1: meter 3 alone
    async with Link(SimLineTransport(fleet.buses["bus1"]), config()) as alone:
        assert await MeterClient(alone, WILDCARD).read_address() == A3
    two = fleet.buses["bus0"]
    async with Link(SimLineTransport(two), config(retries=1)) as crowded:
        with pytest.raises(GatewayError):  # the replies collide: garbage, never an address
            await MeterClient(crowded, WILDCARD).read_address()
    assert two.stats.collisions == 2 and two.stats.requests == 2


# --- priority and one transaction at a time -----------------------------------------------------


class RecordingLine(SimLineTransport):
    """An in-memory line that logs what the gateway wrote and read, in order."""

    def __init__(self, bus: Bus, baud: int | None = None) -> None:
        super().__init__(bus, baud)
        self.events: list[tuple[str, bytes]] = []

    async def write(self, data: bytes) -> None:
        self.events.append(("w", data))
        await super().write(data)

    async def read(self, timeout: float) -> bytes:
        data = await super().read(timeout)
        if data:
            self.events.append(("r", data))
        return data


def request_di(frame: Frame) -> int:
    return int.from_bytes(frame.data[:4], "little")


async def test_command_runs_before_queued_polls_one_transaction_at_a_time(fleet: Fleet, bus: Bus):
    bus.timing = LineTiming(baud=9600, td_distribution="fixed", td_fixed_ms=40)  # ~90 ms a transaction
    transport = RecordingLine(bus, baud=9600)
    async with Link(transport, config(gap_s=0.02, td_max_s=0.5)) as link:
        polls = [
            link.transact(address, ReadRequest(di), priority=Priority.POLL)
            for address, di in ((A1, ENERGY), (A2, ENERGY), (A3, ENERGY), (A1, VOLTAGE))
        ]
        tasks = [asyncio.ensure_future(p) for p in polls]
        await asyncio.sleep(0.03)  # the first poll is on the wire, three are queued
        interactive = asyncio.ensure_future(link.transact(A3, ReadRequest(ADDRESS), priority=Priority.INTERACTIVE))
        command = asyncio.ensure_future(link.transact(A2, ReadRequest(MONEY), priority=Priority.COMMAND))
        await asyncio.gather(*tasks, interactive, command)

    order = [(r.request.address, request_di(r.request)) for r in bus.history]
    assert order == [
        (A1, ENERGY),  # already running when the command came
        (A2, MONEY),  # COMMAND
        (A3, ADDRESS),  # INTERACTIVE
        (A2, ENERGY),  # then the polls in the order they were queued
        (A3, ENERGY),
        (A1, VOLTAGE),
    ]
    # Never interleaved: on the line, each transaction starts after the previous one ended ...
    history = list(bus.history)
    for before, after in itertools.pairwise(history):
        assert after.start >= before.end + 0.9 * 0.02  # ... with the inter-frame gap
    # ... and at the gateway, each request is written only after the previous reply was read.
    writes = [data for kind, data in transport.events if kind == "w"]
    assert len(writes) == 6
    deframer = Deframer()
    pending: Frame | None = None
    for kind, data in transport.events:
        if kind == "w":
            assert pending is None, "a request was written before the previous reply arrived"
            (pending,) = deframer.feed(data)
        else:
            for reply in deframer.feed(data):
                assert pending is not None and reply.control.response
                assert (reply.address, request_di(reply)) == (pending.address, request_di(pending))
                pending = None
    assert pending is None


# --- 0x12 follow-up assembly -----------------------------------------------------------------

LONG_DI = 0x04A0FF01
"""Not in the DI table: no DI the firmware stubs serve exceeds 200 bytes, so a fake meter serves one."""


class LongValueMeter:
    """A minimal :class:`BusMeter` holding one long value, served with 0x91 + follow-up flag, then 0x92."""

    def __init__(
        self, address: str, value: bytes, *, refuse_seq: int | None = None, silent_seq: int | None = None
    ) -> None:
        self.address = address
        self.profile = PROFILES["sgcc-2013"]
        self.faults = FaultSet()
        self.value = value
        self.parts = split_reply(LONG_DI, value, 200)
        self.seen: list[int] = []  # 0 for 0x11, SEQ for 0x12
        self.refuse_seq = refuse_seq
        self.silent_seq = silent_seq
        self.corrupt_seq: int | None = None
        self.stale_seq: int | None = None
        """Asked for this part the first time, the meter sends the part before it (out of order)."""

    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        payload = parse_payload(frame)
        if isinstance(payload, ReadRequest) and payload.di == LONG_DI:
            seq = 0
        elif isinstance(payload, ReadFollowUpRequest) and payload.di == LONG_DI:
            seq = payload.seq
        else:
            return build_frame(self.address, ErrorReply(int(ErrorFlags.NO_DATA), frame.function))
        self.seen.append(seq)
        if seq == self.silent_seq:
            return None
        if seq == self.refuse_seq or seq >= len(self.parts):
            return build_frame(self.address, ErrorReply(int(ErrorFlags.NO_DATA), frame.function))
        if seq == self.corrupt_seq:
            self.corrupt_seq = None
            self.faults.add(FaultSpec(Fault.BAD_CHECKSUM, remaining=1))  # this reply goes bad on the wire
        if seq == self.stale_seq:
            self.stale_seq = None
            seq -= 1
        part = self.parts[seq]
        return build_frame(self.address, part.payload, follow_up=part.follow_up)


def long_value_bus(meter: LongValueMeter) -> Bus:
    assert isinstance(meter, BusMeter)
    return Bus("long", [meter], VirtualClock(speed=0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(197, 1500), seed=st.integers(0, 255))
def test_follow_up_parts_are_assembled(size: int, seed: int):
    assert DI_2007.get(LONG_DI) is None
    value = bytes((seed + 7 * i) % 256 for i in range(size))
    meter = LongValueMeter(A1, value)

    async def scenario() -> None:
        async with Link(SimLineTransport(long_value_bus(meter)), config()) as link:
            exchange = await link.transact(A1, ReadRequest(LONG_DI))
            assert exchange.payload.value == value
            assert exchange.attempts == 1
            # request + reply for 0x11, then for each follow-up part
            assert len(exchange.frames) == 2 * len(meter.parts)
            reading = await MeterClient(link, A1).read(LONG_DI)
            assert reading.raw == value and reading.name is None

    asyncio.run(scenario())
    assert meter.seen == [*range(len(meter.parts)), *range(len(meter.parts))]
    assert len(meter.parts) >= 2 or size <= 196


async def test_follow_up_part_with_a_bad_checksum_is_refetched():
    value = bytes(range(256)) * 3
    meter = LongValueMeter(A1, value)
    assert len(meter.parts) == 4
    meter.corrupt_seq = 2
    async with Link(SimLineTransport(long_value_bus(meter)), config()) as link:
        exchange = await link.transact(A1, ReadRequest(LONG_DI))
    assert exchange.payload.value == value
    assert meter.seen == [0, 1, 2, 2, 3]  # part 2 asked again, not the whole value


async def test_follow_up_part_out_of_order_is_asked_again():
    value = bytes(range(256)) * 3
    meter = LongValueMeter(A1, value)
    meter.stale_seq = 2  # asked for part 2, the meter sends part 1 again
    async with Link(SimLineTransport(long_value_bus(meter)), config(retries=1)) as link:
        exchange = await link.transact(A1, ReadRequest(LONG_DI))
        assert exchange.payload.value == value
        assert link.stats.mismatched == 1
    assert meter.seen == [0, 1, 2, 2, 3]  # part 2 asked again, as a lost part would be
    meter = LongValueMeter(A1, value)
    meter.stale_seq = 2
    async with Link(SimLineTransport(long_value_bus(meter)), config(retries=0)) as link:
        with pytest.raises(ReplyMismatch, match="follow-up part 1 arrived, asked for part 2"):
            await link.transact(A1, ReadRequest(LONG_DI))


async def test_follow_up_refused_part_is_meter_refused():
    meter = LongValueMeter(A1, bytes(600), refuse_seq=2)
    async with Link(SimLineTransport(long_value_bus(meter)), config()) as link:
        with pytest.raises(MeterRefused):
            await link.transact(A1, ReadRequest(LONG_DI))
    assert meter.seen == [0, 1, 2]  # not retried


async def test_follow_up_part_that_never_comes_is_no_reply_after_every_attempt():
    meter = LongValueMeter(A1, bytes(600), silent_seq=2)
    async with Link(SimLineTransport(long_value_bus(meter)), config(retries=2)) as link:
        with pytest.raises(NoReply) as info:
            await link.transact(A1, ReadRequest(LONG_DI))
    assert meter.seen == [0, 1, 2, 2, 2]
    assert info.value.attempts == 3
    assert str(info.value).endswith("to function 0x12 DI 04A0FF01 after 3 attempt(s)")


# --- session renewal ---------------------------------------------------------------------------


class InjectAfterRenewal(MeterClient):
    """A client that, right after its first renewal, makes the meter lose one reply."""

    def __init__(self, *args: object, after_renewal: Callable[[], None], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.after_renewal: Callable[[], None] | None = after_renewal
        self.renewals = 0

    async def session(self, *, renew: bool = False, **kw):  # type: ignore[no-untyped-def, override]
        session = await super().session(renew=renew, **kw)
        if renew:
            self.renewals += 1
            if self.after_renewal is not None:
                self.after_renewal()
                self.after_renewal = None
        return session


async def test_session_is_renewed_after_the_meter_expired_it(fleet: Fleet, bus: Bus):
    # retries=1: the resent command after renewal still has its one retry (renewal is not one)
    async with Link(SimLineTransport(bus), config(retries=1)) as link:
        client = InjectAfterRenewal(
            link,
            A1,
            priority=Priority.COMMAND,
            after_renewal=lambda: fleet.inject(A1, FaultSpec(Fault.NO_REPLY, remaining=1)),
        )
        await client.relay(RelayCommand.TRIP)
        assert fleet.state(A1)["relay"] == "open"
        assert bus.stats.requests == 2  # identity authentication, trip

        fleet.advance(timedelta(minutes=5, seconds=30))  # past the meter's 5-minute validity
        fleet.state(A1)  # the meter catches up with virtual time
        meter = fleet.meter(A1).meter
        assert not meter.esam.authenticated(meter.local_time())
        await client.relay(RelayCommand.DIRECT_CLOSE)
        assert client.renewals == 1
        state = fleet.state(A1)
        assert state["relay"] == "closed"
        assert state["esam"]["authentications"] == 2
        # close (refused: authentication expired), authentication, close (reply lost), close again
        assert bus.stats.requests == 2 + 4
        assert bus.stats.faults["no_reply"] == 1

        fleet.advance(timedelta(minutes=6))
        before = fleet.state(A1)  # the frozen clock: nothing is used up during the top-up itself
        result = await client.top_up(2000, 2, before["customer"])
        assert result.outcome == "applied" and client.renewals == 2
        after = fleet.state(A1)
        assert Decimal(after["remaining_money"]) == Decimal(before["remaining_money"]) + Decimal("20.00")
        assert after["purchase_count"] == 2


async def test_top_up_whose_reply_is_lost_is_applied_once(sim_link: Link, fleet: Fleet, bus: Bus):
    client = MeterClient(sim_link, A3, priority=Priority.COMMAND)
    await client.session()
    fleet.inject(A3, FaultSpec(Fault.NO_REPLY, remaining=1))  # the meter applies it, the reply is lost
    result = await client.top_up(3000, 2, fleet.state(A3)["customer"])
    # The retry finds the purchase count already there. Either way the money is on the meter once.
    assert result.outcome in ("applied", "duplicate"), result
    state = fleet.state(A3)
    assert (state["remaining_money"], state["purchase_count"]) == ("130.00", 2)
    assert bus.stats.requests == 3  # authentication, recharge (reply lost), recharge again


async def test_session_renewal_with_no_retries_left(fleet: Fleet, bus: Bus):
    async with Link(SimLineTransport(bus), config(retries=0)) as link:
        client = MeterClient(link, A2)
        await client.write_mac(0x04001001, Decimal("30.00"))
        fleet.advance(timedelta(minutes=6))
        await client.write_mac(0x04001002, Decimal("15.00"))  # refused, renewed, resent: still succeeds
    limits = fleet.meter(A2).meter.wallet.limits
    assert (limits.alarm_1, limits.alarm_2) == (3000, 1500)
    assert fleet.state(A2)["esam"]["authentications"] == 2


# --- timeouts from the baud rate and the reply size ------------------------------------------


AUTH = MasterStation().start_auth(A1)[0]
"""An identity-authentication request body (0x03 070000FF); its reply is 32 bytes with 4 FE (dlt645.md §9)."""


@pytest.mark.parametrize(
    ("frame", "size"),
    [
        (build_frame(A1, ReadRequest(ENERGY)), 4 + 12 + 4 + 4),  # FE x4, frame, DI, XXXXXX.XX
        (build_frame(A1, ReadRequest(VOLTAGE)), 4 + 12 + 4 + 2),  # XXX.X
        (build_frame(A1, ReadRequest(ADDRESS)), 4 + 12 + 4 + 6),
        (build_frame(A1, ReadRequest(0x04010000)), 4 + 12 + 4 + 3 * 14),  # MMDDNN*n<=14: its limit
        (build_frame(A1, ReadRequest(0x0001FF00)), 4 + 12 + 200),  # XXXXXX.XX*n: one full frame
        (build_frame(A1, ReadRequest(LONG_DI)), 4 + 12 + 200),  # not in the table: one full frame
        (build_frame(A1, ReadFollowUpRequest(ENERGY, 1)), 4 + 12 + 200),
        (build_frame(WILDCARD, ReadAddressRequest()), 4 + 12 + 6),
        (build_frame(A1, WriteRequest(0x04000401, Password(4), "00000000", bytes(6))), 4 + 12 + 2),  # 0x94 / ERR
        (build_frame(A1, RelayControlRequest(Password(2), "00000000", 0x1A, datetime(2030, 1, 1))), 4 + 12 + 2),
        (build_frame(A1, SecurityRequest(SecurityDI.IDENTITY_AUTHENTICATION, "00000000", AUTH)), 32),  # §9
        (build_frame(A1, Read1997Request(0x9010)), 4 + 12 + 2 + 4),
        (build_frame(A1, Read1997Request(0x901F)), 4 + 12 + 200),
        (build_frame(BROADCAST, BroadcastTime(datetime(2030, 1, 1))), 0),
    ],
)
def test_reply_bound_follows_the_di_table_and_the_function(frame: Frame, size: int):
    assert reply_bound(frame) == size


class UnknownSpeedLine(SimLineTransport):
    """A line whose transport does not know the wire speed (like ``tcp://`` without ``?baud=``)."""

    @property
    def baud(self) -> int | None:  # type: ignore[override]
        return None


async def test_timeout_is_derived_from_the_baud_rate_and_the_reply_size(fleet: Fleet, bus: Bus):
    energy = build_frame(A1, ReadRequest(ENERGY))
    block = build_frame(A1, ReadRequest(0x0001FF00))
    sent = len(encode_frame(A1, energy.control.byte, energy.data, 4))
    async with Link(UnknownSpeedLine(bus), config(retries=0)) as link:
        assert link.line_baud() == DEFAULT_BAUD == 2400
        assert link.line_baud(1200) == 1200  # the meter profile's
        expected = (sent + 24) * 11 / 1200 + FAST.td_max_s + FAST.margin_s
        assert link.timeout_s(energy, sent, 1200) == pytest.approx(expected)
        assert link.timeout_s(block, sent, 1200) - link.timeout_s(energy, sent, 1200) == pytest.approx(
            (216 - 24) * 11 / 1200
        )
        # measured: a silent meter read through a client whose profile says 1200 bps
        fleet.inject(A1, FaultSpec(Fault.NO_REPLY))
        slow = MeterClient(link, A1, SGCC_2013.with_(baud=1200))
        began = time.monotonic()
        with pytest.raises(NoReply):
            await slow.read(ENERGY)
        assert expected <= time.monotonic() - began < expected + 0.3  # was Td max + margin: 0.1 s
        link.config.baud = 9600  # the line's configuration comes before the profile's
        assert link.line_baud(1200) == 9600
    async with Link(SimLineTransport(bus, baud=19200), config()) as link:  # the transport's comes first
        link.config.baud = 9600
        assert link.line_baud(1200) == 19200
    async with Link(SimLineTransport(bus), config()) as link:  # in memory, timing off: no wire
        assert link.line_baud(1200) == 0
        assert link.timeout_s(energy, sent, 0) == pytest.approx(FAST.td_max_s + FAST.margin_s)


# --- preamble, logging, many lines -------------------------------------------------------------


@pytest.mark.parametrize("preamble", [0, 2, 3])
async def test_wake_up_preamble_of_the_profile_reaches_the_wire(sim_link: Link, fleet: Fleet, preamble: int):
    profile = SGCC_2013.with_(request_preamble=preamble)
    client = MeterClient(sim_link, A1, profile)
    assert (await client.read(MONEY)).value == Decimal(fleet.state(A1)["remaining_money"])
    await client.broadcast_time()
    for frame in written(sim_link):
        assert frame[:preamble] == b"\xfe" * preamble and frame[preamble] == 0x68, frame.hex()


async def test_wrong_meter_reply_is_logged(fault_line: Link, fleet: Fleet, caplog: pytest.LogCaptureFixture):
    fleet.inject(A1, FaultSpec(Fault.WRONG_ADDRESS, remaining=1))
    with caplog.at_level("WARNING", logger="gateway.link"):
        await MeterClient(fault_line, A1).read(MONEY)
    warnings = [r for r in caplog.records if r.name == "gateway.link" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert f"reply from meter {A2} while waiting for {A1}: rejected" in warnings[0].getMessage()


async def test_many_lines_run_concurrently():
    """Six lines, one Link each, at 9600 bps with Td 100 ms: together as fast as one alone."""
    lines = 6
    fleet = make_fleet(lines, lines)
    for bus in fleet.buses.values():
        bus.timing = LineTiming(baud=9600, td_distribution="fixed", td_fixed_ms=100)

    async def poll(name: str, address: str, n: int = 4) -> None:
        async with Link(SimLineTransport(fleet.buses[name]), LinkConfig(gap_s=0.0)) as link:
            client = MeterClient(link, address)
            for _ in range(n):
                await client.read(MONEY)

    began = time.monotonic()
    await poll("bus0", A1)
    alone = time.monotonic() - began
    assert alone >= 4 * 0.1  # each read waits its Td at least
    began = time.monotonic()
    await asyncio.gather(*(poll(f"bus{i}", f"{i + 1:012d}") for i in range(lines)))
    together = time.monotonic() - began
    assert together < 2 * alone, (alone, together)  # not six times as long


# --- MQTT broker restart -----------------------------------------------------------------------


class PrivateMosquitto:
    """A broker process of our own on a fixed free port, to kill and restart (never the machine's)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while not broker_listening(self.port):
            assert self.proc.poll() is None, "mosquitto exited"
            assert time.monotonic() < deadline, "mosquitto did not start listening"
            await asyncio.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)
            self.proc.wait(5)
        self.proc = None


@pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason=f"{MOSQUITTO} is not installed")
async def test_link_recovers_from_a_broker_restart(fleet: Fleet, tmp_path: Path):
    """Reads keep going while the broker is killed and restarted: the one in flight, and those that
    start during the outage, wait for the reconnection and are then sent again (``reconnect_s``);
    none fails and every value is right."""
    broker = PrivateMosquitto(tmp_path)
    await broker.start()
    prefix = f"meterlink-link-test/{uuid.uuid4().hex[:12]}"
    bridge = await start_mqtt_bridge(
        fleet.buses, f"mqtt://127.0.0.1:{broker.port}", None, prefix, backoff_initial=0.05, backoff_max=0.2
    )
    conn = MqttConnection("127.0.0.1", broker.port, backoff_initial=0.05, backoff_max=0.2)
    transport = MqttTransport(prefix=prefix, ident="bus0", connection=conn)
    transport.open_timeout = 0.3
    link = Link(transport, LinkConfig(gap_s=0.0, td_max_s=0.2, margin_s=0.1, retries=1, backoff_s=0.05))
    assert link.config.reconnect_s == 30.0
    truth = {ADDRESS: A1, MONEY: Decimal(fleet.state(A1)["remaining_money"])}
    outcomes: list[tuple[str, str, object]] = []  # (phase when it started, phase when it ended, value or error)
    phase = "before"
    stop = asyncio.Event()

    async def reader() -> None:
        client = MeterClient(link, A1)
        dis = [ADDRESS, MONEY]
        n = 0
        while not stop.is_set():
            di = dis[n % 2]
            n += 1
            began = phase
            try:
                reading = await client.read(di)
            except (LinkDown, NoReply) as exc:
                outcomes.append((began, phase, exc))
                await asyncio.sleep(0.02)
                continue
            assert reading.di == di and reading.value == truth[di], f"wrong value {reading}"
            outcomes.append((began, phase, reading.value))

    try:
        await link.start()
        task = asyncio.create_task(reader())
        while len(outcomes) < 4:
            await asyncio.sleep(0.01)
        broker.kill()  # mid-sequence, possibly mid-transaction
        phase = "outage"
        await asyncio.sleep(0.8)
        await broker.start()  # same port
        phase = "after"
        deadline = time.monotonic() + 8
        while sum(1 for b, _, v in outcomes if b == "after" and not isinstance(v, Exception)) < 2:
            assert time.monotonic() < deadline, f"the link did not recover: {outcomes[-3:]}"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await link.stop()
        await conn.aclose()
        await bridge.aclose()
        broker.kill()
    failed = [v for _, _, v in outcomes if isinstance(v, Exception)]
    assert failed == []  # nothing failed: the outage was waited out
    waited = [v for b, e, v in outcomes if b in ("before", "outage") and e == "after"]
    assert waited, outcomes  # at least one read met the outage and completed after the restart
    assert link.stats.reconnects >= 1
    assert conn.stats.disconnects >= 1 and conn.stats.connects >= 2


async def test_a_line_that_stays_down_fails_after_reconnect_s(fleet: Fleet, bus: Bus):
    """reconnect_s counts from when the line went down (tests/test_link_outage.py has more)."""
    transport = SimLineTransport(bus)
    async with Link(transport, config(reconnect_s=0.4, retries=0)) as link:
        client = MeterClient(link, A1)
        await client.read(MONEY)
        transport.down = True
        began = time.monotonic()
        with pytest.raises(LinkDown, match=r"is down \(line sim://bus0 down for \d+\.\d s, reconnect_s 0\.4 s\)"):
            await client.read(MONEY)
        assert 0.4 <= time.monotonic() - began < 1.4
        # still down: the next read fails at once (the line has been down for reconnect_s)
        began = time.monotonic()
        with pytest.raises(LinkDown, match=r"reconnect_s 0\.4 s"):
            await client.read(MONEY)
        assert time.monotonic() - began < 0.3
        # back: reopened in the background, reads go through again
        transport.down = False
        end = time.monotonic() + 5
        while True:
            try:
                assert (await client.read(MONEY)).value == Decimal("100.00")
                break
            except LinkDown:
                assert time.monotonic() < end, "the line was not reopened"
                await asyncio.sleep(0.05)
        assert link.stats.reconnects == 1 and link.down_since is None
        # down again, up again while a read waits: it goes through, without using a retry (retries=0)
        transport.down = True
        reading = asyncio.ensure_future(client.read(MONEY))
        await asyncio.sleep(0.15)
        assert not reading.done()
        transport.down = False
        assert (await asyncio.wait_for(reading, 2)).value == Decimal("100.00")
        assert link.stats.reconnects == 2
        link.config.reconnect_s = 0  # configurable: fail at once
        transport.down = True
        began = time.monotonic()
        with pytest.raises(LinkDown, match="is down"):
            await client.read(MONEY)
        assert time.monotonic() - began < 0.2


# --- interop: the dlt645 package's meter over TCP ----------------------------------------------


def wire_order(address: str) -> str:
    """dlt645 puts the address string's bytes on the wire as written (peers.md §1)."""
    return bytes.fromhex(address)[::-1].hex()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_read_from_the_dlt645_package_meter_over_tcp():
    dlt645 = pytest.importorskip("dlt645")
    from dlt645 import MeterServerService

    dlt645.disable_logging()
    address = "123456781012"
    server = await asyncio.to_thread(MeterServerService.new_tcp_server, "127.0.0.1", 0, 2.0)
    server.set_address(wire_order(address))
    assert server.set_00(ENERGY, 123.45)
    assert server.set_02(VOLTAGE, 231.4)
    assert await asyncio.to_thread(server.start)  # starts its own listener thread
    try:
        port = server.server.port
        assert port
        async with Link(TcpClientTransport("127.0.0.1", port), LinkConfig(gap_s=0.0, retries=1)) as link:
            client = MeterClient(link, address)
            energy, voltage = await client.read_many([ENERGY, VOLTAGE])
            assert (energy.address, energy.value, energy.unit) == (address, Decimal("123.45"), "kWh")
            assert (voltage.value, voltage.unit) == (Decimal("231.4"), "V")
    finally:
        await asyncio.to_thread(server.stop)
