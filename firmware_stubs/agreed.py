"""Agreed freezes (约定冻结): the energy registers frozen at each scheduled tariff switch.

A meter freezes its registers when a backup set becomes current (prepaid.md §1.3: "each switch
produces an agreed freeze"). They are read as frozen data ``05 DI2 DI1 nn`` (dlt645.md §3.6)
with DI2 = the freeze type: 02 time-zone-table switch, 05 rate-price switch, 07 ladder switch;
nn = 1 (most recent) .. 2 (FW-B's capacity for switch freezes; SY03A also keeps 2 per switch
type, prepaid.md §1.3, §1.7). The daily-period-table switch (03) is not modelled: the
simulator's TOU switch (04000106, or 04000107: one switch) swaps time zones and day tables
together as one time-zone switch.

Kept apart from the meter's other freeze lists (and created only at a meter's first switch,
so that a fleet of meters that never switch pays nothing for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .tariff import SWITCH_PRICES, SWITCH_STEPS, SWITCH_TOU

if TYPE_CHECKING:
    from .meter import EnergySnapshot

CAPACITY = 2
"""Records kept per switch type (dlt645.md §3.6: switch freezes 1..2)."""

FREEZE_TYPE = {SWITCH_TOU: 0x02, SWITCH_PRICES: 0x05, SWITCH_STEPS: 0x07}
"""DI2 of the frozen-data DIs of each switch kind (dlt645.md §3.6)."""

_ATTRIBUTE = "agreed_freezes"


class AgreedFreezes:
    """The last :data:`CAPACITY` agreed freezes of each switch type, newest first."""

    __slots__ = ("_records",)

    def __init__(self) -> None:
        self._records: dict[int, list[EnergySnapshot]] = {}

    def record(self, kind: str, snapshot: EnergySnapshot) -> None:
        """Freeze ``snapshot`` for a switch of ``kind`` (``"tou"``, ``"prices"``, ``"steps"``)."""
        log = self._records.setdefault(FREEZE_TYPE[kind], [])
        log.insert(0, snapshot)
        del log[CAPACITY:]

    def get(self, freeze_type: int, n: int) -> EnergySnapshot | None:
        """The ``n``-th most recent freeze (1-based) of ``freeze_type`` (DI2), or None."""
        log = self._records.get(freeze_type, [])
        return log[n - 1] if 1 <= n <= len(log) else None


def agreed_freezes(meter: object) -> AgreedFreezes | None:
    """The agreed freezes of ``meter``, or None before its first switch."""
    return getattr(meter, _ATTRIBUTE, None)


def record_agreed_freeze(meter: object, kind: str, snapshot: EnergySnapshot) -> None:
    """Store the agreed freeze of a ``kind`` switch on ``meter`` (called by Meter._after_step)."""
    store = agreed_freezes(meter)
    if store is None:
        store = AgreedFreezes()
        setattr(meter, _ATTRIBUTE, store)
    store.record(kind, snapshot)
