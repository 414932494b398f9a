"""RS-485 bus emulation: addressing, broadcast, echo, collisions, link faults, timing, serialization."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.dlt645.address import BROADCAST, WILDCARD, address_to_wire
from protocols.dlt645.deframer import Deframer
from protocols.dlt645.errors import ChecksumError
from protocols.dlt645.frame import Frame, parse_frame_at
from protocols.dlt645.profile import DLT645_1997, FW_B, SGCC_2013, MeterProfile
from simulator.bus import Bus, BusMeter, BusPort, Chunk, LineTiming, jam, serve_stream, valid_frame_spans
from simulator.clock import VirtualClock
from simulator.faults import Fault, FaultSet, FaultSpec

A1 = "000000000001"
A2 = "000000000002"
READ_DATA = bytes.fromhex("00000100")[::-1]  # DI 00010000, sent DI0 first
VALUE = bytes.fromhex("78563412")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeMeter:
    """Answers reads with the DI plus a 4-byte value, 0x13 with its address; records what it heard."""

    def __init__(self, address: str, profile: MeterProfile = SGCC_2013) -> None:
        self.address = address
        self.profile = profile
        self.faults = FaultSet()
        self.heard: list[Frame] = []

    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        self.heard.append(frame)
        if frame.function == 0x13:
            return Frame(self.address, 0x93, address_to_wire(self.address))
        return Frame(self.address, frame.control.reply(), frame.data + VALUE)


class BrokenMeter(FakeMeter):
    def respond(self, frame: Frame, now: datetime) -> Frame | None:
        raise RuntimeError("firmware bug")


def clock() -> VirtualClock:
    return VirtualClock(datetime(2026, 1, 1, tzinfo=UTC), speed=0)


def read(address: str) -> Frame:
    return Frame(address, 0x11, READ_DATA)


def expected_reply(address: str) -> Frame:
    return Frame(address, 0x91, READ_DATA + VALUE)


def decode(chunks: list[Chunk]) -> list[Frame]:
    deframer = Deframer()
    frames = [f for c in chunks for f in deframer.feed(c.data)]
    return frames + deframer.flush()


def output(chunks: list[Chunk]) -> bytes:
    return b"".join(c.data for c in chunks)


def two_meter_bus(**kw) -> tuple[Bus, FakeMeter, FakeMeter]:
    m1, m2 = FakeMeter(A1), FakeMeter(A2)
    return Bus("line", [m1, m2], clock(), **kw), m1, m2


def test_fake_meter_has_the_bus_meter_shape():
    assert isinstance(FakeMeter(A1), BusMeter)


# --- addressing -----------------------------------------------------------------------


async def test_only_the_addressed_meter_answers():
    bus, m1, m2 = two_meter_bus()
    chunks = await bus.transact(read(A2))
    assert decode(chunks) == [expected_reply(A2)]
    assert output(chunks).startswith(b"\xfe" * 4 + b"\x68")  # SGCC profile: 4 FE
    assert m1.heard == [] and m2.heard == [read(A2)]
    assert bus.stats.requests == 1 and bus.stats.replies == 1 and bus.stats.collisions == 0


async def test_unknown_address_gets_no_reply():
    bus, _, _ = two_meter_bus()
    assert await bus.transact(read("000000000003")) == []
    assert bus.stats.unanswered == 1


async def test_wildcard_with_two_meters_collides_into_garbage():
    bus, m1, m2 = two_meter_bus()
    chunks = await bus.transact(read(WILDCARD))
    assert chunks, "something is on the line"
    assert decode(chunks) == []
    assert valid_frame_spans(output(chunks)) == []
    assert bus.stats.collisions == 1 and bus.stats.replies == 2
    assert len(m1.heard) == len(m2.heard) == 1
    assert bus.history[-1].collided and set(bus.history[-1].answered) == {A1, A2}


async def test_wildcard_with_one_meter_gets_its_real_address():
    bus = Bus("line", [FakeMeter(A1)], clock())
    assert decode(await bus.transact(read(WILDCARD))) == [expected_reply(A1)]
    frames = decode(await bus.transact(Frame(WILDCARD, 0x13)))
    assert [f.address for f in frames] == [A1]


async def test_partial_wildcard_selects_by_low_order_bytes():
    bus, _, _ = two_meter_bus()
    assert decode(await bus.transact(read("AAAAAAAAAA02"))) == [expected_reply(A2)]
    assert await bus.transact(read("AAAAAAAA02AA")) == []  # AA below a digit: not a valid wildcard


async def test_wildcard_echo_profile_answers_with_the_wildcard():
    bus = Bus("line", [FakeMeter(A1, DLT645_1997)], clock())
    chunks = await bus.transact(read(WILDCARD))
    assert [f.address for f in decode(chunks)] == [WILDCARD]
    assert output(chunks)[0] == 0x68  # 1997 profile: no preamble


async def test_reply_preamble_follows_the_profile():
    bus = Bus("line", [FakeMeter(A1, FW_B)], clock())
    assert output(await bus.transact(read(A1)))[:1] == b"\x68"


async def test_broadcast_reaches_everyone_and_nobody_replies():
    bus, m1, m2 = two_meter_bus()
    request = Frame(BROADCAST, 0x08, bytes(6))
    assert await bus.transact(request) == []
    assert m1.heard == [request] and m2.heard == [request]
    assert bus.stats.broadcasts == 1 and bus.stats.replies == 0 and bus.stats.unanswered == 0


async def test_replies_fed_into_the_bus_are_ignored():
    bus, m1, m2 = two_meter_bus()
    for frame in (expected_reply(A1), Frame(WILDCARD, 0x93, address_to_wire(A2)), Frame(BROADCAST, 0x88)):
        assert await bus.transact(frame) == []
    assert m1.heard == m2.heard == []
    assert bus.stats.ignored == 3 and bus.stats.requests == 0


async def test_firmware_exception_is_silence():
    bus = Bus("line", [BrokenMeter(A1)], clock())
    assert await bus.transact(read(A1)) == []
    assert bus.stats.firmware_errors == 1


async def test_membership():
    bus, m1, m2 = two_meter_bus()
    assert set(bus.meters) == {A1, A2} and A1 in bus and len(bus) == 2
    with pytest.raises(ValueError):
        bus.add_meter(FakeMeter(A1))
    assert bus.remove_meter(A1) is m1
    assert decode(await bus.transact(read(WILDCARD))) == [expected_reply(A2)]  # alone now: no collision
    m2.address = "000000000007"  # a 0x15 write-address takes effect at once
    assert decode(await bus.transact(read("000000000007")))[0].address == "000000000007"
    with pytest.raises(KeyError):
        bus.remove_meter(A1)
    bus.add_meter(m1)
    assert set(bus.meters) == {A1, "000000000007"}


async def test_only_restricts_listeners_like_a_dtu():
    bus, m1, _m2 = two_meter_bus()
    assert decode(await bus.transact(read(WILDCARD), only=A2)) == [expected_reply(A2)]
    assert m1.heard == []


async def test_summary_is_plain_data():
    bus, _, _ = two_meter_bus()
    await bus.transact(read(A1))
    summary = bus.summary()
    assert summary["name"] == "line" and summary["requests"] == 1 and summary["timing"] == "off"


# --- collisions (property) ------------------------------------------------------------

bcd_address = st.integers(0, 10**12 - 2).map(lambda n: f"{n:012d}")


@FAST
@given(
    addresses=st.lists(bcd_address, min_size=2, max_size=4, unique=True),
    data=st.binary(max_size=40),
    preambles=st.lists(st.integers(0, 4), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    timed=st.booleans(),
)
def test_simultaneous_replies_never_leave_a_valid_frame(addresses, data, preambles, seed, timed):
    meters = [FakeMeter(a, SGCC_2013.with_(reply_preamble=p)) for a, p in zip(addresses, preambles, strict=False)]
    timing = LineTiming(baud=115200, td_min_ms=0, td_max_ms=1) if timed else None

    async def run() -> list[Chunk]:
        bus = Bus("line", meters, clock(), timing=timing, seed=seed)
        return await bus.transact(Frame(WILDCARD, 0x11, data))

    chunks = asyncio.run(run())
    assert chunks and decode(chunks) == [] and valid_frame_spans(output(chunks)) == []


@FAST
@given(st.lists(st.binary(min_size=0, max_size=30), min_size=1, max_size=4), st.binary(max_size=20))
def test_jam_removes_every_frame(datas, noise):
    raw = noise + b"".join(Frame(A1, 0x91, d).encode() for d in datas)
    jammed = jam(raw)
    assert len(jammed) == len(raw) and valid_frame_spans(jammed) == []


# --- link faults ----------------------------------------------------------------------


async def test_no_reply_counts_down():
    bus, m1, _ = two_meter_bus()
    m1.faults.add(FaultSpec(Fault.NO_REPLY, remaining=1))
    assert await bus.transact(read(A1)) == []
    assert decode(await bus.transact(read(A1))) == [expected_reply(A1)]
    assert bus.stats.faults == {"no_reply": 1} and bus.history[-2].faults == ((A1, Fault.NO_REPLY),)


async def test_no_reply_on_one_of_two_avoids_the_collision():
    bus, m1, _ = two_meter_bus()
    m1.faults.add(FaultSpec(Fault.NO_REPLY))
    assert decode(await bus.transact(read(WILDCARD))) == [expected_reply(A2)]


async def test_bad_checksum_flips_the_cs_byte():
    bus, m1, _ = two_meter_bus()
    m1.faults.add(FaultSpec(Fault.BAD_CHECKSUM))
    raw = output(await bus.transact(read(A1)))
    good = expected_reply(A1).encode(4)
    assert len(raw) == len(good) and raw[-2] == good[-2] ^ 0xFF and raw[:-2] == good[:-2] and raw[-1] == 0x16
    with pytest.raises(ChecksumError):
        parse_frame_at(raw, 4)
    assert decode([Chunk(0, raw)]) == []


async def test_truncated_drops_the_tail():
    bus, m1, _ = two_meter_bus(seed=3)
    m1.faults.add(FaultSpec(Fault.TRUNCATED))
    good = expected_reply(A1).encode(4)
    for _ in range(20):
        raw = output(await bus.transact(read(A1)))
        assert 4 < len(raw) < len(good) and good.startswith(raw)
        assert decode([Chunk(0, raw)]) == []


async def test_byte_gaps_split_the_reply_with_silence():
    bus, m1, _ = two_meter_bus(seed=1)
    m1.faults.add(FaultSpec(Fault.BYTE_GAPS, gap_ms=15))
    counts = set()
    for _ in range(10):
        chunks = await bus.transact(read(A1))
        counts.add(len(chunks))
        assert 2 <= len(chunks) <= 3
        assert output(chunks) == expected_reply(A1).encode(4)
        assert chunks[0].delay == 0 and all(c.delay == pytest.approx(0.015) for c in chunks[1:])
        assert decode(chunks) == [expected_reply(A1)]  # the bytes are intact, only late
    assert counts == {2, 3}


async def test_byte_gaps_are_real_silence_on_a_port():
    bus, m1, _ = two_meter_bus()
    m1.faults.add(FaultSpec(Fault.BYTE_GAPS, gap_ms=40, remaining=1))
    got: list[tuple[float, bytes]] = []
    port = BusPort(bus, lambda d: got.append((time.monotonic(), d)))
    port.feed(read(A1).encode())
    await asyncio.wait_for(port.drain(), 5)
    await port.close()
    assert len(got) >= 2 and b"".join(d for _, d in got) == expected_reply(A1).encode(4)
    assert all(b[0] - a[0] >= 0.035 for a, b in itertools.pairwise(got))


async def test_late_reply_comes_after_td_max_plus_delay():
    bus, m1, _ = two_meter_bus(timing=LineTiming(enabled=False, td_max_ms=30))
    m1.faults.add(FaultSpec(Fault.LATE_REPLY, delay_ms=40, remaining=1))
    chunks = await bus.transact(read(A1))
    assert [c.delay for c in chunks] == [pytest.approx(0.070)]
    assert decode(chunks) == [expected_reply(A1)]
    # The late reply keeps the line busy: the next request waits for it.
    t0 = time.monotonic()
    assert decode(await bus.transact(read(A2))) == [expected_reply(A2)]
    assert time.monotonic() - t0 >= 0.06


async def test_wrong_address_uses_another_meter_with_a_valid_checksum():
    bus, _m1, m2 = two_meter_bus()
    m2.faults.add(FaultSpec(Fault.WRONG_ADDRESS))
    assert decode(await bus.transact(read(A2))) == [expected_reply(A1)]  # the other meter on the line
    alone = Bus("alone", [FakeMeter(A1)], clock())
    alone.faults.add(FaultSpec(Fault.WRONG_ADDRESS))  # a bus-wide fault
    assert decode(await alone.transact(read(A1))) == [expected_reply(A2)]  # address + 1


async def test_bus_faults_apply_to_every_meter():
    bus, _, _ = two_meter_bus()
    bus.faults.add(FaultSpec(Fault.NO_REPLY, remaining=2))
    assert await bus.transact(read(A1)) == [] and await bus.transact(read(A2)) == []
    assert decode(await bus.transact(read(A1))) == [expected_reply(A1)]
    assert bus.stats.faults["no_reply"] == 2


async def test_faults_wait_for_a_reply_to_spoil():
    bus, m1, _ = two_meter_bus()
    m1.faults.add(FaultSpec(Fault.BAD_CHECKSUM, remaining=1))
    assert await bus.transact(Frame(BROADCAST, 0x08, bytes(6))) == []
    assert await bus.transact(read("000000000009")) == []
    assert decode(await bus.transact(read(A1))) == []  # spent here
    assert decode(await bus.transact(read(A1))) == [expected_reply(A1)]


async def test_fault_probability_is_deterministic_under_a_seed():
    async def outcomes(seed: int) -> list[bool]:
        bus, m1, _ = two_meter_bus(seed=seed)
        m1.faults.add(FaultSpec(Fault.NO_REPLY, probability=0.5))
        return [bool(await bus.transact(read(A1))) for _ in range(40)]

    first = await outcomes(7)
    assert first == await outcomes(7)
    assert 5 < sum(first) < 35
    assert first != await outcomes(8)


# --- timing ---------------------------------------------------------------------------


def test_wire_time_arithmetic():
    t = LineTiming()
    assert t.wire_seconds(20) == pytest.approx(0.0917, abs=1e-4)  # dlt645.md §9
    assert LineTiming(baud=9600).byte_seconds == pytest.approx(11 / 9600)
    with pytest.raises(ValueError):
        LineTiming(td_min_ms=600)
    with pytest.raises(ValueError):
        LineTiming(td_distribution="gaussian")


@pytest.mark.parametrize("distribution", ["uniform", "fixed", "lognormal"])
def test_td_stays_in_the_window(distribution):
    t = LineTiming(td_distribution=distribution, td_median_ms=400, td_sigma=1.5)
    rng = random.Random(0)
    samples = [t.sample_td(rng) for _ in range(500)]
    assert all(0.020 <= s <= 0.500 for s in samples)
    if distribution == "fixed":
        assert set(samples) == {0.020}


async def test_chunk_delay_is_request_wire_time_plus_td_plus_reply_wire_time():
    timing = LineTiming(baud=9600, td_distribution="fixed", td_fixed_ms=25)
    bus, _, _ = two_meter_bus(timing=timing)
    chunks = await bus.transact(read(A1), raw_len=20)
    reply_len = len(expected_reply(A1).encode(4))
    assert [c.delay for c in chunks] == [
        pytest.approx(timing.wire_seconds(20) + 0.025 + timing.wire_seconds(reply_len))
    ]


async def test_timed_reply_arrives_after_request_wire_time_plus_td_min():
    timing = LineTiming(baud=9600, td_min_ms=20, td_max_ms=40)
    bus, _, _ = two_meter_bus(timing=timing)
    request = read(A1).encode()
    got: list[float] = []
    port = BusPort(bus, lambda d: got.append(time.monotonic()))
    t0 = time.monotonic()
    port.feed(request)
    await asyncio.wait_for(port.drain(), 5)
    await port.close()
    assert len(got) == 1
    assert got[0] - t0 >= timing.wire_seconds(len(request)) + 0.020 - 0.002  # timer slack
    assert got[0] - t0 < 2.0  # generous


async def test_same_seed_same_timing():
    async def delays(seed: int) -> list[float]:
        bus, _, _ = two_meter_bus(timing=LineTiming(baud=1_000_000, td_min_ms=0, td_max_ms=2), seed=seed)
        return [(await bus.transact(read(A1)))[0].delay for _ in range(10)]

    assert await delays(1) == await delays(1)
    assert await delays(1) != await delays(2)


async def test_concurrent_transactions_never_interleave():
    timing = LineTiming(baud=9600, td_min_ms=5, td_max_ms=10)
    bus, _, _ = two_meter_bus(timing=timing)
    writes: dict[str, list[tuple[float, bytes]]] = {A1: [], A2: []}
    ports = {a: BusPort(bus, lambda d, a=a: writes[a].append((time.monotonic(), d))) for a in (A1, A2)}
    for _ in range(3):
        for a, port in ports.items():
            port.feed(read(a).encode())
    await asyncio.wait_for(asyncio.gather(*(p.drain() for p in ports.values())), 5)
    for port in ports.values():
        await port.close()
    for a in (A1, A2):  # each port got exactly its own replies
        assert [d for _, d in writes[a]] == [expected_reply(a).encode(4)] * 3
    records = list(bus.history)
    assert len(records) == 6
    for earlier, later in itertools.pairwise(records):
        assert later.start >= earlier.end - 1e-6  # the line is never shared
    # And on the wall clock: consecutive replies are at least one transaction apart.
    stamps = sorted(t for w in writes.values() for t, _ in w)
    minimum = timing.wire_seconds(20) + 0.005 + timing.wire_seconds(24)
    assert all(b - a >= minimum - 0.003 for a, b in itertools.pairwise(stamps))


async def test_untimed_concurrent_transactions_are_serialized():
    bus, _, _ = two_meter_bus()
    results = await asyncio.gather(*(bus.transact(read(A1 if i % 2 else A2)) for i in range(50)))
    assert [decode(r) for r in results] == [[expected_reply(A1 if i % 2 else A2)] for i in range(50)]
    assert bus.stats.requests == 50


# --- ports and streams ----------------------------------------------------------------


@FAST
@given(cuts=st.lists(st.integers(1, 19), max_size=8), noise=st.sampled_from([b"", b"\x00\x16\xfe", b"\xfe\xfe"]))
def test_port_reassembles_requests_split_anywhere(cuts, noise):
    stream = noise + read(A1).encode() + read(A2).encode(0)
    got: list[bytes] = []

    async def run() -> None:
        bus = Bus("line", [FakeMeter(A1), FakeMeter(A2)], clock())
        port = BusPort(bus, got.append)
        last = 0
        for c in [*sorted(set(cuts)), len(stream)]:
            port.feed(stream[last:c])
            last = c
        await port.drain()
        await port.close()

    asyncio.run(run())
    assert got == [expected_reply(A1).encode(4), expected_reply(A2).encode(4)]


async def test_idle_flush_recovers_from_a_bogus_header():
    bus, _, _ = two_meter_bus()
    got: list[bytes] = []
    port = BusPort(bus, got.append, idle_flush=0.05)
    # "68 xx*6 68 C L" announcing 200 data bytes that never come, then a real request.
    port.feed(b"\x68" + bytes(6) + b"\x68\x11\xc8" + read(A1).encode())
    await asyncio.sleep(0.01)
    assert got == []  # the deframer is still waiting for the long frame
    await asyncio.sleep(0.1)
    await port.drain()
    await port.close()
    assert got == [expected_reply(A1).encode(4)]


async def test_serve_stream_until_eof():
    bus, _, _ = two_meter_bus()
    incoming = [read(A1).encode()[:7], read(A1).encode()[7:], read(A2).encode(), b""]
    got: list[bytes] = []

    async def reader() -> bytes:
        return incoming.pop(0)

    async def writer(data: bytes) -> None:
        got.append(data)

    stats = await serve_stream(bus, reader, writer)
    assert got == [expected_reply(A1).encode(4), expected_reply(A2).encode(4)]
    assert stats.frames_in == 2 and stats.chunks_out == 2


async def test_port_survives_a_failing_writer():
    bus, _, _ = two_meter_bus()
    calls = []

    def writer(data: bytes) -> None:
        calls.append(data)
        if len(calls) == 1:
            raise ConnectionResetError("peer gone")

    port = BusPort(bus, writer)
    port.feed(read(A1).encode() + read(A2).encode())
    await port.drain()
    await port.close()
    assert len(calls) == 2 and port.stats.write_errors == 1 and port.stats.chunks_out == 1


def test_a_fault_limited_to_one_function_keeps_its_limit_while_counting_down():
    from simulator.faults import Fault, FaultSet, FaultSpec

    faults = FaultSet()
    faults.add(FaultSpec(Fault.TRUNCATED, remaining=2, function=0x03))
    assert faults.fire(Fault.TRUNCATED, 0.0, 0x03) is not None
    assert faults.fire(Fault.TRUNCATED, 0.0, 0x11) is None  # still limited to 0x03 after one firing
    assert faults.fire(Fault.TRUNCATED, 0.0, 0x03) is not None
    assert faults.get(Fault.TRUNCATED) is None
