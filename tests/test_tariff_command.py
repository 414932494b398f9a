"""Tariff commands: backup prices, step tables and TOU schedules with switch times, verified by read-back."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.service import CommandService, InvalidCommand, MeterEntry
from protocols.dlt645 import METER_TZ
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

START = datetime(2026, 11, 24, 10, 0, tzinfo=METER_TZ)
A = "000000000001"
STEPS = {
    "thresholds": ["2400.00", "4000.00", "0", "0", "0", "0"],
    "prices": ["0", "0.0500", "0.3000", "0", "0", "0", "0"],
    "settlement_dates": [{"month": 1, "day": 1, "hour": 0}],
}


TOU = {
    "zones": [
        {"month": 1, "day": 1, "table": 1},
        {"month": 6, "day": 1, "table": 2},
        {"month": 9, "day": 1, "table": 1},
    ],
    "day_tables": [
        [
            {"hour": 0, "minute": 0, "tariff": 4},
            {"hour": 8, "minute": 0, "tariff": 2},
            {"hour": 22, "minute": 0, "tariff": 3},
        ],
        [
            {"hour": 0, "minute": 0, "tariff": 4},
            {"hour": 12, "minute": 30, "tariff": 1},
            {"hour": 14, "minute": 0, "tariff": 2},
        ],
    ],
}
"""Winter: valley, peak from 08:00, flat from 22:00; summer (June..August): sharp 12:30-14:00."""


@pytest.fixture
async def rig(tmp_path):
    clock = VirtualClock(START, 0)
    fleet = Fleet([BusSpec("bus0", [MeterSpec(A)])], clock, seed=3)
    link = await Link(SimLineTransport(fleet.buses["bus0"]), LinkConfig(td_max_s=0.05, margin_s=0.05)).start()
    store = await Store.sqlite(tmp_path / "l.sqlite").open()
    service = await CommandService(store, {A: MeterEntry(A, "bus0")}, {"bus0": link}, now=clock.now).start()
    yield clock, fleet, store, service
    await service.stop()
    await link.stop()
    await store.close()


async def test_prices_and_steps_reach_the_meter_and_switch_in(rig):
    clock, fleet, store, service = rig
    switch = (START + timedelta(hours=2)).isoformat()
    cmd, _ = await service.submit(
        "t1",
        "tariff",
        A,
        {
            "prices": ["0.6000", "0.5500", "0.5000", "0.3000"],
            "switch_at": switch,
            "steps": STEPS,
            "steps_switch_at": switch,
        },
        "tariff-team",
    )
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED, await store.events(command_id=cmd.id)
    assert final.result["steps"]["thresholds"][:2] == ["2400.00", "4000.00"]
    tariff = fleet.meter(A).meter.tariff
    assert tariff.backup_steps.thresholds[:2] == (240000, 400000)
    clock.advance(timedelta(hours=3))  # past the switch time: the backup sets become current
    fleet.meter(A).meter.advance(clock.now())
    assert tariff.steps.thresholds[:2] == (240000, 400000)
    assert tariff.prices.prices[:4] == (6000, 5500, 5000, 3000)


async def test_steps_only(rig):
    _, fleet, store, service = rig
    cmd, _ = await service.submit("t2", "tariff", A, {"steps": STEPS}, "tariff-team")
    await service.drain()
    assert (await store.get(cmd.id)).state is State.CONFIRMED
    assert fleet.meter(A).meter.tariff.backup_steps.increments[1] == 500


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"steps": {"thresholds": ["1"] * 5, "prices": ["0"] * 7}},
        {"steps": {"thresholds": ["3000", "2000", "0", "0", "0", "0"], "prices": ["0"] * 7}},
        {"steps": {"thresholds": ["0", "2000", "0", "0", "0", "0"], "prices": ["0"] * 7}},
        {"steps": {**STEPS, "settlement_dates": [{"month": 13, "day": 1, "hour": 0}]}},
        {"steps": STEPS, "steps_switch_at": "2026-12-01T00:00"},
        {"prices": ["0.5"], "colour": "red"},
        {"prices": ["0.5"], "switch_at": (START - timedelta(minutes=1)).isoformat()},  # in the past
        {"steps": STEPS, "switch_at": "2001-01-01T00:00+08:00"},
        {"prices": ["0.5"], "steps": STEPS, "steps_switch_at": (START - timedelta(days=1)).isoformat()},
    ],
)
async def test_bad_tariffs_are_refused_before_anything_is_recorded(rig, params):
    _, _, store, service = rig
    with pytest.raises(InvalidCommand):
        await service.submit("bad", "tariff", A, params, "tariff-team")
    assert await store.commands() == []


def test_step_prices_are_exact_decimals():
    from gateway.service import _steps

    table = _steps(STEPS)
    assert table["prices"][1] == "0.0500" and Decimal(table["thresholds"][0]) == Decimal("2400.00")


def _payloads(events):
    """The decoded 2007 payloads of every frame the events carry, in order."""
    from protocols.dlt645.frame import decode_frame
    from protocols.dlt645.payloads import parse_payload

    out = []
    for e in events:
        for hexframe in e.frames:
            frame = decode_frame(bytes.fromhex(hexframe))
            out.append((frame, parse_payload(frame)))
    return out


async def test_every_frame_of_a_tariff_update_is_in_its_audit_trail(rig):
    _, _, store, service = rig
    cmd, _ = await service.submit("t-audit", "tariff", A, {"prices": ["0.6000", "0.5000"]}, "tariff-team")
    await service.drain()
    assert (await store.get(cmd.id)).state is State.CONFIRMED
    payloads = _payloads(await store.events(command_id=cmd.id))
    requests = [(f.control.function, getattr(p, "di", None)) for f, p in payloads if not f.control.response]
    # identity authentication (0x03), the two writes with MAC (0x14), the two read-backs (0x11)
    assert (0x03, None) in [(fn, None) for fn, _ in requests if fn == 0x03]
    assert [di for fn, di in requests if fn == 0x14] == [0x040502FF, 0x04000108]
    assert [di for fn, di in requests if fn == 0x11] == [0x040502FF, 0x04000108]
    assert sum(f.control.response for f, _ in payloads) == len(requests)  # every reply is there too


async def test_topup_audit_has_the_count_read_the_recharge_and_the_read_back(rig):
    _, _, store, service = rig
    cmd, _ = await service.submit("top-audit", "topup", A, {"amount": "20.00"}, "counter")
    await service.drain()
    assert (await store.get(cmd.id)).state is State.CONFIRMED
    events = await store.events(command_id=cmd.id)
    sent, confirmed = events[1], events[-1]
    before = [(f.control.function, getattr(p, "di", None)) for f, p in _payloads([sent]) if not f.control.response]
    # the balance (a plain read: a silent meter fails fast), authentication, the ESAM's purchase count
    assert before == [(0x11, 0x00900200), (0x03, 0x070000FF), (0x03, 0x078102FF)]
    later = [(f.control.function, getattr(p, "di", None)) for f, p in _payloads([confirmed]) if not f.control.response]
    # the recharge in the same session, then the read-back: purchase count and balance
    assert later == [(0x03, 0x070102FF), (0x03, 0x078102FF), (0x11, 0x00900200)]


async def test_class_2_parameters_go_as_ciphertext_class_1_with_a_mac(rig):
    _, fleet, store, service = rig
    params = {
        "alarm_1": "30.00",
        "alarm_2": "10.00",
        "overdraft": "5.00",
        "hoarding": "2000.00",
        "close_allowed": "1.00",
    }
    cmd, _ = await service.submit("p", "params", A, params, "ops")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED, await store.events(command_id=cmd.id)
    limits = fleet.meter(A).meter.wallet.limits
    assert (limits.alarm_1, limits.alarm_2, limits.overdraft, limits.hoarding, limits.close_allowed) == (
        3000,
        1000,
        500,
        200000,
        100,
    )
    writes = {
        p.di: p.password.level
        for f, p in _payloads(await store.events(command_id=cmd.id))
        if not f.control.response and f.control.function == 0x14
    }
    assert writes == {0x04001001: 0x99, 0x04001002: 0x99, 0x04001003: 0x98, 0x04001004: 0x98, 0x04001005: 0x98}


async def test_set_current_switches_the_prices_in_at_once(rig):
    clock, fleet, store, service = rig

    async def tick() -> None:  # the meter's clock runs (the rig's virtual clock stands still)
        while True:
            await asyncio.sleep(0.1)
            clock.advance(timedelta(seconds=1))

    ticker = asyncio.create_task(tick())
    try:
        cmd, _ = await service.submit("now", "tariff", A, {"prices": ["0.7000", "0.4000"], "set": "current"}, "ops")
        await service.drain()
    finally:
        ticker.cancel()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED, await store.events(command_id=cmd.id)
    assert final.result["prices"][:2] == ["0.7000", "0.4000"]
    assert fleet.meter(A).meter.tariff.prices.prices[:2] == (7000, 4000)


async def test_a_read_back_that_differs_fails_the_tariff_command(rig, monkeypatch):
    from gateway.client import MeterClient

    _, _, store, service = rig
    real_read = MeterClient.read

    async def lying_read(self, di):
        reading = await real_read(self, di)
        if di == 0x040502FF:
            return type(reading)(**{**{s: getattr(reading, s) for s in reading.__slots__}, "value": [Decimal("9")]})
        return reading

    monkeypatch.setattr(MeterClient, "read", lying_read)
    cmd, _ = await service.submit("differs", "tariff", A, {"prices": ["0.6000"]}, "ops")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.FAILED
    assert (await store.events(command_id=cmd.id))[-1].detail["reason"] == "read-back differs"


# --- TOU schedules (time zones and day tables: 04020000 / 04020001.., switch 04000106/07) ----------


def _zones(meter_tariff):
    return [(m, d, t) for m, d, t in meter_tariff.zones]


async def test_a_tou_schedule_reaches_the_meter_and_switches_in(rig):
    clock, fleet, store, service = rig
    switch = START + timedelta(hours=2)
    cmd, _ = await service.submit("tou1", "tariff", A, {"tou": TOU, "tou_switch_at": switch.isoformat()}, "tariff-team")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED, await store.events(command_id=cmd.id)
    assert final.result["tou"] == TOU and final.result["tou_switch_at"] == switch.isoformat()
    tariff = fleet.meter(A).meter.tariff
    assert _zones(tariff.backup_tou) == [(1, 1, 1), (6, 1, 2), (9, 1, 1)]
    assert tariff.backup_tou.day_tables[1] == ((0, 0, 4), (12, 30, 1), (14, 0, 2))
    assert tariff.pending_switches["tou"] == switch
    assert tariff.tou != tariff.backup_tou  # not yet
    clock.advance(timedelta(hours=3))  # past the switch time: the schedule becomes current
    fleet.meter(A).meter.advance(clock.now())
    assert tariff.tou == tariff.backup_tou
    assert tariff.tariff_at(datetime(2027, 7, 1, 13, 0, tzinfo=METER_TZ)) == 1  # summer: sharp at 13:00
    assert tariff.tariff_at(datetime(2027, 1, 5, 13, 0, tzinfo=METER_TZ)) == 2  # winter: peak
    assert tariff.tariff_at(datetime(2027, 1, 5, 23, 0, tzinfo=METER_TZ)) == 3


async def test_a_tou_schedule_goes_as_class_2_day_tables_first_then_both_switch_times(rig):
    _, _, store, service = rig
    cmd, _ = await service.submit("tou-audit", "tariff", A, {"tou": TOU}, "tariff-team")
    await service.drain()
    assert (await store.get(cmd.id)).state is State.CONFIRMED
    payloads = _payloads(await store.events(command_id=cmd.id))
    writes = [(p.di, p.password.level) for f, p in payloads if not f.control.response and f.control.function == 0x14]
    assert writes == [
        (0x04020001, 0x98),
        (0x04020002, 0x98),
        (0x04020000, 0x98),
        (0x04000106, 0x98),
        (0x04000107, 0x98),
    ]
    reads = [p.di for f, p in payloads if not f.control.response and f.control.function == 0x11]
    assert reads == [0x04020001, 0x04020002, 0x04020000, 0x04000106, 0x04000107]


async def test_set_current_switches_a_tou_schedule_in_at_once(rig):
    clock, fleet, store, service = rig

    async def tick() -> None:  # the meter's clock runs (the rig's virtual clock stands still)
        while True:
            await asyncio.sleep(0.1)
            clock.advance(timedelta(seconds=1))

    ticker = asyncio.create_task(tick())
    try:
        cmd, _ = await service.submit("tou-now", "tariff", A, {"tou": TOU, "set": "current"}, "ops")
        await service.drain()
    finally:
        ticker.cancel()
    final = await store.get(cmd.id)
    assert final.state is State.CONFIRMED, await store.events(command_id=cmd.id)
    assert final.result["tou"] == TOU
    reads = [p.di for f, p in _payloads(await store.events(command_id=cmd.id)) if f.control.function == 0x11]
    assert 0x04010000 in reads and 0x04020000 not in reads  # verified on the running (first) set
    assert _zones(fleet.meter(A).meter.tariff.tou) == [(1, 1, 1), (6, 1, 2), (9, 1, 1)]


def _tou(**change):
    return {**TOU, **change}


def _period(h, m, t):
    return {"hour": h, "minute": m, "tariff": t}


def _zone(m, d, t):
    return {"month": m, "day": d, "table": t}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tou": {"zones": TOU["zones"]}}, "zones and day_tables"),
        ({"tou": {**TOU, "holidays": []}}, "zones and day_tables"),
        ({"tou": _tou(zones=[])}, "1..14 entries"),
        ({"tou": _tou(zones=[_zone(1, d, 1) for d in range(1, 16)])}, "1..14 entries"),
        ({"tou": _tou(day_tables=[])}, "1..8 day tables"),
        ({"tou": _tou(day_tables=[[_period(0, 0, 1)]] * 9)}, "1..8 day tables"),
        ({"tou": _tou(day_tables=[[_period(h, 0, 1) for h in range(15)], [_period(0, 0, 1)]])}, "1..14 entries"),
        ({"tou": _tou(day_tables=[[_period(0, 0, 5)], [_period(0, 0, 1)]])}, "tariff must be an integer 1..4"),
        ({"tou": _tou(day_tables=[[_period(0, 0, 0)], [_period(0, 0, 1)]])}, "tariff must be an integer 1..4"),
        ({"tou": _tou(day_tables=[[_period(24, 0, 1)], [_period(0, 0, 1)]])}, "hour must be an integer 0..23"),
        ({"tou": _tou(day_tables=[[_period(0, 60, 1)], [_period(0, 0, 1)]])}, "minute must be an integer 0..59"),
        ({"tou": _tou(day_tables=[[_period(0, True, 1)], [_period(0, 0, 1)]])}, "minute must be an integer"),
        ({"tou": _tou(day_tables=[[_period(0, 0, "1")], [_period(0, 0, 1)]])}, "tariff must be an integer"),
        ({"tou": _tou(day_tables=[[_period(8, 0, 1), _period(0, 0, 2)], [_period(0, 0, 1)]])}, "ascending time"),
        ({"tou": _tou(day_tables=[[_period(8, 0, 1), _period(8, 0, 2)], [_period(0, 0, 1)]])}, "ascending time"),
        ({"tou": _tou(day_tables=[[_period(8, 0, 1), _period(8, 10, 2)], [_period(0, 0, 1)]])}, "lasts 10 min"),
        ({"tou": _tou(day_tables=[[_period(0, 5, 1), _period(23, 55, 2)], [_period(0, 0, 1)]])}, "lasts 10 min"),
        ({"tou": _tou(day_tables=[[{"hour": 0, "minute": 0}], [_period(0, 0, 1)]])}, "exactly hour, minute, tariff"),
        ({"tou": _tou(zones=[_zone(6, 1, 1), _zone(1, 1, 2)])}, "ascending date"),
        ({"tou": _tou(zones=[_zone(1, 1, 1), _zone(1, 1, 2)])}, "ascending date"),
        ({"tou": _tou(zones=[_zone(2, 30, 1)])}, "02-30 is not a date"),
        ({"tou": _tou(zones=[_zone(13, 1, 1)])}, "month must be an integer 1..12"),
        ({"tou": _tou(zones=[_zone(1, 1, 3)])}, "table must be an integer 1..2"),
        ({"tou": _tou(zones=[[1, 1, 1]])}, "exactly month, day, table"),
        ({"tou": TOU, "tou_switch_at": "2026-12-01T00:00"}, "time zone"),
        ({"tou": TOU, "tou_switch_at": "soon"}, "ISO 8601"),
        ({"tou": TOU, "tou_switch_at": "2026-12-01T00:00+08:00", "set": "current"}, "applies at once"),
        ({"prices": ["0.5"], "tou_switch_at": "2026-12-01T00:00+08:00"}, "tou schedule, which is not given"),
    ],
)
async def test_bad_tou_schedules_are_refused_before_anything_is_recorded(rig, params, message):
    _, fleet, store, service = rig
    with pytest.raises(InvalidCommand, match=message):
        await service.submit("bad-tou", "tariff", A, params, "tariff-team")
    assert await store.commands() == []
    assert fleet.meter(A).meter.esam.authenticated(START) is False  # nothing went to the meter


def test_a_valid_tou_schedule_is_normalised_and_accepts_29_february():
    from gateway.service import _tou

    tou = _tou({"day_tables": [[_period(0, 0, 3)]], "zones": [_zone(2, 29, 1)]})
    assert tou == {"zones": [_zone(2, 29, 1)], "day_tables": [[_period(0, 0, 3)]]}
    assert list(tou) == ["zones", "day_tables"]
    assert _tou({"zones": [_zone(1, 1, 1)], "day_tables": [[_period(0, 0, 1), _period(23, 45, 2)]]})


@pytest.mark.parametrize("lie_about", [0x04020000, 0x04020002, 0x04000107])
async def test_a_tou_read_back_that_differs_fails_the_tariff_command(rig, monkeypatch, lie_about):
    from gateway.client import MeterClient

    _, _, store, service = rig
    real_read = MeterClient.read

    async def lying_read(self, di):
        reading = await real_read(self, di)
        if di == lie_about:
            value = reading.value
            if isinstance(value, list):
                value = value[:-1]  # one entry short
            else:
                value = value + timedelta(minutes=1)
            return type(reading)(**{**{s: getattr(reading, s) for s in reading.__slots__}, "value": value})
        return reading

    monkeypatch.setattr(MeterClient, "read", lying_read)
    cmd, _ = await service.submit("tou-differs", "tariff", A, {"tou": TOU}, "ops")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.FAILED
    assert (await store.events(command_id=cmd.id))[-1].detail["reason"] == "read-back differs"


async def test_a_tou_schedule_the_meter_refuses_is_refused(rig, monkeypatch):
    """A meter with fewer tariffs answers ERR bit 6 (dlt645.md §2.2): the command ends refused."""
    import firmware_stubs.tariff as fw

    _, _, store, service = rig
    monkeypatch.setattr(fw, "MAX_TARIFFS", 2)
    cmd, _ = await service.submit("tou-refused", "tariff", A, {"tou": TOU}, "ops")
    await service.drain()
    final = await store.get(cmd.id)
    assert final.state is State.REFUSED, await store.events(command_id=cmd.id)


# --- meterlink tariff --tou / --tou-switch-at (gateway/cli/service.py) ---------------------------------


def test_the_tariff_cli_sends_a_tou_schedule(monkeypatch):
    import json

    from click.testing import CliRunner

    from gateway.cli import service as cli_service

    sent = []
    monkeypatch.setattr(cli_service, "submit_and_wait", lambda base, key, body, wait, as_json: sent.append(body))
    args = [A, "--api-key", "k", "--tou", json.dumps(TOU), "--tou-switch-at", "2027-01-01T00:00+08:00"]
    result = CliRunner().invoke(cli_service.tariff, args)
    assert result.exit_code == 0, result.output
    assert sent == [{"kind": "tariff", "address": A, "params": {"tou": TOU, "tou_switch_at": "2027-01-01T00:00+08:00"}}]
    now = CliRunner().invoke(cli_service.tariff, [A, "--api-key", "k", "--tou", json.dumps(TOU), "--current"])
    assert now.exit_code == 0 and sent[-1]["params"] == {"tou": TOU, "set": "current"}
    bad = CliRunner().invoke(cli_service.tariff, [A, "--api-key", "k", "--tou", "{oops"])
    assert bad.exit_code != 0 and "not JSON" in bad.output
    alone = CliRunner().invoke(cli_service.tariff, [A, "--api-key", "k", "--tou-switch-at", "2027-01-01T00:00+08:00"])
    assert alone.exit_code != 0 and "--tou-switch-at needs --tou" in alone.output
    assert len(sent) == 2


async def test_one_switch_at_is_the_switch_time_of_every_table_given(rig):
    """``switch_at`` with prices and steps switches both then (not the steps in a minute)."""
    clock, fleet, store, service = rig
    switch = START + timedelta(days=3)
    cmd, _ = await service.submit(
        "t-both", "tariff", A, {"prices": ["0.6000"], "steps": STEPS, "switch_at": switch.isoformat()}, "tariff-team"
    )
    assert cmd.params["steps_switch_at"] == cmd.params["switch_at"] == switch.isoformat()
    await service.drain()
    assert (await store.get(cmd.id)).state is State.CONFIRMED
    clock.advance(timedelta(hours=2))
    fleet.meter(A).meter.advance(clock.now())
    tariff = fleet.meter(A).meter.tariff
    assert tariff.steps.thresholds[:2] != (240000, 400000)  # not switched in after a minute
    clock.advance(timedelta(days=3))
    fleet.meter(A).meter.advance(clock.now())
    assert tariff.steps.thresholds[:2] == (240000, 400000)
    assert tariff.prices.prices[0] == 6000
