"""What the meter sees of its customer's load: piecewise-constant power over time.

The simulator supplies seeded load profiles; the meter asks for the power at an instant and
how long it stays constant, and (a fast path for catching up) for the energy over an interval.
Positive watts are consumption, negative watts export (PV).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Protocol

CONSTANT_MS = 31 * 86_400_000
"""How far ahead a constant load says it is unchanged: catching up an idle meter then costs no
step per hour of load (a changed load takes effect when the meter is next advanced)."""


class LoadSource(Protocol):
    """Power drawn through the meter.

    A load may also have ``energy(start_ms, end_ms) -> (forward_mj, reverse_mj)`` and
    ``energies(bounds) -> [(forward_mj, reverse_mj), ...]`` (one pair per consecutive range):
    exactly what :func:`energy_between` sums from :meth:`power_at`, only faster (the meter
    catches up with them).
    """

    def power_at(self, t_ms: int) -> tuple[int, int]:
        """(watts, until_ms): the power from ``t_ms`` and the instant it may next change."""
        ...


def energy_between(load: LoadSource, start_ms: int, end_ms: int) -> tuple[int, int]:
    """(forward, reverse) energy in mJ (W x ms) over [start_ms, end_ms), summed over ``load``'s
    pieces: its own ``energy`` method if it has one (a fast path), else :meth:`LoadSource.power_at`.
    """
    bulk = getattr(load, "energy", None)
    if bulk is not None:
        return bulk(start_ms, end_ms)
    fwd = rev = 0
    a = start_ms
    while a < end_ms:
        watts, until = load.power_at(a)
        b = min(end_ms, max(until, a + 1))
        if watts > 0:
            fwd += watts * (b - a)
        elif watts < 0:
            rev -= watts * (b - a)
        a = b
    return fwd, rev


def energies_between(load: LoadSource, bounds: list[int]) -> list[tuple[int, int]]:
    """(forward, reverse) mJ over each [bounds[i], bounds[i + 1]): the load's own ``energies``
    method if it has one (one pass over its pieces), else :func:`energy_between` per range."""
    bulk = getattr(load, "energies", None)
    if bulk is not None:
        return bulk(bounds)
    return [energy_between(load, a, b) for a, b in pairwise(bounds)]


def constant_energy(watts: int, start_ms: int, end_ms: int) -> tuple[int, int]:
    """(forward, reverse) energy in mJ of a constant ``watts`` over [start_ms, end_ms)."""
    e = watts * (end_ms - start_ms)
    return (e, 0) if e >= 0 else (0, -e)


class ConstantLoad:
    """A constant power, changeable at run time (the admin interface's 'set load')."""

    __slots__ = ("watts",)

    def __init__(self, watts: int = 0) -> None:
        self.watts = watts

    def power_at(self, t_ms: int) -> tuple[int, int]:
        return self.watts, t_ms + CONSTANT_MS

    def energy(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        return constant_energy(self.watts, start_ms, end_ms)


class OverrideLoad:
    """A load whose power a test pins to a value, on top of another load."""

    __slots__ = ("base", "watts")

    def __init__(self, base: LoadSource, watts: int | None = None) -> None:
        self.base = base
        self.watts = watts

    def power_at(self, t_ms: int) -> tuple[int, int]:
        if self.watts is None:
            return self.base.power_at(t_ms)
        return self.watts, t_ms + CONSTANT_MS

    def energy(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        if self.watts is None:
            return energy_between(self.base, start_ms, end_ms)
        return constant_energy(self.watts, start_ms, end_ms)
