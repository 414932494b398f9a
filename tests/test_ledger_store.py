"""The ledger on SQLite and on the real PostgreSQL: idempotency, leases, fencing, wallets."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ledger import Kind, LeaseLost, NewCommand, State, Store

PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def _pg_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = await Store.sqlite(tmp_path / "ledger.sqlite").open()
        yield s
        await s.close()
        return
    if not _pg_available():
        pytest.skip("PostgreSQL is not listening on 127.0.0.1:5432 (.ci/services starts it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    s = await Store.postgres(PG_DSN, schema=schema).open()
    yield s
    await s.close()
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def new(key: str, address: str = "000000000001", kind: Kind = Kind.TOPUP) -> NewCommand:
    return NewCommand(key, kind, address, {"amount_fen": 100}, "test")


async def test_idempotency_key_returns_the_first_command(store):
    first, created = await store.submit(new("k"), T0)
    again, created_again = await store.submit(NewCommand("k", Kind.TOPUP, "000000000009", {"x": 1}, "other"), T0)
    assert created and not created_again
    assert again.id == first.id and again.address == "000000000001"
    assert len(await store.commands()) == 1
    events = await store.events(command_id=first.id)
    assert [e.state for e in events] == [State.ACCEPTED]


async def test_one_command_per_meter_at_a_time(store):
    a, _ = await store.submit(new("a"), T0)
    b, _ = await store.submit(new("b"), T0 + timedelta(seconds=1))
    c, _ = await store.submit(new("c", "000000000002"), T0 + timedelta(seconds=2))
    claimed = await store.claim("gw1", T0, LEASE)
    assert {x.id for x in claimed} == {a.id, c.id}
    assert await store.claim("gw2", T0, LEASE) == []
    await store.transition(claimed[0], "gw1", State.CONFIRMED, T0)
    later = await store.claim("gw2", T0, LEASE)
    assert [x.id for x in later] == [b.id]


async def test_transitions_are_fenced_by_the_lease_owner(store):
    cmd, _ = await store.submit(new("k"), T0)
    [mine] = await store.claim("gw1", T0, LEASE)
    with pytest.raises(LeaseLost):
        await store.transition(mine, "gw2", State.CONFIRMED, T0)
    # The lease expires; another gateway takes the command over; the first is fenced out.
    [theirs] = await store.claim("gw2", T0 + LEASE + timedelta(seconds=1), LEASE)
    assert theirs.id == cmd.id
    with pytest.raises(LeaseLost):
        await store.transition(mine, "gw1", State.SENT, T0 + LEASE + timedelta(seconds=2))
    done = await store.transition(
        theirs, "gw2", State.CONFIRMED, T0 + LEASE + timedelta(seconds=3), result={"ok": True}
    )
    assert done.state is State.CONFIRMED and done.result == {"ok": True}
    assert [e.state for e in await store.events(command_id=cmd.id)] == [State.ACCEPTED, State.CONFIRMED]


async def test_progress_is_kept_for_a_resumed_command(store):
    await store.submit(new("k"), T0)
    [cmd] = await store.claim("gw1", T0, LEASE)
    await store.transition(cmd, "gw1", State.SENT, T0, progress={"purchase_count": 7}, attempt=True)
    # gw1 dies; after the lease gw2 resumes with the recorded purchase count.
    [again] = await store.claim("gw2", T0 + LEASE * 2, LEASE)
    assert again.state is State.SENT and again.progress == {"purchase_count": 7} and again.attempts == 1


async def test_not_before_delays_a_retry_and_frees_the_meter(store):
    await store.submit(new("k"), T0)
    other, _ = await store.submit(new("j"), T0 + timedelta(seconds=1))
    [cmd] = await store.claim("gw1", T0, LEASE)
    await store.transition(cmd, "gw1", State.ACCEPTED, T0, not_before=T0 + timedelta(minutes=1))
    [next_one] = await store.claim("gw1", T0 + timedelta(seconds=2), LEASE)
    assert next_one.id == other.id  # the meter is free for the next command meanwhile
    await store.transition(next_one, "gw1", State.CONFIRMED, T0 + timedelta(seconds=3))
    assert await store.claim("gw1", T0 + timedelta(seconds=30), LEASE) == []
    [retry] = await store.claim("gw1", T0 + timedelta(minutes=2), LEASE)
    assert retry.id == cmd.id


async def test_wallet_entries_are_booked_once_per_reference(store):
    assert await store.wallet("000000000007") is None
    assert await store.book("000000000007", 2500, "topup", "topup:1", T0)
    assert not await store.book("000000000007", 2500, "topup", "topup:1", T0)
    assert await store.book("000000000007", -300, "daily", "daily:2026-11-24", T0)
    assert await store.wallet("000000000007") == 2200


async def test_audit_events_have_who_what_when_frames(store):
    cmd, _ = await store.submit(new("k"), T0)
    [c] = await store.claim("gw1", T0, LEASE)
    await store.transition(c, "gw1", State.SENT, T0 + timedelta(seconds=1), frames=["68aa"], detail={"step": "x"})
    events = await store.events(since=T0, until=T0 + timedelta(seconds=2))
    assert [(e.state, e.actor) for e in events] == [(State.ACCEPTED, "test"), (State.SENT, "gw1")]
    assert events[1].frames == ["68aa"] and events[1].detail == {"step": "x"}
    assert events[1].at == T0 + timedelta(seconds=1)
    assert await store.open_commands() == 1
    await store.transition(c, "gw1", State.FAILED, T0 + timedelta(seconds=2))
    assert await store.open_commands() == 0
    assert (await store.get(cmd.id)).state is State.FAILED


async def test_audit_events_by_meter_and_after_an_event(store):
    mine, _ = await store.submit(new("k"), T0)
    theirs, _ = await store.submit(new("j", "000000000009"), T0)
    assert [e.command_id for e in await store.events(address=mine.address)] == [mine.id]
    assert [e.command_id for e in await store.events(address="000000000009")] == [theirs.id]
    first = (await store.events())[0]
    assert [e.command_id for e in await store.events(after_id=first.id)] == [theirs.id]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["submit", "claim", "finish", "expire"]), st.integers(0, 4), st.sampled_from(["gw1", "gw2"])
        ),
        max_size=40,
    )
)
async def test_leases_never_overlap_on_a_meter(tmp_path_factory, ops):
    s = await Store.sqlite(tmp_path_factory.mktemp("l") / "p.sqlite").open()
    try:
        now = T0
        held: dict[str, tuple[str, str]] = {}  # command id -> (owner, address)
        objects = {}
        n = 0
        for op, meter, owner in ops:
            address = f"{meter + 1:012d}"
            if op == "submit":
                n += 1
                await s.submit(new(f"k{n}", address), now)
            elif op == "claim":
                for cmd in await s.claim(owner, now, LEASE):
                    assert all(a != cmd.address for (o, a) in held.values()), "two leases on one meter"
                    held[cmd.id] = (owner, cmd.address)
                    objects[cmd.id] = cmd
            elif op == "finish" and held:
                cid = sorted(held)[meter % len(held)]
                who, _ = held.pop(cid)
                await s.transition(objects[cid], who, State.CONFIRMED, now)
            elif op == "expire":
                now += LEASE + timedelta(seconds=1)
                held.clear()  # every lease has run out; their owners are fenced from now on
            now += timedelta(milliseconds=10)
        finals = [c for c in await s.commands(limit=1000) if c.state.final]
        for c in finals:
            assert [e.state for e in await s.events(command_id=c.id)][-1] is State.CONFIRMED
    finally:
        await s.close()
