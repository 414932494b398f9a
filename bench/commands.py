"""Command benchmark: top-ups per second end to end (REST API → ledger → meter → read-back).

Run from the repository root::

    .venv/bin/python bench/commands.py [--seconds 15] [--window 50] [--profile] [--baseline]

Three processes on this machine (2 cores), all on loopback:

* **simulator** — a child process (``multiprocessing``, spawn) pinned to CPU 0: 1,000
  local cost-control meters on 50 lines of 20 (``from_flags(1000, 50)``, line timing off,
  virtual clock at real speed), each line served by the simulator's TCP server
  (:func:`simulator.transports.tcp.serve_tcp`) like an RS-485-to-Ethernet converter. It is
  also the ground truth: every meter's purchase count before and after.
* **gateway** — this process, pinned to CPU 1: :class:`gateway.app.Gateway` as
  ``meterlink gateway`` runs it, from a :class:`gateway.config.GatewayConfig`: 50
  ``tcp://`` lines (gap 0: the simulated meters need none), a SQLite ledger in WAL mode with
  ``synchronous=FULL`` (one fdatasync per commit; in a temporary directory under ``--dir``,
  default the repository, which is on disk — not tmpfs), the command service and the REST
  API served by **uvicorn on a real socket** (h11: httptools is not installed). Nothing is
  mocked: every top-up is read purchase count 03330201, read balance 00900200, identity
  authentication (once per meter, then the session is cached), the ``sent`` transition with
  the purchase count, the MAC'd recharge 070102FF, the read-back of count and balance and the
  ``confirmed`` transition.
* **client** — a child process pinned to CPU 0 (beside the simulator, so the gateway has its
  core to itself): ``--connections`` keep-alive HTTP/1.1 connections (raw asyncio streams; a
  load generator must cost little) that ``POST /commands`` top-ups of 1.00 yuan with an
  ``X-API-Key`` and an idempotency key, keeping ``--window`` top-ups in flight, at most one
  per meter, meters taken round robin across the lines.

Latency is **submit → confirmed**: from the moment the client writes the POST (its
``time.monotonic()``) to the moment the gateway has committed the ``confirmed`` state to the
ledger (a listener on the command service, :attr:`CommandService.listeners`, takes
``time.monotonic()`` right after the transition returns; CLOCK_MONOTONIC is one clock for
every process on Linux). The listener also tells the client over a socket which commands are
final, so it can keep the window full; that costs the gateway one short write per command.

First a warm-up gives every meter one top-up (so every meter has an authentication session,
as a running gateway's would), then the measured window runs for ``--seconds``: throughput is
the top-ups confirmed in the window divided by its length; p50 / p99 are over the top-ups
submitted in the window. Afterwards the ledger is checked against the simulator: every
meter's purchase count went up by exactly its number of confirmed top-ups, and no command
ended other than ``confirmed``. ``--profile`` runs cProfile in the gateway's event-loop
thread during the window and prints the top functions (the profiler slows the gateway, so
that run's rate is not a result). ``--baseline`` turns the ledger's group commit off (one
transaction and one fsync per ledger call, as before it), for an A/B on the same machine.

The CPU line shows where the two cores went in the window (``/proc``): each process, the
ledger's thread inside the gateway, and everything else on the machine (it may be shared).
The window (50) keeps every line busy; more only queues (throughput stays, latency grows).

Target: >= 300 top-ups/s. The last line printed is ``topups_per_s=<x> p50_ms=<y> p99_ms=<z>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

METERS = 1000
LINES = 50
AMOUNT = "1.00"
API_KEY = "bench-key-0123456789"
TARGET = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pin(cpu: int) -> None:
    """Run this process on CPU ``cpu`` only (children inherit it: each child pins itself)."""
    with contextlib.suppress(AttributeError, OSError):
        if (os.cpu_count() or 1) > cpu:
            os.sched_setaffinity(0, {cpu})


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (all threads), or of one of its threads, from /proc."""
    with open(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> float:
    """CPU time used by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def top(profile: cProfile.Profile, n: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(n)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join("    " + line.replace(str(Path.cwd()) + "/", "") for line in lines[start:] if line.strip())


# --- the simulator process -------------------------------------------------------------------------------


def sim_main(meters: int, lines: int, conn: Any) -> None:
    """The fleet on one TCP port per line; answers "truth" (purchase counts) and "stop" on ``conn``."""
    pin(0)
    from simulator.clock import VirtualClock
    from simulator.fleet import Fleet
    from simulator.scenario import from_flags
    from simulator.transports.tcp import serve_tcp

    async def main() -> None:
        scenario = from_flags(meters, lines, seed=1, timing=False, speed=1.0)
        fleet = Fleet(scenario.buses, VirtualClock(scenario.start, scenario.speed), scenario.seed)
        endpoints = [await serve_tcp(bus, "127.0.0.1", 0) for bus in fleet.buses.values()]
        layout = {
            name: (ep.port, list(bus.meters)) for (name, bus), ep in zip(fleet.buses.items(), endpoints, strict=True)
        }

        def truth() -> dict[str, int]:
            return {a: int(fleet.state(a)["purchase_count"]) for a in fleet.meters}

        conn.send(("ready", layout, truth()))
        loop = asyncio.get_running_loop()
        incoming: asyncio.Queue[str] = asyncio.Queue()
        loop.add_reader(conn.fileno(), lambda: incoming.put_nowait(conn.recv()))
        while True:
            command = await incoming.get()
            if command == "truth":
                conn.send(("truth", truth()))
            elif command == "stop":
                loop.remove_reader(conn.fileno())
                for ep in endpoints:
                    await ep.aclose()
                conn.send(("stopped",))
                return

    asyncio.run(main())


# --- the client process ----------------------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the reply (Content-Length bodies)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, Any]:
        assert self.reader is not None and self.writer is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length)) if length else None


def client_main(
    api: tuple[str, int], feedback: int, order: list[str], args: dict[str, Any], run_id: str, conn: Any
) -> None:
    """Keep ``window`` top-ups in flight: warm-up (one per meter), then the measured window."""
    pin(0)

    async def main() -> None:
        window: int = args["window"]
        reader, _writer = await asyncio.open_connection("127.0.0.1", feedback)
        pool: asyncio.Queue[HttpConnection] = asyncio.Queue()
        for _ in range(args["connections"]):
            c = HttpConnection(*api)
            await c.open()
            pool.put_nowait(c)
        busy: set[str] = set()
        waiting: dict[str, tuple[str, float]] = {}  # command id -> (address, submitted)
        early: dict[str, tuple[str, float]] = {}  # final before the POST's reply arrived
        slots = asyncio.Semaphore(window)
        measuring = False
        t_start = t_end = 0.0
        latencies: list[float] = []
        api_latencies: list[float] = []
        finals: Counter[str] = Counter()
        confirmed_in_window = 0
        submitted = 0
        seq = 0
        warm_left = set(order)
        warm_done = asyncio.Event()

        def finish(cid: str, address: str, sent: float, state: str, at: float) -> None:
            nonlocal confirmed_in_window
            busy.discard(address)
            slots.release()
            finals[state] += 1
            warm_left.discard(address)
            if not warm_left:
                warm_done.set()
            if measuring and sent >= t_start and state == "confirmed":
                latencies.append(at - sent)
            if measuring and t_start <= at <= t_end and state == "confirmed":
                confirmed_in_window += 1

        async def feedback_reader() -> None:
            while line := await reader.readline():
                cid, state, at = line.decode().split()
                entry = waiting.pop(cid, None)
                if entry is None:
                    early[cid] = (state, float(at))
                    continue
                finish(cid, entry[0], entry[1], state, float(at))

        async def submit(address: str) -> None:
            nonlocal seq, submitted
            seq += 1
            body = json.dumps(
                {
                    "kind": "topup",
                    "address": address,
                    "params": {"amount": AMOUNT},
                    "idempotency_key": f"bench-{run_id}-{seq}",
                }
            ).encode()
            c = await pool.get()
            sent = time.monotonic()
            try:
                status, reply = await c.post("/commands", body)
            finally:
                pool.put_nowait(c)
            if measuring:
                api_latencies.append(time.monotonic() - sent)
            if status != 201:
                raise SystemExit(f"POST /commands: {status} {reply}")
            submitted += 1
            cid = reply["id"]
            if cid in early:
                state, at = early.pop(cid)
                finish(cid, address, sent, state, at)
            else:
                waiting[cid] = (address, sent)

        tasks: set[asyncio.Task[None]] = set()

        def spawn(address: str) -> None:
            busy.add(address)
            task = asyncio.create_task(submit(address))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def warm_up() -> None:
            for address in order:
                await slots.acquire()
                spawn(address)

        async def feed(stop_at: float) -> None:
            k = 0
            while time.monotonic() < stop_at:
                await slots.acquire()
                while order[k % len(order)] in busy:  # window < meters: a free one exists
                    k += 1
                spawn(order[k % len(order)])
                k += 1

        fb = asyncio.create_task(feedback_reader())
        await warm_up()
        await asyncio.wait_for(warm_done.wait(), 120)
        conn.send(("measuring",))
        measuring = True
        t_start = time.monotonic()
        t_end = t_start + args["seconds"]
        await feed(t_end)
        end_wait = time.monotonic() + 30
        while (waiting or tasks) and time.monotonic() < end_wait:
            await asyncio.sleep(0.01)
        conn.send(("window-done",))
        fb.cancel()
        latencies.sort()
        api_latencies.sort()
        conn.send(
            (
                "result",
                {
                    "seconds": t_end - t_start,
                    "confirmed": confirmed_in_window,
                    "latencies": latencies,
                    "api_p50": percentile(api_latencies, 0.5),
                    "api_p99": percentile(api_latencies, 0.99),
                    "finals": dict(finals),
                    "submitted": submitted,
                    "unfinished": len(waiting),
                },
            )
        )

    asyncio.run(main())


# --- the gateway (this process) --------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> int:
    pin(1)
    from gateway.app import Gateway
    from gateway.config import BusConfig, GatewayConfig
    from gateway.ledger import Kind, State
    from gateway.link import LinkConfig
    from gateway.service import MeterEntry, ServiceConfig

    ctx = mp.get_context("spawn")
    sim_conn, sim_child = ctx.Pipe()
    sim = ctx.Process(target=sim_main, args=(args.meters, args.lines, sim_child), daemon=True, name="meterlink-sim")
    sim.start()
    loop = asyncio.get_running_loop()

    async def recv(c: Any, timeout: float = 120.0) -> tuple[Any, ...]:
        if not await loop.run_in_executor(None, c.poll, timeout):
            raise SystemExit("a child process did not answer")
        return c.recv()

    _, layout, before = await recv(sim_conn)
    buses, meters = [], {}
    for name, (port, addresses) in layout.items():
        buses.append(BusConfig(name, f"tcp://127.0.0.1:{port}", LinkConfig(gap_s=0.0)))
        for a in addresses:
            meters[a] = MeterEntry(a, name)
    tmp = tempfile.TemporaryDirectory(prefix="meterlink-bench-", dir=args.dir)
    config = GatewayConfig(
        buses=buses,
        meters=meters,
        sqlite=str(Path(tmp.name) / "ledger.sqlite"),
        api_listen=("127.0.0.1", 0),
        api_keys={"bench": API_KEY},
        service=ServiceConfig(concurrency=args.concurrency),
    )
    gw = await Gateway(config, owner="bench").start()
    assert gw.service is not None and gw.store is not None and gw.api_url is not None
    gw.store.group_commit = not args.baseline
    host, _, port = gw.api_url.removeprefix("http://").rpartition(":")

    # The feedback channel: the service's listener says which commands are final, and when.
    writers: list[asyncio.StreamWriter] = []
    pending: list[str] = []

    def flush() -> None:
        if writers and pending:
            writers[0].write("".join(pending).encode())
            pending.clear()

    def listener(command: Any, info: dict[str, Any]) -> None:
        if command.state.final:
            if not pending:
                loop.call_soon(flush)
            pending.append(f"{command.id} {command.state.value} {time.monotonic():.6f}\n")

    gw.service.listeners.append(listener)
    connected = asyncio.Event()

    async def on_client(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.append(w)
        connected.set()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    fb_port = server.sockets[0].getsockname()[1]

    # Meters in line-interleaved order, so consecutive top-ups go to different lines.
    per_line = [addresses for _, (_, addresses) in layout.items()]
    order = [line[i] for i in range(max(map(len, per_line))) for line in per_line if i < len(line)]
    client_conn, client_child = ctx.Pipe()
    client_args = {"window": args.window, "connections": args.connections, "seconds": args.seconds}
    client = ctx.Process(
        target=client_main,
        args=((host, int(port)), fb_port, order, client_args, os.urandom(4).hex(), client_child),
        daemon=True,
        name="meterlink-bench-client",
    )
    client.start()
    pids = {"gateway": os.getpid(), "simulator": sim.pid, "client": client.pid}
    await asyncio.wait_for(connected.wait(), 30)
    t0 = time.monotonic()
    assert (await recv(client_conn))[0] == "measuring"
    warm = time.monotonic() - t0
    ledger_tid = gw.store._thread.native_id if gw.store._thread is not None else None
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items() if p}
    machine0 = machine_cpu_seconds()
    ledger0 = cpu_seconds(os.getpid(), ledger_tid) if ledger_tid else 0.0
    w0 = time.monotonic()
    profile = None
    if args.profile:
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
    assert (await recv(client_conn))[0] == "window-done"
    if profile is not None:
        profile.disable()
    elapsed = time.monotonic() - w0
    cpu = {k: (cpu_seconds(p) - cpu0[k]) / elapsed for k, p in pids.items() if p}
    others = (machine_cpu_seconds() - machine0) / elapsed - sum(cpu.values())
    ledger_cpu = (cpu_seconds(os.getpid(), ledger_tid) - ledger0) / elapsed if ledger_tid else float("nan")
    _, result = await recv(client_conn)
    client.join(10)

    await gw.service.drain(30)
    commands = await gw.store.commands(limit=1_000_000)
    states = Counter(c.state.value for c in commands)
    confirmed_per_meter = Counter(c.address for c in commands if c.kind is Kind.TOPUP and c.state is State.CONFIRMED)
    sim_conn.send("truth")
    _, after = await recv(sim_conn)
    mismatches = [
        f"{a}: meter count +{after[a] - before[a]}, ledger confirmed {confirmed_per_meter[a]}"
        for a in before
        if after[a] - before[a] != confirmed_per_meter[a]
    ]
    store_stats = gw.store.stats
    await gw.stop()
    server.close()
    sim_conn.send("stop")
    await recv(sim_conn)
    sim.join(10)
    tmp.cleanup()

    lat = result["latencies"]
    rate = result["confirmed"] / result["seconds"]
    p50, p99 = percentile(lat, 0.5) * 1000, percentile(lat, 0.99) * 1000
    print(
        f"meterlink bench/commands: {args.meters} meters on {args.lines} lines (simulator TCP, line timing off), "
        f"SQLite WAL synchronous=FULL, REST API on uvicorn; window {args.window}, {args.connections} connections, "
        f"service concurrency {args.concurrency}; Python {platform.python_version()}, {os.cpu_count()} CPUs"
    )
    print(f"  warm-up: one top-up per meter in {warm:.1f} s")
    print(
        f"  window {result['seconds']:.1f} s: {result['confirmed']} top-ups confirmed, {rate:.0f}/s; "
        f"latency submit→confirmed p50 {p50:.1f} ms, p99 {p99:.1f} ms (n={len(lat)}); "
        f"POST /commands p50 {result['api_p50'] * 1000:.1f} ms, p99 {result['api_p99'] * 1000:.1f} ms"
    )
    shares = [f"{k} {v:.2f}" + (f" (ledger thread {ledger_cpu:.2f})" if k == "gateway" else "") for k, v in cpu.items()]
    per_topup = cpu["gateway"] / max(rate, 1e-9) * 1e6
    print(
        f"  CPU-s/s: {', '.join(shares)}; other processes {max(others, 0):.2f}; "
        f"gateway CPU per top-up {per_topup:.0f} µs"
    )
    print(f"  ledger: {dict(states)}; ledger vs meters: {len(mismatches)} mismatches")
    st = store_stats
    print(
        f"  ledger thread: {st.grouped_calls} calls in {st.groups} group transactions "
        f"({st.grouped_calls / max(st.groups, 1):.1f} per commit), {st.single_calls} alone, "
        f"{st.group_retries} groups re-run one by one"
    )
    for m in mismatches[:10]:
        print(f"    {m}")
    if profile is not None:
        print("  gateway event-loop thread, cProfile (CPU time; slows the gateway: this run's rate is not a result):")
        print(top(profile, args.top))
    print(f"topups_per_s={rate:.0f} p50_ms={p50:.1f} p99_ms={p99:.1f}")
    bad = mismatches or set(states) - {"confirmed"}
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=METERS)
    parser.add_argument("--lines", type=int, default=LINES)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured window")
    parser.add_argument("--window", type=int, default=50, help="top-ups in flight (fewer than meters)")
    parser.add_argument("--connections", type=int, default=32, help="HTTP connections of the client")
    parser.add_argument("--concurrency", type=int, default=256, help="[service] concurrency of the gateway")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent), help="where the ledger goes")
    parser.add_argument("--profile", action="store_true", help="cProfile the gateway during the window")
    parser.add_argument("--baseline", action="store_true", help="no group commit: one transaction per ledger call")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
