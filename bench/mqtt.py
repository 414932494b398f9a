"""MQTT benchmark: read transactions per second through Mosquitto, 1,000 meters behind 100 DTUs.

Run from the repository root::

    .venv/bin/python bench/mqtt.py [--seconds 15] [--profile-seconds 5] [--depth 2] [--baseline]

Three processes on this machine (2 cores), all on loopback:

* **broker** — a private ``/usr/sbin/mosquitto`` on a free port with its own config file in a
  temporary directory (the machine's Mosquitto is not touched; see :data:`BROKER_CONFIG` for
  the settings and why);
* **simulator** — a child process (``multiprocessing``, spawn): 1,000 meters on 100 buses of
  10 (``from_flags(1000, 100)``, line timing off, virtual clock at real speed) served by
  :class:`simulator.transports.mqtt.MqttBusBridge` with one id per bus (``dtu=False``):
  ``bench/<bus>/down`` and ``bench/<bus>/up``; each id is one DTU in front of 10 meters;
* **gateway** — this process: one :class:`gateway.transports.MqttConnection` shared by 100
  :class:`gateway.transports.MqttTransport` s (one per DTU id), a
  :class:`gateway.link.Link` on each (``gap_s=0``: no line timing, the DTU paces its line),
  and a :class:`gateway.client.MeterClient` per meter. Every link has ``--depth`` readers
  that read the forward active energy (00010000) and the remaining money (00900200) of its
  10 meters in turn, so the 100 links read concurrently and never wait for a caller.

Measured over ``--seconds`` after a warm-up (every link's first read): completed reads per
second (``tx/s``), the latency of each read (``MeterClient.read``: from the call to the typed
reading, so it includes waiting behind the other queued read of the same link), errors by
type, and the CPU time each process used in the window (``utime + stime`` from
``/proc/<pid>/stat``), in CPU-seconds per second and in microseconds per transaction: where
the two cores go, and what the rest of the machine used meanwhile (``/proc/stat``; the
machine may be shared). Then a second window of ``--profile-seconds`` runs with cProfile on
in the gateway and in the simulator (timer: the thread's CPU time, ``--profile-clock cpu``, so
time spent preempted is not blamed on a ``send``), and the top ``--top`` functions by own time
of each are printed; the profilers slow both sides, so that window's rate is not the result.

``--baseline`` runs the MQTT paths as they were before the fast path (aiomqtt's own publish
and message queue in both the gateway and the bridge, Nagle on in the bridge), for an A/B
comparison on the same machine at the same time.

Target: >= 2,000 tx/s. The last line printed is ``tx_per_s=<x> p50_ms=<y> p99_ms=<z>
target=2000``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

MOSQUITTO = "/usr/sbin/mosquitto"
PREFIX = "bench"
METERS = 1000
BUSES = 100
DIS = (0x00010000, 0x00900200)  # forward active energy total; remaining money
TARGET = 2000.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

BROKER_CONFIG = """\
# Private broker for bench/mqtt.py (written to a temporary directory, removed afterwards).
listener {port} 127.0.0.1
allow_anonymous true
persistence false
log_dest file {log}
log_type error
log_type warning
# Nagle off on the broker's sockets: every transaction is 4 small QoS 1 publishes, each
# answered by a PUBACK; with Nagle a small write that follows an unacknowledged one waits
# for the peer's delayed ACK (~40 ms on Linux). Mosquitto's default is false.
set_tcp_nodelay true
# QoS 1 messages the broker keeps in flight (sent, PUBACK not yet received) per client.
# Both clients cap their own publishes at 20 (gateway.transports.mqtt.BROKER_INFLIGHT_LIMIT,
# the mosquitto default), and the broker's limit must not be below what a client sends
# (deps.md §1: beyond it messages are lost silently). Towards the gateway, up to 100 replies
# (one per DTU) can be due at once; 100 lets the broker deliver them all without waiting for
# PUBACKs, instead of 20 and the rest queued.
max_inflight_messages 100
# QoS 1 messages queued per client beyond the in-flight window; beyond this mosquitto drops
# them silently (a lost reply = a timeout and a retry). The default, 1000, is enough for 100
# DTUs x --depth requests; 10000 leaves room for bursts, bounded (no max_queued_bytes).
max_queued_messages 10000
"""


# --- helpers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def machine_cpu_seconds() -> float:
    """CPU time used by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def baseline_paths(bridge_module: object | None = None) -> None:
    """``--baseline``: the MQTT paths as they were before the fast path (for an A/B on this machine).

    Every message through aiomqtt's own publish and message queue (``_Direct.install`` returns
    None), and in the simulator's bridge Nagle left on (no TCP_NODELAY), as paho leaves it.
    """
    if bridge_module is None:
        import gateway.transports.mqtt as gateway_mqtt

        gateway_mqtt._Direct.install = classmethod(lambda cls, *args: None)  # type: ignore[method-assign,assignment]
        return
    bridge_module._Direct.install = classmethod(lambda cls, *args: None)  # type: ignore[attr-defined]
    bridge_module._no_delay = lambda client: None  # type: ignore[attr-defined]


def top(profile: cProfile.Profile, n: int = 10) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(n)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join("    " + line.replace(str(Path.cwd()) + "/", "") for line in lines[start:] if line.strip())


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(BROKER_CONFIG.format(port=port, log=tmp / "mosquitto.log"))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mosquitto did not start: {proc.stderr.read().decode(errors='replace')}")  # type: ignore[union-attr]
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("mosquitto did not open its port within 5 s")


# --- the simulator process -------------------------------------------------------------------------


def new_profile(clock: str) -> cProfile.Profile:
    """A profiler on CPU time of this thread (``cpu``: what the process spends) or on wall time."""
    return cProfile.Profile(time.thread_time) if clock == "cpu" else cProfile.Profile()


def sim_main(port: int, conn, top_n: int = 10, clock: str = "cpu", baseline: bool = False) -> None:
    """The simulated fleet behind the MQTT bridge; obeys "profile", "report" and "stop" on ``conn``."""
    from simulator.clock import VirtualClock
    from simulator.fleet import Fleet
    from simulator.scenario import from_flags
    from simulator.transports import mqtt as bridge_module
    from simulator.transports.mqtt import start_mqtt_bridge

    if baseline:
        baseline_paths(bridge_module)

    async def main() -> None:
        scenario = from_flags(METERS, BUSES, seed=1, timing=False, speed=1.0)
        fleet = Fleet(scenario.buses, VirtualClock(scenario.start, scenario.speed), scenario.seed)
        bridge = await start_mqtt_bridge(fleet.buses, "127.0.0.1", port, PREFIX, dtu=False, wait=10)
        addresses = {name: list(bus.meters) for name, bus in fleet.buses.items()}
        conn.send(("ready", addresses))
        loop = asyncio.get_running_loop()
        incoming: asyncio.Queue[str] = asyncio.Queue()
        loop.add_reader(conn.fileno(), lambda: incoming.put_nowait(conn.recv()))
        profile: cProfile.Profile | None = None
        while True:
            command = await incoming.get()
            if command == "profile":
                profile = new_profile(clock)
                profile.enable()
            elif command == "report":
                text = ""
                if profile is not None:
                    profile.disable()
                    text = top(profile, top_n)
                    profile = None
                conn.send(("report", vars(bridge.stats).copy(), text))
            elif command == "stop":
                loop.remove_reader(conn.fileno())
                await bridge.aclose()
                conn.send(("stopped",))
                return

    asyncio.run(main())


# --- the gateway (this process) --------------------------------------------------------------------


class Gateway:
    def __init__(self, port: int, addresses: dict[str, list[str]], depth: int) -> None:
        from gateway.client import MeterClient
        from gateway.link import Link, LinkConfig
        from gateway.transports import MqttConnection, MqttTransport

        self.conn = MqttConnection("127.0.0.1", port, identifier="bench-gateway")
        self.links = []
        self.clients: list[list[MeterClient]] = []
        for ident, meters in addresses.items():
            transport = MqttTransport(prefix=PREFIX, ident=ident, connection=self.conn)
            link = Link(transport, LinkConfig(gap_s=0.0), name=ident)
            self.links.append(link)
            self.clients.append([MeterClient(link, a) for a in meters])
        self.depth = depth
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.done = 0
        self.recording = False

    async def start(self) -> None:
        self.conn.start()
        await self.conn.wait_connected(10)
        await asyncio.gather(*(link.start() for link in self.links))
        await asyncio.gather(*(clients[0].read(DIS[0]) for clients in self.clients))  # warm-up

    async def stop(self) -> None:
        for link in self.links:
            await link.stop()
        await self.conn.aclose()

    async def _reader(self, clients: list, offset: int, stop_at: float) -> None:  # type: ignore[type-arg]
        k = offset
        clock = time.perf_counter
        while clock() < stop_at:
            client = clients[k % len(clients)]
            di = DIS[(k // len(clients)) % len(DIS)]
            k += self.depth
            t = clock()
            try:
                reading = await client.read(di)
            except Exception as exc:
                self.errors[type(exc).__name__] += 1
                continue
            if self.recording:
                self.latencies.append(clock() - t)
                self.done += 1
            if reading.value is None:
                self.errors["no value"] += 1

    async def run(self, seconds: float) -> float:
        """Read for ``seconds``; returns the elapsed time of the window."""
        self.latencies.clear()
        self.done = 0
        self.recording = True
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(
            *(self._reader(clients, d, stop_at) for clients in self.clients for d in range(self.depth))
        )
        self.recording = False
        return time.perf_counter() - t0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def bench(args: argparse.Namespace, broker: subprocess.Popen[bytes], port: int) -> int:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sim = ctx.Process(
        target=sim_main,
        args=(port, child, args.top, args.profile_clock, args.baseline),
        daemon=True,
        name="meterlink-sim",
    )
    sim.start()
    loop = asyncio.get_running_loop()

    async def recv(timeout: float = 60.0) -> tuple:  # type: ignore[type-arg]
        ready = await loop.run_in_executor(None, parent.poll, timeout)
        if not ready:
            raise SystemExit(f"the simulator process did not answer (alive: {sim.is_alive()})")
        return parent.recv()

    gw: Gateway | None = None
    try:
        message = await recv()
        addresses = message[1]
        gw = Gateway(port, addresses, args.depth)
        await gw.start()

        pids = {"broker (mosquitto)": broker.pid, "simulator": sim.pid, "gateway": os.getpid()}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        machine0 = machine_cpu_seconds()
        elapsed = await gw.run(args.seconds)
        cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
        machine = machine_cpu_seconds() - machine0
        done = gw.done
        rate = done / elapsed
        lat = sorted(gw.latencies)
        p50, p99 = percentile(lat, 0.50) * 1000, percentile(lat, 0.99) * 1000
        errors = dict(gw.errors)
        link_stats = Counter()
        for link in gw.links:
            for key, value in vars(link.stats).items():
                link_stats[key] += value

        print(
            f"  {done:,} reads in {elapsed:.2f} s: {rate:,.0f} tx/s; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"max {lat[-1] * 1000 if lat else float('nan'):.1f} ms; errors {errors or 'none'}"
        )
        print(f"  links: {dict(link_stats)}; mqtt connection: {vars(gw.conn.stats)}")
        total = 0.0
        print("  CPU in the window (utime+stime from /proc/<pid>/stat), of 2 cores:")
        for k in pids:
            used = cpu1[k] - cpu0[k]
            total += used
            print(f"    {k:<20} {used / elapsed:5.2f} CPU-s/s  {used / done * 1e6 if done else 0:7.0f} us per tx")
        print(f"    {'total':<20} {total / elapsed:5.2f} CPU-s/s  {total / done * 1e6 if done else 0:7.0f} us per tx")
        print(
            f"    {'(other processes)':<20} {max(machine - total, 0.0) / elapsed:5.2f} CPU-s/s  (rest of the machine)"
        )

        if args.profile_seconds > 0:
            parent.send("profile")
            profile = new_profile(args.profile_clock)
            profile.enable()
            p_elapsed = await gw.run(args.profile_seconds)
            profile.disable()
            p_done = gw.done
            parent.send("report")
            _, bridge_stats, sim_top = await recv()
            print(
                f"  profiled window ({args.profile_seconds:g} s, both sides under cProfile, slower): "
                f"{p_done / p_elapsed:,.0f} tx/s; bridge {bridge_stats}"
            )
            print(f"  gateway, cProfile top {args.top} by own time:")
            print(top(profile, args.top))
            print(f"  simulator, cProfile top {args.top} by own time:")
            print(sim_top)
        ok = rate >= TARGET
        print(f"  target >= {TARGET:,.0f} tx/s: " + ("met" if ok else "MISSED"))
        print(f"tx_per_s={rate:.0f} p50_ms={p50:.1f} p99_ms={p99:.1f} target={TARGET:.0f}")
        return 0 if ok else 1
    finally:
        if gw is not None:
            await gw.stop()
        if sim.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                parent.send("stop")
                await recv(10)
            sim.join(5)
        if sim.is_alive():
            sim.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring window")
    parser.add_argument("--profile-seconds", type=float, default=5.0, help="profiled window (0: none)")
    parser.add_argument("--top", type=int, default=10, help="functions shown from each profile")
    parser.add_argument(
        "--profile-clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: time.thread_time (where the CPU goes); wall: also time spent preempted or waiting",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="MQTT through aiomqtt's own paths and Nagle on in the bridge, as before the fast path",
    )
    parser.add_argument("--depth", type=int, default=2, help="reads kept queued on each link")
    args = parser.parse_args()
    if args.baseline:
        baseline_paths()
    if not Path(MOSQUITTO).exists():
        raise SystemExit(f"{MOSQUITTO} is needed")
    print(
        f"bench/mqtt.py: Python {platform.python_version()}, {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs; {METERS} meters on {BUSES} DTUs, line timing off; "
        f"private mosquitto, simulator process, gateway process (100 links, one MQTT connection); "
        f"depth {args.depth}" + ("; BASELINE paths" if args.baseline else "")
    )
    tmp = Path(tempfile.mkdtemp(prefix="meterlink-bench-mqtt-"))
    broker, port = start_broker(tmp)
    try:
        return asyncio.run(bench(args, broker, port))
    finally:
        broker.terminate()
        try:
            broker.wait(5)
        except subprocess.TimeoutExpired:
            broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
