"""Group commit in the SQLite ledger (gateway/ledger/store.py): calls queued together share one transaction.

Each caller still gets its result only once its data is committed (checked with a second,
independent connection), and a call that fails in a group fails alone: the others are
committed, exactly as if every call had had a transaction of its own.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.ledger import Kind, LeaseLost, NewCommand, State, Store

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def new(n: int) -> NewCommand:
    return NewCommand(f"k{n}", Kind.TOPUP, f"{n:012d}", {"amount_fen": 100}, "test")


def committed(path: Path, sql: str) -> list[tuple[object, ...]]:
    """What another connection sees: only committed data."""
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


@pytest.fixture
async def store(tmp_path: Path):
    s = await Store.sqlite(tmp_path / "ledger.sqlite").open()
    yield s
    await s.close()


async def test_concurrent_calls_share_transactions_and_each_result_is_durable(store: Store, tmp_path: Path):
    path = tmp_path / "ledger.sqlite"
    seen: list[int] = []

    async def submit(n: int) -> None:
        command, created = await store.submit(new(n), T0)
        assert created
        # When the call returns, its command is committed: another connection sees it.
        assert committed(path, f"SELECT state FROM commands WHERE id = '{command.id}'") == [("accepted",)]
        seen.append(n)

    await asyncio.gather(*(submit(n) for n in range(1, 201)))
    assert sorted(seen) == list(range(1, 201))
    assert store.stats.groups >= 1 and store.stats.grouped_calls > store.stats.groups  # several per transaction
    assert store.stats.grouped_calls + store.stats.single_calls >= 200
    claimed = await store.claim("gw", T0, LEASE, 200)
    moved = await asyncio.gather(
        *(store.transition(c, "gw", State.SENT, T0, progress={"purchase_count": 2}, attempt=True) for c in claimed)
    )
    assert {m.state for m in moved} == {State.SENT} and {m.attempts for m in moved} == {1}
    assert committed(path, "SELECT COUNT(*) FROM events WHERE state = 'sent'") == [(200,)]


async def test_a_failing_call_fails_alone_and_the_rest_of_its_group_is_committed(store: Store, tmp_path: Path):
    for n in range(1, 11):
        await store.submit(new(n), T0)
    claimed = await store.claim("gw", T0, LEASE, 10)
    assert len(claimed) == 10
    before = (store.stats.groups, store.stats.group_retries)
    busy = asyncio.ensure_future(store._run(time.sleep, 0.2))  # the next calls queue up meanwhile: one group
    await asyncio.sleep(0.05)
    results = await asyncio.gather(
        *(store.transition(c, "gw", State.CONFIRMED, T0, result={"ok": True}) for c in claimed[:5]),
        store.transition(claimed[5], "someone-else", State.CONFIRMED, T0),  # not the lease owner
        *(store.transition(c, "gw", State.CONFIRMED, T0) for c in claimed[6:]),
        return_exceptions=True,
    )
    assert isinstance(results[5], LeaseLost)
    assert all(not isinstance(r, BaseException) and r.state is State.CONFIRMED for i, r in enumerate(results) if i != 5)
    states = dict(committed(tmp_path / "ledger.sqlite", "SELECT id, state FROM commands"))
    assert states[claimed[5].id] == "accepted"
    assert sorted(states.values()).count("confirmed") == 9
    await busy
    # They were one group; the failure rolled it back and each call ran again alone.
    assert (store.stats.groups, store.stats.group_retries) == (before[0] + 1, before[1] + 1)
    events = committed(tmp_path / "ledger.sqlite", "SELECT COUNT(*) FROM events WHERE state = 'confirmed'")
    assert events == [(9,)]  # no call ran twice


async def test_a_call_cancelled_before_it_ran_does_nothing(store: Store, tmp_path: Path):
    busy = asyncio.ensure_future(store._run(time.sleep, 0.2))
    await asyncio.sleep(0.05)  # the store's thread is inside slow()
    queued = asyncio.ensure_future(store.submit(new(1), T0))
    await asyncio.sleep(0.01)
    queued.cancel()
    await busy
    await asyncio.sleep(0.05)
    assert committed(tmp_path / "ledger.sqlite", "SELECT COUNT(*) FROM commands") == [(0,)]
    command, created = await store.submit(new(2), T0)
    assert created and command.address == "000000000002"


async def test_postgres_stays_one_transaction_per_call():
    pg = Store.postgres("postgresql://nobody@127.0.0.1:1/none")
    assert pg.group_commit is False
    assert Store.sqlite(":memory:").group_commit is True
