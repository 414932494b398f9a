"""The durable ledger: SQLite by default (WAL, synchronous=FULL), PostgreSQL for scale.

Both speak the same SQL through one class; only placeholders, the id column and
``FOR UPDATE SKIP LOCKED`` differ. Every state change of a command and its audit event
are written in one transaction. Work is handed out with leases: a command is claimed
together with a lease on its meter, so one meter never runs two commands at once, and two
gateway processes on one PostgreSQL database never execute one command twice (the second
skips rows the first has locked, and every later write is fenced by the lease owner).

All calls run on one worker thread per store (SQLite wants a single writer; deps.md §8), so
the asyncio loop never blocks on the disk. On SQLite the calls that queue up while one
transaction commits run together in the next (group commit: one fsync for all of them, ~10
calls per commit under load in bench/commands.py); each caller gets its result only once its
data is committed, and a call that raises fails alone: its group is rolled back and every call
in it runs again in a transaction of its own. PostgreSQL keeps one transaction per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from .model import OPEN_STATES, Command, Event, Kind, NewCommand, State, dump, load

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    idem_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    params TEXT NOT NULL,
    actor TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    valid_until TEXT,
    not_before TEXT,
    batch TEXT,
    progress TEXT,
    result TEXT,
    lease_owner TEXT,
    lease_until TEXT
);
CREATE INDEX IF NOT EXISTS commands_open ON commands (state, created_at);
CREATE INDEX IF NOT EXISTS commands_address ON commands (address, created_at);
CREATE TABLE IF NOT EXISTS events (
    id {serial},
    command_id TEXT NOT NULL,
    at TEXT NOT NULL,
    state TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL,
    frames TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_command ON events (command_id, id);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS meter_leases (
    address TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until TEXT NOT NULL,
    command_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS wallets (
    address TEXT PRIMARY KEY,
    balance_fen BIGINT NOT NULL,
    updated_at TEXT NOT NULL,
    zero_since TEXT
);
CREATE TABLE IF NOT EXISTS notices (
    id {serial},
    address TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    actor TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notices_address ON notices (address, sent_at);
CREATE TABLE IF NOT EXISTS billing_baselines (
    address TEXT PRIMARY KEY,
    frozen_at TEXT NOT NULL,
    energy TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS wallet_entries (
    id {serial},
    address TEXT NOT NULL,
    at TEXT NOT NULL,
    amount_fen BIGINT NOT NULL,
    reason TEXT NOT NULL,
    ref TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS wallet_entries_address ON wallet_entries (address, id);
CREATE TABLE IF NOT EXISTS observations (
    address TEXT PRIMARY KEY,
    at TEXT NOT NULL,
    answering INTEGER NOT NULL,
    answered_at TEXT,
    state TEXT NOT NULL
);
"""


MAX_GROUP = 64
"""Calls run in one transaction at most (group commit)."""


_METER_LOCKS = 645
"""Advisory lock class (the first key) of the meter-lease locks on PostgreSQL."""


@dataclass(frozen=True, slots=True)
class WalletEntry:
    """One booking on a remote-cost-control wallet (negative: consumption)."""

    at: datetime
    amount_fen: int
    kind: str
    """What it was: ``topup``, ``daily charge`` ... (the booking's reason)."""
    reference: str
    """What booked it, unique: ``topup:<command id>``, ``daily:<meter>:<freeze time>`` ..."""


@dataclass(frozen=True, slots=True)
class Observation:
    """The poller's last look at one meter (gateway/poller.py keeps the meaning of ``state``)."""

    address: str
    at: datetime
    """When it was last polled (answered or not)."""
    answering: bool
    answered_at: datetime | None
    """When it last answered (None: never)."""
    state: dict[str, Any]
    """What it last said: relay, power hold, balance, alarm levels, thresholds (JSON)."""


@dataclass(frozen=True, slots=True)
class MeterActivity:
    """What the command service is doing with one meter, from the ledger (the poller asks)."""

    busy: bool
    """A command holds the meter's lease, has been sent and not settled, or is due to be claimed."""
    mark: int
    """The newest audit event id of the meter's commands (0: none): it moves with every state change."""
    changed: list[Command]
    """Commands with a state change after the ``since_mark`` asked about (empty if none was given)."""


class LeaseLost(Exception):
    """Another owner holds this command now: stop working on it."""


class StoreError(Exception):
    """The ledger could not be opened or written."""


def ts(value: datetime) -> str:
    """A fixed-width UTC text timestamp that sorts like time."""
    if value.tzinfo is None:
        raise ValueError("ledger times must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def parse_ts(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


_COLUMNS = (
    "id, idem_key, kind, address, params, actor, state, created_at, updated_at, attempts, valid_until, "
    "not_before, batch, progress, result, lease_owner"
)


def _command(row: tuple[Any, ...]) -> Command:
    return Command(
        id=row[0],
        idempotency_key=row[1],
        kind=Kind(row[2]),
        address=row[3],
        params=load(row[4]) or {},
        actor=row[5],
        state=State(row[6]),
        created_at=parse_ts(row[7]),  # type: ignore[arg-type]
        updated_at=parse_ts(row[8]),
        attempts=row[9],
        valid_until=parse_ts(row[10]),  # type: ignore[arg-type]
        not_before=parse_ts(row[11]),
        batch=row[12],
        progress=load(row[13]) or {},
        result=load(row[14]),
        lease_owner=row[15],
    )


@dataclass(slots=True)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    alone: bool


def _deliver(items: list[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in items:
        if not job.future.done():
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)


@dataclass
class StoreStats:
    """How the store's thread ran the calls."""

    groups: int = 0
    """Transactions that held several calls."""
    grouped_calls: int = 0
    single_calls: int = 0
    group_retries: int = 0
    """Groups rolled back because a call raised (each call then ran alone)."""


class Store:
    """The ledger on SQLite or PostgreSQL."""

    def __init__(self, connect: Callable[[], Any], dialect: str, name: str) -> None:
        self._connect = connect
        self.dialect = dialect
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._conn: Any = None
        self._local = threading.local()
        self.group_commit = dialect == "sqlite"
        """Run the calls queued together in one transaction (SQLite: one fsync for all of them)."""
        self.stats = StoreStats()

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    def sqlite(cls, path: str | Path) -> Store:
        """A ledger in a SQLite file (WAL, synchronous=FULL: one fdatasync per commit, deps.md §8)."""

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn

        return cls(connect, "sqlite", str(path))

    @classmethod
    def postgres(cls, dsn: str, schema: str | None = None) -> Store:
        """A ledger in PostgreSQL (psycopg 3); ``schema`` isolates it (tests use one per test)."""

        def connect() -> Any:
            try:
                import psycopg
            except ImportError:  # pragma: no cover - the 'postgres' extra
                raise StoreError("PostgreSQL needs the psycopg package: pip install 'meterlink[postgres]'") from None
            try:
                conn = psycopg.connect(dsn, autocommit=True)
            except psycopg.Error as exc:
                raise StoreError(f"cannot connect to PostgreSQL: {exc}") from None
            if schema:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                conn.execute(f'SET search_path TO "{schema}"')
            return conn

        return cls(connect, "postgres", dsn if not schema else f"{dsn} (schema {schema})")

    async def open(self) -> Store:
        """Connect and create the tables."""
        await self._run(self._open_sync, alone=True)
        return self

    def _open_sync(self) -> None:
        try:
            self._conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the ledger {self.name}: {exc}") from None
        serial = "INTEGER PRIMARY KEY AUTOINCREMENT" if self.dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
        with self._transaction() as cur:
            for statement in _SCHEMA.format(serial=serial).split(";"):
                if statement.strip():
                    cur.execute(statement)

    async def close(self) -> None:
        """Close the connection and the worker thread."""
        if self._conn is not None:
            await self._run(self._conn.close, alone=True)
            self._conn = None
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    async def _run(self, fn: Callable[..., T], *args: Any, alone: bool = False) -> T:
        """Run ``fn(*args)`` on the store's thread; the result comes once its transaction is committed."""
        if self._closed:
            raise RuntimeError("the ledger is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"ledger-{self.dialect}", daemon=True)
            self._thread.start()
        self._jobs.put(_Job(fn, args, future, loop, alone))
        return await future

    # --- the store's thread: one writer, group commit ------------------------------------------------

    def _work(self) -> None:
        """Take the calls queued meanwhile (up to ``MAX_GROUP``) and run them, grouped where allowed."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            group = [job]
            while len(group) < MAX_GROUP and not job.alone and self.group_commit:
                try:
                    nxt = jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    jobs.put(None)  # stop after this group
                    break
                if nxt.alone:
                    self._settle(group)
                    group = [nxt]
                    break
                group.append(nxt)
            self._settle(group)

    def _settle(self, group: list[_Job]) -> None:
        """Run a group and hand every caller its outcome; the thread itself never dies of an error."""
        try:
            results = self._group(group)
        except BaseException as exc:  # pragma: no cover - _group reports the calls' own errors itself
            results = [(job, False, exc) for job in group]
        self._finish(results)

    def _group(self, group: list[_Job]) -> list[tuple[_Job, bool, Any]]:
        """Run the jobs; returns (job, ok, result or exception) once everything is durable.

        Several jobs share one transaction (each is a function written for a transaction of its
        own: :meth:`_transaction` joins the group's). If any of them raises, the group is rolled
        back and every job runs again in a transaction of its own, so each one's outcome is
        exactly what it would have been alone.
        """
        group = [j for j in group if not j.future.cancelled()]  # cancelled before it started: not run
        if len(group) > 1 and self._conn is not None:
            self.stats.groups += 1
            self.stats.grouped_calls += len(group)
            conn = self._conn
            cur = conn.cursor()
            self._local.group = True
            try:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    results = [(job, True, job.fn(*job.args)) for job in group]
                    cur.execute("COMMIT")
                    return results
                except BaseException:
                    with contextlib.suppress(Exception):
                        cur.execute("ROLLBACK")
                    self.stats.group_retries += 1
            except Exception:  # BEGIN failed: run them alone, each reports its own error
                pass
            finally:
                self._local.group = False
                cur.close()
        out = []
        for job in group:
            self.stats.single_calls += 1
            try:
                out.append((job, True, job.fn(*job.args)))
            except BaseException as exc:
                out.append((job, False, exc))
        return out

    @staticmethod
    def _finish(results: list[tuple[_Job, bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
        for item in results:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_deliver, items)

    def _q(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    class _Tx:
        def __init__(self, store: Store) -> None:
            self.store = store

        def __enter__(self) -> Any:
            conn = self.store._conn
            if conn is None:
                raise StoreError("the ledger is not open")
            self.cur = conn.cursor()
            self.grouped = getattr(self.store._local, "group", False)
            if not self.grouped:  # else part of the group's transaction (see Store._group)
                self.cur.execute("BEGIN IMMEDIATE" if self.store.dialect == "sqlite" else "BEGIN")
            return _Cursor(self.cur, self.store)

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if not self.grouped:
                self.cur.execute("COMMIT" if exc_type is None else "ROLLBACK")
            self.cur.close()

    def _transaction(self) -> Store._Tx:
        return Store._Tx(self)

    # --- commands -----------------------------------------------------------------------------------

    async def submit(self, new: NewCommand, now: datetime) -> tuple[Command, bool]:
        """Record a command unless its idempotency key exists; returns (command, created)."""
        return await self._run(self._submit, new, now)

    def _submit(self, new: NewCommand, now: datetime) -> tuple[Command, bool]:
        with self._transaction() as cur:
            cur.execute("SELECT " + _COLUMNS + " FROM commands WHERE idem_key = ?", (new.idempotency_key,))
            row = cur.fetchone()
            if row is not None:
                return _command(row), False
            cid = uuid.uuid4().hex
            stamp = ts(now)
            # ON CONFLICT: another gateway on the same PostgreSQL ledger may record the same key
            # between the SELECT and here (two gateways receive every MQTT command); the INSERT
            # then waits for its commit and inserts nothing, and its command is the first.
            cur.execute(
                "INSERT INTO commands (id, idem_key, kind, address, params, actor, state, created_at, updated_at, "
                "valid_until, batch, not_before) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (idem_key) DO NOTHING",
                (
                    cid,
                    new.idempotency_key,
                    new.kind.value,
                    new.address,
                    dump(new.params),
                    new.actor,
                    State.ACCEPTED.value,
                    stamp,
                    stamp,
                    ts(new.valid_until) if new.valid_until else None,
                    new.batch,
                    ts(new.not_before) if new.not_before else None,
                ),
            )
            if cur.rowcount == 0:
                cur.execute("SELECT " + _COLUMNS + " FROM commands WHERE idem_key = ?", (new.idempotency_key,))
                return _command(cur.fetchone()), False
            self._event(cur, cid, stamp, State.ACCEPTED, new.actor, {"params": new.params}, [])
            cur.execute("SELECT " + _COLUMNS + " FROM commands WHERE id = ?", (cid,))
            return _command(cur.fetchone()), True

    @staticmethod
    def _event(
        cur: Any, cid: str, stamp: str, state: State, actor: str, detail: dict[str, Any], frames: list[str]
    ) -> None:
        cur.execute(
            "INSERT INTO events (command_id, at, state, actor, detail, frames) VALUES (?, ?, ?, ?, ?, ?)",
            (cid, stamp, state.value, actor, dump(detail), dump(frames)),
        )

    async def claim(self, owner: str, now: datetime, lease: timedelta, limit: int = 10) -> list[Command]:
        """Lease up to ``limit`` open commands whose meters are free; oldest first."""
        return await self._run(self._claim, owner, now, lease, limit)

    def _claim(self, owner: str, now: datetime, lease: timedelta, limit: int) -> list[Command]:
        stamp, until = ts(now), ts(now + lease)
        claimable = (
            "state IN (?, ?) AND (lease_until IS NULL OR lease_until < ?) AND (not_before IS NULL OR not_before <= ?)"
        )
        args = (State.ACCEPTED.value, State.SENT.value, stamp, stamp)
        claimed: list[Command] = []
        with self._transaction() as cur:
            cur.execute(
                f"SELECT id, address FROM commands WHERE {claimable} ORDER BY created_at LIMIT ?", (*args, limit * 4)
            )
            seen: set[str] = set()
            for cid, address in cur.fetchall():
                if len(claimed) >= limit or address in seen:
                    continue
                # Only a meter's oldest claimable command may go, so commands on one meter run in
                # order; if it cannot be had now, the meter waits for the next claim.
                seen.add(address)
                if self.dialect == "postgres":
                    # Lock the rows one by one, and only those tried: a row another gateway's claim
                    # has locked is skipped, and with it its meter (not the meter's next command).
                    cur.execute(
                        f"SELECT id FROM commands WHERE id = ? AND {claimable} FOR UPDATE SKIP LOCKED", (cid, *args)
                    )
                    if cur.fetchone() is None:
                        continue
                if not self._meter_lock(cur, address, wait=False):
                    continue
                cur.execute(
                    "INSERT INTO meter_leases (address, owner, until, command_id) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (address) DO UPDATE SET owner = excluded.owner, until = excluded.until, "
                    "command_id = excluded.command_id "
                    "WHERE meter_leases.until < ? OR meter_leases.command_id = excluded.command_id",
                    (address, owner, until, cid, stamp),
                )
                if cur.rowcount != 1:
                    continue  # another command holds this meter
                cur.execute("UPDATE commands SET lease_owner = ?, lease_until = ? WHERE id = ?", (owner, until, cid))
                cur.execute("SELECT " + _COLUMNS + " FROM commands WHERE id = ?", (cid,))
                claimed.append(_command(cur.fetchone()))
        return claimed

    def _meter_lock(self, cur: Any, address: str, *, wait: bool) -> bool:
        """PostgreSQL: the transaction's advisory lock on a meter's lease row (SQLite's writer is alone).

        Claims only *try* it and skip a meter another transaction is taking or freeing, so a
        claim never waits on a lock: two gateways' claims that lease meters in different orders
        (oldest command first) cannot deadlock each other or a transition. Every other write to
        ``meter_leases`` waits for it first, so a claim holding it never waits on the row either.
        """
        if self.dialect != "postgres":
            return True
        fn = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        cur.execute(f"SELECT {fn}({_METER_LOCKS}, hashtext(?))", (address,))
        return bool(cur.fetchone()[0]) if not wait else True

    async def renew(self, command: Command, owner: str, now: datetime, lease: timedelta) -> None:
        """Extend a lease still held; raises :class:`LeaseLost`."""
        await self._run(self._renew, command, owner, now, lease)

    def _renew(self, command: Command, owner: str, now: datetime, lease: timedelta) -> None:
        until = ts(now + lease)
        with self._transaction() as cur:
            cur.execute(
                "UPDATE commands SET lease_until = ? WHERE id = ? AND lease_owner = ?", (until, command.id, owner)
            )
            if cur.rowcount != 1:
                raise LeaseLost(command.id)
            self._meter_lock(cur, command.address, wait=True)
            cur.execute(
                "UPDATE meter_leases SET until = ? WHERE address = ? AND owner = ?", (until, command.address, owner)
            )

    async def transition(
        self,
        command: Command,
        owner: str,
        state: State,
        now: datetime,
        *,
        detail: dict[str, Any] | None = None,
        frames: list[str] | None = None,
        progress: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        attempt: bool = False,
        not_before: datetime | None = None,
        wallet: tuple[int, str, str] | None = None,
    ) -> Command:
        """Record a state change and its audit event in one transaction (fenced by the lease).

        ``wallet`` = (amount_fen, reason, ref) also books a remote-wallet entry, once per ref.
        A final state releases the command's and the meter's leases.
        """
        return await self._run(
            self._transition,
            command,
            owner,
            state,
            now,
            detail or {},
            frames or [],
            progress,
            result,
            attempt,
            not_before,
            wallet,
        )

    def _transition(
        self,
        command: Command,
        owner: str,
        state: State,
        now: datetime,
        detail: dict[str, Any],
        frames: list[str],
        progress: dict[str, Any] | None,
        result: dict[str, Any] | None,
        attempt: bool,
        not_before: datetime | None,
        wallet: tuple[int, str, str] | None,
    ) -> Command:
        stamp = ts(now)
        with self._transaction() as cur:
            sets = ["state = ?", "updated_at = ?"]
            args: list[Any] = [state.value, stamp]
            if progress is not None:
                sets.append("progress = ?")
                args.append(dump(progress))
            if result is not None:
                sets.append("result = ?")
                args.append(dump(result))
            if attempt:
                sets.append("attempts = attempts + 1")
            if not_before is not None:
                sets.append("not_before = ?")
                args.append(ts(not_before))
            if state.final:
                sets.append("lease_owner = NULL")
                sets.append("lease_until = NULL")
            cur.execute(
                f"UPDATE commands SET {', '.join(sets)} WHERE id = ? AND lease_owner = ?", (*args, command.id, owner)
            )
            if cur.rowcount != 1:
                raise LeaseLost(command.id)
            self._event(cur, command.id, stamp, state, owner, detail, frames)
            if wallet is not None:
                self._book(cur, command.address, stamp, *wallet)
            if state.final or not_before is not None:
                self._meter_lock(cur, command.address, wait=True)
                cur.execute(
                    "DELETE FROM meter_leases WHERE address = ? AND owner = ? AND command_id = ?",
                    (command.address, owner, command.id),
                )
                if not state.final:
                    cur.execute(
                        "UPDATE commands SET lease_owner = NULL, lease_until = NULL WHERE id = ?", (command.id,)
                    )
            cur.execute("SELECT " + _COLUMNS + " FROM commands WHERE id = ?", (command.id,))
            return _command(cur.fetchone())

    async def release(self, command: Command, owner: str) -> None:
        """Give a lease back without a state change (shutdown)."""
        await self._run(self._release, command, owner)

    def _release(self, command: Command, owner: str) -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE commands SET lease_owner = NULL, lease_until = NULL WHERE id = ? AND lease_owner = ?",
                (command.id, owner),
            )
            self._meter_lock(cur, command.address, wait=True)
            cur.execute("DELETE FROM meter_leases WHERE address = ? AND owner = ?", (command.address, owner))

    # --- queries --------------------------------------------------------------------------------------

    async def get(self, command_id: str) -> Command | None:
        return await self._run(self._get, "id", command_id)

    async def get_by_key(self, key: str) -> Command | None:
        return await self._run(self._get, "idem_key", key)

    def _get(self, column: str, value: str) -> Command | None:
        with self._transaction() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM commands WHERE {column} = ?", (value,))
            row = cur.fetchone()
            return _command(row) if row else None

    async def commands(
        self,
        *,
        address: str | None = None,
        state: State | None = None,
        batch: str | None = None,
        kind: Kind | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Command]:
        """Commands, newest first, filtered."""
        return await self._run(self._commands, address, state, batch, kind, limit, offset)

    def _commands(
        self,
        address: str | None,
        state: State | None,
        batch: str | None,
        kind: Kind | None,
        limit: int,
        offset: int,
    ) -> list[Command]:
        where, args = [], []
        filters = (
            ("address", address),
            ("state", state.value if state else None),
            ("batch", batch),
            ("kind", kind.value if kind else None),
        )
        for column, value in filters:
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._transaction() as cur:
            cur.execute(
                f"SELECT {_COLUMNS} FROM commands{clause} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            )
            return [_command(r) for r in cur.fetchall()]

    async def events(
        self,
        *,
        command_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        address: str | None = None,
        after_id: int | None = None,
    ) -> list[Event]:
        """Audit events in order; ``address``: of that meter's commands only; ``after_id``: the
        events after that one (paging)."""
        return await self._run(self._events, command_id, since, until, limit, address, after_id)

    def _events(
        self,
        command_id: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        address: str | None = None,
        after_id: int | None = None,
    ) -> list[Event]:
        where: list[str] = []
        args: list[Any] = []
        if command_id is not None:
            where.append("command_id = ?")
            args.append(command_id)
        if address is not None:
            where.append("command_id IN (SELECT id FROM commands WHERE address = ?)")
            args.append(address)
        if after_id is not None:
            where.append("id > ?")
            args.append(after_id)
        if since is not None:
            where.append("at >= ?")
            args.append(ts(since))
        if until is not None:
            where.append("at < ?")
            args.append(ts(until))
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        with self._transaction() as cur:
            cur.execute(
                f"SELECT id, command_id, at, state, actor, detail, frames FROM events{clause} ORDER BY id LIMIT ?",
                (*args, limit),
            )
            return [
                Event(r[0], r[1], parse_ts(r[2]), State(r[3]), r[4], load(r[5]) or {}, load(r[6]) or [])  # type: ignore[arg-type]
                for r in cur.fetchall()
            ]

    async def open_commands(self) -> int:
        """How many commands are not final yet."""
        return await self._run(self._open_count)

    def _open_count(self) -> int:
        with self._transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM commands WHERE state IN (?, ?)", tuple(s.value for s in OPEN_STATES))
            return int(cur.fetchone()[0])

    # --- remote cost control: the ledger is the wallet ------------------------------------------------------

    def _book(self, cur: Any, address: str, stamp: str, amount: int, reason: str, ref: str) -> bool:
        cur.execute("SELECT 1 FROM wallet_entries WHERE ref = ?", (ref,))
        if cur.fetchone() is not None:
            return False  # already booked: an entry is applied once per reference
        cur.execute(
            "INSERT INTO wallet_entries (address, at, amount_fen, reason, ref) VALUES (?, ?, ?, ?, ?)",
            (address, stamp, amount, reason, ref),
        )
        cur.execute(
            "INSERT INTO wallets (address, balance_fen, updated_at) VALUES (?, ?, ?) ON CONFLICT (address) DO UPDATE "
            "SET balance_fen = wallets.balance_fen + excluded.balance_fen, updated_at = excluded.updated_at",
            (address, amount, stamp),
        )
        # When the balance reached zero is kept with it: the grace period survives a restart.
        cur.execute(
            "UPDATE wallets SET zero_since = CASE WHEN balance_fen > 0 THEN NULL "
            "ELSE COALESCE(zero_since, ?) END WHERE address = ?",
            (stamp, address),
        )
        return True

    async def book(self, address: str, amount_fen: int, reason: str, ref: str, now: datetime) -> bool:
        """Book a wallet entry (negative = consumption) once per ``ref``; returns whether it was new."""
        return await self._run(self._book_tx, address, amount_fen, reason, ref, now)

    def _book_tx(self, address: str, amount: int, reason: str, ref: str, now: datetime) -> bool:
        with self._transaction() as cur:
            return self._book(cur, address, ts(now), amount, reason, ref)

    async def baseline(self, address: str) -> tuple[datetime, list[str]] | None:
        """The daily freeze the next remote charge counts from: (freeze time, T1..T4 kWh as text)."""
        return await self._run(self._baseline, address)

    def _baseline(self, address: str) -> tuple[datetime, list[str]] | None:
        with self._transaction() as cur:
            cur.execute("SELECT frozen_at, energy FROM billing_baselines WHERE address = ?", (address,))
            row = cur.fetchone()
            return (parse_ts(row[0]), load(row[1])) if row else None  # type: ignore[return-value]

    async def settle(
        self,
        address: str,
        previous: datetime | None,
        frozen_at: datetime,
        energy: list[str],
        charge: tuple[int, str, str] | None,
        now: datetime,
    ) -> bool:
        """Move a meter's billing baseline from ``previous`` (the freeze the charge was computed
        from; None: there was none) to ``frozen_at`` and book the charge, in one transaction.

        Compare-and-set: if the baseline is no longer ``previous`` (another billing run moved it
        meanwhile, e.g. a second gateway), nothing is moved or booked and False is returned, so
        no day is charged twice. ``charge`` = (amount_fen, reason, ref), booked once per ref.
        Returns whether the charge was booked.
        """
        return await self._run(self._settle_bill, address, previous, frozen_at, energy, charge, now)

    def _settle_bill(
        self,
        address: str,
        previous: datetime | None,
        frozen_at: datetime,
        energy: list[str],
        charge: tuple[int, str, str] | None,
        now: datetime,
    ) -> bool:
        with self._transaction() as cur:
            if previous is None:
                cur.execute(
                    "INSERT INTO billing_baselines (address, frozen_at, energy) VALUES (?, ?, ?) "
                    "ON CONFLICT (address) DO NOTHING",
                    (address, ts(frozen_at), dump(energy)),
                )
            else:
                cur.execute(
                    "UPDATE billing_baselines SET frozen_at = ?, energy = ? WHERE address = ? AND frozen_at = ?",
                    (ts(frozen_at), dump(energy), address, ts(previous)),
                )
            if cur.rowcount != 1:
                return False  # another run moved the baseline first: its charge covers this
            if charge is None or not charge[0]:
                return False
            return self._book(cur, address, ts(now), *charge)

    async def record_notice(self, address: str, sent_at: datetime, actor: str, text: str = "") -> None:
        """Record that a disconnection notice went out to the customer of ``address``."""
        await self._run(self._record_notice, address, sent_at, actor, text)

    def _record_notice(self, address: str, sent_at: datetime, actor: str, text: str) -> None:
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO notices (address, sent_at, actor, text) VALUES (?, ?, ?, ?)",
                (address, ts(sent_at), actor, text),
            )

    async def last_notice(self, address: str) -> datetime | None:
        """When the latest disconnection notice to this customer went out (None: never)."""
        return await self._run(self._last_notice, address)

    def _last_notice(self, address: str) -> datetime | None:
        with self._transaction() as cur:
            cur.execute("SELECT MAX(sent_at) FROM notices WHERE address = ?", (address,))
            row = cur.fetchone()
            return parse_ts(row[0]) if row and row[0] else None

    async def notices(self, address: str, since: datetime) -> list[datetime]:
        """When each notice to this customer since ``since`` went out, oldest first."""
        return await self._run(self._notices, address, since)

    def _notices(self, address: str, since: datetime) -> list[datetime]:
        with self._transaction() as cur:
            cur.execute(
                "SELECT sent_at FROM notices WHERE address = ? AND sent_at >= ? ORDER BY sent_at", (address, ts(since))
            )
            return [parse_ts(r[0]) for r in cur.fetchall()]

    async def zero_since(self, address: str) -> datetime | None:
        """When a remote wallet's balance reached zero (None: it is above zero, or has no wallet)."""
        return await self._run(self._zero_since, address)

    def _zero_since(self, address: str) -> datetime | None:
        with self._transaction() as cur:
            cur.execute("SELECT zero_since FROM wallets WHERE address = ?", (address,))
            row = cur.fetchone()
            return parse_ts(row[0]) if row else None

    async def wallet(self, address: str) -> int | None:
        """Balance of a remote-cost-control wallet in fen (None: no wallet yet)."""
        return await self._run(self._wallet, address)

    def _wallet(self, address: str) -> int | None:
        with self._transaction() as cur:
            cur.execute("SELECT balance_fen FROM wallets WHERE address = ?", (address,))
            row = cur.fetchone()
            return int(row[0]) if row else None

    async def wallet_entries(self, address: str, limit: int = 100, offset: int = 0) -> tuple[list[WalletEntry], int]:
        """A remote wallet's bookings, newest first, one page; and how many there are in all."""
        return await self._run(self._wallet_entries, address, limit, offset)

    def _wallet_entries(self, address: str, limit: int, offset: int) -> tuple[list[WalletEntry], int]:
        with self._transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM wallet_entries WHERE address = ?", (address,))
            total = int(cur.fetchone()[0])
            cur.execute(
                "SELECT at, amount_fen, reason, ref FROM wallet_entries WHERE address = ? "
                "ORDER BY at DESC, id DESC LIMIT ? OFFSET ?",
                (address, limit, offset),
            )
            rows = [WalletEntry(parse_ts(r[0]), int(r[1]), r[2], r[3]) for r in cur.fetchall()]  # type: ignore[arg-type]
            return rows, total

    # --- relay facts and meter observations ----------------------------------------------------------------

    async def confirmed_power_hold(self, address: str) -> bool | None:
        """Power hold as the meter's last confirmed power-hold command left it (None: there was none)."""
        return await self._run(self._confirmed_power_hold, address)

    def _confirmed_power_hold(self, address: str) -> bool | None:
        with self._transaction() as cur:
            cur.execute(
                "SELECT params FROM commands WHERE address = ? AND kind = ? AND state = ? AND params LIKE ? "
                "ORDER BY updated_at DESC, id LIMIT 20",
                (address, Kind.RELAY.value, State.CONFIRMED.value, '%"action":"power-hold-%'),
            )
            for (params,) in cur.fetchall():
                action = (load(params) or {}).get("action")
                if action in ("power-hold-on", "power-hold-off"):
                    return action == "power-hold-on"
            return None

    async def meter_activity(self, address: str, now: datetime, since_mark: int | None = None) -> MeterActivity:
        """Whether a command is at work on ``address`` now, the mark of its latest state change, and
        (with ``since_mark``) the commands that changed after that mark."""
        return await self._run(self._meter_activity, address, now, since_mark)

    def _meter_activity(self, address: str, now: datetime, since_mark: int | None) -> MeterActivity:
        stamp = ts(now)
        with self._transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM meter_leases WHERE address = ? AND until > ?", (address, stamp))
            leased = int(cur.fetchone()[0]) > 0
            cur.execute(
                "SELECT COUNT(*) FROM commands WHERE address = ? AND "
                "(state = ? OR (state = ? AND (not_before IS NULL OR not_before <= ?)))",
                (address, State.SENT.value, State.ACCEPTED.value, stamp),
            )
            due = int(cur.fetchone()[0]) > 0
            cur.execute(
                "SELECT COALESCE(MAX(e.id), 0) FROM events e JOIN commands c ON c.id = e.command_id "
                "WHERE c.address = ?",
                (address,),
            )
            mark = int(cur.fetchone()[0])
            changed: list[Command] = []
            if since_mark is not None and mark > since_mark:
                cur.execute(
                    f"SELECT {_COLUMNS} FROM commands WHERE address = ? AND EXISTS "
                    "(SELECT 1 FROM events e WHERE e.command_id = commands.id AND e.id > ?) ORDER BY updated_at",
                    (address, since_mark),
                )
                changed = [_command(r) for r in cur.fetchall()]
            return MeterActivity(leased or due, mark, changed)

    async def line_busy(self, addresses: list[str], now: datetime) -> bool:
        """Whether a command holds the lease of any of these meters now (a line's commands are running)."""
        return await self._run(self._line_busy, addresses, now)

    def _line_busy(self, addresses: list[str], now: datetime) -> bool:
        if not addresses:
            return False
        with self._transaction() as cur:
            marks = ", ".join("?" for _ in addresses)
            cur.execute(
                f"SELECT COUNT(*) FROM meter_leases WHERE until > ? AND address IN ({marks})", (ts(now), *addresses)
            )
            return int(cur.fetchone()[0]) > 0

    async def observation(self, address: str) -> Observation | None:
        """The poller's last observation of a meter (None: never polled)."""
        return await self._run(self._observation, address)

    def _observation(self, address: str) -> Observation | None:
        with self._transaction() as cur:
            cur.execute(
                "SELECT address, at, answering, answered_at, state FROM observations WHERE address = ?", (address,)
            )
            row = cur.fetchone()
            if row is None:
                return None
            return Observation(row[0], parse_ts(row[1]), bool(row[2]), parse_ts(row[3]), load(row[4]) or {})  # type: ignore[arg-type]

    async def save_observation(self, observation: Observation, previous: Observation | None) -> bool:
        """Keep a meter's latest observation in place of ``previous`` (None: there was none).

        Compare-and-set: if the stored one is no longer ``previous`` (another gateway polled the
        meter meanwhile), nothing is written and False is returned, so a change is reported once.
        """
        return await self._run(self._save_observation, observation, previous)

    def _save_observation(self, o: Observation, previous: Observation | None) -> bool:
        values = (ts(o.at), int(o.answering), ts(o.answered_at) if o.answered_at else None, dump(o.state))
        with self._transaction() as cur:
            if previous is None:
                cur.execute(
                    "INSERT INTO observations (at, answering, answered_at, state, address) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (address) DO NOTHING",
                    (*values, o.address),
                )
            else:
                cur.execute(
                    "UPDATE observations SET at = ?, answering = ?, answered_at = ?, state = ? "
                    "WHERE address = ? AND at = ? AND state = ?",
                    (*values, o.address, ts(previous.at), dump(previous.state)),
                )
            return cur.rowcount == 1


class _Cursor:
    """A cursor that takes ``?`` placeholders on both dialects."""

    def __init__(self, cur: Any, store: Store) -> None:
        self._cur = cur
        self._store = store

    def execute(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> Any:
        return self._cur.execute(self._store._q(sql), tuple(args))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cur.fetchall()

    @property
    def rowcount(self) -> int:
        return self._cur.rowcount
