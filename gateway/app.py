"""The running gateway: store, lines, command service, REST API and MQTT northbound together.

Several gateway processes may share one PostgreSQL database (and one broker): each claims
commands with leases and ``FOR UPDATE SKIP LOCKED``, so no command runs twice (see
gateway/ledger/store.py). With SQLite, run one process per ledger file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from datetime import datetime, timedelta
from typing import Any

from protocols.dlt645 import METER_TZ

from .billing import RemoteBilling, RemoteTariff
from .config import ConfigError, GatewayConfig, line_conflict
from .errors import GatewayError
from .ledger import Store
from .link import Link
from .poller import Poller
from .service import CommandService
from .transports import DtuServer, DtuTransport, Transport, open_transport

log = logging.getLogger(__name__)


class Gateway:
    """Builds and runs everything a configuration describes."""

    def __init__(self, config: GatewayConfig, *, owner: str | None = None) -> None:
        self.config = config
        self.owner = owner
        self.store: Store | None = None
        self.links: dict[str, Link] = {}
        self.dtu_servers: dict[tuple[str, int], DtuServer] = {}
        """One server per listen address, shared by every ``dtu://`` bus that names it."""
        self.service: CommandService | None = None
        self.api_server: Any = None
        self.northbound: Any = None
        self.billing: RemoteBilling | None = None
        self._billing_task: asyncio.Task[None] | None = None
        self.poller: Poller | None = None

    async def start(self) -> Gateway:
        """Open the ledger, start the lines, the service and the APIs; on failure stop what started."""
        try:
            return await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise

    async def _start(self) -> Gateway:
        cfg = self.config
        store = (
            Store.postgres(cfg.postgres, cfg.schema) if cfg.postgres else Store.sqlite(cfg.sqlite or "meterlink.sqlite")
        )
        self.store = await store.open()
        await self.start_buses()
        self.service = CommandService(
            store, cfg.meters, self.links, policy=cfg.policy, config=cfg.service, owner=self.owner
        )
        await self.service.start()
        self.billing = RemoteBilling(self.service, RemoteTariff(cfg.billing_prices))
        if any(m.mode == "remote" for m in cfg.meters.values()):
            self._billing_task = asyncio.create_task(self._billing_loop(), name="remote billing")
        if cfg.mqtt_url:
            from urllib.parse import urlsplit

            from .northbound_mqtt import MqttNorthbound

            url = urlsplit(cfg.mqtt_url)
            prefix = url.path.strip("/") or "meterlink/gw"
            self.northbound = MqttNorthbound(
                self.service, f"mqtt://{url.netloc}", None, prefix, allowed_actors=cfg.mqtt_actors
            )
            await self.northbound.start()
        # The poller after the northbound, which watches it from its first poll on.
        self.poller = Poller(self.service, cfg.poll)
        if self.northbound is not None:
            self.northbound.watch(self.poller)
        await self.poller.start()
        if cfg.api_listen is not None:
            self.api_server = await self._serve_api(*cfg.api_listen)
        return self

    async def start_buses(self) -> dict[str, Link]:
        """A started :class:`Link` per configured bus (in :attr:`links`); DTU servers listening."""
        cfg = self.config
        transports = {bus.name: open_transport(bus.url) for bus in cfg.buses}
        lines: dict[tuple[object, ...], tuple[str, str]] = {}
        for bus in cfg.buses:  # a configuration made in code has not been through config.build
            conflict = line_conflict(lines, bus.name, bus.url, transports[bus.name].line_key)
            if conflict is not None:
                raise ConfigError(conflict)
        await self._start_dtu_servers(transports)
        links = {bus.name: Link(transports[bus.name], bus.link, name=bus.name) for bus in cfg.buses}
        # Together: a DTU that has not dialled in yet makes its bus wait a little, not the others.
        await asyncio.gather(*(link.start() for link in links.values()))
        self.links.update(links)
        return links

    async def _start_dtu_servers(self, transports: dict[str, Transport]) -> None:
        """Listen once per ``dtu://`` address; the buses on it share the server (same settings)."""
        settings: dict[tuple[str, int], tuple[str, dict[str, Any]]] = {}
        for name, transport in transports.items():
            if not isinstance(transport, DtuTransport):
                continue
            key = transport.listen_key
            first = settings.setdefault(key, (name, transport.server_settings()))
            if first[1] != transport.server_settings():
                raise GatewayError(
                    f"buses {first[0]!r} and {name!r} listen on {key[0]}:{key[1]} with different "
                    "registration/heartbeat options; one listen address has one set"
                )
            if key not in self.dtu_servers:
                self.dtu_servers[key] = await transport.make_server().start()
                log.info("listening for DTUs on %s:%s", *key)
            transport.use_server(self.dtu_servers[key])

    async def _serve_api(self, host: str, port: int) -> Any:
        import uvicorn

        from .api import create_api

        assert self.service is not None
        app = create_api(
            self.service,
            api_keys=self.config.api_keys,
            read_requires_key=self.config.read_requires_key,
            groups=self.config.groups,
        )
        # Bind here, so a port in use is an OSError with its reason (uvicorn would log it and exit).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        for _ in range(250):
            if server.started or task.done():
                break
            await asyncio.sleep(0.02)
        if task.done():
            task.result()
            raise OSError(f"the API could not listen on {host}:{port}")
        server.task = task  # type: ignore[attr-defined]
        return server

    async def _billing_loop(self) -> None:
        """Run the remote billing once a day at the configured local time."""
        assert self.billing is not None and self.service is not None
        while True:
            now = self.service.now().astimezone(METER_TZ)
            run = datetime.combine(now.date(), self.config.billing_at, tzinfo=METER_TZ)
            if run <= now:
                run += timedelta(days=1)
            await asyncio.sleep((run - now).total_seconds())
            try:
                result = await self.billing.run(self.service.now())
                log.info(
                    "remote billing: charged %s, trips %s, skipped %s", result.charged, result.trips, result.skipped
                )
            except Exception:
                log.exception("remote billing failed")

    @property
    def api_url(self) -> str | None:
        if self.api_server is None:
            return None
        cfg = self.api_server.config
        port = cfg.port
        with contextlib.suppress(Exception):
            port = self.api_server.servers[0].sockets[0].getsockname()[1]
        return f"http://{cfg.host}:{port}"

    async def stop(self) -> None:
        if self.poller is not None:
            await self.poller.stop()
        if self._billing_task is not None:
            self._billing_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._billing_task
        if self.api_server is not None:
            self.api_server.should_exit = True
            with contextlib.suppress(Exception):
                await self.api_server.task
        if self.northbound is not None:
            with contextlib.suppress(Exception):
                await self.northbound.aclose()
        if self.service is not None:
            await self.service.stop()
        for link in self.links.values():
            with contextlib.suppress(Exception):
                await link.stop()
        for server in self.dtu_servers.values():
            with contextlib.suppress(Exception):
                await server.aclose()
        self.dtu_servers.clear()
        if self.store is not None:
            await self.store.close()
