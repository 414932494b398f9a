"""An in-memory transport from the gateway to a simulated bus (no sockets): for link tests.

It speaks the gateway's Transport interface on one side and the simulator's BusPort on the
other, so the whole path (scheduler, deframer, bus emulation, faults, firmware) runs in one
event loop.
"""

from __future__ import annotations

import asyncio

from gateway.errors import LinkDown
from gateway.transports.base import Transport
from simulator.bus import Bus, BusPort


class SimLineTransport(Transport):
    """The gateway's end of an in-memory line to ``bus``.

    ``baud`` (what the link derives its timeouts from) is the bus's own when its line timing is
    on, and 0 (no wire time: replies come at once) when it is off, unless one is given.
    """

    def __init__(self, bus: Bus, baud: int | None = None) -> None:
        self.bus = bus
        self.url = f"sim://{bus.name}"
        self._baud = baud
        self._rx: asyncio.Queue[bytes] = asyncio.Queue()
        self._port: BusPort | None = None
        self.down = False
        self.written: list[bytes] = []

    @property
    def baud(self) -> int | None:  # type: ignore[override]
        if self._baud is not None:
            return self._baud
        timing = self.bus.timing
        return timing.baud if timing.enabled else 0

    @baud.setter
    def baud(self, value: int | None) -> None:
        self._baud = value

    async def open(self) -> None:
        if self.down:
            raise LinkDown(f"{self.url} is down")
        if self._port is None:
            self._port = BusPort(self.bus, self._rx.put_nowait, idle_flush=0.2)

    async def close(self) -> None:
        if self._port is not None:
            await self._port.close()
            self._port = None

    @property
    def connected(self) -> bool:
        return self._port is not None and not self.down

    async def write(self, data: bytes) -> None:
        if self.down or self._port is None:
            raise LinkDown(f"{self.url} is down")
        self.written.append(data)
        self._port.feed(data)

    async def read(self, timeout: float) -> bytes:
        if self.down:
            raise LinkDown(f"{self.url} is down")
        try:
            first = await asyncio.wait_for(self._rx.get(), timeout)
        except TimeoutError:
            return b""
        out = bytearray(first)
        while not self._rx.empty():
            out += self._rx.get_nowait()
        return bytes(out)

    def discard_input(self) -> int:
        n = 0
        while not self._rx.empty():
            n += len(self._rx.get_nowait())
        return n
