"""Golden scenarios, one per relay rule (prepaid.md §1.5; dlt645.md §4).

Every command travels as a real 0x1C frame (level 98, encrypted with the master station's
session unless the test says plaintext) and every reply is parsed from the meter's frame.
Replies come in the 1-byte form (profile SGCC_2013: 0x9C with L = 0, 0xDC with ERR) or the
2-byte form (SGCC_IOT: execution / error word, §4.3).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from meterkit import OPERATOR, T0, Bench

from firmware_stubs.meter import MeterStalled
from firmware_stubs.wallet import Ladder, Limits
from protocols.dlt645 import (
    DI_2007,
    EncryptedRelayControlRequest,
    ErrorFlags,
    ErrorReply,
    Password,
    RelayControlReply,
    RelayErrorFlags,
    RelayErrorReply,
    RelayExecution,
    WriteReply,
    WriteRequest,
)
from protocols.dlt645.profile import FW_B, SGCC_IOT
from protocols.dlt645.relay import RelayCommand as N1
from protocols.dlt645.security import SecurityDI, SecurityReply, SecurityRequest

MS = timedelta(milliseconds=1)
LEVEL_02 = Password(0x02, "123456")


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def ok(reply: object, execution: RelayExecution | None = None) -> bool:
    return isinstance(reply, RelayControlReply) and reply.execution == execution


def err04(reply: object) -> bool:
    return isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.PASSWORD


def word(reply: object, flags: RelayErrorFlags) -> bool:
    return isinstance(reply, RelayErrorReply) and reply.flags == flags


def written(reply: object) -> bool:
    return isinstance(reply, WriteReply)


def state(b: Bench) -> str:
    return b.meter.relay.state.value


# --- trip ----------------------------------------------------------------------------------------


def test_trip_opens_directly_and_is_recorded_with_the_operator_code() -> None:
    b = Bench(watts=1000)
    b.wait(hours=2)
    assert ok(b.control(N1.TRIP, operator="12345678"))
    assert b.relay == "open" and state(b) == "remote_trip"
    assert not b.press() and b.relay == "open"  # a remote trip is not the customer's to undo
    record = b.read(0x1D00FF01)
    assert record["operator"] == "12345678"
    assert record["time"] == T0 + timedelta(hours=2)
    assert record["forward_active"] == Decimal("2.00")
    assert b.read(0x1D000001) == 1
    assert b.read(0x1D000201) == "12345678" and b.read(0x1D000101) == T0 + timedelta(hours=2)
    status = b.read(0x04000503)
    assert status["relay_trip_commanded"] and status["relay_open"]


def test_trip_reply_word_on_the_iot_profile() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    assert ok(b.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    assert b.relay == "open"


def test_trip_delay_04001401_waits_then_trips_at_the_exact_minute() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    assert written(b.write_cipher(0x04001401, 7))
    assert b.read(0x04001401) == 7
    sent = b.now
    assert ok(b.control(N1.TRIP), RelayExecution.DELAYED_TRIP)
    assert state(b) == "trip_pending" and b.relay == "closed"
    assert b.read(0x04000503)["pre_trip_alarm"]  # the pre-trip alarm runs during the delay
    b.at(sent + timedelta(minutes=7) - MS)
    assert b.relay == "closed"
    b.at(sent + timedelta(minutes=7))
    assert b.relay == "open" and state(b) == "remote_trip"
    assert b.meter.trips[0].time_ms == ms(sent + timedelta(minutes=7))


def test_a_repeated_trip_does_not_postpone_a_pending_one() -> None:
    b = Bench(watts=1000, trip_delay_min=5)
    sent = b.now
    assert ok(b.control(N1.TRIP)) and state(b) == "trip_pending"
    b.wait(minutes=3)
    assert ok(b.control(N1.TRIP)) and state(b) == "trip_pending"  # a retry after a lost reply
    b.at(sent + timedelta(minutes=5))
    assert b.relay == "open" and b.meter.trips[0].time_ms == ms(sent + timedelta(minutes=5))


def test_a_trip_after_the_trip_delay_is_recorded_with_the_commands_operator() -> None:
    # prepaid.md §1.7: the operator code of each control frame is stored with its record, also
    # when the trip happens minutes later, at the end of the trip delay (04001401).
    b = Bench(watts=1000, trip_delay_min=5)
    assert ok(b.control(N1.TRIP, operator="0000D1A7"))
    b.wait(minutes=2)
    assert ok(b.control(N1.TRIP, operator="0000EEEE"))  # a retry keeps the running trip, and its operator
    b.wait(minutes=3)
    record = b.read(0x1D00FF01)
    assert b.relay == "open" and record["operator"] == "0000D1A7"
    assert record["time"] == T0 + timedelta(minutes=5)


def test_a_pre_trip_restore_is_recorded_with_the_commands_operator() -> None:
    b = Bench(watts=1000)
    assert ok(b.control(N1.TRIP_AUTO_RESTORE, 2, operator="0000B0B0"))
    assert b.read(0x1D00FF01)["operator"] == "0000B0B0"
    b.wait(minutes=10)
    assert b.relay == "closed"
    record = b.read(0x1E00FF01)
    assert record["operator"] == "0000B0B0" and record["time"] == T0 + timedelta(minutes=10)


def test_direct_close_cancels_a_pending_trip() -> None:
    b = Bench(watts=1000, trip_delay_min=5)
    assert ok(b.control(N1.TRIP))
    b.wait(minutes=2)
    assert ok(b.control(N1.DIRECT_CLOSE))
    b.wait(minutes=10)
    assert b.relay == "closed" and b.meter.trip_count == 0


def test_close_allowed_during_a_pending_trip_does_not_open_the_relay() -> None:
    """A close command never opens a closed contact: 1B cancels the pending trip (§4.1)."""
    b = Bench(watts=1000, trip_delay_min=5)
    assert ok(b.control(N1.TRIP))
    assert state(b) == "trip_pending"
    b.wait(minutes=2)
    assert ok(b.control(N1.CLOSE_ALLOWED))
    assert b.relay == "closed" and b.meter.trip_count == 0
    b.wait(minutes=10)
    assert b.relay == "closed" and b.meter.trip_count == 0


# Large-current protection (prepaid.md §1.5): "When a trip is ordered while the current exceeds
# the trip-current threshold, an internal-relay meter delays the trip until the current falls.
# The delay is capped by a 'over-current protection delay' in minutes; the code notes a 24 h
# maximum." 04001402 is the threshold, 04001403 the cap (dlt645.md §3.4). 5 kW is about 24 A at
# 220 V and cos phi 0.95; 2 kW about 9.6 A, below a 10 A threshold.

BIG, SMALL = 5000, 2000


def large(**config: object) -> Bench:
    config.setdefault("profile", SGCC_IOT)
    return Bench(watts=BIG, large_current_ma=10_000, large_current_delay_min=30, **config)


def test_large_current_is_configured_by_04001402_and_04001403() -> None:
    b = Bench(watts=BIG, profile=SGCC_IOT)
    assert written(b.write_cipher(0x04001402, Decimal("10.000")))
    assert written(b.write_cipher(0x04001403, 15))
    assert b.meter.large_current_ma == 10_000 and b.meter.large_current_delay_min == 15
    assert b.read(0x04001402) == Decimal("10.000") and b.read(0x04001403) == 15
    assert b.read(0x02020100) > Decimal("10.000")
    assert ok(b.control(N1.TRIP), RelayExecution.DELAYED_TRIP_LARGE_CURRENT)


def test_large_current_holds_a_remote_trip_until_the_current_falls() -> None:
    b = large()
    sent = b.now
    assert ok(b.control(N1.TRIP, operator="00001A1A"), RelayExecution.DELAYED_TRIP_LARGE_CURRENT)
    assert b.relay == "closed" and state(b) == "trip_pending"
    b.at(sent + timedelta(minutes=12))
    assert b.relay == "closed"  # still 24 A: the relay does not break it
    b.load.watts = SMALL  # the customer switches the heater off at 12 min
    b.wait(seconds=1)
    assert b.relay == "open" and state(b) == "remote_trip"
    record = b.read(0x1D00FF01)
    assert record["time"] == sent + timedelta(minutes=12) and record["operator"] == "00001A1A"


def test_large_current_that_stays_trips_at_the_end_of_04001403() -> None:
    b = large()
    sent = b.now
    assert ok(b.control(N1.TRIP), RelayExecution.DELAYED_TRIP_LARGE_CURRENT)
    b.at(sent + timedelta(minutes=30) - MS)
    assert b.relay == "closed"
    b.at(sent + timedelta(minutes=30))
    assert b.relay == "open" and b.meter.trips[0].time_ms == ms(sent + timedelta(minutes=30))


def test_a_current_that_falls_inside_a_load_slot_is_seen_at_the_next_minute() -> None:
    # The profile's power changes with its slot; the current (power / voltage) with the voltage,
    # each minute: the meter looks at both while it holds a trip, not only when observed.
    b = large()
    sent = b.now
    b.control(N1.TRIP)
    b.meter.load = _Steps(b.now, [(timedelta(minutes=7, seconds=20), SMALL)], BIG)
    b.at(sent + timedelta(hours=1))  # one jump
    assert b.meter.trips[0].time_ms == ms(sent + timedelta(minutes=7, seconds=20))


class _Steps:
    """A load that is ``first`` watts, then each (offset, watts) from ``start`` + offset."""

    def __init__(self, start: datetime, steps: list[tuple[timedelta, int]], first: int) -> None:
        self.points = [(ms(start + off), w) for off, w in steps]
        self.first = first

    def power_at(self, t_ms: int) -> tuple[int, int]:
        watts, until = self.first, None
        for at, w in self.points:
            if t_ms >= at:
                watts = w
            elif until is None:
                until = at
        return watts, until if until is not None else t_ms + 86_400_000


def test_below_the_threshold_and_on_external_relays_the_trip_is_direct() -> None:
    small = Bench(watts=1000, profile=SGCC_IOT, large_current_ma=10_000, large_current_delay_min=15)
    assert ok(small.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    assert small.relay == "open"
    # "an internal-relay meter delays the trip": an external relay breaks the current at once.
    external = large(external_relay=True)
    assert ok(external.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    assert external.relay == "open"


def test_04001403_zero_waits_not_at_all_and_is_capped_at_24_hours() -> None:
    none = Bench(watts=BIG, profile=SGCC_IOT, large_current_ma=10_000, large_current_delay_min=0)
    assert ok(none.control(N1.TRIP), RelayExecution.DIRECT_TRIP) and none.relay == "open"
    long = Bench(watts=BIG, profile=SGCC_IOT, large_current_ma=10_000, large_current_delay_min=3000)
    sent = long.now
    assert ok(long.control(N1.TRIP), RelayExecution.DELAYED_TRIP_LARGE_CURRENT)
    long.at(sent + timedelta(hours=24) - MS)
    assert long.relay == "closed"
    long.at(sent + timedelta(hours=24))
    assert long.relay == "open"


def test_the_trip_delay_runs_first_then_large_current_holds_the_trip() -> None:
    b = large(trip_delay_min=5)
    sent = b.now
    assert ok(b.control(N1.TRIP, operator="00005555"), RelayExecution.DELAYED_TRIP)
    b.at(sent + timedelta(minutes=5))
    assert b.relay == "closed" and b.meter.relay.awaiting_current  # the delay ended at 24 A
    b.at(sent + timedelta(minutes=8))
    b.load.watts = SMALL
    b.wait(milliseconds=1)
    assert b.relay == "open" and b.read(0x1D00FF01)["operator"] == "00005555"
    assert b.meter.trips[0].time_ms == ms(sent + timedelta(minutes=8))
    # Its cap counts from the end of the trip delay: held at 24 A, it trips at 5 + 30 min.
    c = large(trip_delay_min=5)
    c.control(N1.TRIP)
    c.at(sent + timedelta(minutes=35) - MS)
    assert c.relay == "closed"
    c.at(sent + timedelta(minutes=35))
    assert c.relay == "open"


def test_large_current_holds_the_local_overdraft_trip_too() -> None:
    # 24 A and 0.30 yuan at 0.50 yuan/kWh: zero (overdraft limit 0) after 0.6 kWh = 7.2 min.
    b = large(balance_fen=30, limits=Limits(0, 0, 0, 0, 0))
    zero = T0 + timedelta(minutes=7, seconds=12)
    b.at(zero)
    assert b.meter.ladder() is Ladder.OVERDRAFT
    assert b.relay == "closed" and b.meter.relay.pending_state.value == "local_trip"
    b.at(zero + timedelta(minutes=4))
    assert b.meter.wallet.balance < 0  # the customer still consumes, into overdraft
    b.load.watts = SMALL
    b.wait(seconds=1)
    assert b.relay == "open" and state(b) == "local_trip"
    assert b.meter.trips[0].time_ms == ms(zero + timedelta(minutes=4))
    assert b.read(0x1D00FF01)["operator"] == "00000000"  # the meter's own trip
    # Without large current the same meter trips at zero (the same instant, to the millisecond).
    direct = Bench(watts=BIG, balance_fen=30, limits=Limits(0, 0, 0, 0, 0))
    direct.at(zero)
    assert direct.relay == "open" and direct.meter.trips[0].time_ms == ms(zero)


def test_a_trip_held_by_large_current_is_cancelled_by_power_hold_and_by_a_top_up() -> None:
    b = large()
    b.control(N1.TRIP)
    b.wait(minutes=3)
    assert ok(b.control(N1.POWER_HOLD_ON), RelayExecution.POWER_HOLD)
    b.wait(hours=2)
    assert b.relay == "closed" and b.meter.trip_count == 0 and state(b) == "closed"

    c = large(balance_fen=30, limits=Limits(0, 0, 0, 0, 0))
    c.wait(minutes=10)
    assert c.meter.relay.pending_state.value == "local_trip"
    assert isinstance(c.recharge(5000, 2), SecurityReply)
    assert state(c) == "closed"
    c.wait(hours=2)
    assert c.relay == "closed" and c.meter.trip_count == 0  # the contact never opened


def test_a_close_command_in_overdraft_leaves_the_held_local_trip_waiting() -> None:
    b = large(balance_fen=30, limits=Limits(0, 0, 0, 0, 0))
    b.wait(minutes=10)
    deadline = b.meter.relay.deadline_ms
    assert ok(b.control(N1.DIRECT_CLOSE), RelayExecution.DIRECT_CLOSE)
    assert b.meter.relay.pending_state.value == "local_trip" and b.meter.relay.deadline_ms == deadline
    b.load.watts = SMALL
    b.wait(seconds=1)
    assert state(b) == "local_trip"


@pytest.mark.parametrize(
    ("n1", "pre_trip", "after"),
    [(N1.TRIP_AUTO_RESTORE, "pre_trip_1", "closed"), (N1.TRIP_AUTO_RESTORE_ALT, "pre_trip_2", "close_allowed")],
)
def test_a_pre_trip_replaces_a_trip_held_by_large_current_and_opens_at_once(n1: int, pre_trip: str, after: str) -> None:
    # A pre-trip is not a trip held by large current: it opens at once (module docstring of
    # firmware_stubs/relay.py) and runs its own N2 x 5 min; the held trip is cancelled. This used
    # to keep awaiting_current in the pre-trip and make Meter.advance spin forever (the open
    # contact draws no current, and only a pending trip may take the fall of the current).
    b = large()
    assert ok(b.control(N1.TRIP), RelayExecution.DELAYED_TRIP_LARGE_CURRENT)
    b.wait(minutes=1)
    sent = b.now
    assert ok(b.control(n1, 2), RelayExecution.TRIP_AUTO_RESTORE)
    assert b.relay == "open" and not b.meter.relay.awaiting_current
    b.wait(seconds=30)
    assert b.meter.now_ms == ms(sent + timedelta(seconds=30))
    b.at(sent + timedelta(minutes=10) - MS)
    assert state(b) == pre_trip
    b.at(sent + timedelta(minutes=10))
    assert b.relay == after and b.meter.trip_count == 1  # the pre-trip's, not the cancelled trip's
    b.wait(hours=2)
    assert b.relay == after


def test_a_pre_trip_over_a_held_local_trip_ends_in_the_local_trip() -> None:
    # [A] Overdraft trips hard (prepaid.md §1.5): a pre-trip that replaced the local trip held by
    # large current does not close into overdraft, neither at its end nor on a top-up that leaves
    # the wallet in overdraft; a top-up that lifts the overdraft closes it (api_RemoteChargeCloseRelay).
    b = large(balance_fen=30, limits=Limits(0, 0, 0, 0, 0))
    b.wait(minutes=10)
    assert b.meter.relay.awaiting_current and b.meter.relay.pending_state.value == "local_trip"
    assert ok(b.control(N1.TRIP_AUTO_RESTORE, 1), RelayExecution.TRIP_AUTO_RESTORE)
    assert b.relay == "open" and state(b) == "pre_trip_1"
    assert isinstance(b.recharge(1, 2), SecurityReply) and b.meter.ladder() is Ladder.OVERDRAFT
    assert state(b) == "pre_trip_1"
    b.wait(minutes=5)
    assert state(b) == "local_trip" and b.relay == "open"
    assert b.meter.trip_count == 1 and b.meter.close_count == 0

    c = large(balance_fen=30, limits=Limits(0, 0, 0, 0, 0))
    c.wait(minutes=10)
    assert ok(c.control(N1.TRIP_AUTO_RESTORE_ALT, 1), RelayExecution.TRIP_AUTO_RESTORE)
    assert isinstance(c.recharge(5000, 2), SecurityReply) and c.meter.ladder() is Ladder.NORMAL
    assert state(c) == "closed" and c.relay == "closed"


def test_advance_fails_loudly_instead_of_spinning() -> None:
    b = Bench(watts=1000)
    b.meter._interval = lambda t, target: t  # an event loop that makes no progress
    with pytest.raises(MeterStalled, match="made no progress"):
        b.wait(minutes=1)


# --- close ------------------------------------------------------------------------------------------


def test_close_allowed_waits_for_the_button() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    assert ok(b.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    b.wait(minutes=10)
    assert ok(b.control(N1.CLOSE_ALLOWED, operator="0000C10E"), RelayExecution.CLOSE_ALLOWED)
    assert b.relay == "close_allowed"
    b.wait(hours=3)
    assert b.relay == "close_allowed" and b.meter.forward[0] == 0  # open: nothing consumed
    assert b.press() and b.relay == "closed"
    assert b.meter.close_count == 1
    record = b.read(0x1E00FF01)
    assert record["time"] == T0 + timedelta(hours=3, minutes=10)


def test_direct_close_closes_and_is_recorded_with_the_operator_code() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    assert ok(b.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    b.wait(minutes=30)
    assert ok(b.control(N1.DIRECT_CLOSE, operator="0000C10E"), RelayExecution.DIRECT_CLOSE)
    assert b.relay == "closed"
    record = b.read(0x1E00FF01)
    assert record["operator"] == "0000C10E" and record["time"] == T0 + timedelta(minutes=30)
    assert b.read(0x1E000001) == 1
    assert b.read(0x1D00FF01)["operator"] == OPERATOR


def test_remote_close_cannot_close_into_overdraft() -> None:
    b = Bench(watts=1000, balance_fen=100, limits=Limits(0, 0, 0))
    b.wait(hours=2)
    assert b.meter.ladder() is Ladder.OVERDRAFT and b.relay == "open"
    assert ok(b.control(N1.DIRECT_CLOSE))
    assert b.relay == "open"
    assert ok(b.control(N1.CLOSE_ALLOWED))
    assert b.relay == "open" and not b.press()


# --- pre-trip 1 / 2 (trip with automatic restore) ------------------------------------------------------


def test_pre_trip_1_recloses_after_n2_times_5_minutes() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    sent = b.now
    assert ok(b.control(N1.TRIP_AUTO_RESTORE, 3), RelayExecution.TRIP_AUTO_RESTORE)
    assert b.relay == "open" and state(b) == "pre_trip_1"
    b.at(sent + timedelta(minutes=15) - MS)
    assert b.relay == "open"
    b.at(sent + timedelta(minutes=15))
    assert b.relay == "closed"
    assert b.meter.closes[0].time_ms == ms(sent + timedelta(minutes=15))


def test_pre_trip_2_becomes_close_allowed_after_n2_times_5_minutes() -> None:
    b = Bench(watts=1000)
    sent = b.now
    assert ok(b.control(N1.TRIP_AUTO_RESTORE_ALT, 2))
    assert b.relay == "open" and state(b) == "pre_trip_2"
    b.at(sent + timedelta(minutes=10) - MS)
    assert state(b) == "pre_trip_2"
    b.at(sent + timedelta(minutes=10))
    assert b.relay == "close_allowed"
    b.wait(hours=1)
    assert b.relay == "close_allowed"
    assert b.press() and b.relay == "closed"


@pytest.mark.parametrize("n1", [N1.TRIP_AUTO_RESTORE, N1.TRIP_AUTO_RESTORE_ALT])
def test_pre_trip_with_n2_zero_is_refused(n1: int) -> None:
    b = Bench(watts=1000)
    assert err04(b.control(n1, 0))
    assert b.relay == "closed"
    iot = Bench(watts=1000, profile=SGCC_IOT)
    assert word(iot.control(n1, 0), RelayErrorFlags.AUTO_RESTORE_TIME_INVALID)
    assert iot.relay == "closed"


def test_pre_trip_on_a_tripped_relay_is_refused() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    assert ok(b.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    assert word(b.control(N1.TRIP_AUTO_RESTORE, 2), RelayErrorFlags.AUTO_RESTORE_ALREADY_TRIPPED)
    b.wait(hours=1)
    assert state(b) == "remote_trip"


@pytest.mark.parametrize("n1", [N1.TRIP_AUTO_RESTORE, N1.TRIP_AUTO_RESTORE_ALT])
def test_a_top_up_during_a_remote_pre_trip_closes_directly(n1: int) -> None:
    """api_RemoteChargeCloseRelay (§1.5), even on an internal relay."""
    b = Bench(watts=1000)
    assert ok(b.control(n1, 12))
    b.wait(minutes=5)
    assert b.relay == "open"
    assert isinstance(b.recharge(1000, 2), SecurityReply)
    assert b.relay == "closed" and state(b) == "closed"
    b.wait(hours=2)
    assert b.relay == "closed"  # the expired pre-trip timer does nothing any more


def test_a_top_up_leaves_a_remote_trip_to_the_master_station() -> None:
    """Pinned (prepaid.md §1.5, the SY03A paragraph): on a remotely tripped internal relay a
    top-up "enables closing" but does not lift the trip. In the cited code (``Yc_Money_In``)
    that is ``Enable_Closerelay``, which clears only the wait-for-the-button flag, not the
    remote-trip flag, which only the master's close-allowed (1B) or direct close (1C) clears."""
    b = Bench(watts=1000)
    b.wait(hours=1)
    assert ok(b.control(N1.TRIP))
    assert isinstance(b.recharge(1000, 2), SecurityReply)
    assert b.balance_fen == 3000 - 50 + 1000  # applied: 1 kWh at 0.5 yuan before the trip
    assert state(b) == "remote_trip" and b.relay == "open"
    assert not b.press() and b.relay == "open"  # the button does not undo a remote trip
    b.wait(hours=2)
    assert state(b) == "remote_trip" and b.meter.forward[0] == 100  # open: nothing consumed
    assert ok(b.control(N1.CLOSE_ALLOWED))
    assert b.relay == "close_allowed" and b.press() and b.relay == "closed"


# --- power hold ------------------------------------------------------------------------------------------


def test_power_hold_refuses_remote_trips() -> None:
    b = Bench(watts=1000)
    assert ok(b.control(N1.POWER_HOLD_ON))
    assert b.read(0x04000503)["power_hold"]
    assert err04(b.control(N1.TRIP))
    assert err04(b.control(N1.TRIP_AUTO_RESTORE, 2))
    assert b.relay == "closed" and b.meter.trip_count == 0

    iot = Bench(watts=1000, profile=SGCC_IOT)
    assert ok(iot.control(N1.POWER_HOLD_ON), RelayExecution.POWER_HOLD)
    assert word(iot.control(N1.TRIP), RelayErrorFlags.TRIP_REFUSED_POWER_HOLD)
    assert word(iot.control(N1.TRIP_AUTO_RESTORE, 2), RelayErrorFlags.AUTO_RESTORE_REFUSED_POWER_HOLD)
    assert iot.relay == "closed"
    assert ok(iot.control(N1.POWER_HOLD_OFF), RelayExecution.POWER_HOLD_RELEASED)
    assert ok(iot.control(N1.TRIP), RelayExecution.DIRECT_TRIP)
    assert iot.relay == "open"


def test_power_hold_cancels_a_pending_trip() -> None:
    b = Bench(watts=1000, trip_delay_min=5)
    assert ok(b.control(N1.TRIP))
    assert ok(b.control(N1.POWER_HOLD_ON))
    b.wait(minutes=30)
    assert b.relay == "closed" and b.meter.trip_count == 0


def test_power_hold_blocks_local_trips_and_release_re_evaluates() -> None:
    """On hold the wallet runs into overdraft without tripping; 3B then trips (§1.5)."""
    b = Bench(watts=1000, balance_fen=1000, limits=Limits(alarm_1=800, alarm_2=500, overdraft=200))
    assert ok(b.control(N1.POWER_HOLD_ON))
    b.at(T0 + timedelta(hours=30))  # 10.00 - 15.00 = -5.00: past alarm 1, alarm 2, zero and -T
    assert b.meter.ladder() is Ladder.OVERDRAFT and b.balance_fen == -500
    assert b.relay == "closed" and b.meter.trip_count == 0
    assert b.read(0x00900201) == Decimal("5.00")
    assert ok(b.control(N1.POWER_HOLD_OFF))
    assert b.relay == "open" and state(b) == "local_trip"
    assert not b.press()


def test_release_at_alarm_2_pre_trips() -> None:
    """Released at alarm 2 after the held local pre-trip: the relay pre-trips (§1.5)."""
    b = Bench(watts=1000, balance_fen=1000, limits=Limits(alarm_1=800, alarm_2=500, overdraft=0))
    assert ok(b.control(N1.POWER_HOLD_ON))
    b.at(T0 + timedelta(hours=12))  # 10.00 - 6.00 = 4.00: alarm 2
    assert b.meter.ladder() is Ladder.ALARM_2 and b.relay == "closed"
    assert ok(b.control(N1.POWER_HOLD_OFF))
    assert b.relay == "close_allowed"
    assert b.press() and b.relay == "closed"


def test_release_in_normal_state_changes_nothing() -> None:
    b = Bench(watts=1000, balance_fen=5000)
    assert ok(b.control(N1.POWER_HOLD_ON))
    b.wait(hours=1)
    assert ok(b.control(N1.POWER_HOLD_OFF))
    assert b.relay == "closed" and b.meter.trip_count == 0


def test_alarm_on_and_off_touch_only_the_indication() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    assert ok(b.control(N1.ALARM_ON), RelayExecution.ALARM)
    assert b.read(0x04000503)["pre_trip_alarm"] and b.relay == "closed"
    assert ok(b.control(N1.ALARM_OFF), RelayExecution.ALARM_RELEASED)
    assert not b.read(0x04000503)["pre_trip_alarm"] and b.relay == "closed"


# --- plaintext commands, passwords and validity --------------------------------------------------------


def test_plaintext_close_with_the_level_02_password() -> None:
    b = Bench(watts=1000)
    assert ok(b.control(N1.TRIP))
    assert err04(b.plain_control(N1.DIRECT_CLOSE, Password(0x02, "654321")))
    assert b.relay == "open"
    assert ok(b.plain_control(N1.DIRECT_CLOSE, LEVEL_02))
    assert b.relay == "closed"
    assert b.read(0x1E00FF01)["operator"] == OPERATOR

    assert ok(b.control(N1.TRIP))
    assert ok(b.plain_control(N1.CLOSE_ALLOWED, LEVEL_02))
    assert b.relay == "close_allowed"


def test_plaintext_trip_is_refused_unless_the_profile_allows_it() -> None:
    b = Bench(watts=1000)
    assert err04(b.plain_control(N1.TRIP, LEVEL_02))
    assert err04(b.plain_control(N1.POWER_HOLD_ON, LEVEL_02))
    assert b.relay == "closed" and not b.meter.relay.hold

    fw_b = Bench(watts=1000, profile=FW_B)
    assert ok(fw_b.plain_control(N1.TRIP, LEVEL_02))
    assert fw_b.relay == "open"
    assert ok(fw_b.control(N1.DIRECT_CLOSE))  # FW-B's cipher level is 96
    assert fw_b.relay == "closed"


@pytest.mark.parametrize("n1", [N1.TRIP, N1.DIRECT_CLOSE, N1.POWER_HOLD_ON, N1.TRIP_AUTO_RESTORE])
def test_an_expired_command_never_executes(n1: int) -> None:
    b = Bench(watts=1000)
    if n1 == N1.DIRECT_CLOSE:
        assert ok(b.control(N1.TRIP))
    before = (state(b), b.meter.relay.hold, b.meter.relay.alarm)
    assert err04(b.control(n1, 2, valid_until=b.now - timedelta(seconds=1)))
    assert (state(b), b.meter.relay.hold, b.meter.relay.alarm) == before
    b.wait(hours=1)
    assert (state(b), b.meter.relay.hold) == before[:2]

    iot = Bench(watts=1000, profile=SGCC_IOT)
    assert word(iot.control(N1.TRIP, valid_until=iot.now - timedelta(seconds=1)), RelayErrorFlags.VALIDITY_TIME)
    assert iot.relay == "closed"


def test_a_command_runs_up_to_its_validity_end_second() -> None:
    b = Bench(watts=1000)
    end = b.now + timedelta(minutes=3)
    block_session = b.ensure_session()
    b.at(end)
    assert b.ensure_session() is block_session
    assert ok(b.control(N1.TRIP, valid_until=end))
    assert b.relay == "open"


def test_validity_is_judged_by_the_meter_clock() -> None:
    """FW-A compares N3..N8 with its own clock: a meter running 10 min fast refuses it."""
    b = Bench(watts=1000, clock_offset_s=600)
    assert err04(b.control(N1.TRIP, valid_until=b.now + timedelta(minutes=5)))
    assert b.relay == "closed"
    assert ok(b.control(N1.TRIP, valid_until=b.now + timedelta(minutes=15)))
    assert b.relay == "open"


def test_a_plaintext_command_past_its_validity_is_refused() -> None:
    b = Bench(watts=1000)
    assert ok(b.control(N1.TRIP))
    assert err04(b.plain_control(N1.DIRECT_CLOSE, LEVEL_02, valid_until=b.now - timedelta(minutes=1)))
    assert b.relay == "open"


def test_encrypted_command_without_a_session_is_refused() -> None:
    b = Bench(watts=1000, profile=SGCC_IOT)
    b.ensure_session()
    b.wait(minutes=6)  # the 5-minute identity authentication has timed out
    session = b.session
    assert session is not None
    block = session.control_block(N1.TRIP, 0, (b.now + timedelta(minutes=5)).replace(microsecond=0))
    reply = b.send(EncryptedRelayControlRequest(Password(0x98, "000000"), OPERATOR, block))
    assert word(reply, RelayErrorFlags.AUTHENTICATION_TIMEOUT)
    assert b.relay == "closed"


# --- wallet initialisation ------------------------------------------------------------------------------


def test_wallet_initialisation_closes_directly() -> None:
    """'A wallet preset or initialisation closes directly' (§1.5), also on an internal relay."""
    b = Bench(watts=1000, balance_fen=100, limits=Limits(0, 0, 0))
    b.wait(hours=2)
    assert b.meter.ladder() is Ladder.OVERDRAFT and b.relay == "open"
    session = b.ensure_session()
    reply = b.send(SecurityRequest(SecurityDI.WALLET_INITIALISATION, OPERATOR, session.wallet_init(5000)))
    assert isinstance(reply, SecurityReply)
    assert b.balance_fen == 5000 and b.meter.wallet.count == 0
    assert b.meter.ladder() is Ladder.NORMAL
    assert b.relay == "closed"
    assert isinstance(b.recharge(100, 1), SecurityReply)  # the count starts again at 0


def test_wrong_plaintext_relay_passwords_lock_the_level() -> None:
    """Three wrong passwords lock that level for 24 h (dlt645.md §2.3), for 0x1C as for 0x14."""
    b = Bench(watts=1000)
    assert ok(b.control(N1.TRIP))
    for _ in range(3):
        assert err04(b.plain_control(N1.DIRECT_CLOSE, Password(0x02, "111111")))
    assert err04(b.plain_control(N1.DIRECT_CLOSE, LEVEL_02))  # locked: even the right password
    assert b.relay == "open"
    b.wait(hours=24)
    assert ok(b.plain_control(N1.DIRECT_CLOSE, LEVEL_02))
    assert b.relay == "closed"


def test_a_level_locked_by_wrong_write_passwords_refuses_plaintext_relay_control() -> None:
    b = Bench(watts=1000)
    assert ok(b.control(N1.TRIP))
    raw = DI_2007.lookup(0x04001401).encode(5)
    for _ in range(3):
        assert err04(b.send(WriteRequest(0x04001401, Password(0x02, "111111"), OPERATOR, raw)))
    assert err04(b.plain_control(N1.DIRECT_CLOSE, LEVEL_02))
    assert b.relay == "open"
