"""Gateways as processes that can be SIGKILLed, against a simulated fleet in another process.

Shared by tests/test_crash_recovery.py, tests/test_two_gateways.py and bench/crash.py.

* **The simulator** is ``meterlink sim`` in a subprocess (``--speed 0``: virtual time stands
  still, so a meter's purchase count and balance change only by commands; ``--no-timing``).
  Its admin interface (``GET /meters/{address}``) is the ground truth.
* **A gateway** is a child made with ``os.fork()`` from the test process, after every import:
  it builds a fresh event loop, opens the ledger (SQLite file or a PostgreSQL schema),
  connects one :class:`~gateway.link.Link` per bus over TCP (``tcp://`` bus URLs, as a
  deployed gateway does) and runs :class:`~gateway.service.CommandService` until no command is
  open, then exits 0. A fork costs about a millisecond and the child is working ~10 ms later,
  where starting ``meterlink gateway`` would pay ~0.5 s of interpreter start-up and imports
  per kill: that is what makes 100 kill points fit in a few seconds of CI time. The child
  shares no live object with the parent: the parent holds no ledger connection and runs no
  thread or event loop when it forks (its own ledger work runs in short ``asyncio.run`` calls
  whose thread pools are shut down, or in plain ``sqlite3`` connections that are closed).
* The child ends with ``os._exit`` (never returning into pytest); its stdout/stderr and
  warnings go to a log file the parent can show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway.ledger import Command, Event, Kind, State, Store
from gateway.link import Link, LinkConfig
from gateway.service import CommandService, MeterEntry, ServiceConfig
from gateway.transports import open_transport

PG_DSN = os.environ.get("METERLINK_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
FAST_LINK = LinkConfig(td_max_s=0.1, margin_s=0.1, gap_s=0.0, retries=2, backoff_s=0.02, security_extra_s=0.2)
"""The simulator answers at once (no line timing): short timeouts keep a lost reply cheap."""


# --- the simulator ------------------------------------------------------------------------------------


@dataclass
class Sim:
    """A ``meterlink sim`` subprocess: its buses' TCP ports and its admin interface."""

    proc: subprocess.Popen[str]
    ports: dict[str, int]
    admin: str
    buses: dict[str, str]
    """Meter address -> bus name."""

    def state(self, address: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin}/meters/{address}", timeout=10) as reply:
            return json.load(reply)

    def states(self) -> dict[str, dict[str, Any]]:
        return {a: self.state(a) for a in self.buses}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_sim(meters: int, buses: int, seed: int = 0) -> Sim:
    """Start ``meterlink sim`` on free localhost ports and read its endpoints from its output."""
    cmd = [
        sys.executable,
        "-c",
        "from gateway.cli import main; main()",
        "sim",
        "--meters",
        str(meters),
        "--buses",
        str(buses),
        "--tcp",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--no-timing",
        "--speed",
        "0",
        "--summary-every",
        "0",
        "--seed",
        str(seed),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not any("admin:" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"meterlink sim ended: {''.join(lines)}")
            lines.append(line)
        text = "".join(lines)
        ports = {bus: int(port) for port, bus in re.findall(r"tcp://127\.0\.0\.1:(\d+) \(bus (\S+),", text)}
        admin_match = re.search(r"admin: (http://[\d.]+:\d+)", text)
        assert admin_match and len(ports) == buses, text
        admin = admin_match.group(1)
        with urllib.request.urlopen(f"{admin}/meters", timeout=10) as reply:
            listed = {m["address"]: m["bus"] for m in json.load(reply)}
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Sim(proc, ports, admin, listed)


# --- ledgers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    """Where the gateways keep their ledger: a SQLite file, or a schema in PostgreSQL."""

    sqlite: Path | None = None
    dsn: str | None = None
    schema: str | None = None

    def store(self) -> Store:
        if self.sqlite is not None:
            return Store.sqlite(self.sqlite)
        assert self.dsn is not None
        return Store.postgres(self.dsn, self.schema)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of one query, without an event loop (cheap enough to ask between kills)."""
        if self.sqlite is not None:
            conn = sqlite3.connect(str(self.sqlite), timeout=30)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(f'SET search_path TO "{self.schema}"')
            return conn.execute(sql).fetchall()  # type: ignore[return-value]

    def open_count(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM commands WHERE state IN ('accepted', 'sent')")[0][0])

    def drop(self) -> None:
        """Drop the PostgreSQL schema (a SQLite file goes with its directory)."""
        if self.schema is None:
            return
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


def postgres_available(dsn: str = PG_DSN) -> str | None:
    """None if PostgreSQL answers at ``dsn``, else why not."""
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL not reachable at {dsn}: {exc}"
    return None


def read_ledger(ledger: Ledger) -> tuple[list[Command], list[Event]]:
    """Every command and every event (in order), through the Store (run it with no loop running)."""

    async def read() -> tuple[list[Command], list[Event]]:
        store = await ledger.store().open()
        try:
            return await store.commands(limit=1_000_000), await store.events(limit=10_000_000)
        finally:
            await store.close()

    return asyncio.run(read())


def submit_all(ledger: Ledger, meters: dict[str, str], items: list[tuple[str, str, str, dict[str, Any]]]) -> list[bool]:
    """Submit (key, kind, address, params) through CommandService.submit; returns the ``created`` flags."""

    async def go() -> list[bool]:
        store = await ledger.store().open()
        try:
            service = CommandService(store, {a: MeterEntry(a, b) for a, b in meters.items()}, {})
            created = []
            for key, kind, address, params in items:
                _, new = await service.submit(key, kind, address, params, "crashkit")
                created.append(new)
            return created
        finally:
            await store.close()

    return asyncio.run(go())


# --- gateway children ------------------------------------------------------------------------------------


@dataclass
class GatewaySpec:
    """What one gateway child runs."""

    ledger: Ledger
    ports: dict[str, int]
    """Bus name -> the simulator's TCP port for it."""
    meters: dict[str, str]
    """Meter address -> bus name."""
    owner: str
    service: ServiceConfig
    log: Path
    ready_fd: int | None = None
    """Written to (one byte) once the ledger and the lines are open."""
    go_fd: int | None = None
    """Read from (one byte) before the service starts."""
    link: LinkConfig = field(default_factory=lambda: FAST_LINK)


async def _gateway_main(spec: GatewaySpec) -> None:
    store = await spec.ledger.store().open()
    links = {
        bus: await Link(open_transport(f"tcp://127.0.0.1:{port}"), spec.link, name=bus).start()
        for bus, port in spec.ports.items()
    }
    registry = {a: MeterEntry(a, bus) for a, bus in spec.meters.items()}
    service = CommandService(store, registry, links, config=spec.service, owner=spec.owner)
    if spec.ready_fd is not None:
        os.write(spec.ready_fd, b"r")
    if spec.go_fd is not None:
        await asyncio.get_running_loop().run_in_executor(None, os.read, spec.go_fd, 1)
    await service.start()
    worker = service._worker
    assert worker is not None
    while await store.open_commands() or service._tasks:
        if worker.done():  # the claim loop died: say why instead of waiting forever
            worker.result()
            raise RuntimeError("the command service's worker ended")
        await asyncio.sleep(0.02)
    await service.stop()
    for link in links.values():
        await link.stop()
    await store.close()


def fork_gateway(spec: GatewaySpec) -> int:
    """Fork a gateway child running ``spec``; returns its pid. The child never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        fd = os.open(spec.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        logging.basicConfig(
            level=logging.WARNING,
            format=f"{spec.owner} %(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
            force=True,
        )
        asyncio.run(_gateway_main(spec))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def wait_exit(pid: int, timeout: float) -> int:
    """Wait for a child; returns its exit code (negative: killed by that signal)."""
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"gateway child {pid} still running after {timeout} s")
        time.sleep(0.01)


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- checking against the ground truth ----------------------------------------------------------------


@dataclass
class Verdict:
    """Ledger against meters: which top-ups the meters have, which the ledger confirmed."""

    problems: list[str] = field(default_factory=list)
    states: Counter[str] = field(default_factory=Counter)
    topups: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_topups(
    commands: list[Command], before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> Verdict:
    """Every confirmed top-up applied exactly once, nothing else applied, nothing left open.

    Per meter: the purchase count grew by the number of confirmed top-ups, the balance by their
    sum (no consumption: the simulator's time stands still), and the purchase counts the
    confirmed commands read back are exactly before+1 .. after, one command each.
    """
    verdict = Verdict()
    confirmed: dict[str, list[Command]] = defaultdict(list)
    for c in commands:
        verdict.states[c.state.value] += 1
        if not c.state.final:
            verdict.problems.append(f"command {c.id} ({c.kind.value} {c.address}) left {c.state.value}")
        if c.kind is Kind.TOPUP:
            verdict.topups += 1
            if c.state is State.CONFIRMED:
                confirmed[c.address].append(c)
            elif c.state is not State.REFUSED:
                verdict.problems.append(f"top-up {c.idempotency_key} on {c.address} ended {c.state.value}: {c.result}")
    for address, b in before.items():
        a = after[address]
        mine = confirmed.get(address, [])
        counts = sorted(int((c.result or {}).get("purchase_count", -1)) for c in mine)
        expected = list(range(b["purchase_count"] + 1, a["purchase_count"] + 1))
        money = Decimal(a["remaining_money"]) - Decimal(b["remaining_money"])
        booked = sum((Decimal(c.params["amount_fen"]).scaleb(-2) for c in mine), Decimal(0))
        if counts != expected:
            verdict.problems.append(
                f"meter {address}: purchase count {b['purchase_count']} -> {a['purchase_count']}, "
                f"confirmed top-ups read back counts {counts}"
            )
        if money != booked:
            verdict.problems.append(f"meter {address}: balance grew by {money}, confirmed top-ups sum to {booked}")
    return verdict


# --- the crash run ------------------------------------------------------------------------------------------


@dataclass
class CrashReport:
    kills: int
    restarts: int
    topups: int
    repeats: int
    seconds: float
    verdict: Verdict
    coverage: Counter[str]
    delays: Counter[str]

    @property
    def applied_exactly_once(self) -> bool:
        return self.verdict.ok

    def line(self) -> str:
        return f"kills={self.kills} topups={self.topups} applied_exactly_once={self.applied_exactly_once}"


CRASH_LEASE = timedelta(seconds=0.1)
"""Lease of the crash run's gateways. Only one gateway lives at a time there (the parent waits
for each killed child before forking the next), so a lease shorter than a command is harmless:
it only bounds how long a restart waits for the dead child's leases to expire, which is what
each kill costs. (With several live gateways the lease must outlast any command: see
tests/test_two_gateways.py.)"""


def kill_delay(rng: random.Random, lease: float) -> tuple[str, float]:
    """When to kill the next child, counted from its fork.

    15 %: within its first 15 ms (before or while it opens the ledger, connects, first claims);
    the rest uniformly over the lease wait plus 40 ms of work, where kills fall between a
    claim and the ``sent`` record, between the record and the frame, between the frame and
    the read-back, and inside ledger transactions.
    """
    if rng.random() < 0.15:
        return "start", rng.uniform(0.0, 0.015)
    return "spread", rng.uniform(0.0, lease + 0.04)


def crash_run(
    sim: Sim,
    workdir: Path,
    kills: int,
    seed: int,
    *,
    ledger: Ledger | None = None,
    repeat_share: float = 0.1,
    progress: Any = None,
) -> CrashReport:
    """Top-ups in waves on every meter of ``sim`` while a gateway child is SIGKILLed ``kills`` times.

    A wave is one top-up per meter (random amount 0.01 .. 99.99, its own idempotency key) plus
    a few submissions that repeat an earlier key. A wave is submitted (by the parent, through
    CommandService.submit) whenever fewer than one wave's worth of commands is open, so the
    gateway always has a batch in hand. Each child is forked, killed after :func:`kill_delay`
    and reaped; a child that finished by itself before its kill is a restart, not a kill
    point. After the last kill one child runs until every command is final.
    """
    rng = random.Random(seed)
    began = time.monotonic()
    ledger = ledger or Ledger(sqlite=workdir / "ledger.sqlite")
    log = workdir / "gateways.log"
    meters = dict(sim.buses)
    addresses = sorted(meters)
    before = sim.states()
    keys: list[tuple[str, str, dict[str, Any]]] = []
    repeats = 0
    delays: Counter[str] = Counter()
    service = ServiceConfig(
        lease=CRASH_LEASE, retry_delay=timedelta(seconds=0.05), max_attempts=5, concurrency=4, poll_s=0.01
    )

    def wave() -> None:
        nonlocal repeats
        items: list[tuple[str, str, str, dict[str, Any]]] = []
        for address in addresses:
            key = f"crash-{seed}-{len(keys)}"
            params = {"amount": f"{rng.randint(1, 9999) / 100:.2f}"}
            keys.append((key, address, params))
            items.append((key, "topup", address, params))
        for _ in range(max(1, int(len(addresses) * repeat_share))):
            key, address, params = rng.choice(keys)
            items.append((key, "topup", address, params))
        created = submit_all(ledger, meters, items)
        repeated = created[len(addresses) :]
        assert all(created[: len(addresses)]) and not any(repeated), "a repeated key made a new command"
        repeats += len(repeated)

    wave()
    done = restarts = generation = 0
    while done < kills:
        if ledger.open_count() < len(addresses):
            wave()
        generation += 1
        spec = GatewaySpec(ledger, sim.ports, meters, f"gw-crash-{generation}", service, log)
        kind, delay = kill_delay(rng, CRASH_LEASE.total_seconds())
        pid = fork_gateway(spec)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        code = wait_exit(pid, 30)
        if code == -signal.SIGKILL:
            done += 1
            delays[kind] += 1
        elif code == 0:
            restarts += 1  # it finished every open command before its kill
        else:
            raise AssertionError(f"gateway child exited {code}:\n{log_tail(log)}")
        if progress is not None and done and done % 100 == 0 and code != 0:
            progress(f"{done} kills, {len(keys)} top-ups submitted, {time.monotonic() - began:.1f} s")
    generation += 1
    pid = fork_gateway(GatewaySpec(ledger, sim.ports, meters, f"gw-crash-{generation}-final", service, log))
    code = wait_exit(pid, 120)
    assert code == 0, f"the last gateway exited {code}:\n{log_tail(log)}"
    commands, events = read_ledger(ledger)
    after = sim.states()
    verdict = verify_topups(commands, before, after)
    if len(commands) != len(keys):
        verdict.problems.append(f"{len(commands)} commands in the ledger for {len(keys)} idempotency keys")
    return CrashReport(
        kills=done,
        restarts=restarts,
        topups=len(keys),
        repeats=repeats,
        seconds=time.monotonic() - began,
        verdict=verdict,
        coverage=coverage(commands, events),
        delays=delays,
    )


def coverage(commands: list[Command], events: list[Event]) -> Counter[str]:
    """Where the kills left top-ups, read from the audit trail.

    - ``taken_over``: commands whose events come from more than one gateway generation;
    - ``resent``: a recorded purchase count found not applied after a restart (killed between
      the ``sent`` record and the meter applying the frame): sent again with the same count;
    - ``found_applied``: a recorded count found applied (killed after the frame, before the
      confirmation);
    - ``duplicate``: a resend the meter answered "repeat recharge" (the first frame was still
      on its way when the new gateway read the count).
    """
    by_command: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_command[e.command_id].append(e)
    out: Counter[str] = Counter()
    for c in commands:
        evs = by_command[c.id]
        owners = {e.actor for e in evs if e.state is not State.ACCEPTED}
        out["taken_over"] += len(owners) > 1
        out["resent"] += sum(e.detail.get("step") == "resend" for e in evs)
        outcome = (c.result or {}).get("outcome")
        out["found_applied"] += outcome == "applied before a restart or lost reply"
        out["duplicate"] += outcome == "duplicate"
    return out


@contextlib.contextmanager
def simulator(meters: int, buses: int, seed: int = 0) -> Iterator[Sim]:
    sim = start_sim(meters, buses, seed)
    try:
        yield sim
    finally:
        sim.close()
