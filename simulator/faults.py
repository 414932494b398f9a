"""Faults a test can inject into a simulated meter or a whole bus, in a scenario or at run time.

Link faults change what goes on the wire and are applied by the bus; meter faults change
the meter itself and are applied by the fleet to the firmware model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum


class Fault(StrEnum):
    """Kinds of fault."""

    # link faults (simulator/bus.py)
    NO_REPLY = "no_reply"
    """The meter stays silent."""
    LATE_REPLY = "late_reply"
    """The reply comes after Td max (default 500 ms) plus ``delay_ms``."""
    BAD_CHECKSUM = "bad_checksum"
    """The reply's checksum byte is wrong."""
    TRUNCATED = "truncated"
    """The reply stops before its end."""
    BYTE_GAPS = "byte_gaps"
    """The reply is sent in pieces with silent gaps of ``gap_ms`` between them."""
    WRONG_ADDRESS = "wrong_address"
    """The reply carries another meter's address (a mixed-up meter)."""
    # meter faults (simulator/fleet.py -> firmware_stubs)
    RELAY_MALFUNCTION = "relay_malfunction"
    """The relay does not move when commanded; the status word shows the loop error."""
    CLOCK_JUMP = "clock_jump"
    """The meter clock jumps by ``seconds``."""
    ROLLOVER = "rollover"
    """The energy registers are moved to just below their BCD rollover (999999.99), the total and
    the current tariff's register by the same amount, so the total stays the sum of T1..T4
    (``headroom_hundredths`` below full scale; ``registers``: forward by default)."""
    LOST_TOPUP = "lost_topup"
    """The next accepted top-up is acknowledged but not applied (a count gap follows)."""


ROLLOVER_REGISTERS = ("forward", "reverse", "reactive")
"""Registers a ROLLOVER fault can move: active forward (total and tariffs), active reverse
(total and tariffs), combined reactive 1 (a total only)."""

LINK_FAULTS = frozenset(
    {Fault.NO_REPLY, Fault.LATE_REPLY, Fault.BAD_CHECKSUM, Fault.TRUNCATED, Fault.BYTE_GAPS, Fault.WRONG_ADDRESS}
)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One injected fault: its kind, parameters, and how many more times it fires (None = always)."""

    kind: Fault
    remaining: int | None = None
    delay_ms: int = 700
    gap_ms: int = 600
    seconds: int = 0
    probability: float = 1.0
    function: int | None = None
    """Link faults: fire only on replies to this function code (e.g. 0x03: a lost recharge reply)."""
    headroom_hundredths: int | None = None
    """ROLLOVER: how far below full scale (999999.99) the registers are set, in 0.01 kWh (kvarh):
    0 sets 999999.99, which the next 0.01 rolls over to 0. None: ``seconds``, the spelling the
    scenario format and the admin interface accept for it."""
    registers: tuple[str, ...] = ("forward",)
    """ROLLOVER: which registers move, from :data:`ROLLOVER_REGISTERS`."""

    def __post_init__(self) -> None:
        unknown = [r for r in self.registers if r not in ROLLOVER_REGISTERS]
        if unknown or not self.registers:
            raise ValueError(f"rollover registers must be among {', '.join(ROLLOVER_REGISTERS)}, not {unknown}")

    @property
    def headroom(self) -> int:
        """ROLLOVER: the distance below full scale in hundredths (``headroom_hundredths``, else ``seconds``)."""
        return self.seconds if self.headroom_hundredths is None else self.headroom_hundredths


@dataclass
class FaultSet:
    """The faults active on one meter or one bus."""

    active: dict[Fault, FaultSpec] = field(default_factory=dict)

    def add(self, spec: FaultSpec) -> None:
        """Activate (or replace) a fault."""
        self.active[spec.kind] = spec

    def clear(self, kind: Fault | None = None) -> None:
        """Remove one fault, or all."""
        if kind is None:
            self.active.clear()
        else:
            self.active.pop(kind, None)

    def get(self, kind: Fault) -> FaultSpec | None:
        """The active spec of ``kind``, or None."""
        return self.active.get(kind)

    def fire(self, kind: Fault, roll: float = 0.0, function: int | None = None) -> FaultSpec | None:
        """The spec if ``kind`` fires now (``roll`` in [0, 1) against its probability); counts it down.

        A spec limited to one function code fires only for a reply to that function.
        """
        spec = self.active.get(kind)
        if spec is None or roll >= spec.probability:
            return None
        if spec.function is not None and function is not None and function != spec.function:
            return None
        if spec.remaining is not None:
            if spec.remaining <= 1:
                del self.active[kind]
            else:
                self.active[kind] = replace(spec, remaining=spec.remaining - 1)
        return spec

    def __bool__(self) -> bool:
        return bool(self.active)
