"""0x11/0x12 follow-up sequences: split on the meter side, assembled on the master side."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.dlt645 import (
    PayloadError,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    build_frame,
    decode_frame,
    parse_payload,
)
from protocols.dlt645.followup import FollowUpAssembler, split_reply


@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=2000), st.integers(6, 255))
def test_split_then_assemble_through_frames(di, value, max_data):
    parts = split_reply(di, value, max_data)
    asm = FollowUpAssembler(di)
    assert asm.next_request() == ReadRequest(di)
    for i, part in enumerate(parts):
        frame = decode_frame(build_frame("000000000001", part.payload, follow_up=part.follow_up).encode())
        assert frame.length <= max_data
        assert frame.control.follow_up == part.follow_up
        if i:
            assert asm.next_request() == ReadFollowUpRequest(di, i)
        asm.add(parse_payload(frame), frame.control.follow_up)
    assert asm.done and asm.next_request() is None
    assert asm.value == value


def test_short_value_is_one_frame():
    [part] = split_reply(0x00010000, b"\x00" * 4)
    assert part.follow_up is False and isinstance(part.payload, ReadReply)


def test_out_of_order_part_is_rejected():
    parts = split_reply(1, bytes(500), 100)
    asm = FollowUpAssembler(1)
    asm.add(parts[0].payload, True)
    with pytest.raises(PayloadError):
        asm.add(parts[2].payload, True)


def test_wrong_di_is_rejected():
    with pytest.raises(PayloadError):
        FollowUpAssembler(2).add(ReadReply(1, b""), False)
