"""Compact freeze storage: fixed-size packed records in a bounded ring (dlt645.md §3.6).

A meter keeps up to 62 daily and 254 hourly freezes (FW-B capacities, §3.6) and 12 monthly
settlements. As Python objects (a frozen dataclass holding two 5-tuples of ints) that is about
110 KB per meter after 70 days; packed with :mod:`struct` into one ``bytearray`` per log it is
about 8.3 KB. Records are decoded on read, so the readout sees the same values.

Indexing is newest first, like the DI numbering: ``ring[0]`` is freeze 1 (the most recent).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EnergySnapshot:
    """Forward and reverse active registers (total, T1..T4) at one instant, in hundredths.

    ``time_ms`` is the meter's own clock (epoch ms of its reading), as the meter stamps it.

    An hourly freeze holds the totals only (05040100 / 05040200), so its tuples have one entry.
    """

    time_ms: int
    forward: tuple[int, ...]
    reverse: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DailyFreeze:
    """A daily freeze (05060xnn) with the prepaid snapshot (050690nn)."""

    energy: EnergySnapshot
    remaining: int
    overdraft: int
    purchase_count: int


class PackedRing(Generic[T]):
    """At most ``capacity`` records of one fixed-size :class:`struct.Struct` layout, newest first.

    The buffer grows record by record until it holds ``capacity`` records (a fresh meter's
    rings share the empty ``bytes``), then the oldest record is overwritten in place.
    """

    __slots__ = ("_buf", "_n")

    capacity: ClassVar[int]
    layout: ClassVar[struct.Struct]

    def __init__(self) -> None:
        self._buf: bytearray | bytes = b""  # the shared empty bytes until the first push
        self._n = 0  # records ever pushed

    def _pack(self, item: T) -> tuple[int, ...]:
        raise NotImplementedError

    def _unpack(self, fields: tuple[int, ...]) -> T:
        raise NotImplementedError

    def push(self, item: T) -> None:
        """Add ``item`` as the newest record (the oldest drops out once the ring is full)."""
        self._push_fields(*self._pack(item))

    def _push_fields(self, *fields: int) -> None:
        """Add the newest record from its packed ``fields`` (the layout's order)."""
        cap = self.capacity
        n = self._n
        if n < cap:
            if n == 0:
                self._buf = bytearray()
            self._buf += self.layout.pack(*fields)
            if n + 1 == cap:
                self._buf = bytearray(self._buf)  # drop the growth slack once full
        else:
            buf = self._buf
            assert isinstance(buf, bytearray)
            self.layout.pack_into(buf, (n % cap) * self.layout.size, *fields)
        self._n = n + 1

    def __len__(self) -> int:
        return min(self._n, self.capacity)

    def __getitem__(self, i: int) -> T:
        count = len(self)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(i)
        slot = (self._n - 1 - i) % self.capacity
        return self._unpack(self.layout.unpack_from(self._buf, slot * self.layout.size))

    def __iter__(self) -> Iterator[T]:
        for i in range(len(self)):
            yield self[i]

    def __bool__(self) -> bool:
        return self._n > 0

    def nbytes(self) -> int:
        """Bytes held by the packed records (the buffer's length)."""
        return len(self._buf)


# Registers are XXXXXX.XX hundredths (< 1e8 < 2**32); times are epoch milliseconds (int64);
# money in fen (int64, signed); purchase counts are 4-byte BCD on the wire (uint32).


class SnapshotRing(PackedRing[EnergySnapshot]):
    """Full energy snapshots (time, forward and reverse total + T1..T4): settlements."""

    __slots__ = ()
    capacity = 12
    layout = struct.Struct("<q10I")

    def _pack(self, item: EnergySnapshot) -> tuple[int, ...]:
        return (item.time_ms, *item.forward, *item.reverse)

    def _unpack(self, fields: tuple[int, ...]) -> EnergySnapshot:
        return EnergySnapshot(fields[0], fields[1:6], fields[6:11])


class HourlyRing(PackedRing[EnergySnapshot]):
    """Hourly freezes 1..254: time, forward total, reverse total (dlt645.md §3.6, 0504xxxx)."""

    __slots__ = ()
    capacity = 254
    layout = struct.Struct("<qII")

    def _pack(self, item: EnergySnapshot) -> tuple[int, ...]:
        return (item.time_ms, item.forward[0], item.reverse[0])

    def push_totals(self, time_ms: int, forward: int, reverse: int) -> None:
        """:meth:`push` of ``EnergySnapshot(time_ms, (forward,), (reverse,))``, without building it."""
        self._push_fields(time_ms, forward, reverse)

    def _unpack(self, fields: tuple[int, ...]) -> EnergySnapshot:
        return EnergySnapshot(fields[0], (fields[1],), (fields[2],))


class DailyRing(PackedRing[DailyFreeze]):
    """Daily freezes 1..62 with the prepaid snapshot (dlt645.md §3.6, 0506xxxx)."""

    __slots__ = ()
    capacity = 62
    layout = struct.Struct("<q10IqqI")

    def _pack(self, item: DailyFreeze) -> tuple[int, ...]:
        e = item.energy
        return (e.time_ms, *e.forward, *e.reverse, item.remaining, item.overdraft, item.purchase_count)

    def _unpack(self, fields: tuple[int, ...]) -> DailyFreeze:
        return DailyFreeze(EnergySnapshot(fields[0], fields[1:6], fields[6:11]), fields[11], fields[12], fields[13])
