"""The bus behind a pseudo-terminal: a client opens ``device_path`` as if it were a serial port.

Limits of a pty (shared/reference/deps.md §3), all measured on Linux:

* **8N1 only.** A pty has no parity: ``tcsetattr`` with PARENB fails with EINVAL, and
  ``serial.Serial(path, parity="E")`` opens with parity silently cleared but fails on any
  later reconfigure. Open the device at 8N1; real DL/T 645 lines are 8E1 (§1.1).
* **No baud timing.** Bytes move at memory speed whatever baud the client sets; the
  :class:`~simulator.bus.Bus` emulates line timing (:class:`~simulator.bus.LineTiming`).
* No modem lines (RTS/CTS ioctl fails) and no RS-485 direction control.

Both ends are put in raw mode (a fresh pty is in cooked mode: echo, line buffering, 0x03 =
VINTR would flush the line, 0x0A would become 0D 0A). The endpoint keeps its own handle on
the slave side open, so a client can close and reopen the device any number of times: with
no slave open the master reads fail with EIO (and poll readable forever); if that happens
anyway, the endpoint stops reading and polls until a client is back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import tty

from ..bus import DEFAULT_IDLE_FLUSH, Bus, BusPort

log = logging.getLogger(__name__)

MAX_BUFFERED = 64 * 1024
"""Reply bytes kept while no client reads; beyond this they are dropped."""

EIO_RETRY = 0.1
"""Seconds between read retries after EIO (no client has the device open)."""


class PtyEndpoint:
    """A pseudo-terminal pair serving one bus; clients open :attr:`device_path`."""

    def __init__(self, bus: Bus, *, idle_flush: float = DEFAULT_IDLE_FLUSH) -> None:
        self.bus = bus
        self._loop = asyncio.get_running_loop()
        self._master, self._slave = os.openpty()
        self.device_path: str = os.ttyname(self._slave)
        tty.setraw(self._master)
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self._out = bytearray()
        self._writing = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self.dropped_bytes = 0
        self.eio_count = 0
        self.port = BusPort(bus, self._write, idle_flush=idle_flush, name=f"{bus.name}@{self.device_path}")
        self._loop.add_reader(self._master, self._on_readable)

    @property
    def description(self) -> str:
        timing = "line timing emulated by the bus" if self.bus.timing.enabled else "no line timing"
        return f"pty {self.device_path} (bus {self.bus.name}, 8N1, {timing})"

    def __str__(self) -> str:
        return self.description

    # --- reading ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            # No slave open: stop polling a permanently readable fd; look again later.
            self.eio_count += 1
            self._loop.remove_reader(self._master)
            self._retry = self._loop.call_later(EIO_RETRY, self._resume)
            return
        if data:
            self.port.feed(data)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._master, self._on_readable)

    # --- writing ----------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        if len(self._out) + len(data) > MAX_BUFFERED:
            self.dropped_bytes += len(data)
            return
        self._out += data
        self._flush_out()

    def _flush_out(self) -> None:
        while self._out:
            try:
                n = os.write(self._master, self._out)
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: nobody on the other side; the bytes are lost
                self.dropped_bytes += len(self._out)
                self._out.clear()
                log.debug("pty %s: write failed: %s", self.device_path, exc)
                break
            del self._out[:n]
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._master, self._on_writable)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._master)

    def _on_writable(self) -> None:
        self._flush_out()

    # --- closing ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving and close both ends (clients get EOF / EIO)."""
        if self._closed:
            return
        self._closed = True
        self.port.abort()
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._master)
        if self._writing:
            self._loop.remove_writer(self._master)
        os.close(self._slave)
        os.close(self._master)

    async def aclose(self) -> None:
        self.close()
        await self.port.close()

    async def __aenter__(self) -> PtyEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def open_pty_bus(bus: Bus, *, idle_flush: float = DEFAULT_IDLE_FLUSH) -> PtyEndpoint:
    """Serve ``bus`` on a new pseudo-terminal (call inside a running event loop)."""
    return PtyEndpoint(bus, idle_flush=idle_flush)
