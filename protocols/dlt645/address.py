"""Meter addresses: the 12-digit nameplate string in every API, low byte first on the wire.

Broadcast ``999999999999`` and the ``AA`` wildcard follow dlt645.md §1.5.
"""

from __future__ import annotations

from functools import lru_cache

from .control import Edition
from .errors import AddressError

BROADCAST = "999999999999"
WILDCARD = "AAAAAAAAAAAA"

_DIGITS = frozenset("0123456789")


def normalize_address(address: str) -> str:
    """The canonical 12-character form of ``address``.

    Accepts spaces and lower-case ``aa``; a short all-digit address is left-padded with
    zeros (dlt645.md §1.2, P-BREAKER). Raises :class:`AddressError` for anything else.
    """
    if not isinstance(address, str):
        raise AddressError(f"address must be a string, not {type(address).__name__}")
    text = address.replace(" ", "").upper()
    if text.isdigit() and len(text) < 12:
        text = text.zfill(12)
    if len(text) != 12:
        raise AddressError(f"address {address!r} is not 12 digits")
    for i in range(0, 12, 2):
        pair = text[i : i + 2]
        if pair != "AA" and not (pair[0] in _DIGITS and pair[1] in _DIGITS):
            raise AddressError(f"address {address!r} has a non-BCD byte {pair!r}")
    return text


@lru_cache(maxsize=65536)
def address_to_wire(address: str) -> bytes:
    """The 6 address bytes in wire order (low byte first)."""
    return bytes.fromhex(normalize_address(address))[::-1]


def address_from_wire(raw: bytes) -> str:
    """The nameplate string for 6 address bytes in wire order.

    Raises :class:`AddressError` if a byte is neither BCD nor ``AA``.
    """
    text = raw[::-1].hex()
    if text.isdigit():
        return text
    text = text.upper()
    for i in range(0, 12, 2):
        pair = text[i : i + 2]
        if pair != "AA" and not (pair[0] in _DIGITS and pair[1] in _DIGITS):
            raise AddressError(f"address bytes {raw.hex(' ')} contain non-BCD byte {pair}")
    return text


def is_broadcast(address: str) -> bool:
    """Whether ``address`` is the broadcast address (no meter replies to it)."""
    return address == BROADCAST


def is_wildcard(address: str) -> bool:
    """Whether ``address`` contains ``AA`` wildcard bytes."""
    return "AA" in (address[0:2], address[2:4], address[4:6], address[6:8], address[8:10], address[10:12])


def is_valid_wildcard(address: str) -> bool:
    """Whether the ``AA`` bytes of ``address`` are all at the high-order end (§1.5)."""
    pairs = [address[i : i + 2] for i in range(0, 12, 2)]
    seen_digits = False
    for pair in pairs:  # from the highest-order byte (A5) down
        if pair == "AA":
            if seen_digits:
                return False
        else:
            seen_digits = True
    return True


def address_matches(target: str, meter_address: str) -> bool:
    """Whether a frame sent to ``target`` is addressed to the meter ``meter_address``.

    Exact match, or a wildcard whose high-order bytes are ``AA`` and whose low-order bytes
    equal the meter's (FW-A ``fnDl645B_AddrCheck``, dlt645.md §1.5). Broadcast is not a
    match here: callers handle it, since meters accept it only for some functions.
    """
    if target == meter_address:
        return True
    if not is_wildcard(target) or not is_valid_wildcard(target):
        return False
    for i in range(0, 12, 2):
        pair = target[i : i + 2]
        if pair != "AA" and pair != meter_address[i : i + 2]:
            return False
    return True


# dlt645.md §1.5 / §10.1: who may be sent to 99..99 and to the all-AA wildcard (request codes).
_BROADCAST_OK = {Edition.V2007: {0x08, 0x16, 0x1D}, Edition.V1997: {0x08}}
_BROADCAST_ONLY = {Edition.V2007: {0x08}, Edition.V1997: {0x08}}
_WILDCARD_ONLY = {Edition.V2007: {0x13, 0x15}, Edition.V1997: set()}
_NO_WILDCARD = {
    # Any AA byte. FW-A refuses 0x14, 0x17, 0x19..0x1C and FW-B 0x14, 0x16, 0x1A..0x1D at all-AA; 0x18 is a
    # write too. 1997: write, change baud, change password, demand reset by analogy.
    Edition.V2007: {0x14, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1D},
    Edition.V1997: {0x04, 0x0C, 0x0F, 0x10},
}


def check_destination(address: str, function: int, edition: Edition = Edition.V2007) -> str:
    """The canonical form of ``address`` if a request with ``function`` may be sent to it.

    Enforces dlt645.md §1.5 for senders: ``AA`` wildcard bytes only at the high-order end;
    broadcast ``99..99`` only for broadcast time (0x08, which needs it), freeze (0x16) and
    multi-function output (0x1D); read/write address (0x13/0x15) only to all-``AA``; no write or
    control to a wildcard (FW-A/FW-B refuse them at all-``AA``; the simulator, like FW-B's
    address check, ignores them at any wildcard). Raises :class:`AddressError` with the reason. (Decoding stays
    liberal: :func:`normalize_address` accepts any ``AA`` placement, since a meter must be able
    to see, and ignore, a bad one.)
    """
    text = normalize_address(address)
    name = f"0x{function:02X}"
    if text == BROADCAST:
        if function not in _BROADCAST_OK[edition]:
            raise AddressError(
                f"{text} is the broadcast address: DL/T 645 allows it only for broadcast time (0x08)"
                + (", freeze (0x16) and multi-function output (0x1D)" if edition is Edition.V2007 else "")
                + f", and meters never reply to it, so function {name} cannot go there (dlt645.md §1.5)"
            )
        return text
    if function in _BROADCAST_ONLY[edition]:
        raise AddressError(f"function {name} (broadcast time) goes to the broadcast address {BROADCAST}, not {text}")
    if is_wildcard(text) and not is_valid_wildcard(text):
        raise AddressError(
            f"address {text} is not a valid wildcard: the AA bytes must be the high-order ones, "
            "with the meter's real digits below them (dlt645.md §1.5)"
        )
    if function in _WILDCARD_ONLY[edition] and text != WILDCARD:
        raise AddressError(f"function {name} must be sent to the wildcard address {WILDCARD} (dlt645.md §1.5)")
    if is_wildcard(text) and function in _NO_WILDCARD[edition]:
        raise AddressError(
            f"meters refuse writes and controls (function {name}) sent to a wildcard address ({text}); "
            "give the meter's full address (dlt645.md §1.5)"
        )
    return text
