"""Crash recovery: a gateway SIGKILLed at random moments still applies every top-up exactly once.

The simulator runs as ``meterlink sim`` in its own process (16 meters on two TCP lines,
``--speed 0``: purchase counts and balances change only by commands); the ledger is a SQLite
file. The gateway is a forked child (tests/crashkit.py explains why fork: no interpreter
start-up per kill) that is SIGKILLed after a seeded random delay, reaped, and forked again on
the same ledger, over and over, while the parent keeps a batch of top-ups in the ledger (one
per meter per wave, random amounts, own idempotency keys, plus resubmitted keys). After the
last kill one child runs until every command is final, and the simulator's ground truth must
match the ledger exactly (:func:`crashkit.verify_topups`): per meter, the purchase count grew
by the number of confirmed top-ups and the balance by their sum, and the counts the confirmed
commands read back are exactly the new ones, one each. No command may stay open or end
``unknown``.

``METERLINK_CRASH_KILLS`` (default 100) sets the number of kill points and
``METERLINK_CRASH_SEED`` the seed; ``bench/crash.py`` runs the same with 1000.

Below it, in-process tests of the two service fixes the crash work led to: a top-up never
chooses a purchase count while another top-up on the same meter has one in doubt, and a
ledger error in the claim loop does not stop the service.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from crashkit import crash_run, simulator
from simline import SimLineTransport

from gateway.ledger import State, Store
from gateway.link import Link, LinkConfig
from gateway.service import CommandService, MeterEntry, ServiceConfig
from simulator.clock import VirtualClock
from simulator.fleet import BusSpec, Fleet, MeterSpec

KILLS = int(os.environ.get("METERLINK_CRASH_KILLS", "100"))
SEED = int(os.environ.get("METERLINK_CRASH_SEED", "645"))


def test_sigkill_at_random_moments_applies_every_topup_exactly_once(tmp_path: Path):
    with simulator(16, 2) as sim:
        report = crash_run(sim, tmp_path, KILLS, SEED)
    summary = (
        f"{report.line()} restarts={report.restarts} repeats={report.repeats} seconds={report.seconds:.1f} "
        f"states={dict(report.verdict.states)} coverage={dict(report.coverage)} delays={dict(report.delays)}"
    )
    print(summary)
    assert report.kills == KILLS
    assert report.verdict.ok, "\n".join(report.verdict.problems[:30])
    assert dict(report.verdict.states) == {"confirmed": report.topups}, summary
    assert report.repeats > 0
    # The kills did land where it matters: after the count was recorded but before the meter had
    # the frame (found N - 1, sent again), and after the frame but before the confirmation
    # (found N, confirmed without sending).
    assert report.coverage["resent"] > 0 and report.coverage["found_applied"] > 0, summary
    assert report.delays["start"] > 0


# --- the fixes, in one process --------------------------------------------------------------------------

A1 = "000000000001"
FAST = LinkConfig(
    td_max_s=0.05, margin_s=0.05, gap_s=0.0, retries=1, backoff_s=0.01, security_extra_s=0.05, reconnect_s=0.0
)
"""reconnect_s=0: a line that drops fails the transaction at once (the link would otherwise wait up to
30 s for it to come back), so that these tests see the service's own retry of a command whose line is down."""


async def _one_meter(tmp_path: Path) -> tuple[Fleet, Store, SimLineTransport, Link]:
    fleet = Fleet([BusSpec("line", [MeterSpec(A1)])], VirtualClock(datetime(2026, 11, 24, 10, tzinfo=UTC), 0))
    store = await Store.sqlite(tmp_path / "ledger.sqlite").open()
    transport = SimLineTransport(fleet.buses["line"])
    link = await Link(transport, FAST, name="line").start()
    return fleet, store, transport, link


async def test_a_topup_waits_while_another_on_the_meter_has_its_purchase_count_in_doubt(tmp_path: Path):
    """The line drops after top-up A recorded count N and before its frame left; A waits for its retry.

    Before the fix, A's retry released the meter, B was claimed meanwhile, read the count, chose
    the same N and had it applied; A's retry then found the meter at N and was confirmed
    "applied before a restart or lost reply": two confirmed top-ups, one applied, A's money lost.
    """
    fleet, store, transport, link = await _one_meter(tmp_path)
    service = CommandService(
        store,
        {A1: MeterEntry(A1, "line")},
        {"line": link},
        config=ServiceConfig(retry_delay=timedelta(seconds=0.2), poll_s=0.01),
    )
    a, _ = await service.submit("A", "topup", A1, {"amount": "10.00"}, "test")
    b, _ = await service.submit("B", "topup", A1, {"amount": "20.00"}, "test")

    def line_drops_as_a_is_sent(command, info):
        if command.id == a.id and info["event"] == "sent":
            # down as A's first recharge is about to leave; up again once A's retry is scheduled
            transport.down = info["detail"].get("step") == "purchase count chosen"

    service.listeners.append(line_drops_as_a_is_sent)
    before = fleet.state(A1)
    await service.start()
    try:
        await service.drain(10)
    finally:
        await service.stop()
        await link.stop()
    after = fleet.state(A1)
    a, b = await store.get(a.id), await store.get(b.id)
    events_b = await store.events(command_id=b.id)
    await store.close()
    assert a is not None and b is not None
    assert (a.state, b.state) == (State.CONFIRMED, State.CONFIRMED)
    assert after["purchase_count"] == before["purchase_count"] + 2
    assert Decimal(after["remaining_money"]) - Decimal(before["remaining_money"]) == Decimal("30.00")
    assert a.result is not None and b.result is not None
    first = before["purchase_count"] + 1
    assert (a.result["purchase_count"], b.result["purchase_count"]) == (first, first + 1)
    assert any(e.detail.get("waiting_for") == a.id for e in events_b)


async def test_a_ledger_error_while_claiming_does_not_stop_the_service(tmp_path: Path):
    """Before the fix, one exception from Store.claim (e.g. a PostgreSQL deadlock or a dropped
    connection) ended the claim loop: the gateway went on accepting commands and ran none."""
    fleet, store, _, link = await _one_meter(tmp_path)
    service = CommandService(store, {A1: MeterEntry(A1, "line")}, {"line": link}, config=ServiceConfig(poll_s=0.01))
    real_claim = store.claim
    failures = []

    async def claim_failing_twice(*args, **kw):
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("connection to the ledger lost")
        return await real_claim(*args, **kw)

    store.claim = claim_failing_twice  # type: ignore[method-assign]
    await service.start()
    try:
        command, _ = await service.submit("T", "topup", A1, {"amount": "5.00"}, "test")
        await service.drain(10)
    finally:
        await service.stop()
        await link.stop()
    final = await store.get(command.id)
    await store.close()
    assert len(failures) == 2
    assert final is not None and final.state is State.CONFIRMED
    assert fleet.state(A1)["remaining_money"] == "105.00"
