"""Seeded customer load profiles: residential, commercial and PV (prepaid.md §6.1).

Each profile is piecewise constant over 15-minute slots, deterministic under (seed, meter),
with a weekday and a weekend shape. Noise comes from an integer hash of the slot, so a
meter can be asked for any instant in any order and always sees the same load.

Defaults (prepaid.md §6.1, marked [A] there): urban household median 6 kWh/day with a
lognormal spread (sigma_ln 0.6), evening peak 18:00-22:00 at 2-4x the mean, a morning peak
06:30-08:30 and a midday bump; commercial a 09:00-21:00 plateau; PV a clear-sky bell that
exports around noon.
"""

from __future__ import annotations

import math
import random
from enum import StrEnum
from itertools import pairwise

from firmware_stubs.load import constant_energy

SLOT_MS = 15 * 60_000
DAY_MS = 86_400_000
_UTC8_MS = 8 * 3_600_000
_CONSTANT_MS = 31 * DAY_MS
"""How far ahead a constant load reports itself unchanged (no step per 15-minute slot)."""

# Relative demand per hour of day (mean 1.0), weekday and weekend (prepaid.md §6.1 [A]).
_RESIDENTIAL_WEEKDAY = (
    0.35,
    0.3,
    0.28,
    0.28,
    0.3,
    0.45,
    0.9,
    1.35,
    1.1,
    0.7,
    0.65,
    1.0,
    1.25,
    0.9,
    0.7,
    0.7,
    0.8,
    1.2,
    2.2,
    2.6,
    2.5,
    2.1,
    1.4,
    0.72,
)
_RESIDENTIAL_WEEKEND = (
    0.4,
    0.32,
    0.3,
    0.3,
    0.3,
    0.35,
    0.55,
    0.85,
    1.15,
    1.2,
    1.15,
    1.3,
    1.35,
    1.1,
    1.0,
    1.0,
    1.05,
    1.35,
    2.0,
    2.3,
    2.2,
    1.9,
    1.4,
    0.79,
)
_COMMERCIAL_WEEKDAY = (
    0.15,
    0.15,
    0.15,
    0.15,
    0.15,
    0.15,
    0.25,
    0.5,
    1.2,
    1.75,
    1.8,
    1.8,
    1.7,
    1.75,
    1.8,
    1.8,
    1.75,
    1.7,
    1.7,
    1.6,
    1.5,
    0.8,
    0.3,
    0.2,
)
_COMMERCIAL_WEEKEND = tuple(v * 0.6 for v in _COMMERCIAL_WEEKDAY)


class LoadKind(StrEnum):
    """Kinds of customer."""

    RESIDENTIAL = "residential"
    COMMERCIAL = "commercial"
    PV = "pv"
    CONSTANT = "constant"


def _mix(x: int) -> int:
    """splitmix64: a fast, well-spread integer hash.

    Inlined, deliberately, in both loops of :meth:`ProfileLoad._slot_watts` (the catch-up's hot
    loop: a call per 15-minute slot costs more than the hash); a change here must be made there.
    """
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class ProfileLoad:
    """A seeded 15-minute profile; ``watts`` override pins it (the admin 'set load')."""

    __slots__ = ("daily_wh", "kind", "key", "override")

    def __init__(self, kind: LoadKind, seed: int, meter_index: int, daily_kwh: float | None = None) -> None:
        self.kind = kind
        self.key = _mix(seed * 1_000_003 + meter_index)
        rng = random.Random(self.key)
        if daily_kwh is None:
            if kind is LoadKind.RESIDENTIAL:
                daily_kwh = 6.0 * math.exp(rng.gauss(0, 0.6))
            elif kind is LoadKind.COMMERCIAL:
                daily_kwh = rng.uniform(15, 60)
            elif kind is LoadKind.PV:
                daily_kwh = rng.uniform(8, 25)  # generated on a clear day
            else:
                daily_kwh = 6.0
        self.daily_wh = int(daily_kwh * 1000)
        self.override: int | None = None

    def power_at(self, t_ms: int) -> tuple[int, int]:
        """(watts, until_ms) for the 15-minute slot containing ``t_ms``."""
        if self.override is not None:
            return self.override, t_ms + _CONSTANT_MS  # constant until set_load (which advances the meter first)
        if self.kind is LoadKind.CONSTANT:
            return int(self.daily_wh / 24), t_ms + _CONSTANT_MS
        slot = t_ms // SLOT_MS
        return self._slot_watts(slot, 1)[0], (slot + 1) * SLOT_MS

    def energy(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        """(forward, reverse) energy in mJ (W x ms) over [start_ms, end_ms)."""
        return self.energies([start_ms, end_ms])[0]

    def energies(self, bounds: list[int]) -> list[tuple[int, int]]:
        """(forward, reverse) mJ over each [bounds[i], bounds[i + 1]) (``bounds`` increasing): the
        slots' watts times their overlap, summed; exactly what stepping through :meth:`power_at`
        gives, in one pass over the slots (the meter's catch-up)."""
        start, end = bounds[0], bounds[-1]
        if self.override is not None or self.kind is LoadKind.CONSTANT:
            watts = self.override if self.override is not None else int(self.daily_wh / 24)
            return [constant_energy(watts, a, b) for a, b in pairwise(bounds)]
        if end <= start:
            return [(0, 0)] * (len(bounds) - 1)
        first = start // SLOT_MS
        watts = self._slot_watts(first, (end - 1) // SLOT_MS - first + 1)
        out = []
        i = 0
        slot_end = (first + 1) * SLOT_MS
        a = start
        for b in bounds[1:]:
            fwd = rev = 0
            while a < b:
                stop = b if b < slot_end else slot_end
                w = watts[i]
                if w > 0:
                    fwd += w * (stop - a)
                elif w < 0:
                    rev -= w * (stop - a)
                a = stop
                if stop == slot_end:
                    i += 1
                    slot_end += SLOT_MS
            out.append((fwd, rev))
        return out

    def _slot_watts(self, first: int, count: int) -> list[int]:
        """The watts of ``count`` consecutive 15-minute slots from slot number ``first``.

        This is the catch-up's hot loop (96 slots a simulated day): the noise is :func:`_mix`
        inlined (see there) and the hour-of-week shape is one table lookup.
        """
        key = self.key
        mask = 0xFFFFFFFFFFFFFFFF
        out: list[int] = []
        append = out.append
        if self.kind is LoadKind.PV:
            peak_w = self.daily_wh * math.pi / 24  # the bell integrates to daily_wh
            household = _WEEK_SHAPES[LoadKind.RESIDENTIAL]
            for slot in range(first, first + count):
                x = ((key ^ slot) + 0x9E3779B97F4A7C15) & mask
                x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
                x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
                noise = 0.75 + ((x ^ (x >> 31)) % 5000) / 10_000  # 0.75 .. 1.25
                # Household base load minus a clear-sky PV bell from 06:00 to 18:00 (export at
                # noon). The sun at the middle of the slot, the same whichever instant of the slot
                # asks: the power holds for the whole slot (else energy depends on when a meter
                # is observed).
                minute = ((slot * SLOT_MS + SLOT_MS // 2 + _UTC8_MS) % DAY_MS) // 60_000
                sun = max(0.0, math.sin(math.pi * (minute - 360) / 720)) if 360 <= minute <= 1080 else 0.0
                base = 250 * household[(slot + _WEEK_OFFSET) % _WEEK_SLOTS]  # weekday or weekend shape
                append(int(base * noise - peak_w * sun))
            return out
        mean_w = self.daily_wh / 24
        week = _WEEK_SHAPES[self.kind]
        for slot in range(first, first + count):
            x = ((key ^ slot) + 0x9E3779B97F4A7C15) & mask
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
            noise = 0.75 + ((x ^ (x >> 31)) % 5000) / 10_000  # 0.75 .. 1.25
            append(int(mean_w * week[(slot + _WEEK_OFFSET) % _WEEK_SLOTS] * noise))
        return out


_WEEK_SLOTS = 7 * 96
_WEEK_OFFSET = _UTC8_MS // SLOT_MS + 3 * 96
"""Slot number + this, modulo a week of slots, counts slots from Monday 00:00 (UTC+8): slot 0
(1970-01-01 00:00 UTC) is Thursday 08:00 in METER_TZ, and Thursday is weekday 3."""


def _week(weekday: tuple[float, ...], weekend: tuple[float, ...]) -> tuple[float, ...]:
    """The hourly shape of each 15-minute slot of a week, from Monday 00:00."""
    return tuple((weekend if day >= 5 else weekday)[q // 4] for day in range(7) for q in range(96))


_WEEK_SHAPES = {
    LoadKind.RESIDENTIAL: _week(_RESIDENTIAL_WEEKDAY, _RESIDENTIAL_WEEKEND),
    LoadKind.COMMERCIAL: _week(_COMMERCIAL_WEEKDAY, _COMMERCIAL_WEEKEND),
    LoadKind.CONSTANT: (1.0,) * _WEEK_SLOTS,
}


def make_load(
    kind: str | LoadKind, seed: int, meter_index: int, daily_kwh: float | None = None, watts: int | None = None
) -> ProfileLoad:
    """A profile by name; ``watts`` pins a constant load (the admin 'set load' can lift the pin).

    For kind 'constant', ``watts`` is also the profile itself, so lifting the pin keeps it.
    """
    kind = LoadKind(kind)
    if kind is LoadKind.CONSTANT and watts is not None:
        daily_kwh = watts * 24 / 1000
    load = ProfileLoad(kind, seed, meter_index, daily_kwh)
    if watts is not None:
        load.override = watts
    return load
