"""Typed errors of the gateway's I/O side. Every one says what failed, where, and why."""

from __future__ import annotations

from enum import IntFlag

from protocols.dlt645 import flag_names


class GatewayError(Exception):
    """Base of the gateway's errors."""


class BusUrlError(GatewayError, ValueError):
    """A bus URL that cannot be understood (``serial://``, ``tcp://``, ``mqtt://``)."""


class LinkDown(GatewayError):
    """The transport to a line is gone (serial port unplugged, TCP closed, broker down)."""


class NoReply(GatewayError):
    """The meter did not answer within the timeout, after every retry.

    ``what`` names the request (``function 0x11 DI 00010000``); ``di`` is its data identifier
    when it has one.
    """

    def __init__(self, address: str, what: str, attempts: int, di: int | None = None) -> None:
        super().__init__(f"no reply from meter {address} to {what} after {attempts} attempt(s)")
        self.address = address
        self.what = what
        self.attempts = attempts
        self.di = di


class WrongMeter(GatewayError):
    """A valid reply came from another meter than the one asked: never accepted."""

    def __init__(self, asked: str, answered: str) -> None:
        super().__init__(f"reply from meter {answered}, but meter {asked} was asked")
        self.asked = asked
        self.answered = answered


class ReplyMismatch(GatewayError):
    """A reply from the right meter whose function or DI does not match the request."""


class MeterRefused(GatewayError):
    """The meter answered with an abnormal reply (ERR/SERR); ``error`` is the codec's MeterError.

    The message names the meter, the request (function and DI when there is one) and the
    error bits once: ``meter 000000000001 refused function 0x11 DI 00900100: no_data``.
    """

    def __init__(self, address: str, error: Exception, what: str | None = None, di: int | None = None) -> None:
        self.address = address
        self.error = error
        self.flags = getattr(error, "flags", None)
        self.di = di
        function = getattr(error, "function", None)
        if what is None and isinstance(function, int):
            what = f"function 0x{function:02X}"
        self.what = what
        super().__init__(f"meter {address} refused {what}: {_reasons(error)}" if what else f"meter {address}: {error}")


def _reasons(error: Exception) -> str:
    """The error bits of a refusal by name (``no_data, password``), else the error's own text."""
    flags = getattr(error, "flags", None)
    if isinstance(flags, IntFlag):
        return ", ".join(flag_names(flags)) or "no error bits set"
    return str(error)
