"""Long values over several frames: 0x11 with the follow-up flag, then 0x12 (dlt645.md §2.1).

The meter side splits a value into reply payloads (:func:`split_reply`); the master side
collects them with a :class:`FollowUpAssembler`, which says which request to send next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PayloadError
from .frame import MAX_DATA
from .payloads import Payload, ReadFollowUpReply, ReadFollowUpRequest, ReadReply, ReadRequest

MAX_FOLLOW_UPS = 255


@dataclass(frozen=True, slots=True)
class ReplyPart:
    """One reply frame of a split value: its payload and whether more frames follow."""

    payload: ReadReply | ReadFollowUpReply
    follow_up: bool


def split_reply(di: int, value: bytes, max_data: int = 200) -> list[ReplyPart]:
    """The reply frames a meter sends for ``value``: the first by 0x91, then 0x92 with SEQ.

    ``max_data`` bounds the DATA field of each frame (the 1997 text's informative 200).
    """
    if not 6 <= max_data <= MAX_DATA:
        raise PayloadError(f"max_data {max_data} is outside 6..{MAX_DATA}")
    first = max_data - 4
    if len(value) <= first:
        return [ReplyPart(ReadReply(di, value), False)]
    parts: list[ReplyPart] = [ReplyPart(ReadReply(di, value[:first]), True)]
    step = max_data - 5  # DI + SEQ
    pos, seq = first, 1
    while pos < len(value):
        chunk = value[pos : pos + step]
        pos += len(chunk)
        if seq > MAX_FOLLOW_UPS:
            raise PayloadError("value needs more than 255 follow-up frames")
        parts.append(ReplyPart(ReadFollowUpReply(di, chunk, seq), pos < len(value)))
        seq += 1
    return parts


@dataclass
class FollowUpAssembler:
    """Collects a value sent over several frames; ``next_request`` is what to send next."""

    di: int
    _chunks: list[bytes] = field(default_factory=list)
    _seq: int = 0
    _more: bool = True

    @property
    def done(self) -> bool:
        """Whether the last frame (without the follow-up flag) has arrived."""
        return not self._more

    @property
    def value(self) -> bytes:
        """The value bytes collected so far (all of them once ``done``)."""
        return b"".join(self._chunks)

    def next_request(self) -> ReadRequest | ReadFollowUpRequest | None:
        """The request for the next part (0x11 first, then 0x12 with SEQ), or None when done."""
        if self.done:
            return None
        return ReadRequest(self.di) if self._seq == 0 else ReadFollowUpRequest(self.di, self._seq)

    def add(self, payload: Payload, follow_up: bool) -> None:
        """Add a reply; raises :class:`PayloadError` if it is not the expected next part."""
        if self.done:
            raise PayloadError("value is already complete")
        if self._seq == 0:
            if not isinstance(payload, ReadReply) or payload.di != self.di:
                raise PayloadError("the first part must be a 0x91 reply for the same DI")
            self._chunks.append(payload.value)
        else:
            if not isinstance(payload, ReadFollowUpReply) or payload.di != self.di:
                raise PayloadError("a follow-up part must be a 0x92 reply for the same DI")
            if payload.seq != self._seq:
                raise PayloadError(f"follow-up part {payload.seq} arrived, expected {self._seq}")
            self._chunks.append(payload.value)
        self._seq += 1
        self._more = follow_up
