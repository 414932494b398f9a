"""The MQTT fast path (``_Direct``) of the gateway's connection and the simulator's bridge.

Against the real Mosquitto on 127.0.0.1:1883 (skipped if nothing listens there). Every other
MQTT test goes through the fast path too; these check what it must keep from aiomqtt's own
paths: Nagle off, PUBACKs awaited, a PUBACK lost with its connection is a LinkDown, and the
fallback (aiomqtt's paths) still works when the fast path cannot be installed.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import UTC, datetime

import pytest

import gateway.transports.mqtt as gateway_mqtt
import simulator.transports.mqtt as bridge_mqtt
from gateway.errors import LinkDown
from gateway.transports import MqttConnection, MqttTransport
from protocols.dlt645.frame import Frame
from protocols.dlt645.profile import SGCC_2013
from simulator.bus import Bus
from simulator.clock import VirtualClock
from simulator.faults import FaultSet
from simulator.transports import start_mqtt_bridge

A1 = "000000000001"
READ = bytes.fromhex("00010000")[::-1]
VALUE = bytes.fromhex("78563412")


def _listening(port: int = 1883) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


pytestmark = pytest.mark.skipif(not _listening(), reason="no MQTT broker listening on 127.0.0.1:1883")


class _Meter:
    address = A1
    profile = SGCC_2013

    def __init__(self) -> None:
        self.faults = FaultSet()

    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        return Frame(self.address, frame.control.reply(), frame.data + VALUE)


def _bus() -> Bus:
    return Bus("line1", [_Meter()], VirtualClock(datetime(2026, 1, 1, tzinfo=UTC), speed=0))


async def _round_trip(transport: MqttTransport) -> bytes:
    transport.discard_input()
    await transport.write(Frame(A1, 0x11, READ).encode())
    got = b""
    async with asyncio.timeout(5):
        while len(got) < len(Frame(A1, 0x91, READ + VALUE).encode(4)):
            got += await transport.read(1.0)
    return got


async def _until(condition: object) -> None:
    """The bridge counts a reply when its PUBACK is back, which may be after the gateway has it."""
    async with asyncio.timeout(5):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)


def _nodelay(paho_socket: object) -> int:
    assert isinstance(paho_socket, socket.socket)
    return paho_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def test_fast_path_round_trip_with_nagle_off_on_both_sides() -> None:
    prefix = f"test-direct-{uuid.uuid4().hex[:8]}"
    bridge = await start_mqtt_bridge([_bus()], "127.0.0.1", 1883, prefix)
    conn = MqttConnection("127.0.0.1", 1883)
    transport = MqttTransport(prefix=prefix, ident="line1", connection=conn)
    try:
        await transport.open()
        assert conn._direct is not None and bridge._direct is not None
        assert _nodelay(bridge._client._client.socket()) and _nodelay(conn._client._client.socket())  # type: ignore[union-attr]
        for _ in range(3):
            assert await _round_trip(transport) == Frame(A1, 0x91, READ + VALUE).encode(4)
        assert conn.stats.published == 3 and conn.stats.publish_failures == 0 and not conn._direct.acks
        await _until(lambda: bridge.stats.replies_out == 3)
        assert bridge.stats.replies_dropped == 0 and not bridge._direct.acks
    finally:
        await transport.close()
        await conn.aclose()
        await bridge.aclose()


async def test_a_puback_lost_with_the_connection_is_link_down() -> None:
    conn = MqttConnection("127.0.0.1", 1883)
    try:
        await conn.wait_connected(5)
        direct = conn._direct
        assert direct is not None
        publish = asyncio.create_task(conn.publish(f"test-direct-{uuid.uuid4().hex[:8]}/x/down", b"\x68"))
        await asyncio.sleep(0)  # the publish is handed to paho and waits for its PUBACK
        assert len(direct.acks) == 1
        direct.fail_all()  # what the connection loop does when the connection drops
        with pytest.raises(LinkDown, match="connection lost before the broker acknowledged"):
            await publish
        assert conn.stats.publish_failures == 1 and not direct.acks
    finally:
        await conn.aclose()


async def test_aiomqtt_paths_still_work_without_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (gateway_mqtt, bridge_mqtt):
        monkeypatch.setattr(module._Direct, "install", classmethod(lambda cls, *args: None))
    prefix = f"test-direct-{uuid.uuid4().hex[:8]}"
    bridge = await start_mqtt_bridge([_bus()], "127.0.0.1", 1883, prefix)
    conn = MqttConnection("127.0.0.1", 1883)
    transport = MqttTransport(prefix=prefix, ident="line1", connection=conn)
    try:
        await transport.open()
        assert conn._direct is None and bridge._direct is None
        assert await _round_trip(transport) == Frame(A1, 0x91, READ + VALUE).encode(4)
        assert conn.stats.published == 1
        await _until(lambda: bridge.stats.replies_out == 1)
    finally:
        await transport.close()
        await conn.aclose()
        await bridge.aclose()
