"""Two gateways on one PostgreSQL schema and one MQTT broker: every command message reaches both,
and each command runs once.

Both gateways (``gateway.app.Gateway``, as ``meterlink gateway`` runs it, each with its own owner
name) subscribe to the same ``<prefix>/commands`` on the machine's Mosquitto and share one
ledger schema; the meters are a ``meterlink sim`` subprocess whose TCP lines accept both. A
head end publishes each top-up once. What must hold: one gateway answers ``accepted``, the other
``duplicate`` with the same command; the final result is ``confirmed``; the simulator's ground
truth shows every top-up applied exactly once (tests/crashkit.py :func:`verify_topups`).

Needs PostgreSQL and the broker (CI has both); own schema and own topic prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiomqtt
import pytest
from crashkit import PG_DSN, Ledger, Sim, postgres_available, simulator, verify_topups

from gateway.app import Gateway
from gateway.config import build


def _broker() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 1883), timeout=0.5):
            return None
    except OSError:
        return "no MQTT broker listening on 127.0.0.1:1883"


_WHY_NOT = postgres_available() or _broker()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")

METERS = 8
TOPUPS = 24


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    with simulator(METERS, 2, seed=11) as s:
        yield s


def config(sim: Sim, schema: str, prefix: str) -> Any:
    buses = {}
    for address, bus in sim.buses.items():
        buses.setdefault(bus, []).append(address)
    return build(
        {
            "store": {"postgres": PG_DSN, "schema": schema},
            "mqtt": {"url": f"mqtt://127.0.0.1:1883/{prefix}"},
            "policy": {"quiet_start": "00:00", "quiet_end": "00:00", "weekend_quiet": False},
            "service": {"retry_delay_s": 0.5, "lease_s": 5},
            "bus": [
                {
                    "name": bus,
                    "url": f"tcp://127.0.0.1:{sim.ports[bus]}",
                    "meters": addresses,
                    "gap_ms": 0,
                    "td_max_ms": 500,
                }
                for bus, addresses in sorted(buses.items())
            ],
        }
    )


async def test_two_gateways_on_one_broker_run_each_command_once(sim: Sim) -> None:
    schema = f"test_two_gw_mqtt_{uuid.uuid4().hex[:12]}"
    prefix = f"meterlink-2gw-test/{uuid.uuid4().hex[:12]}"
    ledger = Ledger(dsn=PG_DSN, schema=schema)
    before = sim.states()
    gateways: list[Gateway] = []
    try:
        cfg = config(sim, schema, prefix)
        cfg.api_listen = None
        for _ in range(2):
            gateways.append(await Gateway(cfg).start())
        results: dict[str, list[dict[str, Any]]] = {}
        async with aiomqtt.Client("127.0.0.1", 1883, identifier=f"head-{uuid.uuid4().hex[:8]}") as head:
            await head.subscribe(f"{prefix}/results/#", qos=1)
            await asyncio.sleep(0.3)  # both gateways subscribed (they subscribe during start)
            addresses = sorted(sim.buses)
            sent = []
            for i in range(TOPUPS):
                cid = f"c-{i}"
                body = {
                    "correlation_id": cid,
                    "kind": "topup",
                    "address": addresses[i % len(addresses)],
                    "params": {"amount": f"{1 + i}.00"},
                    "actor": "cashier-7",
                }
                await head.publish(f"{prefix}/commands", json.dumps(body), qos=1)
                sent.append(cid)

            def final(cid: str) -> bool:
                return any(r["status"] in ("confirmed", "failed", "refused", "unknown") for r in results.get(cid, []))

            deadline = time.monotonic() + 60
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    async for message in head.messages:
                        answer = json.loads(message.payload)
                        results.setdefault(answer["correlation_id"], []).append(answer)
                        if all(final(c) for c in sent) and all(len(results[c]) >= 3 for c in sent):
                            break
            assert time.monotonic() < deadline, "no final result for every command"
        for cid in sent:
            statuses = Counter(r["status"] for r in results[cid])
            # one gateway recorded it, the other found the same key; one command either way
            assert statuses["accepted"] == 1 and statuses["duplicate"] == 1, (cid, results[cid])
            assert {r["command"]["id"] for r in results[cid] if r.get("command")} == {results[cid][0]["command"]["id"]}
            assert statuses["confirmed"] >= 1 and set(statuses) <= {"accepted", "duplicate", "confirmed"}, statuses
    finally:
        for gw in gateways:
            await gw.stop()
    store = await ledger.store().open()
    try:
        commands, events = await store.commands(limit=10_000), await store.events(limit=100_000)
    finally:
        await store.close()
        ledger.drop()
    assert len(commands) == TOPUPS
    verdict = verify_topups(commands, before, sim.states())
    assert verdict.problems == [], verdict.problems
    # each command was worked on by one gateway (its non-accepted events carry one actor)
    for c in commands:
        assert len({e.actor for e in events if e.command_id == c.id and e.state.value != "accepted"}) == 1
