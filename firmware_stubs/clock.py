"""The meter's own clock: an offset and a drift against true time, and the time-set rules.

Broadcast time sync (0x08) is applied only if the correction is within 5 minutes, at most
once a (meter-local) day, and not within 5 minutes of midnight or of the settlement instant
(dlt645.md §2.1 0x08; prepaid.md §4.1, SY03A).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from protocols.dlt645 import METER_TZ

MINUTE_MS = 60_000
DAY_MS = 86_400_000
GUARD_MS = 5 * MINUTE_MS
"""The broadcast time-sync window: corrections up to 5 min, none within 5 min of midnight or settlement."""
_UTC8_MS = 8 * 3_600_000  # METER_TZ, no daylight saving
_EPOCH = datetime(1970, 1, 1, 8, tzinfo=METER_TZ)  # the Unix epoch, as a METER_TZ datetime


class MeterClock:
    """meter time = true time + offset + drift x (true time - reference)."""

    __slots__ = ("drift_ppm", "last_broadcast_day", "offset_ms", "ref_ms", "version")

    def __init__(self, ref_ms: int, offset_ms: int = 0, drift_ppm: float = 0.0) -> None:
        self.ref_ms = ref_ms
        self.offset_ms = offset_ms
        self.drift_ppm = drift_ppm
        self.last_broadcast_day: int | None = None
        self.version = 0
        """Counts settings of the clock (the meter reschedules its freezes and tariff boundaries)."""

    def meter_ms(self, true_ms: int) -> int:
        """The meter's reading (epoch ms) at ``true_ms``."""
        if self.drift_ppm:
            return true_ms + self.offset_ms + int((true_ms - self.ref_ms) * self.drift_ppm / 1e6)
        return true_ms + self.offset_ms

    def true_ms(self, meter_ms: int) -> int:
        """The first true instant at which the meter reads ``meter_ms`` (or just past it, with drift).

        With drift the reading moves in uneven whole milliseconds, so the estimate is corrected
        until ``meter_ms(result) >= meter_ms > meter_ms(result - 1)``: a timer set for a meter
        reading is then never due before the meter shows it (a step loop would stall there).
        """
        if not self.drift_ppm:
            return meter_ms - self.offset_ms
        t = self.ref_ms + int((meter_ms - self.offset_ms - self.ref_ms) / (1 + self.drift_ppm / 1e6))
        while self.meter_ms(t) < meter_ms:
            t += 1
        while self.meter_ms(t - 1) >= meter_ms:
            t -= 1
        return t

    def local(self, true_ms: int) -> datetime:
        """The meter's reading at ``true_ms`` as an aware datetime in METER_TZ."""
        return _EPOCH + timedelta(milliseconds=self.meter_ms(true_ms))

    def error_ms(self, true_ms: int) -> int:
        """How far the meter is ahead of true time (negative: behind)."""
        return self.meter_ms(true_ms) - true_ms

    def set(self, meter_ms: int, true_ms: int) -> None:
        """Set the clock so that it reads ``meter_ms`` at ``true_ms`` (drift continues from there)."""
        self.ref_ms = true_ms
        self.offset_ms = meter_ms - true_ms
        self.version += 1

    def jump(self, seconds: int, true_ms: int) -> None:
        """Fault injection: the clock jumps by ``seconds``."""
        self.set(self.meter_ms(true_ms) + seconds * 1000, true_ms)

    def broadcast_sync(self, new_meter_ms: int, true_ms: int, guards_ms: Iterable[int] = ()) -> bool:
        """Apply a broadcast time if the rules allow it; returns whether it was applied.

        The rules (dlt645.md §2.1 0x08; prepaid.md §4.1, SY03A): the correction is at most 5
        minutes; at most one broadcast correction per meter-local day; none while the meter's
        clock is less than 5 minutes from its midnight or from any instant of ``guards_ms``
        (meter-clock epoch ms: the settlement instants, which the meter passes in).
        """
        current = self.meter_ms(true_ms)
        if abs(new_meter_ms - current) > GUARD_MS:
            return False
        local = current + _UTC8_MS
        day = local // DAY_MS
        if self.last_broadcast_day == day:
            return False
        into_day = local % DAY_MS
        if min(into_day, DAY_MS - into_day) < GUARD_MS:
            return False  # near midnight
        if any(abs(current - g) < GUARD_MS for g in guards_ms):
            return False  # near a settlement instant
        self.set(new_meter_ms, true_ms)
        self.last_broadcast_day = day
        return True
