"""Remote cost control: the ledger is the wallet (prepaid.md §1.1, §5.1).

Once a day, for every remote cost-control meter: read the last daily freeze (time and the
forward active block T1..T4, DIs 05060001 / 05060101 — settle from the freeze, never from
the live register, §4.2), price each tariff's energy since the previous freeze with the
gateway's prices, and book the charge against the wallet once per meter and freeze
(the reference is the freeze time, so a rerun books nothing twice). A wallet at or below
zero starts the grace period; once it has run, an arrears trip is submitted, which the
safety policy checks like any other (quiet hours, power hold, grace, notice).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from protocols.dlt645 import METER_TZ

from .errors import GatewayError
from .ledger import Kind, State
from .ledger.model import OPEN_STATES
from .service import CommandService, MeterEntry

log = logging.getLogger(__name__)


@dataclass
class RemoteTariff:
    """Prices the gateway charges remote cost-control customers, yuan/kWh per tariff T1..T4."""

    prices: tuple[Decimal, ...] = (Decimal("0.5000"),) * 4


@dataclass
class BillingResult:
    """What one billing run did."""

    charged: dict[str, int] = field(default_factory=dict)
    """Fen booked per meter."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Meters not billed, with the reason."""
    trips: list[str] = field(default_factory=list)
    """Arrears trips submitted."""


class RemoteBilling:
    """The daily charge of remote cost-control meters."""

    def __init__(self, service: CommandService, tariff: RemoteTariff | None = None) -> None:
        self.service = service
        self.tariff = tariff or RemoteTariff()

    def price(self, energy: list[Decimal]) -> int:
        """Fen for the energy of T1..T4 (kWh), rounded half up once per charge."""
        total = sum((e * p for e, p in zip(energy, self.tariff.prices, strict=False)), Decimal(0))
        return int(total.scaleb(2).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    async def run(self, now: datetime) -> BillingResult:
        """Bill every remote meter from its last daily freeze; submit trips whose grace has run.

        The baseline (the freeze the last charge counted to) is in the ledger, so a restart
        loses no day: the first run after it charges everything since the stored freeze. The
        lines are billed concurrently (each line still one meter at a time: it is half duplex).
        """
        result = BillingResult()
        by_bus: dict[str, list[MeterEntry]] = {}
        for entry in self.service.meters.values():
            if entry.mode == "remote":
                by_bus.setdefault(entry.bus, []).append(entry)
        await asyncio.gather(*(self._bill_line(entries, now, result) for entries in by_bus.values()))
        await self.service.reconcile_remote()
        return result

    async def _bill_line(self, entries: list[MeterEntry], now: datetime, result: BillingResult) -> None:
        for entry in entries:
            try:
                await self._bill(entry, now, result)
            except Exception as exc:  # one meter's trouble (e.g. a ledger error) must not stop its line
                log.exception("billing meter %s failed", entry.address)
                result.skipped[entry.address] = f"failed: {type(exc).__name__}: {exc}"

    async def _bill(self, entry: MeterEntry, now: datetime, result: BillingResult) -> None:
        store = self.service.store
        client = self.service.client(entry)
        try:
            frozen_at = (await client.read(0x05060001)).value
            block = (await client.read(0x05060101)).value
        except GatewayError as exc:
            result.skipped[entry.address] = f"not read: {exc}"
            await self._arrears(entry.address, now, result)
            return
        if frozen_at is None or not isinstance(block, list) or len(block) < 2:
            result.skipped[entry.address] = "no daily freeze yet"
            await self._arrears(entry.address, now, result)
            return
        tariffs = [Decimal(v) for v in block[1:5]]
        energy = [str(t) for t in tariffs]
        previous = await store.baseline(entry.address)
        if previous is None:
            await store.settle(entry.address, None, frozen_at, energy, None, now)
            result.skipped[entry.address] = "first freeze: baseline recorded"
        elif previous[0] >= frozen_at:
            result.skipped[entry.address] = "no new freeze since the last run"
        else:
            used = [max(Decimal(0), a - Decimal(b)) for a, b in zip(tariffs, previous[1], strict=False)]
            fen = self.price(used)
            ref = f"daily:{entry.address}:{frozen_at.isoformat()}"
            if await store.settle(entry.address, previous[0], frozen_at, energy, (-fen, "daily charge", ref), now):
                result.charged[entry.address] = fen
        await self._arrears(entry.address, now, result)

    async def _arrears(self, address: str, now: datetime, result: BillingResult) -> None:
        """Start the grace period at zero; once it has run, submit the arrears trip.

        The trip is deferred past quiet hours (``not_before``) rather than sent into a refusal:
        billing runs at night, and a refused trip would otherwise stand for the whole arrears
        period (prepaid.md §5.2). While one is open or has tripped the meter, no other is
        submitted; one that ended without tripping (refused for power hold, failed on a dead
        line) is tried again on the next day's run.
        """
        service = self.service
        balance = await service.store.wallet(address) or 0
        if balance > 0:
            return
        # The ledger keeps when the balance reached zero, so a restart does not restart the grace.
        zero = await service.store.zero_since(address) or now
        if now < zero + service.policy.grace:
            return
        for c in await service.store.commands(address=address, limit=1000):
            if c.created_at < zero:
                break  # newest first: the rest are from before this arrears period
            if c.kind is Kind.RELAY and c.params.get("arrears") and c.state in (*OPEN_STATES, State.CONFIRMED):
                return
        when = service.policy.next_trip_time(now)
        # Valid for the whole window in which trips are allowed (not the 30 minutes of an
        # interactive command): a day's deferred trips all become due at the end of the night,
        # and on a busy line they must not expire in the queue. Each 0x1C frame still carries
        # a validity of at most 30 minutes from its own sending (service._relay).
        until = service.policy.next_quiet_start(when) or when + timedelta(days=1)
        day = now.astimezone(METER_TZ).date().isoformat()
        _, created = await service.submit(
            f"arrears:{address}:{zero.isoformat()}:{day}",
            Kind.RELAY,
            address,
            {"action": "trip", "arrears": True},
            "gateway (arrears)",
            not_before=when if when > now else None,
            valid_until=until,
        )
        if created:
            result.trips.append(address)
