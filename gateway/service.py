"""The command service: turns ledger commands into meter transactions, exactly once.

Each command is claimed with a lease on its meter (one command per meter at a time), the
safety policy is checked before every send and every retry, every state change goes to the
ledger before the next step, and every command ends verified by reading the meter back.

Top-ups (local cost control) are exactly-once by construction (dlt645.md §5.3, §10.1): the
purchase count N = meter's count + 1 is recorded as ``sent`` *before* the recharge frame
leaves; after a crash or a lost reply the meter's count says what happened (N: applied;
N - 1: not yet, resend N, which the meter would answer "duplicate" if it had it; anything
else: ``unknown``, for a person). Remote cost control keeps the wallet in the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from protocols.dlt645 import (
    DI_2007,
    METER_TZ,
    MeterProfile,
    RelayCommand,
    RelayExecution,
    SecurityFlags,
    normalize_address,
)
from protocols.dlt645.errors import Dlt645Error
from protocols.dlt645.profile import SGCC_2013
from protocols.esam import MasterStation

from .client import FRAME_TAP, MeterClient
from .errors import GatewayError, LinkDown, MeterRefused, NoReply, ReplyMismatch, WrongMeter
from .ledger import Command, Kind, LeaseLost, NewCommand, State, Store
from .link import Link, Priority
from .policy import TRIP_ACTIONS, CustomerFacts, Policy

log = logging.getLogger(__name__)

RELAY_ACTIONS = {c.name.lower().replace("_", "-"): c for c in RelayCommand}
CLOSE_ACTIONS = frozenset({"direct-close", "close-allowed"})
CURRENT_SET_POLLS = 5
"""Reads (a second apart) waiting for a tariff switched in at once to show in the current set."""
DEFAULT_VALIDITY = timedelta(minutes=30)
"""Interactive commands may execute for 30 minutes, then never (prepaid.md §5.3 [A])."""
SWITCH_FIELDS = ("switch_at", "steps_switch_at", "tou_switch_at")
MAX_RELAY_VALIDITY = timedelta(hours=24)
"""The longest validity a relay command may ask for (prepaid.md §5.3 [A], the batch SLA)."""
BATCH_VALIDITY = timedelta(hours=24)
"""Relay commands of a batch may execute for 24 hours (prepaid.md §5.3 [A]: the queue SLA of a
rate-limited batch is longer than an interactive command's)."""
TOU_MAX_ZONES = 14
"""Yearly time zones a meter holds (prepaid.md §1.3: newer firmware allows 14)."""
TOU_MAX_DAY_TABLES = 8
"""Day tables per set (prepaid.md §1.3; DIs 0402 00 01..08)."""
TOU_MAX_PERIODS = 14
"""Periods (switch points) per day table (the 14 hhmmNN entries of a day-table DI)."""
TOU_TARIFFS = 4
"""Tariffs a day table may use: T1..T4, sharp/peak/flat/valley (prepaid.md §1.3)."""
TOU_MIN_PERIOD_MINUTES = 15
"""Shortest period, the wrap-round one over midnight included (prepaid.md §1.3)."""
TOU_BACKUP_ZONES, TOU_CURRENT_ZONES = 0x04020000, 0x04010000
"""Time-zone tables of the second (backup, written) and first (running) set; + n = day table n
(di_2007.toml: the SGCC convention, not in dlt645.md)."""
TOU_SWITCH_DIS = (0x04000106, 0x04000107)
"""Time-zone and day-table switch times (dlt645.md §3.4): both are written, with one time."""
PARAM_DIS = {
    "alarm_1": 0x04001001,
    "alarm_2": 0x04001002,
    "overdraft": 0x04001003,
    "hoarding": 0x04001004,
    "close_allowed": 0x04001005,
}


class InvalidCommand(GatewayError, ValueError):
    """A command that cannot be accepted as submitted (the API answers 4xx; nothing is recorded)."""


@dataclass
class MeterEntry:
    """A meter the gateway manages."""

    address: str
    bus: str
    mode: str = "local"
    profile: MeterProfile = SGCC_2013
    customer: str | None = None
    power_hold: bool = False
    residential: bool = True
    meter_number: str | None = None
    wallet: str = "money"

    @property
    def customer_number(self) -> str:
        return self.customer or self.address


@dataclass
class ServiceConfig:
    """Execution policy of the service."""

    lease: timedelta = timedelta(seconds=60)
    retry_delay: timedelta = timedelta(seconds=5)
    max_attempts: int = 5
    concurrency: int = 64
    rate_per_s: float = 0.0
    """Commands started per second at most (0 = unlimited); batches use it to spare the lines."""
    poll_s: float = 0.05
    operator: str = "00000001"


def _fen(value: Any, what: str) -> int:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise InvalidCommand(f"{what} {value!r} is not a decimal amount") from None
    if not amount.is_finite() or abs(amount) >= 10**12 or amount != amount.quantize(Decimal("0.01")):
        raise InvalidCommand(f"{what} {value!r} must be an amount below 10^12 with at most 2 decimals")
    return int(amount.scaleb(2))


def _untimely(
    kind: Kind, clean: dict[str, Any], valid_until: datetime | None, not_before: datetime | None, now: datetime
) -> str | None:
    """Why a new command's times are not acceptable now, or None."""
    if valid_until is not None and valid_until <= now:
        return "valid_until is in the past"
    if kind is Kind.TARIFF:
        past = [f for f in SWITCH_FIELDS if clean.get(f) and datetime.fromisoformat(clean[f]) < now]
        if past:
            return f'{past[0]} is in the past: the meter would switch at once; send set "current" for that'
    latest = max(now, not_before or now) + MAX_RELAY_VALIDITY
    if kind is Kind.RELAY and valid_until is not None and valid_until > latest:
        # A trip that may still run days from now is what validity ends exist to prevent
        # (prepaid.md §5.3: 30 min interactive, 24 h for a batch).
        hours = MAX_RELAY_VALIDITY.total_seconds() / 3600
        return f"a relay command may be valid for at most {hours:g} hours (from not_before, or from now)"
    return None


def _topup_amount(command: Command) -> int:
    """A top-up's amount in the wallet's unit: fen, or 0.01 kWh for an energy wallet."""
    params = command.params
    return int(params["energy_hundredths"] if "energy_hundredths" in params else params["amount_fen"])


def _balance_di(command: Command) -> int:
    """Where the meter shows what a top-up adds to: remaining money 00900200, or energy 00900100."""
    return 0x00900100 if "energy_hundredths" in command.params else 0x00900200


def _flag(params: dict[str, Any], name: str) -> bool:
    """A JSON boolean (MQTT passes params through as they are: "false" must not read as true)."""
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InvalidCommand(f"{name} must be true or false, not {value!r}")
    return value


def _known(params: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = set(params) - allowed
    if unknown:
        raise InvalidCommand(
            f"unknown {kind} field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed)) or 'none'}"
        )


def _encodable(di: int, value: Any, what: str) -> None:
    """Refuse a value the meter's format cannot carry, before anything is recorded."""
    try:
        DI_2007.lookup(di).encode(value)
    except Dlt645Error as exc:
        raise InvalidCommand(f"{what}: {exc}") from None


def _price(value: Any) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise InvalidCommand(f"price {value!r} is not a decimal") from None
    if not price.is_finite() or price < 0 or price >= 10000 or price != price.quantize(Decimal("0.0001")):
        raise InvalidCommand(f"price {value!r} must be 0..9999.9999 yuan/kWh with at most 4 decimals")
    return price


def _switch_time(value: Any, what: str) -> str | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(str(value))
    except ValueError:
        raise InvalidCommand(f"{what} {value!r} is not ISO 8601") from None
    if when.tzinfo is None:
        raise InvalidCommand(f"{what} needs a time zone")
    return when.astimezone(METER_TZ).replace(second=0, microsecond=0).isoformat()


def _steps(raw: Any) -> dict[str, Any]:
    """A step (ladder) table: 6 thresholds (kWh), 7 increments (yuan/kWh), 4 settlement dates.

    Settlement dates are ``{"month": M, "day": D, "hour": H}`` (99 = unset): a full date makes
    annual steps, month 99 with a day makes monthly steps (prepaid.md §1.3).
    """
    if not isinstance(raw, dict) or set(raw) - {"thresholds", "prices", "settlement_dates"}:
        raise InvalidCommand("steps needs thresholds (6), prices (7) and settlement_dates (4)")
    thresholds, prices, dates = raw.get("thresholds"), raw.get("prices"), raw.get("settlement_dates", [])
    if not isinstance(thresholds, list) or len(thresholds) != 6:
        raise InvalidCommand("steps.thresholds must be 6 energies in kWh (0 = unused)")
    if not isinstance(prices, list) or len(prices) != 7:
        raise InvalidCommand("steps.prices must be 7 step increments in yuan/kWh")
    kwh = [Decimal(_fen(t, "threshold")).scaleb(-2) for t in thresholds]
    used = [t for t in kwh if t]
    if used != sorted(used) or any(t for t in kwh[len(used) :]):
        raise InvalidCommand("steps.thresholds must not decrease, with unused (0) ones last")
    if not isinstance(dates, list) or len(dates) > 4:
        raise InvalidCommand("steps.settlement_dates: at most 4 entries")
    clean_dates = []
    for d in dates:
        try:
            month, day, hour = int(d["month"]), int(d["day"]), int(d["hour"])
        except (KeyError, TypeError, ValueError):
            raise InvalidCommand('a settlement date is {"month": M, "day": D, "hour": H}') from None
        if not (
            (1 <= month <= 12 or month == 99) and (1 <= day <= 28 or day == 99) and (0 <= hour <= 23 or hour == 99)
        ):
            raise InvalidCommand("settlement dates: month 1..12, day 1..28, hour 0..23, or 99 for unset")
        clean_dates.append({"month": month, "day": day, "hour": hour})
    while len(clean_dates) < 4:
        clean_dates.append({"month": 99, "day": 99, "hour": 99})
    return {
        "thresholds": [str(t) for t in kwh],
        "prices": [str(_price(x)) for x in prices],
        "settlement_dates": clean_dates,
    }


def _steps_value(steps: dict[str, Any]) -> dict[str, Any]:
    from protocols.dlt645.formats import PartialTime

    return {
        "thresholds": [Decimal(t) for t in steps["thresholds"]],
        "prices": [Decimal(p) for p in steps["prices"]],
        "settlement_dates": [PartialTime(d["month"], d["day"], d["hour"]) for d in steps["settlement_dates"]],
    }


def _steps_public(value: Any) -> dict[str, Any]:
    return {
        "thresholds": [str(t) for t in value["thresholds"]],
        "prices": [str(p) for p in value["prices"]],
        "settlement_dates": [{"month": d.month, "day": d.day, "hour": d.hour} for d in value["settlement_dates"]],
    }


def _tou_int(entry: dict[str, Any], name: str, lo: int, hi: int, where: str) -> int:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidCommand(f"{where}: {name} must be an integer {lo}..{hi}, not {value!r}")
    return value


def _tou_entries(raw: Any, names: tuple[str, str, str], most: int, what: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= most:
        raise InvalidCommand(f"{what} must be a list of 1..{most} entries")
    for i, entry in enumerate(raw, 1):
        if not isinstance(entry, dict) or set(entry) != set(names):
            raise InvalidCommand(f"{what}, entry {i}: give exactly {', '.join(names)}")
    return raw


def _tou(raw: Any) -> dict[str, Any]:
    """A time-of-use schedule: day tables of switch points and the yearly zones that name them.

    ``{"zones": [{"month", "day", "table"}, ...], "day_tables": [[{"hour", "minute", "tariff"},
    ...], ...]}``: 1..14 zones in ascending date order, each starting at 00:00 of its date and
    running day table ``table`` (1..number of day tables) until the next zone (the last one
    wraps round the new year); 1..8 day tables of 1..14 periods in ascending time order, each
    running tariff 1..4 until the next (the last wraps round midnight), at least 15 minutes long
    (prepaid.md §1.3). What the meter's time-zone (MMDDNN) and day-table (hhmmNN) DIs carry.
    """
    if not isinstance(raw, dict) or set(raw) != {"zones", "day_tables"}:
        raise InvalidCommand(
            'tou needs zones and day_tables: {"zones": [{"month": 1, "day": 1, "table": 1}, ...], '
            '"day_tables": [[{"hour": 0, "minute": 0, "tariff": 4}, ...], ...]}'
        )
    tables_raw = raw["day_tables"]
    if not isinstance(tables_raw, list) or not 1 <= len(tables_raw) <= TOU_MAX_DAY_TABLES:
        raise InvalidCommand(f"tou.day_tables must be a list of 1..{TOU_MAX_DAY_TABLES} day tables")
    tables = []
    for n, table_raw in enumerate(tables_raw, 1):
        what = f"tou day table {n}"
        periods = []
        for i, p in enumerate(_tou_entries(table_raw, ("hour", "minute", "tariff"), TOU_MAX_PERIODS, what), 1):
            where = f"{what}, period {i}"
            periods.append(
                {
                    "hour": _tou_int(p, "hour", 0, 23, where),
                    "minute": _tou_int(p, "minute", 0, 59, where),
                    "tariff": _tou_int(p, "tariff", 1, TOU_TARIFFS, where),
                }
            )
        starts = [p["hour"] * 60 + p["minute"] for p in periods]
        if starts != sorted(set(starts)):
            raise InvalidCommand(f"{what}: periods must be in ascending time order, each starting once")
        if len(starts) > 1:
            gaps = [b - a for a, b in zip(starts, [*starts[1:], starts[0] + 1440], strict=True)]
            for p, gap in zip(periods, gaps, strict=True):
                if gap < TOU_MIN_PERIOD_MINUTES:
                    raise InvalidCommand(
                        f"{what}: the period from {p['hour']:02d}:{p['minute']:02d} lasts {gap} min; "
                        f"the minimum is {TOU_MIN_PERIOD_MINUTES} min"
                    )
        tables.append(periods)
    zones = []
    for i, z in enumerate(_tou_entries(raw["zones"], ("month", "day", "table"), TOU_MAX_ZONES, "tou.zones"), 1):
        where = f"tou zone {i}"
        month, day = _tou_int(z, "month", 1, 12, where), _tou_int(z, "day", 1, 31, where)
        try:
            datetime(2000, month, day)  # a leap year: 29 February may start a zone
        except ValueError:
            raise InvalidCommand(f"{where}: {month:02d}-{day:02d} is not a date") from None
        table = _tou_int(z, "table", 1, len(tables), where)
        zones.append({"month": month, "day": day, "table": table})
    starts_md = [(z["month"], z["day"]) for z in zones]
    if starts_md != sorted(set(starts_md)):
        raise InvalidCommand("tou.zones must be in ascending date order, each date once")
    return {"zones": zones, "day_tables": tables}


class CommandService:
    """Accepts commands into the ledger and executes them on the meters' lines."""

    def __init__(
        self,
        store: Store,
        meters: dict[str, MeterEntry],
        links: dict[str, Link],
        *,
        policy: Policy | None = None,
        config: ServiceConfig | None = None,
        master: MasterStation | None = None,
        now: Callable[[], datetime] | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.meters = meters
        self.links = links
        self.policy = policy or Policy()
        self.config = config or ServiceConfig()
        self.master = master or MasterStation()
        self.now = now or (lambda: datetime.now(UTC))
        self.owner = owner or f"gw-{uuid.uuid4().hex[:10]}"
        self._clients: dict[str, MeterClient] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[str] = set()
        self._stopping = False
        self._worker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.listeners: list[Callable[[Command, dict[str, Any]], Any]] = []
        """Called after every state change (the MQTT northbound publishes from here)."""
        self.zero_since: dict[str, datetime] = {}
        self.notice_sent: dict[str, datetime] = {}
        """When each customer's latest disconnection notice went out (the policy's notice rule)."""
        self.notices: dict[str, tuple[datetime, ...]] = {}
        """Each customer's recent notices, oldest first (the notice and its reminders)."""
        self.power_hold: dict[str, bool] = {}
        """Power hold as the latest confirmed power-hold command left it (besides the configuration)."""

    # --- submitting ---------------------------------------------------------------------------------------

    def meter(self, address: str) -> MeterEntry:
        try:
            addr = normalize_address(address)
        except Dlt645Error as exc:
            raise InvalidCommand(str(exc)) from None
        entry = self.meters.get(addr)
        if entry is None:
            raise InvalidCommand(f"meter {addr} is not managed by this gateway")
        return entry

    def validate(self, kind: Kind, entry: MeterEntry, params: dict[str, Any]) -> dict[str, Any]:
        """Normalised parameters, or :class:`InvalidCommand` (nothing is recorded)."""
        p = dict(params)
        if kind is Kind.TOPUP:
            _known(p, {"amount", "energy_kwh", "opening"}, "top-up")
            if entry.wallet == "energy" and entry.mode == "local":
                # Its wallet holds kWh and its 070102FF amount is in 0.01 kWh (prepaid.md §1.8; our
                # simulated ESAM's reading [A]): the request says kWh, never a yuan amount.
                if "amount" in p or "energy_kwh" not in p:
                    raise InvalidCommand(
                        f"meter {entry.address} has an energy wallet: give energy_kwh (kWh to add), not a yuan amount"
                    )
                energy = _fen(p.get("energy_kwh"), "energy_kwh")
                if not 1 <= energy <= 99_999_999:
                    raise InvalidCommand("energy_kwh must be 0.01 .. 999999.99 kWh")
                return {"energy_hundredths": energy, "opening": _flag(p, "opening")}
            if "energy_kwh" in p:
                raise InvalidCommand(f"meter {entry.address} has a money wallet: give amount (yuan), not energy_kwh")
            amount = _fen(p.get("amount"), "amount")
            if not 1 <= amount <= 99_999_999:
                raise InvalidCommand("amount must be 0.01 .. 999999.99 yuan")
            return {"amount_fen": amount, "opening": _flag(p, "opening")}
        if kind is Kind.RELAY:
            _known(p, {"action", "n2", "arrears", "restore_for"}, "relay")
            action = str(p.get("action", ""))
            if action not in RELAY_ACTIONS:
                raise InvalidCommand(f"relay action must be one of {', '.join(sorted(RELAY_ACTIONS))}")
            n2 = p.get("n2", 0)
            if isinstance(n2, bool) or not isinstance(n2, int) or not 0 <= n2 <= 255:
                raise InvalidCommand(f"n2 must be an integer 0..255, not {n2!r}")
            # arrears: True (a trip for arrears: grace period and notice rules), False (not for
            # arrears, e.g. safety or move-out: neither), absent (None: the grace period still
            # applies, prepaid.md §5.2 "grace period after zero"; the notice rule does not).
            arrears = None if p.get("arrears") is None else _flag(p, "arrears")
            out_relay: dict[str, Any] = {"action": action, "n2": n2, "arrears": arrears}
            if p.get("restore_for"):
                out_relay["restore_for"] = str(p["restore_for"])[:64]
            return out_relay
        if kind is Kind.TARIFF:
            unknown = set(p) - {"prices", "switch_at", "steps", "steps_switch_at", "tou", "tou_switch_at", "set"}
            if unknown:
                raise InvalidCommand(f"unknown tariff field(s) {', '.join(sorted(unknown))}")
            prices = p.get("prices")
            steps = p.get("steps")
            tou = p.get("tou")
            if prices is None and steps is None and tou is None:
                raise InvalidCommand("a tariff update needs prices, steps, a tou schedule, or some of them")
            target = p.get("set", "backup")
            if target not in ("backup", "current"):
                raise InvalidCommand('set must be "backup" (switch in at the switch time) or "current" (at once)')
            if target == "current" and (p.get("switch_at") or p.get("steps_switch_at") or p.get("tou_switch_at")):
                raise InvalidCommand('a switch time makes no sense with set "current": it applies at once')
            if p.get("tou_switch_at") is not None and tou is None:
                raise InvalidCommand("tou_switch_at is the switch time of a tou schedule, which is not given")
            out: dict[str, Any] = {"set": target}
            # switch_at is the switch time of every table given; steps_switch_at and tou_switch_at
            # give one table its own.
            common = p.get("switch_at")
            if prices is not None:
                if not isinstance(prices, list) or not 1 <= len(prices) <= 12:
                    raise InvalidCommand("prices must be a list of 1..12 prices (T1..Tn)")
                out["prices"] = [str(_price(x)) for x in prices]
                out["switch_at"] = _switch_time(p.get("switch_at"), "switch_at")
            if steps is not None:
                out["steps"] = _steps(steps)
                _encodable(0x040605FF, _steps_value(out["steps"]), "steps")
                out["steps_switch_at"] = _switch_time(p.get("steps_switch_at", common), "steps_switch_at")
            if tou is not None:
                out["tou"] = _tou(tou)
                out["tou_switch_at"] = _switch_time(p.get("tou_switch_at", common), "tou_switch_at")
            return out
        if kind is Kind.PARAMS:
            unknown = set(p) - set(PARAM_DIS)
            if unknown or not p:
                raise InvalidCommand(f"parameters must be some of {', '.join(PARAM_DIS)}")
            clean = {k: str(Decimal(_fen(v, k)).scaleb(-2)) for k, v in p.items()}
            for name, value in clean.items():
                _encodable(PARAM_DIS[name], Decimal(value), name)
            return clean
        if kind is Kind.TIME_SYNC:
            _known(p, set(), "time sync")
            return {}
        raise InvalidCommand(f"unknown command kind {kind}")

    async def submit(
        self,
        key: str | None,
        kind: Kind | str,
        address: str,
        params: dict[str, Any],
        actor: str,
        *,
        valid_until: datetime | None = None,
        batch: str | None = None,
        not_before: datetime | None = None,
    ) -> tuple[Command, bool]:
        """Record a command (or return the first one with this idempotency key).

        ``not_before`` defers it (it is not sent earlier); a relay command's default validity
        then counts from that time.
        """
        try:
            kind = Kind(kind)
        except ValueError:
            raise InvalidCommand(f"unknown command kind {kind!r}") from None
        entry = self.meter(address)
        clean = self.validate(kind, entry, params)
        if not actor or len(actor) > 100:
            raise InvalidCommand("actor (who asks) is required")
        if valid_until is not None and valid_until.tzinfo is None:
            raise InvalidCommand("valid_until needs a time zone")
        if not_before is not None and not_before.tzinfo is None:
            raise InvalidCommand("not_before needs a time zone")
        now = self.now()
        problem = _untimely(kind, clean, valid_until, not_before, now)
        if problem is not None:
            # Only a new command is refused: a re-sent one (e.g. an MQTT redelivery after its
            # validity, or its switch time, has passed) returns the first.
            first = await self.store.get_by_key(key) if key is not None else None
            if first is not None:
                return first, False
            raise InvalidCommand(problem)
        if key is None:
            key = await self._derived_key(kind, entry.address, clean, valid_until, not_before, now)
        if kind is Kind.RELAY and valid_until is None:
            validity = BATCH_VALIDITY if batch is not None else DEFAULT_VALIDITY
            valid_until = max(now, not_before or now) + validity
        if not 1 <= len(key) <= 200:
            raise InvalidCommand("the idempotency key must be 1..200 characters")
        command, created = await self.store.submit(
            NewCommand(key, kind, entry.address, clean, actor, valid_until, batch, not_before), now
        )
        if created:
            self._wake.set()
            self._notify(command, {"event": "accepted"})
        return command, created

    async def _derived_key(
        self,
        kind: Kind,
        address: str,
        clean: dict[str, Any],
        valid_until: datetime | None,
        not_before: datetime | None,
        now: datetime,
    ) -> str:
        """The idempotency key of a request that brings none: a repeat of the same request is the
        same command.

        A repeat is the same kind, meter and parameters on the same day (meter time, so a
        top-up repeated after a timeout applies once), with no other command of that kind for
        the meter in between (so trip, close, trip are three commands: the second trip is
        anchored to the close). The validity is not part of it: a client that says "valid for 5
        minutes" says a different end time each time it repeats the request, and a repeated
        top-up must never pay twice. A deliberate second identical command on the same day needs
        a key of its own.
        """
        del valid_until  # see above
        body = {"params": clean, "not_before": not_before.isoformat() if not_before else None}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
        prefix = f"auto:{kind.value}:{address}:{now.astimezone(METER_TZ).date().isoformat()}:{digest}:"
        anchor = "-"
        for other in await self.store.commands(address=address, kind=kind, limit=50):
            if not other.idempotency_key.startswith(prefix):
                anchor = other.id  # the latest other command of this kind
                break
        return prefix + anchor

    # --- running ----------------------------------------------------------------------------------------------

    async def start(self) -> CommandService:
        try:
            await self.reconcile_remote()
        except Exception:  # a ledger hiccup must not keep the service from starting; billing retries
            log.exception("reconciling remote wallets at start failed")
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="command service")
        return self

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until no command is open (tests and the demo)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if await self.store.open_commands() == 0 and not self._tasks:
                return
            self._wake.set()
            await asyncio.sleep(0.02)
        raise TimeoutError("commands still open")

    async def _run(self) -> None:
        cfg = self.config
        started: list[float] = []
        loop = asyncio.get_running_loop()
        while not self._stopping:
            free = cfg.concurrency - len(self._tasks)
            if free > 0:
                if cfg.rate_per_s > 0:
                    # At most rate × window starts in any window; the window is 1 s, or longer
                    # for a rate below 1/s (0.5/s: one start in any 2 s).
                    window = max(1.0, 1.0 / cfg.rate_per_s)
                    horizon = loop.time() - window
                    started = [t for t in started if t > horizon]
                    free = min(free, max(0, max(1, int(cfg.rate_per_s * window)) - len(started)))
                try:
                    claimed = await self.store.claim(self.owner, self.now(), cfg.lease, free) if free else []
                except Exception:  # a ledger error (connection lost, transaction aborted) must not end the loop
                    log.exception("claiming commands failed; trying again")
                    claimed = []
                for command in claimed:
                    if command.id in self._running:
                        continue  # still executing here; the claim only extended its lease
                    self._running.add(command.id)
                    started.append(loop.time())
                    task = asyncio.create_task(self._execute(command), name=f"command {command.id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if claimed:
                    continue
            self._wake.clear()
            # (not asyncio.wait_for: on 3.11 it can swallow a cancellation that races its timeout)
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=cfg.poll_s)
            finally:
                waiter.cancel()

    def client(self, entry: MeterEntry) -> MeterClient:
        c = self._clients.get(entry.address)
        if c is None:
            link = self.links.get(entry.bus)
            if link is None:
                raise GatewayError(f"meter {entry.address}: no line {entry.bus!r}")
            c = MeterClient(
                link,
                entry.address,
                entry.profile,
                self.master,
                self.config.operator,
                entry.meter_number,
                Priority.COMMAND,
                clock=self.now,
            )
            self._clients[entry.address] = c
        return c

    def _notify(self, command: Command, info: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(command, info)
            except Exception:
                log.exception("command listener failed")

    async def _move(self, command: Command, state: State, **kw: Any) -> Command:
        """Record a state change; its audit event carries every frame exchanged since the last one."""
        tap = FRAME_TAP.get()
        if tap:
            kw["frames"] = [f.hex() for f in tap]
            tap.clear()
        if state in (State.REFUSED, State.FAILED, State.UNKNOWN) and kw.get("result") is None:
            # Why it ended so, on the command itself (listings show it without the audit trail).
            detail = kw.get("detail") or {}
            why = {k: detail[k] for k in ("rule", "reason", "error") if detail.get(k) is not None}
            if why:
                kw["result"] = why
        moved = await self.store.transition(command, self.owner, state, self.now(), **kw)
        self._notify(moved, {"event": state.value, "detail": kw.get("detail", {})})
        return moved

    async def _execute(self, command: Command) -> None:
        FRAME_TAP.set([])  # this task's frames, for the audit trail (see _move)
        renewer = asyncio.create_task(self._keep_lease(command), name=f"lease {command.id}")
        try:
            await self._execute_guarded(command)
        except LeaseLost:
            log.warning("command %s: lease lost, another gateway owns it", command.id)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer
            self._running.discard(command.id)

    async def _keep_lease(self, command: Command) -> None:
        """Renew the lease while the command runs, so a slow command is not taken over.

        If renewing fails (the command has ended, or another gateway owns it now) it stops: the
        fencing of every write already keeps a stale owner from recording anything.
        """
        period = max(0.05, self.config.lease.total_seconds() / 3)
        while True:
            await asyncio.sleep(period)
            try:
                await self.store.renew(command, self.owner, self.now(), self.config.lease)
            except LeaseLost:
                return

    async def _execute_guarded(self, command: Command) -> None:
        entry = self.meters.get(command.address)
        try:
            if entry is None:
                await self._move(command, State.FAILED, detail={"error": "meter no longer managed"})
                return
            if self.policy.dry_run and command.kind is not Kind.RELAY and command.state is State.ACCEPTED:
                # Dry-run checks and records everything and sends nothing; relay commands go
                # through the rules first, so their refusal names the rule that would apply.
                await self._move(command, State.REFUSED, detail={"rule": "dry_run", "reason": "dry-run: not sent"})
                return
            if (
                command.kind is not Kind.RELAY  # relay commands check it with their policy (_relay)
                and command.valid_until is not None
                and self.now() >= command.valid_until
            ):
                await self._expired(command, entry)
                return
            handler = {
                Kind.TOPUP: self._topup,
                Kind.RELAY: self._relay,
                Kind.TARIFF: self._tariff,
                Kind.PARAMS: self._params,
                Kind.TIME_SYNC: self._time_sync,
            }[command.kind]
            await handler(command, entry)
            if command.kind is Kind.RELAY and command.params.get("arrears") and entry.mode == "remote":
                # However the arrears trip ended (tripped, unknown, or not sent because the customer
                # paid meanwhile), a wallet above zero must get its supply back now, not at the
                # next billing run.
                try:
                    await self.reconcile_remote(entry.address)
                except Exception:
                    log.exception("meter %s: reconciling the remote wallet after a trip failed", entry.address)
        except LeaseLost:
            raise
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.store.release(command, self.owner)
            raise
        except (NoReply, LinkDown, WrongMeter, ReplyMismatch) as exc:
            await self._retry_later(command, exc)
        except Exception as exc:
            log.exception("command %s failed unexpectedly", command.id)
            with contextlib.suppress(LeaseLost):
                final = State.UNKNOWN if command.state is State.SENT else State.FAILED
                await self._move(command, final, detail={"error": f"{type(exc).__name__}: {exc}"})

    async def _retry_later(self, command: Command, exc: Exception) -> None:
        current = await self.store.get(command.id) or command
        # A command that failed before it was sent has not counted this attempt yet.
        attempts = current.attempts if current.state is State.SENT else current.attempts + 1
        detail = {"error": f"{type(exc).__name__}: {exc}", "attempt": attempts}
        if attempts >= self.config.max_attempts:
            # A command that may have reached the meter is never called failed: a person looks.
            final = State.UNKNOWN if current.state is State.SENT else State.FAILED
            await self._move(current, final, detail=detail, attempt=current.state is not State.SENT)
            return
        await self._move(
            current,
            current.state,
            detail=detail,
            attempt=current.state is not State.SENT,
            not_before=self.now() + self.config.retry_delay * (2 ** max(0, attempts - 1)),
        )

    async def _expired(self, command: Command, entry: MeterEntry) -> None:
        """End a command whose validity has ended: it is never sent (again) (prepaid.md §5.3).

        One never sent fails. One that may have reached the meter (sent, reply lost) is settled
        by reading the meter back: ``confirmed`` if it took effect, ``failed`` if it certainly
        did not, ``unknown`` when the meter cannot say.
        """
        ended = "validity ended before it could be sent"
        if command.state is not State.SENT:
            await self._move(command, State.FAILED, detail={"error": ended})
            return
        if command.kind is Kind.TOPUP:
            client = self.client(entry)
            n = int(command.progress["purchase_count"])
            count = await client.purchase_count()
            if count == n:
                amount = _topup_amount(command)
                await self._confirm_topup(command, client, n, amount, "applied before its validity ended")
            elif count == n - 1:
                error = f"validity ended; the meter's purchase count is {count}, so it does not have it; not sent again"
                await self._move(command, State.FAILED, detail={"error": error, "not_sent_again": True})
            else:
                error = f"validity ended; meter purchase count is {count}, this top-up used {n}: reconcile by hand"
                await self._move(command, State.UNKNOWN, detail={"error": error, "not_sent_again": True})
            return
        verify = {Kind.TARIFF: self._tariff, Kind.PARAMS: self._params, Kind.TIME_SYNC: self._time_sync}
        await verify[command.kind](command, entry, verify_only=True)

    # --- top-up ---------------------------------------------------------------------------------------------

    async def _topup(self, command: Command, entry: MeterEntry) -> None:
        if entry.mode == "remote":
            await self._topup_remote(command, entry)
            return
        amount = _topup_amount(command)
        opening = bool(command.params.get("opening"))
        client = self.client(entry)
        progress = dict(command.progress)
        if "purchase_count" not in progress:
            pending = await self._pending_topup(command)
            if pending is not None:
                # Its count is still in doubt (a retry is due): choosing one now could pick the same N.
                await self._move(
                    command,
                    command.state,
                    detail={"waiting_for": pending.id, "reason": "another top-up on this meter is not settled"},
                    not_before=self.now() + self.config.retry_delay,
                )
                return
            # A plain read first: a meter that does not answer fails fast, before an ESAM session.
            balance = (await client.read(_balance_di(command))).value
        count_now = await client.purchase_count()
        if "purchase_count" not in progress and opening and count_now != 0:
            # Opening with count 1 on a meter that has 1 only marks it opened and adds nothing;
            # any other count is a purchase-count error (dlt645.md §5.3 rule 4): never send it.
            reason = f"the meter's purchase count is {count_now}: its account is open, use a recharge"
            await self._move(command, State.REFUSED, detail={"rule": "account_open", "reason": reason})
            return
        if "purchase_count" not in progress:
            n = count_now + 1
            progress = {"purchase_count": n, "count_before": count_now, "balance_before": str(balance)}
            # Recorded before the recharge leaves: after any crash this says which count was used.
            command = await self._move(
                command,
                State.SENT,
                progress=progress,
                attempt=True,
                detail={"step": "purchase count chosen", **progress},
            )
        else:
            n = int(progress["purchase_count"])
            if count_now == n:
                await self._confirm_topup(command, client, n, amount, "applied before a restart or lost reply")
                return
            if count_now != n - 1:
                await self._move(
                    command,
                    State.UNKNOWN,
                    detail={
                        "error": f"meter purchase count is {count_now}; this top-up uses {n}: another purchase "
                        "happened in between, reconcile by hand"
                    },
                )
                return
            command = await self._move(command, State.SENT, attempt=True, detail={"step": "resend", "count": n})
        try:
            result = await client.top_up(
                amount, n, entry.customer_number, opening=opening, not_after=command.valid_until
            )
        except MeterRefused as refused:
            flags = refused.flags
            detail = {"error": str(refused), "serr": int(flags) if flags is not None else None}
            if flags is not None and int(flags) & SecurityFlags.PURCHASE_COUNT:
                await self._move(command, State.UNKNOWN, detail=detail)
            elif flags is not None and int(flags) & (
                SecurityFlags.HOARDING_LIMIT | SecurityFlags.CUSTOMER_MISMATCH | SecurityFlags.OTHER
            ):
                await self._move(command, State.REFUSED, detail=detail)  # nothing was added (§5.3)
            else:
                raise NoReply(entry.address, f"top-up refused ({refused})", 1) from None
            return
        await self._confirm_topup(command, client, n, amount, result.outcome)

    async def _pending_topup(self, command: Command) -> Command | None:
        """Another top-up on this meter that has recorded its purchase count and not ended."""
        for other in await self.store.commands(address=command.address, state=State.SENT, limit=10_000):
            if other.id != command.id and other.kind is Kind.TOPUP and "purchase_count" in other.progress:
                return other
        return None

    async def _confirm_topup(self, command: Command, client: MeterClient, n: int, amount: int, outcome: str) -> None:
        count = await client.purchase_count()
        balance = (await client.read(_balance_di(command))).value
        result = {
            "purchase_count": count,
            "balance_after": str(balance),
            "outcome": outcome,
            "amount": str(Decimal(amount).scaleb(-2)),
        }
        if "energy_hundredths" in command.params:
            result["unit"] = "kWh"
        if count != n:
            await self._move(
                command,
                State.UNKNOWN,
                result=result,
                detail={"error": f"read-back purchase count {count}, expected {n}"},
            )
            return
        if outcome == "opened_only":
            # The meter had this count already: it only marked the account open, nothing was
            # added (dlt645.md §5.3 rule 4). Certainly not applied; a person sees why.
            result["amount"] = "0.00"
            reason = "the meter's purchase count already was the opening's: it only marked the account open"
            await self._move(command, State.REFUSED, result=result, detail={"by": "meter", "reason": reason})
            return
        await self._move(command, State.CONFIRMED, result=result, detail={"verified": result})

    async def _topup_remote(self, command: Command, entry: MeterEntry) -> None:
        amount = int(command.params["amount_fen"])
        before = await self.store.wallet(entry.address) or 0
        after = before + amount
        result = {
            "balance_before": str(Decimal(before).scaleb(-2)),
            "balance_after": str(Decimal(after).scaleb(-2)),
            "outcome": "booked",
        }
        await self._move(
            command,
            State.CONFIRMED,
            result=result,
            wallet=(amount, "topup", f"topup:{command.id}"),
            detail={"wallet": result},
        )
        if after > 0:
            # A top-up that brings the balance above zero restores supply (prepaid.md §5.1, Hunan).
            # The restore is derived from the ledger, not from this moment: if the gateway dies
            # right here, start() submits it (reconcile_remote).
            await self.reconcile_remote(entry.address)

    async def reconcile_remote(self, address: str | None = None) -> list[str]:
        """Submit the restore of remote customers whose wallet is above zero but whose supply is
        still cut by an arrears trip; returns the meters restored.

        Runs after every remote top-up, at start (a crash between booking a top-up and submitting
        its restore loses nothing) and with each billing run (a restore that failed, e.g. on a
        dead line, is tried again). The idempotency key names the trip and the attempt, so
        running it twice submits nothing twice.
        """
        restored = []
        entries = [self.meter(address)] if address else list(self.meters.values())
        for entry in entries:
            if entry.mode != "remote":
                continue
            balance = await self.store.wallet(entry.address)
            if balance is None or balance <= 0:
                continue
            relay = [c for c in await self.store.commands(address=entry.address, limit=1000) if c.kind is Kind.RELAY]
            # The arrears trip that acted last: confirmed, or unknown (it may have tripped). Order
            # by when it ended, not when it was submitted: a deferred trip may run after commands
            # submitted later.
            trips = [c for c in relay if c.params.get("arrears") and c.state in (State.CONFIRMED, State.UNKNOWN)]
            if not trips:
                continue
            trip = max(trips, key=_ended_at)
            closes = [c for c in relay if c.params["action"] in CLOSE_ACTIONS and c.id != trip.id]
            if any(not c.state.final for c in closes) or any(
                c.state is State.CONFIRMED and _ended_at(c) >= _ended_at(trip) for c in closes
            ):
                continue  # restored already, or on its way
            attempt = sum(1 for c in closes if c.params.get("restore_for") == trip.id)
            _, created = await self.submit(
                f"restore:{trip.id}:{attempt}",
                Kind.RELAY,
                entry.address,
                {"action": "direct-close", "restore_for": trip.id},
                "gateway (restore after top-up)",
            )
            if created:
                restored.append(entry.address)
        return restored

    # --- relay --------------------------------------------------------------------------------------------------

    def facts(self, entry: MeterEntry) -> CustomerFacts:
        """What the policy knows about a customer (see :meth:`_facts` for the ledger-backed view)."""
        return CustomerFacts(
            power_hold=entry.power_hold or self.power_hold.get(entry.address, False),
            residential=entry.residential,
            zero_since=self.zero_since.get(entry.address),
            notice_sent=self.notice_sent.get(entry.address),
            notices=self.notices.get(entry.address, ()),
        )

    async def _facts(self, entry: MeterEntry) -> CustomerFacts:
        """The customer facts as the ledger has them now: the latest notice, when a remote wallet
        reached zero, and power hold as the last confirmed power-hold command left it. Read
        fresh for every relay command: another gateway on the same ledger may have changed
        them (a cached value once let a trip through a power hold set elsewhere)."""
        address = entry.address
        sent = await self.store.last_notice(address)  # notices outlive a restart
        if sent is not None:
            self.notice_sent[address] = sent
        if self.policy.require_notice:
            self.notices[address] = tuple(await self.store.notices(address, self.now() - self.policy.notice_valid))
        if entry.mode == "remote":
            zero = await self.store.zero_since(address)
            if zero is None:
                self.zero_since.pop(address, None)
            else:
                self.zero_since[address] = zero
        self.power_hold[address] = bool(await self.store.confirmed_power_hold(address))
        return self.facts(entry)

    async def record_notice(
        self, address: str, actor: str, sent_at: datetime | None = None, text: str = ""
    ) -> datetime:
        """Record a disconnection notice (the policy's notice rule counts from it); returns its time."""
        entry = self.meter(address)
        when = sent_at or self.now()
        if when.tzinfo is None:
            raise InvalidCommand("sent_at needs a time zone")
        if when > self.now() + timedelta(minutes=5):
            raise InvalidCommand("a notice cannot be sent in the future")
        await self.store.record_notice(entry.address, when, actor, text)
        latest = self.notice_sent.get(entry.address)
        self.notice_sent[entry.address] = when if latest is None or when > latest else latest
        self.notices[entry.address] = tuple(sorted({*self.notices.get(entry.address, ()), when}))
        return when

    async def _relay(self, command: Command, entry: MeterEntry) -> None:
        facts = await self._facts(entry)
        action = command.params["action"]
        now = self.now()
        if command.valid_until is not None and now >= command.valid_until:
            await self._not_sent(command, entry, State.FAILED, {"error": "validity ended before it could be sent"})
            return
        arrears = command.params.get("arrears")
        if arrears and entry.mode == "remote" and (await self.store.wallet(entry.address) or 0) > 0:
            # Paid since the trip was submitted (it may have waited out quiet hours): never trip.
            reason = "the wallet is above zero again: the arrears are paid"
            await self._not_sent(command, entry, State.REFUSED, {"rule": "paid", "reason": reason})
            return
        refusal = self.policy.check_relay(action, facts, now, arrears=arrears)
        if refusal is not None:
            await self._not_sent(command, entry, State.REFUSED, {"rule": refusal.rule, "reason": refusal.reason})
            return
        if self.policy.dry_run:
            await self._not_sent(command, entry, State.REFUSED, {"rule": "dry_run", "reason": "dry-run: not sent"})
            return
        client = self.client(entry)
        until = min(command.valid_until or now + DEFAULT_VALIDITY, now + DEFAULT_VALIDITY)
        command = await self._move(
            command, State.SENT, attempt=True, detail={"step": "send", "valid_until": until.isoformat()}
        )
        try:
            result = await client.relay(RELAY_ACTIONS[action], until, n2=int(command.params.get("n2", 0)))
        except MeterRefused as refused:
            detail: dict[str, Any] = {"error": str(refused), "by": "meter"}
            hint = await self._clock_hint(client, until)
            if hint is not None:
                detail["reason"] = hint
            await self._move(command, State.REFUSED, detail=detail)
            return
        status = (await client.read(0x04000503)).value
        fields = dict(status.fields) if hasattr(status, "fields") else {}
        ok, why = _relay_confirmed(action, fields, result.execution)
        outcome = {
            "status_word_3": getattr(status, "raw", None),
            "relay_open": fields.get("relay_open"),
            "power_hold": fields.get("power_hold"),
            "execution": result.execution.name if result.execution else None,
        }
        await self._move(
            command,
            State.CONFIRMED if ok else State.FAILED,
            result=outcome,
            detail={"verified": ok, "reason": why},
        )

    async def _not_sent(self, command: Command, entry: MeterEntry, final: State, detail: dict[str, Any]) -> None:
        """End a relay command that may not be sent (again): validity ended, policy refusal or dry-run.

        A command never sent ends ``final`` (it certainly did nothing). One already sent may have
        acted on the meter (its reply was lost): it is not sent again, and status word 3 says
        whether it took effect (``confirmed``) or not (``final``); a read is allowed whatever the
        policy says. In dry-run nothing may go out, not even a read: those end ``unknown`` (a
        person looks).
        """
        action = command.params["action"]
        if command.state is not State.SENT:
            await self._move(command, final, detail=detail)
            return
        if self.policy.dry_run:
            note = "an earlier attempt may have reached the meter; not sent again"
            await self._move(command, State.UNKNOWN, detail={**detail, "not_sent_again": note})
            return
        status = (await self.client(entry).read(0x04000503)).value
        fields = dict(status.fields) if hasattr(status, "fields") else {}
        ok, why = _relay_confirmed(action, fields, None, replied=False)
        if not ok and action in TRIP_ACTIONS and fields.get("pre_trip_alarm"):
            # A trip delay may be running from an earlier attempt, or the alarm was on before:
            # the status word cannot tell, so neither "done" nor "not done" (a person looks).
            final, why = State.UNKNOWN, "pre-trip alarm on: a delayed trip may be pending, or the alarm was already on"
        outcome = {
            "status_word_3": getattr(status, "raw", None),
            "relay_open": fields.get("relay_open"),
            "power_hold": fields.get("power_hold"),
            "execution": None,
        }
        # Not sent again either way; the status word shows whether an earlier attempt took effect.
        await self._move(
            command,
            State.CONFIRMED if ok else final,
            result=outcome,
            detail={**detail, "not_sent_again": True, "verified": ok, "read_back": why},
        )

    # --- tariff and parameters -------------------------------------------------------------------------------

    async def _tariff(self, command: Command, entry: MeterEntry, *, verify_only: bool = False) -> None:
        """Backup price set (040502FF) and/or backup step table (040605FF), each with its switch time
        (04000108 / 04000109), written with MACs at level 99 (dlt645.md §5.5), and/or a TOU
        schedule: the backup (second-set) day tables 04020001.. and time-zone table 04020000,
        then both TOU switch times 04000106 / 04000107 (§3.4), each at the level of its class in
        the DI table (class 2, ciphertext at level 98, prepaid.md §2.3). Then all read back.

        Meters write only the backup sets (§3.4); ``set: current`` writes the backup with a
        switch time of this minute, so it is current at once, and then reads back the *current*
        set (040501FF / 040604FF / 04010000..) as the proof.

        ``verify_only`` (its validity has ended after a send) writes nothing and reads back.
        """
        client = self.client(entry)
        params = command.params
        current = params.get("set") == "current"
        if verify_only and "switch_default" in command.progress:
            soon = datetime.fromisoformat(command.progress["switch_default"])  # what the send used
        else:
            minute = self.now().astimezone(METER_TZ).replace(second=0, microsecond=0)
            soon = minute if current else minute + timedelta(minutes=1)
            command = await self._move(
                command,
                State.SENT,
                attempt=True,
                progress={"switch_default": soon.isoformat()},
                detail={"step": "write backup tariff"},
            )

        async def write_mac(di: int, value: Any) -> None:
            if not verify_only:
                await client.write_mac(di, value, not_after=command.valid_until)

        result: dict[str, Any] = {}
        ok = True
        try:
            if "prices" in params:
                prices = [Decimal(x) for x in params["prices"]]
                while len(prices) < 4:
                    prices.append(prices[-1])
                when = datetime.fromisoformat(params["switch_at"]) if params.get("switch_at") else soon
                await write_mac(0x040502FF, prices)
                await write_mac(0x04000108, when)
                back = list((await client.read(0x040501FF if current else 0x040502FF)).value)
                for _ in range(CURRENT_SET_POLLS if current else 0):
                    if back[: len(prices)] == prices:
                        break
                    await asyncio.sleep(1.0)  # the meter switches at its next clock tick (once a second)
                    back = list((await client.read(0x040501FF)).value)
                back_switch = (await client.read(0x04000108)).value
                ok = ok and back[: len(prices)] == prices and back_switch == when
                result["prices"] = [str(x) for x in back]
                result["switch_at"] = back_switch.isoformat() if back_switch else None
            if "steps" in params:
                table = _steps_value(params["steps"])
                when = datetime.fromisoformat(params["steps_switch_at"]) if params.get("steps_switch_at") else soon
                await write_mac(0x040605FF, table)
                await write_mac(0x04000109, when)
                back_steps = (await client.read(0x040604FF if current else 0x040605FF)).value
                for _ in range(CURRENT_SET_POLLS if current else 0):
                    if back_steps == table:
                        break
                    await asyncio.sleep(1.0)
                    back_steps = (await client.read(0x040604FF)).value
                back_switch = (await client.read(0x04000109)).value
                ok = ok and back_steps == table and back_switch == when
                result["steps"] = _steps_public(back_steps)
                result["steps_switch_at"] = back_switch.isoformat() if back_switch else None
            if "tou" in params:
                tou = params["tou"]
                n_tables = len(tou["day_tables"])
                when = datetime.fromisoformat(params["tou_switch_at"]) if params.get("tou_switch_at") else soon

                async def write(di: int, value: Any) -> None:
                    if verify_only:
                        return
                    # The DI table says the class: 1 with a MAC (99), 2 as ciphertext (98), §5.5.
                    item = DI_2007.get(di)
                    cipher = item is not None and item.param_class == 2
                    await (client.write_encrypted if cipher else client.write_mac)(
                        di, value, not_after=command.valid_until
                    )

                async def read_tou(base: int) -> dict[str, Any]:
                    tables = [(await client.read(base + n)).value for n in range(1, n_tables + 1)]
                    return {"zones": (await client.read(base)).value, "day_tables": tables}

                # Day tables first: the meter checks that the zones name day tables it has.
                for n, table in enumerate(tou["day_tables"], 1):
                    await write(TOU_BACKUP_ZONES + n, table)
                await write(TOU_BACKUP_ZONES, tou["zones"])
                for di in TOU_SWITCH_DIS:
                    await write(di, when)
                back_tou = await read_tou(TOU_CURRENT_ZONES if current else TOU_BACKUP_ZONES)
                for _ in range(CURRENT_SET_POLLS if current else 0):
                    if back_tou == tou:
                        break
                    await asyncio.sleep(1.0)
                    back_tou = await read_tou(TOU_CURRENT_ZONES)
                back_switches = [(await client.read(di)).value for di in TOU_SWITCH_DIS]
                ok = ok and back_tou == tou and all(b == when for b in back_switches)
                result["tou"] = back_tou
                result["tou_switch_at"] = back_switches[0].isoformat() if back_switches[0] else None
        except MeterRefused as refused:
            await self._move(command, State.REFUSED, detail={"error": str(refused), "by": "meter"})
            return
        await self._move(
            command,
            State.CONFIRMED if ok else State.FAILED,
            result=result,
            detail={"verified": ok, "reason": _verdict(ok, verify_only)},
        )

    async def _params(self, command: Command, entry: MeterEntry, *, verify_only: bool = False) -> None:
        client = self.client(entry)
        if not verify_only:
            command = await self._move(command, State.SENT, attempt=True, detail={"step": "write parameters"})
        result: dict[str, str] = {}
        ok = True
        try:
            for name, value in {} if verify_only else command.params.items():
                di = PARAM_DIS[name]
                # Class 1 with a MAC at level 99, class 2 as ciphertext at level 98 (dlt645.md §5.5):
                # the DI table says which.
                item = DI_2007.get(di)
                write = client.write_encrypted if item is not None and item.param_class == 2 else client.write_mac
                await write(di, Decimal(value), not_after=command.valid_until)
            for name, value in command.params.items():
                back = (await client.read(PARAM_DIS[name])).value
                result[name] = str(back)
                ok = ok and back == Decimal(value)
        except MeterRefused as refused:
            await self._move(command, State.REFUSED, detail={"error": str(refused), "by": "meter"})
            return
        await self._move(
            command,
            State.CONFIRMED if ok else State.FAILED,
            result=result,
            detail={"verified": ok, "reason": _verdict(ok, verify_only)},
        )

    async def _clock_hint(self, client: MeterClient, until: datetime) -> str | None:
        """Why a meter may have refused a control frame valid until ``until``: its clock is past
        that (:meth:`MeterClient.clock_past`). None when its clock is not the reason."""
        meter_now = await client.clock_past(until)
        if meter_now is None:
            return None
        ahead = timedelta(seconds=round((meter_now - self.now()).total_seconds()))
        return (
            f"the meter's clock is {ahead} ahead: the command's validity end {until.isoformat()} lies in its past, "
            "so it refuses the frame (whatever error it reports); a time sync (kind time_sync) fixes that"
        )

    async def _clock_error(self, client: MeterClient) -> float:
        """The meter's clock minus true time, in seconds (reads 04000101 and 04000102)."""
        return (await client.meter_time() - self.now()).total_seconds()

    async def _time_sync(self, command: Command, entry: MeterEntry, *, verify_only: bool = False) -> None:
        """Set one meter's clock: read it; if it is more than 10 s off, write date and time to this
        meter alone as class-2 parameters (ciphertext at level 98, dlt645.md §5.5), which works
        however far off it is. A meter that refuses that (no ESAM session) gets the broadcast
        (0x08), which meters take only within 5 minutes and once a day (§4.1) and which reaches
        every meter on the line. Verified by reading the clock back. ``verify_only`` (validity
        ended after a send) only reads it."""
        client = self.client(entry)
        if not verify_only:
            command = await self._move(command, State.SENT, attempt=True, detail={"step": "read clock"})
        before = await self._clock_error(client)
        method = "none needed" if not verify_only else "validity ended: read only"
        if abs(before) > 10 and not verify_only:
            try:
                await client.session()  # authenticate first: the two writes then follow at once
                for _ in range(2):
                    await client.write_encrypted(
                        0x04000101, self.now().astimezone(METER_TZ).date(), not_after=command.valid_until
                    )
                    await client.write_encrypted(
                        0x04000102,
                        self.now().astimezone(METER_TZ).time().replace(microsecond=0),
                        not_after=command.valid_until,
                    )
                    method = "set (level 98)"
                    # Midnight may have fallen between the date write and the time write (the
                    # meter is then a day behind): checked, and written once more if so.
                    if self.now().astimezone(METER_TZ).date() == (await client.read(0x04000101)).value:
                        break
            except MeterRefused as refused:
                log.info("meter %s refused the clock write (%s): broadcasting the time", entry.address, refused)
                await client.broadcast_time(self.now(), not_after=command.valid_until)
                method = "broadcast"
        error = await self._clock_error(client)
        ok = abs(error) <= 10
        reason = "within 10 s" if ok else "still off after " + method
        if not ok and method == "broadcast":
            reason = "the meter refused the clock write and the broadcast (more than 5 min off, or synced today)"
        await self._move(
            command,
            State.CONFIRMED if ok else State.FAILED,
            result={"clock_error_before_s": round(before, 1), "clock_error_s": round(error, 1), "method": method},
            detail={"verified": ok, "reason": reason},
        )


def _verdict(ok: bool, verify_only: bool) -> str:
    if verify_only:
        return "validity ended; read-back matches" if ok else "validity ended; read-back differs; not sent again"
    return "read-back matches" if ok else "read-back differs"


def _ended_at(command: Command) -> datetime:
    """When a command reached its current state (for a final one: when it ended)."""
    return command.updated_at or command.created_at


TRIP_DELAYED = RelayExecution.DELAYED_TRIP | RelayExecution.DELAYED_TRIP_LARGE_CURRENT


def _relay_confirmed(action: str, f: dict[str, Any], execution: Any, replied: bool = True) -> tuple[bool, str]:
    """Whether status word 3 shows what ``action`` should have done (dlt645.md §3.4).

    ``replied``: the meter's normal reply to this very command was seen (``execution`` is its
    execution word, None in the short reply form). A trip waiting out its trip delay or the
    large-current delay shows only the pre-trip alarm bit (§1.5 of prepaid.md): that counts only
    with the meter's own reply, since the alarm may have been on before (alarm-on, alarm 2).
    """
    if action in TRIP_ACTIONS:
        if f.get("relay_trip_commanded"):
            return True, "trip commanded"
        if execution is not None and int(execution) & TRIP_DELAYED:
            return True, "trip accepted, delayed (trip delay or large current)"
        if replied and f.get("pre_trip_alarm"):
            return True, "trip accepted, pending its delay (pre-trip alarm on)"
        return False, "status word shows no trip"
    if action == "direct-close":
        ok = not f.get("relay_open", True)
        return ok, "relay closed" if ok else "relay still open (the wallet may forbid closing)"
    if action == "close-allowed":
        # Status word 3 bit 6 is the relay *command* state: 0 = closed or close allowed (§3.4).
        ok = not f.get("relay_trip_commanded", True)
        return ok, "close allowed (the customer presses the button)" if ok else "a trip is still commanded"
    if action == "power-hold-on":
        return bool(f.get("power_hold")), "power hold on"
    if action == "power-hold-off":
        return not f.get("power_hold"), "power hold off"
    if action == "alarm-on":
        return bool(f.get("pre_trip_alarm")), "alarm on"
    if action == "alarm-off":
        return not f.get("pre_trip_alarm"), "alarm off"
    return True, "accepted"


__all__ = ["CommandService", "InvalidCommand", "MeterEntry", "ServiceConfig"]
