"""One simulated cost-control meter: registers, tariffs, wallet, relay, ESAM, logs and clock.

A :class:`Meter` never reads the wall clock. ``advance(now)`` integrates the customer's load
from the last observed instant to ``now`` from event to event: an interval ends where the
price or the relay may change (tariff period, price or step switch, step settlement, relay
timer, daily freeze) or where the energy drawn reaches a step threshold or the next wallet
state, solved to the millisecond. Inside an interval the load's 15-minute slots are only summed
(the hourly freezes read the running totals), so an idle meter costs nothing until it is
observed, catching up a day costs a handful of intervals, and an observed meter is exactly
where a ticking one would be.

Units: energy in 0.01 kWh ("hundredths", the register resolution), money in fen at the
interfaces and micro-yuan inside the wallet, prices in 1e-4 yuan/kWh, time in integer
milliseconds since the epoch (UTC) inside, aware datetimes at the API.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from types import MappingProxyType

from protocols.dlt645 import METER_TZ, MeterProfile
from protocols.dlt645.profile import SGCC_2013

from .clock import GUARD_MS, MeterClock
from .esam import SimulatedEsam
from .freezes import DailyFreeze, DailyRing, EnergySnapshot, HourlyRing, SnapshotRing
from .load import ConstantLoad, LoadSource, energies_between
from .relay import Relay, RelayState
from .tariff import TariffState
from .wallet import FEN, Ladder, Limits, Wallet, WalletUnit

HUNDREDTH_MJ = 36_000_000
"""0.01 kWh in millijoules (watts x milliseconds)."""
ROLLOVER = 100_000_000
"""Energy registers are XXXXXX.XX: 999999.99 kWh, then 0 (a BCD register rolls over)."""
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
_UTC8_MS = 8 * HOUR_MS  # METER_TZ is UTC+8 without daylight saving


class MeterStalled(RuntimeError):
    """:meth:`Meter.advance` stopped making progress (a bug in the event loop, never a meter state)."""


class CostMode(StrEnum):
    """Which side holds the balance (prepaid.md §1.1)."""

    LOCAL = "local"
    REMOTE = "remote"


def reactive_per_100(power_factor: int) -> int:
    """Reactive hundredths per 100 active hundredths at ``power_factor`` (0.001): 100 tan(acos PF).

    33 at the default 0.950 (tan 18.19 deg = 0.3287). Computed once per meter, with floats (a
    ratio of energies, not money); the register itself is counted in integers.
    """
    if not 0 < power_factor <= 1000:
        raise ValueError(f"power factor {power_factor / 1000} is outside (0, 1]")
    pf = power_factor / 1000
    return round(100 * math.sqrt(1 - pf * pf) / pf)


def _push(log: list, item: object, maxlen: int) -> None:
    """Add ``item`` as the newest entry of ``log``, keeping at most ``maxlen``."""
    log.insert(0, item)
    if len(log) > maxlen:
        del log[maxlen:]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def to_ms(t: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    if t.tzinfo is None:
        raise ValueError("meter times must be timezone-aware")
    return (t - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    """The UTC datetime of an epoch-millisecond count."""
    return _EPOCH + timedelta(milliseconds=ms)


@dataclass(frozen=True, slots=True)
class RelayRecord:
    """A trip (1D00) or close (1E00) record: time, operator and energies (dlt645.md §3.7).

    Record times (here, in programming records, purchases and freezes) are readings of the
    meter's own clock in epoch ms, as the meter stamps them, not true time.
    """

    time_ms: int
    operator: str
    forward: int
    reverse: int


@dataclass(frozen=True, slots=True)
class ProgramRecord:
    """A programming record: time, operator code and DI (prepaid.md §1.7)."""

    time_ms: int
    operator: str
    di: int


class EventClass(IntEnum):
    """The 0330 ee event classes the model records, by their DI1 ee (dlt645.md §3.7, FW-B EventTable).

    Each is counted (0330ee00) and its last :data:`EVENT_RECORDS` records are kept. The others
    of §3.7 (weekend and settlement-day programming, cover opening, key update, abnormal card
    insertion, refunds) cannot happen in the simulation: no command of the model does them.
    """

    METER_CLEAR = 0x01
    DEMAND_CLEAR = 0x02
    EVENT_CLEAR = 0x03
    TIME_SET = 0x04
    """04000101/04000102 writes only: prepaid.md §1.7, "time settings ... excluding broadcast ones"."""
    DAY_TABLE = 0x05
    TIME_ZONE = 0x06
    PRICES = 0x0F
    LADDER = 0x10


EVENT_RECORDS = 10
"""Records kept per event class (prepaid.md §1.7: "the last 10"; dlt645.md §3.7: up to 10)."""


def table_programming(di: int) -> EventClass | None:
    """The table-programming class a successful write of ``di`` also counts in, besides the
    programming record (dlt645.md §3.7: 033005 period-table, 033006 time-zone, 03300F
    rate-price, 033010 ladder programming): 0401/0402 00 the time-zone tables, 0401/0402 01..
    their day tables, 0405 the price tables, 0406 the ladder tables (§3.4)."""
    if di >> 16 == 0x0401 or di >> 16 == 0x0402:
        if di & 0xFFFF == 0:
            return EventClass.TIME_ZONE
        return EventClass.DAY_TABLE if di >> 8 & 0xFF == 0 else None
    if di >> 16 == 0x0405:
        return EventClass.PRICES
    if di >> 16 == 0x0406:
        return EventClass.LADDER
    return None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A 0330ee event record: when by the meter's clock, the operator code of the command
    (dlt645.md §2.3: "要求从站记录操作者代码"; prepaid.md §1.7), and what the class keeps.

    ``di``: the DI programmed (table programming) or the event cleared (event clear, FFFFFFFF =
    all). ``forward``/``reverse``: the active totals (hundredths) at the event (meter clear:
    prepaid.md §1.7, "meter clear, with energy at the time"). ``before_ms``: a time set's
    clock reading before it was set (``time_ms`` is the reading it was set to).
    """

    time_ms: int
    operator: str
    di: int = 0xFFFFFFFF
    forward: int = 0
    reverse: int = 0
    before_ms: int | None = None


@dataclass(slots=True)
class EventLog:
    """One event class: its total count (0330ee00) and the last records, newest first."""

    count: int = 0
    records: list[EventRecord] = field(default_factory=list)


_NO_EVENTS: Mapping[EventClass, EventLog] = MappingProxyType({})
"""Every meter's event logs until its first event: fleets of 1e5 meters pay nothing for them."""


@dataclass
class MeterConfig:
    """How a meter is built; everything has a realistic default."""

    address: str
    meter_number: str | None = None
    customer: str = "000000000000"
    mode: CostMode = CostMode.LOCAL
    profile: MeterProfile = SGCC_2013
    wallet_unit: WalletUnit = WalletUnit.MONEY
    balance_fen: int = 10_000
    limits: Limits = field(default_factory=Limits)
    opened: bool = True
    purchase_count: int = 1
    external_relay: bool = False
    trip_delay_min: int = 0
    large_current_ma: int = 0
    """04001402 in mA: above it an internal relay's trip waits for the current to fall (0 = off;
    prepaid.md §1.5)."""
    large_current_delay_min: int = 0
    """04001403: the longest such wait in minutes (at most 24 h; 0 = no wait)."""
    clock_offset_s: float = 0.0
    drift_ppm: float = 0.0
    factory_mode: bool = False
    passwords: dict[int, str] = field(default_factory=lambda: {0x02: "123456", 0x04: "000000"})
    voltage_dv: int = 2200
    """Nominal voltage in 0.1 V."""
    power_factor: int = 950
    """Power factor in 0.001."""
    seed: int = 0
    freezes: bool = True
    """Keep daily and hourly freezes (packed, firmware_stubs/freezes.py: about 8.3 KB per meter once full)."""


class Meter:
    """One meter: a deterministic state machine driven by time and request frames."""

    events: Mapping[EventClass, EventLog] = _NO_EVENTS
    """The 0330ee event logs per class: this shared empty mapping until the meter's first event,
    then the meter's own dict (a class's log is created at its first event)."""

    def __init__(
        self,
        config: MeterConfig,
        load: LoadSource | None = None,
        start: datetime | None = None,
        tariff: TariffState | None = None,
        esam: SimulatedEsam | None = None,
    ) -> None:
        self.config = config
        self.address = config.address
        self.meter_number = config.meter_number or config.address
        self.profile = config.profile
        self.mode = config.mode
        self.load: LoadSource = load if load is not None else ConstantLoad(0)
        start_ms = to_ms(start) if start is not None else 0
        self._t = start_ms
        self.clock = MeterClock(start_ms, int(config.clock_offset_s * 1000), config.drift_ppm)
        self.tariff = tariff if tariff is not None else TariffState(settlement_checked_at=self.clock.local(start_ms))
        self.esam = esam if esam is not None else SimulatedEsam(self.meter_number, seed=config.seed)
        remote = config.mode is CostMode.REMOTE
        # Remote cost control keeps no wallet (prepaid.md §1.1: the master station holds the balance,
        # the meter "keeps no money register"; dlt645.md §5.6): a configured balance or purchase
        # count does not apply, the wallet stays empty and nothing ever deducts from it.
        self.wallet = Wallet(
            config.wallet_unit,
            0 if remote else config.balance_fen,
            config.customer,
            config.limits,
            config.opened,
            0 if remote else config.purchase_count,
            self.clock.meter_ms(start_ms) if start is not None and not remote else None,
        )
        self.relay = Relay(external=config.external_relay)
        self.forward = [0, 0, 0, 0, 0]  # total, T1..T4 in hundredths
        self.reverse = [0, 0, 0, 0, 0]
        self.reactive = 0  # combined reactive 1 total, hundredths of kvarh
        self._react_rem = 0  # hundredths x _react_per_100 not yet a whole reactive hundredth
        self._react_per_100 = reactive_per_100(config.power_factor)
        self._window_cache: tuple | None = None  # Meter._window
        self._settle_cache: tuple | None = None  # Meter._settlement_after
        self._fwd_mj = 0
        self._rev_mj = 0
        # Logs are lists, newest first, capped by _push (empty lists are small: fleets of 1e5).
        self.trips: list[RelayRecord] = []
        self.closes: list[RelayRecord] = []
        self.programs: list[ProgramRecord] = []
        self.program_count = 0
        self.trip_count = 0
        self.close_count = 0
        self.relay_faults: list[RelayRecord] = []
        """Load-switch malfunction (负荷开关误动) records, newest first (prepaid.md §1.5)."""
        self.relay_fault_count = 0
        self.daily: DailyRing | None = DailyRing() if config.freezes else None
        self.hourly: HourlyRing | None = HourlyRing() if config.freezes else None
        self.instant: list[EnergySnapshot] = []
        self.settlements = SnapshotRing()
        self.lost_topups = 0
        """Fault injection: this many next accepted top-ups are acknowledged but not applied."""
        self.password_errors: dict[int, tuple[int, int]] = {}  # level -> (count, locked_until_ms)
        self.trip_delay_min = config.trip_delay_min
        self.large_current_ma = config.large_current_ma
        self.large_current_delay_min = config.large_current_delay_min
        self.pending_reads: dict[int, list] = {}  # follow-up parts per DI (dispatcher)
        # The next hourly and daily freeze, on the meter's own clock (epoch ms of its reading) and
        # the true instant the clock shows it; a clock change reschedules both (_clock_changed).
        self._next_hour_meter = 0
        self._next_hour = 0
        self._next_day_meter = 0
        self._next_day = 0
        self._clock_version = -1
        self._schedule_freezes(start_ms)
        self._ladder = self.wallet.ladder() if self.mode is CostMode.LOCAL else Ladder.NORMAL
        self.relay.last_local = self._ladder
        if self.mode is CostMode.LOCAL and self._ladder is Ladder.OVERDRAFT:
            self._on_ladder(self._ladder, start_ms)
            self._drain_relay_events()  # the trip record belongs to the start, not to the next command

    # --- time -----------------------------------------------------------------------------------

    @property
    def now_ms(self) -> int:
        """The true time up to which the meter has been advanced."""
        return self._t

    def local_time(self, t_ms: int | None = None) -> datetime:
        """The meter's own clock (with offset and drift) at true time ``t_ms``, in METER_TZ."""
        return self.clock.local(self._t if t_ms is None else t_ms)

    def _true(self, meter_ms: int) -> int:
        """The true instant (ms) at which the meter's clock first reads ``meter_ms``."""
        clock = self.clock
        return meter_ms - clock.offset_ms if not clock.drift_ppm else clock.true_ms(meter_ms)

    def _schedule_freezes(self, t: int) -> None:
        """Schedule the next hourly and daily freeze after the meter's reading at ``t``."""
        reading = self.clock.meter_ms(t)
        self._next_hour_meter = (reading // HOUR_MS + 1) * HOUR_MS
        self._next_hour = self._true(self._next_hour_meter)
        self._next_day_meter = ((reading + _UTC8_MS) // DAY_MS + 1) * DAY_MS - _UTC8_MS  # next local midnight
        self._next_day = self._true(self._next_day_meter)
        self._clock_version = self.clock.version

    def _clock_changed(self) -> None:
        """The meter's clock was set (time set, broadcast sync, clock jump) at the meter's now.

        The freezes follow the clock: a freeze time the clock passed by jumping over it is written
        at once (one per hour / per midnight passed, stamped with its own time, the registers as
        they are; at most a ring's capacity), and the next ones are scheduled from the new reading,
        so a clock set back repeats the freezes it passes again. A tariff switch or step settlement
        the clock jumped over happens now; one it went back across is armed again (the settlement
        window restarts from the new reading). [A]: the reference gives no firmware rule for a time
        set across a freeze time; this is what "freeze at the meter's own midnight" implies.
        """
        t = self._t
        reading = self.clock.meter_ms(t)
        if reading >= self._next_hour_meter and self.hourly is not None:
            last = reading // HOUR_MS * HOUR_MS
            first = max(self._next_hour_meter, last - (self.hourly.capacity - 1) * HOUR_MS)
            for hour in range(first, last + 1, HOUR_MS):
                self.hourly.push_totals(hour, self.forward[0], self.reverse[0])
        if reading >= self._next_day_meter:
            last = (reading + _UTC8_MS) // DAY_MS * DAY_MS - _UTC8_MS
            first = max(self._next_day_meter, last - (DailyRing.capacity - 1) * DAY_MS)
            for midnight in range(first, last + 1, DAY_MS):
                self._daily_freeze(midnight)
        self._schedule_freezes(t)
        local = self.clock.local(t)
        self._switch_tariffs(local, t)
        self.tariff.settle_if_due(local)
        self._settle_cache = self._window_cache = None

    def set_clock(self, meter_ms: int, operator: str | None = None) -> None:
        """A time set (04000101/04000102): the clock reads ``meter_ms`` now (call after advancing).

        With the command's ``operator`` code it is a time-setting event (033004, dlt645.md
        §3.7): the reading before and the one set are recorded.
        """
        before = self.clock.meter_ms(self._t)
        self.clock.set(meter_ms, self._t)
        self._clock_changed()
        if operator is not None:
            self.record_event(EventClass.TIME_SET, operator, before_ms=before)

    def broadcast_sync(self, new_meter_ms: int) -> bool:
        """A broadcast time (0x08): applied only within the rules of :meth:`MeterClock.broadcast_sync`,
        guarded at midnight (the daily freeze and the monthly settlement, day 1 00:00) and at the
        step settlement instants (prepaid.md §1.3) around the meter's reading."""
        applied = self.clock.broadcast_sync(new_meter_ms, self._t, self._settlement_guards())
        if applied:
            self._clock_changed()
        return applied

    def _settlement_guards(self) -> list[int]:
        """The step settlement instants (meter-clock ms) within the broadcast guard of the reading."""
        at = self.tariff.next_settlement(self.clock.local(self._t) - timedelta(milliseconds=GUARD_MS))
        return [] if at is None else [to_ms(at)]

    def jump_clock(self, seconds: int) -> None:
        """Fault injection (simulator/faults.py, clock_jump): the clock jumps by ``seconds`` now."""
        self.clock.jump(seconds, self._t)
        self._clock_changed()

    def advance(self, now: datetime | int) -> None:
        """Integrate consumption and run timers up to ``now`` (never backwards).

        The meter goes from event to event, not per load slot: an *event* is a tariff boundary
        (TOU period, price or step switch, step settlement), a relay timer, the daily freeze,
        or an energy threshold (the next step threshold, the next wallet state of prepaid.md
        §1.4) reached inside the load. Between two events the tariff, the price and the relay
        are fixed, so the load's pieces (15-minute slots) are only summed, committed to the
        registers at each hourly freeze; the instant an energy threshold is reached is solved
        exactly (to the millisecond) inside the piece that reaches it.
        """
        target = now if isinstance(now, int) else to_ms(now)
        if self.clock.version != self._clock_version:
            self._clock_changed()  # set from outside (meter.clock.set / jump): reschedule first
        t = self._t
        if target <= t:
            return
        stalled = False
        while t < target:
            nxt = self._interval(t, target)
            if nxt <= t:
                # An interval may end where it began once (a trip held by large current happens at
                # t); twice in a row nothing can change any more: fail loudly instead of spinning.
                if nxt < t or stalled:
                    raise MeterStalled(
                        f"meter {self.address}: advance to {target} made no progress at {t} "
                        f"(relay {self.relay.state.value}, awaiting_current={self.relay.awaiting_current})"
                    )
                stalled = True
            else:
                stalled = False
            t = nxt
            self._t = t
            self._after_step(t)
            if t == target and self.relay.awaiting_current and not self.large_current():
                self.relay.current_fell(t)  # observed at its end: the trip is not left for later
                self._drain_relay_events()
        self._t = target

    def _window(self, t: int) -> tuple[int, int, int]:
        """(boundary, tariff, TOU price) from ``t``: the next instant (true ms, > t) at which the
        price may change by time (TOU period, pending switch, step settlement:
        :meth:`TariffState.next_boundary`), the tariff in force and its TOU price. Cached until
        the boundary, or until the tables, the switches or the clock change."""
        tariff, clock = self.tariff, self.clock
        key = (tariff.tou, tariff.prices, tariff.steps, tariff.switch_version, clock.version)
        cached = self._window_cache
        if cached is not None and cached[0] == key and cached[1] <= t < cached[2]:
            return cached[2], cached[3], cached[4]
        meter_t = clock.meter_ms(t)
        number, change = tariff.tou.at_wall_ms(meter_t + _UTC8_MS)
        best = change - _UTC8_MS  # meter ms
        if tariff.has_pending_switches:
            for at in tariff.pending_switches.values():
                at_ms = to_ms(at)
                if meter_t < at_ms < best:
                    best = at_ms  # a switch already due is applied by _after_step first
        boundary = clock.true_ms(best)
        settle = self._settlement_after(t, key)
        if settle is not None and settle < boundary:
            boundary = settle
        boundary = max(boundary, t + 1)
        price = tariff.prices.price(number)
        self._window_cache = (key, t, boundary, number, price)
        return boundary, number, price

    def _settlement_after(self, t: int, key: tuple) -> int | None:
        """The next step settlement (true ms) after ``t`` (None: the table never settles), cached."""
        cached = self._settle_cache
        if cached is not None and cached[0] == key[2:] and cached[1] <= t and (cached[2] is None or t < cached[2]):
            return cached[2]
        at = self.tariff.next_settlement(self.clock.local(t))
        settle = None if at is None else self.clock.true_ms(to_ms(at))
        self._settle_cache = (key[2:], t, settle)
        return settle

    def _interval(self, t: int, target: int) -> int:
        """Integrate from ``t`` to the next event (at most ``target``); returns where it stopped."""
        end = min(target, self._next_day)
        relay = self.relay
        deadline = relay.next_deadline()
        if deadline is not None and deadline > t:
            end = min(end, deadline)
        boundary, number, tou_price = self._window(t)
        end = min(end, boundary)
        if relay.awaiting_current and relay.state is RelayState.TRIP_PENDING:
            # A trip held by large current happens when the current falls (prepaid.md §1.5): look
            # again at every change of the load and every minute (the voltage moves each minute).
            if not self.large_current():
                relay.current_fell(t)
                return t  # the trip is at t: _after_step records it, the next interval is open
            _, until = self.load.power_at(t)
            end = min(end, max(until, t + 1), (t // 60_000 + 1) * 60_000)
        if relay.contact_open():
            return end  # no supply: the registers stand still (hourly freezes: _after_step)
        tariff = self.tariff
        price = tou_price + tariff.steps.increment(tariff.step_energy)
        cost = self._cost_per_hundredth(price)
        # Energy-driven events: the next step threshold and the next wallet state, as a budget of
        # forward energy (mJ) from t; the interval stops where the load has used it up.
        need = tariff.hundredths_to_next_step()
        if need is not None and need <= 0:
            need = None
        if self.mode is CostMode.LOCAL and cost > 0:
            micro = self.wallet.micro_to_next_state()
            if micro is not None:
                n = -(-micro // cost)
                need = n if need is None or n < need else need
        budget = None if need is None else need * HUNDREDTH_MJ - self._fwd_mj
        # The hourly freezes inside the interval cut it into ranges; one pass over the load gives
        # the energy of each range.
        bounds = [t]
        hour, hour_meter = self._next_hour, self._next_hour_meter
        while hour < end:
            bounds.append(hour)
            hour_meter += HOUR_MS
            hour = self._true(hour_meter)
        bounds.append(end)
        ranges = energies_between(self.load, bounds)
        if budget is not None:
            used = 0
            for i, (f, _r) in enumerate(ranges):
                if used + f >= budget:  # the energy event falls in this range: the interval ends there
                    end = self._reach(bounds[i], budget - used)
                    del bounds[i + 1 :], ranges[i:]
                    bounds.append(end)
                    ranges.extend(energies_between(self.load, bounds[i:]))
                    break
                used += f
        fwd = rev = 0
        if len(bounds) > 2:
            # The hourly freezes strictly inside hold the totals of their instant (0504xxxx); the
            # hundredths counted are (remainder + energy so far) // 0.01 kWh.
            f0, r0, fmj, rmj = self.forward[0], self.reverse[0], self._fwd_mj, self._rev_mj
            push = self.hourly.push_totals if self.hourly is not None else None
            stamp = self._next_hour_meter  # the freezes carry the meter's clock: whole hours
            for i in range(1, len(bounds) - 1):
                f, r = ranges[i - 1]
                fwd += f
                rev += r
                if push is not None:
                    push(
                        stamp + (i - 1) * HOUR_MS,
                        (f0 + (fmj + fwd) // HUNDREDTH_MJ) % ROLLOVER,
                        (r0 + (rmj + rev) // HUNDREDTH_MJ) % ROLLOVER,
                    )
            self._next_hour_meter = stamp + (len(bounds) - 2) * HOUR_MS
            self._next_hour = self._true(self._next_hour_meter)
        f, r = ranges[-1]
        self._commit(fwd + f, rev + r, number, cost)
        return end

    def _reach(self, start_ms: int, mj: int) -> int:
        """The first millisecond at which the load has drawn ``mj`` (> 0) forward energy since ``start_ms``."""
        a = start_ms
        power_at = self.load.power_at
        while True:
            watts, until = power_at(a)
            b = max(until, a + 1)
            if watts > 0:
                if watts * (b - a) >= mj:
                    return a + max(1, -(-mj // watts))
                mj -= watts * (b - a)
            a = b

    def _cost_per_hundredth(self, price: int) -> int:
        # 0.01 kWh at p (1e-4 yuan/kWh) costs exactly p micro-yuan (prepaid.md §1.3);
        # an energy wallet loses 0.01 kWh = 10,000 micro-kWh.
        return FEN if self.wallet.unit is WalletUnit.ENERGY else price

    def _commit(self, fwd_mj: int, rev_mj: int, tariff: int, cost: int) -> None:
        """Count forward and reverse energy (mJ) into the registers of ``tariff`` and the wallet."""
        if fwd_mj:
            self._fwd_mj += fwd_mj
            n, self._fwd_mj = divmod(self._fwd_mj, HUNDREDTH_MJ)
            if n:
                fwd = self.forward
                fwd[0] = (fwd[0] + n) % ROLLOVER
                fwd[tariff] = (fwd[tariff] + n) % ROLLOVER
                # tan(acos PF) x 100 per hundredth; the remainder is carried, so the register does
                # not depend on how often the meter is observed.
                q, self._react_rem = divmod(self._react_rem + n * self._react_per_100, 100)
                self.reactive = (self.reactive + q) % ROLLOVER
                self.tariff.add_step_energy(n)
                if self.mode is CostMode.LOCAL:
                    self.wallet.deduct(n * cost)
        if rev_mj:
            self._rev_mj += rev_mj
            n, self._rev_mj = divmod(self._rev_mj, HUNDREDTH_MJ)
            if n:
                rev = self.reverse
                rev[0] = (rev[0] + n) % ROLLOVER
                rev[tariff] = (rev[tariff] + n) % ROLLOVER

    def _hourly_freezes(self, t: int) -> None:
        """Write the hourly freezes due at or before ``t`` (more than one only while nothing moved)."""
        while t >= self._next_hour:
            if self.hourly is not None:
                self.hourly.push_totals(self._next_hour_meter, self.forward[0], self.reverse[0])
            self._next_hour_meter += HOUR_MS
            self._next_hour = self._true(self._next_hour_meter)

    def _daily_freeze(self, midnight_meter_ms: int) -> None:
        """The daily freeze (with the prepaid snapshot) stamped ``midnight_meter_ms``; on day 1 the
        monthly settlement too (dlt645.md §3.6; prepaid.md §1.7: 62 daily freezes with money)."""
        if self.daily is not None:
            w = self.wallet
            self.daily.push(DailyFreeze(self.snapshot(midnight_meter_ms), w.remaining_fen, w.overdraft_fen, w.count))
        if from_ms(midnight_meter_ms + _UTC8_MS).day == 1:
            self.settlements.push(self.snapshot(midnight_meter_ms))  # monthly settlement, day 1 00:00

    def _switch_tariffs(self, local: datetime, t: int) -> list[str]:
        """Apply the tariff switches due at ``local``, each with its agreed freeze; returns them."""
        switched = self.tariff.apply_switches(local)
        for kind in switched:
            from .agreed import record_agreed_freeze  # kept apart from the freeze lists below

            # The agreed freeze of a switch (prepaid.md §1.3), read as 0502/0505/0507 (dlt645.md §3.6).
            record_agreed_freeze(self, kind, self.snapshot(self.clock.meter_ms(t)))
        return switched

    def _after_step(self, t: int) -> None:
        """The events at ``t``: relay timers, the ladder, tariff switches and settlement, freezes."""
        relay = self.relay
        if relay.pending_state is not None:
            relay.tick(t, self.large_current(), self.large_current_delay_min)
        elif relay.redrive_ms is not None:
            relay.tick(t)
        if self.mode is CostMode.LOCAL:
            ladder = self.wallet.ladder()
            if ladder is not self._ladder:
                self._ladder = ladder
                self._on_ladder(ladder, t)
        settle = self._settle_cache
        due = settle is None or (settle[2] is not None and t >= settle[2])
        if due or self.tariff.has_pending_switches:
            local = self.clock.local(t)
            switched = self._switch_tariffs(local, t)
            if switched or due:
                # Only where a settlement can be due: the window of settle_if_due is (previous
                # call, now], and the intervals end at every settlement instant.
                self.tariff.settle_if_due(local)
                self._settle_cache = self._window_cache = None
        self._hourly_freezes(t)
        if t >= self._next_day:
            self._daily_freeze(self._next_day_meter)
            self._next_day_meter += DAY_MS
            self._next_day = self._true(self._next_day_meter)
        if self.relay.events:
            self._drain_relay_events()

    def _drain_relay_events(self, operator: str = "00000000") -> None:
        """Write the relay's trip, close and malfunction events into the logs.

        Each carries the operator code of the command behind it (prepaid.md §1.7): the one a timer
        keeps (a trip after the trip delay, a pre-trip's restore), else ``operator`` (the command
        being executed; 00000000 for the meter's own actions), stamped with the meter's clock.
        """
        for kind, when, by in self.relay.events:
            record = RelayRecord(self.clock.meter_ms(when), by or operator, self.forward[0], self.reverse[0])
            if kind == "trip":
                _push(self.trips, record, 10)
                self.trip_count += 1
            elif kind == "malfunction":
                _push(self.relay_faults, record, 10)
                self.relay_fault_count += 1
            else:
                _push(self.closes, record, 10)
                self.close_count += 1
        self.relay.events.clear()

    def snapshot(self, stamp_ms: int | None = None) -> EnergySnapshot:
        """The energy registers now, stamped with the meter's clock now (or with ``stamp_ms``, a
        reading of the meter's clock: a freeze carries the freeze time it was due at)."""
        stamp = self.clock.meter_ms(self._t) if stamp_ms is None else stamp_ms
        return EnergySnapshot(stamp, tuple(self.forward), tuple(self.reverse))

    # --- instantaneous values --------------------------------------------------------------------

    @property
    def power_w(self) -> int:
        """Active power at the last observed instant (negative when exporting)."""
        if self.relay.contact_open():
            return 0
        return self.load.power_at(self._t)[0]

    def voltage_dv(self) -> int:
        """Phase voltage in 0.1 V: nominal, minus a small drop with load, plus seeded jitter."""
        jitter = ((self._t // 60_000) * 2654435761 + self.config.seed) % 41 - 20  # +-2 V, changes each minute
        return self.config.voltage_dv + jitter - abs(self.power_w) // 500

    def large_current(self) -> bool:
        """Whether large-current protection holds a trip now: an internal relay, 04001402 set and
        the current above it (prepaid.md §1.5)."""
        return self.large_current_ma > 0 and not self.relay.external and abs(self.current_ma()) > self.large_current_ma

    def _on_ladder(self, ladder: Ladder, t: int, released: bool = False) -> None:
        """Tell the relay the wallet's new state (it may trip, held by large current: §1.5)."""
        self.relay.on_ladder(ladder, t, released, self.large_current(), self.large_current_delay_min)

    def current_ma(self) -> int:
        """Phase current in mA, consistent with power, voltage and power factor (signed)."""
        p = self.power_w
        if p == 0:
            return 0
        return p * 10_000_000 // (self.voltage_dv() * self.config.power_factor)

    def apparent_dva(self) -> int:
        """Apparent power in 0.1 VA: |P| / PF (rounded down)."""
        return abs(self.power_w) * 10_000 // self.config.power_factor

    def reactive_dvar(self) -> int:
        """Reactive power in 0.1 var, signed like the active power: P tan(acos PF) = P sqrt(1 - PF^2) / PF,
        in integers (rounded down in magnitude).

        The combined reactive register counts the same ratio per 0.01 kWh of forward energy, rounded
        to whole percent (:func:`reactive_per_100`).
        """
        p, pf = abs(self.power_w) * 10, self.config.power_factor
        q = math.isqrt(p * p * (1_000_000 - pf * pf)) // pf
        return q if self.power_w >= 0 else -q

    # --- wallet and relay operations (called by the dispatcher and the simulator) ------------------

    def ladder(self) -> Ladder:
        """The wallet's balance state (always NORMAL in remote cost control)."""
        return self.wallet.ladder() if self.mode is CostMode.LOCAL else Ladder.NORMAL

    def press_button(self, now: datetime | int) -> bool:
        """The customer presses the relay button for 3 s."""
        self.advance(now)
        done = self.relay.press_button(self._t, self.ladder())
        self._drain_relay_events()
        return done

    def relay_malfunction(self, on: bool) -> None:
        """Fault injection: the relay sticks where it is now (``on``), or is repaired (prepaid.md §1.5)."""
        if on:
            self.relay.strike(self._t)
        else:
            self.relay.repair(self._t)
        self._drain_relay_events()

    def set_limits(self, limits: Limits, operator: str, di: int) -> None:
        """Change wallet parameters (re-evaluates the ladder, prepaid.md §1.5)."""
        self.wallet.check_limits(limits)
        self.wallet.limits = limits
        self.record_program(operator, di)
        if self.mode is CostMode.LOCAL:
            ladder = self.wallet.ladder()
            if (
                self.relay.state.value == "local_trip"
                and ladder is not Ladder.OVERDRAFT
                and self.wallet.balance > limits.close_allowed * FEN
            ):
                self.relay.after_top_up(ladder, True, self._t)
            self._ladder = ladder
            self._on_ladder(ladder, self._t)
            self._drain_relay_events(operator)

    def record_program(self, operator: str, di: int) -> None:
        """A programming event with its operator code (prepaid.md §1.7)."""
        _push(self.programs, ProgramRecord(self.clock.meter_ms(self._t), operator, di), 10)
        self.program_count += 1
        table = table_programming(di)
        if table is not None:
            self.record_event(table, operator, di=di)

    def record_event(self, kind: EventClass, operator: str, di: int = 0xFFFFFFFF, before_ms: int | None = None) -> None:
        """A 0330ee event (dlt645.md §3.7) now, by the meter's clock, with the active totals as
        they are (a meter clear records them before it clears)."""
        record = EventRecord(self.clock.meter_ms(self._t), operator, di, self.forward[0], self.reverse[0], before_ms)
        events = self.events
        if not isinstance(events, dict):
            events = self.events = {}
        log = events.get(kind)
        if log is None:
            log = events[kind] = EventLog()
        _push(log.records, record, EVENT_RECORDS)
        log.count += 1

    def apply_top_up(self, amount_fen: int, count: int, customer: str, opening: bool) -> bool:
        """Run the wallet rules of dlt645.md §5.3, then the relay rules of prepaid.md §1.5.

        ``amount_fen`` is in fen, or in 0.01 kWh for an energy wallet: the master station
        converted the money paid at the day's price (prepaid.md §1.8) [A].

        Raises :class:`~.wallet.TopUpRefused`. With the LOST_TOPUP fault the meter answers as
        if it applied the top-up but keeps nothing.
        """
        if self.lost_topups > 0 and count == self.wallet.count + 1 and (opening or customer == self.wallet.customer):
            self.lost_topups -= 1
            return True
        added = self.wallet.top_up(amount_fen, count, customer, opening, self.clock.meter_ms(self._t))
        if added:
            ladder = self.wallet.ladder()
            self._ladder = ladder
            above = self.wallet.balance > self.wallet.limits.close_allowed * FEN
            self.relay.after_top_up(ladder, above, self._t)
            self._drain_relay_events()
        return added

    def initialise_wallet(self, amount_fen: int, operator: str) -> None:
        """070103FF: preset the wallet (count 0); a preset closes directly (prepaid.md §1.5)."""
        w = self.wallet
        w.balance = amount_fen * FEN
        w.count = 0
        w.purchases.clear()
        ladder = w.ladder()
        self._ladder = ladder
        self.relay.after_top_up(ladder, True, self._t, direct=True)
        self._on_ladder(ladder, self._t)
        self._drain_relay_events(operator)

    # --- ground truth ------------------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """The meter's true state as plain values (the simulator's admin view)."""
        w = self.wallet
        return {
            "address": self.address,
            "mode": self.mode.value,
            "wallet": w.unit.value if self.mode is CostMode.LOCAL else None,
            "remaining_fen": w.remaining_fen if self.mode is CostMode.LOCAL else 0,
            "overdraft_fen": w.overdraft_fen if self.mode is CostMode.LOCAL else 0,
            "purchase_count": w.count,
            "customer": w.customer,
            "relay": self.relay.public_state,
            "relay_state": self.relay.state.value,
            "power_hold": self.relay.hold,
            "alarm": self.relay.alarm,
            "ladder": self.ladder().name.lower(),
            "forward_hundredths": self.forward[0],
            "reverse_hundredths": self.reverse[0],
            "power_w": self.power_w,
            "meter_time": self.local_time().isoformat(),
            "time": from_ms(self._t).astimezone(METER_TZ).isoformat(),
        }
