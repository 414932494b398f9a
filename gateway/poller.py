"""The meter poller: reads every managed meter in the background and reports what the meters did.

Commands report what they did themselves (gateway/service.py); nothing else would tell that a
local cost-control meter tripped itself for lack of credit, that a customer pressed the button,
or that a meter stopped answering. The poller reads, per meter:

* running status word 3 (04000503): relay actual state (bit 4), relay command state (bit 6),
  pre-trip alarm (bit 7), power hold (bit 12) (dlt645.md §3.4);
* local cost-control meters also their wallet, and once (cached, kept with the observation in
  the ledger, read again after a confirmed parameter command) its alarm limits 1 and 2 and its
  overdraft limit: status word 3 carries no balance state, so the gateway places the balance on
  the ladder of prepaid.md §1.4 itself. A money wallet (``[[meter]] wallet = "money"``, the
  default) is the remaining money (00900200), the overdraft (00900201) and the alarm amounts and
  overdraft limit 04001001..03, in yuan; an energy wallet (``wallet = "energy"``, prepaid.md
  §1.8) is the remaining energy (00900100), the overdraft energy (00900101) and the limits
  04000F01, 04000F02 and 04000F04, in kWh. Remote cost-control meters hold no wallet (the
  ledger is theirs): only the status word.

DL/T 645-1997 meters have no status word 3 and no prepaid registers in the 1997 table
(dlt645.md §7.3): the poller reads their forward active energy (9010), so a silent 1997 meter
is reported like any other (``meter_silent``, ``meter_back``) and its last reading is kept.

**Schedule.** ``[poll] interval_s`` (default 900 s, 15 minutes; 0 = off) is the time in which
every meter of a line is read once. The meters of a line are read one after another, evenly
spread over the interval (a line with 50 meters and 900 s: one meter every 18 s; the first
one spacing, at most 30 s, after the start), so the poller has at most one transaction queued
per line. Its reads go at the link's ``POLL`` priority, behind every operator command, and
before each read it waits (up to ``yield_s``, 30 s) while a command holds a meter of that
line, so a command submitted during a poll runs first, at full speed; while it waits it looks
again when a command of this gateway changes state, and every :data:`YIELD_RECHECK_S` (a
command of another gateway on the same ledger). A meter that does not answer costs its line
one transaction with ``retries`` (default 1) retries, and the next meter follows; lines are
polled independently.

**Commands in flight.** A meter a command is working on (its lease is held, or a command has
been sent and is not settled, or one is due to be claimed) is not read. A poll during which a
command on the meter changed state (the newest audit event of the meter's commands moved) is
discarded: nothing is recorded and no event is emitted; the next poll looks again. A relay
change after which a relay command ended ``confirmed`` is the command's (it has published
``events/relay`` with ``"source": "command"`` and the state it read back): the poller takes
the new state without an event. After a relay command that ended ``unknown`` (nobody knows
whether the meter executed it, so the command published no relay state), a relay change is
the poller's to report: its ``events/relay`` event names that command in
``unknown_command_id``.

**Observations** are kept in the ledger (table ``observations``), one per meter: when it was
polled, whether it answered, when it last answered, and what it said. They survive a restart:
the first poll after it compares with the last observation before. They are written
compare-and-set: when two gateways on one PostgreSQL ledger poll a meter at once, the one that
writes first reports the change, the other drops its poll. The first observation of
a meter is the baseline: no relay or balance event (there is no change to report), except
``meter_silent`` if it does not answer.

**Two gateways** on one PostgreSQL ledger poll the same meters; each skips a meter that was
polled (by either) less than half an interval ago, so together they read each meter about once
per interval, not twice.

**Events** go to :attr:`Poller.listeners` (the MQTT northbound publishes them as
``events/relay`` and ``events/alarms``, with ``"source": "meter"``):

* ``relay``: the relay state (``closed``, ``open``, ``close-allowed``: open with the trip no
  longer commanded, waiting for the customer's button) or power hold changed;
* alarms, each crossing once: ``balance_alarm_1`` (R ≤ alarm limit 1), ``balance_alarm_2``
  (R ≤ alarm limit 2), ``balance_zero`` (R ≤ 0), ``overdraft`` (R ≤ −overdraft limit, or R ≤ 0
  when the limit is 0: the meter trips for good, prepaid.md §1.4), where R is the remaining
  money (or energy) minus the overdraft; ``balance_restored`` when a top-up lifted the balance
  back over some of them (``cleared`` lists which); ``meter_silent`` after ``silent_after``
  polls in a row without an answer (default 1; each poll already retried); ``meter_back`` when
  it answers again.

Every event carries the wallet as last read: ``wallet`` (``money``, ``energy``, null for remote
meters), ``unit`` (``yuan``, ``kWh``, null), ``remaining_money`` and ``overdraft`` (yuan, money
wallets), ``remaining_energy`` and ``overdraft_energy`` (kWh, energy wallets) and ``level``;
a balance alarm's ``threshold`` and ``reason`` are in the wallet's unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from protocols.dlt645 import Edition

from .client import MeterClient
from .errors import LinkDown, MeterRefused, NoReply, ReplyMismatch, WrongMeter
from .ledger import Command, Kind, State
from .ledger.store import Observation
from .link import Priority
from .service import PARAM_DIS, CommandService, MeterEntry

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 900.0
"""Every meter read once in 15 minutes. A local meter costs its line ~1.6 s a poll at 2400 bps (3 reads;
measured on the simulator with real line timing, Td 20..500 ms): 50 meters take ~80 s of 900, 9 %."""

FIRST_POLL_S = 30.0
"""A line's first poll comes one spacing after the start, at most this many seconds."""

YIELD_RECHECK_S = 0.5
"""While a poll read waits for a line's commands: the longest between two looks at the ledger
(a state change of this gateway's commands makes it look at once)."""

STATUS_WORD_3 = 0x04000503
REMAINING_MONEY = 0x00900200
OVERDRAFT_MONEY = 0x00900201
REMAINING_ENERGY = 0x00900100
OVERDRAFT_ENERGY = 0x00900101
THRESHOLD_DIS = {name: PARAM_DIS[name] for name in ("alarm_1", "alarm_2", "overdraft")}
"""Alarm amounts 1 and 2 and the overdraft limit of a money wallet, yuan (dlt645.md §3.4)."""
ENERGY_THRESHOLD_DIS = {"alarm_1": 0x04000F01, "alarm_2": 0x04000F02, "overdraft": 0x04000F04}
"""Alarm limits 1 and 2 and the overdraft limit of an energy wallet, kWh (dlt645.md §3.4; 04000F03 is
the hoarding limit)."""


@dataclass(frozen=True, slots=True)
class WalletRegisters:
    """Where a local meter keeps one kind of wallet, and in what unit."""

    unit: str
    """``yuan`` or ``kWh``: what events and observations give its amounts in."""
    remaining: int
    overdraft: int
    thresholds: dict[str, int]
    """The DIs of ``alarm_1``, ``alarm_2`` and ``overdraft`` (the overdraft limit)."""
    suffix: str
    """Observation keys of its amounts end in it: ``fen`` (0.01 yuan) or ``ckwh`` (0.01 kWh)."""
    what: str
    """How reasons name the balance."""
    limit: str
    """How reasons name alarm thresholds 1 and 2."""


WALLETS = {
    "money": WalletRegisters(
        "yuan", REMAINING_MONEY, OVERDRAFT_MONEY, THRESHOLD_DIS, "fen", "remaining money", "alarm amount"
    ),
    "energy": WalletRegisters(
        "kWh", REMAINING_ENERGY, OVERDRAFT_ENERGY, ENERGY_THRESHOLD_DIS, "ckwh", "remaining energy", "alarm limit"
    ),
}
"""The wallets of local cost-control meters, by ``[[meter]] wallet``."""

LEVELS = ("normal", "alarm_1", "alarm_2", "zero", "overdraft")
"""The balance ladder of prepaid.md §1.4, best first."""
BALANCE_ALARMS = ("balance_alarm_1", "balance_alarm_2", "balance_zero", "overdraft")
"""The crossings reported, in the order the balance falls through them."""
SEVERITY = {
    "balance_alarm_1": "warning",
    "balance_alarm_2": "warning",
    "balance_zero": "critical",
    "overdraft": "critical",
    "balance_restored": "info",
    "meter_silent": "critical",
    "meter_back": "info",
}
_ABSENT = (NoReply, LinkDown, WrongMeter, ReplyMismatch)
"""Poll failures that mean "no usable answer from this meter"."""


@dataclass
class PollConfig:
    """The ``[poll]`` section of the gateway configuration."""

    interval_s: float = DEFAULT_INTERVAL_S
    """Seconds in which every meter of a line is read once (0 = no background polling)."""
    retries: int = 1
    """Extra attempts of each poll read (the line's own setting is for commands)."""
    silent_after: int = 1
    """Polls in a row without an answer before ``meter_silent``."""
    yield_s: float = 30.0
    """Longest a poll read waits while commands hold meters of its line; then it queues anyway (behind them)."""


@dataclass(frozen=True, slots=True)
class MeterEvent:
    """Something a meter did (or stopped doing) that the poller saw."""

    topic: str
    """``relay`` or ``alarms``."""
    address: str
    at: datetime
    payload: dict[str, Any]
    """The JSON-ready event (money as decimal strings in yuan, energy in kWh, ``at`` ISO 8601)."""


@dataclass
class PollStats:
    """Counters of the poller."""

    polls: int = 0
    """Meters read (answered or not)."""
    answered: int = 0
    silent: int = 0
    """Polls without an answer."""
    skipped_busy: int = 0
    """Meters not read because a command was at work on them."""
    skipped_fresh: int = 0
    """Meters not read because a poll (another gateway's) is recent enough."""
    discarded: int = 0
    """Polls thrown away because a command changed state meanwhile."""
    yielded: int = 0
    """Reads that waited for a line's commands first."""
    events: int = 0
    rounds: int = 0
    """Complete passes over a line's meters (background loop)."""


FRESH_FRACTION = 0.5
"""The background loop skips a meter polled less than this fraction of the interval ago."""

ENERGY_1997 = 0x9010
"""Forward active energy, total (dlt645.md §7.3): what the poller reads of a 1997 meter."""


def relay_state(relay_open: bool, trip_commanded: bool) -> str:
    """``closed``, ``open`` or ``close-allowed`` from status word 3 bits 4 and 6 (dlt645.md §3.4)."""
    if not relay_open:
        return "closed"
    return "open" if trip_commanded else "close-allowed"


def relay_from_status(raw: int | None) -> str | None:
    """The relay state in a raw status word 3 (None if there is none)."""
    if raw is None:
        return None
    return relay_state(bool(raw >> 4 & 1), bool(raw >> 6 & 1))


def balance_level(remaining: int, overdraft: int, thresholds: dict[str, int]) -> str:
    """The prepaid.md §1.4 ladder state (the exact predicates of JudgeAlarm1/2, JudgeOvrZero).

    Amounts and thresholds in hundredths of the wallet's unit (fen, or 0.01 kWh).
    """
    r = remaining - overdraft
    a1, a2, t = thresholds.get("alarm_1", 0), thresholds.get("alarm_2", 0), thresholds.get("overdraft", 0)
    if r <= 0:
        return "zero" if t > 0 and r > -t else "overdraft"
    if a2 > 0 and r <= a2:
        return "alarm_2"
    if a1 > 0 and r <= a1:
        return "alarm_1"
    return "normal"


def balance_alarms(remaining: int, overdraft: int, thresholds: dict[str, int]) -> list[str]:
    """The thresholds the balance is at or below, in :data:`BALANCE_ALARMS` order (units as :func:`balance_level`)."""
    r = remaining - overdraft
    a1, a2 = thresholds.get("alarm_1", 0), thresholds.get("alarm_2", 0)
    held = {
        "balance_alarm_1": a1 > 0 and r <= a1,
        "balance_alarm_2": a2 > 0 and r <= a2,
        "balance_zero": r <= 0,
        "overdraft": balance_level(remaining, overdraft, thresholds) == "overdraft",
    }
    return [name for name in BALANCE_ALARMS if held[name]]


def hundredths(n: int | None) -> str | None:
    """A whole number of hundredths (fen, 0.01 kWh) as a decimal string with two places; None stays None."""
    return None if n is None else str(Decimal(int(n)).scaleb(-2))


def _to_hundredths(value: Any) -> int:
    return int(Decimal(value).scaleb(2))


def _wallet_of(state: dict[str, Any]) -> str | None:
    """The wallet an observation's state holds (states recorded before energy wallets: money, if any)."""
    wallet = state.get("wallet")
    if wallet is None and state.get("remaining_fen") is not None:
        return "money"
    return wallet


def _wallet_fields(state: dict[str, Any]) -> dict[str, Any]:
    """The wallet in an observation's state, JSON-ready: both units' fields, the other one's null."""
    wallet = _wallet_of(state)
    return {
        "wallet": wallet,
        "unit": WALLETS[wallet].unit if wallet in WALLETS else None,
        "remaining_money": hundredths(state.get("remaining_fen")),
        "overdraft": hundredths(state.get("overdraft_fen")),
        "remaining_energy": hundredths(state.get("remaining_ckwh")),
        "overdraft_energy": hundredths(state.get("overdraft_ckwh")),
        "level": state.get("level"),
    }


def observation_view(o: Observation) -> dict[str, Any]:
    """An observation for APIs: what the meter said, money in yuan, energy in kWh."""
    s = o.state
    return {
        "at": o.at.isoformat(),
        "answering": o.answering,
        "answered_at": o.answered_at.isoformat() if o.answered_at else None,
        "silent_since": s.get("silent_since"),
        "relay": s.get("relay"),
        "relay_open": s.get("relay_open"),
        "trip_commanded": s.get("trip_commanded"),
        "pre_trip_alarm": s.get("pre_trip_alarm"),
        "power_hold": s.get("power_hold"),
        **_wallet_fields(s),
        "alarms": s.get("alarms"),
    }


class Poller:
    """Polls the service's meters on their lines; emits :class:`MeterEvent` to :attr:`listeners`."""

    def __init__(self, service: CommandService, config: PollConfig | None = None) -> None:
        self.service = service
        self.store = service.store
        self.config = config or PollConfig()
        self.listeners: list[Callable[[MeterEvent], Any]] = []
        """Called with every event (synchronously, in the event loop; the MQTT northbound publishes)."""
        self.stats = PollStats()
        self._thresholds: dict[str, dict[str, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lines: dict[str, list[MeterEntry]] | None = None
        self._line_addresses: dict[str, list[str]] = {}
        self._clients: dict[str, MeterClient] = {}
        self._moved: dict[str, asyncio.Event] = {}
        """Per line: set when one of its meters' commands changes state (a waiting read looks again)."""
        self._listening = False
        self._warned: set[str] = set()

    # --- which meters -----------------------------------------------------------------------------------

    def lines(self) -> dict[str, list[MeterEntry]]:
        """The pollable meters (on a known line), by line, in address order."""
        if self._lines is None:
            out: dict[str, list[MeterEntry]] = {}
            for address in sorted(self.service.meters):
                entry = self.service.meters[address]
                if entry.bus in self.service.links:
                    out.setdefault(entry.bus, []).append(entry)
            self._lines = out
        return self._lines

    def client(self, entry: MeterEntry) -> MeterClient:
        """The meter client the poller reads ``entry`` with (``POLL`` priority, ``[poll] retries``)."""
        c = self._clients.get(entry.address)
        if c is None:
            c = self._clients[entry.address] = MeterClient(
                self.service.links[entry.bus],
                entry.address,
                entry.profile,
                self.service.master,
                self.service.config.operator,
                entry.meter_number,
                Priority.POLL,
                retries=self.config.retries,
            )
        return c

    # --- running ----------------------------------------------------------------------------------------

    async def start(self) -> Poller:
        """Start one background loop per line (nothing if ``interval_s`` is 0)."""
        if self.config.interval_s > 0 and not self._tasks:
            for bus, entries in self.lines().items():
                self._tasks.append(asyncio.create_task(self._line_loop(bus, entries), name=f"poll {bus}"))
        return self

    async def stop(self) -> None:
        """Stop the background loops."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._listening:
            with contextlib.suppress(ValueError):
                self.service.listeners.remove(self._on_command)
            self._listening = False

    async def _line_loop(self, bus: str, entries: list[MeterEntry]) -> None:
        loop = asyncio.get_running_loop()
        spacing = self.config.interval_s / len(entries)
        await asyncio.sleep(min(spacing, FIRST_POLL_S))  # the service recovers in-flight commands first
        while True:
            for entry in entries:
                began = loop.time()
                try:
                    await self.poll_meter(entry, fresh_within=self.config.interval_s * FRESH_FRACTION)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a ledger hiccup must not end the line's polling
                    log.exception("polling meter %s failed", entry.address)
                await asyncio.sleep(max(0.0, began + spacing - loop.time()))
            self.stats.rounds += 1

    async def poll_once(self, addresses: list[str] | None = None) -> dict[str, Observation | None]:
        """Poll these meters (default: all) once now: lines in parallel, each line's meters in turn.

        Returns each meter's new observation (None: not read because a command was at work,
        or discarded). Tests and the demo use it; the background loop polls the same way.
        """
        wanted = set(addresses) if addresses is not None else None
        result: dict[str, Observation | None] = {}

        async def line(entries: list[MeterEntry]) -> None:
            for entry in entries:
                if wanted is None or entry.address in wanted:
                    result[entry.address] = await self.poll_meter(entry)

        await asyncio.gather(*(line(e) for e in self.lines().values()))
        return result

    # --- one meter --------------------------------------------------------------------------------------

    async def poll_meter(self, entry: MeterEntry, *, fresh_within: float = 0.0) -> Observation | None:
        """Read one meter, record the observation and emit what changed; None if skipped or discarded.

        ``fresh_within``: not read if it was polled (by any gateway on this ledger) less than that
        many seconds ago (the background loop: module docs, "Two gateways")."""
        address = entry.address
        store = self.store
        previous = await store.observation(address)
        if previous is not None and fresh_within > 0:
            age = (self.service.now() - previous.at).total_seconds()
            if 0 <= age < fresh_within:
                self.stats.skipped_fresh += 1
                return None
        before = await store.meter_activity(address, self.service.now())
        if before.busy:
            self.stats.skipped_busy += 1
            return None
        wallet = self._wallet(entry)
        thresholds = self._thresholds.get(address)
        if thresholds is None and wallet is not None and previous is not None:
            kept = previous.state.get(f"thresholds_{WALLETS[wallet].suffix}")
            if kept is not None and _wallet_of(previous.state) == wallet:
                thresholds = self._thresholds[address] = dict(kept)
        try:
            said: dict[str, Any] | None = await self._read(entry, wallet, thresholds)
            error = None
        except _ABSENT as exc:
            said, error = None, f"{type(exc).__name__}: {exc}"
        now = self.service.now()
        since = previous.state.get("command_mark") if previous is not None else None
        after = await store.meter_activity(address, now, since)
        if after.busy or after.mark != before.mark:
            self.stats.discarded += 1
            return None
        self.stats.polls += 1
        if any(c.kind is Kind.PARAMS and c.state is State.CONFIRMED for c in after.changed):
            self._thresholds.pop(address, None)  # new alarm limits: read them at the next poll
            if said is not None:
                for w in WALLETS.values():
                    said.pop(f"thresholds_{w.suffix}", None)
        observation, events = self._compare(entry, previous, said, error, after.mark, after.changed, now)
        if not await store.save_observation(observation, previous):
            self.stats.discarded += 1  # another gateway on this ledger polled it meanwhile: it reports
            return None
        for event in events:
            self._emit(event)
        return observation

    @staticmethod
    def _wallet(entry: MeterEntry) -> str | None:
        """The wallet the meter keeps (None: remote cost control keeps none)."""
        if entry.mode != "local":
            return None
        wallet = entry.wallet
        if wallet not in WALLETS:
            raise ValueError(f"meter {entry.address}: unknown wallet {wallet!r} (money or energy)")
        return wallet

    def _on_command(self, command: Command, info: dict[str, Any]) -> None:
        """Service listener: a command changed state; a read waiting on its line looks again."""
        entry = self.service.meters.get(command.address)
        moved = self._moved.get(entry.bus) if entry is not None else None
        if moved is not None:
            moved.set()

    async def _wait_for_commands(self, entry: MeterEntry) -> None:
        """Before a poll read: wait while a command holds a meter of this line (bounded by ``yield_s``)."""
        line = self._line_addresses.get(entry.bus)
        if line is None:
            line = self._line_addresses[entry.bus] = [e.address for e in self.lines().get(entry.bus, [])]
        if not self._listening:
            self.service.listeners.append(self._on_command)
            self._listening = True
        moved = self._moved.get(entry.bus)
        if moved is None:
            moved = self._moved[entry.bus] = asyncio.Event()
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.yield_s
        waited = False
        while True:
            moved.clear()  # before looking: a change while the ledger answers is not missed
            if not await self.store.line_busy(line, self.service.now()):
                break
            left = end - loop.time()
            if left <= 0:
                break
            waited = True
            # (not asyncio.wait_for: on 3.11 it can swallow a cancellation that races its timeout)
            waiter = asyncio.ensure_future(moved.wait())
            try:
                await asyncio.wait({waiter}, timeout=min(YIELD_RECHECK_S, left))
            finally:
                waiter.cancel()
        self.stats.yielded += waited

    async def _get(self, entry: MeterEntry, di: int) -> Any:
        """One poll read, decoded, once the line's commands are done; raises the client's typed errors."""
        await self._wait_for_commands(entry)
        return (await self.client(entry).read(di)).value

    async def _read(self, entry: MeterEntry, wallet: str | None, thresholds: dict[str, int] | None) -> dict[str, Any]:
        """What the meter says now (raises on no answer); a DI it refuses is left out."""
        said: dict[str, Any] = {}
        if entry.profile.edition is Edition.V1997:
            try:
                said["energy_kwh"] = str(await self._get(entry, ENERGY_1997))
            except MeterRefused as exc:
                said["refused"] = str(exc)  # it answered: not silent
            return said
        meter_type = None
        try:
            status = await self._get(entry, STATUS_WORD_3)
        except MeterRefused as exc:
            said["refused"] = str(exc)
        else:
            f = dict(status.fields)
            meter_type = f.get("meter_type")
            said.update(
                status_word_3=status.raw,
                relay_open=bool(f.get("relay_open")),
                trip_commanded=bool(f.get("relay_trip_commanded")),
                pre_trip_alarm=bool(f.get("pre_trip_alarm")),
                power_hold=bool(f.get("power_hold")),
            )
            said["relay"] = relay_state(said["relay_open"], said["trip_commanded"])
        if wallet is None:
            return said
        w = WALLETS[wallet]
        said["wallet"] = wallet
        try:
            remaining = _to_hundredths(await self._get(entry, w.remaining))
        except MeterRefused as exc:
            said["refused"] = str(exc)
            self._warn_refused(entry, wallet, w, meter_type, exc)
            return said
        try:
            overdraft = _to_hundredths(await self._get(entry, w.overdraft))
        except MeterRefused:
            overdraft = 0  # a meter without the register keeps no overdraft
        if thresholds is None:
            thresholds = {}
            for name, di in w.thresholds.items():
                try:
                    thresholds[name] = _to_hundredths(await self._get(entry, di))
                except MeterRefused:
                    thresholds[name] = 0  # not served: that step of the ladder is off
            self._thresholds[entry.address] = thresholds
        said[f"remaining_{w.suffix}"] = remaining
        said[f"overdraft_{w.suffix}"] = overdraft
        said[f"thresholds_{w.suffix}"] = thresholds
        said["level"] = balance_level(remaining, overdraft, thresholds)
        said["alarms"] = balance_alarms(remaining, overdraft, thresholds)
        return said

    def _warn_refused(
        self, entry: MeterEntry, wallet: str, w: WalletRegisters, meter_type: Any, exc: MeterRefused
    ) -> None:
        """Log, once per meter, a wallet register the meter refuses (its balance is not watched)."""
        if entry.address in self._warned:
            return
        self._warned.add(entry.address)
        says = {1: "energy", 2: "money"}.get(meter_type) if isinstance(meter_type, int) else None
        hint = (
            f'; status word 3 says it keeps a {says} wallet: set wallet = "{says}" in its [[meter]]'
            if says is not None and says != wallet
            else ""
        )
        log.warning(
            "meter %s refuses its %s wallet register %08X (%s): its balance is not watched%s",
            entry.address,
            wallet,
            w.remaining,
            exc,
            hint,
        )

    # --- what changed ------------------------------------------------------------------------------------

    def _compare(
        self,
        entry: MeterEntry,
        previous: Observation | None,
        said: dict[str, Any] | None,
        error: str | None,
        mark: int,
        changed: list[Command],
        now: datetime,
    ) -> tuple[Observation, list[MeterEvent]]:
        address = entry.address
        at = now.isoformat()
        old = dict(previous.state) if previous is not None else {}
        events: list[MeterEvent] = []
        if said is None:
            self.stats.silent += 1
            failures = int(old.get("failures", 0)) + 1
            was_answering = previous.answering if previous is not None else True
            answering = was_answering and failures < self.config.silent_after
            # command_mark stays the one of the last answer: relay commands since then explain a change
            state = {**old, "failures": failures, "error": error}
            if was_answering and not answering:
                state["silent_since"] = at
                answered = previous.answered_at if previous is not None else None
                events.append(
                    self._alarm(
                        "meter_silent",
                        address,
                        now,
                        state,
                        f"no answer to {failures} poll(s) in a row ({error})",
                        answered_at=answered.isoformat() if answered else None,
                    )
                )
            answered_at = previous.answered_at if previous is not None else None
            return Observation(address, now, answering, answered_at, state), events
        self.stats.answered += 1
        state = {**said, "failures": 0, "command_mark": mark, "error": None, "silent_since": None}
        if previous is not None and not previous.answering:
            since = old.get("silent_since")
            events.append(self._alarm("meter_back", address, now, state, "the meter answers again", silent_since=since))
        # Relay and power hold, against what the meter said last time it answered. A confirmed relay
        # command published the state it read back; after one of unknown outcome nobody has.
        relays = [c for c in changed if c.kind is Kind.RELAY]
        confirmed = any(c.state is State.CONFIRMED for c in relays)
        unknown = [c for c in relays if c.state is State.UNKNOWN]
        if old.get("relay") is not None and state.get("relay") is not None:
            moved = old["relay"] != state["relay"] or bool(old.get("power_hold")) != state["power_hold"]
            if moved and not confirmed:
                events.append(self._relay_event(address, now, old, state, unknown[-1].id if unknown else None))
        # The balance ladder: each threshold crossed downwards once; a recovery once. Not across a
        # change of wallet (a reconfigured meter): that poll is a new baseline.
        same_wallet = _wallet_of(old) == _wallet_of(state)
        if same_wallet and old.get("alarms") is not None and state.get("alarms") is not None:
            raised = [a for a in state["alarms"] if a not in old["alarms"]]
            cleared = [a for a in old["alarms"] if a not in state["alarms"]]
            for name in raised:
                events.append(self._balance_alarm(name, address, now, state))
            if cleared and not raised:
                events.append(
                    self._alarm(
                        "balance_restored",
                        address,
                        now,
                        state,
                        f"the balance is back above {', '.join(cleared)} (level {state['level']})",
                        cleared=cleared,
                    )
                )
        return Observation(address, now, True, now, state), events

    def _relay_event(
        self, address: str, now: datetime, old: dict[str, Any], new: dict[str, Any], unknown_command: str | None
    ) -> MeterEvent:
        return MeterEvent(
            "relay",
            address,
            now,
            {
                "source": "meter",
                "address": address,
                "at": now.isoformat(),
                "action": None,
                "relay": new["relay"],
                "previous_relay": old.get("relay"),
                "relay_open": new["relay_open"],
                "trip_commanded": new["trip_commanded"],
                "pre_trip_alarm": new["pre_trip_alarm"],
                "power_hold": new["power_hold"],
                "previous_power_hold": bool(old.get("power_hold")),
                "status_word_3": new.get("status_word_3"),
                **_wallet_fields(new),
                "command_id": None,
                "unknown_command_id": unknown_command,
            },
        )

    def _balance_alarm(self, name: str, address: str, now: datetime, state: dict[str, Any]) -> MeterEvent:
        w = WALLETS[_wallet_of(state) or "money"]
        thresholds = state.get(f"thresholds_{w.suffix}") or self._thresholds.get(address) or {}
        limit = {
            "balance_alarm_1": thresholds.get("alarm_1"),
            "balance_alarm_2": thresholds.get("alarm_2"),
            "balance_zero": 0,
            "overdraft": -int(thresholds.get("overdraft", 0)),
        }[name]
        net = int(state[f"remaining_{w.suffix}"]) - int(state[f"overdraft_{w.suffix}"])

        def amount(n: int | None) -> str:
            return f"{hundredths(n)} {w.unit}"

        reason = {
            "balance_alarm_1": f"{w.what} {amount(net)} is at or below {w.limit} 1 ({amount(limit)})",
            "balance_alarm_2": f"{w.what} {amount(net)} is at or below {w.limit} 2 ({amount(limit)})",
            "balance_zero": f"the balance has reached zero ({amount(net)})",
            "overdraft": f"the balance {amount(net)} is at the overdraft limit ({amount(limit)}): the meter trips",
        }[name]
        return self._alarm(name, address, now, state, reason, threshold=hundredths(limit))

    def _alarm(
        self, name: str, address: str, now: datetime, state: dict[str, Any], reason: str, **extra: Any
    ) -> MeterEvent:
        return MeterEvent(
            "alarms",
            address,
            now,
            {
                "alarm": name,
                "severity": SEVERITY[name],
                "source": "meter",
                "by": "meter",
                "rule": None,
                "reason": reason,
                "address": address,
                "kind": None,
                "command_id": None,
                "at": now.isoformat(),
                "relay": state.get("relay"),
                **_wallet_fields(state),
                **extra,
            },
        )

    def _emit(self, event: MeterEvent) -> None:
        self.stats.events += 1
        log.info("meter %s: %s %s", event.address, event.topic, event.payload.get("alarm") or event.payload["relay"])
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("poll listener failed")


__all__ = [
    "DEFAULT_INTERVAL_S",
    "ENERGY_THRESHOLD_DIS",
    "THRESHOLD_DIS",
    "WALLETS",
    "MeterEvent",
    "PollConfig",
    "PollStats",
    "Poller",
    "WalletRegisters",
    "balance_alarms",
    "balance_level",
    "hundredths",
    "observation_view",
    "relay_from_status",
    "relay_state",
]
