"""0x1C remote control: trip, close, alarm and power hold (dlt645.md §4).

Plaintext form (L = 16): ``PA P0 P1 P2 | C0..C3 | N1 | N2 | N3..N8`` with N3..N8 the validity
end ``ss mm hh DD MM YY``. Encrypted form (L = 28, level 98): ``98 P0 P1 P2 | C0..C3 |`` a
20-byte ESAM block holding N1..N8 and a MAC. Replies: 0x9C with L = 0 or a 2-byte execution
word, 0xDC with one ERR byte or a 2-byte error word (§4.3); a gateway accepts both forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, IntFlag
from typing import ClassVar

import construct as cs

from .control import Edition
from .errors import PayloadError
from .payloads import (
    ErrorReply,
    MeterError,
    Password,
    Payload,
    RelayErrorFlags,
    decode_clock,
    encode_clock,
    operator_bytes,
    operator_text,
    register_parser,
)

FUNCTION = 0x1C


class RelayCommand(IntEnum):
    """N1 of a 0x1C command (§4.1)."""

    TRIP = 0x1A
    CLOSE_ALLOWED = 0x1B
    DIRECT_CLOSE = 0x1C
    TRIP_AUTO_RESTORE = 0x1D
    TRIP_AUTO_RESTORE_ALT = 0x1E
    ALARM_ON = 0x2A
    ALARM_OFF = 0x2B
    POWER_HOLD_ON = 0x3A
    POWER_HOLD_OFF = 0x3B


class RelayExecution(IntFlag):
    """2-byte execution word of the newer 0x9C reply form (FW-A, §4.3)."""

    DIRECT_CLOSE = 0x0001
    CLOSE_ALLOWED = 0x0002
    DIRECT_TRIP = 0x0004
    DELAYED_TRIP = 0x0008
    TRIP_AUTO_RESTORE = 0x0010
    DELAYED_TRIP_LARGE_CURRENT = 0x0020
    POWER_HOLD = 0x0100
    POWER_HOLD_RELEASED = 0x0200
    ALARM = 0x0400
    ALARM_RELEASED = 0x0800


PLAIN_LENGTH = 16
ENCRYPTED_LENGTH = 28
ESAM_BLOCK = 20

_PLAIN = cs.Struct(
    "password" / cs.Bytes(4),
    "operator" / cs.Bytes(4),
    "command" / cs.Int8ub,
    "n2" / cs.Int8ub,
    "valid_until" / cs.Bytes(6),
)
_ENCRYPTED = cs.Struct(
    "password" / cs.Bytes(4),
    "operator" / cs.Bytes(4),
    "block" / cs.Bytes(ESAM_BLOCK),
)


def command_name(command: int) -> str:
    """Lower-case name of an N1 value, or ``"unknown"``."""
    try:
        return RelayCommand(command).name.lower()
    except ValueError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class RelayControlRequest(Payload):
    """Plaintext 0x1C command. ``valid_until`` None encodes as all zeros."""

    FUNCTION: ClassVar[int] = FUNCTION
    password: Password
    operator: str
    command: int
    valid_until: datetime | None
    n2: int = 0

    def to_bytes(self) -> bytes:
        if not 0 <= self.command <= 0xFF or not 0 <= self.n2 <= 0xFF:
            raise PayloadError("N1 and N2 must be bytes")
        return _PLAIN.build(
            dict(
                password=self.password.to_bytes(),
                operator=operator_bytes(self.operator),
                command=self.command,
                n2=self.n2,
                valid_until=encode_clock(self.valid_until),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RelayControlRequest:
        if len(data) != PLAIN_LENGTH:
            raise PayloadError(f"a plaintext relay command needs {PLAIN_LENGTH} bytes, got {len(data)}")
        p = _PLAIN.parse(data)
        return cls(
            Password.from_bytes(p.password), operator_text(p.operator), p.command, decode_clock(p.valid_until), p.n2
        )

    def expired(self, now: datetime) -> bool:
        """Whether the command may no longer execute at ``now`` (FW-A: now > validity end)."""
        return self.valid_until is not None and now > self.valid_until


@dataclass(frozen=True, slots=True)
class EncryptedRelayControlRequest(Payload):
    """Level-98 0x1C command: N1..N8 and a MAC inside a 20-byte ESAM block (§4.2).

    ``block`` is kept in ESAM order and reversed on the wire, like every ESAM byte string
    (§5.1).
    """

    FUNCTION: ClassVar[int] = FUNCTION
    password: Password
    operator: str
    block: bytes

    def to_bytes(self) -> bytes:
        if len(self.block) != ESAM_BLOCK:
            raise PayloadError(f"the ESAM block of an encrypted relay command is {ESAM_BLOCK} bytes")
        return _ENCRYPTED.build(
            dict(password=self.password.to_bytes(), operator=operator_bytes(self.operator), block=self.block[::-1])
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptedRelayControlRequest:
        if len(data) != ENCRYPTED_LENGTH:
            raise PayloadError(f"an encrypted relay command needs {ENCRYPTED_LENGTH} bytes, got {len(data)}")
        p = _ENCRYPTED.parse(data)
        return cls(Password.from_bytes(p.password), operator_text(p.operator), bytes(p.block)[::-1])


@dataclass(frozen=True, slots=True)
class RelayControlReply(Payload):
    """0x9C: accepted; ``execution`` is the 2-byte word of the newer form, else None."""

    FUNCTION: ClassVar[int] = FUNCTION
    RESPONSE: ClassVar[bool] = True
    execution: RelayExecution | None = None

    def to_bytes(self) -> bytes:
        return b"" if self.execution is None else int(self.execution).to_bytes(2, "little")

    @classmethod
    def from_bytes(cls, data: bytes) -> RelayControlReply:
        if len(data) == 0:
            return cls()
        if len(data) == 2:
            return cls(RelayExecution(int.from_bytes(data, "little")))
        raise PayloadError(f"a relay reply has 0 or 2 data bytes, got {len(data)}")


@dataclass(frozen=True, slots=True)
class RelayErrorReply(Payload):
    """0xDC with the newer 2-byte error word (§4.3)."""

    FUNCTION: ClassVar[int] = FUNCTION
    RESPONSE: ClassVar[bool] = True
    ABNORMAL: ClassVar[bool] = True
    flags: RelayErrorFlags

    @property
    def error_code(self) -> int:
        return int(self.flags)

    def to_bytes(self) -> bytes:
        return int(self.flags).to_bytes(2, "little")

    def error(self) -> MeterError:
        """This refusal as an exception to raise."""
        return MeterError(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> RelayErrorReply:
        if len(data) != 2:
            raise PayloadError(f"a relay error word is 2 bytes, got {len(data)}")
        return cls(RelayErrorFlags(int.from_bytes(data, "little")))


def _parse_request(data: bytes) -> Payload:
    if len(data) == PLAIN_LENGTH:
        return RelayControlRequest.from_bytes(data)
    if len(data) == ENCRYPTED_LENGTH:
        return EncryptedRelayControlRequest.from_bytes(data)
    raise PayloadError(f"a relay command has {PLAIN_LENGTH} or {ENCRYPTED_LENGTH} data bytes, got {len(data)}")


def _parse_error(data: bytes) -> Payload:
    if len(data) == 1:
        return ErrorReply(data[0], FUNCTION, Edition.V2007)
    return RelayErrorReply.from_bytes(data)


register_parser(Edition.V2007, FUNCTION, False, False, _parse_request)
register_parser(Edition.V2007, FUNCTION, True, False, RelayControlReply.from_bytes)
register_parser(Edition.V2007, FUNCTION, True, True, _parse_error)
