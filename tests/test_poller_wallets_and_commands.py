"""The meter poller (gateway/poller.py): energy wallets, relay changes after a relay command of unknown
outcome, reads through the meter client, and waiting for a line's commands without polling the ledger.

Simulated meters on an in-memory line (tests/test_meter_poller.py's bench), a real SQLite ledger,
virtual time; the MQTT test runs against the real Mosquitto on 127.0.0.1:1883 (own topic prefix).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from test_gateway_mqtt_northbound import HAVE_BROKER, Probe, new_prefix
from test_meter_poller import M1, M2, M6, SHOP_LIMITS, SLOW_LINE, bench, shop

import gateway.poller as poller_module
from firmware_stubs.wallet import Limits, WalletUnit
from gateway import api, service
from gateway.api import ObservationOut
from gateway.config import ConfigError, build
from gateway.ledger import State
from gateway.link import Priority
from gateway.northbound_mqtt import MqttNorthbound
from gateway.poller import ENERGY_THRESHOLD_DIS, THRESHOLD_DIS, PollConfig, hundredths, observation_view
from gateway.service import ServiceConfig
from simulator.faults import Fault, FaultSpec
from simulator.fleet import MeterSpec

RELAY_CONTROL = 0x1C
ENERGY_LIMITS = Limits(alarm_1=500, alarm_2=200, overdraft=100, hoarding=10_000, close_allowed=0)
"""Alarm 1 at 5.00 kWh, alarm 2 at 2.00 kWh, 1.00 kWh of overdraft; a hoarding limit (04000F03) far from
the overdraft limit (04000F04), so reading the wrong one shows."""
ONE_TRY = ServiceConfig(retry_delay=timedelta(seconds=1), poll_s=0.01, max_attempts=1)
"""A command whose reply is lost after it was sent ends unknown at once."""


def energy_meter(**extra: Any) -> MeterSpec:
    """An energy-type meter with 9.00 kWh drawing 2 kW: 2.00 kWh an hour."""
    return MeterSpec(
        M1,
        balance=Decimal("9.00"),
        load="constant",
        watts=2000,
        wallet_unit=WalletUnit.ENERGY,
        limits=ENERGY_LIMITS,
        **extra,
    )


# --- 1. a relay change after a relay command of unknown outcome --------------------------------------------


async def _unknown_trip(b: Any) -> str:
    """A trip the meter executes whose replies are all lost: the command ends unknown."""
    await b.poller.poll_once()  # the baseline: closed
    b.fleet.meter(M1).inject(FaultSpec(Fault.NO_REPLY, function=RELAY_CONTROL), b.clock.now())
    command, _ = await b.service.submit("trip-lost", "relay", M1, {"action": "trip"}, "ops")
    await b.service.drain()
    done = await b.store.get(command.id)
    assert done is not None and done.state is State.UNKNOWN
    assert b.truth(M1)["relay"] == "open"  # it did take effect; nobody has said so
    b.fleet.meter(M1).clear(Fault.NO_REPLY, b.clock.now())
    return command.id


async def test_a_relay_change_after_a_relay_command_of_unknown_outcome_is_a_meter_event(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2)], config=ONE_TRY) as b:
        unknown_id = await _unknown_trip(b)
        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once()
        assert b.names() == ["relay:open"]
        event = b.events[0].payload
        assert (event["source"], event["address"], event["previous_relay"]) == ("meter", M1, "closed")
        assert event["unknown_command_id"] == unknown_id and event["command_id"] is None
        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once()
        assert b.names() == ["relay:open"]  # reported once


async def test_a_relay_change_a_confirmed_command_made_is_still_not_a_meter_event(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1)], config=ONE_TRY) as b:
        await b.poller.poll_once()
        command, _ = await b.service.submit("trip-ok", "relay", M1, {"action": "trip"}, "ops")
        await b.service.drain()
        assert (await b.store.get(command.id)).state is State.CONFIRMED  # type: ignore[union-attr]
        b.clock.advance(timedelta(minutes=15))
        await b.poller.poll_once()
        assert b.events == [] and (await b.store.observation(M1)).state["relay"] == "open"  # type: ignore[union-attr]


@pytest.mark.skipif(not HAVE_BROKER, reason="no MQTT broker listening on 127.0.0.1:1883")
async def test_mqtt_publishes_the_relay_change_after_an_unknown_relay_command_once(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2)], config=ONE_TRY) as b:
        prefix = new_prefix()
        probe = await Probe(1883, prefix).start()
        nb = MqttNorthbound(b.service, "127.0.0.1", 1883, prefix, backoff_initial=0.05, backoff_max=0.3)
        nb.watch(b.poller)
        try:
            await nb.start()
            await nb.wait_connected(5)
            unknown_id = await _unknown_trip(b)
            (alarm,) = await probe.until(lambda: probe.on("events/alarms"), what="the unknown alarm")
            assert (alarm["alarm"], alarm["command_id"], alarm["severity"]) == ("unknown", unknown_id, "critical")
            b.clock.advance(timedelta(minutes=15))
            await b.poller.poll_once()
            (relay,) = await probe.until(lambda: probe.on("events/relay"), what="the relay change")
            assert (relay["source"], relay["relay"], relay["unknown_command_id"]) == ("meter", "open", unknown_id)
            await asyncio.sleep(0.2)
            assert len(probe.on("events/relay")) == 1
        finally:
            await nb.aclose()
            with contextlib.suppress(Exception):
                await probe.client.publish(f"{prefix}/status", b"", qos=1, retain=True, timeout=2)  # type: ignore[union-attr]
            await probe.aclose()


# --- 2. reads through MeterClient; waiting for commands -----------------------------------------------------


async def test_poll_reads_go_through_the_meter_client_at_poll_priority_with_the_profiles_baud(tmp_path: Path):
    async with bench(tmp_path, [shop()], poll=PollConfig(interval_s=0, retries=0)) as b:
        calls: list[dict[str, Any]] = []
        transact = b.link.transact

        async def spy(address: str, payload: Any, **kw: Any) -> Any:
            calls.append(kw)
            return await transact(address, payload, **kw)

        b.link.transact = spy  # type: ignore[method-assign]
        await b.poller.poll_once()
        entry = b.service.meters[M1]
        assert len(calls) == 6  # status word, remaining money, overdraft, three thresholds
        assert all(
            (c["priority"], c["baud"], c["retries"], c["preamble"])
            == (Priority.POLL, entry.profile.baud, 0, entry.profile.request_preamble)
            for c in calls
        ), calls
        assert entry.profile.baud == 2400


async def test_a_read_waiting_for_a_busy_line_asks_the_ledger_about_twice_a_second(tmp_path: Path):
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M2)]) as b:
        await b.poller.poll_once()
        loop = asyncio.get_running_loop()
        busy_until = loop.time() + 1.5
        asked: list[float] = []

        async def line_busy(addresses: list[str], now: Any) -> bool:
            asked.append(loop.time())
            return loop.time() < busy_until  # another gateway's command holds a meter of the line

        b.store.line_busy = line_busy  # type: ignore[method-assign]
        began = time.monotonic()
        seen = await b.poller.poll_meter(b.service.meters[M1])
        assert seen is not None and time.monotonic() - began >= 1.4  # it waited for the line
        assert b.poller.stats.yielded >= 1
        # 1.5 s of waiting at one look every 0.5 s, then one look per read: not one every 20 ms (~75).
        assert len(asked) <= 6, len(asked)


async def test_a_waiting_read_goes_as_soon_as_the_lines_command_ends(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(poller_module, "YIELD_RECHECK_S", 20.0)  # only the command's state change can wake it
    async with bench(tmp_path, [MeterSpec(M1), MeterSpec(M6)], timing=SLOW_LINE) as b:
        await b.poller.poll_once()
        b.clock.advance(timedelta(minutes=15))
        command, _ = await b.service.submit("pay-6", "topup", M6, {"amount": "20.00"}, "counter")
        while not await b.store.line_busy([M1, M6], b.clock.now()):
            await asyncio.sleep(0.002)
        began = time.monotonic()
        seen = await asyncio.wait_for(b.poller.poll_meter(b.service.meters[M1]), 10)
        assert time.monotonic() - began < 5.0
        assert seen is not None and b.poller.stats.yielded == 1
        assert (await b.store.get(command.id)).state is State.CONFIRMED  # type: ignore[union-attr]


# --- 3. energy wallets -------------------------------------------------------------------------------------


async def test_an_energy_wallet_meter_is_read_in_kwh_and_reports_the_ladder_in_kwh(tmp_path: Path):
    async with bench(tmp_path, [energy_meter(), MeterSpec(M2)]) as b:
        calls: list[int] = []
        transact = b.link.transact

        async def spy(address: str, payload: Any, **kw: Any) -> Any:
            if address == M1:
                calls.append(payload.di)
            return await transact(address, payload, **kw)

        b.link.transact = spy  # type: ignore[method-assign]
        baseline = (await b.poller.poll_once())[M1]
        assert calls == [0x04000503, 0x00900100, 0x00900101, 0x04000F01, 0x04000F02, 0x04000F04]
        assert baseline is not None and b.events == []
        s = baseline.state
        assert (s["wallet"], s["remaining_ckwh"], s["overdraft_ckwh"], s["level"]) == ("energy", 900, 0, "normal")
        assert s["thresholds_ckwh"] == {"alarm_1": 500, "alarm_2": 200, "overdraft": 100}
        assert "remaining_fen" not in s

        for _ in range(2):  # 9.00 - 2 h x 2 kW = 5.00 kWh: alarm 1
            b.clock.advance(timedelta(hours=1))
            await b.poller.poll_once()
        assert b.truth(M1)["remaining_energy_kwh"] == "5.00"
        alarms = [e.payload for e in b.events if e.topic == "alarms"]
        assert [a["alarm"] for a in alarms] == ["balance_alarm_1"]
        first = alarms[0]
        assert (first["wallet"], first["unit"], first["remaining_energy"], first["threshold"]) == (
            "energy",
            "kWh",
            "5.00",
            "5.00",
        )
        assert first["remaining_money"] is None and first["overdraft"] is None and first["level"] == "alarm_1"
        assert "5.00 kWh" in first["reason"] and "energy" in first["reason"]

        for _ in range(4):  # 2 kWh an hour: through alarm 2, zero, and the 1.00 kWh overdraft limit
            b.clock.advance(timedelta(hours=1))
            await b.poller.poll_once()
            if b.truth(M1)["relay"] != "closed":
                b.fleet.press_button(M1)  # the customer restores supply after each pre-trip (prepaid.md §1.4)
        assert (b.truth(M1)["remaining_energy_kwh"], b.truth(M1)["overdraft_energy_kwh"]) == ("0.00", "1.00")
        alarms = [e.payload for e in b.events if e.topic == "alarms"]
        assert [a["alarm"] for a in alarms] == ["balance_alarm_1", "balance_alarm_2", "balance_zero", "overdraft"]
        assert [a["threshold"] for a in alarms] == ["5.00", "2.00", "0.00", "-1.00"]
        assert all(a["unit"] == "kWh" for a in alarms) and "kWh" in alarms[-1]["reason"]
        relays = [e.payload for e in b.events if e.topic == "relay"]
        assert relays and relays[-1]["relay"] == "open" and relays[-1]["unit"] == "kWh"
        assert relays[-1]["remaining_energy"] is not None and relays[-1]["remaining_money"] is None
        assert not [e for e in b.events if e.address == M2]

        view = ObservationOut.of(await b.store.observation(M1)).model_dump()  # type: ignore[arg-type]
        assert (view["wallet"], view["unit"], view["remaining_money"], view["level"]) == (
            "energy",
            "kWh",
            None,
            "overdraft",
        )
        assert Decimal(view["remaining_energy"]) - Decimal(view["overdraft_energy"]) <= Decimal("-1.00")


async def test_a_money_meter_view_says_yuan_and_a_remote_one_no_wallet(tmp_path: Path):
    from firmware_stubs.meter import CostMode

    async with bench(tmp_path, [shop(), MeterSpec(M2, mode=CostMode.REMOTE)]) as b:
        seen = await b.poller.poll_once()
        money, remote = observation_view(seen[M1]), observation_view(seen[M2])  # type: ignore[arg-type]
        assert (money["wallet"], money["unit"], money["remaining_money"], money["remaining_energy"]) == (
            "money",
            "yuan",
            "9.00",
            None,
        )
        assert (remote["wallet"], remote["unit"], remote["remaining_money"], remote["level"]) == (
            None,
            None,
            None,
            None,
        )
        assert seen[M1].state["thresholds_fen"] == {  # type: ignore[union-attr]
            "alarm_1": SHOP_LIMITS.alarm_1,
            "alarm_2": SHOP_LIMITS.alarm_2,
            "overdraft": SHOP_LIMITS.overdraft,
        }


async def test_an_energy_meter_configured_as_money_is_logged_with_the_fix(tmp_path: Path, caplog):
    async with bench(tmp_path, [energy_meter()], wallets={M1: "money"}) as b:
        with caplog.at_level(logging.WARNING, logger="gateway.poller"):
            await b.poller.poll_once()
            b.clock.advance(timedelta(minutes=15))
            await b.poller.poll_once()
        warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.poller"]
        assert len(warnings) == 1, warnings  # once, not every poll
        assert "00900200" in warnings[0] and 'wallet = "energy"' in warnings[0]


def test_the_wallet_key_of_a_meter_in_the_configuration():
    bus = [{"name": "b", "url": "tcp://127.0.0.1:7000", "meters": {"from": 1, "to": 2}}]
    assert build({"bus": bus}).meters["000000000001"].wallet == "money"
    cfg = build({"bus": bus, "meter": [{"address": "000000000002", "wallet": "energy"}]})
    assert (cfg.meters["000000000001"].wallet, cfg.meters["000000000002"].wallet) == ("money", "energy")
    with pytest.raises(ConfigError, match="money or energy"):
        build({"bus": bus, "meter": [{"address": "000000000002", "wallet": "kwh"}]})
    with pytest.raises(ConfigError, match="keeps no wallet"):
        build({"bus": bus, "meter": [{"address": "000000000002", "mode": "remote", "wallet": "energy"}]})


# --- 4. one copy each --------------------------------------------------------------------------------------


def test_amounts_and_threshold_registers_have_one_definition():
    assert api._yuan is hundredths
    assert [hundredths(n) for n in (None, 0, 5, -100, 12345)] == [None, "0.00", "0.05", "-1.00", "123.45"]
    assert THRESHOLD_DIS == {k: service.PARAM_DIS[k] for k in ("alarm_1", "alarm_2", "overdraft")}
    assert ENERGY_THRESHOLD_DIS == {"alarm_1": 0x04000F01, "alarm_2": 0x04000F02, "overdraft": 0x04000F04}


async def test_an_energy_wallet_is_topped_up_in_kwh_exactly_once(tmp_path: Path):
    """prepaid.md §1.8: an energy-type meter holds kWh; its top-up says kWh (energy_kwh), goes in
    0.01 kWh through the same MAC'd recharge and purchase count, and is read back from 00900100.
    A yuan amount for it (or kWh for a money meter) is refused before anything is recorded."""
    async with bench(tmp_path, [energy_meter(), MeterSpec(M2)]) as b:
        before = b.truth(M1)
        with pytest.raises(service.InvalidCommand, match="energy wallet: give energy_kwh"):
            await b.service.submit("e-bad", "topup", M1, {"amount": "10.00"}, "ops")
        with pytest.raises(service.InvalidCommand, match="money wallet: give amount"):
            await b.service.submit("m-bad", "topup", M2, {"energy_kwh": "10.00"}, "ops")
        assert await b.store.commands() == []
        command, _ = await b.service.submit("e-1", "topup", M1, {"energy_kwh": "25.50"}, "ops")
        assert command.params == {"energy_hundredths": 2550, "opening": False}
        await b.service.drain()
        done = await b.store.get(command.id)
        assert done.state is State.CONFIRMED, await b.store.events(command_id=command.id)
        after = b.truth(M1)
        assert after["purchase_count"] == before["purchase_count"] + 1
        added = Decimal(after["remaining_energy_kwh"]) - Decimal(before["remaining_energy_kwh"])
        assert added == Decimal("25.50")  # no time passed: nothing was drawn meanwhile
        assert done.result["unit"] == "kWh" and done.result["amount"] == "25.50"
        assert Decimal(done.result["balance_after"]) == Decimal(after["remaining_energy_kwh"])
        # A request without a key, repeated: the same command, applied once.
        auto, created = await b.service.submit(None, "topup", M1, {"energy_kwh": "1.00"}, "ops")
        same, created_again = await b.service.submit(None, "topup", M1, {"energy_kwh": "1.00"}, "ops")
        assert created and not created_again and same.id == auto.id
        await b.service.drain()
        assert (await b.store.get(auto.id)).state is State.CONFIRMED
        assert b.truth(M1)["purchase_count"] == after["purchase_count"] + 1
        assert api._params_view(done)["energy_kwh"] == "25.50"


async def test_a_1997_meter_is_polled_for_its_energy_and_reported_when_silent(tmp_path: Path):
    """dlt645.md §7.3: no status word 3, no prepaid registers; the poller reads 9010, and a 1997
    meter that stops answering is ``meter_silent`` like any other (then ``meter_back``)."""
    import dataclasses

    from protocols.dlt645.profile import PROFILES
    from simulator.faults import Fault, FaultSpec

    old = MeterSpec(M1, profile="dlt645-1997")
    async with bench(tmp_path, [old, MeterSpec(M2)]) as b:
        b.service.meters[M1] = dataclasses.replace(b.service.meters[M1], profile=PROFILES["dlt645-1997"])
        b.poller._lines = None
        assert M1 in {e.address for e in b.poller.lines()["bus0"]}
        first = (await b.poller.poll_once())[M1]
        assert first is not None and first.answering
        assert Decimal(first.state["energy_kwh"]) == Decimal(b.truth(M1)["energy_kwh"])
        assert "relay" not in first.state
        b.fleet.inject(M1, FaultSpec(Fault.NO_REPLY))
        for _ in range(5):
            await b.poller.poll_once([M1])
        alarms = [e.payload["alarm"] for e in b.events if e.address == M1 and e.topic == "alarms"]
        assert alarms == ["meter_silent"]
        b.fleet.clear_faults(M1)
        await b.poller.poll_once([M1])
        alarms = [e.payload["alarm"] for e in b.events if e.address == M1 and e.topic == "alarms"]
        assert alarms == ["meter_silent", "meter_back"]
        assert not [e for e in b.events if e.topic == "relay"]  # no relay state: no relay events
