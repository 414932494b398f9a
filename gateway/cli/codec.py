"""``meterlink decode`` and ``meterlink encode``: the codec as a protocol analyser."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import InvalidOperation
from typing import Any

import click

from protocols.dlt645 import (
    BROADCAST,
    METER_TZ,
    WILDCARD,
    BroadcastTime,
    Dlt645Error,
    Edition,
    FrameError,
    Password,
    ReadAddressRequest,
    RelayCommand,
    RelayControlRequest,
    ValueFormatError,
    Write1997Request,
    WriteRequest,
    check_destination,
    describe_frame,
    dumps,
    encode_payload,
    encode_read_request,
    parse_frame_at,
    parse_value,
    table_for,
)
from protocols.dlt645.formats import Record
from protocols.dlt645.payloads import PSEUDO_LEVELS

_EDITIONS = click.Choice(["2007", "1997"])


def _hex_bytes(text: str) -> bytes:
    compact = re.sub(r"[\s,:]|0x", "", text)
    if len(compact) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", compact):
        raise ValueError("input is not a sequence of hex bytes")
    return bytes.fromhex(compact)


@click.command()
@click.argument("hex_frames", nargs=-1, required=True, metavar="HEX...")
@click.option("--edition", type=_EDITIONS, default=None, help="Force the edition instead of deriving it from C.")
def decode(hex_frames: tuple[str, ...], edition: str | None) -> None:
    """Decode frames given as hex (spaces optional, several concatenated, or - for stdin).

    Prints one JSON object per frame, in input order. A frame that is invalid, or whose value
    does not fit its DI's format, prints an object with an "error" key (and whatever of the
    frame could be read); decoding goes on with the next frame, and the command exits with
    status 1 if any object has an error.
    """
    text = sys.stdin.read() if hex_frames == ("-",) else " ".join(hex_frames)
    forced = Edition(edition) if edition else None
    try:
        raw = _hex_bytes(text)
    except ValueError as exc:
        click.echo(dumps({"error": str(exc), "error_type": "InputError"}))
        sys.exit(1)
    failed = False
    count = 0
    for obj in _decode_all(raw, forced):
        count += 1
        failed = failed or "error" in obj
        click.echo(dumps(obj))
    if count == 0:
        click.echo(dumps({"error": "no frame in input", "error_type": "InputError"}))
        sys.exit(1)
    if failed:
        sys.exit(1)


def _decode_all(raw: bytes, forced: Edition | None) -> Iterator[dict[str, Any]]:
    """One object per frame (or per run of bytes that is no frame), resynchronising after errors."""
    i, n = 0, len(raw)
    while i < n:
        while i < n and raw[i] == 0xFE:
            i += 1
        if i >= n:
            return
        if raw[i] != 0x68:
            j = raw.find(b"\x68", i)
            j = n if j < 0 else j
            junk_end = j
            while junk_end > i and raw[junk_end - 1] == 0xFE:  # the next frame's preamble
                junk_end -= 1
            yield {
                "error": f"unexpected byte {raw[i]:02X}, expected 68 or FE"
                + (f" ({junk_end - i} bytes skipped)" if junk_end - i > 1 else ""),
                "error_type": "StrayBytes",
                "offset": i,
            }
            i = j
            continue
        try:
            frame, end = parse_frame_at(raw, i, forced)
        except FrameError as exc:
            yield {"error": str(exc), "error_type": type(exc).__name__, "offset": i}
            i = _resync(raw, i, forced)
            continue
        try:
            obj = describe_frame(frame)
        except Dlt645Error as exc:
            obj = {
                "error": str(exc),
                "error_type": type(exc).__name__,
                "address": frame.address,
                "edition": frame.edition.value,
                "control": frame.control.byte,
                "function_code": frame.function,
                "direction": frame.control.direction,
                "abnormal": frame.control.abnormal,
                "length": frame.length,
            }
        if "error" in obj:
            obj["offset"] = i
        yield obj
        i = end


def _resync(raw: bytes, i: int, forced: Edition | None = None) -> int:
    """Where the next frame starts after a bad one starting at ``i``: one error per bad frame.

    A frame-shaped run (second 68 at +7, its length in range, 16 at the end) is skipped whole,
    so a bad checksum costs exactly one frame. Otherwise the bad frame runs up to the next 68
    that starts a frame (a valid one, or a frame-shaped one); the 68 bytes in between (the
    second start byte, a 68 inside the address or data) are part of it and are not reported
    again. A truncated frame at the end of the input is therefore one error, not one per 68.
    """
    n = len(raw)
    end = _frame_shaped(raw, i)
    if end is not None:
        return end
    j = raw.find(b"\x68", i + 1)
    while j >= 0:
        if _frame_shaped(raw, j) is not None:
            return j
        try:
            parse_frame_at(raw, j, forced)
        except FrameError:
            j = raw.find(b"\x68", j + 1)
            continue
        return j
    return n


def _frame_shaped(raw: bytes, i: int) -> int | None:
    """The end of the frame-shaped run at ``i`` (68 at +7, 16 where L says), or None."""
    if i + 10 <= len(raw) and raw[i + 7] == 0x68:
        end = i + 12 + raw[i + 9]
        if end <= len(raw) and raw[end - 1] == 0x16:
            return end
    return None


@click.group()
def encode() -> None:
    """Build request frames and print them as hex."""


def _preamble_option(f: Any) -> Any:
    return click.option(
        "--preamble", type=click.IntRange(0, 4), default=4, show_default=True, help="Number of FE wake-up bytes."
    )(f)


def _address(text: str, function: int, edition: Edition = Edition.V2007) -> str:
    """``text`` as an address a request with ``function`` may go to (dlt645.md §1.5)."""
    try:
        return check_destination(text, function, edition)
    except Dlt645Error as exc:
        raise click.BadParameter(str(exc), param_hint="ADDRESS") from None


def _di(text: str, edition: Edition) -> int:
    compact = re.sub(r"[-.\s]", "", text)
    width = 8 if edition is Edition.V2007 else 4
    if not re.fullmatch(rf"[0-9A-Fa-f]{{{width}}}", compact):
        raise click.BadParameter(
            f"{text!r} is not a {width}-hex-digit DL/T 645-{edition.value} data identifier", param_hint="DI"
        )
    return int(compact, 16)


def _hex_out(raw: bytes) -> None:
    click.echo(raw.hex(" ").upper())


@encode.command("read")
@click.argument("address")
@click.argument("di")
@_preamble_option
@click.option("--edition", type=_EDITIONS, default="2007", show_default=True)
def encode_read(address: str, di: str, preamble: int, edition: str) -> None:
    """Read request (0x11, or 0x01 for 1997) for one DI."""
    ed = Edition(edition)
    function = 0x11 if ed is Edition.V2007 else 0x01
    _hex_out(encode_read_request(_address(address, function, ed), _di(di, ed), preamble, ed))


def _password(level: str, password: str) -> Password:
    """``--level`` / ``--password``: 6 decimal digits, or any 6 hex digits at 96..99 (ignored there)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{1,2}", level):
        raise click.BadParameter(
            f"{level!r} is not a password level (one hex byte: 02, 04, 99, 98...)", param_hint="--level"
        )
    try:
        pwd = Password(int(level, 16), password)
    except (ValueError, Dlt645Error) as exc:
        raise click.BadParameter(str(exc), param_hint="--level/--password") from None
    if not pwd.is_bcd and pwd.level not in PSEUDO_LEVELS:
        raise click.BadParameter(f"password {password!r} is not 6 decimal digits", param_hint="--password")
    return pwd


@encode.command("write")
@click.argument("address")
@click.argument("di")
@click.argument("value")
@click.option("--level", default="04", show_default=True, help="Password level PA, hex (02, 04, 99, 98...).")
@click.option("--password", default="000000", show_default=True, help="6-digit password.")
@click.option("--operator", default="00000000", show_default=True, help="Operator code, 8 hex digits.")
@click.option(
    "--mac",
    default=None,
    help="4-byte MAC (8 hex digits) appended to the data: required at level 99/97, allowed at 98/96 only.",
)
@click.option("--raw", is_flag=True, help="VALUE is the value bytes in hex, not a value to encode.")
@click.option("--force", is_flag=True, help="Build the write even if the DI table says the DI is read-only.")
@_preamble_option
@click.option("--edition", type=_EDITIONS, default="2007", show_default=True)
def encode_write(
    address: str,
    di: str,
    value: str,
    level: str,
    password: str,
    operator: str,
    mac: str | None,
    raw: bool,
    force: bool,
    preamble: int,
    edition: str,
) -> None:
    """Write request (0x14, or 0x04 for 1997): VALUE encoded by the DI's format.

    VALUE follows the DI's format: a number (20.00), an ISO date/time (2024-03-15T12:30,
    2024-03-15, 12:00:00), a year-less date as JSON ({"day":1,"hour":0}) or its digits (0100),
    JSON for status words, blocks and records (a ladder table), the text for hex/digits/ASCII.
    """
    ed = Edition(edition)
    function = 0x14 if ed is Edition.V2007 else 0x04
    addr, di_value, pwd = _address(address, function, ed), _di(di, ed), _password(level, password)
    if ed is Edition.V2007 and not re.fullmatch(r"[0-9A-Fa-f]{8}", operator):
        raise click.BadParameter(f"operator code {operator!r} is not 8 hex digits", param_hint="--operator")
    mac_bytes = _mac(mac, pwd.level if ed is Edition.V2007 else None, raw)
    known = table_for(ed).get(di_value)
    if known is not None and "w" not in known.access and not force:
        # A user mistake: a meter refuses the write (the simulated firmware with ERR bit 1, "no
        # requested data", dlt645.md §2.2). --force builds it anyway, e.g. to test that refusal.
        raise click.BadParameter(
            f"{known.code} ({known.name}) is read-only; pass --force to build the write anyway", param_hint="DI"
        )
    try:
        if raw:
            data = _hex_bytes(value)
        else:
            item = table_for(ed).lookup(di_value)
            try:
                data = item.encode(parse_value(item.format, value))
            except ValueFormatError as exc:
                spec = "record" if isinstance(item.format, Record) else item.format.spec
                raise ValueFormatError(f"{value!r} is not a value for {item.code} ({spec}): {exc}") from None
        data += mac_bytes
        if ed is Edition.V2007:
            payload: Any = WriteRequest(di_value, pwd, operator, data)
        else:
            payload = Write1997Request(di_value, pwd, data)
        _hex_out(encode_payload(addr, payload, preamble=preamble))
    except (Dlt645Error, InvalidOperation, ValueError) as exc:
        raise click.BadParameter(str(exc) or "invalid value", param_hint="VALUE") from None


MAC_LEVELS = frozenset({0x99, 0x97})
"""Password levels whose write carries plaintext + MAC; 98/96 carry ciphertext + MAC (dlt645.md §2.3,
§5.5; 97/96 are the vendor variant of 99/98, §10)."""


def _mac(mac: str | None, level: int | None, raw: bool) -> bytes:
    """The ``--mac`` bytes for a write at ``level`` (None: a 1997 write, which has no MAC)."""
    if mac is None:
        if level in MAC_LEVELS:
            raise click.BadParameter(
                f"a level {level:02X} write carries a MAC: pass --mac (8 hex digits)", param_hint="--mac"
            )
        if level is not None and level in PSEUDO_LEVELS and not raw:
            raise click.BadParameter(
                f"a level {level:02X} write carries ciphertext + MAC, not a plaintext value: pass them with --raw",
                param_hint="--level",
            )
        return b""
    if level is None:
        raise click.BadParameter("a DL/T 645-1997 write carries no MAC", param_hint="--mac")
    if level not in PSEUDO_LEVELS:
        raise click.BadParameter(f"a level {level:02X} write carries no MAC (only 99/98, 97/96 do)", param_hint="--mac")
    if level not in MAC_LEVELS and not raw:
        raise click.BadParameter(
            f"a level {level:02X} write carries ciphertext + MAC, not a plaintext value: pass them with --raw",
            param_hint="--level",
        )
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", re.sub(r"\s", "", mac)):
        raise click.BadParameter(f"{mac!r} is not a 4-byte MAC (8 hex digits)", param_hint="--mac")
    return bytes.fromhex(re.sub(r"\s", "", mac))


@encode.command("read-address")
@_preamble_option
def encode_read_address(preamble: int) -> None:
    """Read-address request (0x13) to the wildcard address AA..AA."""
    _hex_out(encode_payload(_address(WILDCARD, 0x13), ReadAddressRequest(), preamble=preamble))


@encode.command("time")
@click.option("--at", "at", default=None, help="ISO 8601 time to set (default: now).")
@_preamble_option
def encode_time(at: str | None, preamble: int) -> None:
    """Broadcast time (0x08) to 99..99."""
    try:
        when = datetime.fromisoformat(at) if at else datetime.now(METER_TZ)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=METER_TZ)
    try:
        address = _address(BROADCAST, 0x08)
        _hex_out(encode_payload(address, BroadcastTime(when.astimezone(METER_TZ)), preamble=preamble))
    except Dlt645Error as exc:
        raise click.BadParameter(str(exc), param_hint="--at") from None


_ACTIONS = {c.name.lower().replace("_", "-"): c for c in RelayCommand}


@encode.command("relay")
@click.argument("address")
@click.argument("action", type=click.Choice(sorted(_ACTIONS)))
@click.option("--valid-until", default=None, help="ISO 8601 end of validity (the meter refuses it later).")
@click.option(
    "--valid-minutes",
    type=click.IntRange(1, 7 * 24 * 60),
    default=10,
    show_default=True,
    help="Validity from now, when --valid-until is not given.",
)
@click.option(
    "--n2",
    type=click.IntRange(0, 255),
    default=0,
    show_default=True,
    help="N2: for trip-auto-restore, the restore delay in 5-minute units (at least 1).",
)
@click.option("--force", is_flag=True, help="Build the frame even if a meter would refuse it (N2 = 0).")
@click.option("--level", default="02", show_default=True, help="Password level PA, hex.")
@click.option("--password", default="000000", show_default=True)
@click.option("--operator", default="00000000", show_default=True)
@_preamble_option
def encode_relay(
    address: str,
    action: str,
    valid_until: str | None,
    valid_minutes: int,
    n2: int,
    level: str,
    password: str,
    operator: str,
    preamble: int,
    force: bool,
) -> None:
    """Plaintext relay control (0x1C): trip, close, alarm, power hold."""
    command = _ACTIONS[action]
    if command in (RelayCommand.TRIP_AUTO_RESTORE, RelayCommand.TRIP_AUTO_RESTORE_ALT) and n2 == 0 and not force:
        # FW-A refuses N2 = 0: the restore delay is N2 x 5 minutes (dlt645.md §4.1).
        raise click.BadParameter(f"{action} needs the restore delay: --n2 1..255 (5-minute units)", param_hint="--n2")
    try:
        until = (
            datetime.fromisoformat(valid_until)
            if valid_until
            else (datetime.now(METER_TZ) + timedelta(minutes=valid_minutes))
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--valid-until") from None
    if until.tzinfo is None:
        until = until.replace(tzinfo=METER_TZ)
    until = until.astimezone(METER_TZ).replace(microsecond=0)
    addr = _address(address, 0x1C)
    try:
        payload = RelayControlRequest(_password(level, password), operator, command, until, n2)
        _hex_out(encode_payload(addr, payload, preamble=preamble))
    except Dlt645Error as exc:
        raise click.BadParameter(str(exc)) from None
