"""The streaming deframer: noise, preambles, split frames, resynchronisation, bounded memory."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols.dlt645.control import Edition
from protocols.dlt645.deframer import Deframer
from protocols.dlt645.errors import FrameError
from protocols.dlt645.frame import MAX_DATA, MAX_FRAME, MAX_PREAMBLE, Frame, encode_frame, parse_frame_at

PENDING_BOUND = 267  # one maximum frame without preamble (12 + 255)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

bcd_pair = st.integers(0, 99).map(lambda n: f"{n:02d}")


@st.composite
def addresses(draw) -> str:
    k = draw(st.integers(0, 6))
    return "AA" * k + "".join(draw(st.lists(bcd_pair, min_size=6 - k, max_size=6 - k)))


@st.composite
def frame_specs(draw, max_data: int = 64):
    """(address, control, data, preamble); data often full of bytes that scramble to 68 or 16."""
    data = draw(
        st.one_of(
            st.binary(max_size=max_data),
            st.lists(st.sampled_from([0x35, 0xE3, 0xCB, 0x00]), max_size=max_data).map(
                bytes
            ),  # 68 / 16 / FE on the wire
        )
    )
    return draw(addresses()), draw(st.integers(0, 255)), data, draw(st.integers(0, MAX_PREAMBLE))


def wire(spec) -> bytes:
    return encode_frame(*spec)


def expected(spec) -> Frame:
    address, control, data, _ = spec
    return Frame(address, control, data)


def feed_in_chunks(deframer: Deframer, stream: bytes, cuts: list[int]) -> list[Frame]:
    """Feed ``stream`` cut at ``cuts``, checking the memory bound after every feed; then flush."""
    out: list[Frame] = []
    bounds = sorted({c for c in cuts if 0 < c < len(stream)})
    last = 0
    for c in [*bounds, len(stream)]:
        out += deframer.feed(stream[last:c])
        assert deframer.pending <= PENDING_BOUND
        last = c
    out += deframer.flush()
    assert deframer.pending == 0
    return out


def oracle(stream: bytes):
    """Frames a scanner finds in the whole stream at once: [(start, end, frame)], and the rejects.

    At each 68 try a frame; take it and jump past it, or move one byte on. This is what the
    deframer must produce however the stream is chunked.
    """
    found, rejects, pos = [], 0, 0
    while True:
        start = stream.find(0x68, pos)
        if start < 0:
            return found, rejects
        try:
            frame, end = parse_frame_at(stream, start)
        except FrameError:
            rejects += 1
            pos = start + 1
            continue
        found.append((start, end, frame))
        pos = end


def outside_noise(stream: bytes, found) -> int:
    """Non-FE bytes outside the frames: what ``discarded_bytes`` must count."""
    inside, last, fe = 0, 0, 0
    for start, end, _ in found:
        fe += stream.count(0xFE, last, start)
        inside += end - start
        last = end
    fe += stream.count(0xFE, last)
    return len(stream) - inside - fe


# --- clean streams: frames, FE and noise without 68 -----------------------------------------

noise_no_68 = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\x68", b""))
fe_run = st.integers(1, 8).map(lambda n: b"\xfe" * n)


@st.composite
def clean_streams(draw):
    """Frames interleaved with FE runs and noise that has no 68; the expected frames and noise."""
    parts, frames, noise = [], [], 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["frame", "frame", "noise", "fe"]))
        if kind == "frame":
            spec = draw(frame_specs())
            parts.append(wire(spec))
            frames.append(expected(spec))
        elif kind == "noise":
            chunk = draw(noise_no_68)
            parts.append(chunk)
            noise += len(chunk) - chunk.count(0xFE)
        else:
            parts.append(draw(fe_run))
    return b"".join(parts), frames, noise


@FAST
@given(clean_streams(), st.lists(st.integers(0, 2000), max_size=30))
def test_clean_stream_yields_exactly_the_frames(case, cuts):
    stream, frames, noise = case
    d = Deframer()
    assert feed_in_chunks(d, stream, cuts) == frames
    assert d.stats.frames == len(frames)
    assert d.stats.bad_frames == 0
    assert d.stats.discarded_bytes == noise


@FAST
@given(clean_streams())
def test_clean_stream_byte_by_byte(case):
    stream, frames, _ = case
    d = Deframer()
    out = []
    for i in range(len(stream)):
        out += d.feed(stream[i : i + 1])
        assert d.pending <= PENDING_BOUND
    # all frames are complete: nothing should wait for flush()
    assert out == frames
    assert d.flush() == []


# --- dirty streams: arbitrary noise and corrupted frames ------------------------------------


@st.composite
def dirty_streams(draw):
    """Frames, FE, arbitrary noise (68 included) and frames with a bad checksum, in any order.

    Returns the stream, the offset where the last garbage ends, and the frames after it.
    """
    parts, garbage_end, after = [], 0, []
    pos = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["frame", "frame", "noise", "fe", "corrupt"]))
        if kind == "frame":
            spec = draw(frame_specs())
            chunk = wire(spec)
            after.append(expected(spec))
        elif kind == "fe":
            chunk = draw(fe_run)
        else:
            if kind == "noise":
                chunk = draw(
                    st.one_of(
                        st.binary(min_size=1, max_size=40),
                        st.lists(st.sampled_from([0x68, 0x16, 0xFE, 0x00, 0xFF]), min_size=1, max_size=20).map(bytes),
                    )
                )
            else:
                raw = bytearray(wire(draw(frame_specs())))
                raw[-2] ^= draw(st.integers(1, 255))  # break the checksum
                if draw(st.booleans()):  # ...and sometimes cut the frame short
                    del raw[draw(st.integers(MAX_PREAMBLE + 1, len(raw) - 1)) :]
                chunk = bytes(raw)
            garbage_end = pos + len(chunk)
            after = []
        parts.append(chunk)
        pos += len(chunk)
    return b"".join(parts), garbage_end, after


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dirty_streams(), st.lists(st.integers(0, 2000), max_size=30))
def test_dirty_stream(case, cuts):
    stream, garbage_end, after = case
    d = Deframer()
    out = feed_in_chunks(d, stream, cuts)  # never raises; pending stays bounded
    found, rejects = oracle(stream)
    # chunking never changes the result: it is what a scan of the whole stream finds
    assert out == [f for _, _, f in found]
    assert d.stats.frames == len(found)
    assert d.stats.bad_frames == rejects
    assert d.stats.discarded_bytes == outside_noise(stream, found)
    # every real frame after the last garbage comes out, in order, at the end, unless a frame
    # that validates (checksum and all) begins in the garbage and runs into them
    spanning = any(start < garbage_end < end for start, end, _ in found)
    event("garbage-started frame spans into real frames" if spanning else "no spanning frame")
    if not spanning:
        assert out[len(out) - len(after) :] == after


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dirty_streams(), dirty_streams(), st.lists(st.integers(0, 2000), max_size=10))
def test_chunking_does_not_matter(a, b, cuts):
    stream = a[0] + b[0]
    whole = Deframer()
    in_one = whole.feed(stream) + whole.flush()
    chunked = Deframer()
    assert feed_in_chunks(chunked, stream, cuts) == in_one
    assert chunked.stats == whole.stats


# --- 68 inside the frame ------------------------------------------------------------------


def test_68_in_address_data_control_and_length():
    # address 686868686868, control 0x68, L = 0x68, data scrambling to 68: every byte but CS/16 is 68
    frame_wire = encode_frame("686868686868", 0x68, bytes([0x35]) * 0x68, 0)
    assert frame_wire[:-2] == b"\x68" * (len(frame_wire) - 2)
    d = Deframer()
    out = d.feed(b"\xfe\xfe" + frame_wire + frame_wire)
    assert out == [Frame("686868686868", 0x68, bytes([0x35]) * 0x68)] * 2
    assert d.pending == 0 and d.stats.bad_frames == 0


def test_68_and_16_inside_data():
    data = bytes([0x35, 0xE3, 0x35, 0x35, 0xE3, 0xCB, 0x00])  # 68 16 68 68 16 FE 33 on the wire
    raw = encode_frame("123456789012", 0x91, data)
    assert b"\x68\x16\x68" in raw
    d = Deframer()
    for i in range(len(raw)):
        assert d.feed(raw[i : i + 1]) == ([Frame("123456789012", 0x91, data)] if i == len(raw) - 1 else [])
    assert d.stats.bad_frames == 0


def test_frame_split_at_every_boundary():
    raw = b"\x00\x01" + encode_frame("003411001043", 0x91, bytes.fromhex("00 01 01 02 97 22")) + b"\x02"
    want = [Frame("003411001043", 0x91, bytes.fromhex("00 01 01 02 97 22"))]
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            d = Deframer()
            out = d.feed(raw[:i]) + d.feed(raw[i:j]) + d.feed(raw[j:])
            assert out == want, (i, j)
            assert d.flush() == []
            assert d.stats.discarded_bytes == 3


@FAST
@given(frame_specs(max_data=MAX_DATA), st.data())
def test_any_frame_split_anywhere(spec, data):
    raw = wire(spec)
    i = data.draw(st.integers(0, len(raw)))
    d = Deframer()
    first = d.feed(raw[:i])
    assert first == ([] if i < len(raw) else [expected(spec)])
    assert d.pending <= PENDING_BOUND
    assert first + d.feed(raw[i:]) == [expected(spec)]


# --- resynchronisation ----------------------------------------------------------------------

V10 = bytes.fromhex("FE FE FE FE 68 43 10 00 11 34 00 68 91 06 33 34 34 35 CA 55 EE 16")
V11 = bytes.fromhex("FE FE FE FE 68 43 10 00 11 34 00 68 D1 06 33 34 34 35 CA 55 EE 16")  # bad checksum


def test_resync_after_bad_checksum():
    d = Deframer()
    out = d.feed(V11 + V10)
    assert [f.control.byte for f in out] == [0x91]
    assert out[0].address == "003411001043"
    assert d.stats.frames == 1
    assert d.stats.bad_frames == 2  # V11's first 68, then its second 68 (at offset 7)
    assert d.stats.discarded_bytes == len(V11) - 4  # all of V11 but its FE preamble


def test_resync_after_truncated_frame():
    """A frame cut short by a new frame: its L claims bytes that belong to the next frame."""
    d = Deframer()
    out = d.feed(V10[:18] + V10)  # cut inside the data: L = 6 takes V10's preamble as data and CS
    assert len(out) == 1 and out[0].data == bytes.fromhex("00 01 01 02 97 22")
    assert d.stats.bad_frames == 2 and d.pending == 0


def test_stray_header_in_noise_waits_then_flush_recovers():
    """68 .. 68 announcing L = 255 holds a real frame back until the candidate is complete or flushed."""
    stray = b"\x68" + bytes(6) + b"\x68\x11\xff"
    d = Deframer()
    assert d.feed(stray + V10) == []  # the candidate still needs bytes
    assert d.pending == len(stray) + len(V10)
    out = d.flush()
    assert len(out) == 1 and out[0].control.byte == 0x91
    assert d.pending == 0
    assert d.stats.bad_frames == 2  # each of the stray's two 68s started a candidate


def test_stray_header_in_noise_resolved_by_more_bytes():
    stray = b"\x68" + bytes(6) + b"\x68\x11\xff"
    d = Deframer()
    assert d.feed(stray + V10) == []
    out = d.feed(b"\xfe" * 300)  # the candidate completes, fails, and the scan moves on
    assert len(out) == 1
    assert d.pending == 0


def test_flush_on_empty_and_idle():
    d = Deframer()
    assert d.flush() == []
    assert d.feed(b"") == []
    assert d.feed(b"\xfe" * 10) == []
    assert d.flush() == []
    assert d.stats.discarded_bytes == 0  # preamble bytes are not noise


def test_edition_is_passed_through():
    raw = encode_frame("1", 0x11, b"\x00\x00\x01\x00")
    assert Deframer().feed(raw)[0].edition is Edition.V2007
    assert Deframer(Edition.V1997).feed(raw)[0].edition is Edition.V1997


# --- memory bound ---------------------------------------------------------------------------


def test_one_megabyte_of_garbage():
    rng = random.Random(645)
    garbage = rng.randbytes(1 << 20)
    d = Deframer()
    out, pos, peak = [], 0, 0
    while pos < len(garbage):
        n = rng.randint(1, 4096)
        out += d.feed(garbage[pos : pos + n])
        peak = max(peak, d.pending)
        assert d.pending <= PENDING_BOUND
        pos += n
    out += d.flush()
    found, rejects = oracle(garbage)
    assert out == [f for _, _, f in found]
    assert d.stats.bad_frames == rejects > 3000  # about one 68 in 256 bytes
    assert d.stats.discarded_bytes == outside_noise(garbage, found)
    assert peak <= PENDING_BOUND


def test_worst_case_pending():
    """A candidate announcing the longest frame is held, but never more than one frame of bytes."""
    d = Deframer()
    header = b"\x68" + bytes(6) + b"\x68\x11\xff"
    assert d.feed(header + bytes(MAX_FRAME - len(header) - 1)) == []
    assert d.pending == MAX_FRAME - 1
    d.feed(b"\x00")  # completes the candidate, which fails
    assert d.pending == 0


def test_stats_frames_and_noise():
    d = Deframer()
    d.feed(b"\x01\x02" + V10 + b"\x03" + V10)
    d.feed(b"\x68")
    assert d.stats.frames == 2 and d.stats.discarded_bytes == 3 and d.stats.bad_frames == 0
    assert d.pending == 1
    d.flush()
    assert d.stats.bad_frames == 1 and d.stats.discarded_bytes == 4
