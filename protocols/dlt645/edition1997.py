"""DL/T 645-1997 payloads: 2-byte data identifiers and the 1997 control codes (dlt645.md §7).

Frame, preamble, address, scrambling and checksum are shared with 2007 (``frame``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .control import Edition
from .payloads import (
    BroadcastTime,
    Password,
    Payload,
    WriteAddressRequest,
    _DiPayload,
    _Empty,
    _need,
    _OneByte,
    di_bytes,
    register,
)

V1997 = Edition.V1997


def _di(data: bytes) -> int:
    return int.from_bytes(data[:2], "little")


@register
@dataclass(frozen=True, slots=True)
class Read1997Request(_DiPayload):
    """0x01: read one 2-byte DI."""

    FUNCTION: ClassVar[int] = 0x01
    EDITION: ClassVar[Edition] = V1997
    WHAT: ClassVar[str] = "a 1997 read request"
    di: int


@register
@dataclass(frozen=True, slots=True)
class Read1997Reply(_DiPayload):
    """0x81 / 0xA1: DI and value bytes."""

    FUNCTION: ClassVar[int] = 0x01
    RESPONSE: ClassVar[bool] = True
    EDITION: ClassVar[Edition] = V1997
    WHAT: ClassVar[str] = "a 1997 read reply"
    HAS_VALUE: ClassVar[bool] = True
    di: int
    value: bytes


@register
@dataclass(frozen=True, slots=True)
class ReadFollowUp1997Request(_DiPayload):
    """0x02: read the next part of a long value."""

    FUNCTION: ClassVar[int] = 0x02
    EDITION: ClassVar[Edition] = V1997
    WHAT: ClassVar[str] = "a 1997 follow-up read request"
    di: int


@register
@dataclass(frozen=True, slots=True)
class ReadFollowUp1997Reply(_DiPayload):
    """0x82 / 0xA2."""

    FUNCTION: ClassVar[int] = 0x02
    RESPONSE: ClassVar[bool] = True
    EDITION: ClassVar[Edition] = V1997
    WHAT: ClassVar[str] = "a 1997 follow-up read reply"
    HAS_VALUE: ClassVar[bool] = True
    di: int
    value: bytes


@register
class Reread1997Request(_Empty):
    """0x03 with no data: repeat the last answer."""

    FUNCTION = 0x03
    EDITION = V1997


@register
@dataclass(frozen=True, slots=True)
class Write1997Request(Payload):
    """0x04: ``DI (2) + PA P0 P1 P2 + data`` (FW-C; no operator code in 1997)."""

    FUNCTION: ClassVar[int] = 0x04
    EDITION: ClassVar[Edition] = V1997
    di: int
    password: Password
    data: bytes

    def to_bytes(self) -> bytes:
        return di_bytes(self.di, V1997) + self.password.to_bytes() + self.data

    @classmethod
    def from_bytes(cls, data: bytes) -> Write1997Request:
        _need(data, 6, "a 1997 write request", exact=False)
        return cls(_di(data), Password.from_bytes(data[2:6]), bytes(data[6:]))


@register
class Write1997Reply(_Empty):
    """0x84."""

    FUNCTION = 0x04
    RESPONSE = True
    EDITION = V1997


@register
@dataclass(frozen=True, slots=True)
class BroadcastTime1997(BroadcastTime):
    """0x08 in a frame explicitly decoded as 1997 (same layout as 2007)."""

    EDITION: ClassVar[Edition] = V1997


@register
@dataclass(frozen=True, slots=True)
class WriteAddress1997Request(WriteAddressRequest):
    """0x0A: the new address (6); the 2007 layout under the 1997 function code."""

    FUNCTION: ClassVar[int] = 0x0A
    EDITION: ClassVar[Edition] = V1997


@register
class WriteAddress1997Reply(_Empty):
    """0x8A."""

    FUNCTION = 0x0A
    RESPONSE = True
    EDITION = V1997


@register
@dataclass(frozen=True, slots=True)
class ChangeBaud1997Request(_OneByte):
    """0x0C: the baud feature byte Z (its 1997 bit values are not cross-checked, §11.11)."""

    FUNCTION: ClassVar[int] = 0x0C
    EDITION: ClassVar[Edition] = V1997
    WHAT: ClassVar[str] = "a 1997 change-baud request"
    feature: int


@register
@dataclass(frozen=True, slots=True)
class ChangeBaud1997Reply(_OneByte):
    """0x8C: Z echoed."""

    FUNCTION: ClassVar[int] = 0x0C
    RESPONSE: ClassVar[bool] = True
    EDITION: ClassVar[Edition] = V1997
    WHAT: ClassVar[str] = "a 1997 change-baud reply"
    feature: int


@register
@dataclass(frozen=True, slots=True)
class ChangePassword1997Request(Payload):
    """0x0F: old ``PA P0 P1 P2`` + new ``PA P0 P1 P2`` (FW-C length check)."""

    FUNCTION: ClassVar[int] = 0x0F
    EDITION: ClassVar[Edition] = V1997
    old: Password
    new: Password

    def to_bytes(self) -> bytes:
        return self.old.to_bytes() + self.new.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ChangePassword1997Request:
        _need(data, 8, "a 1997 change-password request")
        return cls(Password.from_bytes(data[:4]), Password.from_bytes(data[4:]))


@register
@dataclass(frozen=True, slots=True)
class ChangePassword1997Reply(Payload):
    """0x8F: payload not confirmed by a second source ([L]); kept as raw bytes."""

    FUNCTION: ClassVar[int] = 0x0F
    RESPONSE: ClassVar[bool] = True
    EDITION: ClassVar[Edition] = V1997
    data: bytes = b""

    def to_bytes(self) -> bytes:
        return self.data

    @classmethod
    def from_bytes(cls, data: bytes) -> ChangePassword1997Reply:
        return cls(bytes(data))


@register
@dataclass(frozen=True, slots=True)
class DemandReset1997Request(Payload):
    """0x10: the password (4) ([M], FW-C length check)."""

    FUNCTION: ClassVar[int] = 0x10
    EDITION: ClassVar[Edition] = V1997
    password: Password

    def to_bytes(self) -> bytes:
        return self.password.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> DemandReset1997Request:
        _need(data, 4, "a 1997 demand-reset request")
        return cls(Password.from_bytes(data))


@register
class DemandReset1997Reply(_Empty):
    """0x90."""

    FUNCTION = 0x10
    RESPONSE = True
    EDITION = V1997


__all__ = [n for n in dir() if n.endswith(("1997Request", "1997Reply")) or n == "BroadcastTime1997"]
