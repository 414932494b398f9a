"""The tariff engine of a local cost-control meter: TOU prices, step tariffs, two sets (prepaid.md §1.3).

Units, all exact integers:

- prices in 1e-4 yuan/kWh (the wire format ``XXXX.XXXX``): 0.5000 yuan/kWh is ``5000``;
- energy in hundredths of a kWh (0.01 kWh, ``XXXXXX.XX``), the meter's deduction quantum;
- money in micro-yuan (1e-6 yuan), the wallet's internal precision (see :func:`cost_of`).

Tariffs are numbered as on the wire: T1 sharp (尖), T2 peak (峰), T3 flat (平), T4 valley (谷).

**Effective price = TOU price of the current tariff + increment of the current step** (§1.3).
The step increment follows the firmware rule (``Money.c``: the counted energy is first
incremented by 0.01 kWh, then the step is judged with ``energy <= threshold``): the hundredth
counted while the step-accumulated energy is ``e`` carries the increment of step ``k``, where
``k`` is the number of (used) thresholds ``<= e``. So with a 2,880 kWh threshold the first
2,880.00 kWh are priced at step 1 and everything after at step 2.

Time is always an argument: every method takes a timezone-aware datetime and works on the
meter's wall clock (:data:`METER_TZ`, converted with ``astimezone``). Returned instants are in
:data:`METER_TZ`. Nothing here reads the clock or does I/O.

Tables (:class:`TouSchedule`, :class:`PriceSet`, :class:`StepTable`) are immutable and shared;
a :class:`TariffState` (one per meter) only holds references to them, so thousands of meters
on the defaults share one copy and a write replaces a reference (copy-on-write).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal, DecimalException, InvalidOperation
from itertools import pairwise
from typing import Any, Literal

from protocols.dlt645.formats import METER_TZ, PartialTime

__all__ = [
    "DEFAULT_PRICES",
    "DEFAULT_STEPS",
    "DEFAULT_TOU",
    "FLAT",
    "FLAT_TOU",
    "MAX_DAY_TABLES",
    "MAX_PERIODS",
    "MAX_PRICES",
    "MAX_TARIFFS",
    "MAX_ZONES",
    "MIN_PERIOD_MINUTES",
    "MIN_PRICES",
    "PEAK",
    "SHARP",
    "SWITCH_PRICES",
    "SWITCH_STEPS",
    "SWITCH_TOU",
    "VALLEY",
    "PriceSet",
    "SettlementMode",
    "StepTable",
    "TariffError",
    "TariffNumberError",
    "TariffState",
    "TouSchedule",
    "UnknownTariffItem",
    "cost_of",
    "flat_schedule",
]

SHARP, PEAK, FLAT, VALLEY = 1, 2, 3, 4
"""Tariff numbers T1..T4 (尖峰平谷)."""

MAX_TARIFFS = 4  # tariffs a TOU day table may use (prepaid.md §1.3: 4 tariffs)
MAX_ZONES = 14  # yearly time zones (§1.3: newer firmware allows 14)
MAX_DAY_TABLES = 8  # day tables (§1.3: SY03A MAXSIDUANTB = 8)
MAX_PERIODS = 14  # switch points per day table
MIN_PERIOD_MINUTES = 15  # shortest period (§1.3)
MIN_PRICES = MAX_TARIFFS  # a price set prices at least the 4 TOU tariffs
MAX_PRICES = 12  # 040502FF: FW-B accepts at most 12 prices (dlt645.md §3.4)
STEP_THRESHOLDS = 6  # 040604FF/040605FF: 6 thresholds, 7 increments, 4 settlement dates
STEP_INCREMENTS = 7
STEP_DATES = 4

_PRICE_MAX = 99_999_999  # XXXX.XXXX in 1e-4
_ENERGY_MAX = 99_999_999  # XXXXXX.XX in 0.01 kWh
_UNSET = 99  # "not set" marker of MMDDhh fields
_DAY_MS = 86_400_000
_ORDINAL_1970 = date(1970, 1, 1).toordinal()

SWITCH_TOU = "tou"
SWITCH_PRICES = "prices"
SWITCH_STEPS = "steps"

SettlementMode = Literal["annual", "monthly", "none"]

_DI_CURRENT_PRICES = 0x040501FF
_DI_BACKUP_PRICES = 0x040502FF
_DI_CURRENT_STEPS = 0x040604FF
_DI_BACKUP_STEPS = 0x040605FF
_DI_TOU_SWITCH = 0x04000106
_DI_DAY_TABLE_SWITCH = 0x04000107
_DI_CURRENT_ZONES = 0x04010000  # 04010001..08: day tables 1..8 of the first (current) set
_DI_BACKUP_ZONES = 0x04020000  # 04020001..08: day tables 1..8 of the second (backup) set
_DI_PRICE_SWITCH = 0x04000108
_DI_STEP_SWITCH = 0x04000109


class TariffError(ValueError):
    """A tariff table, price or time the meter would not accept."""


class TariffNumberError(TariffError):
    """A day table uses a tariff beyond the meter's tariffs (the ERR "number of tariffs exceeded",
    dlt645.md §2.2 bit 6)."""


class UnknownTariffItem(TariffError, KeyError):
    """A DI that :meth:`TariffState.write_di` does not write (a ``KeyError`` too, for DI dispatch)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# --- helpers -------------------------------------------------------------------------------


def cost_of(hundredths: int, price: int) -> int:
    """Money in micro-yuan for ``hundredths`` × 0.01 kWh at ``price`` (1e-4 yuan/kWh).

    The units make this exact and free of rounding: 0.01 kWh × p·1e-4 yuan/kWh = p·1e-6 yuan,
    so **each 0.01 kWh at price p costs exactly p micro-yuan** and the cost of n hundredths is
    ``n * p``. (The firmware does the same: its wallet is kept at 1e-6 yuan and it subtracts
    the 4-decimal price once per 0.01 kWh, prepaid.md §1.3.) CT×PT scaling, if any, is the
    caller's: multiply the price or the energy by the ratio.
    """
    _check_int(hundredths, "energy", 0, None)
    _check_int(price, "price", 0, None)
    return hundredths * price


def _check_int(value: Any, what: str, lo: int, hi: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TariffError(f"{what} must be an int, not {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise TariffError(f"{what} = {value} is outside {bound}")
    return value


def _units(value: Any, decimals: int, hi: int, what: str) -> int:
    """An exact DI value (int, Decimal or str; never float) as an integer of 10^-decimals."""
    if isinstance(value, (bool, float)) or not isinstance(value, (int, Decimal, str)):
        raise TariffError(f"{what} must be an int, Decimal or str, not {type(value).__name__} {value!r}")
    try:
        exact = Decimal(value)
        units = exact.scaleb(decimals)
        whole = exact.is_finite() and units == units.to_integral_value()
    except (InvalidOperation, DecimalException, ValueError):
        raise TariffError(f"{what} = {value!r} is not a number") from None
    if not whole:
        raise TariffError(f"{what} = {value} is not a finite number with at most {decimals} decimals")
    n = int(units)
    if not 0 <= n <= hi:
        raise TariffError(f"{what} = {value} is outside 0..{Decimal(hi).scaleb(-decimals)}")
    return n


def _local(dt: Any) -> datetime:
    """``dt`` on the meter's wall clock; naive datetimes are refused (time is explicit and zoned)."""
    if not isinstance(dt, datetime):
        raise TariffError(f"a time must be a datetime, not {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise TariffError(f"{dt.isoformat()} is naive: pass a timezone-aware datetime (METER_TZ)")
    return dt.astimezone(METER_TZ)


def _midnight(local: datetime) -> datetime:
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def _switch_time(value: datetime | None, what: str) -> datetime | None:
    """A switch time as stored and read back through ``YYMMDDhhmm``: whole minutes, 2000..2099."""
    if value is None:
        return None
    local = _local(value)
    if local.second or local.microsecond:
        raise TariffError(f"{what} {local.isoformat()} is not a whole minute (YYMMDDhhmm)")
    if not 2000 <= local.year <= 2099:
        raise TariffError(f"{what} {local.isoformat()} is outside the years 2000..2099 (YYMMDDhhmm)")
    return local


# --- TOU schedule ----------------------------------------------------------------------------

Zone = tuple[int, int, int]  # (month, day, day-table number 1..)
SwitchPoint = tuple[int, int, int]  # (hour, minute, tariff 1..4)


@dataclass(frozen=True, slots=True)
class TouSchedule:
    """Yearly time zones and day tables (DL/T 645 年时区表 / 日时段表).

    ``zones``: up to 14 ``(month, day, day_table)``; a zone starts at 00:00 of its date and
    runs until the next zone's date, the last one wrapping round the new year. ``day_tables``:
    up to 8 tables of up to 14 ``(hour, minute, tariff)`` switch points; a switch point's tariff
    runs until the next one, the last one wrapping round midnight to the first (within the same
    table). Periods are at least 15 minutes, the wrap-round one included. Both lists are
    stored sorted; the order given does not matter.
    """

    zones: tuple[Zone, ...]
    day_tables: tuple[tuple[SwitchPoint, ...], ...]
    _zone_keys: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _starts: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tables = _check_day_tables(self.day_tables)
        zones = _check_zones(self.zones, len(tables))
        object.__setattr__(self, "zones", zones)
        object.__setattr__(self, "day_tables", tables)
        object.__setattr__(self, "_zone_keys", tuple((m, d) for m, d, _ in zones))
        object.__setattr__(self, "_starts", tuple(tuple(h * 60 + m for h, m, _ in t) for t in tables))

    def _table_index(self, day: date) -> int:
        i = bisect_right(self._zone_keys, (day.month, day.day)) - 1
        return self.zones[i][2] - 1  # i = -1: before the first zone, the last one still runs

    def tariff_at(self, local_dt: datetime) -> int:
        """The tariff (1..4) in force at ``local_dt``."""
        local = _local(local_dt)
        t = self._table_index(local.date())
        i = bisect_right(self._starts[t], local.hour * 60 + local.minute) - 1
        return self.day_tables[t][i][2]  # i = -1: before the first point, the last one still runs

    def next_change(self, local_dt: datetime) -> datetime:
        """The next instant after ``local_dt`` at which the tariff may change.

        That is the next switch point of today's day table or, when today has none left, the
        next midnight if a time-zone boundary changes the day table there, else the first switch
        point of tomorrow's (same) table. Always strictly after ``local_dt`` and at most 24 h
        later. Switch points where the tariff stays the same are reported too ("may").
        """
        local = _local(local_dt)
        midnight = _midnight(local)
        t = self._table_index(local.date())
        elapsed = local - midnight
        for start in self._starts[t]:
            if timedelta(minutes=start) > elapsed:
                return midnight + timedelta(minutes=start)
        tomorrow = midnight + timedelta(days=1)
        t2 = self._table_index(tomorrow.date())
        if self.day_tables[t2] != self.day_tables[t]:
            return tomorrow
        return tomorrow + timedelta(minutes=self._starts[t][0])

    def at_wall_ms(self, wall_ms: int) -> tuple[int, int]:
        """(:meth:`tariff_at`, :meth:`next_change`) for a wall-clock reading in integer ms.

        ``wall_ms`` counts milliseconds of the meter's wall clock (METER_TZ) since 1970-01-01
        00:00 wall time; the change is returned on the same scale. The same rules as the datetime
        methods, without datetimes (a meter asks at every tariff period while it catches up).
        """
        day, ms = divmod(wall_ms, _DAY_MS)
        t = self._table_index(date.fromordinal(day + _ORDINAL_1970))
        starts = self._starts[t]
        minute = ms // 60_000
        j = bisect_right(starts, minute)  # the first switch point strictly after the reading
        tariff = self.day_tables[t][j - 1][2]  # j = 0: before the first point, the last one still runs
        if j < len(starts):
            return tariff, day * _DAY_MS + starts[j] * 60_000
        tomorrow = (day + 1) * _DAY_MS
        t2 = self._table_index(date.fromordinal(day + 1 + _ORDINAL_1970))
        if self.day_tables[t2] != self.day_tables[t]:
            return tariff, tomorrow
        return tariff, tomorrow + starts[0] * 60_000

    def zones_di(self) -> list[dict[str, int]]:
        """The value of the time-zone table DI (04010000 / 04020000): ``MMDDNN`` entries, in order."""
        return [{"month": m, "day": d, "table": t} for m, d, t in self.zones]

    def day_table_di(self, n: int) -> list[dict[str, int]] | None:
        """The value of day table ``n`` (0401000n / 0402000n): ``hhmmNN`` entries; None if no table n."""
        if not 1 <= n <= len(self.day_tables):
            return None
        return [{"hour": h, "minute": m, "tariff": t} for h, m, t in self.day_tables[n - 1]]

    def with_zones_di(self, value: Any) -> TouSchedule:
        """This schedule with the zones of a time-zone table DI value (same day tables)."""
        return TouSchedule(zones=_entries(value, ("month", "day", "table"), "time zone"), day_tables=self.day_tables)

    def with_day_table_di(self, n: int, value: Any) -> TouSchedule:
        """This schedule with day table ``n`` replaced (or, for ``n`` = count + 1, added).

        A meter keeps 8 day-table slots; this model keeps the tables in use, so a table can only
        be added after the last one (write 1..k in order). Nothing shrinks the list: tables
        beyond those the zones name stay as they were (unused), as in a meter's slots.
        """
        _check_int(n, "day table number", 1, MAX_DAY_TABLES)
        if n > len(self.day_tables) + 1:
            raise TariffError(f"day table {n}: the set has {len(self.day_tables)}; write day table {n - 1} first")
        table = _entries(value, ("hour", "minute", "tariff"), f"day table {n}: switch point")
        tables = list(self.day_tables)
        if n <= len(tables):
            tables[n - 1] = table
        else:
            tables.append(table)
        return TouSchedule(zones=self.zones, day_tables=tuple(tables))


def _entries(value: Any, names: tuple[str, str, str], what: str) -> tuple[tuple[int, int, int], ...]:
    """``MMDDNN`` / ``hhmmNN`` entries as decoded by ``DI_2007`` (mappings) to tuples; an unused
    (None) entry is refused: this meter takes as many zones / periods as the write holds."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TariffError(f"a table of {what}s is a list")
    a, b, c = names
    out = []
    for entry in value:
        if not isinstance(entry, Mapping) or set(entry) != set(names):
            raise TariffError(f"{what} {entry!r} is not {{{', '.join(names)}}}")
        out.append((entry[a], entry[b], entry[c]))
    return tuple(out)


def _check_day_tables(tables: Any) -> tuple[tuple[SwitchPoint, ...], ...]:
    if isinstance(tables, (str, bytes)) or not isinstance(tables, Iterable):
        raise TariffError("day_tables must be a list of day tables")
    out = []
    for n, table in enumerate(tables, 1):
        if isinstance(table, (str, bytes)) or not isinstance(table, Iterable):
            raise TariffError(f"day table {n} must be a list of (hour, minute, tariff)")
        points = []
        for p in table:
            if not isinstance(p, Sequence) or len(p) != 3:
                raise TariffError(f"day table {n}: switch point {p!r} is not (hour, minute, tariff)")
            h, m, tariff = p
            _check_int(h, f"day table {n}: hour", 0, 23)
            _check_int(m, f"day table {n}: minute", 0, 59)
            _check_int(tariff, f"day table {n}: tariff", 1, None)
            if tariff > MAX_TARIFFS:
                raise TariffNumberError(f"day table {n}: tariff = {tariff} is outside 1..{MAX_TARIFFS}")
            points.append((h, m, tariff))
        if not 1 <= len(points) <= MAX_PERIODS:
            raise TariffError(f"day table {n} has {len(points)} switch points; 1..{MAX_PERIODS} allowed")
        points.sort()
        starts = [h * 60 + m for h, m, _ in points]
        gaps = [b - a for a, b in zip(starts, [*starts[1:], starts[0] + 1440], strict=True)]
        for (h, m, _), gap in zip(points, gaps, strict=True):
            if len(points) > 1 and gap < MIN_PERIOD_MINUTES:
                raise TariffError(
                    f"day table {n}: the period from {h:02d}:{m:02d} lasts {gap} min; "
                    f"the minimum is {MIN_PERIOD_MINUTES} min"
                )
        out.append(tuple(points))
    if not 1 <= len(out) <= MAX_DAY_TABLES:
        raise TariffError(f"{len(out)} day tables; 1..{MAX_DAY_TABLES} allowed")
    return tuple(out)


def _check_zones(zones: Any, n_tables: int) -> tuple[Zone, ...]:
    if isinstance(zones, (str, bytes)) or not isinstance(zones, Iterable):
        raise TariffError("zones must be a list of (month, day, day_table)")
    out = []
    for z in zones:
        if not isinstance(z, Sequence) or len(z) != 3:
            raise TariffError(f"time zone {z!r} is not (month, day, day_table)")
        month, day, table = z
        _check_int(month, "time zone month", 1, 12)
        _check_int(day, "time zone day", 1, 31)
        try:
            date(2000, month, day)  # a leap year: 29 February is a valid zone start
        except ValueError:
            raise TariffError(f"time zone start {month:02d}-{day:02d} is not a date") from None
        _check_int(table, f"time zone {month:02d}-{day:02d}: day table", 1, n_tables)
        out.append((month, day, table))
    if not 1 <= len(out) <= MAX_ZONES:
        raise TariffError(f"{len(out)} time zones; 1..{MAX_ZONES} allowed")
    out.sort()
    for a, b in pairwise(out):
        if a[:2] == b[:2]:
            raise TariffError(f"two time zones start on {a[0]:02d}-{a[1]:02d}")
    return tuple(out)


def flat_schedule(tariff: int = FLAT) -> TouSchedule:
    """A single-tariff schedule: ``tariff`` (default T3 flat) all day, all year."""
    return TouSchedule(zones=((1, 1, 1),), day_tables=(((0, 0, tariff),),))


_EXAMPLE_DAY = ((7, 0, FLAT), (8, 0, PEAK), (11, 0, FLAT), (18, 0, PEAK), (23, 0, VALLEY))
_EXAMPLE_SUMMER = (
    (7, 0, FLAT),
    (8, 0, PEAK),
    (11, 0, FLAT),
    (18, 0, PEAK),
    (19, 0, SHARP),
    (21, 0, PEAK),
    (23, 0, VALLEY),
)

DEFAULT_TOU = TouSchedule(zones=((1, 1, 1), (7, 1, 2), (9, 1, 1)), day_tables=(_EXAMPLE_DAY, _EXAMPLE_SUMMER))
"""An **example** provincial pattern (prepaid.md §6.1, labelled [A]: an assumption, not a rule):
valley 23:00–07:00, peak 08:00–11:00 and 18:00–23:00, flat otherwise, and in July and August
sharp 19:00–21:00 (inside the evening peak)."""

FLAT_TOU = flat_schedule()
"""One tariff (T3 flat) all day: a single-rate meter."""


# --- price sets ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PriceSet:
    """TOU prices in 1e-4 yuan/kWh, index ``tariff - 1`` (040501xx current / 040502xx backup)."""

    prices: tuple[int, ...]

    def __post_init__(self) -> None:
        prices = self.prices
        if isinstance(prices, (str, bytes)) or not isinstance(prices, Iterable):
            raise TariffError("prices must be a list of ints (1e-4 yuan/kWh)")
        prices = tuple(prices)
        if not MIN_PRICES <= len(prices) <= MAX_PRICES:
            raise TariffError(
                f"a price set holds {MIN_PRICES}..{MAX_PRICES} prices (one per tariff, T1..T4 at least), "
                f"got {len(prices)}"
            )
        for n, p in enumerate(prices, 1):
            _check_int(p, f"price of T{n} (1e-4 yuan/kWh)", 0, _PRICE_MAX)
        object.__setattr__(self, "prices", prices)

    def price(self, tariff: int) -> int:
        """The price of ``tariff`` (1-based)."""
        _check_int(tariff, "tariff", 1, len(self.prices))
        return self.prices[tariff - 1]

    @classmethod
    def from_di(cls, values: Sequence[Decimal | int | str]) -> PriceSet:
        """From the value of 040501FF / 040502FF (yuan/kWh, 4 decimals)."""
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TariffError("a price block is a list of prices in yuan/kWh")
        return cls(tuple(_units(v, 4, _PRICE_MAX, f"price of T{n}") for n, v in enumerate(values, 1)))

    def to_di(self) -> list[Decimal]:
        """The value of 040501FF / 040502FF: prices in yuan/kWh as Decimals with 4 decimals."""
        return [Decimal(p).scaleb(-4) for p in self.prices]


DEFAULT_PRICES = PriceSet((5000, 5000, 5000, 5000))
"""Factory default: all four TOU prices 0.5000 yuan/kWh (prepaid.md §1.3)."""


# --- step (ladder) tables --------------------------------------------------------------------


def _valid_month(v: int | None) -> bool:
    return v is not None and 1 <= v <= 12


def _valid_day(v: int | None) -> bool:
    return v is not None and 1 <= v <= 28


def _valid_hour(v: int | None) -> bool:
    return v is not None and 0 <= v <= 23


def _check_date(entry: Any, n: int) -> PartialTime | None:
    """A settlement date as ``MMDDhh`` can carry it: None (all zero) or month/day/hour, 99 = unset."""
    if entry is None:
        return None
    if not isinstance(entry, PartialTime):
        raise TariffError(f"settlement date {n} must be a PartialTime or None, not {type(entry).__name__}")
    if entry.minute not in (None, 0):
        raise TariffError(f"settlement date {n}: settlements fall on the hour (MMDDhh), minute = {entry.minute}")
    fields = {}
    for name, lo, hi in (("month", 1, 12), ("day", 1, 31), ("hour", 0, 23)):
        v = getattr(entry, name)
        v = _UNSET if v is None else v
        if isinstance(v, bool) or not isinstance(v, int) or not (lo <= v <= hi or v == _UNSET):
            raise TariffError(f"settlement date {n}: {name} = {v!r} is outside {lo}..{hi} (or 99 = not set)")
        fields[name] = v
    return PartialTime(fields["month"], fields["day"], fields["hour"])


@dataclass(frozen=True, slots=True)
class StepTable:
    """A step (ladder, 阶梯) table: 040604FF current / 040605FF backup.

    ``thresholds``: 6 step-energy thresholds in 0.01 kWh; 0 = unused. The used ones come first
    and do not decrease; a repeat of the last used value is unused too (firmware default
    2880, 4800, 4800, ...). ``increments``: 7 increments in 1e-4 yuan/kWh, added to the TOU price;
    step ``k`` (0-based) applies once ``k`` used thresholds are reached. ``settlement_dates``:
    4 ``MMDDhh`` dates (99 = field not set, None = all-zero entry) from which the settlement
    mode is inferred (:attr:`settlement_mode`).
    """

    thresholds: tuple[int, ...]
    increments: tuple[int, ...]
    settlement_dates: tuple[PartialTime | None, ...]
    _used: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _mode: SettlementMode = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        thresholds = _check_list(self.thresholds, STEP_THRESHOLDS, "thresholds")
        increments = _check_list(self.increments, STEP_INCREMENTS, "increments")
        dates = _check_list(self.settlement_dates, STEP_DATES, "settlement_dates")
        for n, t in enumerate(thresholds, 1):
            _check_int(t, f"step threshold {n} (0.01 kWh)", 0, _ENERGY_MAX)
        for n, p in enumerate(increments, 1):
            _check_int(p, f"step {n} increment (1e-4 yuan/kWh)", 0, _PRICE_MAX)
        used = [t for t in thresholds if t]
        if thresholds[: len(used)] != tuple(used):
            raise TariffError(f"step thresholds {list(thresholds)}: unused (0) thresholds must come last")
        for a, b in pairwise(used):
            if b < a:
                raise TariffError(f"step thresholds {list(thresholds)} must not decrease")
        while len(used) > 1 and used[-1] == used[-2]:
            used.pop()  # a repeat of the last threshold adds no step (firmware JudgePrice)
        checked = tuple(_check_date(d, n) for n, d in enumerate(dates, 1))
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "increments", increments)
        object.__setattr__(self, "settlement_dates", checked)
        object.__setattr__(self, "_used", tuple(used))
        object.__setattr__(self, "_mode", _infer_mode(checked))

    @property
    def settlement_mode(self) -> SettlementMode:
        """ "annual", "monthly" or "none", inferred from the settlement dates (prepaid.md §1.3).

        Entries are checked in order (firmware ``JudgeLadderMode``): the first one with a valid
        day (1..28) and hour (0..23) decides: "annual" if its month is valid (1..12) too;
        "monthly" if it is the first entry (month not set); a later entry without a valid month
        is skipped. No such entry: "none", and no step increment is charged.
        """
        return self._mode

    def _settlement_dates(self) -> list[PartialTime]:
        if self._mode == "annual":
            return [
                d
                for d in self.settlement_dates
                if d is not None and _valid_month(d.month) and _valid_day(d.day) and _valid_hour(d.hour)
            ]
        if self._mode == "monthly":
            first = self.settlement_dates[0]
            assert first is not None
            return [first]
        return []

    def step(self, step_energy: int) -> int:
        """The 0-based step the next 0.01 kWh falls in at ``step_energy`` (0 in mode "none")."""
        _check_int(step_energy, "step energy (0.01 kWh)", 0, None)
        if self._mode == "none":
            return 0
        return bisect_right(self._used, step_energy)

    def increment(self, step_energy: int) -> int:
        """The step increment (1e-4 yuan/kWh) for the next 0.01 kWh counted at ``step_energy``.

        0 when the table runs no steps (mode "none").
        """
        if self._mode == "none":
            _check_int(step_energy, "step energy (0.01 kWh)", 0, None)
            return 0
        return self.increments[self.step(step_energy)]

    def next_threshold(self, step_energy: int) -> int | None:
        """The step energy (> ``step_energy``) at which the increment next changes, or None."""
        _check_int(step_energy, "step energy (0.01 kWh)", 0, None)
        if self._mode == "none":
            return None
        i = bisect_right(self._used, step_energy)
        return self._used[i] if i < len(self._used) else None

    def next_settlement(self, local_dt: datetime) -> datetime | None:
        """The first settlement instant strictly after ``local_dt`` (hh:00), or None in mode "none"."""
        local = _local(local_dt)
        dates = self._settlement_dates()
        if not dates:
            return None
        candidates = []
        if self._mode == "annual":
            for year in (local.year, local.year + 1):
                for d in dates:
                    assert d.month is not None and d.day is not None and d.hour is not None
                    candidates.append(datetime(year, d.month, d.day, d.hour, tzinfo=METER_TZ))
        else:
            d = dates[0]
            assert d.day is not None and d.hour is not None
            year, month = local.year, local.month
            for _ in range(2):
                candidates.append(datetime(year, month, d.day, d.hour, tzinfo=METER_TZ))
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        return min(c for c in candidates if c > local)

    @classmethod
    def from_di(cls, record: Mapping[str, Any]) -> StepTable:
        """From the value of 040604FF / 040605FF as decoded by ``DI_2007``."""
        if not isinstance(record, Mapping):
            raise TariffError(f"a step table is a record (mapping), not {type(record).__name__}")
        missing = [k for k in ("thresholds", "prices", "settlement_dates") if k not in record]
        if missing:
            raise TariffError(f"step table record lacks {', '.join(missing)}")
        thresholds = _check_list(record["thresholds"], STEP_THRESHOLDS, "thresholds")
        prices = _check_list(record["prices"], STEP_INCREMENTS, "prices")
        return cls(
            thresholds=tuple(_units(v, 2, _ENERGY_MAX, f"step threshold {n}") for n, v in enumerate(thresholds, 1)),
            increments=tuple(_units(v, 4, _PRICE_MAX, f"step {n} increment") for n, v in enumerate(prices, 1)),
            settlement_dates=tuple(record["settlement_dates"]),
        )

    def to_di(self) -> dict[str, Any]:
        """The value of 040604FF / 040605FF, encodable with ``DI_2007``."""
        return {
            "thresholds": [Decimal(t).scaleb(-2) for t in self.thresholds],
            "prices": [Decimal(p).scaleb(-4) for p in self.increments],
            "settlement_dates": list(self.settlement_dates),
        }


def _check_list(value: Any, count: int, what: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TariffError(f"{what} must be a list of {count} values")
    out = tuple(value)
    if len(out) != count:
        raise TariffError(f"{what} needs {count} values, got {len(out)}")
    return out


def _infer_mode(dates: Sequence[PartialTime | None]) -> SettlementMode:
    for i, d in enumerate(dates):
        if d is None or not (_valid_day(d.day) and _valid_hour(d.hour)):
            continue
        if _valid_month(d.month):
            return "annual"
        if i == 0:
            return "monthly"
    return "none"


_UNSET_DATE = PartialTime(_UNSET, _UNSET, _UNSET)

DEFAULT_STEPS = StepTable(
    thresholds=(288_000, 480_000, 0, 0, 0, 0),
    increments=(0, 500, 3000, 0, 0, 0, 0),
    settlement_dates=(PartialTime(1, 1, 0), _UNSET_DATE, _UNSET_DATE, _UNSET_DATE),
)
"""Factory default (prepaid.md §1.3): steps at 2,880 and 4,800 kWh a year with increments
+0.0500 and +0.3000 yuan/kWh, annual settlement on 1 January at 00:00."""


# --- per-meter state -------------------------------------------------------------------------


class TariffState:
    """The tariff parameters and step energy of one meter, with current and backup sets.

    Holds references to immutable tables (shared between meters) and replaces them on write.
    The backup TOU schedule (time zones and day tables together) switches at one time: the
    time-zone switch time 04000106 and the day-table switch time 04000107 (dlt645.md §3.4) are
    modelled as one TOU switch, so writing either programs it and both read it back.

    TOU DIs (the SGCC convention, di_2007.toml): the first set, 04010000 (time zones) and
    04010001..08 (day tables), is the running ("current") schedule and read-only; the second
    set, 04020000 / 04020001..08, is the backup, written as class-2 parameters and copied into
    the first set at the switch, like the price and step sets. So the first set always runs and
    status word 3 bits 5 and 0 (running time-zone / period-table set, §3.4) stay 0.
    """

    __slots__ = (
        "_pending",
        "_settle_checked",
        "_switch",
        "_step_energy",
        "backup_prices",
        "backup_steps",
        "backup_tou",
        "prices",
        "steps",
        "switch_version",
        "tou",
    )

    def __init__(
        self,
        prices: PriceSet = DEFAULT_PRICES,
        steps: StepTable = DEFAULT_STEPS,
        tou: TouSchedule = DEFAULT_TOU,
        *,
        step_energy: int = 0,
        settlement_checked_at: datetime | None = None,
    ) -> None:
        """A meter's tariff state; backups start equal to the current sets, with no switch pending.

        ``settlement_checked_at``: settlement instants up to this time are taken as done, so the
        first :meth:`settle_if_due` call settles for any instant after it. Without it, the first
        call only settles at an instant equal to its argument.
        """
        if not isinstance(prices, PriceSet) or not isinstance(steps, StepTable) or not isinstance(tou, TouSchedule):
            raise TariffError("TariffState needs a PriceSet, a StepTable and a TouSchedule")
        self.prices = self.backup_prices = prices
        self.steps = self.backup_steps = steps
        self.tou = self.backup_tou = tou
        self._step_energy = _check_int(step_energy, "step energy (0.01 kWh)", 0, None)
        self._switch: dict[str, datetime | None] = {SWITCH_TOU: None, SWITCH_PRICES: None, SWITCH_STEPS: None}
        self._pending: set[str] = set()
        self.switch_version = 0
        """Counts changes of the programmed switches (a meter caches its next price boundary)."""
        self._settle_checked = None if settlement_checked_at is None else _local(settlement_checked_at)

    def __repr__(self) -> str:
        return (
            f"TariffState(step_energy={self._step_energy}, mode={self.steps.settlement_mode!r}, "
            f"pending={sorted(self._pending)})"
        )

    # -- step energy ------------------------------------------------------------------------

    @property
    def step_energy(self) -> int:
        """Energy counted for the steps since the last settlement, in 0.01 kWh."""
        return self._step_energy

    @step_energy.setter
    def step_energy(self, value: int) -> None:
        self._step_energy = _check_int(value, "step energy (0.01 kWh)", 0, None)

    def add_step_energy(self, hundredths: int) -> None:
        """Count ``hundredths`` × 0.01 kWh towards the steps."""
        self._step_energy += _check_int(hundredths, "energy (0.01 kWh)", 0, None)

    def hundredths_to_next_step(self) -> int | None:
        """How many more 0.01 kWh are priced at the current step, or None if no further step."""
        nxt = self.steps.next_threshold(self._step_energy)
        return None if nxt is None else nxt - self._step_energy

    # -- pricing ----------------------------------------------------------------------------

    def tariff_at(self, local_dt: datetime) -> int:
        """The TOU tariff (1..4) in force at ``local_dt`` under the current schedule."""
        return self.tou.tariff_at(local_dt)

    def price_at(self, local_dt: datetime) -> int:
        """The effective price (1e-4 yuan/kWh) of the next 0.01 kWh at ``local_dt``.

        TOU price of the current tariff plus the step increment for the current step energy.
        Switches are not applied here: call :meth:`apply_switches` first.
        """
        return self.prices.price(self.tou.tariff_at(local_dt)) + self.steps.increment(self._step_energy)

    # -- settlement ---------------------------------------------------------------------------

    def next_settlement(self, local_dt: datetime) -> datetime | None:
        """The next step settlement instant strictly after ``local_dt`` (current step table)."""
        return self.steps.next_settlement(local_dt)

    def settle_if_due(self, local_dt: datetime) -> bool:
        """Reset the step energy if a settlement instant passed since the previous call.

        The window is (previous call's time, ``local_dt``]; the first call (without
        ``settlement_checked_at``) checks ``local_dt`` alone. A clock set back only moves the
        window. Returns True if it settled (several instants in one window settle once).
        """
        local = _local(local_dt)
        last = self._settle_checked
        if last is not None and local < last:
            self._settle_checked = local
            return False
        since = last if last is not None else local - timedelta(microseconds=1)
        self._settle_checked = local
        due = self.steps.next_settlement(since)
        if due is not None and due <= local:
            self._step_energy = 0
            return True
        return False

    # -- two sets and switches --------------------------------------------------------------

    def apply_switches(self, local_dt: datetime) -> list[str]:
        """Make current every backup whose switch time is at or before ``local_dt``.

        Each programmed switch happens once. Returns the switched kinds in a fixed order
        (``"tou"``, ``"prices"``, ``"steps"``) so the meter can write an agreed freeze for each.
        The backup keeps its content (it equals the current set afterwards).
        """
        if not self._pending:
            _local(local_dt)
            return []
        local = _local(local_dt)
        done = []
        for kind in (SWITCH_TOU, SWITCH_PRICES, SWITCH_STEPS):
            at = self._switch[kind]
            if kind in self._pending and at is not None and at <= local:
                self._pending.discard(kind)
                self.switch_version += 1
                done.append(kind)
                if kind == SWITCH_TOU:
                    self.tou = self.backup_tou
                elif kind == SWITCH_PRICES:
                    self.prices = self.backup_prices
                else:
                    self.steps = self.backup_steps
        return done

    @property
    def has_pending_switches(self) -> bool:
        """Whether any programmed switch is still to happen."""
        return bool(self._pending)

    @property
    def pending_switches(self) -> dict[str, datetime]:
        """Programmed switches not yet applied, by kind."""
        return {k: t for k, t in self._switch.items() if k in self._pending and t is not None}

    def next_boundary(self, local_dt: datetime) -> datetime:
        """The earliest instant after ``local_dt`` at which the price may change.

        The earliest of: the next TOU change, a pending switch time, the next step settlement.
        (Step thresholds depend on energy, not time: see :meth:`hundredths_to_next_step`.)
        A switch already due at ``local_dt`` is not reported: apply it first.
        """
        local = _local(local_dt)
        best = self.tou.next_change(local)
        for at in self.pending_switches.values():
            if local < at < best:
                best = at
        settle = self.steps.next_settlement(local)
        if settle is not None and settle < best:
            best = settle
        return best

    def _set_switch(self, kind: str, at: datetime | None, what: str) -> None:
        at = _switch_time(at, what)
        self.switch_version += 1
        self._switch[kind] = at
        if at is None:
            self._pending.discard(kind)
        else:
            self._pending.add(kind)

    def set_tou_switch(self, at: datetime | None) -> None:
        """Program the TOU switch (04000106 or 04000107: schedule = time zones + day tables); None cancels."""
        self._set_switch(SWITCH_TOU, at, "TOU switch time (04000106/04000107)")

    def set_price_switch(self, at: datetime | None) -> None:
        """Program the price-set switch time (04000108); None cancels it."""
        self._set_switch(SWITCH_PRICES, at, "price switch time (04000108)")

    def set_step_switch(self, at: datetime | None) -> None:
        """Program the step-table switch time (04000109); None cancels it."""
        self._set_switch(SWITCH_STEPS, at, "step switch time (04000109)")

    # -- writers (backup sets only, as on the wire) ---------------------------------------------

    def write_backup_tou(self, schedule: TouSchedule) -> None:
        """Replace the backup TOU schedule."""
        if not isinstance(schedule, TouSchedule):
            raise TariffError(f"a TOU schedule is a TouSchedule, not {type(schedule).__name__}")
        self.backup_tou = schedule

    def write_backup_zones(self, value: Any) -> None:
        """Write the backup time-zone table from the value of 04020000 (``MMDDNN`` entries).

        The zones must name day tables the backup set has: write the day tables first.
        """
        self.backup_tou = self.backup_tou.with_zones_di(value)

    def write_backup_day_table(self, n: int, value: Any) -> None:
        """Write backup day table ``n`` (1..8) from the value of 0402000n (``hhmmNN`` entries)."""
        self.backup_tou = self.backup_tou.with_day_table_di(n, value)

    def write_backup_prices(self, values: Sequence[Decimal | int | str]) -> None:
        """Write the backup price set from the value of 040502FF (yuan/kWh, 4 decimals)."""
        self.backup_prices = PriceSet.from_di(values)

    def write_backup_steps(self, record: Mapping[str, Any]) -> None:
        """Write the backup step table from the value of 040605FF as decoded by ``DI_2007``."""
        self.backup_steps = StepTable.from_di(record)

    # -- readers (DI values) ----------------------------------------------------------------------

    def read_current_prices(self) -> list[Decimal]:
        """040501FF."""
        return self.prices.to_di()

    def read_backup_prices(self) -> list[Decimal]:
        """040502FF."""
        return self.backup_prices.to_di()

    def read_current_steps(self) -> dict[str, Any]:
        """040604FF."""
        return self.steps.to_di()

    def read_backup_steps(self) -> dict[str, Any]:
        """040605FF."""
        return self.backup_steps.to_di()

    def read_tou_switch(self) -> datetime | None:
        """04000106 and 04000107, one switch here (None reads as all zero)."""
        return self._switch[SWITCH_TOU]

    def read_price_switch(self) -> datetime | None:
        """04000108 (None reads as all zero)."""
        return self._switch[SWITCH_PRICES]

    def read_step_switch(self) -> datetime | None:
        """04000109 (None reads as all zero)."""
        return self._switch[SWITCH_STEPS]

    def read_di(self, di: int) -> Any:
        """The value of a tariff DI, as ``DI_2007.lookup(di)`` encodes it, or None if not served.

        Served: 040501FF/040502FF, 0405010n/0405020n (price of Tn), 040604FF/040605FF,
        04010000/04020000 (time zones), 0401000n/0402000n (day table n) and
        04000106/04000107/04000108/04000109. None for any other DI, for a tariff the set does
        not price and for a day table the set does not have, so a meter can ask here first and
        fall through to its other registers. (An unset
        switch time is served: it reads as all zero, and the caller gets the sentinel
        ``None`` too; check :meth:`serves` to tell them apart.)
        """
        simple = {
            _DI_CURRENT_PRICES: self.read_current_prices,
            _DI_BACKUP_PRICES: self.read_backup_prices,
            _DI_CURRENT_STEPS: self.read_current_steps,
            _DI_BACKUP_STEPS: self.read_backup_steps,
            _DI_TOU_SWITCH: self.read_tou_switch,
            _DI_DAY_TABLE_SWITCH: self.read_tou_switch,
            _DI_PRICE_SWITCH: self.read_price_switch,
            _DI_STEP_SWITCH: self.read_step_switch,
            _DI_CURRENT_ZONES: self.tou.zones_di,
            _DI_BACKUP_ZONES: self.backup_tou.zones_di,
        }
        if di in simple:
            return simple[di]()
        if di >> 8 in (_DI_CURRENT_ZONES >> 8, _DI_BACKUP_ZONES >> 8) and 1 <= di & 0xFF <= MAX_DAY_TABLES:
            schedule = self.tou if di >> 8 == _DI_CURRENT_ZONES >> 8 else self.backup_tou
            return schedule.day_table_di(di & 0xFF)
        if di >> 8 in (0x040501, 0x040502):
            prices = self.prices if di >> 8 == 0x040501 else self.backup_prices
            n = di & 0xFF
            if not 1 <= n <= len(prices.prices):
                return None
            return Decimal(prices.prices[n - 1]).scaleb(-4)
        return None

    def serves(self, di: int) -> bool:
        """Whether :meth:`read_di` answers ``di`` (switch times included, even when unset)."""
        if di in (_DI_TOU_SWITCH, _DI_DAY_TABLE_SWITCH, _DI_PRICE_SWITCH, _DI_STEP_SWITCH):
            return True
        return self.read_di(di) is not None

    def write_di(self, di: int, value: Any) -> None:
        """Write a writable tariff DI: 040502FF, 040605FF, 04020000, 04020001..08, 04000106,
        04000107 (the same TOU switch as 04000106), 04000108 or 04000109.

        Raises :class:`TariffError` for a value the meter refuses (:class:`TariffNumberError`
        for a tariff beyond T4) and :class:`UnknownTariffItem` (also a ``KeyError``) for any
        other DI.
        """
        if di == _DI_BACKUP_ZONES:
            self.write_backup_zones(value)
        elif di >> 8 == _DI_BACKUP_ZONES >> 8 and 1 <= di & 0xFF <= MAX_DAY_TABLES:
            self.write_backup_day_table(di & 0xFF, value)
        elif di == _DI_BACKUP_PRICES:
            self.write_backup_prices(value)
        elif di == _DI_BACKUP_STEPS:
            self.write_backup_steps(value)
        elif di in (_DI_TOU_SWITCH, _DI_DAY_TABLE_SWITCH):
            self.set_tou_switch(value)
        elif di == _DI_PRICE_SWITCH:
            self.set_price_switch(value)
        elif di == _DI_STEP_SWITCH:
            self.set_step_switch(value)
        else:
            raise UnknownTariffItem(f"DI {di:08X} is not a writable tariff item")
