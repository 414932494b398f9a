"""One-line benchmark: gateway reads per second on one RS-485 line against the wire-time bound.

Run from the repository root::

    .venv/bin/python bench/bus.py [--seconds 12] [--td-ms 50] [--gap-ms 0] [--transport tcp|pty]

Set-up, all in **one process and one event loop** (the line is slow, a few to ten
transactions a second, so sharing the loop costs the gateway nothing measurable):

* the simulator: a fleet of ``--meters`` meters on one bus with line timing **on** (11 bits a
  byte at the baud rate, and a *fixed* turnaround Td of ``--td-ms``, so the bound below is
  exact), served by :func:`simulator.transports.tcp.serve_tcp` (an RS-485-to-Ethernet
  converter) or, with ``--transport pty``, by a pseudo-terminal opened at 8N1;
* the gateway: one :class:`gateway.link.Link` (``LinkConfig(gap_s=--gap-ms)``) over a
  :class:`~gateway.transports.TcpClientTransport` (``baud=`` the line speed) or a
  :class:`~gateway.transports.SerialTransport` on the pty, and one
  :class:`~gateway.client.MeterClient` per meter; ``--concurrency`` readers keep reads of the
  forward active energy (DI 00010000) queued on the link, meters taken in turn, so the line
  never waits for a caller.

For each speed (2400 and 9600 bps) it reads for ``--seconds`` after two warm-up reads and
compares the rate with the wire-time bound of one transaction::

    (request bytes incl. 4 FE + reply bytes incl. the meter's FE preamble) x 11 / baud + Td

The byte counts are the ones that really went over the (simulated) line, taken from the bus's
transaction history, so nothing is assumed about frame sizes. The same history gives where
the time goes: ``line`` is the mean time the bus was busy per transaction (wire time + Td +
the simulator's timer overshoot) and ``idle`` the mean time the line was free between one
reply's last byte and the next request (the link's configured gap, the loopback round trip,
the gateway's per-transaction work).

The inter-frame gap is a line setting (``LinkConfig.gap_s``; dlt645.md §1.6: some meters drop
commands that come too fast). The bound has no gap in it, so the default here is 0: the
simulated meters need none. With a gap of G ms the best possible ratio is bound / (bound + G).

Target: reads/s >= 90 % of the bound at both speeds. The last line printed is
``ratio_2400=<r> ratio_9600=<r> target=0.90`` (reads/s over bound reads/s, 3 decimals).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from gateway.client import MeterClient
from gateway.link import Link, LinkConfig
from gateway.transports import SerialTransport, TcpClientTransport, Transport
from protocols.dlt645 import build_frame
from protocols.dlt645.frame import encode_frame
from protocols.dlt645.payloads import ReadRequest
from simulator.bus import Bus, LineTiming
from simulator.clock import VirtualClock
from simulator.fleet import Fleet
from simulator.scenario import from_flags

DI = 0x00010000  # forward active energy, total: 4-byte value, reply frame of 20 bytes
SPEEDS = (2400, 9600)
TARGET = 0.90
BITS_PER_BYTE = 11


class Timed(Transport):
    """A transport that notes when each reply's first bytes reach the link and when each request leaves."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.url = inner.url
        self.baud = inner.baud
        self.writes: list[float] = []
        self.first_reads: list[float] = []
        self._waiting = False

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def write(self, data: bytes) -> None:
        self.writes.append(time.monotonic())
        self._waiting = True
        await self.inner.write(data)

    async def read(self, timeout: float) -> bytes:
        data = await self.inner.read(timeout)
        if data and self._waiting:
            self.first_reads.append(time.monotonic())
            self._waiting = False
        return data

    def discard_input(self) -> int:
        return self.inner.discard_input()


async def _serve(bus: Bus, kind: str, baud: int) -> tuple[Transport, object]:
    if kind == "tcp":
        from simulator.transports.tcp import serve_tcp

        endpoint = await serve_tcp(bus, "127.0.0.1", 0)
        return TcpClientTransport("127.0.0.1", endpoint.port, baud=baud), endpoint
    from simulator.transports.pty import open_pty_bus

    endpoint = open_pty_bus(bus)
    return SerialTransport(endpoint.device_path, baud=baud, parity="N"), endpoint


async def run_speed(baud: int, args: argparse.Namespace) -> dict[str, float]:
    scenario = from_flags(args.meters, 1, seed=1, timing=True, baud=baud)
    timing = LineTiming(baud=baud, td_min_ms=20, td_max_ms=500, td_distribution="fixed", td_fixed_ms=args.td_ms)
    scenario.buses[0].timing = timing
    fleet = Fleet(scenario.buses, VirtualClock(scenario.start, scenario.speed), scenario.seed)
    bus = next(iter(fleet.buses.values()))
    inner, endpoint = await _serve(bus, args.transport, baud)
    transport = Timed(inner)
    link = Link(transport, LinkConfig(gap_s=args.gap_ms / 1000), name=f"bench-{baud}")
    clients = [MeterClient(link, address) for address in fleet.meters]
    await link.start()
    try:
        for client in clients[:2]:  # warm-up: connection, first frames, imports
            await client.read(DI)
        await asyncio.sleep(timing.td_max_ms / 1000)  # let the line go quiet
        first = len(bus.history)
        n_writes = len(transport.writes)
        done = 0
        last = 0.0
        stop_at = 0.0
        turn = iter(range(10**9))

        async def reader() -> None:
            nonlocal done, last
            while time.monotonic() < stop_at:
                client = clients[next(turn) % len(clients)]
                reading = await client.read(DI)
                if reading.value is None or reading.address != client.address:
                    raise RuntimeError(f"bad reading {reading!r}")
                done += 1
                last = time.monotonic()

        t0 = time.monotonic()
        stop_at = t0 + args.seconds
        await asyncio.gather(*(reader() for _ in range(args.concurrency)))
        elapsed = last - t0
    finally:
        await link.stop()
        await endpoint.aclose()  # type: ignore[attr-defined]

    records = list(bus.history)[first - len(bus.history) :] if first < len(bus.history) else []
    records = records[-done:]
    request = build_frame(clients[0].address, ReadRequest(DI))
    request_bytes = len(
        encode_frame(request.address, request.control.byte, request.data, clients[0].profile.request_preamble)
    )
    reply_bytes = statistics.mode(sum(len(c.data) for c in r.chunks) for r in records)
    per_tx = (request_bytes + reply_bytes) * BITS_PER_BYTE / baud + args.td_ms / 1000
    line = statistics.fmean(r.end - r.start for r in records)
    idle = [b.start - a.end for a, b in itertools.pairwise(records)]
    # The loop's clock is time.monotonic(), so the bus history and the transport's stamps compare.
    writes = transport.writes[n_writes:]
    reads = transport.first_reads[n_writes:]
    # Reply bytes reach the link this long after the wire schedule says the reply ended
    # (the simulator's timer overshoot, the loopback hop, the wake-up).
    late = [got - r.end for r, got in zip(records, reads, strict=False)]
    # And the next request leaves this long after the reply came in (the link's own work + gap).
    turn = [w - got for got, w in zip(reads, writes[1:], strict=False)]
    rate = done / elapsed
    bound = 1 / per_tx
    return {
        "baud": baud,
        "reads": done,
        "seconds": elapsed,
        "rate": rate,
        "bound": bound,
        "ratio": rate / bound,
        "request_bytes": request_bytes,
        "reply_bytes": reply_bytes,
        "per_tx_ms": per_tx * 1000,
        "line_ms": line * 1000,
        "idle_ms": statistics.fmean(idle) * 1000 if idle else float("nan"),
        "idle_max_ms": max(idle) * 1000 if idle else float("nan"),
        "late_ms": statistics.fmean(late) * 1000 if late else float("nan"),
        "turn_ms": statistics.fmean(turn) * 1000 if turn else float("nan"),
        "timeouts": link.stats.timeouts,
        "attempts": link.stats.attempts,
    }


async def main_async(args: argparse.Namespace) -> int:
    print(
        f"bench/bus.py: Python {platform.python_version()}, {platform.machine()}, "
        f"{len(__import__('os').sched_getaffinity(0))} CPUs; simulator and gateway in one process and event loop; "
        f"transport {args.transport}; Td fixed {args.td_ms:g} ms; link gap {args.gap_ms:g} ms; "
        f"{args.meters} meters on the line; {args.concurrency} readers"
    )
    ratios = {}
    for baud in SPEEDS:
        r = await run_speed(baud, args)
        ratios[baud] = r["ratio"]
        print(
            f"  {baud:>5} bps: {r['reads']} reads in {r['seconds']:.2f} s = {r['rate']:.2f} reads/s; "
            f"bound {r['bound']:.2f} reads/s ({r['request_bytes']} + {r['reply_bytes']} bytes x 11 / {baud} "
            f"+ Td {args.td_ms:g} ms = {r['per_tx_ms']:.1f} ms); ratio {r['ratio']:.3f}"
        )
        print(
            f"             per transaction: line busy {r['line_ms']:.1f} ms, line idle {r['idle_ms']:.2f} ms "
            f"(max {r['idle_max_ms']:.2f}) = reply late vs wire schedule {r['late_ms']:.2f} ms (simulator timer, "
            f"loopback) + link turnaround {r['turn_ms']:.2f} ms (gap {args.gap_ms:g} ms + per-transaction work); "
            f"attempts {r['attempts']}, timeouts {r['timeouts']}"
        )
    ok = all(v >= TARGET for v in ratios.values())
    print("  target >= 90 % of the bound at both speeds: " + ("met" if ok else "MISSED"))
    print(f"ratio_2400={ratios[2400]:.3f} ratio_9600={ratios[9600]:.3f} target={TARGET:.2f}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per speed")
    parser.add_argument("--td-ms", type=float, default=50.0, help="the meters' fixed turnaround Td")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="the link's inter-frame gap (LinkConfig.gap_s)")
    parser.add_argument("--meters", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2, help="readers keeping reads queued on the link")
    parser.add_argument("--transport", choices=("tcp", "pty"), default="tcp")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
