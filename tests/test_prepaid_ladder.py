"""Golden scenarios for the balance ladder and the top-up rules (prepaid.md §1.4-§1.6).

Every crossing time is computed by hand: a constant 1 kW load at a flat 0.5000 yuan/kWh
costs 0.50 yuan an hour, i.e. 0.01 kWh (36 s) costs exactly 5,000 micro-yuan = 0.5 fen. The
ladder limits are A1 = 20.00, A2 = 10.00 and the overdraft limit T = 5.00 yuan.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from meterkit import T0, Bench

from firmware_stubs.wallet import FEN, Ladder, Limits, Wallet
from protocols.dlt645 import ErrorFlags, ErrorReply, SecurityErrorReply, SecurityFlags
from protocols.dlt645.security import SecurityReply

LIMITS = Limits(alarm_1=2000, alarm_2=1000, overdraft=500, close_allowed=1000)
H = timedelta(hours=1)
MS = timedelta(milliseconds=1)


def ladder(b: Bench) -> Ladder:
    return b.meter.ladder()


def accepted(reply: object) -> bool:
    return isinstance(reply, SecurityReply)


def run_to_overdraft(b: Bench) -> None:
    """T0 (30.00) → +20 h alarm 1 → +40 h alarm 2 → button → +61 h over zero → button → +72 h overdraft."""
    b.at(T0 + 40 * H)
    b.press()
    b.at(T0 + 61 * H)
    b.press()
    b.at(T0 + 72 * H)


# --- the ladder, step by step ------------------------------------------------------------------


def test_the_ladder_normal_alarm1_alarm2_over_zero_overdraft_at_hand_computed_times() -> None:
    b = Bench(watts=1000, balance_fen=3000, limits=LIMITS)
    assert ladder(b) is Ladder.NORMAL and b.relay == "closed"

    # Alarm 1 at R = 20.00: 10.00 yuan = 20 kWh = 20 h. One millisecond before, 0.5 fen short.
    b.at(T0 + 20 * H - MS)
    assert ladder(b) is Ladder.NORMAL and b.meter.wallet.balance == 2000 * FEN + FEN // 2
    b.at(T0 + 20 * H)
    assert ladder(b) is Ladder.ALARM_1 and b.balance_fen == 2000
    assert b.relay == "closed"  # alarm 1 is an indication only (§1.4)
    assert b.read(0x00010000) == Decimal("20.00")

    # Alarm 2 at R = 10.00, 20 h later: local pre-trip, the relay opens.
    b.at(T0 + 40 * H - MS)
    assert ladder(b) is Ladder.ALARM_1 and b.relay == "closed"
    b.at(T0 + 40 * H)
    assert ladder(b) is Ladder.ALARM_2 and b.balance_fen == 1000
    assert b.relay == "close_allowed" and b.contact_open
    assert b.meter.trip_count == 1 and b.meter.trips[0].time_ms == int((T0 + 40 * H).timestamp() * 1000)

    # Open relay: nothing is consumed, so nothing is deducted.
    b.at(T0 + 41 * H)
    assert b.balance_fen == 1000 and b.read(0x00010000) == Decimal("40.00")
    assert b.press() and b.relay == "closed"  # the button restores at alarm 2

    # Restored at alarm 2: stays closed until zero (SY03A), 20 h of consumption later.
    b.at(T0 + 61 * H - MS)
    assert ladder(b) is Ladder.ALARM_2 and b.relay == "closed"
    b.at(T0 + 61 * H)
    assert ladder(b) is Ladder.OVER_ZERO and b.balance_fen == 0
    assert b.relay == "close_allowed"  # over zero with T > 0: pre-trip once more
    assert b.meter.trip_count == 2
    b.at(T0 + 62 * H)
    assert b.press() and b.relay == "closed"  # still restorable

    # Overdraft at R <= -T = -5.00: 10 h later. Local trip: the button does not restore.
    b.at(T0 + 72 * H - MS)
    assert ladder(b) is Ladder.OVER_ZERO and b.relay == "closed"
    b.at(T0 + 72 * H)
    assert ladder(b) is Ladder.OVERDRAFT and b.balance_fen == -500
    assert b.relay == "open" and b.meter.relay.state.value == "local_trip"
    assert not b.press() and b.relay == "open"
    assert b.read(0x00900200) == Decimal("0.00")
    assert b.read(0x00900201) == Decimal("5.00")
    b.at(T0 + 100 * H)
    assert b.balance_fen == -500  # tripped: no more consumption


def test_zero_trips_directly_when_the_overdraft_limit_is_zero() -> None:
    """With T = 0 there is no over-zero state: R <= 0 is overdraft and trips hard."""
    b = Bench(watts=1000, balance_fen=3000, limits=Limits(alarm_1=2000, alarm_2=1000, overdraft=0))
    b.at(T0 + 40 * H)
    assert b.press()
    b.at(T0 + 60 * H - MS)
    assert ladder(b) is Ladder.ALARM_2 and b.relay == "closed"
    b.at(T0 + 60 * H)
    assert ladder(b) is Ladder.OVERDRAFT and b.balance_fen == 0
    assert b.relay == "open" and not b.press()


def test_alarm_limits_of_zero_skip_their_states() -> None:
    """A1 = A2 = 0: normal down to zero (§1.4: 'otherwise R > A2, or R > 0')."""
    b = Bench(watts=1000, balance_fen=100, limits=Limits(alarm_1=0, alarm_2=0, overdraft=100))
    b.at(T0 + 2 * H - MS)
    assert ladder(b) is Ladder.NORMAL and b.relay == "closed"
    b.at(T0 + 2 * H)
    assert ladder(b) is Ladder.OVER_ZERO and b.relay == "close_allowed"


# --- leaving overdraft: overdraft repaid first, close-allowed amount, internal vs external relay ---


@pytest.mark.parametrize("external", [False, True])
def test_leaving_overdraft_needs_more_than_the_close_allowed_amount(external: bool) -> None:
    b = Bench(watts=1000, balance_fen=3000, limits=LIMITS, external_relay=external)
    run_to_overdraft(b)
    assert b.balance_fen == -500 and b.relay == "open"

    # 3.00 is less than the 5.00 overdraft: it only shrinks the overdraft, R stays 0 (§1.6).
    b.wait(minutes=1)
    assert accepted(b.recharge(300, 2))
    assert b.balance_fen == -200
    assert b.read(0x00900200) == Decimal("0.00") and b.read(0x00900201) == Decimal("2.00")
    assert b.read(0x03330401) == Decimal("0.00") and b.read(0x03330501) == Decimal("0.00")
    assert b.relay == "open" and not b.press()

    # 12.00 repays the 2.00 first: R = 10.00, which does not exceed the close-allowed 10.00.
    assert accepted(b.recharge(1200, 3))
    assert b.balance_fen == 1000 and b.read(0x00900201) == Decimal("0.00")
    assert b.read(0x00900200) == Decimal("10.00")
    assert b.relay == "open" and not b.press()
    b.wait(hours=5)
    assert b.balance_fen == 1000  # still open, nothing consumed

    # 0.01 more: R = 10.01 > 10.00. Internal relay: wait for the button; external: close directly.
    assert accepted(b.recharge(1, 4))
    assert b.balance_fen == 1001
    if external:
        assert b.relay == "closed"
    else:
        assert b.relay == "close_allowed"  # 'It does not reclose by itself' (§1.5)
        b.wait(hours=1)
        assert b.relay == "close_allowed" and b.balance_fen == 1001
        assert b.press() and b.relay == "closed"
    # R = 10.01 is alarm 1; 0.01 yuan (72 s at 1 kW) later it is back at alarm 2 and pre-trips.
    assert ladder(b) is Ladder.ALARM_1
    closed_at = b.now
    b.at(closed_at + timedelta(seconds=72) - MS)
    assert b.relay == "closed" and b.meter.wallet.balance == 1000 * FEN + FEN // 2
    b.at(closed_at + timedelta(seconds=72))
    assert ladder(b) is Ladder.ALARM_2 and b.relay == "close_allowed" and b.balance_fen == 1000


def test_a_top_up_at_alarm_2_restores_nothing_by_itself_on_an_internal_relay() -> None:
    """Pre-tripped at alarm 2, a top-up to normal leaves the internal relay waiting for the button."""
    b = Bench(watts=1000, balance_fen=3000, limits=LIMITS)
    b.at(T0 + 40 * H)
    assert b.relay == "close_allowed"
    assert accepted(b.recharge(5000, 2))
    assert ladder(b) is Ladder.NORMAL and b.relay == "close_allowed"
    assert b.press() and b.relay == "closed"


def test_a_top_up_at_alarm_2_closes_an_external_relay() -> None:
    b = Bench(watts=1000, balance_fen=3000, limits=LIMITS, external_relay=True)
    b.at(T0 + 40 * H)
    assert b.relay == "close_allowed"
    assert accepted(b.recharge(5000, 2))
    assert b.relay == "closed"


# --- parameters and top-up refusals -------------------------------------------------------------------


def test_alarm_1_below_alarm_2_is_rejected_and_changes_nothing() -> None:
    b = Bench(balance_fen=3000, limits=LIMITS)
    reply = b.write_mac(0x04001001, Decimal("5.00"))  # A1 = 5.00 < A2 = 10.00
    assert isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.OTHER
    reply = b.write_mac(0x04001002, Decimal("25.00"))  # A2 = 25.00 > A1 = 20.00
    assert isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.OTHER
    assert b.meter.wallet.limits == LIMITS
    assert b.read(0x04001001) == Decimal("20.00") and b.read(0x04001002) == Decimal("10.00")
    # Equal limits are allowed (A1 >= A2).
    assert not isinstance(b.write_mac(0x04001001, Decimal("10.00")), ErrorReply)
    assert b.meter.wallet.limits.alarm_1 == 1000


def test_raising_an_alarm_limit_above_the_balance_pre_trips() -> None:
    """A change of alarm amounts re-evaluates the ladder (§1.5)."""
    b = Bench(watts=1000, balance_fen=1500, limits=LIMITS)
    assert ladder(b) is Ladder.ALARM_1 and b.relay == "closed"
    assert not isinstance(b.write_mac(0x04001001, Decimal("30.00")), ErrorReply)
    assert not isinstance(b.write_mac(0x04001002, Decimal("20.00")), ErrorReply)
    assert ladder(b) is Ladder.ALARM_2 and b.relay == "close_allowed"


def test_hoarding_limit_counts_the_overdraft_first() -> None:
    """Rejected when R + amount - overdraft > hoarding limit; 0 means no limit (§1.6)."""
    b = Bench(watts=1000, balance_fen=3000, limits=Limits(2000, 1000, 500, hoarding=5000, close_allowed=0))
    reply = b.recharge(2001, 2)
    assert isinstance(reply, SecurityErrorReply) and reply.flags == SecurityFlags.HOARDING_LIMIT
    assert b.balance_fen == 3000 and b.meter.wallet.count == 1
    assert accepted(b.recharge(2000, 2))  # exactly the limit is allowed
    assert b.balance_fen == 5000

    b2 = Bench(watts=1000, balance_fen=3000, limits=Limits(2000, 1000, 500, hoarding=5000, close_allowed=0))
    run_to_overdraft(b2)
    assert b2.balance_fen == -500
    reply = b2.recharge(5501, 2)
    assert isinstance(reply, SecurityErrorReply) and reply.flags == SecurityFlags.HOARDING_LIMIT
    assert accepted(b2.recharge(5500, 2))
    assert b2.balance_fen == 5000


def test_no_hoarding_limit_but_the_register_range() -> None:
    b = Bench(balance_fen=3000, limits=Limits(hoarding=0))
    assert accepted(b.recharge(1_000_000, 2))
    reply = b.recharge(99_999_999, 3)  # would overflow XXXXXX.XX
    assert isinstance(reply, SecurityErrorReply) and reply.flags == SecurityFlags.HOARDING_LIMIT
    assert b.balance_fen == 1_003_000


# --- the exact predicates ------------------------------------------------------------------------


def reference_ladder(r: int, a1: int, a2: int, t: int) -> Ladder:
    """prepaid.md §1.4, transcribed row by row (R, limits in micro-units)."""
    if t > 0 and -t < r <= 0:
        return Ladder.OVER_ZERO
    if r <= -t or (t == 0 and r <= 0):
        return Ladder.OVERDRAFT
    if 0 < r <= a2:
        return Ladder.ALARM_2
    if a2 < r <= a1:
        return Ladder.ALARM_1
    assert r > (a1 if a1 > 0 else a2 if a2 > 0 else 0)
    return Ladder.NORMAL


limits_fen = st.integers(0, 5000)


@given(a=limits_fen, b=limits_fen, t=limits_fen, data=st.data())
def test_wallet_ladder_is_the_reference_predicate(a: int, b: int, t: int, data: st.DataObject) -> None:
    a1, a2 = max(a, b), min(a, b)
    edges = [a1 * FEN, a2 * FEN, 0, -t * FEN]
    r = data.draw(st.one_of(st.integers(-6000 * FEN, 6000 * FEN), st.sampled_from(edges).map(lambda e: e)))
    r += data.draw(st.sampled_from([-1, 0, 1]))
    w = Wallet(limits=Limits(a1, a2, t))
    w.balance = r
    assert w.ladder() is reference_ladder(r, a1 * FEN, a2 * FEN, t * FEN)
    step = w.micro_to_next_state()
    if step is not None:
        assert step >= 1
        w.balance = r - step + 1
        assert w.ladder() is reference_ladder(r, a1 * FEN, a2 * FEN, t * FEN)
        w.balance = r - step
        assert w.ladder() is not reference_ladder(r, a1 * FEN, a2 * FEN, t * FEN)


def test_a_meter_starting_in_overdraft_starts_tripped_with_its_record() -> None:
    """The trip at the start is recorded at the start, not charged to the next command's operator."""
    b = Bench(watts=1000, balance_fen=-100, limits=Limits(0, 0, 0))
    assert b.relay == "open" and b.meter.trip_count == 1
    assert b.meter.trips[0].time_ms == int(T0.timestamp() * 1000) and b.meter.trips[0].operator == "00000000"
    b.wait(hours=1)
    assert not b.press()
    assert b.meter.trip_count == 1 and b.balance_fen == -100
