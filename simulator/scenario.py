"""Fleet scenarios: a TOML file, or the CLI's ``--meters N --buses B`` for the simple case.

```toml
[fleet]
seed = 7
start = "2026-11-26T08:00:00+08:00"   # virtual start time (default: now)
speed = 60                            # simulated seconds per real second (0 = stepped by hand)

[defaults]                            # applied to every meter unless overridden
mode = "local"                        # or "remote"; a mix: mode_mix = { local = 0.8, remote = 0.2 }
balance = "100.00"                    # yuan; like purchase_count, for local meters only (remote
                                      # meters keep no wallet: giving one a balance is an error)
load = "residential"                  # residential, commercial, pv, constant (with watts = N)
profile = "sgcc-2013"                 # sgcc-2013, sgcc-iot, fw-b, dlt645-1997
limits = { alarm_1 = "20.00", alarm_2 = "10.00", overdraft = "0.00", hoarding = "0.00", close_allowed = "0.00" }

[[bus]]
name = "line-1"
meters = 32                           # addresses follow on from the previous bus
# addresses = ["000000000001", "000000000002"]
baud = 2400
timing = true                         # emulate wire time and Td
td_ms = [20, 500]                     # Td uniform in [min, max]; or td_ms = 50 (fixed), or
# td_ms = { distribution = "lognormal", median = 60, sigma = 0.6, min = 20, max = 500 }
#   (distribution "uniform" | "fixed" (with fixed = N, default min) | "lognormal", clipped to min..max)
faults = [{ kind = "no_reply", remaining = 2 }]   # line faults fire on the bus; meter faults
                                      # (relay_malfunction, clock_jump, rollover, lost_topup) apply
                                      # to every meter of the bus
tariff = { prices = ["0.6000", "0.5500", "0.5000", "0.3000"] }   # per-bus tariff (merged below)

[[meter]]                             # per-meter overrides
address = "000000000005"
balance = "3.00"
faults = [{ kind = "no_reply" }]
large_current_a = "40.00"             # 04001402: above it a trip waits for the current to fall,
large_current_delay_min = 30          # at most 04001403 minutes (internal relays; prepaid.md §1.5)

[meter.tariff]                        # tariffs (prepaid.md §1.3): in [defaults], [[bus]] or [[meter]];
                                      # merged key by key (defaults < bus < meter)
prices = ["0.8000", "0.6000", "0.5000", "0.3000"]  # T1 sharp, T2 peak, T3 flat, T4 valley (yuan/kWh; 4..12)
tou = { zones = [[1, 1, 1]], day_tables = [[[0, 0, 4], [8, 0, 2], [22, 0, 4]]] }
                                      # zones [month, day, table]; day tables of [hour, minute, tariff]
backup_prices = ["0.9000", "0.7000", "0.6000", "0.4000"]  # also backup_steps, backup_tou
price_switch = "2026-12-01T00:00:00+08:00"   # backup becomes current (also tou_switch, step_switch)

[meter.tariff.steps]                  # up to 6 thresholds (kWh), 7 increments (yuan/kWh), 4 dates
thresholds = ["2880", "4800"]
increments = ["0", "0.05", "0.30"]
settlement_dates = [{ month = 1, day = 1, hour = 0 }]   # no month: monthly, on that day
```

``prices``/``steps``/``tou`` set both the current and the backup set; ``backup_*`` then replace
the backup set, which takes over at its switch time, as after a remote tariff update.
"""

from __future__ import annotations

import random
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from firmware_stubs.meter import CostMode
from firmware_stubs.tariff import PriceSet, StepTable, TariffError, TouSchedule
from firmware_stubs.wallet import Limits, WalletUnit
from protocols.dlt645 import BROADCAST, PROFILES, AddressError, normalize_address
from protocols.dlt645.formats import PartialTime

from .bus import TD_DISTRIBUTIONS, LineTiming
from .faults import Fault, FaultSpec
from .fleet import BusSpec, MeterSpec, TariffSpec
from .load_profiles import LoadKind


class ScenarioError(ValueError):
    """A scenario that cannot be built, with a message that says where."""


@dataclass
class Scenario:
    """Everything needed to start a fleet."""

    buses: list[BusSpec]
    seed: int = 0
    start: datetime | None = None
    speed: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def meter_count(self) -> int:
        return sum(len(b.meters) for b in self.buses)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ScenarioError(f"{where}: {value!r} is not a decimal amount")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ScenarioError(f"{where}: {value!r} is not a decimal amount") from None
    if not result.is_finite() or result != result.quantize(Decimal("0.01")):
        raise ScenarioError(f"{where}: {value!r} needs at most 2 decimals")
    return result


def _large_current_ma(value: Any, where: str) -> int:
    """04001402, the trip-current threshold, from amps (``XXX.XXX`` A on the wire) to mA."""
    amps = _decimal(value, where)
    if not 0 <= amps <= Decimal("999.99"):
        raise ScenarioError(f"{where}: {value!r} is outside 0..999.99 A")
    return int(amps.scaleb(3))


def _fen(value: Any, where: str) -> int:
    return int(_decimal(value, where).scaleb(2))


def _int(value: Any, where: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"{where}: {value!r} is not an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ScenarioError(f"{where}: {value} must be {bounds}")
    return value


def _float(value: Any, where: str, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScenarioError(f"{where}: {value!r} is not a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise ScenarioError(f"{where}: {value!r} is not a finite number")
    if low is not None and value < low:
        raise ScenarioError(f"{where}: {value!r} must be >= {low:g}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}: {value!r} is not true or false")
    return value


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a table, got {value!r}")
    return value


def _tables(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected an array of tables, got {value!r}")
    return [_table(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _known(raw: dict[str, Any], known: set[str] | frozenset[str], where: str, what: str = "setting") -> None:
    unknown = set(raw) - known
    if unknown:
        raise ScenarioError(
            f"{where}: unknown {what}(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
        )


def _address(value: Any, where: str) -> str:
    """A meter's 12-digit address (a short all-digit one is zero-padded)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    try:
        address = normalize_address(value)
    except AddressError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    if not address.isdigit() or address == BROADCAST:
        raise ScenarioError(f"{where}: {address} is not a meter address (wildcard or broadcast)")
    return address


def _limits(raw: Any, where: str) -> Limits:
    known = {"alarm_1", "alarm_2", "overdraft", "hoarding", "close_allowed"}
    _known(_table(raw, where), known, where, "limit")
    base = Limits()
    return Limits(**{k: _fen(raw.get(k, Decimal(getattr(base, k)).scaleb(-2)), f"{where}.{k}") for k in known})


_FAULT_KEYS = frozenset(
    {"kind", "remaining", "delay_ms", "gap_ms", "seconds", "probability", "function"}
    | {"headroom_hundredths", "registers"}  # rollover
)


def _faults(raw: Any, where: str) -> list[FaultSpec]:
    out = []
    for i, f in enumerate(_tables(raw, where)):
        here = f"{where}[{i}]"
        _known(f, _FAULT_KEYS, here)
        try:
            kind = Fault(f["kind"])
        except (KeyError, ValueError):
            raise ScenarioError(f"{here}: kind must be one of {', '.join(k.value for k in Fault)}") from None
        extra: dict[str, Any] = {}
        if "remaining" in f:
            extra["remaining"] = _int(f["remaining"], f"{here}.remaining", 1)
        for key in ("delay_ms", "gap_ms"):
            if key in f:
                extra[key] = _int(f[key], f"{here}.{key}", 0, 60_000)
        if "seconds" in f:
            extra["seconds"] = _int(f["seconds"], f"{here}.seconds")
        if "function" in f:  # link faults: only replies to this function code (as the admin interface's)
            extra["function"] = _int(f["function"], f"{here}.function", 0, 0x1F)
        if "headroom_hundredths" in f:
            extra["headroom_hundredths"] = _int(f["headroom_hundredths"], f"{here}.headroom_hundredths", 0)
        if "registers" in f:
            regs = f["registers"]
            if not isinstance(regs, list) or not all(isinstance(r, str) for r in regs):
                raise ScenarioError(f'{here}.registers: a list of names, e.g. ["forward", "reverse"]')
            extra["registers"] = tuple(regs)
        if "probability" in f:
            probability = _float(f["probability"], f"{here}.probability", 0.0)
            if probability > 1:
                raise ScenarioError(f"{here}.probability: {probability} must be in 0..1")
            extra["probability"] = probability
        try:
            out.append(FaultSpec(kind, **extra))
        except ValueError as exc:
            raise ScenarioError(f"{here}: {exc}") from None
    return out


_METER_KEYS = frozenset(
    {
        "mode",
        "balance",
        "load",
        "profile",
        "limits",
        "daily_kwh",
        "watts",
        "wallet",
        "purchase_count",
        "external_relay",
        "trip_delay_min",
        "large_current_a",
        "large_current_delay_min",
        "clock_offset_s",
        "drift_ppm",
        "factory_mode",
        "freezes",
        "faults",
        "customer",
        "address",
        "mode_mix",
        "tariff",
    }
)

_TARIFF_KEYS = frozenset(
    {
        "prices",
        "steps",
        "tou",
        "backup_prices",
        "backup_steps",
        "backup_tou",
        "tou_switch",
        "price_switch",
        "step_switch",
    }
)


def _tariff_decimal(value: Any, where: str) -> Decimal:
    """A price (yuan/kWh) or step threshold (kWh): a string or integer, exact (a TOML float via its text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ScenarioError(f"{where}: {value!r} is not a decimal number")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise ScenarioError(f"{where}: {value!r} is not a decimal number") from None
    if not result.is_finite():
        raise ScenarioError(f"{where}: {value!r} is not a decimal number")
    return result


def _prices(raw: Any, where: str) -> PriceSet:
    """T1..T4 (up to 12) prices in yuan/kWh, 4 decimals (040501FF, prepaid.md §1.3)."""
    if not isinstance(raw, list):
        raise ScenarioError(
            f"{where}: give a list of 4 to 12 prices in yuan/kWh (T1 sharp, T2 peak, T3 flat, T4 valley)"
        )
    try:
        return PriceSet.from_di([_tariff_decimal(v, f"{where}[{i}]") for i, v in enumerate(raw)])
    except TariffError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _settlement_date(raw: Any, where: str) -> PartialTime:
    _known(_table(raw, where), {"month", "day", "hour"}, where)
    month = raw.get("month")
    return PartialTime(
        99 if month is None else _int(month, f"{where}.month", 1, 12),
        _int(raw.get("day", 1), f"{where}.day", 1, 28),
        _int(raw.get("hour", 0), f"{where}.hour", 0, 23),
    )


def _steps(raw: Any, where: str) -> StepTable:
    """A step table (040604FF): up to 6 thresholds in kWh, up to 7 increments in yuan/kWh, up to
    4 settlement dates ``{month, day, hour}`` (no month: monthly settlement)."""
    _known(_table(raw, where), {"thresholds", "increments", "settlement_dates"}, where)
    thresholds, increments, dates = (
        raw.get("thresholds", []),
        raw.get("increments", []),
        raw.get("settlement_dates", []),
    )
    for key, value, most in (
        ("thresholds", thresholds, 6),
        ("increments", increments, 7),
        ("settlement_dates", dates, 4),
    ):
        if not isinstance(value, list) or len(value) > most:
            raise ScenarioError(f"{where}.{key}: give a list of at most {most}")
    unset = PartialTime(99, 99, 99)
    record = {
        "thresholds": [_tariff_decimal(v, f"{where}.thresholds[{i}]") for i, v in enumerate(thresholds)]
        + [Decimal(0)] * (6 - len(thresholds)),
        "prices": [_tariff_decimal(v, f"{where}.increments[{i}]") for i, v in enumerate(increments)]
        + [Decimal(0)] * (7 - len(increments)),
        "settlement_dates": [_settlement_date(d, f"{where}.settlement_dates[{i}]") for i, d in enumerate(dates)]
        + [unset] * (4 - len(dates)),
    }
    if any(record["thresholds"]) and not dates:
        # Without a settlement date the meter never settles its step energy (prepaid.md §1.3):
        # the increments would never be charged. Say so instead of silently doing nothing.
        raise ScenarioError(f"{where}: thresholds need settlement_dates (e.g. [{{month = 1, day = 1, hour = 0}}])")
    try:
        return StepTable.from_di(record)
    except TariffError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _tou(raw: Any, where: str) -> TouSchedule:
    """A TOU schedule: ``zones = [[month, day, table], ...]``, ``day_tables = [[[hour, minute, tariff], ...], ...]``."""
    _known(_table(raw, where), {"zones", "day_tables"}, where)
    zones, tables = raw.get("zones", [[1, 1, 1]]), raw.get("day_tables")
    if tables is None:
        raise ScenarioError(f"{where}: needs day_tables")
    try:
        return TouSchedule(
            zones=tuple(tuple(z) for z in zones), day_tables=tuple(tuple(tuple(p) for p in t) for t in tables)
        )
    except (TariffError, TypeError) as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _when(raw: Any, where: str) -> datetime:
    if isinstance(raw, str):
        try:
            raw = datetime.fromisoformat(raw)
        except ValueError:
            raise ScenarioError(f"{where}: {raw!r} is not ISO 8601") from None
    if not isinstance(raw, datetime) or raw.tzinfo is None:
        raise ScenarioError(f"{where}: give a date and time with a zone (e.g. 2026-12-01T00:00:00+08:00)")
    return raw


def _tariff(raw: Any, where: str) -> TariffSpec | None:
    """The ``tariff`` table of a meter, a bus or the defaults (prepaid.md §1.3)."""
    _known(_table(raw, where), _TARIFF_KEYS, where)
    if not raw:
        return None
    out: dict[str, Any] = {}
    for key in ("prices", "backup_prices"):
        if key in raw:
            out[key] = _prices(raw[key], f"{where}.{key}")
    for key in ("steps", "backup_steps"):
        if key in raw:
            out[key] = _steps(raw[key], f"{where}.{key}")
    for key in ("tou", "backup_tou"):
        if key in raw:
            out[key] = _tou(raw[key], f"{where}.{key}")
    for key in ("tou_switch", "price_switch", "step_switch"):
        if key in raw:
            out[key] = _when(raw[key], f"{where}.{key}")
    return TariffSpec(**out)


def _mode_mix(raw: Any, where: str) -> tuple[float, float]:
    _known(_table(raw, where), {"local", "remote"}, where, "mode")
    local = _float(raw.get("local", 0.0), f"{where}.local", 0.0)
    remote = _float(raw.get("remote", 0.0), f"{where}.remote", 0.0)
    if local + remote <= 0:
        raise ScenarioError(f"{where}: give local and/or remote shares above 0")
    return local, remote


_WALLET_KEYS = ("balance", "purchase_count")
"""Settings of the meter's own wallet: local cost control only (prepaid.md §1.1)."""


def _meter(
    address: str,
    settings: dict[str, Any],
    rng: random.Random,
    where: str,
    explicit_mode: bool = False,
    wallet_given: dict[str, str] | None = None,
) -> MeterSpec:
    """One meter's spec. ``wallet_given``: the wallet keys (balance, purchase_count) given for
    this very meter, each with where it was given; a meter that is certainly remote (not drawn
    from a mode mix) refuses them."""
    _known(settings, _METER_KEYS, where)
    mode = settings.get("mode", "local")
    mix = settings.get("mode_mix")
    drawn = mix is not None and not explicit_mode
    if drawn:
        local, remote = _mode_mix(mix, f"{where}.mode_mix")
        mode = "local" if rng.random() * (local + remote) < local else "remote"
    try:
        cost_mode = CostMode(mode)
    except ValueError:
        raise ScenarioError(f"{where}.mode: {mode!r} is not one of {', '.join(m.value for m in CostMode)}") from None
    if cost_mode is CostMode.REMOTE and not drawn and wallet_given:
        # Remote cost control keeps no wallet (prepaid.md §1.1, dlt645.md §5.6): the meter would
        # ignore it (firmware_stubs/meter.py). In a mode mix the wallet is the local meters'.
        key, given_at = next(iter(wallet_given.items()))
        raise ScenarioError(
            f"{given_at}.{key}: meter {address} is a remote cost-control meter, which keeps no wallet "
            f"(the master station holds its balance and purchase count, prepaid.md §1.1): "
            f"remove {key} or make the meter local"
        )
    wallet = settings.get("wallet", "money")
    try:
        unit = WalletUnit(wallet)
    except ValueError:
        raise ScenarioError(
            f"{where}.wallet: {wallet!r} is not one of {', '.join(u.value for u in WalletUnit)}"
        ) from None
    profile = settings.get("profile", "sgcc-2013")
    if profile not in PROFILES:
        raise ScenarioError(f"{where}.profile: {profile!r} is not one of {', '.join(PROFILES)}")
    load = settings.get("load", "residential")
    if load not in {k.value for k in LoadKind}:
        raise ScenarioError(f"{where}.load: {load!r} is not one of {', '.join(k.value for k in LoadKind)}")
    customer = settings.get("customer")
    if customer is not None and not (isinstance(customer, str) and len(customer) == 12 and customer.isdigit()):
        raise ScenarioError(f"{where}.customer: {customer!r} is not a 12-digit customer number")
    daily_kwh = settings.get("daily_kwh")
    watts = settings.get("watts")
    return MeterSpec(
        address=address,
        mode=cost_mode,
        balance=_decimal(settings.get("balance", "100.00"), f"{where}.balance"),
        customer=customer,
        profile=profile,
        load=load,
        daily_kwh=None if daily_kwh is None else _float(daily_kwh, f"{where}.daily_kwh", 0.0),
        watts=None if watts is None else _int(watts, f"{where}.watts", -1_000_000, 1_000_000),
        wallet_unit=unit,
        limits=_limits(settings.get("limits", {}), f"{where}.limits"),
        # A remote meter keeps no wallet (prepaid.md §1.1): count 0 (one given for it is refused above,
        # one from a mode mix's defaults is the local meters').
        purchase_count=_int(
            settings.get("purchase_count", 1 if cost_mode is CostMode.LOCAL else 0),
            f"{where}.purchase_count",
            0,
            0xFFFFFFFF,
        ),
        external_relay=_bool(settings.get("external_relay", False), f"{where}.external_relay"),
        trip_delay_min=_int(settings.get("trip_delay_min", 0), f"{where}.trip_delay_min", 0, 9999),
        # 04001402 (A, 3 decimals) and 04001403 (min): large-current protection (prepaid.md §1.5)
        large_current_ma=_large_current_ma(settings.get("large_current_a", "0"), f"{where}.large_current_a"),
        large_current_delay_min=_int(
            settings.get("large_current_delay_min", 0), f"{where}.large_current_delay_min", 0, 9999
        ),
        clock_offset_s=_float(settings.get("clock_offset_s", 0.0), f"{where}.clock_offset_s"),
        drift_ppm=_float(settings.get("drift_ppm", 0.0), f"{where}.drift_ppm"),
        factory_mode=_bool(settings.get("factory_mode", False), f"{where}.factory_mode"),
        freezes=_bool(settings.get("freezes", True), f"{where}.freezes"),
        faults=_faults(settings.get("faults", []), f"{where}.faults"),
        tariff=_tariff(settings.get("tariff", {}), f"{where}.tariff"),
    )


_BAUDS = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


def _td(raw: Any, where: str) -> dict[str, Any]:
    """The turnaround Td: ``[min, max]`` (uniform), ``N`` (fixed), or a table
    ``{distribution = "uniform"|"fixed"|"lognormal", min, max, fixed, median, sigma}``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 0:
            raise ScenarioError(f"{where}: {raw} must be >= 0")
        return {"td_min_ms": raw, "td_max_ms": raw, "td_distribution": "fixed", "td_fixed_ms": raw}
    if isinstance(raw, list):
        if len(raw) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
            raise ScenarioError(f"{where}: give [min, max] in whole milliseconds")
        if not 0 <= raw[0] <= raw[1]:
            raise ScenarioError(f"{where}: need 0 <= min <= max")
        return {"td_min_ms": raw[0], "td_max_ms": raw[1]}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: give [min, max], a fixed number of milliseconds, or a table")
    _known(raw, {"distribution", "min", "max", "fixed", "median", "sigma"}, where)
    dist = raw.get("distribution", "uniform")
    if dist not in TD_DISTRIBUTIONS:
        raise ScenarioError(f"{where}.distribution: {dist!r} is not one of {', '.join(TD_DISTRIBUTIONS)}")
    out: dict[str, Any] = {"td_distribution": dist}
    out["td_min_ms"] = _float(raw.get("min", 20), f"{where}.min", 0.0)
    out["td_max_ms"] = _float(raw.get("max", 500), f"{where}.max", 0.0)
    if out["td_min_ms"] > out["td_max_ms"]:
        raise ScenarioError(f"{where}: need min <= max")
    if "fixed" in raw:
        out["td_fixed_ms"] = _float(raw["fixed"], f"{where}.fixed", 0.0)
        if not out["td_min_ms"] <= out["td_fixed_ms"] <= out["td_max_ms"]:
            raise ScenarioError(f"{where}.fixed: {out['td_fixed_ms']} is outside min..max (it would be clipped)")
    if "median" in raw:
        out["td_median_ms"] = _float(raw["median"], f"{where}.median", 0.0)
        if out["td_median_ms"] <= 0:
            raise ScenarioError(f"{where}.median: must be > 0")
    if "sigma" in raw:
        out["td_sigma"] = _float(raw["sigma"], f"{where}.sigma", 0.0)
    return out


def _timing(raw: dict[str, Any], where: str, timing: bool | None) -> LineTiming:
    td = _td(raw.get("td_ms", [20, 500]), f"{where}.td_ms")
    baud = _int(raw.get("baud", 2400), f"{where}.baud")
    if baud not in _BAUDS:
        raise ScenarioError(f"{where}.baud: {baud} is not one of {', '.join(map(str, _BAUDS))}")
    enabled = _bool(raw.get("timing", True), f"{where}.timing") if timing is None else timing
    return LineTiming(baud=baud, enabled=enabled, **td)


def address_of(n: int) -> str:
    """The n-th simulated address: ``000000000001`` ... (issue #3: --meters N)."""
    if not 1 <= n <= 999_999_999_999:
        raise ScenarioError(f"meter number {n} has no 12-digit address")
    return f"{n:012d}"


_SECTIONS = frozenset({"fleet", "defaults", "bus", "meter"})
_FLEET_KEYS = frozenset({"seed", "start", "speed"})
_BUS_KEYS = frozenset({"name", "meters", "addresses", "baud", "timing", "td_ms", "faults", "tariff"})


def build(doc: dict[str, Any], *, timing: bool | None = None) -> Scenario:
    """A scenario from a parsed TOML document.

    ``timing`` (the CLI's ``--timing/--no-timing``) overrides every bus's ``timing`` when given.
    Every mistake raises :class:`ScenarioError` naming where it is (``fleet.start``,
    ``bus[1].baud``, ``meter[0]``, ``meter 000000000005.balance``, ...).
    """
    _known(doc, _SECTIONS, "scenario", "section")
    fleet = _table(doc.get("fleet", {}), "fleet")
    _known(fleet, _FLEET_KEYS, "fleet")
    seed = _int(fleet.get("seed", 0), "fleet.seed")
    rng = random.Random(seed)
    defaults = dict(_table(doc.get("defaults", {}), "defaults"))
    _known(defaults, _METER_KEYS - {"address"}, "defaults")
    overrides: dict[str, tuple[str, dict[str, Any]]] = {}
    for i, m in enumerate(_tables(doc.get("meter", []), "meter")):
        where = f"meter[{i}]"
        if "address" not in m:
            raise ScenarioError(f"{where}: needs an address")
        address = _address(m["address"], f"{where}.address")
        _known(m, _METER_KEYS, where)
        if address in overrides:
            raise ScenarioError(f"{where}: {address} is already overridden by {overrides[address][0]}")
        overrides[address] = (where, m)
    buses: list[BusSpec] = []
    on_bus: dict[str, str] = {}
    names: set[str] = set()
    next_number = 1
    raw_buses = _tables(doc["bus"], "bus") if "bus" in doc else [{"name": "bus0", "meters": 1}]
    if not raw_buses:
        raise ScenarioError("bus: give at least one [[bus]]")
    for b_index, b in enumerate(raw_buses):
        where = f"bus[{b_index}]"
        _known(b, _BUS_KEYS, where)
        name = b.get("name", f"bus{b_index}")
        if not isinstance(name, str) or not name or "/" in name or "+" in name or "#" in name:
            raise ScenarioError(f"{where}.name: {name!r} must be a non-empty name without / + #")
        if name in names:
            raise ScenarioError(f"{where}.name: bus {name!r} is defined twice")
        names.add(name)
        if "addresses" in b:
            if "meters" in b:
                raise ScenarioError(f"{where}: give meters or addresses, not both")
            raw_addresses = b["addresses"]
            if not isinstance(raw_addresses, list):
                raise ScenarioError(f"{where}.addresses: expected a list of addresses")
            addresses = [_address(a, f"{where}.addresses[{k}]") for k, a in enumerate(raw_addresses)]
        else:
            count = _int(b.get("meters", 0), f"{where}.meters", 0)
            addresses = [address_of(n) for n in range(next_number, next_number + count)]
            next_number += count
        specs = []
        for address in addresses:
            if address in on_bus:
                raise ScenarioError(f"{where}: meter {address} is already on bus {on_bus[address]}")
            on_bus[address] = name
            own = overrides.get(address, ("", {}))[1]
            settings = {**defaults, **own}
            # Tariff tables merge key by key: defaults, then the bus, then the meter.
            tariff = {
                **_table(defaults.get("tariff", {}), "defaults.tariff"),
                **_table(b.get("tariff", {}), f"{where}.tariff"),
                **_table(own.get("tariff", {}), f"meter {address}.tariff"),
            }
            if tariff:
                settings["tariff"] = tariff
            # The wallet keys given for this meter: its own, or the defaults' when they make every
            # meter remote (mode = "remote", no mix) and the meter does not choose its mode.
            wallet_given = {k: f"meter {address}" for k in _WALLET_KEYS if k in own}
            if defaults.get("mode") == "remote" and "mode" not in own:
                wallet_given.update({k: "defaults" for k in _WALLET_KEYS if k in defaults and k not in own})
            specs.append(
                _meter(
                    address, settings, rng, f"meter {address}", explicit_mode="mode" in own, wallet_given=wallet_given
                )
            )
        buses.append(BusSpec(name, specs, _timing(b, where, timing), _faults(b.get("faults", []), f"{where}.faults")))
    for address, (where, _m) in overrides.items():
        if address not in on_bus:
            raise ScenarioError(f"{where}: meter {address} is on no bus")
    start = fleet.get("start")
    if isinstance(start, str):
        try:
            start = datetime.fromisoformat(start)
        except ValueError:
            raise ScenarioError(f"fleet.start: {start!r} is not ISO 8601") from None
    if start is not None and not isinstance(start, datetime):
        raise ScenarioError(f"fleet.start: {start!r} is not a date and time")
    if start is not None and start.tzinfo is None:
        raise ScenarioError("fleet.start needs a timezone (e.g. +08:00)")
    speed = _float(fleet.get("speed", 1.0), "fleet.speed", 0.0)
    return Scenario(buses, seed, start, speed)


def load(path: str | Path, *, timing: bool | None = None) -> Scenario:
    """A scenario from a TOML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return build(doc, timing=timing)


def fault_table(text: str) -> dict[str, Any]:
    """The CLI's ``--fault KIND[:key=value,...]`` as a scenario fault table (``{kind = KIND, key = value}``).

    A value is read as a TOML value (``3``, ``0.2``, ``0x03``, ``true``), else as a string;
    ``registers=forward+reverse`` is the list ``["forward", "reverse"]``. Only the syntax is
    checked here: :func:`from_flags` validates the tables as scenario faults.
    """
    kind, _, rest = text.partition(":")
    table: dict[str, Any] = {"kind": kind.strip()}
    for item in rest.split(",") if rest.strip() else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key:
            raise ScenarioError(f"fault {text!r}: give KIND[:key=value,...], e.g. no_reply:remaining=3")
        if key == "kind" or key in table:
            raise ScenarioError(f"fault {text!r}: {key} is given {'before the colon' if key == 'kind' else 'twice'}")
        if key == "registers":
            table[key] = [r.strip() for r in value.split("+")]
            continue
        try:
            table[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            table[key] = value
    return table


_LAST_ADDRESS = int(BROADCAST) - 1
"""The highest meter address (999999999999 is the broadcast address)."""


def from_flags(
    meters: int,
    buses: int = 1,
    *,
    seed: int = 0,
    timing: bool = True,
    baud: int = 2400,
    mode: str = "local",
    balance: str = "100.00",
    load_kind: str = "residential",
    start: datetime | None = None,
    speed: float = 1.0,
    first_address: str = "000000000001",
    tariff: dict[str, Any] | None = None,
    faults: list[dict[str, Any]] | None = None,
) -> Scenario:
    """The simple case: N meters (``first_address`` on, by default ``000000000001`` to N) spread over B buses.

    ``mode``: ``"local"``, ``"remote"`` or the share of remote meters (``"0.3"``: 30 %, seeded).
    ``balance`` is the local meters' (remote cost-control meters keep no wallet, prepaid.md §1.1).
    ``tariff`` is a scenario ``tariff`` table (``{"prices": ["0.5000", ...]}``) and ``faults`` a
    list of scenario fault tables (:func:`fault_table`), both given to every meter as in
    ``[defaults]``: each meter has its own copy of a fault (``remaining`` counts per meter). They
    are validated exactly as in a scenario file, and errors name them ``tariff.prices[0]``,
    ``faults[1].probability``, ``first_address``.
    """
    if meters < 1 or buses < 1:
        raise ScenarioError("need at least one meter and one bus")
    if buses > meters:
        raise ScenarioError("more buses than meters")
    first = int(_address(first_address, "first_address"))
    if first + meters - 1 > _LAST_ADDRESS:
        raise ScenarioError(
            f"first_address: {meters} meters from {first:012d} would end at {first + meters - 1:012d}, "
            f"past {_LAST_ADDRESS:012d} (the last meter address; {BROADCAST} is the broadcast address)"
        )
    per, extra = divmod(meters, buses)
    defaults: dict[str, Any] = {"load": load_kind}
    if tariff:
        _tariff(tariff, "tariff")
        defaults["tariff"] = tariff
    if faults:
        _faults(faults, "faults")
        defaults["faults"] = faults
    if mode != "remote":
        defaults["balance"] = balance  # the local meters' (in a mix too)
    if mode in ("local", "remote"):
        defaults["mode"] = mode
    else:  # a mix: the share of remote cost-control meters, 0..1 (seeded)
        try:
            share = float(mode)
        except ValueError:
            raise ScenarioError(f"mode: {mode!r} is not local, remote or a remote share 0..1") from None
        if not 0 <= share <= 1:
            raise ScenarioError(f"mode: a remote share must be in 0..1, not {mode}")
        defaults["mode_mix"] = {"local": 1 - share, "remote": share}
    doc: dict[str, Any] = {
        "fleet": {"seed": seed, "speed": speed},
        "defaults": defaults,
        "bus": [{"name": f"bus{k}", "baud": baud, "timing": timing} for k in range(buses)],
    }
    number = first
    for k, bus in enumerate(doc["bus"]):  # the addresses follow on from bus to bus
        count = per + (1 if k < extra else 0)
        bus["addresses"] = [address_of(n) for n in range(number, number + count)]
        number += count
    scenario = build(doc)
    scenario.start = start or datetime.now(UTC).replace(microsecond=0)
    return scenario
