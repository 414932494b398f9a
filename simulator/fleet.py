"""A fleet of simulated meters on virtual time, grouped into RS-485 buses.

The fleet owns the clock, the meters (firmware models wrapped with their faults) and the
buses. It is the ground truth the admin interface serves and CI compares the gateway with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from firmware_stubs.dispatcher import handle
from firmware_stubs.meter import ROLLOVER, CostMode, Meter, MeterConfig, to_ms
from firmware_stubs.tariff import PriceSet, StepTable, TouSchedule
from firmware_stubs.wallet import Limits, WalletUnit
from protocols.dlt645 import PROFILES, Frame, MeterProfile, normalize_address

from .bus import Bus, LineTiming
from .clock import VirtualClock
from .faults import LINK_FAULTS, Fault, FaultSet, FaultSpec
from .load_profiles import ProfileLoad, make_load

YIELD_S = 0.005
"""Work between two yields to the event loop while a summary catches meters up (5 ms: a read on
another bus waits at most about that long)."""
CATCH_UP_SLICE_MS = 7 * 86_400_000
"""Simulated time a summary catches a meter up by between two checks of :data:`YIELD_S` (a week
is about 2 ms of CPU for a residential meter)."""


def _hundredths(n: int) -> str:
    """A register in 0.01 units (fen, 0.01 kWh) as a decimal string with two places."""
    return str(Decimal(n).scaleb(-2))


class SimMeter:
    """A firmware meter on a bus, with the faults injected into it."""

    __slots__ = ("bus", "faults", "load", "meter")

    def __init__(self, meter: Meter, load: ProfileLoad) -> None:
        self.meter = meter
        self.load = load
        self.faults = FaultSet()
        self.bus: str | None = None

    @property
    def address(self) -> str:
        return self.meter.address

    @property
    def profile(self) -> MeterProfile:
        return self.meter.profile

    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        """The firmware's reply (link faults are applied by the bus)."""
        return handle(self.meter, frame, now)

    def inject(self, spec: FaultSpec, now: datetime) -> None:
        """Activate a fault: link faults wait for the next reply, meter faults act now."""
        self.meter.advance(now)
        if spec.kind in LINK_FAULTS:
            self.faults.add(spec)
        elif spec.kind is Fault.RELAY_MALFUNCTION:
            self.meter.relay_malfunction(True)  # stuck where it is (prepaid.md §1.5)
        elif spec.kind is Fault.CLOCK_JUMP:
            self.meter.jump_clock(spec.seconds)  # the freezes follow the meter's clock
        elif spec.kind is Fault.ROLLOVER:
            self._near_rollover(spec)
        elif spec.kind is Fault.LOST_TOPUP:
            self.meter.lost_topups += spec.remaining or 1

    def _near_rollover(self, spec: FaultSpec) -> None:
        """Move the registers of ``spec.registers`` to ``spec.headroom`` hundredths below 999999.99.

        An active register set (total, T1..T4) moves as if the energy had been counted at once
        in the tariff in force (T1 if none): the total and that tariff's register by the same
        amount, modulo the rollover, so the total stays the sum of the tariffs (prepaid.md §4.2:
        |total - sum T| <= 0.04 kWh). Wallet, steps and freezes are not touched.
        """
        meter = self.meter
        target = ROLLOVER - 1 - min(max(0, spec.headroom), ROLLOVER - 1)
        tariff = meter._window(meter.now_ms)[1]  # the tariff the next energy is counted in
        for name in spec.registers:
            if name == "reactive":
                meter.reactive = target
                continue
            regs = meter.forward if name == "forward" else meter.reverse
            k = tariff if 1 <= tariff < len(regs) else 1
            delta = (target - regs[0]) % ROLLOVER
            regs[0] = target
            regs[k] = (regs[k] + delta) % ROLLOVER

    def clear(self, kind: Fault | None = None, now: datetime | None = None) -> None:
        """Remove injected faults (all, or one kind)."""
        self.faults.clear(kind)
        if kind in (None, Fault.RELAY_MALFUNCTION) and self.meter.relay.fault:
            if now is not None:
                self.meter.advance(now)
            self.meter.relay_malfunction(False)
        if kind in (None, Fault.LOST_TOPUP):
            self.meter.lost_topups = 0


@dataclass(frozen=True)
class TariffSpec:
    """A meter's tariff tables where they differ from the factory defaults (prepaid.md §1.3).

    ``prices``/``steps``/``tou`` set the current *and* backup sets; ``backup_*`` then replace
    the backup set, which becomes current at its switch time (04000106/08/09).
    """

    prices: PriceSet | None = None
    steps: StepTable | None = None
    tou: TouSchedule | None = None
    backup_prices: PriceSet | None = None
    backup_steps: StepTable | None = None
    backup_tou: TouSchedule | None = None
    tou_switch: datetime | None = None
    price_switch: datetime | None = None
    step_switch: datetime | None = None

    def apply(self, meter: Meter) -> None:
        """Load the tables into a new meter's tariff state (tables are immutable and shared)."""
        t = meter.tariff
        if self.prices is not None:
            t.prices = t.backup_prices = self.prices
        if self.steps is not None:
            t.steps = t.backup_steps = self.steps
        if self.tou is not None:
            t.tou = t.backup_tou = self.tou
        if self.backup_prices is not None:
            t.backup_prices = self.backup_prices
        if self.backup_steps is not None:
            t.backup_steps = self.backup_steps
        if self.backup_tou is not None:
            t.backup_tou = self.backup_tou
        if self.tou_switch is not None:
            t.set_tou_switch(self.tou_switch)
        if self.price_switch is not None:
            t.set_price_switch(self.price_switch)
        if self.step_switch is not None:
            t.set_step_switch(self.step_switch)


@dataclass
class MeterSpec:
    """How to build one simulated meter (from a scenario file or CLI flags)."""

    address: str
    mode: CostMode = CostMode.LOCAL
    balance: Decimal = Decimal("100.00")
    customer: str | None = None
    profile: str = "sgcc-2013"
    load: str = "residential"
    daily_kwh: float | None = None
    watts: int | None = None
    wallet_unit: WalletUnit = WalletUnit.MONEY
    limits: Limits = field(default_factory=Limits)
    purchase_count: int = 1
    external_relay: bool = False
    trip_delay_min: int = 0
    large_current_ma: int = 0
    """04001402 in mA (0 = no large-current protection, prepaid.md §1.5)."""
    large_current_delay_min: int = 0
    """04001403: the longest wait for the current to fall, in minutes."""
    clock_offset_s: float = 0.0
    drift_ppm: float = 0.0
    factory_mode: bool = False
    freezes: bool = True
    faults: list[FaultSpec] = field(default_factory=list)
    tariff: TariffSpec | None = None


@dataclass
class BusSpec:
    """One RS-485 line and the meters on it."""

    name: str
    meters: list[MeterSpec]
    timing: LineTiming | None = None
    faults: list[FaultSpec] = field(default_factory=list)


class Fleet:
    """All simulated meters, their buses and the virtual clock."""

    def __init__(self, buses: list[BusSpec], clock: VirtualClock, seed: int = 0) -> None:
        self.clock = clock
        self.seed = seed
        self.meters: dict[str, SimMeter] = {}
        self._cursor = 0  # round robin of the live summary's catch-up
        self.buses: dict[str, Bus] = {}
        start = clock.now()
        index = 0
        for spec in buses:
            members = []
            for m in spec.meters:
                index += 1
                sim = self._build(m, start, index)
                if sim.address in self.meters:
                    raise ValueError(f"meter {sim.address} is defined twice")
                sim.bus = spec.name
                self.meters[sim.address] = sim
                members.append(sim)
            bus_faults = FaultSet()
            for f in spec.faults:
                if f.kind in LINK_FAULTS:
                    bus_faults.add(f)
                else:  # a meter fault declared on a bus applies to every meter on it (as POST /buses/{name}/faults)
                    for sim in members:
                        sim.inject(f, start)
            if spec.name in self.buses:
                raise ValueError(f"bus {spec.name} is defined twice")
            self.buses[spec.name] = Bus(
                spec.name, members, clock, spec.timing, seed=seed + len(self.buses), faults=bus_faults
            )

    def _build(self, spec: MeterSpec, start: datetime, index: int) -> SimMeter:
        address = normalize_address(spec.address)
        try:
            profile = PROFILES[spec.profile]
        except KeyError:
            raise ValueError(f"unknown meter profile {spec.profile!r} (known: {', '.join(PROFILES)})") from None
        config = MeterConfig(
            address=address,
            customer=spec.customer or address,
            mode=spec.mode,
            profile=profile,
            wallet_unit=spec.wallet_unit,
            balance_fen=int(spec.balance.scaleb(2)),
            limits=spec.limits,
            purchase_count=spec.purchase_count,
            external_relay=spec.external_relay,
            trip_delay_min=spec.trip_delay_min,
            large_current_ma=spec.large_current_ma,
            large_current_delay_min=spec.large_current_delay_min,
            clock_offset_s=spec.clock_offset_s,
            drift_ppm=spec.drift_ppm,
            factory_mode=spec.factory_mode,
            seed=self.seed * 1_000_003 + index,
            freezes=spec.freezes,
        )
        load = make_load(spec.load, self.seed, index, spec.daily_kwh, spec.watts)
        meter = Meter(config, load, start)
        if spec.tariff is not None:
            spec.tariff.apply(meter)
        sim = SimMeter(meter, load)
        for f in spec.faults:
            sim.inject(f, start)
        return sim

    # --- operations used by the admin interface and tests ------------------------------------------

    def now(self) -> datetime:
        return self.clock.now()

    def meter(self, address: str) -> SimMeter:
        """The meter at ``address``; raises KeyError."""
        return self.meters[normalize_address(address)]

    def state(self, address: str) -> dict[str, Any]:
        """Ground truth of one meter at the current virtual time (yuan and kWh as decimal strings).

        ``wallet`` is ``"money"``, ``"energy"`` or None (remote cost control keeps no wallet,
        prepaid.md §1.1); ``remaining_money``/``overdraft`` (yuan) are set for a money wallet,
        ``remaining_energy_kwh``/``overdraft_energy_kwh`` for an energy wallet (§1.8), else None.
        """
        sim = self.meter(address)
        sim.meter.advance(self.now())
        raw = sim.meter.state()
        money, energy = raw["wallet"] == WalletUnit.MONEY.value, raw["wallet"] == WalletUnit.ENERGY.value
        return {
            "address": raw["address"],
            "bus": sim.bus,
            "mode": raw["mode"],
            # The wallet in its unit (prepaid.md §1.8): yuan for money wallets, kWh for energy
            # wallets; null for the other unit, and for remote cost control (no wallet, §1.1).
            "wallet": raw["wallet"],
            "remaining_money": _hundredths(raw["remaining_fen"]) if money else None,
            "overdraft": _hundredths(raw["overdraft_fen"]) if money else None,
            "remaining_energy_kwh": _hundredths(raw["remaining_fen"]) if energy else None,
            "overdraft_energy_kwh": _hundredths(raw["overdraft_fen"]) if energy else None,
            "purchase_count": raw["purchase_count"],
            "customer": raw["customer"],
            "relay": raw["relay"],
            "relay_state": raw["relay_state"],
            "power_hold": raw["power_hold"],
            "alarm": raw["alarm"],
            "ladder": raw["ladder"],
            "energy_kwh": str(Decimal(raw["forward_hundredths"]).scaleb(-2)),
            "reverse_energy_kwh": str(Decimal(raw["reverse_hundredths"]).scaleb(-2)),
            "power_w": raw["power_w"],
            "meter_time": raw["meter_time"],
            "time": raw["time"],
            "faults": sorted(k.value for k in sim.faults.active)
            + (["relay_malfunction"] if sim.meter.relay.fault else [])
            + (["lost_topup"] if sim.meter.lost_topups else []),
            "esam": sim.meter.esam.status(),
        }

    def set_load(self, address: str, watts: int | None) -> None:
        """Pin a meter's load to ``watts`` (None: back to its profile), from now on."""
        sim = self.meter(address)
        sim.meter.advance(self.now())
        sim.load.override = watts

    def press_button(self, address: str) -> bool:
        """The customer presses the relay button."""
        return self.meter(address).meter.press_button(self.now())

    def advance(self, delta: timedelta) -> datetime:
        """Move virtual time forward (meters catch up lazily when observed)."""
        return self.clock.advance(delta)

    def inject(self, target: str, spec: FaultSpec) -> None:
        """Inject a fault into a meter (by address) or a whole bus (by name)."""
        if target in self.buses:
            if spec.kind not in LINK_FAULTS:
                for sim in self.buses[target].meters.values():
                    sim.inject(spec, self.now())
            else:
                self.buses[target].faults.add(spec)
            return
        self.meter(target).inject(spec, self.now())

    def clear_faults(self, target: str, kind: Fault | None = None) -> None:
        """Remove faults from a meter or a bus."""
        if target in self.buses:
            self.buses[target].faults.clear(kind)
            for sim in self.buses[target].meters.values():
                sim.clear(kind, self.now())
            return
        self.meter(target).clear(kind, self.now())

    def summary(self, *, advance: bool | int = True) -> dict[str, Any]:
        """Counts at the current virtual time: relay states and bus statistics.

        ``advance=True`` catches every meter up first, so the relay counts are ground truth; that
        blocks for as long as it takes (about 0.25 ms CPU per residential meter-day behind), so the
        event loop uses :meth:`summary_async`. An int catches up at most that many meters, round
        robin; the rest count as last observed.
        """
        now = self.now()
        for sim in self._to_catch_up(advance):
            sim.meter.advance(now)
        return self._counts()

    async def summary_async(
        self,
        limit: int | None = None,
        *,
        yield_s: float = YIELD_S,
        timer: Callable[[], float] = time.perf_counter,
    ) -> dict[str, Any]:
        """:meth:`summary` on the event loop: every meter caught up (or ``limit``, round robin: the
        live summary line), yielding to the loop whenever ``yield_s`` of work has run, so the buses
        keep answering while a large or long-idle fleet catches up.

        A meter far behind is caught up in slices of :data:`CATCH_UP_SLICE_MS` of simulated time
        (a slice is a few ms of CPU), so even one meter a year behind does not hold the loop.
        ``timer`` is real time for scheduling only (never the meters' time); tests pass their own.
        """
        await self.catch_up_async(self._to_catch_up(True if limit is None else limit), yield_s=yield_s, timer=timer)
        return self._counts()

    async def catch_up_async(
        self,
        sims: list[SimMeter],
        *,
        yield_s: float = YIELD_S,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        """Advance ``sims`` to the current virtual time, yielding every ``yield_s`` of work."""
        now = self.now()
        target = to_ms(now)
        started = timer()
        for sim in sims:
            meter = sim.meter
            while meter.now_ms < target:
                meter.advance(min(target, meter.now_ms + CATCH_UP_SLICE_MS))
                if timer() - started >= yield_s:
                    await asyncio.sleep(0)
                    started = timer()

    def _to_catch_up(self, advance: bool | int) -> list[SimMeter]:
        """The meters a summary catches up: all (True), none (False or 0), or the next ``advance``
        of a round robin."""
        meters = list(self.meters.values())
        if advance is True:
            return meters
        if not advance or not meters:
            return []
        n = min(int(advance), len(meters))
        start = self._cursor % len(meters)
        self._cursor = (start + n) % len(meters)
        return [meters[i % len(meters)] for i in range(start, start + n)]

    def _counts(self) -> dict[str, Any]:
        relays: dict[str, int] = {}
        for sim in self.meters.values():
            key = sim.meter.relay.public_state
            relays[key] = relays.get(key, 0) + 1
        return {
            "time": self.now().isoformat(),
            "meters": len(self.meters),
            "buses": {name: bus.summary() for name, bus in self.buses.items()},
            "relays": relays,
        }
