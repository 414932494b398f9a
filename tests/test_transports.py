"""Transports of the simulated bus: TCP (converter), pty (serial device), MQTT (real Mosquitto)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import time
import uuid
from datetime import UTC, datetime

import aiomqtt
import pytest
import serial

from protocols.dlt645.address import WILDCARD
from protocols.dlt645.deframer import Deframer
from protocols.dlt645.frame import Frame
from protocols.dlt645.profile import SGCC_2013, MeterProfile
from simulator.bus import Bus, LineTiming
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSet, FaultSpec
from simulator.transports import MqttBusBridge, open_pty_bus, serve_tcp, start_mqtt_bridge

A1 = "000000000001"
A2 = "000000000002"
READ_DATA = bytes.fromhex("00000100")[::-1]
VALUE = bytes.fromhex("78563412")
TIMEOUT = 5.0
QUIET = logging.getLogger("tests.mqtt-master")
QUIET.setLevel(logging.ERROR)  # the test master publishes 30 at once: no "pending publish calls" noise


class FakeMeter:
    def __init__(self, address: str, profile: MeterProfile = SGCC_2013) -> None:
        self.address = address
        self.profile = profile
        self.faults = FaultSet()

    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        return Frame(self.address, frame.control.reply(), frame.data + VALUE)


def make_bus(name: str = "line1", **kw) -> Bus:
    clock = VirtualClock(datetime(2026, 1, 1, tzinfo=UTC), speed=0)
    return Bus(name, [FakeMeter(A1), FakeMeter(A2)], clock, **kw)


def request(address: str) -> bytes:
    return Frame(address, 0x11, READ_DATA).encode()


def reply(address: str) -> bytes:
    return Frame(address, 0x91, READ_DATA + VALUE).encode(4)


def frames_in(data: bytes) -> list[Frame]:
    d = Deframer()
    return d.feed(data) + d.flush()


# --- TCP ------------------------------------------------------------------------------


async def test_tcp_request_in_random_chunks_gets_the_reply():
    async with await serve_tcp(make_bus(), "127.0.0.1", 0) as endpoint:
        assert endpoint.port > 0 and str(endpoint.port) in endpoint.description
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        rng = random.Random(5)
        for address in (A1, A2, A1):
            raw = request(address)
            i = 0
            while i < len(raw):
                n = rng.randint(1, 6)
                writer.write(raw[i : i + n])
                await writer.drain()
                await asyncio.sleep(0.002)
                i += n
            got = await asyncio.wait_for(reader.readexactly(len(reply(address))), TIMEOUT)
            assert got == reply(address)
        writer.close()
        await writer.wait_closed()


async def test_tcp_two_clients_share_the_line():
    bus = make_bus(timing=LineTiming(baud=115200, td_min_ms=1, td_max_ms=3))
    async with await serve_tcp(bus) as endpoint:
        conns = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert endpoint.connections == 2

        async def client(conn, address: str) -> list[bytes]:
            reader, writer = conn
            out = []
            for _ in range(5):
                writer.write(request(address))
                await writer.drain()
                out.append(await asyncio.wait_for(reader.readexactly(len(reply(address))), TIMEOUT))
            return out

        r1, r2 = await asyncio.gather(client(conns[0], A1), client(conns[1], A2))
        assert r1 == [reply(A1)] * 5 and r2 == [reply(A2)] * 5
        records = list(bus.history)
        assert len(records) == 10
        assert all(b.start >= a.end - 1e-6 for a, b in itertools.pairwise(records))
        for _, writer in conns:
            writer.close()


async def test_tcp_wildcard_collision_is_garbage_and_client_can_go_on():
    async with await serve_tcp(make_bus()) as endpoint:
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.write(request(WILDCARD))
        garbage = await asyncio.wait_for(reader.read(256), TIMEOUT)
        assert garbage and frames_in(garbage) == []
        writer.write(request(A2))
        assert await asyncio.wait_for(reader.readexactly(len(reply(A2))), TIMEOUT) == reply(A2)
        writer.close()


async def test_tcp_pyserial_socket_url():
    async with await serve_tcp(make_bus()) as endpoint:

        def blocking() -> bytes:
            with serial.serial_for_url(endpoint.url, timeout=TIMEOUT) as port:
                port.write(request(A1))
                return port.read(len(reply(A1)))

        assert await asyncio.to_thread(blocking) == reply(A1)


async def test_tcp_close_drops_clients():
    endpoint = await serve_tcp(make_bus())
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.write(request(A1))
    await asyncio.wait_for(reader.readexactly(len(reply(A1))), TIMEOUT)
    await asyncio.wait_for(endpoint.aclose(), TIMEOUT)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", endpoint.port)


# --- pty ------------------------------------------------------------------------------


def serial_exchange(path: str, data: bytes, expect: int) -> bytes:
    with serial.Serial(path, baudrate=2400, bytesize=8, parity="N", stopbits=1, timeout=TIMEOUT) as port:
        port.write(data)
        return port.read(expect)


async def test_pty_pyserial_round_trip_close_and_reopen():
    async with open_pty_bus(make_bus()) as endpoint:
        assert endpoint.device_path.startswith("/dev/") and endpoint.device_path in endpoint.description
        for address in (A1, A2, A1):  # a fresh open each time
            got = await asyncio.to_thread(serial_exchange, endpoint.device_path, request(address), len(reply(address)))
            assert got == reply(address)
        assert endpoint.eio_count == 0


async def test_pty_raw_fd_is_transparent():
    # 0x03 (VINTR), 0x0A/0x0D (newline mapping) and 0x11/0x13 (XON/XOFF) must pass untouched.
    meter = FakeMeter("000000000003")
    bus = Bus("raw", [meter], VirtualClock(datetime(2026, 1, 1, tzinfo=UTC), speed=0))
    data = bytes((b - 0x33) & 0xFF for b in (0x03, 0x0A, 0x0D, 0x11, 0x13))
    raw_request = Frame(meter.address, 0x11, data).encode()  # scrambled: 03 0A 0D 11 13 on the wire
    assert bytes([0x03, 0x0A, 0x0D, 0x11, 0x13]) in raw_request
    expected = Frame(meter.address, 0x91, data + VALUE).encode(4)
    async with open_pty_bus(bus) as endpoint:

        def exchange() -> bytes:
            fd = os.open(endpoint.device_path, os.O_RDWR | os.O_NOCTTY)
            try:
                os.write(fd, raw_request)
                out = b""
                deadline = time.monotonic() + TIMEOUT
                while len(out) < len(expected) and time.monotonic() < deadline:
                    out += os.read(fd, 256)
                return out
            finally:
                os.close(fd)

        assert await asyncio.to_thread(exchange) == expected


async def test_pty_close_makes_the_device_go_away():
    endpoint = open_pty_bus(make_bus())
    path = endpoint.device_path
    await endpoint.aclose()
    endpoint.close()  # idempotent
    with pytest.raises(OSError):
        os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


# --- MQTT (the real Mosquitto on 127.0.0.1:1883) ----------------------------------------


def broker_listening(port: int = 1883) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


needs_broker = pytest.mark.skipif(
    not broker_listening(), reason="no MQTT broker listening on 127.0.0.1:1883 (CI starts Mosquitto: .ci/services)"
)


async def eventually(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def prefix() -> str:
    return f"meterlink-test/{uuid.uuid4().hex}"


async def mqtt_exchange(
    prefix: str, ident: str, payloads: list[bytes], expect: int, *, until_bytes: int = 0
) -> list[bytes]:
    """Publish payloads to <prefix>/<ident>/down; collect `expect` messages (or `until_bytes`) from .../up."""
    async with aiomqtt.Client(
        "127.0.0.1", 1883, identifier=f"test-master-{uuid.uuid4().hex[:8]}", logger=QUIET
    ) as master:
        await master.subscribe(f"{prefix}/{ident}/up", qos=1)
        for payload in payloads:
            await master.publish(f"{prefix}/{ident}/down", payload, qos=1)
        got: list[bytes] = []

        async def collect() -> None:
            async for message in master.messages:
                got.append(bytes(message.payload))
                if len(got) >= expect and sum(map(len, got)) >= until_bytes:
                    return

        if expect:
            try:
                await asyncio.wait_for(collect(), TIMEOUT)
            except TimeoutError:
                return got
        else:
            await asyncio.sleep(0.2)
        return got


@needs_broker
async def test_mqtt_bus_round_trip(prefix):
    bridge = await start_mqtt_bridge({"line1": make_bus()}, "mqtt://127.0.0.1:1883", prefix=prefix)
    try:
        assert prefix in bridge.description
        raw = request(A2)
        got = await mqtt_exchange(prefix, "line1", [raw[:9], raw[9:]], 1)  # a frame split over two messages
        assert got == [reply(A2)]
        await eventually(lambda: bridge.stats.replies_out == 1)  # the PUBACK may still be on its way
        assert bridge.stats.connects == 1 and bridge.stats.replies_dropped == 0
    finally:
        await bridge.aclose()


@needs_broker
async def test_mqtt_collision_and_faults_reach_the_master(prefix):
    bus = make_bus()
    bus.meters[A1].faults.add(FaultSpec(Fault.BYTE_GAPS, gap_ms=10, remaining=1))
    async with MqttBusBridge([bus], "127.0.0.1", 1883, prefix) as bridge:
        pieces = await mqtt_exchange(prefix, "line1", [request(A1)], 2, until_bytes=len(reply(A1)))
        assert 2 <= len(pieces) <= 3 and b"".join(pieces) == reply(A1)  # one message per piece
        garbage = await mqtt_exchange(prefix, "line1", [request(WILDCARD)], 1)
        assert frames_in(garbage[0]) == []
        assert bridge.stats.unknown_ids == 0


@needs_broker
async def test_mqtt_dtu_mode_one_meter_per_id(prefix):
    bus = make_bus()
    async with MqttBusBridge({"line1": bus}, "127.0.0.1", 1883, prefix, dtu=True) as bridge:
        assert sorted(bridge.ids()) == [A1, A2]
        # Behind a DTU the meter is alone: a wildcard read gets its reply, no collision.
        assert await mqtt_exchange(prefix, A2, [request(WILDCARD)], 1) == [Frame(A2, 0x91, READ_DATA + VALUE).encode(4)]
        assert await mqtt_exchange(prefix, "000000000099", [request(A1)], 0) == []
        assert bridge.stats.unknown_ids == 1 and bus.stats.collisions == 0


@needs_broker
async def test_mqtt_many_concurrent_requests_none_lost(prefix):
    buses = {f"line{i}": make_bus(f"line{i}") for i in range(30)}
    async with MqttBusBridge(buses, "127.0.0.1", 1883, prefix):
        async with aiomqtt.Client(
            "127.0.0.1", 1883, identifier=f"test-master-{uuid.uuid4().hex[:8]}", logger=QUIET
        ) as master:
            await master.subscribe(f"{prefix}/+/up", qos=1)
            await asyncio.gather(*(master.publish(f"{prefix}/{n}/down", request(A1), qos=1) for n in buses))
            seen: set[str] = set()

            async def collect() -> None:
                async for message in master.messages:
                    assert bytes(message.payload) == reply(A1)
                    seen.add(message.topic.value.split("/")[-2])
                    if len(seen) == len(buses):
                        return

            await asyncio.wait_for(collect(), TIMEOUT)
    assert seen == set(buses)


class DroppingProxy:
    """A TCP proxy to the broker whose connections a test can cut (the broker "goes away")."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 1883)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(4096):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def drop_all(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def aclose(self) -> None:
        self.drop_all()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@needs_broker
async def test_mqtt_bridge_reconnects_after_losing_the_broker(prefix):
    proxy = DroppingProxy()
    port = await proxy.start()
    bridge = MqttBusBridge([make_bus()], "127.0.0.1", port, prefix, backoff_initial=0.05, backoff_max=0.2)
    try:
        await bridge.start()
        assert await mqtt_exchange(prefix, "line1", [request(A1)], 1) == [reply(A1)]
        proxy.drop_all()
        await eventually(lambda: bridge.stats.connects == 2 and bridge.connected.is_set())
        got = await mqtt_exchange(prefix, "line1", [request(A2)], 1)
        assert got == [reply(A2)], bridge.stats
        # The first reply's PUBACK may have died with the connection: then it counts as dropped.
        await eventually(lambda: bridge.stats.replies_out + bridge.stats.replies_dropped == 2)
    finally:
        await bridge.aclose()
        await proxy.aclose()


async def test_mqtt_unreachable_broker_retries_and_closes():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bridge = MqttBusBridge([make_bus()], "127.0.0.1", port, "x", backoff_initial=0.02, backoff_max=0.05)
    with pytest.raises(TimeoutError):
        await bridge.start(wait=0.3)
    assert bridge.stats.connect_failures >= 2
    await asyncio.wait_for(bridge.aclose(), TIMEOUT)


def test_mqtt_bridge_rejects_bad_settings():
    with pytest.raises(ValueError):
        MqttBusBridge([], prefix="a/+/b")
    with pytest.raises(ValueError):
        MqttBusBridge([], max_inflight=50)
