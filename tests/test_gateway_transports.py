"""Gateway transports against the simulator: serial (pty, socket://, rfc2217://), TCP, DTU server, MQTT.

MQTT tests use the real Mosquitto on 127.0.0.1:1883 (skipped if nothing listens there); the
broker-restart test starts its own ``mosquitto`` on a free port and kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest
import serial
from serial import rfc2217

from gateway.client import MeterClient
from gateway.errors import BusUrlError, LinkDown
from gateway.link import Link, LinkConfig
from gateway.transports import (
    BROKER_INFLIGHT_LIMIT,
    DtuConnection,
    DtuServer,
    DtuTransport,
    MqttConnection,
    MqttTransport,
    SerialTransport,
    TcpClientTransport,
    Transport,
    open_transport,
)
from protocols.dlt645 import Deframer, decode_read_reply, encode_read_request
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import Fleet
from simulator.scenario import from_flags
from simulator.transports import open_pty_bus, serve_tcp, start_mqtt_bridge

pytestmark = pytest.mark.filterwarnings(
    "ignore:set(Daemon|Name)\\(\\) is deprecated:DeprecationWarning"
)  # pyserial rfc2217

A1, A2, A3 = "000000000001", "000000000002", "000000000003"
DI = 0x00010000  # forward active energy, total
TIMEOUT = 3.0
MOSQUITTO = "/usr/sbin/mosquitto"


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


async def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def transact(transport: Transport, address: str, timeout: float = TIMEOUT) -> bytes:
    """Send a read request, return the raw bytes of the first complete reply frame."""
    await transport.write(encode_read_request(address, DI))
    deframer = Deframer()
    raw = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = await transport.read(0.2)
        raw += chunk
        if chunk and deframer.feed(chunk):
            return raw
    raise AssertionError(f"no reply from {address} on {transport.url} (got {raw.hex()})")


async def read_ok(transport: Transport, address: str) -> None:
    got, item, value = decode_read_reply(await transact(transport, address))
    assert got == address and item.di == DI and value is not None


@pytest.fixture
def fleet() -> Fleet:
    scenario = from_flags(3, 1, timing=False)
    return Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)


@pytest.fixture
def bus(fleet: Fleet):
    return next(iter(fleet.buses.values()))


@pytest.fixture
def prefix() -> str:
    return f"meterlink-test/{uuid.uuid4().hex[:12]}/dtu"


# --- helpers that play the other side ---------------------------------------------------


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


class FakeDtu:
    """A 4G DTU: dials in to the gateway, sends its registration packet, relays to the RS-485 line."""

    def __init__(self, line_port: int) -> None:
        self.line_port = line_port
        self.tasks: list[asyncio.Task[None]] = []
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None

    async def dial(self, server_port: int, registration: bytes = b"") -> FakeDtu:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", server_port)
        if registration:
            self.writer.write(registration)
            await self.writer.drain()
        line_reader, line_writer = await asyncio.open_connection("127.0.0.1", self.line_port)
        self.tasks = [
            asyncio.create_task(pipe(self.reader, line_writer)),
            asyncio.create_task(pipe(line_reader, self.writer)),
        ]
        return self

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def hang_up(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.writer is not None:
            self.writer.close()


class Rfc2217Proxy:
    """An RFC 2217 (telnet COM port) server in front of the simulator's TCP line, on pyserial's PortManager."""

    def __init__(self, line_port: int) -> None:
        self.line_port = line_port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        settings_port = serial.serial_for_url("loop://")  # only holds the negotiated settings
        manager = rfc2217.PortManager(settings_port, writer)
        line_reader, line_writer = await asyncio.open_connection("127.0.0.1", self.line_port)

        async def down() -> None:
            while data := await reader.read(4096):
                payload = b"".join(manager.filter(data))
                if payload:
                    line_writer.write(payload)

        async def up() -> None:
            while data := await line_reader.read(4096):
                writer.write(b"".join(manager.escape(data)))

        try:
            await asyncio.gather(down(), up())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            line_writer.close()
            writer.close()
            settings_port.close()

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Mosquitto:
    """A private broker process on a fixed port, to kill and restart (never the machine's own)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await eventually(lambda: broker_listening(self.port), 5.0)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


# --- every transport, one fixture -------------------------------------------------------

KINDS = ["serial-pty", "serial-socket", "serial-rfc2217", "tcp", "dtu", "mqtt"]


@pytest.fixture(params=KINDS)
async def line(request: pytest.FixtureRequest, fleet: Fleet, bus) -> AsyncIterator[Transport]:
    """An open transport to the fleet's one bus, of each kind."""
    kind = request.param
    async with contextlib.AsyncExitStack() as stack:
        if kind == "serial-pty":
            endpoint = open_pty_bus(bus)
            stack.push_async_callback(endpoint.aclose)
            transport: Transport = open_transport(f"serial://{endpoint.device_path}?parity=N")
        elif kind == "mqtt":
            if not HAVE_BROKER:
                pytest.skip("no MQTT broker listening on 127.0.0.1:1883")
            prefix = f"meterlink-test/{uuid.uuid4().hex[:12]}"
            bridge = await start_mqtt_bridge(fleet.buses, "mqtt://127.0.0.1:1883", None, prefix)
            stack.push_async_callback(bridge.aclose)
            transport = open_transport(f"mqtt://127.0.0.1:1883/{prefix}/{bus.name}")
        else:
            tcp = await serve_tcp(bus, "127.0.0.1", 0)
            stack.push_async_callback(tcp.aclose)
            if kind == "serial-socket":
                transport = open_transport(f"socket://127.0.0.1:{tcp.port}")
            elif kind == "tcp":
                transport = open_transport(f"tcp://127.0.0.1:{tcp.port}?baud=2400")
            elif kind == "serial-rfc2217":
                proxy = Rfc2217Proxy(tcp.port)
                port = await proxy.start()
                stack.push_async_callback(proxy.aclose)
                transport = open_transport(f"rfc2217://127.0.0.1:{port}?parity=E")
            else:
                server = await DtuServer("127.0.0.1", 0, registration=b"REG:").start()
                stack.push_async_callback(server.aclose)
                dtu = await FakeDtu(tcp.port).dial(server.port, b"REG:DTU0001\r\n")
                stack.push_async_callback(dtu.hang_up)
                transport = await server.wait_for("DTU0001", TIMEOUT)
        await transport.open()
        stack.push_async_callback(transport.close)
        yield transport


async def test_read_request_is_answered(line: Transport):
    assert line.connected
    for address in (A1, A2, A3, A1):
        await read_ok(line, address)


async def test_read_timeout_gives_empty_bytes(line: Transport):
    start = time.monotonic()
    assert await line.read(0.05) == b""
    assert 0.04 <= time.monotonic() - start < 1.0


async def test_discard_input_drops_a_late_reply(line: Transport):
    await line.write(encode_read_request(A2, DI))
    await asyncio.sleep(0.3)  # the reply arrives; nobody reads it (the scheduler gave up)
    assert line.discard_input() > 0
    assert await line.read(0.05) == b""
    await read_ok(line, A3)  # the next transaction sees only its own reply


async def test_close_twice_and_reopen(line: Transport):
    await line.close()
    await line.close()
    assert not line.connected
    with pytest.raises(LinkDown):
        await line.write(b"\x00")
    with pytest.raises(LinkDown):
        await line.read(0.01)
    if isinstance(line, DtuConnection):  # the DTU must dial in again
        with pytest.raises(LinkDown, match="dial in again"):
            await line.open()
        return
    await line.open()
    await read_ok(line, A1)


# --- serial -----------------------------------------------------------------------------


async def test_serial_missing_device_is_link_down():
    transport = SerialTransport("/dev/does-not-exist")
    assert transport.baud == 2400 and transport.settings == "2400 8E1"
    with pytest.raises(LinkDown, match=r"/dev/does-not-exist.*No such file or directory"):
        await transport.open()
    assert not transport.connected
    with pytest.raises(LinkDown):
        await transport.read(0.01)


async def test_serial_pty_with_parity_is_link_down_with_a_hint(bus):
    async with open_pty_bus(bus) as endpoint:
        with pytest.raises(LinkDown, match="parity N"):
            await SerialTransport(endpoint.device_path, parity="E").open()


async def test_serial_port_vanishing_is_link_down(bus):
    endpoint = open_pty_bus(bus)
    transport = SerialTransport(endpoint.device_path, 9600, "N")
    assert transport.baud == 9600
    await transport.open()
    try:
        await read_ok(transport, A1)
        waiting = asyncio.create_task(transport.read(5.0))
        await asyncio.sleep(0.05)
        await endpoint.aclose()  # the USB adapter is unplugged
        with pytest.raises(LinkDown):
            await asyncio.wait_for(waiting, TIMEOUT)
        assert not transport.connected
        with pytest.raises(LinkDown):
            await transport.write(encode_read_request(A1, DI))
        with pytest.raises(LinkDown, match="cannot open"):
            await transport.open()  # still gone
    finally:
        await transport.close()


async def test_serial_socket_converter_going_away_is_link_down(bus):
    tcp = await serve_tcp(bus)
    transport = SerialTransport(tcp.url, 2400)
    await transport.open()
    try:
        await read_ok(transport, A2)
        await tcp.aclose()
        with pytest.raises(LinkDown):
            await transport.read(TIMEOUT)
        with pytest.raises(LinkDown):
            await transport.write(b"\x68")
    finally:
        await transport.close()


async def test_serial_socket_refused_is_link_down():
    with pytest.raises(LinkDown, match="cannot open"):
        await SerialTransport(f"socket://127.0.0.1:{free_port()}").open()


# --- TCP client -------------------------------------------------------------------------


async def test_tcp_refused_port_is_link_down():
    port = free_port()
    transport = TcpClientTransport("127.0.0.1", port)
    assert transport.url == f"tcp://127.0.0.1:{port}" and transport.baud is None
    with pytest.raises(LinkDown, match=r"cannot connect: .*refused"):
        await transport.open()
    with pytest.raises(LinkDown):
        await transport.write(b"x")


async def test_tcp_converter_closing_is_link_down_and_reopen_reconnects(bus):
    tcp = await serve_tcp(bus)
    port = tcp.port
    transport = TcpClientTransport("127.0.0.1", port)
    await transport.open()
    try:
        await read_ok(transport, A1)
        waiting = asyncio.create_task(transport.read(5.0))
        await asyncio.sleep(0.02)
        await tcp.aclose()
        with pytest.raises(LinkDown, match="closed by the other side"):
            await asyncio.wait_for(waiting, TIMEOUT)
        with pytest.raises(LinkDown):
            await transport.write(b"x")
        tcp = await serve_tcp(bus, "127.0.0.1", port)  # the converter is back
        await transport.open()
        await read_ok(transport, A3)
    finally:
        await transport.close()
        await tcp.aclose()


# --- DTU server -------------------------------------------------------------------------


async def test_dtu_found_by_id_and_heartbeats_filtered(bus):
    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0, registration=b"REG:") as server:
        assert server.port > 0
        dtu = await FakeDtu(tcp.port).dial(server.port, b"REG:DTU0042\r\n")
        try:
            conn = await server.wait_for("DTU0042", TIMEOUT)
            assert conn.ident == "DTU0042" and conn.registered and server.ids == ["DTU0042"]
            assert server.get("DTU0042") is conn and server.get("DTU9999") is None
            assert "DTU0042" in conn.url and conn.baud is None
            await read_ok(conn, A1)
            await dtu.send(b"REG:DTU0042\r\n")  # a heartbeat: never reaches the scheduler
            assert await conn.read(0.2) == b""
            assert conn.heartbeats == 1 and conn.last_heartbeat is not None
            await read_ok(conn, A2)
            with pytest.raises(LinkDown, match="DTU9999 did not dial in"):
                await server.wait_for("DTU9999", 0.05)
        finally:
            await dtu.hang_up()
        await eventually(lambda: server.get("DTU0042") is None)
        with pytest.raises(LinkDown):
            await conn.read(0.1)


async def test_dtu_regex_registration_and_separate_heartbeat(bus):
    reg = re.compile(rb"##(?P<id>\d{15})##")
    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0, registration=reg, heartbeat=b"<3") as server:
        dtu = await FakeDtu(tcp.port).dial(server.port, b"##861234567890123##")
        try:
            conn = await server.accept(TIMEOUT)
            assert conn.ident == "861234567890123"
            await dtu.send(b"<3")
            await read_ok(conn, A3)
            assert conn.heartbeats == 1
        finally:
            await dtu.hang_up()


async def test_dtu_callable_registration(bus):
    def parse(data: bytes) -> tuple[str, int] | None:
        if len(data) < 4:
            return None
        if data[0] != 0x7E:
            raise ValueError("no 7E header")
        return data[1:4].hex().upper(), 4

    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0, registration=parse) as server:
        dtu = await FakeDtu(tcp.port).dial(server.port, b"\x7e\x01\x02\x03")
        try:
            conn = await server.wait_for("010203", TIMEOUT)
            await read_ok(conn, A1)
        finally:
            await dtu.hang_up()


async def test_dtu_without_registration_is_labelled_by_the_caller(bus):
    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0) as server:
        dtu = await FakeDtu(tcp.port).dial(server.port)
        try:
            conn = await server.accept(TIMEOUT)
            assert conn.ident is None and conn.registered and server.ids == []
            # The caller finds out which line it is (here: meter 000000000002 answers) and says so.
            await read_ok(conn, A2)
            server.label(conn, "line-of-000000000002")
            assert server.get("line-of-000000000002") is conn and conn.ident == "line-of-000000000002"
            server.label(conn, "renamed")
            assert server.ids == ["renamed"]
        finally:
            await dtu.hang_up()


async def test_dtu_with_a_bad_registration_is_dropped(bus):
    async with DtuServer("127.0.0.1", 0, registration=b"REG:", registration_timeout=0.2) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"HELLO\r\n")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # hung up on
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # says nothing at all
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        assert server.ids == [] and server.connections == []


async def test_dtu_dialling_in_again_replaces_the_old_connection(bus):
    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0, registration=b"REG:") as server:
        first = await FakeDtu(tcp.port).dial(server.port, b"REG:D1")
        old = await server.wait_for("D1", TIMEOUT)
        second = await FakeDtu(tcp.port).dial(server.port, b"REG:D1")
        try:
            await eventually(lambda: server.get("D1") not in (None, old))
            new = server.get("D1")
            assert new is not None
            with pytest.raises(LinkDown, match="replaced"):
                await old.read(0.5)
            await read_ok(new, A2)
        finally:
            await first.hang_up()
            await second.hang_up()


async def test_dtu_registration_split_across_tcp_segments_gets_its_whole_id(bus):
    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0, registration=b"REG:") as server:
        dtu = await FakeDtu(tcp.port).dial(server.port, b"REG:DT")
        try:
            await asyncio.sleep(0.05)  # the rest of the packet in a second TCP segment
            await dtu.send(b"U7\r\n")
            conn = await server.wait_for("DTU7", TIMEOUT)
            assert server.ids == ["DTU7"]
            await read_ok(conn, A1)
            await dtu.send(b"REG:DTU7\r\n")  # the repeated packet is a heartbeat
            assert await conn.read(0.2) == b""
            assert conn.heartbeats == 1
        finally:
            await dtu.hang_up()


async def test_dtu_registration_without_a_terminator_is_taken_after_a_silence(bus):
    async with await serve_tcp(bus) as tcp, DtuServer("127.0.0.1", 0, registration=b"REG:") as server:
        began = time.monotonic()
        dtu = await FakeDtu(tcp.port).dial(server.port, b"REG:DTU8")
        try:
            conn = await server.wait_for("DTU8", TIMEOUT)
            assert time.monotonic() - began >= server.registration_idle * 0.9
            await read_ok(conn, A2)
        finally:
            await dtu.hang_up()


async def test_dtu_identified_by_its_heartbeat(bus):
    async with (
        await serve_tcp(bus) as tcp,
        DtuServer("127.0.0.1", 0, heartbeat=b"HB:", heartbeat_ident=True) as server,
    ):
        assert server.registration_timeout == 300.0  # a heartbeat may be minutes away
        dtu = await FakeDtu(tcp.port).dial(server.port)  # no registration packet
        try:
            await asyncio.sleep(0.1)
            assert server.ids == []  # not known until it sends a heartbeat
            await dtu.send(b"HB:DTU0009\r\n")
            conn = await server.wait_for("DTU0009", TIMEOUT)
            assert conn.heartbeats == 1
            await read_ok(conn, A3)
            await dtu.send(b"HB:DTU0009\r\n")  # later heartbeats never reach the scheduler
            assert await conn.read(0.2) == b""
            assert conn.heartbeats == 2
            await read_ok(conn, A1)
        finally:
            await dtu.hang_up()
    with pytest.raises(ValueError, match="needs the heartbeat"):
        DtuServer(heartbeat_ident=True)
    with pytest.raises(ValueError, match="without a registration packet"):
        DtuServer(registration=b"R", heartbeat=b"H", heartbeat_ident=True)


async def test_link_on_a_dtu_url_identified_by_heartbeat(lonely: Fleet):
    port = free_port()
    tcp = await serve_tcp(lonely.buses["bus1"], "127.0.0.1", 0)
    transport = open_transport(f"dtu://127.0.0.1:{port}/DTU0002?heartbeat=HB:&identify=heartbeat&wait=3")
    link = Link(transport, LinkConfig(gap_s=0.0, td_max_s=0.2, retries=1, backoff_s=0.05))
    dtu = None
    try:
        starting = asyncio.create_task(link.start())
        await eventually(lambda: broker_listening(port))
        dtu = await FakeDtu(tcp.port).dial(port)
        await dtu.send(b"junk")  # before its first heartbeat: dropped
        await asyncio.sleep(0.05)
        await dtu.send(b"HB:DTU0002")
        await asyncio.wait_for(starting, TIMEOUT)
        assert transport.connection is not None and transport.connection.ident == "DTU0002"
        assert (await MeterClient(link, A2).read(0x04000401)).value == A2
    finally:
        await link.stop()
        if dtu is not None:
            await dtu.hang_up()
        await tcp.aclose()


# --- MQTT -------------------------------------------------------------------------------


@needs_broker
async def test_mqtt_dtus_share_one_connection(fleet, prefix):
    bridge = await start_mqtt_bridge(fleet.buses, "mqtt://127.0.0.1:1883", None, prefix, dtu=True)
    transports = [open_transport(f"mqtt://127.0.0.1:1883/{prefix}/{a}") for a in (A1, A2, A3)]
    try:
        for t in transports:
            await t.open()
        conn = transports[0].connection  # type: ignore[attr-defined]
        assert conn is not None and all(t.connection is conn for t in transports)  # type: ignore[attr-defined]
        assert conn.users == 3 and conn.connected and conn.stats.connects == 1

        async def many(t: Transport, address: str) -> None:
            for _ in range(8):
                await read_ok(t, address)

        await asyncio.gather(*(many(t, a) for t, a in zip(transports, (A1, A2, A3), strict=True)))
        assert conn.stats.published == 24 and conn.stats.publish_failures == 0
    finally:
        for t in transports:
            await t.close()
        await bridge.aclose()
    assert conn.users == 0 and not conn.connected  # the last transport closed the shared connection


@needs_broker
async def test_mqtt_never_has_more_publishes_in_flight_than_the_broker_allows(prefix):
    """60 publishes issued at once (3 DTUs x 20): at most BROKER_INFLIGHT_LIMIT (20, mosquitto's
    max_inflight_messages) are ever handed to the client without their PUBACK; all arrive."""
    received: list[bytes] = []
    async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"inflight-{uuid.uuid4().hex[:8]}") as watcher:
        await watcher.subscribe(f"{prefix}/+/down", qos=1)
        transports = [open_transport(f"mqtt://127.0.0.1:1883/{prefix}/d{i}") for i in range(3)]
        try:
            for t in transports:
                await t.open()
            conn = transports[0].connection  # type: ignore[attr-defined]
            direct = conn._direct
            assert direct is not None
            # Count, independently of the code under test, publishes handed to paho and not yet acked.
            pending = {"now": 0, "peak": 0}
            original = direct.publish

            def counting(topic: str, payload: bytes, qos: int):  # type: ignore[no-untyped-def]
                mid, future = original(topic, payload, qos)
                if future is not None:
                    pending["now"] += 1
                    pending["peak"] = max(pending["peak"], pending["now"])
                    future.add_done_callback(lambda _f: pending.__setitem__("now", pending["now"] - 1))
                return mid, future

            direct.publish = counting  # type: ignore[method-assign]
            frames = [encode_read_request(f"{n:012d}", DI) for n in range(20)]
            await asyncio.gather(*(t.write(f) for t in transports for f in frames))

            async def all_arrived() -> None:
                async for message in watcher.messages:
                    received.append(bytes(message.payload))  # type: ignore[arg-type]
                    if len(received) == 60:
                        return

            await asyncio.wait_for(all_arrived(), TIMEOUT)
        finally:
            for t in transports:
                await t.close()
    assert conn.stats.published == 60 and conn.stats.publish_failures == 0
    assert pending["peak"] == BROKER_INFLIGHT_LIMIT  # the limit was reached (60 wanted to go) and held
    assert conn.stats.peak_inflight == BROKER_INFLIGHT_LIMIT
    assert sorted(received) == sorted(frames * 3)


async def test_mqtt_unreachable_broker_is_link_down():
    transport = MqttTransport("127.0.0.1", free_port(), "x/y", "d1")
    assert transport.open_timeout == 10.0
    began = time.monotonic()
    with pytest.raises(LinkDown, match=r"not reachable: .*[Rr]efused"):
        await transport.open()
    assert time.monotonic() - began < 1.0  # a refused connection fails at once, not after open_timeout
    assert not transport.connected and transport.connection is None
    with pytest.raises(LinkDown):
        await transport.write(b"x")


@pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason=f"{MOSQUITTO} is not installed")
async def test_mqtt_broker_restart_is_survived(fleet, prefix, tmp_path):
    broker = Mosquitto(tmp_path)
    await broker.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    bridge = await start_mqtt_bridge(fleet.buses, url, None, prefix, backoff_initial=0.05, backoff_max=0.2)
    conn = MqttConnection("127.0.0.1", broker.port, backoff_initial=0.05, backoff_max=0.2)
    transport = MqttTransport(prefix=prefix, ident="bus0", connection=conn)
    try:
        await transport.open()
        await read_ok(transport, A1)

        waiting = asyncio.create_task(transport.read(5.0))
        await asyncio.sleep(0.05)
        broker.kill()
        with pytest.raises(LinkDown):  # a waiting read learns at once
            await asyncio.wait_for(waiting, TIMEOUT)
        assert not transport.connected
        with pytest.raises(LinkDown):  # a request during the outage is refused, not lost
            await transport.write(encode_read_request(A2, DI))

        await broker.start()  # same port
        await transport.open()  # waits for the reconnection (and resubscription)
        await eventually(lambda: bridge.connected.is_set())
        await read_ok(transport, A2)
        assert conn.stats.connects == 2 and conn.stats.disconnects == 1
    finally:
        await transport.close()
        await conn.aclose()
        await bridge.aclose()
        broker.kill()


@pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason=f"{MOSQUITTO} is not installed")
async def test_mqtt_open_reconnects_now_not_after_the_backoff(prefix, tmp_path):
    broker = Mosquitto(tmp_path)
    await broker.start()
    conn = MqttConnection("127.0.0.1", broker.port, backoff_initial=3.0, backoff_max=3.0, retry_spacing=0.05)
    transport = MqttTransport(prefix=prefix, ident="bus0", connection=conn)
    try:
        await transport.open()
        broker.kill()
        await eventually(lambda: not transport.connected)
        began = time.monotonic()
        with pytest.raises(LinkDown, match="not reachable"):  # down: one attempt, refused at once
            await transport.open()
        assert time.monotonic() - began < 1.0
        await broker.start()
        began = time.monotonic()
        await transport.open()  # the loop sleeps 1.5..4.5 s before its own next attempt
        assert time.monotonic() - began < 1.0 and transport.connected
        assert conn.stats.connects == 2
    finally:
        await transport.close()
        await conn.aclose()
        broker.kill()


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "attrs"),
    [
        ("serial:///dev/ttyUSB0", SerialTransport, {"device": "/dev/ttyUSB0", "baud": 2400, "parity": "E"}),
        (
            "serial:///dev/ttyS1?baud=9600&parity=n&bytesize=7&stopbits=2",
            SerialTransport,
            {"device": "/dev/ttyS1", "baud": 9600, "parity": "N", "bytesize": 7, "stopbits": 2},
        ),
        ("serial:///dev/ttyUSB0?parity=O&stopbits=1.5", SerialTransport, {"parity": "O", "stopbits": 1.5}),
        ("serial://COM3?baud=1200", SerialTransport, {"device": "COM3", "baud": 1200}),
        ("socket://10.0.0.5:4001", SerialTransport, {"device": "socket://10.0.0.5:4001", "baud": 2400}),
        ("socket://10.0.0.5:4001?baud=9600", SerialTransport, {"device": "socket://10.0.0.5:4001", "baud": 9600}),
        ("rfc2217://[::1]:2217?parity=E", SerialTransport, {"device": "rfc2217://[::1]:2217", "parity": "E"}),
        ("tcp://10.0.0.5:4001", TcpClientTransport, {"host": "10.0.0.5", "port": 4001, "baud": None}),
        ("tcp://converter.local:26?baud=4800", TcpClientTransport, {"host": "converter.local", "baud": 4800}),
        ("tcp://[fe80::1]:502", TcpClientTransport, {"host": "fe80::1", "url": "tcp://[fe80::1]:502"}),
        (
            "mqtt://broker:1884/meters/dtu/861234567890123",
            MqttTransport,
            {"host": "broker", "port": 1884, "prefix": "meters/dtu", "ident": "861234567890123"},
        ),
        ("mqtt://broker/p/DTU1", MqttTransport, {"port": 1883, "prefix": "p", "ident": "DTU1", "baud": None}),
        ("mqtt://broker/p/DTU1?baud=1200", MqttTransport, {"ident": "DTU1", "baud": 1200}),
        (
            "mqtt://gw:s3cret@broker:1883/a/b/c/d",
            MqttTransport,
            {"username": "gw", "prefix": "a/b/c", "ident": "d", "url": "mqtt://gw@broker:1883/a/b/c/d"},
        ),
        (" TCP://h:1 ", TcpClientTransport, {"host": "h", "port": 1}),
    ],
)
def test_url_forms(url, kind, attrs):
    transport = open_transport(url)
    assert type(transport) is kind
    for name, value in attrs.items():
        assert getattr(transport, name) == value, name
    assert not transport.connected
    assert "s3cret" not in transport.url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty bus URL"),
        ("/dev/ttyUSB0", "not a bus URL"),
        ("http://x:1", "unknown scheme 'http'"),
        ("serial://", "missing device path"),
        ("serial://ttyUSB0", "absolute path with three slashes"),
        ("serial://dev/ttyUSB0", "absolute path with three slashes"),
        ("serial://socket://h:1", "write pyserial URLs directly"),
        ("serial:///dev/ttyUSB0?parity=X", "parity='X' is not one of N, E, O"),
        ("serial:///dev/ttyUSB0?baud=fast", "baud='fast' is not a whole number"),
        ("serial:///dev/ttyUSB0?baud=0", "must be positive"),
        ("serial:///dev/ttyUSB0?bytesize=9", "bytesize=9 is not one of"),
        ("serial:///dev/ttyUSB0?stopbits=3", "stopbits='3' is not 1, 1.5 or 2"),
        ("serial:///dev/ttyUSB0?speed=2400", "unknown option 'speed'"),
        ("serial:///dev/ttyUSB0?baud=2400&baud=9600", "given twice"),
        ("serial:///dev/ttyUSB0?baud", "bad query string"),
        ("serial:///dev/ttyUSB0#x", "unexpected fragment"),
        ("socket://10.0.0.5", "missing port"),
        ("socket://:4001", "missing host"),
        ("socket://h:1/x", "unexpected path"),
        ("rfc2217://h:99999", "bad port"),
        ("rfc2217://h:1?parity=M", "is not one of N, E, O"),
        ("tcp://10.0.0.5", "missing port"),
        ("tcp://10.0.0.5:0", "outside 1..65535"),
        ("tcp://10.0.0.5:http", "bad port"),
        ("tcp://u:p@10.0.0.5:1", "take no user or password"),
        ("tcp://h:1?parity=E", "unknown option 'parity' (allowed: baud)"),
        ("tcp://h:1/path", "unexpected path"),
        ("mqtt://broker:1883", "missing topic"),
        ("mqtt://broker:1883/", "missing topic"),
        ("mqtt://broker:1883/onlyid", "need a topic prefix and a DTU id"),
        ("mqtt://broker:1883/a//id", "empty topic level"),
        ("mqtt://broker:1883/a/id/", "empty topic level"),
        ("mqtt://broker:1883/a/+/id", "wildcards"),
        ("mqtt://broker:1883/a/#", "wildcards"),
        ("mqtt://broker:1883/a/b?qos=2", "unknown option 'qos' (allowed: baud)"),
        ("mqtt://broker:1883/a/b?baud=0", "baud='0' must be positive"),
        ("mqtt://:1883/a/b", "missing host"),
        ("mqtt://u:hunter2@broker:x/a/b", "bad port"),
    ],
)
def test_url_errors(url, message):
    with pytest.raises(BusUrlError, match=re.escape(message)) as info:
        open_transport(url)
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_constructors_reject_bad_settings():
    with pytest.raises(ValueError, match="parity"):
        SerialTransport("/dev/ttyUSB0", parity="X")
    with pytest.raises(ValueError, match="port"):
        TcpClientTransport("h", 0)
    with pytest.raises(ValueError, match="wildcards"):
        MqttTransport("h", 1883, "a/+", "x")
    with pytest.raises(ValueError, match="one topic level"):
        MqttTransport("h", 1883, "a", "x/y")
    with pytest.raises(ValueError, match="max_inflight"):
        MqttConnection(max_inflight=21)
    with pytest.raises(ValueError, match="empty registration prefix"):
        DtuServer(registration=b"")
    with pytest.raises(TypeError, match="bytes pattern"):
        DtuServer(registration=re.compile("REG(.*)"))


# --- dial-in DTUs as buses (dtu://) ------------------------------------------------------


@pytest.fixture
def lonely() -> Fleet:
    """Three buses with one meter each (bus0: A1, bus1: A2, bus2: A3): each behind its own DTU."""
    scenario = from_flags(3, 3, timing=False)
    return Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)


@pytest.mark.parametrize(
    ("url", "attrs"),
    [
        (
            "dtu://0.0.0.0:9000/DTU0001?registration=REG:",
            {"host": "0.0.0.0", "port": 9000, "ident": "DTU0001", "registration": b"REG:", "heartbeat": None},
        ),
        ("dtu://0.0.0.0:9000/1", {"ident": A1, "registration": None, "wait": 5.0}),
        ("dtu://127.0.0.1:9000/000000000002?baud=1200&wait=30", {"ident": A2, "baud": 1200, "wait": 30.0}),
        (
            "dtu://[::]:9000/861234567890123?registration=%23%23&heartbeat=%3C3",
            {"host": "::", "registration": b"##", "heartbeat": b"<3", "url": "dtu://[::]:9000/861234567890123"},
        ),
        (
            "dtu://0.0.0.0:9000/DTU9?heartbeat=HB:&identify=heartbeat",
            {"ident": "DTU9", "registration": None, "heartbeat": b"HB:", "identify": "heartbeat"},
        ),
        ("dtu://0.0.0.0:9000/1?heartbeat=HB", {"ident": A1, "heartbeat": b"HB", "identify": "meter"}),
        ("dtu://0.0.0.0:9000/D?registration=R:", {"identify": "registration"}),
    ],
)
def test_dtu_url_forms(url, attrs):
    transport = open_transport(url)
    assert isinstance(transport, DtuTransport)
    for name, value in attrs.items():
        assert getattr(transport, name) == value, name
    assert not transport.connected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("dtu://0.0.0.0:9000", "missing DTU id"),
        ("dtu://0.0.0.0:9000/", "missing DTU id"),
        ("dtu://0.0.0.0/1", "missing port"),
        ("dtu://0.0.0.0:9000/a/b?registration=R", "one printable word"),
        ("dtu://0.0.0.0:9000/DTU1", "without registration= a DTU is known by its meter's address"),
        ("dtu://0.0.0.0:9000/1?registration=", "empty registration"),
        ("dtu://0.0.0.0:9000/1?wait=soon", "wait='soon' is not a number"),
        ("dtu://0.0.0.0:9000/1?parity=E", "unknown option 'parity'"),
        ("dtu://u:p@0.0.0.0:9000/1", "take no user or password"),
        ("dtu://0.0.0.0:9000/DTU9?identify=heartbeat", "identify=heartbeat needs heartbeat="),
        ("dtu://0.0.0.0:9000/DTU9?identify=registration", "identify=registration needs registration="),
        ("dtu://0.0.0.0:9000/D?registration=R&identify=meter", "registration= means identify=registration"),
        ("dtu://0.0.0.0:9000/D?heartbeat=H&identify=magic", "identify='magic' is not one of"),
    ],
)
def test_dtu_url_errors(url, message):
    with pytest.raises(BusUrlError, match=re.escape(message)):
        open_transport(url)


async def test_dtu_without_registration_is_identified_by_its_meter_address(lonely: Fleet):
    buses = lonely.buses
    async with contextlib.AsyncExitStack() as stack:
        server = await DtuServer("127.0.0.1", 0, identify=True, identify_timeout=0.5).start()
        stack.push_async_callback(server.aclose)
        for name in ("bus0", "bus1"):
            tcp = await serve_tcp(buses[name], "127.0.0.1", 0)
            stack.push_async_callback(tcp.aclose)
            dtu = await FakeDtu(tcp.port).dial(server.port)
            stack.push_async_callback(dtu.hang_up)
        first = await server.accept(TIMEOUT)
        second = await server.accept(TIMEOUT)
        assert {first.ident, second.ident} == {A1, A2} and server.ids == [A1, A2]
        conn = await server.wait_for(A2, TIMEOUT)
        await read_ok(conn, A2)
        history = list(buses["bus1"].history)
        assert history[0].request.function == 0x13 and history[0].request.address == "AAAAAAAAAAAA"


async def test_dtu_with_a_1997_meter_is_identified_by_a_wildcard_read(lonely: Fleet):
    """1997 has no 0x13: the meter behind the DTU is found by a wildcard read of C032 (§7.1),
    also when it echoes the wildcard as its address (the §10 quirk of this profile)."""
    from datetime import UTC, datetime

    from simulator.fleet import BusSpec, MeterSpec

    start = datetime(2026, 11, 24, 10, tzinfo=UTC)
    old = Fleet([BusSpec("old", [MeterSpec("000000001997", profile="dlt645-1997")])], VirtualClock(start, 0), seed=1)
    async with (
        await serve_tcp(old.buses["old"], "127.0.0.1", 0) as tcp,
        DtuServer("127.0.0.1", 0, identify=True, identify_timeout=0.3) as server,
    ):
        dtu = await FakeDtu(tcp.port).dial(server.port)
        try:
            conn = await server.accept(TIMEOUT)
            assert conn.ident == "000000001997"
            functions = [e.request.function for e in old.buses["old"].history]
            assert functions[-1] == 0x01  # the 1997 read answered
        finally:
            await dtu.hang_up()


async def test_dtu_whose_line_is_silent_stays_unlabelled(lonely: Fleet):
    bus = lonely.buses["bus0"]
    lonely.inject(A1, FaultSpec(Fault.NO_REPLY))
    async with (
        await serve_tcp(bus, "127.0.0.1", 0) as tcp,
        DtuServer("127.0.0.1", 0, identify=True, identify_timeout=0.1, identify_attempts=2) as server,
    ):
        dtu = await FakeDtu(tcp.port).dial(server.port)
        try:
            conn = await server.accept(TIMEOUT)
            assert conn.ident is None and server.ids == []
            assert bus.stats.requests == 4  # tried twice: a 2007 read-address and a 1997 wildcard read each
        finally:
            await dtu.hang_up()


async def test_link_on_a_dtu_url_reads_meters_and_survives_a_redial(lonely: Fleet):
    port = free_port()
    tcp = await serve_tcp(lonely.buses["bus2"], "127.0.0.1", 0)
    transport = open_transport(f"dtu://127.0.0.1:{port}/3?wait=3")
    link = Link(transport, LinkConfig(gap_s=0.0, td_max_s=0.2, retries=1, backoff_s=0.05))
    dtu = second = None
    try:
        starting = asyncio.create_task(link.start())  # listens, then waits for the DTU
        await eventually(lambda: broker_listening(port))
        dtu = await FakeDtu(tcp.port).dial(port)  # no registration: identified by address
        await asyncio.wait_for(starting, TIMEOUT)
        client = MeterClient(link, A3)
        assert (await client.read(0x04000401)).value == A3
        assert transport.connected and transport.connection is not None and transport.connection.ident == A3
        await dtu.hang_up()  # the DTU drops out ...
        await eventually(lambda: not transport.connected)
        second = await FakeDtu(tcp.port).dial(port)  # ... and dials in again
        assert (await client.read(0x04000401)).value == A3  # the next attempt finds the new connection
    finally:
        await link.stop()
        for d in (dtu, second):
            if d is not None:
                await d.hang_up()
        await tcp.aclose()
    assert not broker_listening(port)  # the transport's own server closed with it


async def test_dtu_bus_that_never_dials_in_is_link_down():
    transport = open_transport(f"dtu://127.0.0.1:{free_port()}/DTU7?registration=REG:&wait=0.2")
    with pytest.raises(LinkDown, match=r"DTU7 did not dial in within 0\.2 s"):
        await transport.open()
    await transport.close()


async def test_gateway_shares_one_dtu_server_per_listen_address(lonely: Fleet):
    from gateway.app import Gateway
    from gateway.config import ConfigError, build

    port = free_port()
    doc = {
        "bus": [
            {"name": "north", "url": f"dtu://127.0.0.1:{port}/1?wait=0.1", "meters": [A1]},
            {"name": "south", "url": f"dtu://127.0.0.1:{port}/2?wait=0.1", "meters": [A2]},
            {"name": "east", "url": f"dtu://127.0.0.1:{free_port()}/3?wait=0.1", "meters": [A3]},
        ],
    }
    config = build(doc)
    config.api_listen = None
    gateway = Gateway(config)
    async with contextlib.AsyncExitStack() as stack:
        await gateway.start_buses()  # what start() does for the lines (the rest needs a store)
        stack.push_async_callback(gateway.stop)
        assert len(gateway.dtu_servers) == 2
        north, south = gateway.links["north"].transport, gateway.links["south"].transport
        assert isinstance(north, DtuTransport) and isinstance(south, DtuTransport)
        assert north.server is south.server is gateway.dtu_servers[("127.0.0.1", port)]
        for name in ("bus0", "bus1"):
            tcp = await serve_tcp(lonely.buses[name], "127.0.0.1", 0)
            stack.push_async_callback(tcp.aclose)
            dtu = await FakeDtu(tcp.port).dial(port)
            stack.push_async_callback(dtu.hang_up)
        server = gateway.dtu_servers[("127.0.0.1", port)]
        await eventually(lambda: server.ids == [A1, A2])
        assert (await MeterClient(gateway.links["south"], A2).read(0x04000401)).value == A2
        assert (await MeterClient(gateway.links["north"], A1).read(0x04000401)).value == A1
    assert gateway.dtu_servers == {} and not broker_listening(port)

    doc["bus"][1]["url"] = f"dtu://127.0.0.1:{port}/1?wait=0.1"
    with pytest.raises(ConfigError, match=r"DTU 000000000001 .* is bus 'north' already"):
        build(doc)
    doc["bus"][1]["url"] = f"dtu://127.0.0.1:{port}/D2?registration=REG:"
    with pytest.raises(ConfigError, match="other registration/heartbeat options"):
        build(doc)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("serial:///dev/ttyUSB0", "serial:///dev/ttyUSB0?baud=9600"),
        ("socket://10.0.0.5:4001", "tcp://10.0.0.5:4001?baud=2400"),
        ("rfc2217://Converter:4001", "tcp://converter:4001"),
        ("mqtt://broker/site/dtu/7", "mqtt://gw:pw@broker:1883/site/dtu/7?baud=1200"),
        ("dtu://0.0.0.0:9000/1", "dtu://0.0.0.0:9000/000000000001?baud=2400"),
    ],
)
def test_two_urls_of_one_line_have_one_line_key(first: str, second: str):
    assert open_transport(first).line_key == open_transport(second).line_key


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("serial:///dev/ttyUSB0", "serial:///dev/ttyUSB1"),
        ("tcp://10.0.0.5:4001", "tcp://10.0.0.5:4002"),
        ("mqtt://broker/site/dtu/7", "mqtt://broker/site/dtu/8"),
        ("mqtt://broker/site/dtu/7", "mqtt://broker:1884/site/dtu/7"),
        ("dtu://0.0.0.0:9000/1", "dtu://0.0.0.0:9000/2"),
    ],
)
def test_different_lines_have_different_line_keys(first: str, second: str):
    assert open_transport(first).line_key != open_transport(second).line_key


def test_serial_line_key_follows_symlinks(tmp_path: Path):
    device = tmp_path / "ttyUSB0"
    device.touch()
    alias = tmp_path / "by-id-usb-FTDI"
    alias.symlink_to(device)
    assert open_transport(f"serial://{alias}").line_key == open_transport(f"serial://{device}").line_key


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("serial:///dev/pts/0?parity=N", "serial:///dev/pts/0?parity=N"),
        ("socket://127.0.0.1:7000", "tcp://127.0.0.1:7000"),
        ("mqtt://127.0.0.1/meterlink/dtu1", "mqtt://127.0.0.1:1883/meterlink/dtu1"),
    ],
)
def test_config_refuses_two_buses_on_one_line(first: str, second: str):
    from gateway.config import ConfigError, build

    doc = {
        "bus": [
            {"name": "a", "url": first, "meters": [A1]},
            {"name": "b", "url": second, "meters": [A2]},
        ]
    }
    with pytest.raises(ConfigError, match=r"\[\[bus\]\] 2\.url: buses 'a' \(.*\) and 'b' \(.*\) are the same line"):
        build(doc)
    doc["bus"][1]["url"] = "tcp://127.0.0.1:7001"
    assert [b.name for b in build(doc).buses] == ["a", "b"]  # distinct lines are fine


async def test_gateway_refuses_two_buses_on_one_line_built_in_code():
    from gateway.app import Gateway
    from gateway.config import BusConfig, ConfigError, GatewayConfig

    port = free_port()
    buses = [BusConfig(n, f"tcp://127.0.0.1:{port}", LinkConfig()) for n in ("a", "b")]
    gateway = Gateway(GatewayConfig(buses=buses, meters={}))
    with pytest.raises(ConfigError, match=r"buses 'a' .* and 'b' .* are the same line"):
        await gateway.start_buses()
    assert gateway.links == {}
