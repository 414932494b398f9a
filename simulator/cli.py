"""``meterlink sim``: run a simulated fleet on TCP, pty or MQTT, with the admin interface.

Plugged into the ``meterlink`` command through the ``meterlink.commands`` entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import click
from click.core import ParameterSource

from .clock import VirtualClock
from .faults import Fault
from .fleet import Fleet
from .load_profiles import LoadKind
from .scenario import _FAULT_KEYS, Scenario, ScenarioError, fault_table, from_flags, load


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint=what)
    return host or "127.0.0.1", int(port)


MQTT_SCHEMES = ("mqtt", "tcp")
"""URL schemes ``--mqtt`` accepts: plain MQTT over TCP (no TLS, no websockets)."""


def _mqtt_url(text: str) -> str:
    """Check ``--mqtt``: mqtt://[USER[:PASSWORD]@]HOST[:PORT][/PREFIX]; returns it unchanged."""
    url = urlsplit(text)
    if url.scheme not in MQTT_SCHEMES or "://" not in text:
        raise click.BadParameter(
            f"{text!r}: the scheme must be mqtt:// (plain MQTT over TCP), e.g. mqtt://127.0.0.1:1883/meterlink/sim",
            param_hint="--mqtt",
        )
    try:
        url.port  # noqa: B018 (a port out of range or not a number raises)
    except ValueError:
        raise click.BadParameter(f"{text!r}: the port must be a number in 0..65535", param_hint="--mqtt") from None
    if not url.hostname:
        raise click.BadParameter(f"{text!r} names no broker host", param_hint="--mqtt")
    return text


FLAG_FLEET_OPTIONS = ("buses", "first_address", "baud", "mode", "balance", "load_kind", "price", "prices", "fault")
"""Options that describe the fleet ``--meters N`` builds; a scenario file sets them itself."""


def _flag_tariff(price: str | None, prices: str | None) -> dict[str, Any] | None:
    """``--price YUAN`` / ``--prices P1,P2,P3,P4`` as the scenario ``tariff`` table they stand for.

    Prices stay strings (exact decimals, never floats); :func:`from_flags` validates them as a
    scenario's ``tariff.prices``.
    """
    if price is not None and prices is not None:
        raise click.UsageError("give --price (one price for T1..T4) or --prices (T1,T2,T3,T4), not both")
    if price is not None:
        return {"prices": [price.strip()] * 4}
    if prices is not None:
        return {"prices": [p.strip() for p in prices.split(",")]}
    return None


def _tcp_ports_fit(tcp: tuple[str, int], scenario: Scenario) -> None:
    """Bus k listens on PORT + k: every one of them must be a TCP port (PORT 0 picks free ones)."""
    port, n = tcp[1], len(scenario.buses)
    if port and port + n - 1 > 65535:
        k = 65536 - port  # the first bus beyond the range
        raise click.BadParameter(
            f"bus {scenario.buses[k].name} would listen on port {port + k} (PORT + {k}), beyond 65535; "
            f"with {n} buses PORT must be at most {65536 - n}",
            param_hint="--tcp",
        )


@click.command()
@click.argument("scenario_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--meters",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Number of meters (addresses 000000000001 to N, or from --first-address on), when no scenario file is given.",
)
@click.option(
    "--first-address",
    default="000000000001",
    show_default=True,
    metavar="ADDR",
    help="Without a scenario file: the first meter's 12-digit address, the others follow on "
    "(two simulators can serve disjoint ranges).",
)
@click.option(
    "--buses",
    type=click.IntRange(1, 10_000),
    default=1,
    show_default=True,
    help="Without a scenario file: the number of buses the meters are spread over.",
)
@click.option("--tcp", "tcp", default=None, metavar="HOST:PORT", help="Serve bus k on TCP PORT + k.")
@click.option("--pty", "pty", is_flag=True, help="Serve each bus on a pseudo-terminal (8N1).")
@click.option(
    "--mqtt",
    "mqtt",
    default=None,
    metavar="URL",
    help="Serve over MQTT: mqtt://HOST:PORT/PREFIX (topics PREFIX/<bus>/down and /up).",
)
@click.option("--dtu", is_flag=True, help="With --mqtt: one topic pair per meter (4G DTU), not per bus.")
@click.option("--admin", default=None, metavar="HOST:PORT", help="Serve the admin HTTP/JSON interface.")
@click.option(
    "--speed",
    type=click.FloatRange(0),
    default=None,
    help="Simulated seconds per real second (0 = only the admin interface moves time).",
)
@click.option("--seed", type=int, default=None)
@click.option("--timing/--no-timing", default=None, help="Emulate wire time and Td (default: on).")
@click.option(
    "--baud",
    type=click.Choice(["1200", "2400", "4800", "9600", "19200"]),
    default="2400",
    show_default=True,
    help="Without a scenario file: the line speed of every bus (its wire time).",
)
@click.option("--start", default=None, help="Virtual start time, ISO 8601 with zone (default: now).")
@click.option(
    "--mode",
    default="local",
    show_default=True,
    help="Without a scenario file: cost control 'local', 'remote', or the share of remote meters (e.g. 0.3).",
)
@click.option(
    "--balance",
    default="100.00",
    show_default=True,
    help="Without a scenario file: balance in yuan of the local cost-control meters (remote meters keep no wallet).",
)
@click.option(
    "--load",
    "load_kind",
    type=click.Choice([k.value for k in LoadKind]),
    default="residential",
    show_default=True,
    help="Without a scenario file: the load profile of every meter.",
)
@click.option(
    "--price",
    default=None,
    metavar="YUAN",
    help="Without a scenario file: one price in yuan/kWh (up to 4 decimals) for T1..T4 (default 0.5000).",
)
@click.option(
    "--prices",
    default=None,
    metavar="P1,P2,P3,P4",
    help="Without a scenario file: time-of-use prices in yuan/kWh, T1 sharp, T2 peak, T3 flat, T4 valley "
    "(4 to 12 of them, up to 4 decimals), on the default TOU schedule.",
)
@click.option(
    "--fault",
    "fault",
    multiple=True,
    metavar="KIND[:KEY=VALUE,...]",
    help="Without a scenario file: a fault on every meter (each its own copy, as [defaults] faults), "
    "repeatable, e.g. no_reply:remaining=3, bad_checksum:probability=0.2, late_reply:delay_ms=800. "
    f"KIND: {', '.join(k.value for k in Fault)}; KEY: {', '.join(sorted(_FAULT_KEYS - {'kind'}))}.",
)
@click.option(
    "--summary-every",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds between live summary lines (0 = none).",
)
def sim(
    scenario_file: str | None,
    meters: int | None,
    first_address: str,
    buses: int,
    tcp: str | None,
    pty: bool,
    mqtt: str | None,
    dtu: bool,
    admin: str | None,
    speed: float | None,
    seed: int | None,
    timing: bool | None,
    baud: str,
    start: str | None,
    mode: str,
    balance: str,
    load_kind: str,
    price: str | None,
    prices: str | None,
    fault: tuple[str, ...],
    summary_every: float,
) -> None:
    """Run a simulated meter fleet until interrupted."""
    if scenario_file is None and meters is None:
        raise click.UsageError("give a scenario file or --meters N")
    if scenario_file is not None and meters is not None:
        raise click.UsageError("give either a scenario file or --meters, not both")
    if not (tcp or pty or mqtt):
        raise click.UsageError("choose at least one transport: --tcp HOST:PORT, --pty or --mqtt URL")
    if scenario_file is not None:
        ctx = click.get_current_context()
        given = [
            f"--{name.removesuffix('_kind').replace('_', '-')}"
            for name in FLAG_FLEET_OPTIONS
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to a fleet built with "
                "--meters N; a scenario file sets buses, addresses, baud, mode, balance, load, tariffs and faults "
                "itself ([[bus]], [defaults])"
            )
    if mqtt is not None:
        _mqtt_url(mqtt)
    start_time = None
    if start is not None:
        try:
            start_time = datetime.fromisoformat(start)
        except ValueError:
            raise click.BadParameter(f"{start!r} is not ISO 8601", param_hint="--start") from None
        if start_time.tzinfo is None:
            raise click.BadParameter("the start time needs a zone, e.g. +08:00", param_hint="--start")
    try:
        if scenario_file is not None:
            scenario = load(scenario_file, timing=timing)
        else:
            tariff = _flag_tariff(price, prices)
            faults = [fault_table(text) for text in fault]
            scenario = from_flags(
                meters or 1,
                buses,
                seed=seed or 0,
                timing=True if timing is None else timing,
                baud=int(baud),
                mode=mode,
                balance=balance,
                load_kind=load_kind,
                first_address=first_address,
                tariff=tariff,
                faults=faults,
            )
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    if seed is not None:
        scenario.seed = seed
    if speed is not None:
        scenario.speed = speed
    if start_time is not None:
        scenario.start = start_time
    tcp_addr = _host_port(tcp, "--tcp") if tcp else None
    if tcp_addr is not None:
        _tcp_ports_fit(tcp_addr, scenario)
    admin_addr = _host_port(admin, "--admin") if admin else None
    try:
        asyncio.run(_run(scenario, tcp_addr, pty, mqtt, dtu, admin_addr, summary_every))
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise click.ClickException(f"cannot start the simulator: {reason}") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


async def start_fleet(scenario: Scenario) -> Fleet:
    """The fleet of a scenario on its own virtual clock."""
    clock = VirtualClock(scenario.start, scenario.speed)
    return Fleet(scenario.buses, clock, scenario.seed)


async def serve(
    fleet: Fleet, tcp: tuple[str, int] | None, pty: bool, mqtt: str | None, dtu: bool, admin: tuple[str, int] | None
) -> tuple[list[Any], Any]:
    """Start every requested endpoint; returns (endpoints, admin server or None)."""
    from .transports.mqtt import start_mqtt_bridge
    from .transports.pty import open_pty_bus
    from .transports.tcp import serve_tcp

    endpoints: list[Any] = []
    try:
        for k, bus in enumerate(fleet.buses.values()):
            if tcp is not None:
                endpoints.append(await serve_tcp(bus, tcp[0], tcp[1] + k if tcp[1] else 0))
            if pty:
                endpoints.append(open_pty_bus(bus))
        if mqtt is not None:
            url = urlsplit(mqtt)
            if url.scheme not in MQTT_SCHEMES:
                raise ValueError(f"--mqtt {mqtt!r}: the scheme must be mqtt://")
            prefix = url.path.strip("/") or "meterlink/sim"
            endpoints.append(
                await start_mqtt_bridge(
                    fleet.buses, f"{url.scheme}://{url.netloc}", None, prefix, dtu=dtu, fail_fast=True
                )
            )
        server = None
        if admin is not None:
            server = await _start_admin(fleet, *admin)
    except BaseException:
        for e in endpoints:
            with contextlib.suppress(Exception):
                await e.aclose()
        raise
    return endpoints, server


async def _start_admin(fleet: Fleet, host: str, port: int) -> Any:
    """Serve the admin interface on ``host:port``; raises OSError (with the address) if it cannot listen.

    The socket is bound here, not by uvicorn: uvicorn reports a bind failure with ``sys.exit(3)``
    inside its task, which escapes the event loop as a traceback.
    """
    import uvicorn

    from .admin import create_app

    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"admin interface cannot listen on {host}:{port}: {reason}") from None
    config = uvicorn.Config(create_app(fleet), host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(200):
        if server.started or task.done():
            break
        await asyncio.sleep(0.02)
    if task.done():
        task.result()
        raise OSError(f"admin interface could not listen on {host}:{port}")
    server.task = task  # type: ignore[attr-defined]
    return server


async def _run(
    scenario: Scenario,
    tcp: tuple[str, int] | None,
    pty: bool,
    mqtt: str | None,
    dtu: bool,
    admin: tuple[str, int] | None,
    summary_every: float,
) -> None:
    fleet = await start_fleet(scenario)
    endpoints, server = await serve(fleet, tcp, pty, mqtt, dtu, admin)
    out = sys.stdout
    print(
        f"meterlink sim: {len(fleet.meters)} meters on {len(fleet.buses)} buses, "
        f"virtual time {fleet.now().isoformat()} at {fleet.clock.speed:g}x",
        file=out,
    )
    for e in endpoints:
        print(f"  {e.description}", file=out)
    if server is not None:
        host, port = _bound(server)
        print(f"  admin: http://{host}:{port}/meters/{{address}}", file=out)
    out.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=summary_every or None)
            if summary_every and not stop.is_set():
                print(await _summary_line(fleet), file=out, flush=True)
    finally:
        for e in endpoints:
            with contextlib.suppress(Exception):
                await e.aclose()
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await server.task
        print("meterlink sim: stopped", file=out, flush=True)


def _bound(server: Any) -> tuple[str, int]:
    """Where the admin server listens (the real port when it was asked for port 0)."""
    for listener in getattr(server, "servers", None) or []:
        for sock in listener.sockets:
            host, port = sock.getsockname()[:2]
            return host, port
    return server.config.host, server.config.port


LIVE_CATCH_UP = 2000
"""Meters the live summary line catches up per line (round robin), whatever the fleet size. The
catch-up yields to the event loop every few ms (:meth:`Fleet.summary_async`), so the buses keep
answering while it runs."""


async def _summary_line(fleet: Fleet) -> str:
    s = await fleet.summary_async(LIVE_CATCH_UP)
    requests = sum(int(b.get("requests", 0)) for b in s["buses"].values())
    replies = sum(int(b.get("replies", 0)) for b in s["buses"].values())
    relays = ", ".join(f"{k} {v}" for k, v in sorted(s["relays"].items()))
    return f"[{s['time']}] requests {requests}, replies {replies}; relays: {relays}"
