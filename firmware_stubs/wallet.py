"""The prepaid wallet of a local cost-control meter (prepaid.md §1.1, §1.4, §1.6, §1.8).

Money is kept in micro-yuan (1e-6 yuan, the firmware's internal precision, §1.3) as one
signed balance: above zero it is the remaining money R, below zero its magnitude is the
overdraft. Energy-type wallets (§1.8) keep 1e-6 kWh instead; every rule is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

from protocols.dlt645 import SecurityFlags

MICRO = 1_000_000
FEN = 10_000  # micro-units in 0.01 (fen, or 0.01 kWh)


class WalletUnit(StrEnum):
    """What the wallet counts."""

    MONEY = "money"
    ENERGY = "energy"


class Ladder(IntEnum):
    """Balance states, in order of decreasing balance (prepaid.md §1.4)."""

    NORMAL = 0
    ALARM_1 = 1
    ALARM_2 = 2
    OVER_ZERO = 3
    OVERDRAFT = 4


class TopUpRefused(Exception):
    """A top-up the meter refuses, with the SERR bits it answers (dlt645.md §5.3, §5.4)."""

    def __init__(self, flags: SecurityFlags, reason: str) -> None:
        super().__init__(reason)
        self.flags = flags


@dataclass(frozen=True, slots=True)
class Purchase:
    """A purchase record (DI 0333xxnn, dlt645.md §3.7): amounts in fen (or 0.01 kWh); ``time_ms``
    is the meter's clock (epoch ms of its reading)."""

    time_ms: int
    count: int
    amount: int
    before: int
    after: int
    cumulative: int


@dataclass(slots=True)
class Limits:
    """Wallet parameters in fen (0.01 yuan, or 0.01 kWh for energy wallets).

    04001001/2 alarm 1/2, 04001003 overdraft, 04001004 hoarding (0 = none), 04001005
    close-allowed amount (the energy-type DIs are 04000F01..04).
    """

    alarm_1: int = 2000
    alarm_2: int = 1000
    overdraft: int = 0
    hoarding: int = 0
    close_allowed: int = 0


class Wallet:
    """Balance, purchase count, customer number and the §1.4 ladder."""

    __slots__ = ("balance", "count", "customer", "opened", "cumulative", "limits", "unit", "purchases")

    def __init__(
        self,
        unit: WalletUnit = WalletUnit.MONEY,
        balance_fen: int = 0,
        customer: str = "000000000000",
        limits: Limits | None = None,
        opened: bool = True,
        count: int = 0,
        now_ms: int | None = None,
    ) -> None:
        self.unit = unit
        self.balance = balance_fen * FEN
        self.count = count
        self.customer = customer
        self.opened = opened
        self.cumulative = balance_fen
        self.limits = limits if limits is not None else Limits()
        self.purchases: list[Purchase] = []  # newest first, at most 10
        if count > 0 and now_ms is not None:
            # The wallet's history so far is one purchase: the meter reports a consistent
            # purchase count (03330201) and cumulative money from its first read on.
            self.purchases.append(Purchase(now_ms, count, balance_fen, 0, balance_fen, balance_fen))

    # --- reading ------------------------------------------------------------------------------

    @property
    def remaining_fen(self) -> int:
        """Remaining money (or energy) R, rounded down to fen: 00900200 (00900100)."""
        return self.balance // FEN if self.balance > 0 else 0

    @property
    def overdraft_fen(self) -> int:
        """Overdraft, kept positive: 00900201 (00900101). Rounded up: a debt is never hidden."""
        return -(self.balance // FEN) if self.balance < 0 else 0

    def ladder(self) -> Ladder:
        """The balance state with the exact predicates of prepaid.md §1.4 (JudgeAlarm1/2...)."""
        r = self.balance
        lim = self.limits
        a1, a2, t = lim.alarm_1 * FEN, lim.alarm_2 * FEN, lim.overdraft * FEN
        if r <= 0:
            if t > 0 and r > -t:
                return Ladder.OVER_ZERO
            return Ladder.OVERDRAFT
        if a2 > 0 and r <= a2:
            return Ladder.ALARM_2
        if a1 > 0 and r <= a1:
            return Ladder.ALARM_1
        return Ladder.NORMAL

    def micro_to_next_state(self) -> int | None:
        """Micro-units the balance can still fall before the ladder state changes (>= 1)."""
        r = self.balance
        lim = self.limits
        candidates = [lim.alarm_1 * FEN, lim.alarm_2 * FEN, 0, -lim.overdraft * FEN]
        below = [c for c in candidates if c < r]
        if not below:
            return None
        return r - max(below)

    # --- changing -------------------------------------------------------------------------------

    def deduct(self, micro: int) -> None:
        """Take consumption off the balance (it may run into overdraft)."""
        self.balance -= micro

    def check_limits(self, limits: Limits) -> None:
        """Refuse inconsistent parameters: alarm 1 must be >= alarm 2 (prepaid.md §1.4)."""
        if limits.alarm_1 and limits.alarm_2 and limits.alarm_1 < limits.alarm_2:
            raise ValueError("alarm amount 1 must be >= alarm amount 2")
        for v in (limits.alarm_1, limits.alarm_2, limits.overdraft, limits.hoarding, limits.close_allowed):
            if not 0 <= v <= 99_999_999:
                raise ValueError("wallet limits are 0 .. 999999.99")

    def top_up(self, amount: int, count: int, customer: str, opening: bool, now_ms: int) -> bool:
        """Apply a recharge (070102FF) or account opening (070101FF); amounts in fen.

        Returns whether money was added (opening with equal counts only marks the account
        open). Raises :class:`TopUpRefused` with the SERR bits the meter answers:
        dlt645.md §5.3 rules 2 to 5 and prepaid.md §1.6 (overdraft repaid first, hoarding).
        """
        if opening:
            # Stored and command count must each be 0 or 1; equal means "open only" (§5.3 rule 4).
            if self.count not in (0, 1) or count not in (0, 1):
                raise TopUpRefused(SecurityFlags.PURCHASE_COUNT, "account opening needs counts 0 or 1")
            self.customer = customer  # written without checking (prepaid.md §1.6)
            self.opened = True
            if count == self.count:
                return False
        else:
            if not self.opened:
                raise TopUpRefused(SecurityFlags.OTHER, "account not opened")
            if customer != self.customer:
                raise TopUpRefused(SecurityFlags.CUSTOMER_MISMATCH, "customer number mismatch")
        if count == self.count:
            raise TopUpRefused(SecurityFlags.REPEAT_RECHARGE, "repeat recharge (purchase count already applied)")
        if count != self.count + 1:
            raise TopUpRefused(SecurityFlags.PURCHASE_COUNT, f"purchase count {count}, meter expects {self.count + 1}")
        if amount < 0 or amount > 99_999_999:
            raise TopUpRefused(SecurityFlags.OTHER, "amount out of range")
        after = self.balance + amount * FEN
        hoarding = self.limits.hoarding
        if after > 99_999_999 * FEN or (hoarding and after > hoarding * FEN):
            raise TopUpRefused(SecurityFlags.HOARDING_LIMIT, "top-up exceeds the hoarding limit")
        before_fen = self.remaining_fen
        self.balance = after
        self.count = count
        self.cumulative += amount
        record = Purchase(now_ms, count, amount, before_fen, self.remaining_fen, self.cumulative)
        self.purchases.insert(0, record)
        del self.purchases[10:]
        return True
