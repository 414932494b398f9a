"""``meterlink gateway`` runs the service; ``topup``, ``tariff``, ``commands`` (and ``relay``
without ``--bus``) talk to a running gateway over its REST API.

The API address and key come from ``--gateway`` / ``--api-key`` or the environment variables
``METERLINK_GATEWAY`` (default ``http://127.0.0.1:8080``) and ``METERLINK_API_KEY``. ``--key``
(alias ``--idempotency-key``) of the commands that submit one is its idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from decimal import Decimal, InvalidOperation
from typing import Any

import click

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"meterlink: {message}", err=True)
    sys.exit(code)


@click.command("gateway")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="TOML file: buses, meters, store, API, MQTT, policy.",
)
def gateway(config_path: str) -> None:
    """Run the gateway service until interrupted."""
    from ..config import ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as exc:
        _fail(str(exc))
        return
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        _fail(f"cannot start the gateway: {exc.strerror or exc}")
    except Exception as exc:
        _fail(f"cannot start the gateway: {type(exc).__name__}: {exc}")


async def _serve(config: Any) -> None:
    from ..app import Gateway

    gw = await Gateway(config).start()
    click.echo(
        f"meterlink gateway: {len(config.meters)} meters on {len(config.buses)} buses, "
        f"ledger {gw.store.name if gw.store else '-'}"
    )
    if gw.api_url:
        click.echo(f"  api: {gw.api_url} (OpenAPI at {gw.api_url}/docs)")
    if gw.northbound is not None:
        click.echo(f"  mqtt: {gw.northbound.description}")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await gw.stop()
        click.echo("meterlink gateway: stopped")


# --- the API client ------------------------------------------------------------------------------------


def _api_options(f: Any) -> Any:
    f = click.option(
        "--gateway",
        "gateway_url",
        envvar="METERLINK_GATEWAY",
        default=DEFAULT_GATEWAY,
        show_default=True,
        help="The gateway's API (env METERLINK_GATEWAY).",
    )(f)
    return click.option(
        "--api-key", "key", envvar="METERLINK_API_KEY", default=None, help="API key (env METERLINK_API_KEY)."
    )(f)


def _idempotency_option(text: str) -> Any:
    """``--key`` (alias ``--idempotency-key``): the command's idempotency key."""
    return click.option("--key", "--idempotency-key", "idem", default=None, metavar="KEY", help=text)


def api_call(
    base: str, method: str, path: str, key: str | None, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request to the gateway API; returns (status, decoded JSON). Network errors exit cleanly."""
    data = json.dumps(body).encode() if body is not None else None
    try:
        url = urllib.parse.urlsplit(base)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("not an http(s) URL")
        request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    except ValueError as exc:
        _fail(f"--gateway {base!r} is not usable ({exc}); give it as http://HOST:PORT")
        raise AssertionError("unreachable") from None
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("X-API-Key", key)
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            status = response.status
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            _fail(f"the server at {base} answered {status} with something that is not JSON: is it a meterlink gateway?")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            text = " ".join(raw.decode(errors="replace").split())
            if not text or text.startswith("<"):  # an HTML page: not the gateway's API
                text = f"{exc.reason}; the answer is not JSON: is {base} a meterlink gateway?"
            return exc.code, {"detail": text[:200]}
    except urllib.error.URLError as exc:
        _fail(f"cannot reach the gateway at {base}: {exc.reason}")
    except TimeoutError:
        _fail(f"the gateway at {base} did not answer")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, bad port, not HTTP at all
        _fail(f"talking to the gateway at {base} failed: {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")


def _detail(body: Any) -> str:
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):
            return "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        return str(detail)
    return json.dumps(body)


def _print_command(cmd: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(cmd, ensure_ascii=False))
        return
    result = cmd.get("result") or {}
    extra = ", ".join(f"{k}={v}" for k, v in result.items()) if isinstance(result, dict) else ""
    click.echo(f"{cmd['id']}  {cmd['kind']:<9} {cmd['address']}  {cmd['state']:<9} {extra}".rstrip())


def _seg(value: str) -> str:
    """One URL path segment, quoted (user text never changes the path or the query)."""
    return urllib.parse.quote(value, safe="")


def submit_and_wait(
    base: str, key: str | None, body: dict[str, Any], wait: float, as_json: bool, repeat_hint: str | None = None
) -> None:
    if not key:
        _fail("an API key is needed to change anything: --api-key or METERLINK_API_KEY", 2)
    status, reply = api_call(base, "POST", "/commands", key, body)
    if status >= 400:
        _fail(f"rejected ({status}): {_detail(reply)}")
    cmd = reply
    if status == 200:
        click.echo(
            repeat_hint or "(this idempotency key was used before: showing the first command, nothing was sent again)",
            err=True,
        )
    end = time.monotonic() + wait
    while cmd["state"] in ("accepted", "sent") and time.monotonic() < end:
        time.sleep(0.2)
        status, cmd = api_call(base, "GET", f"/commands/{cmd['id']}", key)
        if status >= 400:
            _fail(f"cannot read the command back ({status}): {_detail(cmd)}")
    _print_command(cmd, as_json)
    if cmd["state"] in ("failed", "refused", "unknown"):
        sys.exit(1)


@click.command("topup")
@_api_options
@click.argument("address")
@click.argument("amount")
@_idempotency_option(
    "Idempotency key: repeat with the same key and it applies once. Default: the "
    "gateway derives one from the meter, the amount and today's date (and the top-up before it), so re-running "
    "the same command after a lost answer never pays twice."
)
@click.option("--new", "again", is_flag=True, help="A second top-up of the same amount today (a fresh key).")
@click.option("--opening", is_flag=True, help="Account opening (070101FF) instead of a recharge.")
@click.option("--kwh", is_flag=True, help="AMOUNT is kWh, for a meter with an energy wallet (prepaid.md §1.8).")
@click.option(
    "--wait",
    type=click.FloatRange(0, 600),
    default=30,
    show_default=True,
    help="Seconds to wait for the outcome (0: return once accepted).",
)
@click.option("--json", "as_json", is_flag=True)
def topup(
    gateway_url: str,
    key: str | None,
    address: str,
    amount: str,
    idem: str | None,
    again: bool,
    opening: bool,
    kwh: bool,
    wait: float,
    as_json: bool,
) -> None:
    """Top up a meter's balance by AMOUNT yuan (e.g. 50.00), or with --kwh its energy wallet by AMOUNT kWh."""
    from protocols.dlt645 import Dlt645Error, normalize_address

    field = "energy_kwh" if kwh else "amount"
    body = {"kind": "topup", "address": address, "params": {field: amount, "opening": opening}}
    hint = None
    if idem and again:
        raise click.UsageError("--new and --key (--idempotency-key) exclude each other")
    if idem:
        body["idempotency_key"] = idem
    elif again:
        body["idempotency_key"] = f"cli-new:{uuid.uuid4().hex}"
    else:
        # No key: the gateway derives one (gateway/service.py CommandService._derived_key): the
        # same meter, amount and day, with no other top-up in between, is the same top-up.
        try:
            unit = " kWh" if kwh else ""
            shown = f"{Decimal(amount).quantize(Decimal('0.01'))}{unit} to {normalize_address(address)}"
        except (Dlt645Error, InvalidOperation, ValueError):
            shown = f"{amount} to {address}"
        hint = (
            f"(a top-up of {shown} was already submitted today: showing it, nothing was sent again; "
            "use --new for a second one)"
        )
    submit_and_wait(gateway_url, key, body, wait, as_json, hint)


@click.command("tariff")
@_api_options
@click.argument("address")
@click.argument("prices", nargs=-1, metavar="[PRICE...]")
@click.option("--switch-at", default=None, help="ISO 8601 time the new prices take effect (default: in a minute).")
@click.option(
    "--steps",
    "steps",
    default=None,
    metavar="JSON",
    help='Step table: {"thresholds": [6 kWh], "prices": [7 yuan/kWh], "settlement_dates": '
    '[{"month": 1, "day": 1, "hour": 0}]}',
)
@click.option("--steps-switch-at", default=None, help="ISO 8601 time the new step table takes effect.")
@click.option(
    "--tou",
    "tou",
    default=None,
    metavar="JSON",
    help='TOU schedule: {"zones": [{"month": 1, "day": 1, "table": 1}, ...], "day_tables": '
    '[[{"hour": 0, "minute": 0, "tariff": 4}, {"hour": 8, "minute": 0, "tariff": 2}, ...], ...]} '
    "(1..14 zones, 1..8 day tables of 1..14 periods, tariffs 1..4, ascending).",
)
@click.option("--tou-switch-at", default=None, help="ISO 8601 time the new TOU schedule takes effect.")
@click.option(
    "--current", is_flag=True, help="Switch in at once (verified on the current sets) instead of at the switch time."
)
@_idempotency_option(
    "Idempotency key: repeat with the same key and it applies once. Default: the "
    "gateway derives one from the meter, the parameters and today's date (and the tariff command before it)."
)
@click.option("--wait", type=click.FloatRange(0, 600), default=30, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def tariff(
    gateway_url: str,
    key: str | None,
    address: str,
    prices: tuple[str, ...],
    switch_at: str | None,
    steps: str | None,
    steps_switch_at: str | None,
    tou: str | None,
    tou_switch_at: str | None,
    current: bool,
    idem: str | None,
    wait: float,
    as_json: bool,
) -> None:
    """Send new time-of-use prices T1..Tn (yuan/kWh), a step table and/or a TOU schedule to a meter's backup sets."""
    params: dict[str, Any] = {}
    if prices:
        params["prices"] = list(prices)
        if switch_at:
            params["switch_at"] = switch_at
    if steps:
        try:
            params["steps"] = json.loads(steps)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--steps") from None
        if steps_switch_at:
            params["steps_switch_at"] = steps_switch_at
    if tou:
        try:
            params["tou"] = json.loads(tou)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--tou") from None
        if tou_switch_at:
            params["tou_switch_at"] = tou_switch_at
    elif tou_switch_at:
        raise click.UsageError("--tou-switch-at needs --tou")
    if not params:
        raise click.UsageError("give prices, --steps, --tou, or some of them")
    if current:
        params["set"] = "current"
    body: dict[str, Any] = {"kind": "tariff", "address": address, "params": params}
    if idem:
        body["idempotency_key"] = idem
    submit_and_wait(gateway_url, key, body, wait, as_json)


@click.command("commands")
@_api_options
@click.argument("command_id", required=False)
@click.option("--address", default=None)
@click.option("--state", default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def commands(
    gateway_url: str,
    key: str | None,
    command_id: str | None,
    address: str | None,
    state: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List recent commands, or show one with its audit events."""
    if command_id:
        status, cmd = api_call(gateway_url, "GET", f"/commands/{_seg(command_id)}", key)
        if status >= 400:
            _fail(f"{status}: {_detail(cmd)}")
        _print_command(cmd, as_json)
        status, events = api_call(gateway_url, "GET", f"/commands/{_seg(command_id)}/events", key)
        if status < 400 and not as_json:
            for e in events:
                click.echo(f"  {e['at']}  {e['state']:<9} {e['actor']}  {json.dumps(e['detail'], ensure_ascii=False)}")
        return
    query = urllib.parse.urlencode([(k, v) for k, v in (("address", address), ("state", state), ("limit", limit)) if v])
    status, items = api_call(gateway_url, "GET", f"/commands?{query}", key)
    if status >= 400:
        _fail(f"{status}: {_detail(items)}")
    for cmd in items:
        _print_command(cmd, as_json)


@click.command("notice")
@_api_options
@click.argument("address")
@click.option("--text", default="", help="What was sent (kept in the audit trail).")
@click.option("--sent-at", default=None, help="ISO 8601 time it went out (default: now).")
def notice(gateway_url: str, key: str | None, address: str, text: str, sent_at: str | None) -> None:
    """Record that a disconnection notice went out to a meter's customer."""
    if not key:
        _fail("an API key is needed to change anything: --api-key or METERLINK_API_KEY", 2)
    body: dict[str, Any] = {"text": text}
    if sent_at:
        body["sent_at"] = sent_at
    status, reply = api_call(gateway_url, "POST", f"/meters/{_seg(address)}/notices", key, body)
    if status >= 400:
        _fail(f"rejected ({status}): {_detail(reply)}")
    click.echo(f"{reply['address']}: notice recorded at {reply['sent_at']} by {reply['actor']}")
