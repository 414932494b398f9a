"""Typed errors raised by the DL/T 645 codec.

Every failure of the codec is a :class:`Dlt645Error`, so a caller decoding untrusted bytes
needs to catch exactly one type.
"""

from __future__ import annotations


class Dlt645Error(ValueError):
    """Base class of every error the DL/T 645 codec raises."""


class FrameError(Dlt645Error):
    """Bytes that do not form a valid frame (header, length, end byte)."""


class IncompleteFrameError(FrameError):
    """The bytes end before the frame does."""


class ChecksumError(FrameError):
    """The frame's checksum byte does not match its contents."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"checksum mismatch: frame says {actual:02X}, computed {expected:02X}")
        self.expected = expected
        self.actual = actual


class AddressError(Dlt645Error):
    """An address that is not a 12-digit BCD nameplate address (or a valid wildcard)."""


class UnknownDIError(Dlt645Error):
    """A data identifier that is not in the data-identifier table."""

    def __init__(self, di: int, edition: str) -> None:
        width = 8 if edition == "2007" else 4
        super().__init__(f"unknown data identifier {di:0{width}X} (DL/T 645-{edition})")
        self.di = di
        self.edition = edition


class ValueFormatError(Dlt645Error):
    """A value that does not fit its data format (bad BCD digit, wrong length, out of range)."""


class PayloadError(Dlt645Error):
    """A data field whose layout does not match its function code."""
