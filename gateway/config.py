"""The gateway's configuration: one TOML file for buses, meters, store, API, MQTT and policy.

```toml
[store]
sqlite = "meterlink.sqlite"          # default; or: postgres = "postgresql://user@host/db", schema = "gw"

[api]
listen = "127.0.0.1:8080"
keys = { ops = "change-me" }         # name = key; the name is recorded as the actor
read_requires_key = false

[mqtt]                               # optional northbound
url = "mqtt://127.0.0.1:1883/meterlink/gw"
actors = ["cashier-7", "ops"]        # optional: the only actor names accepted over MQTT

[policy]
quiet_start = "18:00"                # no trips from here ...
quiet_end = "09:00"                  # ... to here, nor on weekends and holidays (equal: no nightly quiet hours)
weekend_quiet = true
holidays = ["2026-12-24"]            # days of your own with no trips, besides the calendar
calendar = "cn"                      # Chinese public holidays 2026-2027 (gateway/holidays.py); "none"
grace_hours = 48                     # after the balance reaches zero
dry_run = false

[service]
max_attempts = 5
retry_delay_s = 5
rate_per_s = 0                       # commands started per second (0 = unlimited)

[poll]                               # background reads: relay, power hold, balance, silent meters
interval_s = 900                     # every meter of a line read once in this time (0 = off; default 900)
retries = 1                          # extra attempts per poll read
silent_after = 1                     # polls in a row without an answer before meter_silent

[billing]                            # remote cost control: the daily charge from the daily freeze
prices = ["0.5000", "0.5000", "0.5000", "0.5000"]   # yuan/kWh, T1..T4
run_at = "00:30"

[[bus]]
name = "line-1"
url = "tcp://127.0.0.1:7000"         # serial:///dev/ttyUSB0?baud=2400&parity=E, mqtt://host/prefix/id ...
gap_ms = 50
td_max_ms = 500
retries = 2
reconnect_s = 30                     # how long a lost line (broker, converter) may take to come back, counted
                                     # once per outage; then its queued and new requests fail at once
meters = { from = 1, to = 50 }       # addresses 000000000001 .. 000000000050, or a list
                                     # one [[bus]] per line: two naming the same port, converter or DTU are refused

[[meter]]                            # per-meter settings
address = "000000000007"
mode = "remote"                      # local (the meter holds the wallet) or remote (the ledger does)
wallet = "money"                     # local meters: money (yuan, the default) or energy (kWh, prepaid.md §1.8)
power_hold = true
residential = true
profile = "sgcc-2013"
customer = "000000000007"
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import date, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from protocols.dlt645 import PROFILES, Dlt645Error, normalize_address

from .errors import BusUrlError, GatewayError
from .holidays import CALENDARS
from .link import LinkConfig
from .policy import Policy
from .poller import PollConfig
from .service import MeterEntry, ServiceConfig


class ConfigError(GatewayError, ValueError):
    """A configuration that cannot be used, naming the key at fault."""


@dataclass
class BusConfig:
    name: str
    url: str
    link: LinkConfig


def line_conflict(
    lines: dict[tuple[object, ...], tuple[str, str]], name: str, url: str, key: tuple[object, ...]
) -> str | None:
    """Why bus ``name`` cannot be added when ``lines`` (line key -> (bus, url)) has the buses so far.

    Two buses on one line would run two schedulers on one half-duplex RS-485 line, whose
    requests then collide (peers.md §3: "multiple connections opened on one port"): one device
    path, one converter host:port (``serial``/``socket``/``rfc2217``/``tcp``), one broker with
    one prefix and DTU id, or one DTU id on a ``dtu://`` listen address (many DTUs sharing the
    listen address is intended). Records the bus when it is fine.
    """
    other = lines.get(key)
    if other is None:
        lines[key] = (name, url)
        return None
    return (
        f"buses {other[0]!r} ({other[1]}) and {name!r} ({url}) are the same line; one line has one bus "
        "(two schedulers on one RS-485 line make their requests collide): list every meter under one [[bus]]"
    )


def _check_bus_url(
    url: str,
    name: str,
    where: str,
    listens: dict[tuple[str, int], dict[str, Any]],
    lines: dict[tuple[object, ...], tuple[str, str]],
) -> None:
    """The URL must parse and name a line no other bus uses; ``dtu://`` buses on one listen
    address need the same options and distinct ids.

    ``listens`` remembers, per listen address, the first bus's name and options and the ids seen;
    ``lines`` every line so far (:func:`line_conflict`).
    """
    from .transports import DtuTransport, open_transport

    try:
        transport = open_transport(url)
    except BusUrlError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not isinstance(transport, DtuTransport):
        conflict = line_conflict(lines, name, url, transport.line_key)
        if conflict is not None:
            raise ConfigError(f"{where}: {conflict}")
        return
    seen = listens.setdefault(transport.listen_key, {"bus": name, "settings": transport.server_settings(), "ids": {}})
    if seen["settings"] != transport.server_settings():
        raise ConfigError(
            f"{where}: bus {seen['bus']!r} listens on the same address with other registration/heartbeat "
            "options; one listen address has one set"
        )
    other = seen["ids"].get(transport.ident)
    if other is not None:
        raise ConfigError(f"{where}: DTU {transport.ident} on {url} is bus {other!r} already")
    seen["ids"][transport.ident] = name
    lines[transport.line_key] = (name, url)


@dataclass
class GatewayConfig:
    """Everything ``meterlink gateway`` runs."""

    buses: list[BusConfig]
    meters: dict[str, MeterEntry]
    sqlite: str | None = "meterlink.sqlite"
    postgres: str | None = None
    schema: str | None = None
    api_listen: tuple[str, int] | None = ("127.0.0.1", 8080)
    api_keys: dict[str, str] = field(default_factory=dict)
    read_requires_key: bool = False
    mqtt_url: str | None = None
    mqtt_actors: tuple[str, ...] | None = None
    """The only actor names accepted over MQTT (None: any; access control is the broker's)."""
    policy: Policy = field(default_factory=Policy)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    groups: dict[str, list[str]] = field(default_factory=dict)
    billing_prices: tuple[Decimal, ...] = (Decimal("0.5000"),) * 4
    billing_at: time = time(0, 30)
    poll: PollConfig = field(default_factory=PollConfig)
    """The meter poller ([poll]; gateway/poller.py)."""


def _keys(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}]: must be a table ([{key}] with key = value lines), not {value!r}")
    return value


def _tables(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"[[{key}]]: write each {key} as a [[{key}]] section (an array of tables)")
    return value


def _host_port(text: Any, where: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {text!r} is not HOST:PORT (port 0..65535)")
    return host or "127.0.0.1", int(port)


def _number(section: dict[str, Any], key: str, default: float, where: str, cast: type = float) -> Any:
    """A number from the file (a TOML number, or a string holding one), named in the error."""
    value = section.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = cast(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{key}: {value!r} is not a{'n integer' if cast is int else ' number'}") from None
    if number < 0:
        raise ConfigError(f"{where}.{key}: {value!r} must not be negative")
    return number


def _bool(section: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: {value!r} is not true or false")
    return value


def _time(text: Any, where: str) -> time:
    try:
        return time.fromisoformat(str(text))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not HH:MM") from None


def _address(text: Any, where: str) -> str:
    try:
        return normalize_address(str(text))
    except Dlt645Error as exc:
        raise ConfigError(f"{where}: {exc}") from None


def build(doc: dict[str, Any]) -> GatewayConfig:
    """A configuration from a parsed TOML document."""
    _keys(doc, {"store", "api", "mqtt", "policy", "service", "bus", "meter", "groups", "billing", "poll"}, "top level")
    poll = _poll(_table(doc, "poll"))
    bill = _table(doc, "billing")
    _keys(bill, {"prices", "run_at"}, "[billing]")
    try:
        billing_prices = tuple(Decimal(str(p)) for p in bill.get("prices", ["0.5000"] * 4))
    except InvalidOperation:
        raise ConfigError('[billing].prices: give 4 prices in yuan/kWh, e.g. ["0.6", "0.5", "0.5", "0.3"]') from None
    if len(billing_prices) != 4 or any(p < 0 for p in billing_prices):
        raise ConfigError("[billing].prices: give 4 non-negative prices (T1..T4)")
    store = _table(doc, "store")
    _keys(store, {"sqlite", "postgres", "schema"}, "[store]")
    api = _table(doc, "api")
    _keys(api, {"listen", "keys", "read_requires_key"}, "[api]")
    keys = api.get("keys", {})
    if isinstance(keys, list):
        keys = {f"key{i + 1}": k for i, k in enumerate(keys)}
    if not isinstance(keys, dict) or not all(isinstance(v, str) and len(v) >= 8 for v in keys.values()):
        raise ConfigError('[api].keys: give name = "key" pairs, keys of at least 8 characters')
    mqtt = _table(doc, "mqtt")
    _keys(mqtt, {"url", "actors"}, "[mqtt]")
    actors = mqtt.get("actors")
    if actors is not None and (
        not isinstance(actors, list) or not actors or not all(isinstance(a, str) and a for a in actors)
    ):
        raise ConfigError('[mqtt].actors: a list of actor names, e.g. ["cashier-7", "ops"]')
    pol = _table(doc, "policy")
    _keys(
        pol,
        {
            "quiet_start",
            "quiet_end",
            "weekend_quiet",
            "holidays",
            "calendar",
            "grace_hours",
            "dry_run",
            "require_notice",
            "notice_residential_days",
            "notice_other_days",
            "reminder_hours",
            "notice_valid_days",
        },
        "[policy]",
    )
    try:
        holidays = frozenset(date.fromisoformat(str(d)) for d in pol.get("holidays", []))
    except ValueError as exc:
        raise ConfigError(f"[policy].holidays: {exc}") from None
    calendar = pol.get("calendar", "cn")
    if calendar not in CALENDARS:
        raise ConfigError(f"[policy].calendar: {calendar!r} is not one of {', '.join(sorted(CALENDARS))}")
    holidays |= CALENDARS[calendar]  # gateway/holidays.py: the default public holidays
    policy = Policy(
        quiet_start=_time(pol.get("quiet_start", "18:00"), "[policy].quiet_start"),
        quiet_end=_time(pol.get("quiet_end", "09:00"), "[policy].quiet_end"),
        weekend_quiet=_bool(pol, "weekend_quiet", True, "[policy]"),
        holidays=holidays,
        grace=timedelta(hours=_number(pol, "grace_hours", 48, "[policy]")),
        dry_run=_bool(pol, "dry_run", False, "[policy]"),
        require_notice=_bool(pol, "require_notice", False, "[policy]"),
        notice_residential=timedelta(days=_number(pol, "notice_residential_days", 7, "[policy]")),
        notice_other=timedelta(days=_number(pol, "notice_other_days", 3, "[policy]")),
        reminder=timedelta(hours=_number(pol, "reminder_hours", 1, "[policy]")),
        notice_valid=timedelta(days=_number(pol, "notice_valid_days", 30, "[policy]")),
    )
    svc = _table(doc, "service")
    _keys(svc, {"max_attempts", "retry_delay_s", "rate_per_s", "concurrency", "lease_s", "operator"}, "[service]")
    service = ServiceConfig(
        max_attempts=_number(svc, "max_attempts", 5, "[service]", int),
        retry_delay=timedelta(seconds=_number(svc, "retry_delay_s", 5, "[service]")),
        rate_per_s=_number(svc, "rate_per_s", 0, "[service]"),
        concurrency=_number(svc, "concurrency", 64, "[service]", int),
        lease=timedelta(seconds=_number(svc, "lease_s", 60, "[service]")),
        operator=str(svc.get("operator", "00000001")),
    )
    buses: list[BusConfig] = []
    listens: dict[tuple[str, int], dict[str, Any]] = {}
    lines: dict[tuple[object, ...], tuple[str, str]] = {}
    meters: dict[str, MeterEntry] = {}
    for i, b in enumerate(_tables(doc, "bus")):
        where = f"[[bus]] {i + 1}"
        _keys(b, {"name", "url", "gap_ms", "td_max_ms", "retries", "reconnect_s", "meters", "profile"}, where)
        if "url" not in b:
            raise ConfigError(f"{where}: needs a url")
        name = str(b.get("name", f"bus{i}"))
        if any(x.name == name for x in buses):
            raise ConfigError(f"{where}: bus name {name!r} is used twice")
        link = LinkConfig(
            gap_s=_number(b, "gap_ms", 50, where) / 1000,
            td_max_s=_number(b, "td_max_ms", 500, where) / 1000,
            retries=_number(b, "retries", 2, where, int),
            reconnect_s=_number(b, "reconnect_s", 30, where),
        )
        url = str(b["url"])
        _check_bus_url(url, name, f"{where}.url", listens, lines)
        buses.append(BusConfig(name, url, link))
        listed = b.get("meters", [])
        if isinstance(listed, dict):
            try:
                first, last = int(listed["from"]), int(listed["to"])
            except (KeyError, ValueError):
                raise ConfigError(f"{where}.meters: give {{ from = N, to = M }} or a list of addresses") from None
            addresses = [f"{n:012d}" for n in range(first, last + 1)]
        else:
            addresses = [_address(a, f"{where}.meters") for a in listed]
        profile = str(b.get("profile", "sgcc-2013"))
        if profile not in PROFILES:
            raise ConfigError(f"{where}.profile: unknown profile {profile!r}")
        for a in addresses:
            if a in meters:
                raise ConfigError(f"{where}: meter {a} is on two buses")
            meters[a] = MeterEntry(a, name, profile=PROFILES[profile])
    for i, m in enumerate(_tables(doc, "meter")):
        where = f"[[meter]] {i + 1}"
        _keys(
            m,
            {"address", "bus", "mode", "wallet", "power_hold", "residential", "profile", "customer", "meter_number"},
            where,
        )
        a = _address(m.get("address"), f"{where}.address")
        entry = meters.get(a)
        if "bus" in m and not any(b.name == m["bus"] for b in buses):
            raise ConfigError(f"{where}.bus: no bus named {m['bus']!r}")
        if entry is None:
            if "bus" not in m:
                raise ConfigError(f'{where}: meter {a} is on no bus (add bus = "name")')
            entry = meters[a] = MeterEntry(a, str(m["bus"]))
        elif "bus" in m and m["bus"] != entry.bus:
            raise ConfigError(f"{where}.bus: meter {a} is on bus {entry.bus!r} already (its [[bus]] meters)")
        mode = str(m.get("mode", entry.mode))
        if mode not in ("local", "remote"):
            raise ConfigError(f"{where}.mode: local or remote")
        entry.mode = mode
        wallet = str(m.get("wallet", entry.wallet))
        if wallet not in ("money", "energy"):
            raise ConfigError(f"{where}.wallet: money or energy")
        if wallet != "money" and mode == "remote":
            raise ConfigError(f"{where}.wallet: a remote cost-control meter keeps no wallet (the ledger is its wallet)")
        entry.wallet = wallet
        entry.power_hold = _bool(m, "power_hold", entry.power_hold, where)
        entry.residential = _bool(m, "residential", entry.residential, where)
        if "profile" in m:
            if m["profile"] not in PROFILES:
                raise ConfigError(f"{where}.profile: unknown profile {m['profile']!r}")
            entry.profile = PROFILES[m["profile"]]
        entry.customer = m.get("customer", entry.customer)
        entry.meter_number = m.get("meter_number", entry.meter_number)
    groups = {}
    for k, v in _table(doc, "groups").items():
        if not isinstance(v, list):
            raise ConfigError(f"[groups].{k}: give a list of meter addresses")
        groups[str(k)] = [_address(a, f"[groups].{k}") for a in v]
    return GatewayConfig(
        buses=buses,
        meters=meters,
        sqlite=None if "postgres" in store else str(store.get("sqlite", "meterlink.sqlite")),
        postgres=store.get("postgres"),
        schema=store.get("schema"),
        api_listen=_host_port(api["listen"], "[api].listen") if "listen" in api else ("127.0.0.1", 8080),
        api_keys=keys,
        read_requires_key=_bool(api, "read_requires_key", False, "[api]"),
        mqtt_url=mqtt.get("url"),
        mqtt_actors=tuple(actors) if actors is not None else None,
        policy=policy,
        service=service,
        groups=groups,
        billing_prices=billing_prices,
        billing_at=_time(bill.get("run_at", "00:30"), "[billing].run_at"),
        poll=poll,
    )


def _poll(section: dict[str, Any]) -> PollConfig:
    """The ``[poll]`` section: interval (0 = off), retries per read, polls before a meter counts as silent."""
    _keys(section, {"interval_s", "retries", "silent_after", "yield_s"}, "[poll]")
    default = PollConfig()
    silent_after = _number(section, "silent_after", default.silent_after, "[poll]", int)
    if silent_after < 1:
        raise ConfigError("[poll].silent_after: at least 1 (polls without an answer before meter_silent)")
    return PollConfig(
        interval_s=_number(section, "interval_s", default.interval_s, "[poll]"),
        retries=_number(section, "retries", default.retries, "[poll]", int),
        silent_after=silent_after,
        yield_s=_number(section, "yield_s", default.yield_s, "[poll]"),
    )


def load(path: str | Path) -> GatewayConfig:
    """The configuration in a TOML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return build(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{path}: {exc}") from None
