"""Two gateway processes on one PostgreSQL schema and one simulated fleet never run a command twice.

Both gateways are forked children (tests/crashkit.py) with their own owner names, claiming
from the same ledger schema (row leases on the command and on its meter, ``FOR UPDATE SKIP
LOCKED``) and talking to the same ``meterlink sim`` over its TCP ports (several connections
share one line, as on a converter that accepts two clients). They start together (a pipe
handshake) on a batch that is already in the ledger: top-ups and relay commands, shuffled,
several per meter.

What is checked, from the ledger's audit trail and the simulator's ground truth:

* every command ended ``confirmed``; each was worked on by exactly one owner (its
  non-``accepted`` events all carry one actor) and sent once (one ``sent`` step per execution);
* every top-up applied exactly once (purchase counts and balances, tests/crashkit.py
  :func:`verify_topups`); the commands on each meter were sent in the order they were
  submitted, and each meter's power hold and alarm are what its last relay command asked;
* both gateways did a fair share of the work, else the test proves nothing.

The second test SIGKILLs one gateway mid-batch: the survivor takes over the commands the dead
one held, but only once their leases (2 s here) have expired, and finishes the batch; top-ups
still apply exactly once. The third drives four ledgers' claims directly, at once, on a backlog
in random meter order: no deadlock, no command or meter handed out twice.

Needs PostgreSQL (``METERLINK_TEST_POSTGRES``, default
``postgresql://postgres@127.0.0.1:5432/postgres``); each test uses its own schema and drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import signal
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from crashkit import (
    PG_DSN,
    GatewaySpec,
    Ledger,
    Sim,
    fork_gateway,
    log_tail,
    postgres_available,
    read_ledger,
    simulator,
    submit_all,
    verify_topups,
    wait_exit,
)

from gateway.ledger import Command, Event, Kind, NewCommand, State, Store
from gateway.link import LinkConfig
from gateway.service import ServiceConfig

_WHY_NOT = postgres_available()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")

METERS, BUSES = 40, 4
LINK = LinkConfig(td_max_s=0.5, margin_s=0.25, gap_s=0.0, retries=2, backoff_s=0.02, security_extra_s=0.5)
"""Generous timeouts: four busy processes share two cores, and no reply is ever really lost here."""
RELAY_ACTIONS = ("alarm-on", "alarm-off", "power-hold-on", "power-hold-off")


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    with simulator(METERS, BUSES, seed=5) as s:
        yield s


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    led = Ledger(dsn=PG_DSN, schema=f"test_two_gw_{uuid.uuid4().hex[:12]}")
    try:
        yield led
    finally:
        led.drop()


def make_batch(sim: Sim, rng: random.Random, per_meter: int, tag: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    items: list[tuple[str, str, str, dict[str, Any]]] = []
    for address in sorted(sim.buses):
        for i in range(per_meter):
            key = f"{tag}-{address}-{i}"
            if rng.random() < 0.6:
                items.append((key, "topup", address, {"amount": f"{rng.randint(1, 9999) / 100:.2f}"}))
            else:
                items.append((key, "relay", address, {"action": rng.choice(RELAY_ACTIONS)}))
    rng.shuffle(items)
    return items


@pytest.fixture
def children() -> Iterator[list[int]]:
    """Pids of gateway children; any still running at the end of the test are killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def start_together(
    sim: Sim, ledger: Ledger, owners: list[str], service: ServiceConfig, log: Path, children: list[int]
) -> dict[str, int]:
    """Fork one gateway per owner; let them start claiming at the same moment."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = {}
    for owner in owners:
        spec = GatewaySpec(ledger, sim.ports, dict(sim.buses), owner, service, log, ready_w, go_r, link=LINK)
        pids[owner] = fork_gateway(spec)
        children.append(pids[owner])
    os.close(ready_w)
    os.close(go_r)
    got = b""
    end = time.monotonic() + 20
    while len(got) < len(owners) and time.monotonic() < end:
        if select.select([ready_r], [], [], 0.5)[0]:
            chunk = os.read(ready_r, 16)
            if not chunk:
                break
            got += chunk
    os.close(ready_r)
    assert len(got) == len(owners), f"gateways not ready:\n{log_tail(log)}"
    os.write(go_w, b"g" * len(owners))
    os.close(go_w)
    return pids


def by_command(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        out[e.command_id].append(e)
    return out


def sends(evs: list[Event]) -> list[Event]:
    """The ``sent`` records that precede a transmission (not the retry bookkeeping)."""
    return [e for e in evs if e.state is State.SENT and "step" in e.detail]


def out_of_order(commands: list[Command], events: list[Event]) -> list[str]:
    """Meters whose commands were first sent in another order than they were submitted."""
    first_send: dict[str, Event] = {}
    for e in events:
        if e.state is State.SENT and "step" in e.detail:
            first_send.setdefault(e.command_id, e)
    per_meter: dict[str, list[Command]] = defaultdict(list)
    for c in sorted(commands, key=lambda c: c.created_at):
        per_meter[c.address].append(c)
    problems = []
    for address, mine in per_meter.items():
        sent = sorted((c for c in mine if c.id in first_send), key=lambda c: first_send[c.id].id)
        if sent != [c for c in mine if c.id in first_send]:
            problems.append(
                f"meter {address}: submitted "
                + ", ".join(f"{c.kind.value}:{c.params.get('action', c.params.get('amount_fen'))}" for c in mine)
                + " but sent "
                + ", ".join(
                    f"{c.kind.value}:{c.params.get('action', c.params.get('amount_fen'))}@{first_send[c.id].actor}"
                    for c in sent
                )
            )
    return problems


def check_relay_states(sim: Sim, commands: list[Command]) -> list[str]:
    """Each meter's power hold and alarm as its last power-hold / alarm command of the batch left them."""
    last: dict[tuple[str, str], str] = {}
    for c in sorted(commands, key=lambda c: c.created_at):
        if c.kind is Kind.RELAY:
            action = c.params["action"]
            last[(c.address, action.rsplit("-", 1)[0])] = action
    problems = []
    for (address, what), action in last.items():
        state = sim.state(address)
        field = "power_hold" if what == "power-hold" else "alarm"
        if bool(state[field]) != action.endswith("-on"):
            problems.append(f"meter {address}: last command {action}, simulator says {field}={state[field]}")
    return problems


def test_two_gateways_share_a_batch_and_never_run_a_command_twice(
    sim: Sim, ledger: Ledger, tmp_path: Path, children: list[int]
):
    rng = random.Random(20261127)
    before = sim.states()
    items = make_batch(sim, rng, per_meter=8, tag="share")
    assert all(submit_all(ledger, sim.buses, items))
    log = tmp_path / "gateways.log"
    service = ServiceConfig(concurrency=8, retry_delay=timedelta(seconds=0.2), poll_s=0.01)
    pids = start_together(sim, ledger, ["gw-a", "gw-b"], service, log, children)
    for owner, pid in pids.items():
        assert wait_exit(pid, 60) == 0, f"{owner} failed:\n{log_tail(log)}"

    commands, events = read_ledger(ledger)
    assert len(commands) == len(items)
    assert {c.state for c in commands} == {State.CONFIRMED}, Counter(c.state.value for c in commands)
    verdict = verify_topups(commands, before, sim.states())
    assert verdict.ok, verdict.problems
    assert out_of_order(commands, events) == []
    assert check_relay_states(sim, commands) == []

    work: Counter[str] = Counter()
    evs = by_command(events)
    for c in commands:
        owners = {e.actor for e in evs[c.id] if e.state is not State.ACCEPTED}
        assert len(owners) == 1, f"command {c.id} ({c.kind.value} {c.address}) worked on by {owners}"
        retries = sum(e.state is State.SENT and "error" in e.detail for e in evs[c.id])
        assert len(sends(evs[c.id])) == 1 + retries, [e.public() for e in evs[c.id]]
        work[owners.pop()] += 1
    assert set(work) == {"gw-a", "gw-b"}
    assert min(work.values()) >= len(items) // 5, f"one gateway did almost nothing: {dict(work)}"


def test_survivor_finishes_the_killed_gateways_commands_after_their_leases_expire(
    sim: Sim, ledger: Ledger, tmp_path: Path, children: list[int]
):
    rng = random.Random(4242)
    lease = timedelta(seconds=2)
    before = sim.states()
    items = make_batch(sim, rng, per_meter=5, tag="kill")
    assert all(submit_all(ledger, sim.buses, items))
    log = tmp_path / "gateways.log"
    service = ServiceConfig(concurrency=8, lease=lease, retry_delay=timedelta(seconds=0.2), poll_s=0.01)
    pids = start_together(sim, ledger, ["gw-victim", "gw-survivor"], service, log, children)

    def victim_holds() -> dict[str, datetime]:
        return {
            cid: datetime.fromisoformat(until)
            for cid, until in ledger.query(
                "SELECT id, lease_until FROM commands WHERE lease_owner = 'gw-victim' AND state IN ('accepted', 'sent')"
            )
        }

    # Kill the victim a quarter of the way through the batch, with commands in its hands. It is
    # frozen (SIGSTOP) first and killed only if the ledger shows it holding leases; otherwise
    # it resumes and the test tries again a moment later. (Killing blind failed in CI once: the
    # victim was between claims at that instant, and the test then proves nothing.)
    victim = pids["gw-victim"]
    end = time.monotonic() + 30
    while time.monotonic() < end:
        done = ledger.query("SELECT COUNT(*) FROM commands WHERE state = 'confirmed'")[0][0]
        if done >= len(items) // 4:
            break
        time.sleep(0.005)
    held: dict[str, datetime] = {}
    killed_at = datetime.now().astimezone()
    while not held and time.monotonic() < end:
        os.kill(victim, signal.SIGSTOP)
        killed_at = datetime.now().astimezone()
        time.sleep(0.05)  # let statements already on the wire reach the database
        if victim_holds():
            os.kill(victim, signal.SIGKILL)
            assert wait_exit(victim, 10) == -signal.SIGKILL
            time.sleep(0.05)
            held = victim_holds()  # after the death: the leases the survivor must wait out
        else:
            os.kill(victim, signal.SIGCONT)
            time.sleep(0.02)
    assert held, "the victim never held a command: the test proves nothing"
    assert wait_exit(pids["gw-survivor"], 60) == 0, f"the survivor failed:\n{log_tail(log)}"

    commands, events = read_ledger(ledger)
    assert {c.state for c in commands} == {State.CONFIRMED}, Counter(c.state.value for c in commands)
    verdict = verify_topups(commands, before, sim.states())
    assert verdict.ok, verdict.problems
    assert out_of_order(commands, events) == []
    assert check_relay_states(sim, commands) == []

    evs = by_command(events)
    work: Counter[str] = Counter()
    for c in commands:
        mine = [e for e in evs[c.id] if e.state is not State.ACCEPTED]
        owners = [e.actor for e in mine]
        work[owners[-1]] += 1
        if c.id in held:
            # The survivor touched it only after the victim's lease had run out.
            assert owners[-1] == "gw-survivor"
            first = next(e for e in mine if e.actor == "gw-survivor")
            assert first.at >= held[c.id], (first.public(), held[c.id])
        else:
            assert len(set(owners)) == 1, f"command {c.id} worked on by {set(owners)}"
        # Never interleaved: all of the victim's events, then all of the survivor's.
        assert owners == sorted(owners, key=lambda o: o != "gw-victim"), owners
        assert all(e.at <= killed_at for e in mine if e.actor == "gw-victim")
    assert work["gw-victim"] >= 1 and work["gw-survivor"] >= 1, dict(work)


async def test_concurrent_claims_never_deadlock_nor_share_a_command_or_a_meter():
    """Four ledger connections (four gateways' stores) claim and finish from one backlog at once.

    The backlog is in random meter order, so concurrent claims lease meters in different
    orders: they must neither deadlock (PostgreSQL would abort one transaction, and a claim
    that raises stops a gateway's claim loop) nor hand out a command or a meter that another
    owner holds.
    """
    schema = f"test_claims_{uuid.uuid4().hex[:12]}"
    stores = [await Store.postgres(PG_DSN, schema).open() for _ in range(4)]
    try:
        rng = random.Random(7)
        now = datetime.now(UTC)
        for i in range(600):
            new = NewCommand(f"c{i}", Kind.TOPUP, f"{rng.randint(1, 50):012d}", {"amount_fen": 1}, "test")
            await stores[0].submit(new, now)
        held: dict[str, str] = {}
        runs: Counter[str] = Counter()
        errors: list[str] = []

        async def gateway(owner: str, store: Store) -> None:
            for _ in range(400):
                try:
                    claimed = await store.claim(owner, datetime.now(UTC), timedelta(seconds=60), 8)
                except Exception as exc:
                    errors.append(f"claim: {type(exc).__name__}: {exc}")
                    continue
                if not claimed and not await store.open_commands():
                    return
                for c in claimed:
                    assert c.address not in held, f"{owner} got meter {c.address} while {held[c.address]} holds it"
                    held[c.address] = owner
                    runs[c.id] += 1
                for c in claimed:
                    del held[c.address]  # before the ledger frees it: a claim may see it free only after this
                    try:
                        await store.transition(c, owner, State.CONFIRMED, datetime.now(UTC))
                    except Exception as exc:
                        errors.append(f"transition: {type(exc).__name__}: {exc}")

        await asyncio.gather(*(gateway(f"gw-{k}", s) for k, s in enumerate(stores)))
        assert errors == []
        assert await stores[0].open_commands() == 0
        assert len(runs) == 600 and set(runs.values()) == {1}
    finally:
        for s in stores:
            await s.close()
        Ledger(dsn=PG_DSN, schema=schema).drop()
