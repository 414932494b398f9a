"""``meterlink read | write | relay | discover | time-sync``: talk to meters on a bus URL.

Bus URLs: ``serial:///dev/ttyUSB0?baud=2400&parity=E``, ``socket://HOST:PORT`` and
``rfc2217://HOST:PORT`` (pyserial URL handlers), ``tcp://HOST:PORT``,
``mqtt://HOST:PORT/PREFIX/ID``, ``dtu://HOST:PORT/ID`` (listen for a 4G DTU). Errors (no
reply, wrong address, refused) are one line on stderr and a non-zero exit status; never a
traceback. The link's warnings (a lost line, a reply from another meter rejected) are printed
only with ``-v`` (one ``warning: ...`` line each; ``-vv`` adds its progress notes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

import click

from protocols.dlt645 import (
    BROADCAST,
    METER_TZ,
    PROFILES,
    Dlt645Error,
    Edition,
    RelayCommand,
    decode_frame,
    dumps,
    jsonable,
    normalize_address,
    table_for,
)

from ..client import FRAME_TAP, MeterClient, ReadFailure, Reading
from ..errors import GatewayError, LinkDown, MeterRefused, NoReply, ReplyMismatch, WrongMeter
from ..link import Link, LinkConfig

T = TypeVar("T")

EXIT_ERROR = 1

RECONNECT_S = 5.0
"""How long a one-shot command waits for a lost line to come back (the gateway's lines wait
``reconnect_s``, 30 s): a broker restarted mid-read is waited out, a peer that keeps dropping the
connection fails in seconds."""


def _bus_option(f: Any, required: bool = True) -> Any:
    f = click.option(
        "--bus",
        "bus",
        required=required,
        metavar="URL",
        help="The line: serial://, socket://, tcp://, mqtt://HOST:PORT/PREFIX/ID, dtu://HOST:PORT/ID."
        + ("" if required else " Without it, the command goes through a running gateway (--gateway)."),
    )(f)
    f = click.option(
        "--profile",
        type=click.Choice(sorted(PROFILES)),
        default="sgcc-2013",
        show_default=True,
        help="Meter model (edition, password levels, reply forms).",
    )(f)
    f = click.option(
        "--timeout",
        type=click.FloatRange(0.05, 60),
        default=None,
        help="Td max in seconds (default 0.5; the timeout adds wire time and a margin).",
    )(f)
    f = click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True)(f)
    f = click.option(
        "--reconnect",
        type=click.FloatRange(0, 600),
        default=RECONNECT_S,
        show_default=True,
        metavar="SECONDS",
        help="How long a lost line (converter, broker, DTU) is waited for before the command fails; 0: at once.",
    )(f)
    f = click.option(
        "-v",
        "--verbose",
        count=True,
        help="Print the line's warnings (a lost line, a reply from another meter); -vv also its progress.",
    )(f)
    return click.option(
        "--operator",
        default="00000000",
        show_default=True,
        callback=_operator,
        help="Operator code (8 hex digits).",
    )(f)


def _operator(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", value):
        what = "is not hex" if re.search(r"[^0-9A-Fa-f]", value) else f"has {len(value)} digits"
        raise click.BadParameter(f"operator code {value!r} {what}: give 8 hex digits", ctx, param)
    return value.upper()


class _LogLines(logging.Handler):
    """Log records as one line each on stderr (``warning: line tcp://...: ...``), never a traceback.

    Written through click at emit time, so the stream is whatever stderr is then.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text = f"{text}: {type(exc).__name__}: {exc}"
            click.echo(f"{record.levelname.lower()}: {' '.join(text.split())}", err=True)
        except Exception:
            self.handleError(record)


_VERBOSITY = {0: logging.CRITICAL + 1, 1: logging.WARNING, 2: logging.INFO}


@contextlib.contextmanager
def _log_lines(verbose: int) -> Iterator[None]:
    """While a one-shot command runs: log records (the link's warnings) as one line each with
    ``-v`` (info too with ``-vv``), none without: the command's own error line says what failed.
    The root logger gets a handler, so Python's last-resort handler prints nothing raw."""
    root = logging.getLogger()
    handler = _LogLines(_VERBOSITY.get(verbose, logging.DEBUG))
    level = root.level
    root.addHandler(handler)
    if handler.level < root.getEffectiveLevel():
        root.setLevel(handler.level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _run(
    bus: str,
    timeout: float | None,
    retries: int,
    action: Callable[[Link], Awaitable[T]],
    *,
    reconnect: float = RECONNECT_S,
    verbose: int = 0,
    on_error: Callable[[str], NoReturn] | None = None,
) -> T:
    """Open the line, run ``action`` on it, close it. Every failure (the line, the meter, a value
    the user gave that only the codec can check) is one error line and exit 1 (``on_error``, given
    the message, may report it otherwise: ``read --json``)."""
    from ..transports import open_transport

    async def main() -> T:
        transport = open_transport(bus)
        config = LinkConfig(retries=retries, reconnect_s=reconnect)
        if timeout is not None:
            config.td_max_s = timeout
        link = Link(transport, config)
        await link.start(require_open=True)  # a dead line is reported at once, not after every retry
        try:
            return await action(link)
        finally:
            await link.stop()

    try:
        with _log_lines(verbose):
            return asyncio.run(main())
    except GatewayError as exc:
        message = str(exc)
    except Dlt645Error as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{bus}: {exc.strerror or exc}"
    except (ValueError, OverflowError) as exc:  # a value from the command line out of range somewhere
        message = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        click.echo("meterlink: interrupted", err=True)
        sys.exit(130)
    (on_error or _fail)(message)


def _fail(message: str) -> NoReturn:
    click.echo(f"meterlink: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _address(text: str) -> str:
    try:
        address = normalize_address(text)
    except Dlt645Error as exc:
        raise click.BadParameter(str(exc), param_hint="ADDRESS") from None
    if address == BROADCAST:  # nobody answers it: a read would fail oddly, a write "succeed" unheard
        raise click.BadParameter(f"{address} is the broadcast address; no meter answers it", param_hint="ADDRESS")
    return address


def _di(text: str, edition: Edition) -> int:
    compact = re.sub(r"[-.\s]", "", text)
    width = 8 if edition is Edition.V2007 else 4
    if not re.fullmatch(rf"[0-9A-Fa-f]{{{width}}}", compact):
        raise click.BadParameter(f"{text!r} is not a {width}-hex-digit data identifier", param_hint="DI")
    return int(compact, 16)


def _reading_json(r: Reading) -> dict[str, Any]:
    return {
        "address": r.address,
        "di": r.code,
        "name": r.name,
        "value": jsonable(r.value),
        "unit": r.unit,
        "raw": r.raw.hex().upper(),
    }


def _failure_json(f: ReadFailure) -> dict[str, Any]:
    # A refusal names the meter that refused (through the wildcard: the one that answered).
    address = f.error.address if isinstance(f.error, MeterRefused) else f.address
    return {"address": address, "di": f.code, "error": str(f.error)}


def _answered_by(frames: list[bytes]) -> str | None:
    """The address of the last reply among ``frames`` (a transaction's, from :data:`FRAME_TAP`)."""
    for raw in reversed(frames):
        try:
            frame = decode_frame(raw)
        except Dlt645Error:
            continue
        if frame.control.response:
            return frame.address
    return None


def _failure_text(f: ReadFailure) -> str:
    """``meterlink: 00900100: meter 000000000001 refused function 0x11 DI 00900100: no_data``."""
    message = str(f.error)
    return f"meterlink: {message}" if f.code in message else f"meterlink: DI {f.code}: {message}"


def _reading_text(r: Reading) -> str:
    value = jsonable(r.value)
    shown = dumps(value) if isinstance(value, (dict, list)) else ("null" if value is None else str(value))
    unit = f" {r.unit}" if r.unit and not isinstance(value, (dict, list)) else ""
    return f"{r.code}  {r.name or '(unknown DI)'}: {shown}{unit}"


@click.command("read")
@_bus_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per DI (with an error key if it failed).")
@click.argument("address")
@click.argument("dis", nargs=-1, required=True, metavar="DI...")
def read(
    bus: str,
    profile: str,
    timeout: float | None,
    retries: int,
    reconnect: float,
    verbose: int,
    operator: str,
    as_json: bool,
    address: str,
    dis: tuple[str, ...],
) -> None:
    """Read data identifiers from a meter.

    Every DI read is printed, in order; one the meter refuses is an error line naming it
    (stderr; with --json an object with address, di and error on stdout), and the exit status
    is then 1. When the meter stops answering (no reply, another meter's, the line down) that is
    one error line and the DIs after it are not tried (with --json each still gets its object,
    also when the line cannot be opened at all). Read through the wildcard AAAAAAAAAAAA, a value's
    address is that of the meter that answered.
    """
    prof = PROFILES[profile]
    addr = _address(address)
    ids = [_di(d, prof.edition) for d in dis]
    failed = 0
    shown = 0
    stopped = False
    tap: list[bytes] = []  # the frames of the DI being read (FRAME_TAP): whose reply it was

    def show(r: Reading | ReadFailure) -> None:  # as each DI is read: a slow line shows progress
        nonlocal failed, shown, stopped
        frames = tap[:]
        tap.clear()
        shown += 1
        if stopped:
            return
        if isinstance(r, ReadFailure):
            failed += 1
            if as_json:
                click.echo(dumps(_failure_json(r)))
            else:
                click.echo(_failure_text(r), err=True)
                # The meter (or the line) is gone: the rest are not tried (MeterClient.read_each),
                # and one line says so, not one per DI.
                stopped = isinstance(r.error, (NoReply, WrongMeter, LinkDown))
        elif as_json:
            row = _reading_json(r)
            row["address"] = _answered_by(frames) or r.address
            click.echo(dumps(row))
        else:
            click.echo(_reading_text(r))

    def json_error(message: str) -> NoReturn:
        """``--json``: the line failed (or never opened): an object for each DI not shown yet."""
        for di in ids[shown:]:
            code = f"{di:0{8 if prof.edition is Edition.V2007 else 4}X}"
            click.echo(dumps({"address": addr, "di": code, "error": message}))
        sys.exit(EXIT_ERROR)

    async def action(link: Link) -> list[Reading | ReadFailure]:
        FRAME_TAP.set(tap)
        client = MeterClient(link, addr, prof, operator=operator)
        return await client.read_each(ids, on_result=show)

    _run(bus, timeout, retries, action, reconnect=reconnect, verbose=verbose, on_error=json_error if as_json else None)
    if failed:
        sys.exit(EXIT_ERROR)


def _parse_value(di: int, edition: Edition, text: str) -> Any:
    """The typed value of VALUE for this DI, by the same parser as ``meterlink encode write``."""
    from protocols.dlt645 import parse_value

    item = table_for(edition).get(di)
    if item is None:
        width = 8 if edition is Edition.V2007 else 4
        raise click.BadParameter(f"unknown data identifier {di:0{width}X}", param_hint="DI")
    try:
        return parse_value(item.format, text)
    except Dlt645Error as exc:
        raise click.BadParameter(
            f"{text!r} is not a value for {item.code} ({item.format.spec}): {exc}", param_hint="VALUE"
        ) from None


@click.command("write")
@_bus_option
@click.option(
    "--security",
    type=click.Choice(["plain", "mac", "cipher"]),
    default="plain",
    show_default=True,
    help="plain: password level (needs the programming key); mac: level 99; cipher: level 98.",
)
@click.option("--level", default="04", show_default=True, help="Password level for plain writes (hex).")
@click.option("--password", default="000000", show_default=True)
@click.argument("address")
@click.argument("di")
@click.argument("value")
def write(
    bus: str,
    profile: str,
    timeout: float | None,
    retries: int,
    reconnect: float,
    verbose: int,
    operator: str,
    security: str,
    level: str,
    password: str,
    address: str,
    di: str,
    value: str,
) -> None:
    """Write one data identifier."""
    prof = PROFILES[profile]
    addr = _address(address)
    di_value = _di(di, prof.edition)
    parsed = _parse_value(di_value, prof.edition, value)
    try:
        level_value = int(level, 16)
    except ValueError:
        raise click.BadParameter(f"{level!r} is not a hex level", param_hint="--level") from None

    async def action(link: Link) -> None:
        client = MeterClient(link, addr, prof, operator=operator)
        if security == "mac":
            await client.write_mac(di_value, parsed)
        elif security == "cipher":
            await client.write_encrypted(di_value, parsed)
        else:
            await client.write(di_value, parsed, level=level_value, password=password)

    _run(bus, timeout, retries, action, reconnect=reconnect, verbose=verbose)
    click.echo(f"{addr}: {di_value:08X} written")


_ACTIONS = {c.name.lower().replace("_", "-"): c for c in RelayCommand}


@click.command("relay")
@lambda f: _bus_option(f, required=False)
@click.option(
    "--gateway",
    "gateway_url",
    envvar="METERLINK_GATEWAY",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="Without --bus: the gateway's API (env METERLINK_GATEWAY).",
)
@click.option(
    "--api-key",
    "api_key",
    envvar="METERLINK_API_KEY",
    default=None,
    help="Without --bus: API key (env METERLINK_API_KEY).",
)
@click.option(
    "--key",
    "--idempotency-key",
    "idem",
    default=None,
    help="Without --bus: the idempotency key; repeat safely with the same key. Default: the gateway derives "
    "one, so the same command repeated today (nothing else for the meter in between) is the same command.",
)
@click.option("--json", "as_json", is_flag=True, help="Without --bus: print the command as JSON.")
@click.option(
    "--valid-minutes",
    type=click.IntRange(1, 24 * 60),
    default=None,
    help="The meter refuses the command after this many minutes (default: the gateway's, 30).",
)
@click.option("--valid-until", default=None, metavar="TIME", help="ISO 8601 time after which the meter refuses it.")
@click.option(
    "--n2", type=click.IntRange(0, 255), default=0, show_default=True, help="Trip-auto-restore delay in 5-minute units."
)
@click.option("--plaintext", is_flag=True, help="Plaintext 0x1C with a password (meters usually only close).")
@click.option("--level", default="02", show_default=True)
@click.option("--password", default="000000", show_default=True)
@click.option(
    "--arrears/--not-arrears",
    default=None,
    help="Without --bus, for a trip: for arrears (the grace period after zero and the notice rule apply), or "
    "not (e.g. safety, move-out: neither). Neither given: the grace period still applies.",
)
@click.argument("address")
@click.argument("action", type=click.Choice(sorted(_ACTIONS)))
def relay(
    bus: str | None,
    gateway_url: str,
    api_key: str | None,
    idem: str | None,
    as_json: bool,
    profile: str,
    timeout: float | None,
    retries: int,
    reconnect: float,
    verbose: int,
    operator: str,
    valid_minutes: int | None,
    valid_until: str | None,
    n2: int,
    plaintext: bool,
    level: str,
    password: str,
    arrears: bool | None,
    address: str,
    action: str,
) -> None:
    """Relay control: trip, close-allowed, direct-close, alarm, power hold.

    With --bus the command goes straight to the meter; without it, through a running gateway
    (ledger, safety policy, read-back). Either way it is valid 30 minutes unless --valid-minutes
    or --valid-until says otherwise.
    """
    until = _valid_until(valid_minutes, valid_until)
    if bus is None:
        from .service import submit_and_wait

        body: dict[str, Any] = {"kind": "relay", "address": address, "params": {"action": action, "n2": n2}}
        if arrears is not None:
            body["params"]["arrears"] = arrears
        # No validity given: none is sent, the gateway applies its default (30 minutes) and derives
        # the same idempotency key for the same command today, so a repeat is the first command.
        if until is not None:
            body["valid_until"] = until.isoformat()
        if idem:
            body["idempotency_key"] = idem
        hint = None
        if not idem:
            hint = (
                f"(the same {action} command was already submitted today: showing it, nothing was sent "
                "again; give it its own --key to send another)"
            )
        submit_and_wait(gateway_url, api_key, body, 30, as_json, hint)
        return
    if arrears is not None:
        raise click.UsageError("--arrears/--not-arrears are for the gateway's safety policy: leave out --bus")
    prof = PROFILES[profile]
    addr = _address(address)
    if until is None:
        from ..service import DEFAULT_VALIDITY

        until = datetime.now(METER_TZ) + DEFAULT_VALIDITY
    try:
        level_value = int(level, 16)
    except ValueError:
        raise click.BadParameter(f"{level!r} is not a hex level", param_hint="--level") from None

    async def run(link: Link) -> Any:
        client = MeterClient(link, addr, prof, operator=operator)
        try:
            return await client.relay(
                _ACTIONS[action], until, n2=n2, encrypted=not plaintext, level=level_value, password=password
            )
        except MeterRefused as refused:
            meter_now = await client.clock_past(until)
            if meter_now is None:
                raise
            raise GatewayError(
                f"{refused}; the meter's clock reads {meter_now.isoformat()}, past the validity end "
                f"{until.isoformat()}: it refuses the frame whatever error it reports; set its time "
                "(meterlink write ... 04000101/04000102)"
            ) from None

    result = _run(bus, timeout, retries, run, reconnect=reconnect, verbose=verbose)
    executed = f" ({result.execution.name})" if result.execution else ""
    click.echo(f"{addr}: {action} accepted{executed}")


def _valid_until(minutes: int | None, until: str | None) -> datetime | None:
    """The validity end the user gave (--valid-minutes or --valid-until), else None."""
    if minutes is not None and until is not None:
        raise click.UsageError("--valid-minutes and --valid-until exclude each other")
    if minutes is not None:
        return datetime.now(METER_TZ) + timedelta(minutes=minutes)
    if until is None:
        return None
    try:
        when = datetime.fromisoformat(until)
        if when.tzinfo is None:
            when = when.replace(tzinfo=METER_TZ)
        when = when.astimezone(METER_TZ)
    except (ValueError, OverflowError):
        raise click.BadParameter(f"{until!r} is not an ISO 8601 time", param_hint="--valid-until") from None
    if when <= datetime.now(METER_TZ):
        raise click.BadParameter(f"{until!r} is in the past", param_hint="--valid-until")
    return when


@click.command("discover")
@_bus_option
@click.option("--address", "addresses", multiple=True, help="Probe these addresses (repeat) instead of the wildcard.")
def discover(
    bus: str,
    profile: str,
    timeout: float | None,
    retries: int,
    reconnect: float,
    verbose: int,
    operator: str,
    addresses: tuple[str, ...],
) -> None:
    """Find the meters on a line: the wildcard read-address when one meter is alone, else probe a list."""
    prof = PROFILES[profile]
    probe = [_address(a) for a in addresses]

    async def run(link: Link) -> list[str]:
        try:
            return await MeterClient.discover(link, probe, prof, operator=operator)
        except (NoReply, WrongMeter, ReplyMismatch) as exc:
            if probe:
                raise
            raise GatewayError(
                f"{exc}; if several meters share the line their replies to the wildcard collide: "
                "probe them with --address"
            ) from None

    found = _run(bus, timeout, retries, run, reconnect=reconnect, verbose=verbose)
    for a in found:
        click.echo(a)
    if not found:
        _fail("no meter answered")


@click.command("time-sync")
@_bus_option
@click.option("--at", "at", default=None, help="ISO 8601 time to broadcast (default: now).")
def time_sync(
    bus: str,
    profile: str,
    timeout: float | None,
    retries: int,
    reconnect: float,
    verbose: int,
    operator: str,
    at: str | None,
) -> None:
    """Broadcast the time (meters apply it only if within 5 minutes, once a day, away from midnight)."""
    prof = PROFILES[profile]
    try:
        when = datetime.fromisoformat(at) if at else datetime.now(METER_TZ)
    except ValueError:
        raise click.BadParameter(f"{at!r} is not ISO 8601", param_hint="--at") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=METER_TZ)
    try:
        when = when.astimezone(METER_TZ)  # 9999-12-31T23:59:59+00:00 is past datetime.max there
    except OverflowError:
        raise click.BadParameter(f"{at!r} is out of range (meter clocks run 2000..2099)", param_hint="--at") from None

    async def run(link: Link) -> Any:
        return await MeterClient(link, "000000000000", prof, operator=operator).broadcast_time(when)

    _run(bus, timeout, retries, run, reconnect=reconnect, verbose=verbose)
    click.echo(f"time {when.astimezone(METER_TZ).replace(microsecond=0).isoformat()} broadcast")
