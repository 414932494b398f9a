"""Virtual time for a simulated fleet: real speed, accelerated, or stepped by hand.

The simulator reads the time only here; firmware state machines receive it as an argument.
"""

from __future__ import annotations

import time as _time
from datetime import UTC, datetime, timedelta


class VirtualClock:
    """A clock that runs ``speed`` times real time from ``start``, and can be advanced.

    ``speed=0`` freezes it: time moves only by :meth:`advance` (deterministic tests and CI).
    """

    def __init__(self, start: datetime | None = None, speed: float = 1.0, monotonic: object = None) -> None:
        if start is None:
            start = datetime.now(UTC).replace(microsecond=0)
        if start.tzinfo is None:
            raise ValueError("the start time must be timezone-aware")
        if speed < 0:
            raise ValueError("speed must be >= 0")
        self._mono = monotonic if callable(monotonic) else _time.monotonic
        self._base = start
        self._base_mono = self._mono()
        self._speed = speed

    @property
    def speed(self) -> float:
        """Simulated seconds per real second (0 = stepped by hand)."""
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if value < 0:
            raise ValueError("speed must be >= 0")
        self._rebase()
        self._speed = value

    def now(self) -> datetime:
        """The current simulated time (timezone-aware, UTC)."""
        elapsed = (self._mono() - self._base_mono) * self._speed
        return self._base + timedelta(seconds=elapsed)

    def advance(self, delta: timedelta) -> datetime:
        """Jump forward by ``delta``; returns the new time."""
        if delta < timedelta(0):
            raise ValueError("virtual time never runs backwards")
        self._rebase()
        self._base += delta
        return self._base

    def real_seconds(self, simulated: timedelta) -> float:
        """Real seconds that ``simulated`` time takes at the current speed (inf when stepped)."""
        if self._speed == 0:
            return float("inf")
        return simulated.total_seconds() / self._speed

    def _rebase(self) -> None:
        now_mono = self._mono()
        self._base += timedelta(seconds=(now_mono - self._base_mono) * self._speed)
        self._base_mono = now_mono
