"""The bus behind a TCP port, like an RS-485-to-Ethernet converter (transparent mode).

Clients send raw request bytes (any chunking) and read raw reply bytes; pyserial's
``socket://host:port`` URL and the gateway's TCP transport both work. Several client
connections share the one line: each has its own deframer, and their transactions are
serialized by the bus (half duplex), so a client only ever receives replies to its own
requests.
"""

from __future__ import annotations

import asyncio
import logging

from ..bus import DEFAULT_IDLE_FLUSH, Bus, BusPort

log = logging.getLogger(__name__)


class TcpEndpoint:
    """A listening TCP server for one bus."""

    def __init__(self, bus: Bus, server: asyncio.Server) -> None:
        self.bus = bus
        self.server = server
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]

    @property
    def description(self) -> str:
        return f"tcp://{self.host}:{self.port} (bus {self.bus.name}, socket://{self.host}:{self.port})"

    @property
    def url(self) -> str:
        """The pyserial URL of this endpoint."""
        return f"socket://{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections currently open."""
        return len(self._writers)

    def __str__(self) -> str:
        return self.description

    def close(self) -> None:
        """Stop listening and drop every client connection."""
        self._closing = True
        self.server.close()
        for writer in list(self._writers):
            writer.close()

    async def aclose(self) -> None:
        """Close and wait until every connection handler has finished."""
        self.close()
        await self.server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> TcpEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def serve_tcp(
    bus: Bus, host: str = "127.0.0.1", port: int = 0, *, idle_flush: float = DEFAULT_IDLE_FLUSH
) -> TcpEndpoint:
    """Listen on ``host:port`` (0 = any free port; read ``.port``) and serve ``bus``."""
    endpoint: TcpEndpoint

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        endpoint._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            endpoint._handlers.add(task)

        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        port_ = BusPort(bus, write, idle_flush=idle_flush, name=f"{bus.name}@{peer}")
        log.debug("bus %s: client %s connected", bus.name, peer)
        try:
            while data := await reader.read(4096):
                port_.feed(data)
            port_.flush()
            if not endpoint._closing:
                await port_.drain()  # a client that half-closed still gets its replies
        except (ConnectionError, OSError):
            pass
        finally:
            await port_.close()
            endpoint._writers.discard(writer)
            if task is not None:
                endpoint._handlers.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
            log.debug("bus %s: client %s gone", bus.name, peer)

    server = await asyncio.start_server(handle, host, port)
    endpoint = TcpEndpoint(bus, server)
    return endpoint
