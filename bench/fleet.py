"""Fleet benchmark: memory per simulated meter (fresh and aged), reads answered per second over
TCP, and the CPU to catch meters up.

Run from the repository root::

    .venv/bin/python bench/fleet.py [--meters 100000] [--read-meters 10000] [--seconds 10]
        [--aged-meters 300] [--aged-days 70] [--catch-up-meters 50] [--catch-up-days 30]

Four measurements; (a) and (b) against a target from the simulator issue:

(a) **Memory.** RSS of this process (``/proc/self/statm``) after the imports, then after the
    scenario and the fleet of ``--meters`` idle meters (default 100,000, spread over 100 buses,
    residential loads, line timing off) are built. Printed: the process RSS with the fleet
    (``fleet_rss_mib``, the number the target is about: "100,000 meters under 1 GiB RSS") and
    the growth divided by the meter count (``rss_per_meter_kib``). The fleet is then dropped.
    A fleet smaller than 100,000 meters is judged by its growth per meter times 100,000 against
    1 GiB (the interpreter's baseline RSS does not shrink with the fleet; :func:`memory_verdict`).

(a2) **Aged memory.** Idle meters are fresh meters: their freeze logs and event records are
    empty. A fleet that has run for a while holds 62 daily and 254 hourly freezes per meter
    (dlt645.md §3.6), settlements and records. So a sample of ``--aged-meters`` meters (default
    300; residential loads; in a separate process) is advanced ``--aged-days`` simulated days (default 70: the freeze
    rings are full) and the RSS growth is measured again, fresh and aged, per meter. Printed:
    both per-meter figures and the aged extrapolation to ``--meters`` (fresh fleet RSS plus the
    per-meter growth from ageing), which is what a 100,000-meter fleet costs after 70 days.

(b) **Reads per second.** A fresh fleet of ``--read-meters`` meters (default 10,000) on *one*
    bus, served by :func:`simulator.transports.tcp.serve_tcp` with line timing off, in this
    process. The client is a separate process (``multiprocessing``, spawn) that opens
    ``--connections`` TCP connections and keeps ``--window`` requests in flight on each: 0x11
    reads alternating 00010000 (forward active energy) and 00900200 (remaining money), meters
    taken round-robin. It counts complete reply frames for ``--seconds`` after a short warm-up.
    The machine has 2 cores shared by both sides, so on Linux each process is pinned to its own
    core (``os.sched_setaffinity``): the simulator side, the thing measured, gets one core.
    Target: ">= 5,000 reads/s on one core". The virtual clock runs at real speed (``--speed``),
    so every read also integrates the meter's load up to now, as in a real run.

(c) **Catch-up.** CPU time (``time.process_time``) to bring ``--catch-up-meters`` residential
    meters (default 50, local cost control, default tariffs, freezes on) up to date after
    ``--catch-up-days`` simulated days (default 30), in one jump each, as ``/summary`` does after
    ``POST /time/advance``. Printed: CPU per simulated meter-day for this, and for the baseline:
    the same meters advanced one 15-minute load slot per call (96 calls a day, what a simulator
    stepping per slot does), in the same process (the best of 3 alternating rounds each), and the
    ratio baseline / new. Both must end in the same registers, money, freezes and records (the
    bench fails otherwise). (Until 2026-12-04 the baseline was the catch-up code of commit
    d719421, taken from git; that history is gone from this repository.)

``--profile FILE`` writes a cProfile of the simulator side of (b) (``python -m pstats FILE``).
``--skip-memory`` / ``--skip-aged`` / ``--skip-reads`` / ``--skip-catch-up`` leave a part out.

The last line printed is ``rss_per_meter_kib=<x> fleet_rss_mib=<y> aged_rss_per_meter_kib=<a>
aged_fleet_rss_mib=<e> reads_per_s=<z> catch_up_ms_per_meter_day=<c> catch_up_baseline_ratio=<r>``
(a skipped part prints ``-``), for scripts to parse.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from firmware_stubs.meter import Meter, MeterConfig
from protocols.dlt645 import METER_TZ
from protocols.dlt645.read import encode_read_request
from simulator.clock import VirtualClock
from simulator.fleet import Fleet
from simulator.load_profiles import make_load
from simulator.scenario import from_flags
from simulator.transports.tcp import serve_tcp

MEMORY_TARGET_MIB = 1024  # 100,000 meters under 1 GiB RSS
TARGET_METERS = 100_000
READS_TARGET = 5_000  # reads answered per second on one core
READ_DIS = (0x00010000, 0x00900200)
WARMUP_S = 1.0
BASELINE_STEP = timedelta(minutes=15)
"""The catch-up baseline of (c): the same meters advanced one 15-minute load slot per call."""
CATCH_UP_START = datetime(2026, 3, 2, 0, 0, tzinfo=METER_TZ)
CATCH_UP_ROUNDS = 3
REPO = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mib(n: float) -> float:
    return n / 2**20


def pin(cpu: int) -> str:
    """Pin this process to one CPU if the machine has more than one; returns a note."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    chosen = cpus[cpu % len(cpus)]
    os.sched_setaffinity(0, {chosen})
    return f"pinned to CPU {chosen}"


# --- (a) memory ------------------------------------------------------------------------------------


def measure_memory(meters: int, buses: int) -> tuple[float, float]:
    """(process RSS with the fleet in MiB, RSS growth per meter in KiB)."""
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    scenario = from_flags(meters, buses, seed=1, timing=False)
    fleet = Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)
    built = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    per_meter_kib = (after - before) / meters / 1024
    print(
        f"(a) memory: {len(fleet.meters):,} meters on {len(fleet.buses)} buses built in {built:.1f} s; "
        f"RSS {mib(before):.1f} MiB before, {mib(after):.1f} MiB after "
        f"(+{mib(after - before):.1f} MiB, {per_meter_kib:.2f} KiB per meter); "
        + (
            f"target: {meters:,} meters under {MEMORY_TARGET_MIB * meters / TARGET_METERS:.0f} MiB RSS"
            if meters >= TARGET_METERS
            else f"target: {TARGET_METERS:,} meters under {MEMORY_TARGET_MIB} MiB, judged by the growth per meter"
        )
    )
    del fleet, scenario
    gc.collect()
    return mib(after), per_meter_kib


def memory_verdict(label: str, meters: int, fleet_rss_mib: float, per_meter_kib: float) -> str:
    """The memory target's verdict for a fleet of ``meters``.

    A full-size fleet (>= 100,000 meters) is judged by the process RSS with it, as the target
    says. A smaller one cannot be: the interpreter's baseline RSS (imports, ~55 MiB) does not
    shrink with the fleet, so scaling the 1 GiB down would fail any small fleet. It is judged by
    its growth instead, the RSS after building it minus before, per meter, times 100,000
    meters, against 1 GiB; the line also shows the process RSS that projects to, baseline included.
    """
    if meters >= TARGET_METERS:
        limit = MEMORY_TARGET_MIB * meters / TARGET_METERS
        return f"{label} {'met' if fleet_rss_mib < limit else 'MISSED'} ({fleet_rss_mib:.0f} < {limit:.0f} MiB RSS)"
    growth = per_meter_kib * TARGET_METERS / 1024
    baseline = fleet_rss_mib - per_meter_kib * meters / 1024
    return (
        f"{label} {'met' if growth < MEMORY_TARGET_MIB else 'MISSED'} (growth {per_meter_kib:.2f} KiB per meter "
        f"x {TARGET_METERS:,} = {growth:.0f} < {MEMORY_TARGET_MIB} MiB, measured on {meters:,} meters; "
        f"with this process's {baseline:.0f} MiB baseline: {baseline + growth:.0f} MiB RSS)"
    )


def measure_aged_memory(meters: int, days: int) -> tuple[float, float]:
    """(RSS per fresh meter in KiB, RSS per meter after ``days`` simulated days with load, in KiB).

    Runs in a fresh process: memory freed by (a) stays in this process's allocator and would
    hide the growth.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_aged_main, args=(meters, days, child))
    proc.start()
    child.close()
    result = parent.recv()
    proc.join()
    return result


def _aged_main(meters: int, days: int, out) -> None:
    out.send(_aged(meters, days))
    out.close()


def _aged(meters: int, days: int) -> tuple[float, float]:
    gc.collect()
    before = rss_bytes()
    scenario = from_flags(meters, max(1, meters // 100), seed=2, timing=False, speed=0)
    fleet = Fleet(scenario.buses, VirtualClock(scenario.start, 0), scenario.seed)
    gc.collect()
    fresh = rss_bytes()
    t0 = time.perf_counter()
    fleet.advance(timedelta(days=days))
    now = fleet.now()
    for sim in fleet.meters.values():
        sim.meter.advance(now)
    took = time.perf_counter() - t0
    gc.collect()
    aged = rss_bytes()
    sample = next(iter(fleet.meters.values())).meter
    fresh_kib = (fresh - before) / meters / 1024
    aged_kib = (aged - before) / meters / 1024
    print(
        f"(a2) aged memory: {meters:,} residential meters advanced {days} simulated days in {took:.1f} s "
        f"({len(sample.daily or ())} daily, {len(sample.hourly or ())} hourly freezes each); "
        f"RSS per meter {fresh_kib:.2f} KiB fresh, {aged_kib:.2f} KiB aged "
        f"(+{aged_kib - fresh_kib:.2f} KiB from freezes and records)"
    )
    del fleet, scenario, sample
    gc.collect()
    return fresh_kib, aged_kib


# --- (b) reads per second --------------------------------------------------------------------------


def _frames_in(buf: bytearray) -> int:
    """Count and remove complete frames at the front of ``buf`` (FE preambles skipped)."""
    count = 0
    i = 0
    n = len(buf)
    while True:
        while i < n and buf[i] == 0xFE:
            i += 1
        if n - i < 12:
            break
        end = i + 12 + buf[i + 9]
        if end > n:
            break
        count += 1
        i = end
    del buf[:i]
    return count


def client_main(port: int, addresses: list[str], seconds: float, connections: int, window: int, out) -> None:
    """The reading master (a child process): pipelined reads on plain blocking sockets."""
    pin(1)
    requests = [encode_read_request(a, READ_DIS[k % len(READ_DIS)]) for k, a in enumerate(addresses)]
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
    import selectors

    sel = selectors.DefaultSelector()
    bufs = {s: bytearray() for s in socks}
    outstanding = dict.fromkeys(socks, 0)
    cursor = 0

    def send(s: socket.socket, n: int) -> None:
        nonlocal cursor
        batch = []
        for _ in range(n):
            batch.append(requests[cursor])
            cursor = (cursor + 1) % len(requests)
        s.sendall(b"".join(batch))
        outstanding[s] += n

    for s in socks:
        send(s, window)
        sel.register(s, selectors.EVENT_READ)
    answered = 0
    start = time.perf_counter()
    measuring_from = start + WARMUP_S
    stop_at = measuring_from + seconds
    counted = 0
    t_first = None
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            break
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise SystemExit("server closed the connection")
            buf = bufs[s]
            buf += data
            got = _frames_in(buf)
            if got:
                outstanding[s] -= got
                answered += got
                now = time.perf_counter()
                if now >= measuring_from:
                    if t_first is None:
                        t_first = now
                        counted = 0
                    else:
                        counted += got
                send(s, window - outstanding[s])
    elapsed = time.perf_counter() - (t_first or start)
    # Collect the replies still due before closing, so the server never writes to a closed socket.
    deadline = time.perf_counter() + 10.0
    while any(outstanding.values()) and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                outstanding[s] = 0
                sel.unregister(s)
                continue
            bufs[s] += data
            outstanding[s] -= _frames_in(bufs[s])
    for s in socks:
        s.close()
    out.send((counted, elapsed, answered))
    out.close()


async def _serve_and_read(args: argparse.Namespace, addresses: list[str], fleet: Fleet) -> tuple[int, float, int]:
    bus = next(iter(fleet.buses.values()))
    endpoint = await serve_tcp(bus, "127.0.0.1", 0)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=client_main,
        args=(endpoint.port, addresses, args.seconds, args.connections, args.window, child),
        daemon=True,
    )
    loop = asyncio.get_running_loop()
    try:
        proc.start()
        child.close()
        while not parent.poll():
            if not proc.is_alive():
                raise SystemExit(f"the client process died (exit code {proc.exitcode})")
            await asyncio.sleep(0.05)
        result = parent.recv()
        await loop.run_in_executor(None, proc.join, 10)
    finally:
        if proc.is_alive():
            proc.kill()
        await endpoint.aclose()
    return result


def measure_reads(args: argparse.Namespace) -> float:
    scenario = from_flags(args.read_meters, 1, seed=1, timing=False, speed=args.speed)
    fleet = Fleet(scenario.buses, VirtualClock(scenario.start, scenario.speed), scenario.seed)
    addresses = list(fleet.meters)
    note = pin(0)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    counted, elapsed, answered = asyncio.run(_serve_and_read(args, addresses, fleet))
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    bus = next(iter(fleet.buses.values()))
    rate = counted / elapsed if elapsed > 0 else 0.0
    stats = bus.stats
    print(
        f"(b) reads: {len(fleet.meters):,} meters on one bus over TCP, timing off, clock {args.speed:g}x; "
        f"client: {args.connections} connection(s) x {args.window} in flight, separate process; server {note}; "
        f"{counted:,} replies in {elapsed:.2f} s = {rate:,.0f} reads/s "
        f"(bus: {stats.requests:,} requests, {stats.replies:,} replies, {stats.unanswered} unanswered, "
        f"{stats.firmware_errors} firmware errors); target >= {READS_TARGET:,} reads/s on one core"
    )
    if answered and stats.replies < answered:
        print("warning: the client counted more replies than the bus sent", file=sys.stderr)
    return rate


# --- (c) catch-up ---------------------------------------------------------------------------------


def _fingerprint(m: object) -> tuple:
    """Registers, money, relay, freezes and records of a meter (baseline or new), as plain values."""
    daily = [(d.energy.time_ms, d.energy.forward, d.energy.reverse, d.remaining, d.overdraft) for d in m.daily]
    hourly = [(h.time_ms, h.forward[0], h.reverse[0]) for h in m.hourly]
    return (
        tuple(m.forward),
        tuple(m.reverse),
        m.reactive,
        m.wallet.balance,
        m.tariff.step_energy,
        m.relay.state.value,
        m.trip_count,
        tuple((r.time_ms, r.forward) for r in m.trips),
        tuple(daily),
        tuple(hourly),
        tuple((s.time_ms, s.forward) for s in m.settlements),
    )


def _catch_up(step: timedelta | None, meters: int, days: int) -> tuple[float, list]:
    """(CPU seconds to advance ``meters`` fresh meters ``days``, their fingerprints): in one jump
    each (``step`` None), or in calls of ``step`` each (the baseline)."""
    fleet = [
        Meter(
            MeterConfig(f"{i:012d}", balance_fen=2_000 + 4_000 * (i % 10), seed=i),  # a few run out of money
            make_load("residential", 1, i),
            CATCH_UP_START,
        )
        for i in range(1, meters + 1)
    ]
    end = CATCH_UP_START + timedelta(days=days)
    gc.collect()
    t0 = time.process_time()
    for m in fleet:
        if step is None:
            m.advance(end)
            continue
        t = CATCH_UP_START
        while t < end:
            t = min(t + step, end)
            m.advance(t)
    took = time.process_time() - t0
    return took, [_fingerprint(m) for m in fleet]


def measure_catch_up(meters: int, days: int, rounds: int = CATCH_UP_ROUNDS) -> tuple[float, float]:
    """(CPU ms per meter-day in one jump, baseline / new ratio).

    ``rounds`` alternating rounds (new, baseline, new, ...), each on fresh meters; the fastest
    round of each counts (other jobs on the machine only ever slow a round down).
    """
    new_times, base_times = [], []
    for _ in range(rounds):
        took, prints = _catch_up(None, meters, days)
        new_times.append(took)
        base_took, base_prints = _catch_up(BASELINE_STEP, meters, days)
        if base_prints != prints:
            raise SystemExit("(c) catch-up: one jump and slot-by-slot stepping disagree on the meters' state")
        base_times.append(base_took)
    per_day = min(new_times) * 1000 / (meters * days)
    base_per_day = min(base_times) * 1000 / (meters * days)
    ratio = base_per_day / per_day if per_day > 0 else float("inf")
    print(
        f"(c) catch-up: {meters} residential meters, {days} simulated days in one jump each, best of {rounds} "
        f"alternating rounds: {per_day:.3f} ms CPU per meter-day; baseline (the same meters advanced per "
        f"15-minute slot) {base_per_day:.3f} ms; ratio baseline/new {ratio:.1f}x; same registers, money, "
        "freezes and records"
    )
    return per_day, ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=100_000, help="idle fleet size for (a)")
    parser.add_argument("--buses", type=int, default=100, help="buses of the idle fleet in (a)")
    parser.add_argument("--read-meters", type=int, default=10_000, help="meters on the bus of (b)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time of (b)")
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--window", type=int, default=32, help="requests in flight per connection")
    parser.add_argument("--speed", type=float, default=1.0, help="virtual clock speed in (b)")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the simulator side of (b) into FILE")
    parser.add_argument("--aged-meters", type=int, default=300, help="meters aged in (a2)")
    parser.add_argument("--aged-days", type=int, default=70, help="simulated days of load in (a2)")
    parser.add_argument("--catch-up-meters", type=int, default=50, help="meters caught up in (c)")
    parser.add_argument("--catch-up-days", type=int, default=30, help="simulated days caught up in (c)")
    parser.add_argument("--skip-catch-up", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-aged", action="store_true")
    parser.add_argument("--skip-reads", action="store_true")
    args = parser.parse_args(argv)
    sizes = (args.meters, args.read_meters, args.connections, args.window, args.catch_up_meters, args.catch_up_days)
    if min(sizes) < 1 or args.seconds <= 0:
        parser.error("sizes and times must be positive")
    print(
        f"bench/fleet.py: {platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    rss_mib = per_meter = rate = aged_per_meter = aged_mib = catch_up = catch_up_ratio = None
    if not args.skip_memory:
        rss_mib, per_meter = measure_memory(args.meters, min(args.buses, args.meters))
    if not args.skip_aged:
        _fresh, aged_per_meter = measure_aged_memory(args.aged_meters, args.aged_days)
        if rss_mib is not None and per_meter is not None:
            aged_mib = rss_mib + (aged_per_meter - _fresh) * args.meters / 1024
            print(
                f"(a2) extrapolated: {args.meters:,} meters after {args.aged_days} days ~ {aged_mib:.0f} MiB RSS "
                f"(fresh fleet {rss_mib:.0f} MiB + {(aged_per_meter - _fresh):.2f} KiB x {args.meters:,})"
            )
    if not args.skip_catch_up:
        catch_up, catch_up_ratio = measure_catch_up(args.catch_up_meters, args.catch_up_days)
    if not args.skip_reads:
        rate = measure_reads(args)
    verdicts = []
    if rss_mib is not None and per_meter is not None:
        verdicts.append(memory_verdict("memory", args.meters, rss_mib, per_meter))
    if aged_mib is not None and per_meter is not None and aged_per_meter is not None:
        aged_growth = per_meter + aged_per_meter - _fresh  # the fleet's own growth plus what ageing adds
        verdicts.append(memory_verdict("aged memory", args.meters, aged_mib, aged_growth))
    if rate is not None:
        verdicts.append(f"reads {'met' if rate >= READS_TARGET else 'MISSED'} ({rate:,.0f} >= {READS_TARGET:,}/s)")
    if verdicts:
        print("targets: " + "; ".join(verdicts))

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print(
        f"rss_per_meter_kib={fmt(per_meter, '.2f')} fleet_rss_mib={fmt(rss_mib, '.1f')} "
        f"aged_rss_per_meter_kib={fmt(aged_per_meter, '.2f')} aged_fleet_rss_mib={fmt(aged_mib, '.1f')} "
        f"reads_per_s={fmt(rate, '.0f')} catch_up_ms_per_meter_day={fmt(catch_up, '.3f')} "
        f"catch_up_baseline_ratio={fmt(catch_up_ratio, '.1f')}"
    )


if __name__ == "__main__":
    main()
