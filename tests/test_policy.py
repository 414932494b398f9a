"""The safety policy (gateway/policy.py; prepaid.md §5.2, §5.3): each rule refuses what it should and nothing else.

First the rules on their own (:meth:`Policy.check_relay` at exact times, boundaries included),
then through the :class:`CommandService` on an in-memory line to the simulator: a refused
command ends ``refused`` with its rule and reason in the audit events and nothing reaches
the meter (the frames the gateway wrote, the simulated bus's request counter, the meter's
relay); and the policy is checked again before every retry.

Times are meter-local (UTC+8). 2026-11-24 is a Tuesday.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from simline import SimLineTransport

from gateway.config import build
from gateway.holidays import CN_PUBLIC_HOLIDAYS
from gateway.ledger import Command, Event, State, Store
from gateway.link import Link, LinkConfig
from gateway.policy import TRIP_ACTIONS, CustomerFacts, Policy, Refusal
from gateway.service import RELAY_ACTIONS, CommandService, InvalidCommand, MeterEntry, ServiceConfig
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSpec
from simulator.fleet import BusSpec, Fleet, MeterSpec

MON, TUE, WED, THU, FRI, SAT, SUN = (date(2026, 11, 23) + timedelta(days=i) for i in range(7))
NEXT_MON = date(2026, 11, 30)
NOT_TRIPS = sorted(set(RELAY_ACTIONS) - TRIP_ACTIONS)
A1, A2, A3 = "000000000001", "000000000002", "000000000003"


def at(day: date, hh: int, mm: int = 0, ss: int = 0, us: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, ss, us, tzinfo=METER_TZ)


def rule(policy: Policy, when: datetime, facts: CustomerFacts | None = None, **kw: Any) -> str | None:
    """The rule that refuses a plain trip at ``when`` (None: allowed)."""
    refusal = policy.check_relay(kw.pop("action", "trip"), facts or CustomerFacts(), when, **kw)
    return refusal.rule if refusal else None


def test_trip_actions_are_the_three_disconnections():
    assert {"trip", "trip-auto-restore", "trip-auto-restore-alt"} == TRIP_ACTIONS
    assert TRIP_ACTIONS < set(RELAY_ACTIONS)


# --- power hold -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("action", sorted(TRIP_ACTIONS))
def test_power_hold_refuses_every_trip(action: str):
    refusal = Policy().check_relay(action, CustomerFacts(power_hold=True), at(TUE, 11))
    assert refusal is not None and refusal.rule == "power_hold"
    assert "power hold" in refusal.reason


@pytest.mark.parametrize("action", NOT_TRIPS)
def test_nothing_but_trips_is_ever_refused(action: str):
    """Closing, alarms and power hold: allowed whatever the facts and the time (a hold, at night, on a
    weekend holiday, in the grace period, with notices required and never sent)."""
    strict = Policy(holidays=frozenset({SAT}), require_notice=True)
    facts = CustomerFacts(power_hold=True, zero_since=at(SAT, 1), notice_sent=None)
    for when in (at(TUE, 11), at(TUE, 23), at(SAT, 2), at(SUN, 12)):
        assert strict.check_relay(action, facts, when, arrears=True) is None, when
        assert strict.check_relay(action, facts, when) is None


def test_power_hold_goes_first_and_nothing_else_refuses_a_daytime_trip():
    assert rule(Policy(), at(TUE, 23), CustomerFacts(power_hold=True)) == "power_hold"
    assert rule(Policy(), at(TUE, 11), CustomerFacts(power_hold=False)) is None


# --- quiet hours ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (at(TUE, 0, 0), "quiet_hours"),
        (at(TUE, 3), "quiet_hours"),
        (at(TUE, 8, 59, 59, 999_999), "quiet_hours"),
        (at(TUE, 9, 0), None),  # quiet_end is allowed
        (at(TUE, 12), None),
        (at(TUE, 17, 59, 59, 999_999), None),
        (at(TUE, 18, 0), "quiet_hours"),  # quiet_start is quiet
        (at(TUE, 23, 59, 59), "quiet_hours"),
        (at(WED, 8, 59), "quiet_hours"),
        (at(FRI, 17, 59), None),
        (at(FRI, 18, 0), "quiet_hours"),
    ],
)
def test_default_quiet_hours_are_weekday_nights_18_to_09(when: datetime, expected: str | None):
    assert rule(Policy(), when) == expected
    if expected:
        assert "night (18:00-09:00)" in Policy().check_relay("trip", CustomerFacts(), when).reason  # type: ignore[union-attr]


def test_quiet_hours_are_meter_local_time_whatever_zone_the_time_comes_in():
    policy = Policy()
    assert rule(policy, datetime(2026, 11, 24, 1, 0, tzinfo=UTC)) is None  # 09:00 in Beijing
    assert rule(policy, datetime(2026, 11, 24, 0, 59, 59, tzinfo=UTC)) == "quiet_hours"
    assert rule(policy, datetime(2026, 11, 24, 9, 59, 59, tzinfo=UTC)) is None
    assert rule(policy, datetime(2026, 11, 24, 10, 0, tzinfo=UTC)) == "quiet_hours"  # 18:00 in Beijing
    # Friday 16:00 UTC is Saturday 00:00 in Beijing: the weekend.
    assert policy.quiet(datetime(2026, 11, 27, 16, 0, tzinfo=UTC)) == "weekend"


@pytest.mark.parametrize(
    ("when", "why"),
    [
        (at(FRI, 23), "night"),  # Friday night is a night
        (at(SAT, 0, 0), "weekend"),
        (at(SAT, 12), "weekend"),
        (at(SUN, 12), "weekend"),
        (at(SUN, 23, 59, 59), "weekend"),
        (at(NEXT_MON, 0, 0), "weekend"),
        (at(NEXT_MON, 8, 59, 59, 999_999), "weekend"),
        (at(NEXT_MON, 9, 0), None),
    ],
)
def test_weekend_runs_from_saturday_midnight_to_monday_quiet_end(when: datetime, why: str | None):
    policy = Policy()
    assert (policy.quiet(when) or "").split(" ")[0] == (why or "")
    assert rule(policy, when) == ("quiet_hours" if why else None)


def test_weekend_follows_a_configured_quiet_end_and_can_be_switched_off():
    early = Policy(quiet_end=time(7, 0))
    assert early.quiet(at(NEXT_MON, 6, 59)) == "weekend"
    assert early.quiet(at(NEXT_MON, 7, 0)) is None
    open_weekends = Policy(weekend_quiet=False)
    assert rule(open_weekends, at(SAT, 12)) is None
    assert rule(open_weekends, at(SUN, 9)) is None
    assert open_weekends.quiet(at(SAT, 18)) == "night (18:00-09:00)"  # nights stay quiet
    assert open_weekends.quiet(at(NEXT_MON, 8)) == "night (18:00-09:00)"


def test_holidays_and_the_morning_after():
    policy = Policy(holidays=frozenset({WED}))
    assert rule(policy, at(TUE, 17, 59)) is None  # the day before is a normal day ...
    assert policy.quiet(at(TUE, 18)) == "night (18:00-09:00)"  # ... with a normal night
    for when in (at(WED, 0, 0), at(WED, 9), at(WED, 12), at(WED, 23, 59, 59)):
        assert policy.quiet(when) == "2026-11-25 is a holiday", when
    assert policy.quiet(at(THU, 0, 0)) == "the morning after the holiday 2026-11-25"
    assert policy.quiet(at(THU, 8, 59, 59, 999_999)) == "the morning after the holiday 2026-11-25"
    assert rule(policy, at(THU, 9, 0)) is None
    assert rule(Policy(), at(WED, 12)) is None  # not a holiday without the calendar


def test_consecutive_holidays_and_a_configured_morning():
    policy = Policy(holidays=frozenset({WED, THU}), quiet_end=time(7, 30))
    assert "holiday" in (policy.quiet(at(THU, 12)) or "")
    assert policy.quiet(at(FRI, 7, 29)) == "the morning after the holiday 2026-11-26"
    assert policy.quiet(at(FRI, 7, 30)) is None


def test_configured_night_window():
    policy = Policy(quiet_start=time(22, 0), quiet_end=time(6, 0))
    assert rule(policy, at(TUE, 18, 30)) is None
    assert rule(policy, at(TUE, 21, 59, 59)) is None
    assert policy.quiet(at(TUE, 22, 0)) == "night (22:00-06:00)"
    assert rule(policy, at(WED, 5, 59, 59)) == "quiet_hours"
    assert rule(policy, at(WED, 6, 0)) is None
    assert rule(policy, at(WED, 8, 30)) is None


def test_configured_window_inside_the_day():
    policy = Policy(quiet_start=time(12, 0), quiet_end=time(14, 0), weekend_quiet=False)
    assert rule(policy, at(TUE, 11, 59, 59)) is None
    assert policy.quiet(at(TUE, 12, 0)) == "quiet hours (12:00-14:00)"
    assert rule(policy, at(TUE, 13, 59, 59)) == "quiet_hours"
    assert rule(policy, at(TUE, 14, 0)) is None
    assert rule(policy, at(TUE, 23)) is None
    assert rule(policy, at(TUE, 3)) is None


def test_quiet_start_equal_to_quiet_end_means_no_nightly_quiet_hours():
    policy = Policy(quiet_start=time(9, 0), quiet_end=time(9, 0), weekend_quiet=False)
    for hour in range(7 * 24):
        when = at(MON, 0) + timedelta(hours=hour, minutes=30)
        assert policy.quiet(when) is None, when


# --- grace period after zero ------------------------------------------------------------------------------


def test_grace_period_after_zero_refuses_every_trip_not_declared_otherwise():
    policy = Policy()  # 48 h
    now = at(TUE, 11)
    recent = CustomerFacts(zero_since=now - timedelta(hours=47, minutes=59, seconds=59))
    refusal = policy.check_relay("trip", recent, now, arrears=True)
    assert refusal is not None and refusal.rule == "grace_period"
    assert "trip from 2026-11-24 11:00" in refusal.reason
    assert rule(policy, now, CustomerFacts(zero_since=now - timedelta(hours=48)), arrears=True) is None  # boundary
    # A trip that does not say why is refused too: just after the balance ran out it is one for
    # arrears, whoever sends it (an operator's manual trip). Declared not for arrears, it may go.
    assert rule(policy, now, recent) == "grace_period"
    assert rule(policy, now, recent, arrears=False) is None
    assert rule(policy, now, CustomerFacts(), arrears=True) is None  # the balance never reached zero
    assert rule(policy, now, recent, arrears=True, action="trip-auto-restore") == "grace_period"


def test_grace_period_is_configurable_and_quiet_hours_come_first():
    policy = Policy(grace=timedelta(hours=12))
    now = at(TUE, 11)
    assert rule(policy, now, CustomerFacts(zero_since=now - timedelta(hours=11, minutes=59)), arrears=True)
    assert rule(policy, now, CustomerFacts(zero_since=now - timedelta(hours=12)), arrears=True) is None
    assert rule(Policy(grace=timedelta(0)), now, CustomerFacts(zero_since=now), arrears=True) is None
    night = at(TUE, 23)
    assert rule(policy, night, CustomerFacts(zero_since=night), arrears=True) == "quiet_hours"


# --- notice periods ---------------------------------------------------------------------------------------


def test_notice_is_not_required_by_default():
    assert rule(Policy(), at(TUE, 11), CustomerFacts(notice_sent=None), arrears=True) is None


def test_required_notice_periods_7_days_residential_3_days_other():
    policy = Policy(require_notice=True)
    now = at(TUE, 11)
    refusal = policy.check_relay("trip", CustomerFacts(), now, arrears=True)
    assert refusal is not None and (refusal.rule, refusal.reason) == ("notice", "no disconnection notice was sent")

    def residential(ago: timedelta) -> str | None:
        return rule(policy, now, CustomerFacts(residential=True, notice_sent=now - ago), arrears=True)

    def other(ago: timedelta) -> str | None:  # with its reminder 2 h before the trip
        sent = (now - ago, now - timedelta(hours=2))
        return rule(policy, now, CustomerFacts(residential=False, notices=sent), arrears=True)

    assert residential(timedelta(days=7) - timedelta(microseconds=1)) == "notice"
    assert residential(timedelta(days=7)) is None
    assert residential(timedelta(days=3)) == "notice"
    assert other(timedelta(days=3) - timedelta(microseconds=1)) == "notice"
    assert other(timedelta(days=3)) is None
    seven = policy.check_relay("trip", CustomerFacts(notice_sent=now - timedelta(days=1)), now, arrears=True)
    assert seven is not None and "7 days" in seven.reason
    three = policy.check_relay(
        "trip", CustomerFacts(residential=False, notice_sent=now - timedelta(days=1)), now, arrears=True
    )
    assert three is not None and "3 days" in three.reason
    # The period counts from the first notice: a later one (a reminder) does not restart it.
    assert residential(timedelta(days=8)) is None
    later = CustomerFacts(notices=(now - timedelta(days=8), now - timedelta(hours=1)))
    assert rule(policy, now, later, arrears=True) is None
    assert rule(policy, now, CustomerFacts()) is None  # not an arrears trip: no notice needed


def test_notice_periods_are_configurable_and_grace_comes_first():
    policy = Policy(require_notice=True, notice_residential=timedelta(days=10), notice_other=timedelta(days=1))
    now = at(TUE, 11)
    assert rule(policy, now, CustomerFacts(notice_sent=now - timedelta(days=9)), arrears=True) == "notice"
    assert rule(policy, now, CustomerFacts(notice_sent=now - timedelta(days=10)), arrears=True) is None
    shop = CustomerFacts(residential=False, notices=(now - timedelta(days=1), now - timedelta(hours=1)))
    assert rule(policy, now, shop, arrears=True) is None
    both = CustomerFacts(zero_since=now - timedelta(hours=1), notice_sent=None)
    assert rule(policy, now, both, arrears=True) == "grace_period"


def test_non_residential_customers_need_a_reminder_1_h_before_the_trip():
    """prepaid.md §5.2: non-residential, at least 3 days' notice "plus a reminder 1 h before"."""
    policy = Policy(require_notice=True)
    now = at(TUE, 11)
    notice = now - timedelta(days=4)

    def shop(*reminders: timedelta) -> Refusal | None:
        facts = CustomerFacts(residential=False, notices=(notice, *(now - r for r in reminders)))
        return policy.check_relay("trip", facts, now, arrears=True)

    missing = shop()
    assert missing is not None and missing.rule == "notice" and "reminder at least 1 h" in missing.reason
    assert shop(timedelta(minutes=59)) is not None  # too late: less than an hour ago
    assert shop(timedelta(hours=1)) is None
    assert shop(timedelta(hours=25)) is not None  # a reminder from two days ago is no reminder for today
    assert (
        Policy(require_notice=True, reminder=timedelta(0)).check_relay(
            "trip", CustomerFacts(residential=False, notices=(notice,)), now, arrears=True
        )
        is None
    )
    stale = CustomerFacts(notices=(now - timedelta(days=31),))
    assert rule(policy, now, stale, arrears=True) == "notice"  # older than notice_valid (30 days)


def test_dry_run_is_not_a_verdict_of_the_rules():
    """dry_run does not change what the rules say; the service refuses to send (tests below)."""
    assert rule(Policy(dry_run=True), at(TUE, 11)) is None
    assert rule(Policy(dry_run=True), at(TUE, 23)) == "quiet_hours"


def test_policy_from_the_gateway_configuration():
    config = build(
        {
            "policy": {
                "quiet_start": "22:00",
                "quiet_end": "06:30",
                "weekend_quiet": False,
                "holidays": ["2026-11-25"],
                "grace_hours": 12,
                "dry_run": True,
                "require_notice": True,
                "notice_residential_days": 14,
                "notice_other_days": 5,
            }
        }
    )
    p = config.policy
    assert (p.notice_residential, p.notice_other) == (timedelta(days=14), timedelta(days=5))
    assert (p.quiet_start, p.quiet_end, p.weekend_quiet) == (time(22), time(6, 30), False)
    assert p.holidays == {WED} | CN_PUBLIC_HOLIDAYS  # the listed day and the default calendar
    assert (p.grace, p.dry_run, p.require_notice) == (timedelta(hours=12), True, True)
    assert rule(p, at(SAT, 12)) is None
    assert rule(p, at(THU, 6, 29)) == "quiet_hours"
    defaults = build({}).policy
    assert defaults == Policy(holidays=CN_PUBLIC_HOLIDAYS)


def test_next_trip_time_is_the_end_of_the_quiet_period():
    p = Policy(holidays=frozenset({WED}))
    assert p.next_trip_time(at(TUE, 11)) == at(TUE, 11)  # not quiet: now
    assert p.next_trip_time(at(TUE, 19)) == at(THU, 9)  # the night, then the holiday and its morning
    assert p.next_trip_time(at(SAT, 12)) == at(SAT + timedelta(days=2), 9)  # the weekend ends Monday 09:00
    for start in (at(TUE, 19), at(SAT, 3), at(WED, 12)):
        t = p.next_trip_time(start)
        assert t >= start and p.quiet(t) is None


# --- through the command service --------------------------------------------------------------------------

FAST = LinkConfig(
    gap_s=0.0, td_max_s=0.05, margin_s=0.05, inter_byte_s=0.15, retries=2, backoff_s=0.01, security_extra_s=0.1
)


def function_of(wire: bytes) -> int:
    """The function code of a request frame as written (after its FE preamble)."""
    return wire[wire.index(0x68) + 8] & 0x1F


class LossyLine(SimLineTransport):
    """The in-memory line, able to lose relay requests before they reach the meters (line noise)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lose_relay = 0
        self.lose_writes = 0  # 0x14 (parameter writes)

    async def write(self, data: bytes) -> None:
        if self.lose_relay and function_of(data) == 0x1C:
            self.lose_relay -= 1
            self.written.append(data)  # it left the gateway and never arrived
            return
        if self.lose_writes and function_of(data) == 0x14:
            self.lose_writes -= 1
            self.written.append(data)
            return
        await super().write(data)


@dataclasses.dataclass
class Rig:
    clock: VirtualClock
    fleet: Fleet
    line: LossyLine
    store: Store
    service: CommandService

    def relay_frames(self) -> int:
        """0x1C frames the gateway has written on the line."""
        return sum(function_of(w) == 0x1C for w in self.line.written)

    def requests(self) -> int:
        """Request frames that reached the simulated bus."""
        return self.fleet.buses["bus0"].stats.requests

    def relay(self, address: str = A1) -> str:
        return str(self.fleet.state(address)["relay"])

    async def trip(self, key: str, address: str = A1, action: str = "trip", **params: Any) -> Command:
        command, created = await self.service.submit(key, "relay", address, {"action": action, **params}, "ops")
        assert created
        return command

    async def done(self, command: Command) -> tuple[Command, list[Event]]:
        await self.service.drain(10)
        final = await self.store.get(command.id)
        assert final is not None
        return final, await self.store.events(command_id=command.id)

    async def until(self, command: Command, predicate: Callable[[Command], bool]) -> Command:
        for _ in range(500):
            current = await self.store.get(command.id)
            assert current is not None
            if predicate(current) and not self.service._tasks:
                return current
            await asyncio.sleep(0.01)
        raise AssertionError(f"command still {current.state} after 5 s")


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[RigFactory]:
    """Meters 1..3 on one line (meter 2 a power-hold customer, meter 3 non-residential), a service on a
    virtual clock starting at ``start`` (default Tuesday 11:00) with ``policy``."""
    rigs: list[tuple[Rig, Link]] = []

    async def make(start: datetime | None = None, policy: Policy | None = None) -> Rig:
        clock = VirtualClock(start or at(TUE, 11), 0)
        fleet = Fleet([BusSpec("bus0", [MeterSpec(a) for a in (A1, A2, A3)])], clock, seed=1)
        line = LossyLine(fleet.buses["bus0"])
        link = await Link(line, dataclasses.replace(FAST), name="bus0").start()
        store = await Store.sqlite(tmp_path / f"ledger{len(rigs)}.sqlite").open()
        meters = {
            A1: MeterEntry(A1, "bus0"),
            A2: MeterEntry(A2, "bus0", power_hold=True),
            A3: MeterEntry(A3, "bus0", residential=False),
        }
        service = CommandService(
            store,
            meters,
            {"bus0": link},
            policy=policy or Policy(),
            config=ServiceConfig(retry_delay=timedelta(minutes=5), poll_s=0.01),
            now=clock.now,
        )
        await service.start()
        rig = Rig(clock, fleet, line, store, service)
        rigs.append((rig, link))
        return rig

    try:
        yield make
    finally:
        for rig, link in rigs:
            await rig.service.stop()
            await link.stop()
            await rig.store.close()


def refused_by(events: list[Event]) -> tuple[str, str]:
    last = events[-1]
    assert last.state is State.REFUSED, last
    return last.detail["rule"], last.detail["reason"]


async def test_a_trip_refused_at_night_is_recorded_and_nothing_reaches_the_meter(make_rig: RigFactory):
    rig = await make_rig(start=at(TUE, 22))
    command, events = await rig.done(await rig.trip("night-1", arrears=True))
    assert command.state is State.REFUSED and command.attempts == 0
    assert [e.state for e in events] == [State.ACCEPTED, State.REFUSED]
    assert refused_by(events) == ("quiet_hours", "no trips in quiet hours: night (18:00-09:00)")
    assert rig.line.written == [] and rig.requests() == 0  # not even an authentication
    assert rig.relay() == "closed"
    # ... and what is allowed at night still goes out: closing the relay.
    close, events = await rig.done(await rig.trip("night-close", action="direct-close"))
    assert close.state is State.CONFIRMED, events[-1].detail
    assert rig.relay_frames() == 1


async def test_power_hold_customers_are_never_tripped_but_get_every_other_command(make_rig: RigFactory):
    rig = await make_rig()
    for i, action in enumerate(sorted(TRIP_ACTIONS)):
        command, events = await rig.done(await rig.trip(f"hold-trip-{i}", A2, action))
        assert command.state is State.REFUSED
        assert refused_by(events)[0] == "power_hold"
    assert rig.line.written == [] and rig.relay(A2) == "closed"
    for action in ("alarm-on", "alarm-off", "direct-close", "power-hold-on", "power-hold-off"):
        command, events = await rig.done(await rig.trip(f"hold-{action}", A2, action))
        assert command.state is State.CONFIRMED, (action, events[-1].detail)
    assert rig.relay_frames() == 5
    trip, _ = await rig.done(await rig.trip("no-hold-trip", A1))  # the customer next door is not on hold
    assert trip.state is State.CONFIRMED and rig.relay(A1) != "closed"


async def test_dry_run_records_the_decision_and_sends_nothing(make_rig: RigFactory):
    rig = await make_rig(policy=Policy(dry_run=True))
    trip, events = await rig.done(await rig.trip("dry-trip"))
    assert trip.state is State.REFUSED and refused_by(events) == ("dry_run", "dry-run: not sent")
    close, events = await rig.done(await rig.trip("dry-close", action="direct-close"))
    assert close.state is State.REFUSED and refused_by(events)[0] == "dry_run"
    _, events = await rig.done(await rig.trip("dry-hold", A2))
    assert refused_by(events)[0] == "power_hold"  # the rules' verdict comes first
    rig.clock.advance(timedelta(hours=12))  # 23:00
    _, events = await rig.done(await rig.trip("dry-night"))
    assert refused_by(events)[0] == "quiet_hours"
    assert rig.line.written == [] and rig.requests() == 0 and rig.relay() == "closed"
    assert len(await rig.store.events()) == 8  # every decision recorded: accepted + refused, 4 commands


async def test_dry_run_sends_no_top_up_tariff_or_parameters_either(make_rig: RigFactory):
    rig = await make_rig(policy=Policy(dry_run=True))
    before = rig.fleet.state(A1)
    commands = [
        (await rig.service.submit("dry-topup", "topup", A1, {"amount": "50.00"}, "ops"))[0],
        (await rig.service.submit("dry-tariff", "tariff", A1, {"prices": ["0.6000"]}, "ops"))[0],
        (await rig.service.submit("dry-params", "params", A1, {"alarm_1": "30.00"}, "ops"))[0],
        (await rig.service.submit("dry-time", "time_sync", A1, {}, "ops"))[0],
    ]
    for command in commands:
        final, events = await rig.done(command)
        assert final.state is State.REFUSED and refused_by(events) == ("dry_run", "dry-run: not sent")
    assert rig.line.written == [] and rig.requests() == 0
    after = rig.fleet.state(A1)
    assert (after["remaining_money"], after["purchase_count"]) == (before["remaining_money"], before["purchase_count"])


async def test_grace_period_through_the_service(make_rig: RigFactory):
    rig = await make_rig()
    rig.service.zero_since[A1] = rig.clock.now() - timedelta(hours=1)
    arrears, events = await rig.done(await rig.trip("arrears-1", arrears=True))
    assert arrears.state is State.REFUSED and refused_by(events)[0] == "grace_period"
    assert rig.line.written == [] and rig.relay() == "closed"
    # An operator's trip that does not say why: just after zero it is an arrears trip, refused too.
    unsaid, events = await rig.done(await rig.trip("manual-0"))
    assert unsaid.state is State.REFUSED and refused_by(events)[0] == "grace_period"
    assert rig.line.written == [] and rig.relay() == "closed"
    manual, events = await rig.done(await rig.trip("manual-1", arrears=False))  # declared not for arrears
    assert manual.state is State.CONFIRMED, events[-1].detail
    close, _ = await rig.done(await rig.trip("close-1", action="direct-close"))
    assert close.state is State.CONFIRMED and rig.relay() == "closed"
    rig.clock.advance(timedelta(hours=46, minutes=59, seconds=59))  # Thursday 09:59:59
    _, events = await rig.done(await rig.trip("arrears-2", arrears=True))
    assert refused_by(events)[0] == "grace_period"
    rig.clock.advance(timedelta(seconds=1))  # 48 h after zero
    again, events = await rig.done(await rig.trip("arrears-3", arrears=True))
    assert again.state is State.CONFIRMED, events[-1].detail
    assert rig.relay() != "closed"


async def test_notice_periods_through_the_service(make_rig: RigFactory):
    rig = await make_rig(policy=Policy(require_notice=True))
    now = rig.clock.now()
    _, events = await rig.done(await rig.trip("n-1", arrears=True))
    assert refused_by(events) == ("notice", "no disconnection notice was sent")
    rig.service.notice_sent[A1] = now - timedelta(days=6, hours=23)
    _, events = await rig.done(await rig.trip("n-2", arrears=True))
    assert refused_by(events)[0] == "notice" and "7 days" in refused_by(events)[1]
    await rig.service.record_notice(A3, "ops", now - timedelta(days=3))  # non-residential: 3 days ...
    _, events = await rig.done(await rig.trip("n-3a", A3, arrears=True))
    assert refused_by(events)[0] == "notice" and "reminder" in refused_by(events)[1]
    await rig.service.record_notice(A3, "ops", now - timedelta(hours=1))  # ... plus a reminder 1 h before
    other, events = await rig.done(await rig.trip("n-3", A3, arrears=True))
    assert other.state is State.CONFIRMED, events[-1].detail
    assert rig.relay_frames() == 1 and rig.relay(A1) == "closed"
    rig.service.notice_sent[A1] = now - timedelta(days=7)
    third, events = await rig.done(await rig.trip("n-4", arrears=True))
    assert third.state is State.CONFIRMED, events[-1].detail


async def test_the_policy_is_checked_again_before_a_retry(make_rig: RigFactory):
    """17:50: the trip request is lost on the line (NoReply after 3 tries); the retry is due at 18:05."""
    rig = await make_rig(start=at(TUE, 17, 50))
    rig.line.lose_relay = 3
    command = await rig.trip("retry-1", arrears=True)
    waiting = await rig.until(command, lambda c: c.not_before is not None)
    assert waiting.state is State.SENT and waiting.attempts == 1
    assert rig.relay_frames() == 3 and rig.relay() == "closed"
    rig.clock.advance(timedelta(minutes=15))
    final, events = await rig.done(command)
    assert final.state is State.REFUSED
    assert [e.state for e in events] == [State.ACCEPTED, State.SENT, State.SENT, State.REFUSED]
    assert "NoReply" in events[2].detail["error"]
    rule_, reason = refused_by(events)
    assert rule_ == "quiet_hours" and "night" in reason
    assert events[-1].detail["verified"] is False  # the meter's status word shows no trip
    assert rig.relay_frames() == 3 and rig.relay() == "closed"  # not sent again


async def test_a_retry_that_is_allowed_is_sent(make_rig: RigFactory):
    rig = await make_rig(start=at(TUE, 17, 40))
    rig.line.lose_relay = 3
    command = await rig.trip("retry-2")
    await rig.until(command, lambda c: c.not_before is not None)
    rig.clock.advance(timedelta(minutes=6))  # 17:46: still a weekday afternoon
    final, events = await rig.done(command)
    assert final.state is State.CONFIRMED, events[-1].detail
    # Sent again (twice if the meter's 5-minute session had run out: the renewal is not a retry).
    assert rig.relay_frames() > 3 and rig.relay() != "closed"


async def test_a_trip_whose_replies_were_lost_is_not_called_refused_on_a_retry_at_night(make_rig: RigFactory):
    """The meter tripped at 17:50 but all three replies were lost: the retry at 18:05 may not be sent, and the
    ledger must not say "refused" for a customer who is disconnected; the status word says what happened."""
    rig = await make_rig(start=at(TUE, 17, 50))
    rig.fleet.meter(A1).faults.add(FaultSpec(Fault.NO_REPLY, remaining=3, function=0x1C))
    command = await rig.trip("lost-reply", arrears=True)
    await rig.until(command, lambda c: c.not_before is not None)
    assert rig.relay() == "open"  # it did act
    rig.clock.advance(timedelta(minutes=15))
    final, events = await rig.done(command)
    assert rig.relay_frames() == 3  # not sent again at night
    assert final.state is State.CONFIRMED, events[-1].detail
    last = events[-1].detail
    assert (last["rule"], last["not_sent_again"], last["verified"]) == ("quiet_hours", True, True)
    assert final.result is not None and final.result["relay_open"] is True


async def test_a_sent_command_past_its_validity_is_settled_by_reading_the_meter(make_rig: RigFactory):
    """A retry after the validity end is never sent; whether an earlier attempt acted, the status word says."""
    rig = await make_rig()
    rig.line.lose_relay = 3  # meter 3: the request never arrived
    rig.fleet.meter(A1).faults.add(FaultSpec(Fault.NO_REPLY, remaining=3, function=0x1C))  # meter 1: the replies
    until = rig.clock.now() + timedelta(minutes=3)
    lost_request, _ = await rig.service.submit("late-1", "relay", A3, {"action": "trip"}, "ops", valid_until=until)
    await rig.until(lost_request, lambda c: c.not_before is not None)
    lost_reply, _ = await rig.service.submit("late-2", "relay", A1, {"action": "trip"}, "ops", valid_until=until)
    await rig.until(lost_reply, lambda c: c.not_before is not None)
    assert (rig.relay(A3), rig.relay(A1)) == ("closed", "open")
    rig.clock.advance(timedelta(minutes=6))
    failed, events = await rig.done(lost_request)
    assert failed.state is State.FAILED and "validity ended" in events[-1].detail["error"]
    assert events[-1].detail["verified"] is False
    confirmed, events = await rig.done(lost_reply)
    assert confirmed.state is State.CONFIRMED and "validity ended" in events[-1].detail["error"]
    assert rig.relay_frames() == 6  # three tries each, none after the validity end
    with pytest.raises(InvalidCommand, match="in the past"):  # nothing is recorded
        await rig.service.submit(
            "late-3", "relay", A2, {"action": "direct-close"}, "ops", valid_until=rig.clock.now() - timedelta(seconds=1)
        )
    never, _ = await rig.service.submit(  # deferred past its own validity end
        "late-4",
        "relay",
        A2,
        {"action": "direct-close"},
        "ops",
        valid_until=rig.clock.now() + timedelta(seconds=30),
        not_before=rig.clock.now() + timedelta(minutes=1),
    )
    rig.clock.advance(timedelta(minutes=2))
    never, events = await rig.done(never)
    assert never.state is State.FAILED and "verified" not in events[-1].detail  # never sent: nothing to read
    assert rig.relay_frames() == 6


async def test_every_kind_of_command_honours_its_validity_end(make_rig: RigFactory):
    """Top-ups, tariffs and parameters may start until their validity end, never later: one never
    sent fails; one sent whose reply was lost is settled by reading the meter, not sent again."""
    rig = await make_rig()
    soon = rig.clock.now() + timedelta(minutes=3)
    first, _ = await rig.service.submit("t-0", "topup", A1, {"amount": "1.00"}, "ops")
    assert (await rig.done(first))[0].state is State.CONFIRMED  # the ESAM session is open now
    money, count = rig.fleet.state(A1)["remaining_money"], rig.fleet.state(A1)["purchase_count"]

    # A1: the recharge reached the meter, its replies were lost; A3: a tariff write never arrived.
    faulted: list[str] = []

    def lose_the_recharge_replies(command: Command, info: dict[str, Any]) -> None:
        if command.idempotency_key == "t-1" and info["event"] == "sent" and not faulted:  # recharge next
            faulted.append(command.id)
            rig.fleet.meter(A1).faults.add(FaultSpec(Fault.NO_REPLY, remaining=3, function=0x03))

    rig.service.listeners.append(lose_the_recharge_replies)
    lost_reply, _ = await rig.service.submit("t-1", "topup", A1, {"amount": "7.00"}, "ops", valid_until=soon)
    await rig.until(lost_reply, lambda c: c.not_before is not None)
    rig.line.lose_writes = 3
    lost_write, _ = await rig.service.submit("p-1", "params", A3, {"alarm_1": "33.00"}, "ops", valid_until=soon)
    await rig.until(lost_write, lambda c: c.not_before is not None)
    later, _ = await rig.service.submit(  # deferred past its own validity end: never starts
        "t-2", "topup", A1, {"amount": "9.00"}, "ops", valid_until=soon, not_before=soon + timedelta(minutes=1)
    )
    frames = len(rig.line.written)
    rig.clock.advance(timedelta(minutes=10))
    applied, events = await rig.done(lost_reply)
    assert applied.state is State.CONFIRMED and applied.result is not None
    assert applied.result["outcome"] == "applied before its validity ended"
    assert rig.fleet.state(A1)["purchase_count"] == count + 1
    added = Decimal(rig.fleet.state(A1)["remaining_money"]) - Decimal(money)
    assert Decimal("6.90") < added <= 7  # less ten minutes of consumption
    not_applied, events = await rig.done(lost_write)
    assert not_applied.state is State.FAILED and "not sent again" in events[-1].detail["reason"]
    never, events = await rig.done(later)
    assert never.state is State.FAILED and "validity ended" in events[-1].detail["error"]
    after = rig.line.written[frames:]
    recharge = bytes((b + 0x33) & 0xFF for b in (0xFF, 0x02, 0x01, 0x07))  # DI 070102FF on the wire
    assert not any(function_of(w) == 0x14 for w in after)  # no write after the validity end
    assert not any(function_of(w) == 0x03 and recharge in w for w in after)  # nor a recharge (reads only)
    assert any(function_of(w) == 0x03 and recharge in w for w in rig.line.written[:frames])  # (it was one)


@pytest.mark.parametrize("action", ["trip", "close-allowed"])
async def test_in_dry_run_a_command_sent_before_is_unknown(make_rig: RigFactory, action: str):
    """Switched to dry-run while a command waits for its retry: nothing may go out, not even a read."""
    rig = await make_rig()
    rig.line.lose_relay = 3
    command = await rig.trip("before-dry-run", action=action)
    await rig.until(command, lambda c: c.not_before is not None)
    rig.service.policy.dry_run = True
    written = len(rig.line.written)
    rig.clock.advance(timedelta(minutes=6))
    final, events = await rig.done(command)
    assert final.state is State.UNKNOWN and events[-1].detail["rule"] == "dry_run"
    assert len(rig.line.written) == written


async def test_an_opening_the_meter_takes_as_open_only_is_refused_not_confirmed(make_rig: RigFactory):
    """The meter's count became the opening's meanwhile (a card opened it): the meter only marks
    the account open and adds nothing, so the command must not say the money was applied."""
    rig = await make_rig()
    wallet = rig.fleet.meter(A3).meter.wallet
    wallet.count, wallet.opened = 0, False
    wallet.purchases.clear()
    money = rig.fleet.state(A3)["remaining_money"]

    def opened_at_the_meter(command: Command, info: dict[str, Any]) -> None:
        if command.idempotency_key == "open-1" and info["event"] == "sent":  # count 1 chosen
            wallet.count, wallet.opened = 1, True

    rig.service.listeners.append(opened_at_the_meter)
    opening, _ = await rig.service.submit("open-1", "topup", A3, {"amount": "30.00", "opening": True}, "ops")
    final, events = await rig.done(opening)
    assert final.state is State.REFUSED, (final.state, final.result)
    assert final.result is not None and final.result["outcome"] == "opened_only" and final.result["amount"] == "0.00"
    assert "only marked the account open" in events[-1].detail["reason"]
    assert rig.fleet.state(A3)["remaining_money"] == money


async def test_a_command_resent_after_its_validity_end_returns_the_first(make_rig: RigFactory):
    """An MQTT redelivery of an accepted command arrives after its valid_until: it is the same
    command, not a rejection (re-sending is always safe)."""
    rig = await make_rig()
    until = rig.clock.now() + timedelta(minutes=1)
    first, created = await rig.service.submit("k-late", "topup", A1, {"amount": "1.00"}, "ops", valid_until=until)
    assert created
    rig.clock.advance(timedelta(minutes=2))
    again, created = await rig.service.submit("k-late", "topup", A1, {"amount": "1.00"}, "ops", valid_until=until)
    assert not created and again.id == first.id
    with pytest.raises(InvalidCommand, match="in the past"):
        await rig.service.submit("k-new", "topup", A1, {"amount": "1.00"}, "ops", valid_until=until)


async def test_energy_wallet_meters_are_not_topped_up_in_yuan(make_rig: RigFactory):
    rig = await make_rig()
    rig.service.meters[A3] = dataclasses.replace(rig.service.meters[A3], wallet="energy")
    with pytest.raises(InvalidCommand, match="energy wallet"):
        await rig.service.submit("e-1", "topup", A3, {"amount": "10.00"}, "ops")
    assert await rig.store.commands() == []  # nothing recorded


def test_the_default_calendar_blocks_public_holidays_and_can_be_dropped(tmp_path):
    """A configured gateway knows the Chinese public holidays by default (gateway/holidays.py);
    calendar = "none" leaves only the days listed."""
    from gateway.config import ConfigError, load
    from gateway.holidays import CN_PUBLIC_HOLIDAYS

    base = '[[bus]]\nname = "b"\nurl = "tcp://127.0.0.1:1"\n[[meter]]\naddress = "1"\nbus = "b"\n'
    path = tmp_path / "g.toml"
    path.write_text(base)
    policy = load(path).policy
    assert policy.holidays == CN_PUBLIC_HOLIDAYS
    assert "holiday" in policy.quiet(datetime(2026, 10, 5, 11, 0, tzinfo=METER_TZ))  # National Day week, a Monday
    assert "holiday" in policy.quiet(datetime(2026, 2, 18, 11, 0, tzinfo=METER_TZ))  # Spring Festival, a Wednesday
    assert policy.quiet(datetime(2026, 11, 24, 11, 0, tzinfo=METER_TZ)) is None  # an ordinary Tuesday
    path.write_text(base + '[policy]\ncalendar = "none"\nholidays = ["2026-11-24"]\n')
    assert load(path).policy.holidays == {date(2026, 11, 24)}
    path.write_text(base + '[policy]\ncalendar = "us"\n')
    with pytest.raises(ConfigError, match="calendar"):
        load(path)
