"""A sans-I/O streaming deframer: feed received bytes, get complete frames.

It skips ``FE`` preambles and line noise, relies on the length byte (0x68 may occur inside
data), resynchronises one byte after a bad candidate, accepts frames split at any byte
boundary, and never holds more than one maximum-size frame of unprocessed bytes
(dlt645.md §1.2, §10.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from .control import Edition
from .errors import FrameError, IncompleteFrameError
from .frame import START, Frame, parse_frame_at


@dataclass
class DeframerStats:
    """Counters of what the deframer threw away."""

    frames: int = 0
    discarded_bytes: int = 0
    bad_frames: int = 0


class Deframer:
    """Turns a byte stream into frames.

    ``feed`` returns the frames completed by the new bytes. A candidate frame still waiting
    for bytes is kept; when the line goes idle, ``flush`` gives up on it and returns any
    complete frames hidden behind it (a stray ``68 .. 68 L`` in noise can announce a long
    frame that never comes).
    """

    def __init__(self, edition: Edition | None = None) -> None:
        self._buf = bytearray()
        self._edition = edition
        self.stats = DeframerStats()

    @property
    def pending(self) -> int:
        """Number of buffered bytes not yet returned or discarded."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        self._buf += data
        return self._scan(final=False)

    def flush(self) -> list[Frame]:
        """Treat the stream as idle: drop an incomplete candidate, return frames behind it."""
        frames = self._scan(final=True)
        self.stats.discarded_bytes += len(self._buf)
        self._buf.clear()
        return frames

    def _scan(self, final: bool) -> list[Frame]:
        buf = bytes(self._buf)
        frames: list[Frame] = []
        pos = 0  # where to look for the next 68
        consumed = 0  # end of the last frame returned
        keep_from = len(buf)
        while True:
            start = buf.find(START, pos)
            if start < 0:
                break
            try:
                frame, end = parse_frame_at(buf, start, self._edition)
            except IncompleteFrameError:
                if not final:
                    keep_from = start
                    break
                self.stats.bad_frames += 1
                pos = start + 1
                continue
            except FrameError:
                self.stats.bad_frames += 1
                pos = start + 1
                continue
            self.stats.discarded_bytes += _noise(buf, consumed, start)
            frames.append(frame)
            pos = consumed = end
        # Everything between the last frame and the pending candidate (or the end) is
        # noise; a pending candidate is shorter than one maximum frame (its L bounds it).
        self.stats.discarded_bytes += _noise(buf, consumed, keep_from)
        del self._buf[:keep_from]
        self.stats.frames += len(frames)
        return frames


def _noise(buf: bytes, start: int, end: int) -> int:
    """Bytes in ``buf[start:end]`` that are neither preamble nor frame."""
    if end <= start:
        return 0
    return end - start - buf.count(0xFE, start, end)
