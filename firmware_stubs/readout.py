"""What a meter answers to a read (0x11): its registers as data-identifier values.

Values are returned as the DI table's Python types (``Decimal``, ``datetime``, status-word
field mappings, records), so the one codec encodes them (``DataItem.encode``). A DI the
meter does not serve raises :class:`NotServed` (the dispatcher answers ERR bit 1, §2.2).
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from protocols.dlt645 import METER_TZ

from .agreed import FREEZE_TYPE, agreed_freezes
from .meter import CostMode, EnergySnapshot, EventClass, Meter, RelayRecord, from_ms
from .relay import RelayState
from .wallet import WalletUnit

_CLOSABLE = frozenset({RelayState.CLOSE_ALLOWED})
"""Open by a close-allowed command, waiting for the button: closing is allowed, no trip is
commanded. (A local pre-trip, which the meter commanded itself, still reads as a trip.)"""


class NotServed(Exception):
    """The meter has no such data (or not in its cost-control mode)."""


def h2(n: int) -> Decimal:
    """Hundredths as an exact Decimal with two places."""
    return Decimal(n).scaleb(-2)


def h4(n: int) -> Decimal:
    """1e-4 units as an exact Decimal with four places."""
    return Decimal(n).scaleb(-4)


def h3(n: int) -> Decimal:
    return Decimal(n).scaleb(-3)


def _local(ms: int):
    return from_ms(ms).astimezone(METER_TZ)


def _energy_block(values: tuple[int, ...] | list[int]) -> list[Decimal]:
    return [h2(v) for v in values]


def _settled(meter: Meter, n: int) -> EnergySnapshot:
    if n == 0:
        return meter.snapshot()
    if n > len(meter.settlements):
        return EnergySnapshot(0, (0,) * 5, (0,) * 5)  # no such settlement yet: zeros, as a new meter
    return meter.settlements[n - 1]


def _energy(meter: Meter, di: int) -> Any:
    di2, di1, di0 = (di >> 16) & 0xFF, (di >> 8) & 0xFF, di & 0xFF
    if di0 > 12:
        raise NotServed
    snap = _settled(meter, di0)
    if di2 == 0x00:  # combined active = forward + reverse (combination word default, §3.2)
        values = [(f + r) % 100_000_000 for f, r in zip(snap.forward, snap.reverse, strict=True)]  # BCD rollover
    elif di2 == 0x01:
        values = list(snap.forward)
    elif di2 == 0x02:
        values = list(snap.reverse)
    elif di2 == 0x03 and di1 == 0 and di0 == 0:
        return h2(meter.reactive)
    else:
        raise NotServed
    if di1 == 0xFF:
        return _energy_block(values)
    if di1 > 4:
        raise NotServed
    return h2(values[di1])


def _record(records: Any, n: int) -> RelayRecord:
    if not 1 <= n <= len(records):
        raise NotServed
    return records[n - 1]


def _relay_record(records: Any, di: int) -> Any:
    di1, di0 = (di >> 8) & 0xFF, di & 0xFF
    rec = _record(records, di0)
    fields = {
        0x01: _local(rec.time_ms),
        0x02: rec.operator,
        0x03: h2(rec.forward),
        0x04: h2(rec.reverse),
    }
    if di1 == 0xFF:
        return {
            "time": fields[1],
            "operator": fields[2],
            "forward_active": fields[3],
            "reverse_active": fields[4],
            "reactive_q1_q4": [h2(0)] * 4,
        }
    if di1 in fields:
        return fields[di1]
    if 0x05 <= di1 <= 0x08:
        return h2(0)
    raise NotServed


PROGRAM_RECORD_DIS = 10
"""DIs a programming record lists (03300001..0A, 50 bytes: di_2007.toml)."""
NO_DI = "FFFFFFFF"
"""Filler of an unused DI slot in a programming record (di_2007.toml)."""


def _program_record(meter: Meter, n: int) -> dict[str, Any]:
    """0330000n: the n-th most recent programming record (dlt645.md §3.7, prepaid.md §1.7).

    The meter model records one DI per programming event, so the record lists that DI and
    fills the other nine slots.
    """
    rec = _record(meter.programs, n)
    dis = [f"{rec.di:08X}"] + [NO_DI] * (PROGRAM_RECORD_DIS - 1)
    return {"time": _local(rec.time_ms), "operator": rec.operator, "data_identifiers": dis}


def _purchase(meter: Meter, di: int) -> Any:
    """0333xxnn (money wallets) or 0332xxnn (energy wallets: amounts in kWh), dlt645.md §3.7;
    prepaid.md §1.2. Neither in remote cost control, which keeps no wallet (§1.1)."""
    if meter.mode is not CostMode.LOCAL:
        raise NotServed
    family = WalletUnit.ENERGY if (di >> 16) & 0xFF == 0x32 else WalletUnit.MONEY
    if meter.wallet.unit is not family:
        raise NotServed
    di1, di0 = (di >> 8) & 0xFF, di & 0xFF
    purchases = meter.wallet.purchases
    if not 1 <= di0 <= 10:
        raise NotServed
    if di0 > len(purchases):
        p = None
    else:
        p = purchases[di0 - 1]
    fields = {
        0x01: _local(p.time_ms) if p else None,
        0x02: p.count if p else 0,
        0x03: h2(p.amount) if p else h2(0),
        0x04: h2(p.before) if p else h2(0),
        0x05: h2(p.after) if p else h2(0),
        0x06: h2(p.cumulative) if p else h2(0),
    }
    if di1 == 0xFF:
        return {
            "time": fields[1],
            "purchase_count": fields[2],
            "amount": fields[3],
            "balance_before": fields[4],
            "balance_after": fields[5],
            "total_purchased": fields[6],
        }
    if di1 in fields:
        return fields[di1]
    raise NotServed


def _freeze(meter: Meter, di: int) -> Any:
    kind, di1, n = (di >> 16) & 0xFF, (di >> 8) & 0xFF, di & 0xFF
    if kind == 0x06:
        freezes = meter.daily
        if freezes is None or not 1 <= n <= len(freezes):
            raise NotServed
        f = freezes[n - 1]
        if di1 == 0x00:
            return _local(f.energy.time_ms)
        if di1 == 0x01:
            return _energy_block(f.energy.forward)
        if di1 == 0x02:
            return _energy_block(f.energy.reverse)
        if di1 == 0x90:
            return {"remaining": h2(f.remaining), "overdraft": h2(f.overdraft), "purchase_count": f.purchase_count}
        if di1 == 0xFF:
            return _whole(f.energy.time_ms, _energy_block(f.energy.forward), _energy_block(f.energy.reverse))
        raise NotServed
    if kind == 0x04:
        hourly = meter.hourly
        if hourly is None or not 1 <= n <= len(hourly):
            raise NotServed
        s = hourly[n - 1]
        if di1 == 0x00:
            return _local(s.time_ms)
        if di1 == 0x01:
            return h2(s.forward[0])
        if di1 == 0x02:
            return h2(s.reverse[0])
        if di1 == 0xFF:
            return _whole(s.time_ms, h2(s.forward[0]), h2(s.reverse[0]))  # the totals only (FW-B)
        raise NotServed
    if kind == 0x01:
        if not 1 <= n <= len(meter.instant):
            raise NotServed
        return _snapshot_group(meter.instant[n - 1], di1)
    if kind in FREEZE_TYPE.values():  # agreed freezes at a time-zone, price or ladder switch (§3.6)
        store = agreed_freezes(meter)
        snap = store.get(kind, n) if store is not None else None
        if snap is None:
            raise NotServed
        return _snapshot_group(snap, di1)
    raise NotServed


def _snapshot_group(s: EnergySnapshot, di1: int) -> Any:
    """DI1 of an energy-only freeze: 00 time, 01 forward block, 02 reverse block (§3.6)."""
    if di1 == 0x00:
        return _local(s.time_ms)
    if di1 == 0x01:
        return _energy_block(s.forward)
    if di1 == 0x02:
        return _energy_block(s.reverse)
    if di1 == 0xFF:
        return _whole(s.time_ms, _energy_block(s.forward), _energy_block(s.reverse))
    raise NotServed


def _whole(time_ms: int, forward: Any, reverse: Any) -> dict[str, Any]:
    """A whole freeze record (DI1 = FF, dlt645.md §3.6): the groups the model freezes. The
    reactive, demand and variable groups are left out, so the table's format sends each as a
    bare AA, as a single-phase FW-B meter does (di_2007.toml)."""
    return {"time": _local(time_ms), "forward_active": forward, "reverse_active": reverse}


def _event_count(kind: EventClass) -> Callable[[Meter], int]:
    """0330ee00: the total count of an event class the model records (dlt645.md §3.7)."""

    def read(m: Meter) -> int:
        log = m.events.get(kind)
        return 0 if log is None else log.count

    return read


def status_word_1(meter: Meter) -> dict[str, bool | int]:
    """Running status word 1 (04000501, FW-B bit map)."""
    return {
        "overdraft": meter.mode is CostMode.LOCAL and meter.wallet.balance < 0,
        "relay_loop_error": meter.relay.malfunction,
        "remote_cost_control": meter.mode is CostMode.REMOTE,
        "active_reverse": meter.power_w < 0,
    }


def status_word_3(meter: Meter) -> dict[str, bool | int]:
    """Running status word 3 (04000503, FW-B bit map, dlt645.md §3.4)."""
    local = meter.mode is CostMode.LOCAL
    meter_type = 0 if not local else (1 if meter.wallet.unit is WalletUnit.ENERGY else 2)
    return {
        "remote_account_not_opened": False,
        "local_account_not_opened": local and not meter.wallet.opened,
        "identity_authenticated": meter.esam.authenticated(meter.local_time()),
        "power_hold": meter.relay.hold,
        "meter_type": meter_type,
        "pre_trip_alarm": meter.relay.alarm,
        # bit 6 is the relay *command* state: 0 = closed or close allowed (the customer may
        # close it), 1 = trip commanded (dlt645.md §3.4).
        "relay_trip_commanded": meter.relay.commanded_open and meter.relay.state not in _CLOSABLE,
        "relay_open": meter.relay.contact_open(),
    }


def _only_local(meter: Meter, unit: WalletUnit) -> None:
    if meter.mode is not CostMode.LOCAL or meter.wallet.unit is not unit:
        raise NotServed  # FW-B serves 00900200 only in local cost control (dlt645.md §3.5)


def _wallet_reader(unit: WalletUnit, overdraft: bool) -> Callable[[Meter], Any]:
    def read(m: Meter) -> Any:
        _only_local(m, unit)
        return h2(m.wallet.overdraft_fen if overdraft else m.wallet.remaining_fen)

    return read


LIMIT_DIS: dict[int, tuple[WalletUnit, str]] = {
    0x04001001: (WalletUnit.MONEY, "alarm_1"),
    0x04001002: (WalletUnit.MONEY, "alarm_2"),
    0x04001003: (WalletUnit.MONEY, "overdraft"),
    0x04001004: (WalletUnit.MONEY, "hoarding"),
    0x04001005: (WalletUnit.MONEY, "close_allowed"),
    0x04000F01: (WalletUnit.ENERGY, "alarm_1"),
    0x04000F02: (WalletUnit.ENERGY, "alarm_2"),
    0x04000F03: (WalletUnit.ENERGY, "hoarding"),
    0x04000F04: (WalletUnit.ENERGY, "overdraft"),
}
"""The wallet-limit DIs (dlt645.md §3.4): the wallet unit they belong to and the
:class:`~.wallet.Limits` field they hold; read here, written by the dispatcher."""


def _limit_reader(unit: WalletUnit, field: str) -> Callable[[Meter], Any]:
    """A wallet limit: 040010xx in yuan for money wallets, 04000F0x in kWh for energy wallets
    ("04000F0x are energy (kWh) limits and 040010xx are money (元) limits", dlt645.md §3.4)."""

    def read(m: Meter) -> Any:
        if m.wallet.unit is not unit:
            raise NotServed
        return h2(getattr(m.wallet.limits, field))

    return read


def _kw(m: Meter) -> Decimal:
    return h4(m.power_w * 10)  # XX.XXXX kW: units of 0.1 W


_SIMPLE: dict[int, Callable[[Meter], Any]] = {
    0x00900200: _wallet_reader(WalletUnit.MONEY, False),
    0x00900201: _wallet_reader(WalletUnit.MONEY, True),
    0x00900100: _wallet_reader(WalletUnit.ENERGY, False),
    0x00900101: _wallet_reader(WalletUnit.ENERGY, True),
    0x02010100: lambda m: Decimal(m.voltage_dv()).scaleb(-1),
    0x0201FF00: lambda m: [Decimal(m.voltage_dv()).scaleb(-1), Decimal("0.0"), Decimal("0.0")],
    0x02020100: lambda m: h3(m.current_ma()),
    0x0202FF00: lambda m: [h3(m.current_ma()), h3(0), h3(0)],
    0x02030000: _kw,
    0x02030100: _kw,
    0x0203FF00: lambda m: [_kw(m), _kw(m), h4(0), h4(0)],
    0x02040000: lambda m: h4(m.reactive_dvar()),  # XX.XXXX kvar (signed): units of 0.1 var
    0x02040100: lambda m: h4(m.reactive_dvar()),
    0x0204FF00: lambda m: [h4(m.reactive_dvar()), h4(m.reactive_dvar()), h4(0), h4(0)],
    0x02050000: lambda m: h4(m.apparent_dva()),  # XX.XXXX kVA
    0x02050100: lambda m: h4(m.apparent_dva()),
    0x0205FF00: lambda m: [h4(m.apparent_dva()), h4(m.apparent_dva()), h4(0), h4(0)],
    0x02060000: lambda m: h3(m.config.power_factor if m.power_w else 1000),
    0x02060100: lambda m: h3(m.config.power_factor if m.power_w else 1000),
    0x02800002: lambda m: Decimal(5000 + (m.now_ms // 10_000 + m.config.seed) % 7 - 3).scaleb(-2),
    0x02800020: lambda m: h4(m.tariff.price_at(m.local_time())),
    0x0280000B: lambda m: h4(m.tariff.price_at(m.local_time())),
    0x04000101: lambda m: m.local_time().date(),
    0x04000102: lambda m: m.local_time().time().replace(microsecond=0),
    0x04000401: lambda m: m.address,
    0x04000402: lambda m: m.meter_number,
    0x0400040E: lambda m: m.wallet.customer,
    0x04000501: status_word_1,
    0x04000503: status_word_3,
    0x04000508: lambda m: m.esam.key_info.hex().upper(),
    **{di: _limit_reader(unit, field) for di, (unit, field) in LIMIT_DIS.items()},
    0x04001401: lambda m: m.trip_delay_min,
    0x04001402: lambda m: h3(m.large_current_ma),
    0x04001403: lambda m: m.large_current_delay_min,
    0x1D000001: lambda m: m.trip_count,
    0x1E000001: lambda m: m.close_count,
    0x03300000: lambda m: m.program_count,
    **{0x03300000 | kind << 8: _event_count(kind) for kind in EventClass},
}


def read_value(meter: Meter, di: int) -> Any:
    """The value of ``di`` on ``meter`` now; raises :class:`NotServed`."""
    simple = _SIMPLE.get(di)
    if simple is not None:
        return simple(meter)
    if meter.tariff.serves(di):
        return meter.tariff.read_di(di)  # an unset switch time is served as None: all zeros
    di3, di2 = di >> 24, (di >> 16) & 0xFF
    if di3 == 0x00 and di2 <= 0x03:
        return _energy(meter, di)
    if di3 == 0x1D and di2 == 0x00:
        return _relay_record(meter.trips, di)
    if di3 == 0x1E and di2 == 0x00:
        return _relay_record(meter.closes, di)
    if di3 == 0x03 and di2 in (0x32, 0x33):
        return _purchase(meter, di)
    if di >> 8 == 0x033000:
        return _program_record(meter, di & 0xFF)  # 03300000 (the count) is served above
    # The other 0330ee records (0330ee01..0A) are not served, though the meter keeps them
    # (Meter.events): dlt645.md §3.7 names them without a layout, so di_2007.toml has them as
    # BYTES, and bytes laid out here would be a layout no reference gives. Their counts are
    # served above for the classes the model records (EventClass); the classes it cannot
    # produce (weekend, settlement-day, cover, key update, abnormal card, refunds 033400nn)
    # are not served at all: the reference does not say what a meter that never had one answers.
    if di3 == 0x05:
        return _freeze(meter, di)
    if di == 0x040005FF:
        return {
            "status_1": status_word_1(meter),
            "status_2": 0,
            "status_3": status_word_3(meter),
            "status_4": 0,
            "status_5": 0,
            "status_6": 0,
            "status_7": 0,
        }
    raise NotServed
