"""The safety policy: checked before every send and every retry of a command.

Rules (prepaid.md §5.2, §5.3): no trip for power-hold customers; none in quiet hours
(nights, weekends and a holiday calendar, after the "friendly credit" practice of EDF and
Electric Ireland); none within a grace period after the balance reached zero (Shijiazhuang:
48 h); none before the legal notice period has run (7 days residential, 3 days
non-residential); and a dry-run mode that sends nothing. Every refusal carries a reason
code and text, and is recorded in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta

from protocols.dlt645 import METER_TZ

TRIP_ACTIONS = frozenset({"trip", "trip-auto-restore", "trip-auto-restore-alt"})
"""Relay actions that disconnect a customer."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the policy says no."""

    rule: str
    reason: str


REMINDER_VALID = timedelta(hours=24)
"""A reminder counts for a trip within this long after it [A]."""


@dataclass(frozen=True, slots=True)
class CustomerFacts:
    """What the policy needs to know about the customer behind a meter."""

    power_hold: bool = False
    residential: bool = True
    zero_since: datetime | None = None
    """When the balance reached zero (None: it has not)."""
    notice_sent: datetime | None = None
    """When the latest disconnection notice went out (None: never)."""
    notices: tuple[datetime, ...] = ()
    """Every recent notice, oldest first (the notice and its reminders); empty: only ``notice_sent``."""


@dataclass
class Policy:
    """Configurable rules; defaults follow prepaid.md §5.2."""

    quiet_start: time = time(18, 0)
    """Weekday quiet hours start (EDF: no disconnection Mon-Fri 18:00-09:00)."""
    quiet_end: time = time(9, 0)
    weekend_quiet: bool = True
    """No trips from Saturday 00:00 to Monday quiet_end (EDF: Sat 18:00 to Mon 09:00, widened)."""
    holidays: frozenset[date] = field(default_factory=frozenset)
    """No trips on these days, nor until quiet_end the next day."""
    grace: timedelta = timedelta(hours=48)
    """Time after the balance reaches zero before a trip (Shijiazhuang, prepaid.md §1.1)."""
    notice_residential: timedelta = timedelta(days=7)
    notice_other: timedelta = timedelta(days=3)
    reminder: timedelta = timedelta(hours=1)
    """Non-residential customers: a reminder at least this long before the trip, besides the
    notice (prepaid.md §5.2: "plus a reminder 1 h before"); 0: none needed."""
    notice_valid: timedelta = timedelta(days=30)
    """A notice older than this no longer counts [A] (the reference gives no number)."""
    require_notice: bool = False
    """Require a recorded notice before arrears trips (off by default: the meters' operator records it)."""
    dry_run: bool = False
    """Check and record everything, send nothing."""
    tz: object = METER_TZ

    def quiet(self, now: datetime) -> str | None:
        """Why ``now`` is in quiet hours, or None."""
        local = now.astimezone(self.tz)  # type: ignore[arg-type]
        day, clock = local.date(), local.time()
        if day in self.holidays:
            return f"{day.isoformat()} is a holiday"
        if (day - timedelta(days=1)) in self.holidays and clock < self.quiet_end:
            return f"the morning after the holiday {day - timedelta(days=1)}"
        weekday = local.weekday()  # Monday = 0
        if self.weekend_quiet and (weekday >= 5 or (weekday == 0 and clock < self.quiet_end)):
            return "weekend"
        if self.quiet_start > self.quiet_end:
            if clock >= self.quiet_start or clock < self.quiet_end:
                return f"night ({self.quiet_start:%H:%M}-{self.quiet_end:%H:%M})"
        elif self.quiet_start <= clock < self.quiet_end:
            return f"quiet hours ({self.quiet_start:%H:%M}-{self.quiet_end:%H:%M})"
        return None

    def next_trip_time(self, after: datetime) -> datetime:
        """The first moment at or after ``after`` outside quiet hours: when a deferred trip may go.

        Every quiet period (night, weekend, holiday and the morning after) ends at ``quiet_end``
        local time, so the answer is ``after`` itself or a later ``quiet_end``.
        """
        t = after
        for _ in range(400):
            if self.quiet(t) is None:
                return t
            local = t.astimezone(self.tz)  # type: ignore[arg-type]
            end = datetime.combine(local.date(), self.quiet_end, tzinfo=self.tz)  # type: ignore[arg-type]
            if end <= local:
                end = datetime.combine(local.date() + timedelta(days=1), self.quiet_end, tzinfo=self.tz)  # type: ignore[arg-type]
            t = end
        raise ValueError("the policy has no time outside quiet hours within a year")

    def next_quiet_start(self, after: datetime) -> datetime | None:
        """The first moment after ``after`` that is in quiet hours (None: none in the next 8 days).

        Quiet periods begin at ``quiet_start`` (nights) or at midnight (weekends, holidays), so
        those are the only candidates. A deferred trip stays valid until then.
        """
        local = after.astimezone(self.tz)  # type: ignore[arg-type]
        found = []
        for d in range(9):
            day = local.date() + timedelta(days=d)
            for clock in (self.quiet_start, time(0)):
                candidate = datetime.combine(day, clock, tzinfo=self.tz)  # type: ignore[arg-type]
                if candidate > local and self.quiet(candidate) is not None:
                    found.append(candidate)
        return min(found) if found else None

    def check_relay(
        self, action: str, facts: CustomerFacts, now: datetime, *, arrears: bool | None = None
    ) -> Refusal | None:
        """None if the relay action may be sent now, else the refusal.

        ``arrears``: True for a trip for arrears (grace period and notice rules apply), False for
        one that is not (safety, move-out, test: neither applies), None when the caller did not
        say: then the grace period after zero still applies (a trip just after the balance ran
        out is one for arrears, whoever sends it), the notice rule does not.
        """
        if action not in TRIP_ACTIONS:
            return None  # closing, alarms and power hold are always allowed
        if facts.power_hold:
            return Refusal("power_hold", "the customer is on power hold (保电): no trip")
        why = self.quiet(now)
        if why is not None:
            return Refusal("quiet_hours", f"no trips in quiet hours: {why}")
        if arrears is not False and facts.zero_since is not None and now < facts.zero_since + self.grace:
            until = (facts.zero_since + self.grace).astimezone(self.tz)  # type: ignore[arg-type]
            reason = f"balance reached zero less than {self.grace} ago (trip from {until:%Y-%m-%d %H:%M})"
            return Refusal("grace_period", reason)
        if arrears is True and self.require_notice:
            return self._notice(facts, now)
        return None

    def _notice(self, facts: CustomerFacts, now: datetime) -> Refusal | None:
        """The notice rule of prepaid.md §5.2: a notice at least 7 days (residential) or 3 days
        (others) before the trip, counted from the first recent notice, and for non-residential
        customers a reminder at least 1 h before it (sent within the last day [A])."""
        sent = sorted(set(facts.notices) | ({facts.notice_sent} if facts.notice_sent else set()))
        recent = [n for n in sent if now - self.notice_valid <= n <= now]
        if not recent:
            return Refusal("notice", "no disconnection notice was sent")
        period = self.notice_residential if facts.residential else self.notice_other
        if now < recent[0] + period:
            return Refusal("notice", f"the notice period of {period.days} days has not run")
        if facts.residential or self.reminder <= timedelta(0):
            return None
        reminders = [n for n in recent[1:] if now - REMINDER_VALID <= n <= now - self.reminder]
        if not reminders:
            hours = self.reminder.total_seconds() / 3600
            return Refusal(
                "notice",
                f"a non-residential customer needs a reminder at least {hours:g} h before the trip, within the last "
                "day, besides the notice (prepaid.md §5.2)",
            )
        return None
