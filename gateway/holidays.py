"""The default holiday calendar of the safety policy: no trips on these days (prepaid.md §5.2).

Chinese public holidays, with the adjusted days off around them, for 2026 and 2027. These dates
are **not** from the reference (prepaid.md §5.2 found no Chinese rule with numbers, and
suggests "a calendar of blocked days (Spring Festival, gaokao…) [A]"). 2026 follows the State
Council's published schedule as we know it; 2027 is our own estimate from the festival dates
(New Year, Spring Festival from its eve, Qingming, Labour Day, Dragon Boat, Mid-Autumn, National
Day), with generous windows: an extra blocked day only delays a trip, a missing one could cut a
family off on a holiday. Check them against the State Council notice for the year, and add a
utility's own days with ``[policy] holidays``; ``[policy] calendar = "none"`` drops these.
"""

from __future__ import annotations

from datetime import date, timedelta


def _span(first: date, days: int) -> set[date]:
    return {first + timedelta(days=i) for i in range(days)}


CN_PUBLIC_HOLIDAYS: frozenset[date] = frozenset(
    # 2026
    _span(date(2026, 1, 1), 3)  # New Year
    | _span(date(2026, 2, 15), 9)  # Spring Festival (17 February), from its eve
    | _span(date(2026, 4, 4), 3)  # Qingming
    | _span(date(2026, 5, 1), 5)  # Labour Day
    | _span(date(2026, 6, 19), 3)  # Dragon Boat
    | _span(date(2026, 9, 25), 3)  # Mid-Autumn
    | _span(date(2026, 10, 1), 7)  # National Day
    # 2027 (estimated, see the module docs)
    | _span(date(2027, 1, 1), 3)  # New Year
    | _span(date(2027, 2, 5), 9)  # Spring Festival (6 February), from its eve
    | _span(date(2027, 4, 3), 3)  # Qingming (5 April)
    | _span(date(2027, 5, 1), 5)  # Labour Day
    | _span(date(2027, 6, 9), 1)  # Dragon Boat
    | _span(date(2027, 9, 15), 1)  # Mid-Autumn
    | _span(date(2027, 10, 1), 7)  # National Day
)
"""Days with no trips by default (a gateway configured with ``[policy] calendar = "cn"``)."""

CALENDARS: dict[str, frozenset[date]] = {"cn": CN_PUBLIC_HOLIDAYS, "none": frozenset()}

__all__ = ["CALENDARS", "CN_PUBLIC_HOLIDAYS"]
