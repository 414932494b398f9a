"""The load relay of a cost-control meter (prepaid.md §1.5, dlt645.md §4.1).

States follow the firmware table (``TAB_RelayStatus``): closed, close-allowed (open until a
3 s button press), remote trip, trip pending (the trip delay 04001401, or large-current
protection), remote pre-trip 1 and 2 (open for N2 x 5 min, then closed or close-allowed), local
pre-trip (alarm 2 / over zero, the button restores) and local trip (overdraft). Power hold
(3A/3B) blocks every trip. All times are integer milliseconds.

Large-current protection (prepaid.md §1.5): when a trip is to open the contact (a remote trip,
at once or at the end of its trip delay, or the local trip at overdraft) while the current is
above the trip-current threshold 04001402, a meter with an **internal** relay does not break
the load current: it waits until the current falls to the threshold or below, at most the
over-current protection delay 04001403 (minutes; the firmware's maximum is 24 h, and 0 waits
not at all). External relays trip at once. The meter, which knows the current, tells the relay
whether it is above the threshold (``large_current``) and when it falls (:meth:`current_fell`).
(Pre-trips open at once here, even when they replace a trip held by large current, which they
cancel; one that ends while the wallet is in overdraft ends in the local trip [A]. The relay's
0.75 Un operating limit is not modelled.)

Relay malfunction (fault injection, prepaid.md §1.5 "Relay fault handling"): the contact is
stuck where it was when the fault struck. Commands still change the *commanded* state (status
word 3 bit 6) but not the *actual* contact (bit 4); a mismatch records a load-switch
malfunction event (负荷开关误动). The firmware re-drives the relay 60, 120 and 180 s after a
mismatch, then once an hour; once the fault is repaired the next re-drive moves the contact.
"""

from __future__ import annotations

from enum import StrEnum

from protocols.dlt645 import RelayCommand
from protocols.dlt645.relay import RelayExecution

from .wallet import Ladder

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
MAX_LARGE_CURRENT_DELAY_MIN = 24 * 60
"""The longest wait of large-current protection: 04001403 is capped at 24 h (prepaid.md §1.5)."""
REDRIVE_MS = (60_000, 120_000, 180_000)
"""Re-drive instants after a contact/command mismatch, then hourly (prepaid.md §1.5)."""


class RelayState(StrEnum):
    """Where the relay state machine is."""

    CLOSED = "closed"
    CLOSE_ALLOWED = "close_allowed"
    TRIP_PENDING = "trip_pending"
    REMOTE_TRIP = "remote_trip"
    PRE_TRIP_1 = "pre_trip_1"
    PRE_TRIP_2 = "pre_trip_2"
    LOCAL_PRE_TRIP = "local_pre_trip"
    LOCAL_TRIP = "local_trip"


_OPEN_STATES = frozenset(
    {
        RelayState.CLOSE_ALLOWED,
        RelayState.REMOTE_TRIP,
        RelayState.PRE_TRIP_1,
        RelayState.PRE_TRIP_2,
        RelayState.LOCAL_PRE_TRIP,
        RelayState.LOCAL_TRIP,
    }
)


class RelayRefused(Exception):
    """A control command the relay refuses; ``reason`` names the error-word bit (dlt645.md §4.3)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "power_hold", "auto_restore_time", "already_tripped", "unknown_command"


class Relay:
    """Relay state, power hold, alarm and timers of one meter."""

    __slots__ = (
        "alarm",
        "awaiting_current",
        "deadline_ms",
        "external",
        "hold",
        "fault",
        "last_local",
        "local_pre_trip_due",
        "mismatch_ms",
        "pending_operator",
        "pending_state",
        "redrive_ms",
        "state",
        "stuck_open",
        "events",
    )

    def __init__(self, external: bool = False) -> None:
        self.state = RelayState.CLOSED
        self.hold = False
        self.alarm = False
        self.external = external
        """External relays (large three-phase) close directly after a top-up (§1.5)."""
        self.deadline_ms: int | None = None
        self.pending_state: RelayState | None = None
        self.pending_operator: str | None = None
        """Operator code of the command whose timer is running: its trip or close is recorded with it."""
        self.awaiting_current = False
        """A trip is held by large-current protection: it happens when the current falls (or at
        ``deadline_ms``, the end of 04001403), into ``pending_state`` (§1.5). Only ever true in
        TRIP_PENDING (every other state leaves it: :meth:`_go`)."""
        self.last_local: Ladder = Ladder.NORMAL
        self.local_pre_trip_due = False
        """The last local relay command was a pre-trip (alarm 2 / zero reached) the customer has
        not yet answered with the button: a power-hold release pre-trips again (§1.5)."""
        self.fault = False
        """Fault injection: the relay is stuck (see the module docstring)."""
        self.stuck_open: bool | None = None
        """Where a contact that does not follow the command is (None: it follows the command)."""
        self.mismatch_ms: int | None = None
        """When the commanded and actual states started to disagree."""
        self.redrive_ms: int | None = None
        """The re-drive that will move a repaired relay's contact (None: none due)."""
        self.events: list[tuple[str, int, str | None]] = []
        """('trip'|'close'|'malfunction', time, operator or None) events, drained by the meter's
        event logs (None: the operator of the command being executed, or 00000000 for the meter's own)."""

    # --- reading -------------------------------------------------------------------------------

    @property
    def commanded_open(self) -> bool:
        """Whether the relay is commanded open (status word 3 bit 6)."""
        return self.state in _OPEN_STATES

    def contact_open(self) -> bool:
        """The actual contact (status word 3 bit 4): follows the command unless stuck."""
        stuck = self.stuck_open
        return self.commanded_open if stuck is None else stuck

    @property
    def malfunction(self) -> bool:
        """Relay loop error (status word 1 bit 8): the fault is present or the contact disagrees."""
        return self.fault or self.stuck_open is not None

    def next_deadline(self) -> int | None:
        """The next instant a timer or a re-drive changes something (None: none)."""
        d, r = self.deadline_ms, self.redrive_ms
        if r is None:
            return d
        return r if d is None else min(d, r)

    # --- malfunction (fault injection) ------------------------------------------------------------

    def strike(self, now_ms: int) -> None:
        """The relay sticks where its contact is now."""
        self.fault = True
        if self.stuck_open is None:
            self.stuck_open = self.commanded_open
        self.redrive_ms = None  # re-drives fail while the fault lasts

    def repair(self, now_ms: int) -> None:
        """The fault goes away: the next re-drive (60/120/180 s after the mismatch, then hourly) moves the contact."""
        self.fault = False
        if self.stuck_open is None:
            return
        if self.stuck_open == self.commanded_open or self.mismatch_ms is None:
            self._unstick()
            return
        since = now_ms - self.mismatch_ms
        for d in REDRIVE_MS:
            if d >= since:
                self.redrive_ms = self.mismatch_ms + d
                break
        else:
            hours = -(-(since - REDRIVE_MS[-1]) // HOUR_MS)
            self.redrive_ms = self.mismatch_ms + REDRIVE_MS[-1] + hours * HOUR_MS
        self.tick(now_ms)

    def _unstick(self) -> None:
        self.stuck_open = None
        self.mismatch_ms = None
        self.redrive_ms = None

    def _check_contact(self, now_ms: int) -> None:
        """After a command: a stuck contact that now disagrees is a malfunction event."""
        stuck = self.stuck_open
        if stuck is None:
            return
        if stuck == self.commanded_open:
            self.mismatch_ms = None
            self.redrive_ms = None
            if not self.fault:
                self.stuck_open = None
        elif self.mismatch_ms is None:
            self.mismatch_ms = now_ms
            self.events.append(("malfunction", now_ms, None))

    @property
    def public_state(self) -> str:
        """``closed``, ``open`` or ``close_allowed`` (the simulator's ground truth)."""
        if not self.contact_open():
            return "closed"
        if self.state in (RelayState.CLOSE_ALLOWED, RelayState.LOCAL_PRE_TRIP):
            return "close_allowed"
        return "open"

    # --- transitions ------------------------------------------------------------------------------

    def _go(self, state: RelayState, now_ms: int, operator: str | None = None) -> None:
        was_open = self.contact_open()
        self.state = state
        self._check_contact(now_ms)
        is_open = self.contact_open()
        if is_open != was_open:
            self.events.append(("trip" if is_open else "close", now_ms, operator))
        if state is not RelayState.TRIP_PENDING:
            # Only a trip pending waits for the current to fall: a pre-trip that replaces a trip
            # held by large current opens at once and runs its own timer (the caller sets it).
            self.awaiting_current = False
        if state not in (RelayState.TRIP_PENDING, RelayState.PRE_TRIP_1, RelayState.PRE_TRIP_2):
            self.deadline_ms = None
            self.pending_state = None
            self.pending_operator = None

    def _trip(
        self, target: RelayState, now_ms: int, large_current: bool, delay_min: int, operator: str | None = None
    ) -> bool:
        """Trip into ``target`` (remote or local trip), unless large-current protection holds the
        contact closed (prepaid.md §1.5); returns whether it waits for the current to fall.

        A trip already held keeps waiting (its deadline does not move): a remote trip then wins
        over a local one (as a remote trip command does over a local trip).
        """
        if self.state is RelayState.TRIP_PENDING and self.awaiting_current:
            if target is RelayState.REMOTE_TRIP or self.pending_state is not RelayState.REMOTE_TRIP:
                self.pending_state = target
                if operator is not None:
                    self.pending_operator = operator
            return True
        cap_ms = min(max(delay_min, 0), MAX_LARGE_CURRENT_DELAY_MIN) * MINUTE_MS
        if large_current and cap_ms > 0 and not self.external and not self.contact_open():
            self.state = RelayState.TRIP_PENDING
            self.pending_state = target
            self.pending_operator = operator
            self.deadline_ms = now_ms + cap_ms
            self.awaiting_current = True
            return True
        self._go(target, now_ms, operator)
        return False

    def current_fell(self, now_ms: int) -> None:
        """The current is at or below 04001402 again: a trip held for it happens now (§1.5)."""
        if self.state is RelayState.TRIP_PENDING and self.awaiting_current and self.pending_state is not None:
            self._go(self.pending_state, now_ms, self.pending_operator)

    def command(
        self,
        n1: int,
        n2: int,
        now_ms: int,
        ladder: Ladder,
        trip_delay_min: int = 0,
        large_current: bool = False,
        large_current_delay_min: int = 0,
        operator: str | None = None,
    ) -> RelayExecution:
        """Execute a 0x1C command (validity already checked); returns the execution word (§4.3).

        ``operator``: the command's operator code, kept with a timer it starts (trip delay,
        pre-trip, a trip held by large current), so the trip or close the timer fires is recorded
        with it (prepaid.md §1.7). ``large_current``: the current is above 04001402 now;
        ``large_current_delay_min``: 04001403 (see the module docstring).
        """
        if n1 == RelayCommand.TRIP:
            if self.hold:
                raise RelayRefused("power_hold")
            self.local_pre_trip_due = False
            if self.state is RelayState.TRIP_PENDING:
                # A repeated trip (a master station's retry) keeps the running delay: repeating
                # it must not postpone the trip.
                if self.awaiting_current:
                    self._trip(RelayState.REMOTE_TRIP, now_ms, True, large_current_delay_min)
                    return RelayExecution.DELAYED_TRIP_LARGE_CURRENT
                return RelayExecution.DELAYED_TRIP
            if trip_delay_min > 0 and self.state not in _OPEN_STATES:
                # The trip delay (pre-trip alarm time) runs first; large-current protection is
                # checked when it ends (tick).
                self.state = RelayState.TRIP_PENDING
                self.deadline_ms = now_ms + trip_delay_min * MINUTE_MS
                self.pending_state = RelayState.REMOTE_TRIP
                self.pending_operator = operator
                self.awaiting_current = False
                self.alarm = True
                return RelayExecution.DELAYED_TRIP
            if self._trip(RelayState.REMOTE_TRIP, now_ms, large_current, large_current_delay_min, operator):
                return RelayExecution.DELAYED_TRIP_LARGE_CURRENT
            return RelayExecution.DIRECT_TRIP
        if n1 in (RelayCommand.TRIP_AUTO_RESTORE, RelayCommand.TRIP_AUTO_RESTORE_ALT):
            if self.hold:
                raise RelayRefused("auto_restore_power_hold")
            if n2 == 0:
                raise RelayRefused("auto_restore_time")
            if self.state in (RelayState.REMOTE_TRIP, RelayState.LOCAL_TRIP):
                raise RelayRefused("already_tripped")
            target = RelayState.PRE_TRIP_1 if n1 == RelayCommand.TRIP_AUTO_RESTORE else RelayState.PRE_TRIP_2
            self._go(target, now_ms)
            self.deadline_ms = now_ms + n2 * 5 * MINUTE_MS  # N2 x 5 min (FW-A GataOffResumeTime)
            self.pending_state = RelayState.CLOSED if target is RelayState.PRE_TRIP_1 else RelayState.CLOSE_ALLOWED
            self.pending_operator = operator
            return RelayExecution.TRIP_AUTO_RESTORE
        if n1 == RelayCommand.CLOSE_ALLOWED:
            if ladder is Ladder.OVERDRAFT and not self.hold:
                self._close_in_overdraft(now_ms, large_current, large_current_delay_min)
            elif self.state is RelayState.TRIP_PENDING:
                self._go(RelayState.CLOSED, now_ms)  # cancels the pending trip: the contact stays closed
            elif self.state is not RelayState.CLOSED:
                self._go(RelayState.CLOSE_ALLOWED, now_ms)
            self.alarm = False
            self.local_pre_trip_due = False  # a later (remote) relay command than the local pre-trip
            return RelayExecution.CLOSE_ALLOWED
        if n1 == RelayCommand.DIRECT_CLOSE:
            if ladder is Ladder.OVERDRAFT and not self.hold:
                self._close_in_overdraft(now_ms, large_current, large_current_delay_min)
            else:
                self._go(RelayState.CLOSED, now_ms)
            self.alarm = False
            self.local_pre_trip_due = False
            return RelayExecution.DIRECT_CLOSE
        if n1 == RelayCommand.ALARM_ON:
            self.alarm = True
            return RelayExecution.ALARM
        if n1 == RelayCommand.ALARM_OFF:
            self.alarm = False
            return RelayExecution.ALARM_RELEASED
        if n1 == RelayCommand.POWER_HOLD_ON:
            self.hold = True
            if self.state is RelayState.TRIP_PENDING:
                self._go(RelayState.CLOSED, now_ms)
            return RelayExecution.POWER_HOLD
        if n1 == RelayCommand.POWER_HOLD_OFF:
            self.hold = False
            # Release re-evaluates (§1.5).
            self.on_ladder(
                ladder, now_ms, released=True, large_current=large_current, delay_min=large_current_delay_min
            )
            return RelayExecution.POWER_HOLD_RELEASED
        raise RelayRefused("unknown_command")

    def _close_in_overdraft(self, now_ms: int, large_current: bool, delay_min: int) -> None:
        """A close command while the wallet is in overdraft: the local trip stands (§1.5)."""
        if self.state is RelayState.TRIP_PENDING and self.awaiting_current:
            self.pending_state = RelayState.LOCAL_TRIP  # the remote trip is cancelled, the local one waits on
            self.pending_operator = None
        elif self.state is not RelayState.LOCAL_TRIP:
            if self.state is RelayState.TRIP_PENDING:
                self._go(RelayState.CLOSED, now_ms)  # cancel the trip delay (the contact is closed)
            self._trip(RelayState.LOCAL_TRIP, now_ms, large_current, delay_min)

    def tick(self, now_ms: int, large_current: bool = False, large_current_delay_min: int = 0) -> None:
        """Fire a timer whose deadline has passed (pending trip, pre-trip restore, re-drive).

        At the end of a trip delay the trip may still be held by large current (then it waits,
        §1.5); at the end of that wait it happens whatever the current.
        """
        if self.deadline_ms is not None and now_ms >= self.deadline_ms and self.pending_state is not None:
            target = self.pending_state
            at = self.deadline_ms
            if target is RelayState.REMOTE_TRIP and self.hold:
                self._go(RelayState.CLOSED, at)
            elif self.state is RelayState.TRIP_PENDING and not self.awaiting_current:
                self._trip(target, at, large_current, large_current_delay_min, self.pending_operator)
            elif self.state in (RelayState.PRE_TRIP_1, RelayState.PRE_TRIP_2) and (
                self.last_local is Ladder.OVERDRAFT and not self.hold
            ):
                # A pre-trip that replaced a local trip held by large current ends in overdraft:
                # the local trip stands (the contact, open, stays open; overdraft trips hard, §1.5).
                self._go(RelayState.LOCAL_TRIP, at)
            else:
                self._go(target, at, self.pending_operator)
        redrive = self.redrive_ms
        if redrive is not None and now_ms >= redrive and not self.fault:
            was_open = self.contact_open()
            self._unstick()
            if self.contact_open() != was_open:
                self.events.append(("trip" if not was_open else "close", redrive, None))

    def press_button(self, now_ms: int, ladder: Ladder) -> bool:
        """The customer holds the button >= 3 s: closes a close-allowed or local pre-trip relay."""
        if self.state in (RelayState.CLOSE_ALLOWED, RelayState.LOCAL_PRE_TRIP) and ladder is not Ladder.OVERDRAFT:
            self._go(RelayState.CLOSED, now_ms)
            self.local_pre_trip_due = False  # the customer restored supply
            return True
        return False

    def on_ladder(
        self,
        ladder: Ladder,
        now_ms: int,
        released: bool = False,
        large_current: bool = False,
        delay_min: int = 0,
    ) -> None:
        """Follow the wallet's balance state (local cost control, prepaid.md §1.4 and §1.5).

        Alarm 2 pre-trips once; after the customer restores, the relay stays closed until
        zero, which pre-trips once more; overdraft trips hard. Power hold blocks all of it.
        ``released`` (3B): pre-trip only if the last local command was a pre-trip the customer
        has not restored (prepaid.md §1.5 "Power hold": "it pre-trips if it is at alarm 2 or
        zero and the last command was a local pre-trip").
        """
        previous, self.last_local = self.last_local, ladder
        entering = ladder > previous
        if ladder in (Ladder.ALARM_2, Ladder.OVER_ZERO):
            if entering:
                self.local_pre_trip_due = True  # the local command, even when power hold blocks it
        else:
            self.local_pre_trip_due = False
        if self.hold:
            return
        if ladder is Ladder.OVERDRAFT:
            if self.state is not RelayState.LOCAL_TRIP and self.state is not RelayState.REMOTE_TRIP:
                # Large current holds the local trip too (§1.5: "when a trip is ordered").
                self._trip(RelayState.LOCAL_TRIP, now_ms, large_current, delay_min)
            return
        if released:
            entering = self.local_pre_trip_due
        if ladder in (Ladder.ALARM_2, Ladder.OVER_ZERO) and entering and self.state is RelayState.CLOSED:
            self._go(RelayState.LOCAL_PRE_TRIP, now_ms)

    def after_top_up(self, ladder: Ladder, above_close_allowed: bool, now_ms: int, direct: bool = False) -> None:
        """Relay rules after an accepted top-up (prepaid.md §1.5, "After a top-up").

        ``direct``: a wallet preset or initialisation, which closes directly like an external relay.

        A remote trip stays a remote trip (deliberate): §1.5's SY03A paragraph says a top-up on a
        relay "opened by a remote trip command" *enables closing*, and the function it cites
        (``Yc_Money_In``) does that with ``Enable_Closerelay``, which clears only the wait for the
        button, never the remote-trip flag; that flag is cleared by the master station's
        close-allowed (1B) or direct close (1C), so the button does nothing meanwhile.
        """
        self.last_local = ladder
        direct = direct or self.external
        if self.state is RelayState.TRIP_PENDING and self.pending_state is RelayState.LOCAL_TRIP:
            # A local trip held by large current: a top-up out of overdraft cancels it (the
            # contact never opened), else it waits on (UpdateLocalStatus, as for a local trip).
            if ladder is not Ladder.OVERDRAFT and above_close_allowed:
                self._go(RelayState.CLOSED, now_ms)
            return
        if self.state in (RelayState.PRE_TRIP_1, RelayState.PRE_TRIP_2):
            if ladder is Ladder.OVERDRAFT and not self.hold:
                return  # a pre-trip over a held local trip: still in overdraft, it does not close [A]
            self._go(RelayState.CLOSED, now_ms)  # api_RemoteChargeCloseRelay
            return
        if self.state is RelayState.LOCAL_TRIP:
            if ladder is Ladder.OVERDRAFT or not above_close_allowed:
                return  # leaving overdraft needs R > close-allowed amount (UpdateLocalStatus)
            self._go(RelayState.CLOSED if direct else RelayState.LOCAL_PRE_TRIP, now_ms)
            return
        if self.state is RelayState.LOCAL_PRE_TRIP and ladder in (Ladder.NORMAL, Ladder.ALARM_1) and direct:
            self._go(RelayState.CLOSED, now_ms)
