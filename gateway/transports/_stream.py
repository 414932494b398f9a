"""Shared plumbing: an inbox of received bytes, and a transport fed by an asyncio protocol.

Every transport keeps what arrived in an :class:`Inbox`; ``read`` takes everything there at
once (or waits for the first bytes), ``discard_input`` clears it. The serial, TCP client and
DTU-server transports all receive through the same :class:`FeedProtocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from ..errors import LinkDown
from .base import Transport

CLOSE_TIMEOUT = 2.0
"""Seconds :meth:`ProtocolTransport.close` waits for the connection to be really gone."""


def os_reason(exc: BaseException) -> str:
    """An OS error as ``[Errno 111] Connection refused`` (asyncio says only "Connect call failed")."""
    errno = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(errno, int) and errno > 0 and type(exc).__module__ == "builtins":
        return f"[Errno {errno}] {os.strerror(errno)}"
    return str(exc) or type(exc).__name__


class Inbox:
    """Bytes received but not yet read, and a way to wait for more."""

    __slots__ = ("_data", "_event")

    def __init__(self) -> None:
        self._data = bytearray()
        self._event = asyncio.Event()

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes) -> None:
        if data:
            self._data += data
            self._event.set()

    def wake(self) -> None:
        """Wake a waiting reader without data (the link changed state)."""
        self._event.set()

    def take(self) -> bytes:
        out = bytes(self._data)
        self._data.clear()
        return out

    def discard(self) -> int:
        n = len(self._data)
        self._data.clear()
        return n

    async def wait(self, timeout: float) -> None:
        """Until bytes arrive, :meth:`wake` is called, or ``timeout`` seconds pass."""
        if self._data or timeout <= 0:
            return
        self._event.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()


class InboxTransport(Transport):
    """A transport whose reads come from an :class:`Inbox`; subclasses say whether the link is up."""

    def __init__(self) -> None:
        self._inbox = Inbox()

    def _check(self) -> None:
        """Raise :class:`LinkDown` if the link is gone."""
        if not self.connected:
            raise LinkDown(f"{self.url}: not connected")

    async def read(self, timeout: float) -> bytes:
        if self._inbox:  # bytes that came before a loss are still delivered
            return self._inbox.take()
        self._check()
        await self._inbox.wait(timeout)
        if self._inbox:
            return self._inbox.take()
        self._check()
        return b""

    def discard_input(self) -> int:
        return self._inbox.discard()


class FeedProtocol(asyncio.Protocol):
    """Feeds received bytes to a callback and reports the loss of the connection; has flow control."""

    def __init__(
        self, on_data: Callable[[bytes], None], on_lost: Callable[[FeedProtocol, Exception | None], None]
    ) -> None:
        self.on_data = on_data
        self.on_lost = on_lost
        self.transport: asyncio.BaseTransport | None = None
        self.lost = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._gone = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too: a converter or DTU that hangs up is gone

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._can_write.set()
        self._gone.set()
        self.on_lost(self, exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def drain(self) -> None:
        await self._can_write.wait()

    async def wait_lost(self, timeout: float) -> None:
        """Until :meth:`connection_lost` has run (a serial port is closed in an executor)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._gone.wait()


class ProtocolTransport(InboxTransport):
    """A transport running on one asyncio transport + :class:`FeedProtocol` at a time.

    A subclass's ``open`` makes a protocol with :meth:`_new_protocol`, connects it and calls
    :meth:`_attach`; calling ``open`` again after a :class:`LinkDown` reconnects.
    """

    def __init__(self) -> None:
        super().__init__()
        self._protocol: FeedProtocol | None = None
        self._down_reason = "not open"
        self._reason_given = False

    @property
    def connected(self) -> bool:
        p = self._protocol
        return p is not None and not p.lost and p.transport is not None and not p.transport.is_closing()

    def _check(self) -> None:
        if not self.connected:
            raise LinkDown(f"{self.url}: {self._down_reason}")

    def _new_protocol(self) -> FeedProtocol:
        return FeedProtocol(self._inbox.feed, self._on_lost)

    def _on_lost(self, protocol: FeedProtocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            if not self._reason_given:
                self._down_reason = f"connection lost: {exc}" if exc is not None else "closed by the other side"
            self._inbox.wake()

    def _attach(self, protocol: FeedProtocol) -> None:
        self._inbox.discard()  # nothing from an earlier connection
        self._protocol = protocol
        self._down_reason = "connection lost"
        self._reason_given = False

    def _drop(self, reason: str) -> None:
        """Close the connection from this side, for ``reason`` (what later LinkDowns say)."""
        self._down_reason = reason
        self._reason_given = True
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
        self._inbox.wake()

    async def write(self, data: bytes) -> None:
        self._check()
        protocol = self._protocol
        assert protocol is not None and protocol.transport is not None
        protocol.transport.write(data)  # type: ignore[attr-defined]
        await protocol.drain()
        if protocol.lost:
            raise LinkDown(f"{self.url}: {self._down_reason}")
        if protocol.transport.is_closing():  # a write error aborts at once; connection_lost comes later
            raise LinkDown(f"{self.url}: write failed, the link is closing")

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        self._down_reason = "closed"
        self._inbox.discard()
        self._inbox.wake()
        if protocol is not None and protocol.transport is not None and not protocol.lost:
            protocol.transport.close()
            await protocol.wait_lost(CLOSE_TIMEOUT)
