"""A serial line: a local RS-485 adapter, or a pyserial URL handler (``socket://``, ``rfc2217://``).

Built on pyserial + pyserial-asyncio-fast (shared/reference/deps.md §3):

* plain devices (``/dev/ttyUSB0``) run on the library's ``SerialTransport`` (non-blocking fd);
* ``socket://host:port`` (a transparent RS-485-to-Ethernet converter) runs on asyncio's own
  TCP transport — pyserial's line settings do not apply there, the converter has its own;
* handlers without a file descriptor (``rfc2217://``, ``loop://``, ...) would fail under the
  asyncio library (no ``fileno``; ``loop://`` times out), so they run on a small thread-backed
  transport instead: one reader thread, one writer thread, bytes handed to the event loop.

DL/T 645 lines are 2400 bps 8E1 by default (dlt645.md §1.1). A pseudo-terminal has no parity
(deps.md §3): open it with ``parity="N"``; with parity the open fails with EINVAL, reported as
:class:`~gateway.errors.LinkDown` with a hint.

Errors: a missing or busy port raises :class:`LinkDown` from :meth:`SerialTransport.open`
with the OS reason; a port that goes away while open (USB adapter unplugged, pty closed: EIO
or "device reports readiness to read but returned no data") makes the next ``read`` (a
waiting one wakes at once) and ``write`` raise :class:`LinkDown`. ``open()`` again reopens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import serial
import serial_asyncio_fast

from ..errors import LinkDown
from ._stream import FeedProtocol, ProtocolTransport, os_reason

try:
    import termios

    _TERMIOS_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - not POSIX
    _TERMIOS_ERRORS = ()

log = logging.getLogger(__name__)

PARITIES = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}
"""Parity letters accepted (DL/T 645 uses E; a pty can only do N)."""
BYTESIZES = (5, 6, 7, 8)
STOPBITS = (1, 1.5, 2)

URL_HANDLERS = ("socket", "rfc2217")
"""pyserial URL schemes a :class:`SerialTransport` is documented to accept (others pyserial knows work too)."""

THREAD_POLL = 0.05
"""Read timeout of the reader thread of fd-less handlers (how fast it notices a close)."""


class SerialTransport(ProtocolTransport):
    """A serial port or a pyserial URL, as a :class:`~gateway.transports.base.Transport`.

    ``device_or_url`` is a device path (``/dev/ttyUSB0``, ``COM3``) or a pyserial URL
    (``socket://10.0.0.5:4001``, ``rfc2217://10.0.0.5:2217``). ``baud`` is also used by the
    scheduler to derive timeouts, even where the wire speed is set elsewhere (a converter).
    """

    def __init__(
        self,
        device_or_url: str,
        baud: int = 2400,
        parity: str = "E",
        bytesize: int = 8,
        stopbits: float = 1,
        *,
        open_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        if not device_or_url:
            raise ValueError("no serial device or URL given")
        parity = parity.upper()
        if parity not in PARITIES:
            raise ValueError(f"parity {parity!r} is not one of {', '.join(PARITIES)}")
        if bytesize not in BYTESIZES:
            raise ValueError(f"bytesize {bytesize} is not one of {', '.join(map(str, BYTESIZES))}")
        if stopbits not in STOPBITS:
            raise ValueError(f"stopbits {stopbits} is not one of 1, 1.5, 2")
        if not isinstance(baud, int) or baud <= 0:
            raise ValueError(f"baud {baud!r} must be a positive integer")
        self.device = device_or_url
        self.baud = baud
        self.parity = parity
        self.bytesize = bytesize
        self.stopbits = stopbits
        self.open_timeout = open_timeout
        self.scheme = urlsplit(device_or_url).scheme if "://" in device_or_url else ""
        self.url = device_or_url if self.scheme else f"serial://{device_or_url}"

    @property
    def line_key(self) -> tuple[object, ...]:
        """A local device by its real path (symlinks such as /dev/serial/by-id/... resolved); a
        converter by host and port, the same key as ``tcp://`` to that port."""
        if not self.scheme:
            return ("serial", os.path.realpath(self.device) if self.device.startswith("/") else self.device.upper())
        parts = urlsplit(self.device)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.hostname and port:
            return ("tcp", parts.hostname.lower(), port)
        return ("serial", self.device)

    @property
    def settings(self) -> str:
        """Line settings as usually written, e.g. ``2400 8E1``."""
        stop = f"{self.stopbits:g}"
        return f"{self.baud} {self.bytesize}{self.parity}{stop}"

    def __repr__(self) -> str:
        return f"SerialTransport({self.device!r}, {self.settings})"

    def _serial_kwargs(self) -> dict[str, Any]:
        return {
            "baudrate": self.baud,
            "parity": PARITIES[self.parity],
            "bytesize": self.bytesize,
            "stopbits": self.stopbits,
        }

    async def open(self) -> None:
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        protocol = self._new_protocol()
        kwargs = self._serial_kwargs()
        try:
            async with asyncio.timeout(self.open_timeout):
                if self.scheme == "socket":
                    transport, _ = await serial_asyncio_fast.create_serial_connection(
                        loop, lambda: protocol, self.device, **kwargs
                    )
                else:
                    # The read timeout only matters to fd-less handlers (threaded, below); setting it
                    # later would renegotiate an rfc2217 port from the event loop thread.
                    kwargs["timeout"] = THREAD_POLL
                    opening = loop.run_in_executor(None, partial(serial.serial_for_url, self.device, **kwargs))
                    try:
                        port = await asyncio.shield(opening)
                    except BaseException:  # timed out: close the port if it opens after all
                        opening.add_done_callback(_close_if_opened)
                        raise
                    try:
                        transport = await _connect(loop, protocol, port)
                    except BaseException:
                        port.close()
                        raise
        except (serial.SerialException, OSError, ValueError, TimeoutError, *_TERMIOS_ERRORS) as exc:
            raise LinkDown(f"{self.url}: cannot open ({self.settings}): {self._reason(exc)}") from exc
        protocol.transport = transport  # SerialTransport only schedules connection_made
        self._attach(protocol)
        log.debug("%s open (%s)", self.url, self.settings)

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.open_timeout:g} s"
        reason = os_reason(exc)
        errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else getattr(exc, "errno", None)
        if errno == 22 and self.parity != "N" and not self.scheme:
            reason += " (the device refuses the line settings; a pty has no parity: use parity N)"
        return reason


def _close_if_opened(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        with contextlib.suppress(Exception):
            future.result().close()


async def _connect(loop: asyncio.AbstractEventLoop, protocol: FeedProtocol, port: serial.SerialBase) -> Any:
    """Run an open pyserial port on the asyncio library, or on threads if it has no file descriptor."""
    try:
        port.fileno()
    except (AttributeError, io.UnsupportedOperation, OSError):
        return _ThreadedSerialTransport(loop, protocol, port)
    transport, _ = await serial_asyncio_fast.connection_for_serial(loop, lambda: protocol, port)
    return transport


class _ThreadedSerialTransport(asyncio.Transport):
    """An asyncio transport over a blocking pyserial port (URL handlers without a file descriptor).

    A reader thread reads with a short timeout and hands bytes to the loop; writes run in
    order on a one-thread executor. Any pyserial error ends the connection with that error.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: FeedProtocol, port: serial.SerialBase) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._port = port
        self._closing = False
        self._lost = False
        self._stop = threading.Event()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"serial-write {port.name}")
        self._reader = threading.Thread(target=self._read_loop, name=f"serial-read {port.name}", daemon=True)
        protocol.connection_made(self)
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._port.read(max(1, self._port.in_waiting))
                if data and not self._stop.is_set():
                    self._loop.call_soon_threadsafe(self._deliver, data)
        except Exception as exc:
            if not self._stop.is_set():
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    self._loop.call_soon_threadsafe(self._fail, exc)

    def _deliver(self, data: bytes) -> None:
        if not self._lost:
            self._protocol.data_received(data)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._writer.submit(self._port.write, bytes(data)).add_done_callback(self._written)

    def _written(self, future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._fail, future.exception())

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._port if name == "serial" else default

    def close(self) -> None:
        self._shutdown(None)

    def abort(self) -> None:
        self._shutdown(None)

    def _fail(self, exc: BaseException) -> None:
        self._shutdown(exc)

    def _shutdown(self, exc: BaseException | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop.set()

        def close_port() -> None:
            with contextlib.suppress(Exception):
                self._port.close()
            self._reader.join(2 * THREAD_POLL + 1)

        done = asyncio.wrap_future(self._writer.submit(close_port), loop=self._loop)  # after pending writes
        self._writer.shutdown(wait=False)
        done.add_done_callback(lambda _: self._call_lost(exc))

    def _call_lost(self, exc: BaseException | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]
