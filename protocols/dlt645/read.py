"""The common case, fast: build a 0x11 read request, decode a read reply to its value.

Both directions of the hottest transaction (poll one register) without building payload
objects; results are identical to the general path (``payloads`` + ``table``).
"""

from __future__ import annotations

from typing import Any

from .address import address_from_wire, address_to_wire
from .control import Edition
from .errors import AddressError, FrameError, PayloadError
from .frame import ADD33, END, MAX_PREAMBLE, PREAMBLE_BYTE, SUB33, parse_frame_at
from .table import DI_1997, DI_2007, DataItem

_PREAMBLES = tuple(b"\xfe" * n for n in range(MAX_PREAMBLE + 1))


def encode_read_request(address: str, di: int, preamble: int = 4, edition: Edition = Edition.V2007) -> bytes:
    """Wire bytes of a read request (0x11, or 0x01 for 1997) for ``di`` to ``address``."""
    if not 0 <= preamble <= MAX_PREAMBLE:
        raise FrameError(f"preamble of {preamble} FE bytes is outside 0..{MAX_PREAMBLE}")
    if not 0 <= di < (1 << 32 if edition is Edition.V2007 else 1 << 16):
        raise PayloadError(f"DI {di:#x} does not fit {4 if edition is Edition.V2007 else 2} bytes")
    if edition is Edition.V2007:
        head = b"\x68" + address_to_wire(address) + b"\x68\x11\x04"
        body = head + di.to_bytes(4, "little").translate(ADD33)
    else:
        head = b"\x68" + address_to_wire(address) + b"\x68\x01\x02"
        body = head + di.to_bytes(2, "little").translate(ADD33)
    return _PREAMBLES[preamble] + body + bytes((sum(body) & 0xFF, END))


def decode_read_reply(raw: bytes) -> tuple[str, DataItem, Any]:
    """(address, data item, value) of a normal read reply (0x91 or 0x81).

    Raises :class:`FrameError` for a bad frame, :class:`PayloadError` for any other reply,
    and :class:`~.errors.UnknownDIError` for a DI the table lacks.
    """
    i = 0
    n = len(raw)
    while i < n and raw[i] == PREAMBLE_BYTE:
        i += 1
    # Inline framing (the general path is ``frame.parse_frame_at``, which this must match).
    if n - i < 12 or raw[i] != 0x68 or raw[i + 7] != 0x68:
        parse_frame_at(raw, i)  # raises the precise FrameError
        raise FrameError("not a frame")  # pragma: no cover - parse_frame_at raised
    length = raw[i + 9]
    end = i + 12 + length
    if end != n or raw[end - 2] != sum(raw[i : end - 2]) & 0xFF or raw[end - 1] != END:
        if end < n:
            raise FrameError(f"{n - end} bytes after the frame")
        parse_frame_at(raw, i)
        raise FrameError("not a frame")  # pragma: no cover
    control = raw[i + 8]
    data = raw[i + 10 : end - 2].translate(SUB33)
    address = raw[i + 1 : i + 7][::-1].hex()
    if not address.isdigit():
        try:
            address = address_from_wire(raw[i + 1 : i + 7])
        except AddressError as exc:
            raise FrameError(str(exc)) from None
    if control == 0x91:
        if length < 4:
            raise PayloadError(f"a read reply needs at least 4 data bytes, got {length}")
        item = _LOOKUP_2007(int.from_bytes(data[:4], "little"))
        return address, item, item.format.decode(data[4:])
    if control == 0x81:
        if length < 2:
            raise PayloadError(f"a read reply needs at least 2 data bytes, got {length}")
        item = _LOOKUP_1997(int.from_bytes(data[:2], "little"))
        return address, item, item.format.decode(data[2:])
    raise PayloadError(f"control 0x{control:02X} is not a normal read reply")


_LOOKUP_2007 = DI_2007.lookup
_LOOKUP_1997 = DI_1997.lookup


__all__ = ["SUB33", "decode_read_reply", "encode_read_request"]
