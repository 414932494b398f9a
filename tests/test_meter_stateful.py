"""Hypothesis state machines driving one simulated meter through time, load, money and commands.

The system under test is a :class:`~firmware_stubs.meter.Meter` behind the real dispatcher:
top-ups travel as 0x03 070102FF frames with master-station MACs, relay commands as level-98
0x1C frames, parameter changes as level-99/98 0x14 frames. The machine keeps a small model
(balance in micro-yuan, purchase count, registers) and checks after every step:

(a) the balance changes only by an accepted top-up (exactly +amount) or by consumption, and
    over every advance the money lost is exactly the price in force summed over the
    hundredths of a kWh counted (per TOU register with TOU prices; per step with steps);
    energy is conserved: watts x closed time = counted hundredths + the partial remainder;
(b) a purchase count applies at most once: a duplicate or replayed recharge adds nothing and
    the count only ever grows by 1 per accepted top-up;
(c) while power hold is on, the contact never goes from closed to open;
(d) an expired control command changes nothing;
(e) the energy registers never decrease except by rolling over at 999999.99 kWh;
(f) the contact is open whenever the wallet is in overdraft and power hold is off, unless
    large-current protection holds the trip (prepaid.md §1.5: until the current falls, at most
    04001403 minutes).

Three machines share the rules: one with four different TOU prices and no steps, one with a
flat price and a monthly step table (chunked at every step settlement), and one with an
energy-type wallet (prepaid.md §1.8): it holds kWh, loses exactly 0.01 kWh per 0.01 kWh counted
whatever the price, and speaks the energy DIs (00900100/01, 0332xxxx, 04000F0x).

A fourth machine (LargeCurrentRelay) mixes relay commands, pre-trips included, with loads above
and below the large-current threshold (prepaid.md §1.5): every advance returns at its target
(under a real-time watchdog), and only a pending trip ever waits for the current to fall.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import ClassVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from meterkit import CUSTOMER, NO_STEPS, OPERATOR, T0, Bench

from firmware_stubs.meter import HUNDREDTH_MJ, ROLLOVER
from firmware_stubs.relay import RelayState
from firmware_stubs.tariff import DEFAULT_TOU, PriceSet, StepTable, TariffState
from firmware_stubs.wallet import FEN, Ladder, Limits, WalletUnit
from protocols.dlt645 import (
    ErrorFlags,
    ErrorReply,
    PartialTime,
    RelayControlReply,
    SecurityErrorReply,
    SecurityFlags,
    WriteReply,
)
from protocols.dlt645.relay import RelayCommand as N1
from protocols.dlt645.security import SecurityDI, SecurityReply, SecurityRequest

MAX_FEN = 99_999_999
OTHER_CUSTOMER = "000000000778"

durations_ms = st.one_of(
    st.integers(1, 120_000),  # up to two minutes
    st.integers(120_000, 6 * 3_600_000),  # up to six hours
    st.integers(1, 40).flatmap(lambda d: st.integers(d * 86_400_000 - 3_600_000, d * 86_400_000 + 3_600_000)),
)
loads = st.sampled_from([0, 150, 1000, 2500, 6000, -300, -2000])
register_starts = st.one_of(st.just(0), st.integers(0, 10_000), st.integers(ROLLOVER - 700_000, ROLLOVER - 1))
COMMANDS = [
    N1.TRIP,
    N1.CLOSE_ALLOWED,
    N1.DIRECT_CLOSE,
    N1.TRIP_AUTO_RESTORE,
    N1.TRIP_AUTO_RESTORE_ALT,
    N1.ALARM_ON,
    N1.ALARM_OFF,
    N1.POWER_HOLD_ON,
    N1.POWER_HOLD_OFF,
]
TRIPPED = (RelayState.REMOTE_TRIP, RelayState.LOCAL_TRIP)
PRE_TRIPS = (RelayState.PRE_TRIP_1, RelayState.PRE_TRIP_2)


class MeterMachine(RuleBasedStateMachine):
    """Shared rules and invariants; subclasses build the tariff and check the money identity."""

    UNIT = WalletUnit.MONEY
    REMAINING_DI, OVERDRAFT_DI, COUNT_DI = 0x00900200, 0x00900201, 0x03330201
    LIMIT_DIS: ClassVar[dict[str, tuple[int, bool]]] = {  # field: (DI, class 1 = plaintext + MAC, else class 2)
        "alarm_1": (0x04001001, True),
        "alarm_2": (0x04001002, True),
        "overdraft": (0x04001003, False),
        "hoarding": (0x04001004, False),
        "close_allowed": (0x04001005, False),
    }

    def build_tariff(self, data: st.DataObject) -> TariffState:
        raise NotImplementedError

    def check_money(self, lost: int, dfwd: list[int], e0: int) -> None:
        """(a): ``lost`` micro-yuan for the forward increases ``dfwd``, from step energy ``e0``."""
        raise NotImplementedError

    # --- setup -----------------------------------------------------------------------------------

    @initialize(
        data=st.data(),
        balance=st.integers(-1500, 30_000),
        alarms=st.tuples(st.integers(0, 5000), st.integers(0, 5000)),
        overdraft=st.sampled_from([0, 0, 300, 2000]),
        hoarding=st.sampled_from([0, 0, 20_000, 60_000]),
        close_allowed=st.sampled_from([0, 0, 500, 3000]),
        external=st.booleans(),
        trip_delay=st.sampled_from([0, 0, 3]),
        large_current=st.booleans(),
        forward=st.lists(register_starts, min_size=5, max_size=5),
        reverse=st.lists(register_starts, min_size=5, max_size=5),
    )
    def setup(
        self,
        data: st.DataObject,
        balance: int,
        alarms: tuple[int, int],
        overdraft: int,
        hoarding: int,
        close_allowed: int,
        external: bool,
        trip_delay: int,
        large_current: bool,
        forward: list[int],
        reverse: list[int],
    ) -> None:
        limits = Limits(max(alarms), min(alarms), overdraft, hoarding, close_allowed)
        self.b = Bench(
            balance_fen=balance,
            wallet_unit=self.UNIT,
            limits=limits,
            tariff=self.build_tariff(data),
            external_relay=external,
            trip_delay_min=trip_delay,
            large_current_ma=10_000 if large_current else 0,
            large_current_delay_min=20 if large_current else 0,
        )
        self.m = self.b.meter
        self.m.forward[:] = forward
        self.m.reverse[:] = reverse
        self.balance = self.m.wallet.balance
        self.count = self.m.wallet.count
        self.forward = list(forward)
        self.reverse = list(reverse)
        self.accepted: list[tuple[SecurityRequest, object]] = []  # (request, session it was made in)

    # --- helpers -----------------------------------------------------------------------------------

    def relay_tuple(self) -> tuple[object, ...]:
        r = self.m.relay
        return (r.state, r.hold, r.alarm, r.deadline_ms, r.pending_state)

    def closed_ms(self, start_ms: int, end_ms: int, was_open: bool, trips: int, closes: int) -> int:
        """How long the contact was closed in (start, end], from the trip/close records written."""
        events = [(r.time_ms, "trip") for r in self.m.trips[: self.m.trip_count - trips]]
        events += [(r.time_ms, "close") for r in self.m.closes[: self.m.close_count - closes]]
        assert self.m.trip_count - trips <= 10 and self.m.close_count - closes <= 10
        events.sort()
        closed, t, is_open = 0, start_ms, was_open
        for when, kind in events:
            assert start_ms < when <= end_ms
            assert is_open == (kind == "close"), "trip and close records alternate"
            if not is_open:
                closed += when - t
            t, is_open = when, kind == "trip"
        if not is_open:
            closed += end_ms - t
        assert is_open == self.m.relay.contact_open()
        return closed

    # --- time and load -------------------------------------------------------------------------------

    def advance_chunk(self, target_ms: int) -> None:
        m = self.m
        start_ms = m.now_ms
        fwd0, rev0 = list(m.forward), list(m.reverse)
        fwd_mj0, rev_mj0 = m._fwd_mj, m._rev_mj
        balance0, e0 = m.wallet.balance, m.tariff.step_energy
        trips, closes, was_open, held = m.trip_count, m.close_count, m.relay.contact_open(), m.relay.hold
        watts = self.b.load.watts

        self.b.at(T0 + timedelta(milliseconds=target_ms - int(T0.timestamp() * 1000)))
        assert m.now_ms == target_ms

        # (e) registers only grow, modulo the XXXXXX.XX rollover; the total is the sum of T1..T4.
        dfwd = [(a - b) % ROLLOVER for a, b in zip(m.forward, fwd0, strict=True)]
        drev = [(a - b) % ROLLOVER for a, b in zip(m.reverse, rev0, strict=True)]
        assert sum(dfwd[1:]) == dfwd[0] and sum(drev[1:]) == drev[0]
        for after, before, d in zip(m.forward + m.reverse, fwd0 + rev0, dfwd + drev, strict=True):
            assert after == (before + d) % ROLLOVER
            if after < before:
                assert before + d >= ROLLOVER  # a decrease only by rolling over
                event("a register rolled over")

        # Energy is conserved: watts x closed time = counted hundredths + remainder.
        closed = self.closed_ms(start_ms, target_ms, was_open, trips, closes)
        if watts >= 0:
            assert dfwd[0] * HUNDREDTH_MJ + m._fwd_mj - fwd_mj0 == watts * closed
            assert drev[0] == 0 and m._rev_mj == rev_mj0
        else:
            assert drev[0] * HUNDREDTH_MJ + m._rev_mj - rev_mj0 == -watts * closed
            assert dfwd[0] == 0 and m._fwd_mj == fwd_mj0

        # (a) the money lost is the price in force summed over the hundredths counted.
        lost = balance0 - m.wallet.balance
        self.check_money(lost, dfwd, e0)
        self.balance = m.wallet.balance

        # (c) no trip while power hold is on.
        if held:
            assert m.trip_count == trips
            if m.wallet.ladder() > Ladder.ALARM_1 and watts > 0:
                event("advance on power hold below alarm 1")
        if m.trip_count != trips or m.close_count != closes:
            event("the relay moved during an advance")
        self.forward, self.reverse = list(m.forward), list(m.reverse)

    @rule(duration=durations_ms)
    def advance(self, duration: int) -> None:
        self.advance_chunk(self.m.now_ms + duration)

    @rule(watts=loads)
    def set_load(self, watts: int) -> None:
        self.b.load.watts = watts

    # --- money -----------------------------------------------------------------------------------------

    def expected_top_up(self, amount: int, count: int, customer: str) -> SecurityFlags | None:
        w = self.m.wallet
        if customer != w.customer:
            return SecurityFlags.CUSTOMER_MISMATCH
        if count == self.count:
            return SecurityFlags.REPEAT_RECHARGE
        if count != self.count + 1:
            return SecurityFlags.PURCHASE_COUNT
        after = self.balance + amount * FEN
        if after > MAX_FEN * FEN or (w.limits.hoarding and after > w.limits.hoarding * FEN):
            return SecurityFlags.HOARDING_LIMIT
        return None

    @rule(
        kind=st.sampled_from(["next", "next", "next", "duplicate", "gap", "stale", "customer"]),
        amount=st.one_of(st.integers(0, 5000), st.integers(5000, 80_000)),
    )
    def top_up(self, kind: str, amount: int) -> None:
        m = self.m
        count = {"duplicate": self.count, "gap": self.count + 2, "stale": max(self.count - 1, 0)}.get(
            kind, self.count + 1
        )
        customer = OTHER_CUSTOMER if kind == "customer" else CUSTOMER
        expected = self.expected_top_up(amount, count, customer)
        before = m.wallet.balance
        relay_before = m.relay.state
        trips = m.trip_count
        session = self.b.ensure_session()
        body = session.recharge(amount, count, customer)
        request = SecurityRequest(SecurityDI.RECHARGE, OPERATOR, body)
        reply = self.b.send(request)
        event(f"top-up: {expected.name if expected else 'accepted'}")
        if expected is None:
            assert isinstance(reply, SecurityReply), reply
            assert m.wallet.balance == before + amount * FEN  # (a) exactly +amount
            self.count += 1
            self.balance += amount * FEN
            self.accepted.append((request, session))
            assert m.wallet.purchases[0].count == self.count and m.wallet.purchases[0].amount == amount
            # Relay rules after a top-up (prepaid.md §1.5).
            after = m.wallet.balance
            if relay_before in PRE_TRIPS:
                if m.ladder() is Ladder.OVERDRAFT and not m.relay.hold:
                    # A pre-trip that replaced a local trip held by large current: no close into overdraft.
                    assert m.relay.state is relay_before
                else:
                    assert m.relay.state is RelayState.CLOSED
            elif relay_before is RelayState.LOCAL_TRIP:
                lifted = m.ladder() is not Ladder.OVERDRAFT and after > m.wallet.limits.close_allowed * FEN
                event(f"top-up in local trip, lifted={lifted}")
                if not lifted:
                    assert m.relay.state is RelayState.LOCAL_TRIP
                else:
                    external = m.relay.external
                    assert m.relay.state is (RelayState.CLOSED if external else RelayState.LOCAL_PRE_TRIP)
            elif relay_before is RelayState.REMOTE_TRIP:
                assert m.relay.state is RelayState.REMOTE_TRIP  # a top-up does not undo a remote trip
            elif relay_before is RelayState.TRIP_PENDING and m.relay.pending_state is RelayState.LOCAL_TRIP:
                # A local trip held by large current stands until the top-up lifts the overdraft.
                assert m.ladder() is Ladder.OVERDRAFT or after <= m.wallet.limits.close_allowed * FEN
        else:
            assert isinstance(reply, SecurityErrorReply) and reply.flags == expected, (reply, expected)
            assert m.wallet.balance == before and m.relay.state is relay_before
        assert m.trip_count == trips  # a top-up never opens the relay

    @rule(which=st.integers(0, 1000))
    def replay_recharge(self, which: int) -> None:
        """(b) a recharge frame sent again never adds money, whatever the session."""
        if not self.accepted:
            return
        request, session = self.accepted[which % len(self.accepted)]
        before, count = self.m.wallet.balance, self.m.wallet.count
        reply = self.b.send(request)
        assert isinstance(reply, SecurityErrorReply)
        if self.b.session is session and self.m.esam.authenticated(self.m.local_time()):
            assert reply.flags in (SecurityFlags.REPEAT_RECHARGE, SecurityFlags.PURCHASE_COUNT)
        else:
            assert reply.flags in (SecurityFlags.ESAM_VERIFICATION, SecurityFlags.AUTHENTICATION)
            self.b.session = None
        assert self.m.wallet.balance == before and self.m.wallet.count == count

    # --- relay -------------------------------------------------------------------------------------------

    @rule(n1=st.sampled_from(COMMANDS), n2=st.sampled_from([0, 1, 2, 6]), expired_by=st.integers(1, 7200))
    def expired_command(self, n1: int, n2: int, expired_by: int) -> None:
        """(d) an expired command never changes anything."""
        self.b.ensure_session()
        before = self.relay_tuple()
        trips, closes = self.m.trip_count, self.m.close_count
        reply = self.b.control(n1, n2, valid_until=self.b.now - timedelta(seconds=expired_by))
        assert isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.PASSWORD
        assert self.relay_tuple() == before
        assert (self.m.trip_count, self.m.close_count) == (trips, closes)

    @rule(n1=st.sampled_from(COMMANDS), n2=st.sampled_from([0, 1, 2, 6]))
    def command(self, n1: int, n2: int) -> None:
        m, r = self.m, self.m.relay
        state, held, was_open = r.state, r.hold, r.contact_open()
        trips = m.trip_count
        reply = self.b.control(n1, n2)
        refused = (n1 == N1.TRIP and held) or (
            n1 in (N1.TRIP_AUTO_RESTORE, N1.TRIP_AUTO_RESTORE_ALT) and (held or n2 == 0 or state in TRIPPED)
        )
        event(f"command {N1(n1).name}: {'refused' if refused else 'executed'}")
        if refused:
            assert isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.PASSWORD, reply
            assert r.state is state
        else:
            assert isinstance(reply, RelayControlReply), reply
        if held and n1 != N1.POWER_HOLD_OFF:
            assert m.trip_count == trips  # (c)
        if n1 in (N1.CLOSE_ALLOWED, N1.DIRECT_CLOSE, N1.ALARM_ON, N1.ALARM_OFF, N1.POWER_HOLD_ON):
            assert m.trip_count == trips  # these never open a closed contact
        if refused:
            return
        if n1 == N1.TRIP:
            assert r.state in (RelayState.REMOTE_TRIP, RelayState.TRIP_PENDING)
            assert r.state is RelayState.REMOTE_TRIP or not was_open
        elif n1 == N1.DIRECT_CLOSE:
            overdraft = m.ladder() is Ladder.OVERDRAFT
            assert r.contact_open() == (overdraft and not held and not r.awaiting_current)
        elif n1 == N1.CLOSE_ALLOWED:
            assert r.contact_open() == was_open or (held is False and m.ladder() is Ladder.OVERDRAFT)
        elif n1 in (N1.TRIP_AUTO_RESTORE, N1.TRIP_AUTO_RESTORE_ALT):
            assert r.state is (RelayState.PRE_TRIP_1 if n1 == N1.TRIP_AUTO_RESTORE else RelayState.PRE_TRIP_2)
            assert r.deadline_ms == m.now_ms + n2 * 300_000
        elif n1 in (N1.ALARM_ON, N1.ALARM_OFF):
            assert r.state is state and r.alarm == (n1 == N1.ALARM_ON)
        elif n1 == N1.POWER_HOLD_ON:
            assert r.hold and r.state is not RelayState.TRIP_PENDING
        elif n1 == N1.POWER_HOLD_OFF:
            assert not r.hold

    @rule()
    def press_button(self) -> None:
        m = self.m
        trips, state = m.trip_count, m.relay.state
        closed = self.b.press()
        assert m.trip_count == trips  # the button never opens the relay
        if closed:
            assert state in (RelayState.CLOSE_ALLOWED, RelayState.LOCAL_PRE_TRIP) and not m.relay.contact_open()
        else:
            assert m.relay.state is state
        if m.ladder() is Ladder.OVERDRAFT:
            assert not closed

    # --- parameters ------------------------------------------------------------------------------------

    @rule(
        field=st.sampled_from(["alarm_1", "alarm_2", "overdraft", "close_allowed", "hoarding"]),
        fen=st.sampled_from([0, 100, 800, 1500, 3000, 6000, 25_000]),
    )
    def set_limit(self, field: str, fen: int) -> None:
        if field not in self.LIMIT_DIS:
            return  # no such DI for this wallet (energy wallets have no close-allowed limit)
        di, class_1 = self.LIMIT_DIS[field]
        value = Decimal(fen).scaleb(-2)
        old = self.m.wallet.limits
        new = {k: getattr(old, k) for k in ("alarm_1", "alarm_2", "overdraft", "hoarding", "close_allowed")}
        new[field] = fen
        bad = new["alarm_1"] and new["alarm_2"] and new["alarm_1"] < new["alarm_2"]
        trips = self.m.trip_count
        held = self.m.relay.hold
        # Class 1 (alarm amounts) travels plaintext + MAC; class 2 ciphertext + MAC (§5.5).
        reply = self.b.write_mac(di, value) if class_1 else self.b.write_cipher(di, value)
        if bad:
            assert isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.OTHER
            assert self.m.wallet.limits == old
        else:
            assert isinstance(reply, WriteReply), reply
            assert getattr(self.m.wallet.limits, field) == fen
        if held:
            assert self.m.trip_count == trips  # (c)

    @rule()
    def read_back(self) -> None:
        """What the master reads over the wire agrees with the model."""
        b, r = self.b, self.m.relay
        remaining = self.balance // FEN if self.balance > 0 else 0
        overdraft = -(self.balance // FEN) if self.balance < 0 else 0
        assert b.read(self.REMAINING_DI) == Decimal(remaining).scaleb(-2)
        assert b.read(self.OVERDRAFT_DI) == Decimal(overdraft).scaleb(-2)
        assert b.read(0x0001FF00) == [Decimal(v).scaleb(-2) for v in self.forward]
        assert b.read(0x0002FF00) == [Decimal(v).scaleb(-2) for v in self.reverse]
        assert b.read(self.COUNT_DI) == self.count  # the last purchase record holds the current count
        status = b.read(0x04000503)
        assert status["relay_open"] == r.contact_open() and status["relay_trip_commanded"] == (
            r.commanded_open and r.state is not RelayState.CLOSE_ALLOWED
        )
        assert status["power_hold"] == r.hold and status["pre_trip_alarm"] == r.alarm
        assert b.read(0x04000501)["overdraft"] == (self.balance < 0)

    # --- invariants -------------------------------------------------------------------------------------

    @invariant()
    def money_and_count_follow_the_model(self) -> None:
        assert self.m.wallet.balance == self.balance  # (a) nothing else moves money
        assert self.m.wallet.count == self.count  # (b)
        assert self.m.wallet.customer == CUSTOMER
        assert self.m.forward == self.forward and self.m.reverse == self.reverse  # only time adds energy

    @invariant()
    def overdraft_means_open(self) -> None:
        """(f)."""
        r = self.m.relay
        if self.m.ladder() is Ladder.OVERDRAFT and not r.hold:
            event("overdraft without power hold")
            if r.awaiting_current:
                event("overdraft trip held by large current")
                assert r.pending_state in TRIPPED and r.deadline_ms is not None
                assert r.deadline_ms <= self.m.now_ms + 20 * 60_000  # at most 04001403 = 20 min
            else:
                assert r.contact_open(), r.state

    @invariant()
    def relay_is_consistent(self) -> None:
        r = self.m.relay
        assert not r.awaiting_current or r.state is RelayState.TRIP_PENDING  # only a trip waits for the current
        if r.state is RelayState.TRIP_PENDING:
            assert not r.hold and r.deadline_ms is not None and r.deadline_ms > self.m.now_ms
        if r.state in PRE_TRIPS:
            assert r.deadline_ms is not None and r.deadline_ms > self.m.now_ms


class TouPrices(MeterMachine):
    """Four different TOU prices (DEFAULT_TOU periods), no steps."""

    def build_tariff(self, data: st.DataObject) -> TariffState:
        if data.draw(st.booleans(), label="flat"):
            prices = [data.draw(st.integers(0, 20_000), label="flat price")] * 4
        else:
            prices = data.draw(st.lists(st.integers(0, 20_000), min_size=4, max_size=4), label="prices")
        self.prices = prices
        return TariffState(PriceSet(tuple(prices)), NO_STEPS, DEFAULT_TOU, settlement_checked_at=T0)

    def check_money(self, lost: int, dfwd: list[int], e0: int) -> None:
        assert lost == sum(d * p for d, p in zip(dfwd[1:], self.prices, strict=True))
        if len(set(self.prices)) == 1:  # one price: decrease = forward increase x price
            assert lost == dfwd[0] * self.prices[0]


class SteppedPrices(MeterMachine):
    """A flat price plus a two-threshold step table settled monthly; advances are cut at settlements."""

    def build_tariff(self, data: st.DataObject) -> TariffState:
        self.price = data.draw(st.integers(1, 10_000), label="price")
        t1 = data.draw(st.integers(1, 2000), label="threshold 1")
        t2 = data.draw(st.integers(t1, 8000), label="threshold 2")
        inc = data.draw(st.lists(st.integers(0, 5000), min_size=3, max_size=3), label="increments")
        day = data.draw(st.integers(1, 28), label="settlement day")
        hour = data.draw(st.integers(0, 23), label="settlement hour")
        self.steps = StepTable((t1, t2, 0, 0, 0, 0), (*inc, 0, 0, 0, 0), (PartialTime(99, day, hour), None, None, None))
        assert self.steps.settlement_mode == "monthly"
        return TariffState(PriceSet((self.price,) * 4), self.steps, DEFAULT_TOU, settlement_checked_at=T0)

    def cost(self, e0: int, n: int) -> int:
        """Price of the hundredths counted at step energies e0 .. e0 + n - 1 (closed form)."""
        total, e, end = 0, e0, e0 + n
        while e < end:
            nxt = self.steps.next_threshold(e)
            stop = end if nxt is None else min(end, nxt)
            total += (stop - e) * (self.price + self.steps.increment(e))
            e = stop
        return total

    def check_money(self, lost: int, dfwd: list[int], e0: int) -> None:
        assert lost == self.cost(e0, dfwd[0])

    @rule(duration=durations_ms)
    def advance(self, duration: int) -> None:
        target = self.m.now_ms + duration
        while self.m.now_ms < target:
            settlement = self.m.tariff.next_settlement(self.m.local_time())
            stop = target
            if settlement is not None:
                stop = min(target, int(settlement.timestamp() * 1000))
            self.advance_chunk(stop)
            if stop != target:
                assert self.m.tariff.step_energy == 0  # settled


class EnergyWallet(MeterMachine):
    """An energy-type wallet (prepaid.md §1.8) on four TOU prices and a step table: the wallet
    counts kWh, so the prices never reach it; limits are 04000F0x in kWh (dlt645.md §3.4)."""

    UNIT = WalletUnit.ENERGY
    REMAINING_DI, OVERDRAFT_DI, COUNT_DI = 0x00900100, 0x00900101, 0x03320201
    LIMIT_DIS: ClassVar[dict[str, tuple[int, bool]]] = {  # the energy limits are class 2 in the DI table
        "alarm_1": (0x04000F01, False),
        "alarm_2": (0x04000F02, False),
        "hoarding": (0x04000F03, False),
        "overdraft": (0x04000F04, False),
    }

    def build_tariff(self, data: st.DataObject) -> TariffState:
        prices = data.draw(st.lists(st.integers(0, 20_000), min_size=4, max_size=4), label="prices")
        steps = StepTable((500, 0, 0, 0, 0, 0), (0, 3000, 0, 0, 0, 0, 0), (PartialTime(99, 5, 0), None, None, None))
        return TariffState(PriceSet(tuple(prices)), steps, DEFAULT_TOU, settlement_checked_at=T0)

    def check_money(self, lost: int, dfwd: list[int], e0: int) -> None:
        assert lost == dfwd[0] * FEN  # 0.01 kWh per 0.01 kWh, at any price or step

    @rule()
    def money_dis_are_not_served(self) -> None:
        for di in (0x00900200, 0x00900201, 0x03330201, 0x04001001, 0x04001005):
            reply = self.b.read(di)
            assert isinstance(reply, ErrorReply) and reply.flags == ErrorFlags.NO_DATA, hex(di)


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Fail (rather than hang) when the body runs longer than ``seconds`` of real time."""

    def fire(*_: object) -> None:
        raise AssertionError(f"Meter.advance did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


LARGE_MA = 10_000
"""04001402 = 10 A: 2 kW (9.6 A at 220 V, PF 0.95) is below it, 2.5 kW and more above (export too)."""
current_loads = st.sampled_from([0, 1000, 2000, 2500, 5000, 8000, -3000, -6000])


class LargeCurrentRelay(RuleBasedStateMachine):
    """Relay commands (trips, pre-trips = trips with automatic restore, closes, power hold) mixed
    with loads above and below the large-current threshold and small top-ups around overdraft
    (prepaid.md §1.5, "Large-current protection"; dlt645.md §4.1). Every advance returns, ends at
    its target, and the relay never waits for the current outside a pending trip (a pre-trip over
    a trip held by large current used to make Meter.advance spin forever)."""

    @initialize(
        watts=current_loads,
        balance=st.integers(-300, 2000),
        overdraft=st.sampled_from([0, 500]),
        close_allowed=st.sampled_from([0, 300]),
        trip_delay=st.sampled_from([0, 0, 2]),
        delay=st.sampled_from([1, 30, 30, 24 * 60]),
        external=st.sampled_from([False, False, False, True]),
    )
    def setup(
        self, watts: int, balance: int, overdraft: int, close_allowed: int, trip_delay: int, delay: int, external: bool
    ) -> None:
        self.b = Bench(
            watts=watts,
            balance_fen=balance,
            limits=Limits(0, 0, overdraft, 0, close_allowed),
            trip_delay_min=trip_delay,
            large_current_ma=LARGE_MA,
            large_current_delay_min=delay,
            external_relay=external,
        )
        self.m = self.b.meter
        self.delay = delay

    @rule(
        duration=st.one_of(st.integers(1, 90_000), st.integers(90_000, 3 * 3_600_000), st.integers(1, 3 * 86_400_000))
    )
    def advance(self, duration: int) -> None:
        m = self.m
        start = m.now_ms
        if m.relay.state in PRE_TRIPS:
            event("advance in a pre-trip")
        with watchdog(20):
            self.b.at(self.b.now + timedelta(milliseconds=duration))
        assert m.now_ms == start + duration  # it returned, at its target

    @rule(watts=current_loads)
    def set_load(self, watts: int) -> None:
        self.b.load.watts = watts

    @rule(n1=st.sampled_from(COMMANDS), n2=st.sampled_from([0, 1, 2]))
    def command(self, n1: int, n2: int) -> None:
        r = self.m.relay
        if r.awaiting_current and n1 in (N1.TRIP_AUTO_RESTORE, N1.TRIP_AUTO_RESTORE_ALT) and n2 and not r.hold:
            event(f"pre-trip over a trip held by large current ({r.pending_state.value})")
        reply = self.b.control(n1, n2)
        assert isinstance(reply, RelayControlReply | ErrorReply), reply
        if isinstance(reply, RelayControlReply) and n1 in (N1.TRIP_AUTO_RESTORE, N1.TRIP_AUTO_RESTORE_ALT):
            assert r.contact_open()  # a pre-trip opens at once, whatever the current
            assert r.deadline_ms == self.m.now_ms + n2 * 300_000 and not r.awaiting_current

    @rule(amount=st.sampled_from([100, 1000, 5000]))
    def top_up(self, amount: int) -> None:
        self.b.recharge(amount, self.m.wallet.count + 1)

    @rule()
    def press_button(self) -> None:
        self.b.press()

    @invariant()
    def only_a_pending_trip_waits_for_the_current(self) -> None:
        r, now = self.m.relay, self.m.now_ms
        if r.awaiting_current:
            assert r.state is RelayState.TRIP_PENDING and r.pending_state in TRIPPED
            assert r.deadline_ms is not None and now < r.deadline_ms <= now + self.delay * 60_000
        if r.state in (RelayState.TRIP_PENDING, *PRE_TRIPS):
            assert r.deadline_ms is not None and r.deadline_ms > now

    @invariant()
    def overdraft_means_open(self) -> None:
        r = self.m.relay
        if self.m.ladder() is Ladder.OVERDRAFT and not r.hold and not r.awaiting_current:
            assert r.contact_open(), r.state


SETTINGS = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestTouPrices = TouPrices.TestCase
TestTouPrices.settings = SETTINGS
TestSteppedPrices = SteppedPrices.TestCase
TestSteppedPrices.settings = SETTINGS
TestEnergyWallet = EnergyWallet.TestCase
TestEnergyWallet.settings = SETTINGS
TestLargeCurrentRelay = LargeCurrentRelay.TestCase
TestLargeCurrentRelay.settings = SETTINGS
