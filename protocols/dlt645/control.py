"""Control code C (dlt645.md §1.4), function codes (§2.1, §7.1) and the protocol edition."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Edition(StrEnum):
    """Edition of DL/T 645 a frame belongs to."""

    V2007 = "2007"
    V1997 = "1997"


class Function(IntEnum):
    """DL/T 645-2007 function codes (D4..D0 of C), with the SGCC 0x03 extension (§2.1)."""

    SECURITY = 0x03
    BROADCAST_TIME = 0x08
    READ = 0x11
    READ_FOLLOW_UP = 0x12
    READ_ADDRESS = 0x13
    WRITE = 0x14
    WRITE_ADDRESS = 0x15
    FREEZE = 0x16
    CHANGE_BAUD = 0x17
    CHANGE_PASSWORD = 0x18
    DEMAND_RESET = 0x19
    METER_CLEAR = 0x1A
    EVENT_CLEAR = 0x1B
    RELAY_CONTROL = 0x1C
    MULTI_FUNCTION_OUTPUT = 0x1D


class Function1997(IntEnum):
    """DL/T 645-1997 function codes (§7.1)."""

    READ = 0x01
    READ_FOLLOW_UP = 0x02
    REREAD = 0x03
    WRITE = 0x04
    BROADCAST_TIME = 0x08
    WRITE_ADDRESS = 0x0A
    CHANGE_BAUD = 0x0C
    CHANGE_PASSWORD = 0x0F
    DEMAND_RESET = 0x10


_DIRECTION = 0x80
_ABNORMAL = 0x40
_FOLLOW_UP = 0x20
_FUNCTION = 0x1F


@dataclass(frozen=True, slots=True)
class Control:
    """The control byte: direction, abnormal flag, follow-up flag and function code."""

    function: int
    response: bool = False
    abnormal: bool = False
    follow_up: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.function <= _FUNCTION:
            raise ValueError(f"function code {self.function:#x} does not fit in 5 bits")

    @staticmethod
    def from_byte(value: int) -> Control:
        """The control code for byte ``value`` (0..255)."""
        return _CONTROLS[value]

    @property
    def byte(self) -> int:
        """The control code as the byte sent on the wire."""
        return (
            self.function
            | (_DIRECTION if self.response else 0)
            | (_ABNORMAL if self.abnormal else 0)
            | (_FOLLOW_UP if self.follow_up else 0)
        )

    @property
    def direction(self) -> str:
        """``"request"`` (master to meter) or ``"response"`` (meter to master)."""
        return "response" if self.response else "request"

    def reply(self, *, abnormal: bool = False, follow_up: bool = False) -> Control:
        """The control code of a reply to this request."""
        return Control(self.function, True, abnormal, follow_up)

    def edition(self) -> Edition:
        """The edition this function code belongs to.

        0x01..0x10 except 0x03 and 0x08 are 1997 only; 0x03 and 0x08 exist in both and are
        taken as 2007 (the caller disambiguates 0x03 by its length, see ``frame.guess_edition``).
        """
        f = self.function
        if f in (0x03, 0x08) or f >= 0x11:
            return Edition.V2007
        return Edition.V1997


_CONTROLS: tuple[Control, ...] = tuple(
    Control(b & _FUNCTION, bool(b & _DIRECTION), bool(b & _ABNORMAL), bool(b & _FOLLOW_UP)) for b in range(256)
)
