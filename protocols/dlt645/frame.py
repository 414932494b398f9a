"""The DL/T 645 link-layer frame, 2007 and 1997 (dlt645.md §1.2, §7).

``[FE x 0..4] 68 A0..A5 68 C L DATA CS 16``: data bytes are sent +0x33, the checksum is
the byte sum from the first 68 to the end of the (scrambled) data. This module is the
hot path of both the gateway and the simulator, so it is hand-written rather than declared
with ``construct`` (shared/reference/deps.md §4: about 30x faster).
"""

from __future__ import annotations

from .address import address_from_wire, address_to_wire, normalize_address
from .control import Control, Edition
from .errors import AddressError, ChecksumError, FrameError, IncompleteFrameError

START = 0x68
END = 0x16
PREAMBLE_BYTE = 0xFE
MAX_PREAMBLE = 4
MAX_DATA = 255
MIN_FRAME = 12  # without preamble, L = 0 (§1.3)
MAX_FRAME = MIN_FRAME + MAX_DATA

ADD33 = bytes((i + 0x33) & 0xFF for i in range(256))
SUB33 = bytes((i - 0x33) & 0xFF for i in range(256))
_PREAMBLES = tuple(b"\xfe" * n for n in range(MAX_PREAMBLE + 1))


class Frame:
    """One frame: the nameplate address, the control code and the de-scrambled data."""

    __slots__ = ("address", "control", "data", "edition")

    def __init__(
        self,
        address: str,
        control: Control | int,
        data: bytes = b"",
        edition: Edition | None = None,
    ) -> None:
        if isinstance(control, int):
            if not 0 <= control <= 0xFF:
                raise FrameError(f"control byte {control} is outside 0..255")
            control = Control.from_byte(control)
        self.address = normalize_address(address)
        self.control = control
        self.data = bytes(data)
        self.edition = edition if edition is not None else guess_edition(control, len(self.data))

    @property
    def function(self) -> int:
        """The function code (D4..D0 of the control byte)."""
        return self.control.function

    @property
    def length(self) -> int:
        """The L byte: number of data bytes."""
        return len(self.data)

    def encode(self, preamble: int = MAX_PREAMBLE) -> bytes:
        """The frame as wire bytes, with ``preamble`` leading ``FE`` bytes."""
        return encode_frame(self.address, self.control.byte, self.data, preamble)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (
            self.address == other.address
            and self.control == other.control
            and self.data == other.data
            and self.edition == other.edition
        )

    def __hash__(self) -> int:
        return hash((self.address, self.control, self.data, self.edition))

    def __repr__(self) -> str:
        return (
            f"Frame(address={self.address!r}, control=0x{self.control.byte:02X}, "
            f"data={self.data.hex(' ')!r}, edition={self.edition.value!r})"
        )


def guess_edition(control: Control, length: int) -> Edition:
    """The edition a frame belongs to, from its control code (and length for 0x03).

    0x11..0x1D are 2007, 0x01..0x10 are 1997. 0x03 is the 2007 security extension unless it
    is a request without data (the 1997 re-read); 0x08 is the same in both and reported as
    2007 (§7.1).
    """
    if control.function == 0x03 and not control.response and length == 0:
        return Edition.V1997
    return control.edition()


def encode_frame(address: str, control: int, data: bytes = b"", preamble: int = MAX_PREAMBLE) -> bytes:
    """Wire bytes for a frame to ``address`` with control byte ``control`` and plain ``data``."""
    if len(data) > MAX_DATA:
        raise FrameError(f"data field of {len(data)} bytes exceeds {MAX_DATA}")
    if not 0 <= preamble <= MAX_PREAMBLE:
        raise FrameError(f"preamble of {preamble} FE bytes is outside 0..{MAX_PREAMBLE}")
    if not 0 <= control <= 0xFF:
        raise FrameError(f"control byte {control} is outside 0..255")
    body = b"\x68" + address_to_wire(address) + b"\x68" + bytes((control, len(data))) + data.translate(ADD33)
    return _PREAMBLES[preamble] + body + bytes((sum(body) & 0xFF, END))


def parse_frame_at(raw: bytes, start: int, edition: Edition | None = None) -> tuple[Frame, int]:
    """Parse the frame whose first ``68`` is at ``start``; return it and the index after it.

    Raises :class:`IncompleteFrameError` when ``raw`` ends too early, and another
    :class:`FrameError` subclass when the bytes are not a valid frame.
    """
    n = len(raw)
    if n - start < 10:
        raise IncompleteFrameError(f"{n - start} bytes, a frame header needs 10")
    if raw[start] != START or raw[start + 7] != START:
        raise FrameError("missing 68 start bytes at offsets 0 and 7")
    length = raw[start + 9]
    end = start + 12 + length
    if end > n:
        raise IncompleteFrameError(f"frame needs {end - start} bytes, got {n - start}")
    cs_at = end - 2
    checksum = sum(raw[start:cs_at]) & 0xFF
    if raw[cs_at] != checksum:
        raise ChecksumError(checksum, raw[cs_at])
    if raw[end - 1] != END:
        raise FrameError(f"end byte is {raw[end - 1]:02X}, not 16")
    try:
        address = address_from_wire(raw[start + 1 : start + 7])
    except AddressError as exc:
        raise FrameError(str(exc)) from None
    control = Control.from_byte(raw[start + 8])
    data = raw[start + 10 : cs_at].translate(SUB33)
    if edition is None:
        edition = guess_edition(control, length)
    frame = Frame.__new__(Frame)
    frame.address = address
    frame.control = control
    frame.data = data
    frame.edition = edition
    return frame, end


def decode_frame(raw: bytes, edition: Edition | None = None) -> Frame:
    """Decode exactly one frame (any number of leading ``FE`` allowed, nothing after it)."""
    frames = decode_frames(raw, edition)
    if len(frames) != 1:
        raise FrameError(f"expected one frame, found {len(frames)}")
    return frames[0]


def decode_frames(raw: bytes, edition: Edition | None = None) -> list[Frame]:
    """Decode one or more concatenated frames, each with optional ``FE`` preamble.

    Strict: any byte that is neither preamble nor part of a valid frame raises
    :class:`FrameError`. For a noisy byte stream use :class:`~.deframer.Deframer`.
    """
    raw = bytes(raw)
    frames: list[Frame] = []
    i, n = 0, len(raw)
    while i < n:
        while i < n and raw[i] == PREAMBLE_BYTE:
            i += 1
        if i >= n:
            break
        if raw[i] != START:
            raise FrameError(f"unexpected byte {raw[i]:02X} at offset {i}, expected 68 or FE")
        frame, i = parse_frame_at(raw, i, edition)
        frames.append(frame)
    if not frames:
        raise IncompleteFrameError("no frame in input")
    return frames
