"""Ways for a master (the gateway, a test, a vendor tool) to reach a simulated :class:`~simulator.bus.Bus`.

* :mod:`.tcp` — an RS-485-to-Ethernet converter: raw bytes over TCP (pyserial ``socket://``).
* :mod:`.pty` — a pseudo-terminal that looks like a serial port (8N1 only).
* :mod:`.mqtt` — a 4G DTU / MQTT bridge: raw frames as MQTT payloads.

Every endpoint has a printable ``description`` (also its ``str()``) and ``async aclose()``;
TCP and pty endpoints also have a synchronous ``close()``.
"""

from __future__ import annotations

from typing import Protocol

from .mqtt import MqttBusBridge, start_mqtt_bridge
from .pty import PtyEndpoint, open_pty_bus
from .tcp import TcpEndpoint, serve_tcp


class Endpoint(Protocol):
    """What the CLI needs from a running transport."""

    @property
    def description(self) -> str: ...

    async def aclose(self) -> None: ...


__all__ = [
    "Endpoint",
    "MqttBusBridge",
    "PtyEndpoint",
    "TcpEndpoint",
    "open_pty_bus",
    "serve_tcp",
    "start_mqtt_bridge",
]
