"""One small interface for every way to reach an RS-485 line (like python-can's Bus).

A transport is a byte pipe: the link scheduler writes request bytes and reads whatever
comes back, and does all framing itself with the shared deframer. Implementations:
serial (pyserial + pyserial-asyncio-fast, including ``socket://`` and ``rfc2217://``),
TCP client (RS-485-to-Ethernet converters), TCP server (4G DTUs that dial in), MQTT DTU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class Transport(ABC):
    """A half-duplex byte pipe to one line."""

    url: str
    """Where it goes, for logs and errors (no passwords)."""
    baud: int | None = None
    """Line speed when known (serial, or given in the bus URL); used to derive timeouts. None:
    unknown (the link then uses its configuration's, else the meter profile's); 0: no wire at all
    (an in-memory line: replies take no wire time)."""

    @property
    def line_key(self) -> tuple[object, ...]:
        """What identifies the physical line: two transports with the same key are one RS-485 line,
        which must have one scheduler (peers.md §3: several pollers on one port collide)."""
        return (type(self).__name__, self.url)

    @abstractmethod
    async def open(self) -> None:
        """Connect; raises :class:`~gateway.errors.LinkDown` with the reason if it cannot."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect; safe to call twice."""

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether bytes can be written now."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Send bytes; raises LinkDown if the link is gone."""

    @abstractmethod
    async def read(self, timeout: float) -> bytes:
        """Bytes received so far or within ``timeout`` seconds (b"" when none came).

        Raises LinkDown if the link is gone.
        """

    @abstractmethod
    def discard_input(self) -> int:
        """Drop bytes received but not yet read (a late reply to an earlier request); returns how many."""

    async def __aenter__(self) -> Transport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
