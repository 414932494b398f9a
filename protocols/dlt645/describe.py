"""Frames as plain JSON-ready dictionaries: the protocol analyser's view (``meterlink decode``).

Values stay exact: numbers are ``int`` or ``Decimal`` and :func:`dumps` writes a Decimal as a
JSON number without passing through float.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import IntFlag
from typing import Any

from .control import Edition
from .edition1997 import (
    ChangeBaud1997Reply,
    ChangeBaud1997Request,
    ChangePassword1997Request,
    DemandReset1997Request,
    Read1997Reply,
    Read1997Request,
    ReadFollowUp1997Reply,
    ReadFollowUp1997Request,
    Write1997Request,
    WriteAddress1997Request,
)
from .errors import Dlt645Error
from .formats import BAUD_RATES, PartialTime, StatusWord
from .frame import Frame
from .payloads import (
    PSEUDO_LEVELS,
    BroadcastTime,
    ChangeBaudReply,
    ChangeBaudRequest,
    ChangePasswordReply,
    ChangePasswordRequest,
    DemandResetRequest,
    ErrorReply,
    EventClearRequest,
    FreezeRequest,
    MeterClearRequest,
    MultiFunctionOutputReply,
    MultiFunctionOutputRequest,
    ReadAddressReply,
    ReadFollowUpReply,
    ReadFollowUpRequest,
    ReadReply,
    ReadRequest,
    SecurityErrorReply,
    WriteAddressRequest,
    WriteRequest,
    flag_names,
    parse_payload,
)
from .relay import (
    EncryptedRelayControlRequest,
    RelayControlReply,
    RelayControlRequest,
    RelayErrorReply,
    command_name,
)
from .table import table_for


def jsonable(value: Any) -> Any:
    """``value`` with dates as ISO 8601 text, status words and records as objects, bytes as hex."""
    if value is None or isinstance(value, (bool, int, str, Decimal)):
        return int(value) if isinstance(value, IntFlag) else value
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, StatusWord):
        return {"raw": value.raw, **{k: v for k, v in value.fields.items()}}
    if isinstance(value, PartialTime):
        return {k: getattr(value, k) for k in ("month", "day", "hour", "minute") if getattr(value, k) is not None}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex().upper()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    raise TypeError(f"no JSON form for {type(value).__name__}")


_DECIMAL_MARK = "\x00decimal:"
_DECIMAL_RE = re.compile(r'"\\u0000decimal:(-?[0-9.]+)"')


def dumps(obj: Any) -> str:
    """Compact JSON with Decimals written as exact numbers (``229.7``, not ``229.69999``)."""

    def mark(v: Any) -> Any:
        if isinstance(v, Decimal):
            return _DECIMAL_MARK + format(v, "f")
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(obj), ensure_ascii=False, separators=(",", ":"))
    return _DECIMAL_RE.sub(r"\1", text)


def _di_code(di: int, edition: Edition) -> str:
    return f"{di:0{8 if edition is Edition.V2007 else 4}X}"


def _describe_value(out: dict[str, Any], di: int, edition: Edition, raw: bytes | None) -> None:
    out["di"] = _di_code(di, edition)
    item = table_for(edition).get(di)
    if item is None:
        out["name"] = None
        if raw is not None:
            out["raw"] = raw.hex().upper()
        return
    out["name"] = item.name
    out["name_zh"] = item.name_zh
    if item.unit:
        out["unit"] = item.unit
    if raw is None:
        return
    try:
        out["value"] = jsonable(item.decode(raw))
    except Dlt645Error as exc:
        out["raw"] = raw.hex().upper()
        out["error"] = f"value of {item.code} does not fit {item.format.spec}: {exc}"
        out["error_type"] = type(exc).__name__
        return
    warnings = item.format.warnings(raw)
    if warnings:
        out["warnings"] = warnings


def password_level(level: int) -> int | str:
    """A password level as it is written: the byte's two hex digits read as a level code.

    ``0x99`` is level 99 and ``0x04`` level 4 (``--level 99``, ``--level 04``); a byte that is
    not two decimal digits is given as its hex text (``"AB"``).
    """
    text = f"{level:02X}"
    return int(text) if text.isdigit() else text


def describe_frame(frame: Frame) -> dict[str, Any]:
    """Everything a frame says, as a JSON-ready dict (see README: ``meterlink decode``).

    Raises :class:`~.errors.PayloadError` when the data field does not fit the function. A
    value that does not fit its DI's format is not raised: the dict then has ``raw``,
    ``error`` and ``error_type`` (and every other field). Oddities that still decode (a
    weekday that does not match its date) are listed under ``warnings``.
    """
    c = frame.control
    out: dict[str, Any] = {
        "address": frame.address,
        "edition": frame.edition.value,
        "control": c.byte,
        "function_code": c.function,
        "direction": c.direction,
        "abnormal": c.abnormal,
        "follow_up": c.follow_up,
        "length": len(frame.data),
    }
    payload = parse_payload(frame)
    out["payload"] = type(payload).__name__
    ed = frame.edition
    if isinstance(payload, (ErrorReply, SecurityErrorReply, RelayErrorReply)):
        out["error_code"] = payload.error_code
        out["errors"] = flag_names(payload.flags)
    elif isinstance(payload, (ReadRequest, Read1997Request, ReadFollowUp1997Request)):
        _describe_value(out, payload.di, ed, None)
        if isinstance(payload, ReadRequest) and payload.extra:
            out["selector"] = payload.extra.hex().upper()
    elif isinstance(payload, ReadFollowUpRequest):
        _describe_value(out, payload.di, ed, None)
        out["seq"] = payload.seq
    elif isinstance(payload, (ReadReply, Read1997Reply, ReadFollowUp1997Reply, ReadFollowUpReply)):
        complete = not c.follow_up and not isinstance(payload, (ReadFollowUpReply, ReadFollowUp1997Reply))
        _describe_value(out, payload.di, ed, payload.value if complete else None)
        if not complete:
            out["raw"] = payload.value.hex().upper()
        if isinstance(payload, ReadFollowUpReply):
            out["seq"] = payload.seq
    elif isinstance(payload, (WriteRequest, Write1997Request)):
        value = payload.data
        out["password_level"] = password_level(payload.password.level)
        if isinstance(payload, WriteRequest):
            out["operator"] = payload.operator
            if payload.password.level in PSEUDO_LEVELS and len(value) >= 4:
                value, mac = value[:-4], value[-4:]
                out["mac"] = mac.hex().upper()
        if payload.password.level in (0x98, 0x96):
            _describe_value(out, payload.di, ed, None)
            out["ciphertext"] = value.hex().upper()
        else:
            _describe_value(out, payload.di, ed, value)
    elif isinstance(payload, (RelayControlRequest, EncryptedRelayControlRequest)):
        out["password_level"] = password_level(payload.password.level)
        out["operator"] = payload.operator
        if isinstance(payload, RelayControlRequest):
            out["relay_command"] = payload.command
            out["relay_command_name"] = command_name(payload.command)
            out["n2"] = payload.n2
            out["valid_until"] = jsonable(payload.valid_until)
        else:
            out["ciphertext"] = payload.block.hex().upper()
    elif isinstance(payload, RelayControlReply):
        if payload.execution is not None:
            out["execution"] = int(payload.execution)
            out["executed"] = flag_names(payload.execution)
    elif isinstance(payload, BroadcastTime):
        out["time"] = payload.time.isoformat()
    elif isinstance(payload, (ReadAddressReply, WriteAddressRequest, WriteAddress1997Request)):
        out["meter_address"] = payload.address
    elif isinstance(payload, FreezeRequest):
        out["freeze"] = {"minute": payload.minute, "hour": payload.hour, "day": payload.day, "month": payload.month}
    elif isinstance(payload, (ChangeBaudRequest, ChangeBaudReply)):
        out["baud"] = payload.baud
    elif isinstance(payload, (ChangeBaud1997Request, ChangeBaud1997Reply)):
        # The 1997 bit values are not cross-checked (dlt645.md §11.11): the 2007 bitmap is
        # assumed for ``baud`` (null for a word that is not one of its bits).
        out["feature_word"] = payload.feature
        out["baud"] = BAUD_RATES.get(payload.feature)
    elif isinstance(payload, (ChangePasswordRequest, ChangePassword1997Request)):
        out["password_level"] = password_level(payload.old.level)
        out["new_password_level"] = password_level(payload.new.level)
    elif isinstance(payload, ChangePasswordReply):
        if payload.new is not None:  # the reply form with data (dlt645.md §2.1 [L])
            out["new_password_level"] = password_level(payload.new.level)
    elif isinstance(payload, (DemandResetRequest, MeterClearRequest, EventClearRequest, DemandReset1997Request)):
        out["password_level"] = password_level(payload.password.level)
        if not isinstance(payload, DemandReset1997Request):
            out["operator"] = payload.operator
        if isinstance(payload, EventClearRequest):
            out["di"] = _di_code(payload.di, ed)
    elif isinstance(payload, (MultiFunctionOutputRequest, MultiFunctionOutputReply)):
        out["selector"] = payload.selector
    else:
        _describe_other(out, payload)
    return out


def _describe_other(out: dict[str, Any], payload: Any) -> None:
    """Payloads without fields of their own, and those of the 0x03 security module."""
    from . import security

    if isinstance(payload, (security.SecurityRequest, security.SecurityReply)):
        out.update(security.describe_security(payload))
