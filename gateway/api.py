"""The gateway's REST API (FastAPI): submit commands, follow them, read meters, the ledger and the audit trail.

Every call that changes something needs an API key (header ``X-API-Key``); reads need one only
if the gateway is configured so. The actor recorded in the ledger is the key's configured name
(``api:<name>``), or a fingerprint of the key when keys are given without names; a key is never
logged, recorded or returned.

Money is a decimal string in yuan ("50.00"), never a float: a JSON number is accepted only if it
has at most two decimals (50, 50.5), anything else is refused with 422. Bad input is answered
with a 4xx before anything is recorded: a batch is validated as a whole before its first
command is written.
"""

import csv
import hashlib
import hmac
import io
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    WithJsonSchema,
    model_validator,
)

from protocols.dlt645 import normalize_address
from protocols.dlt645.errors import Dlt645Error

from .ledger import Command, Event, Kind, State, StoreError
from .ledger.store import Observation, WalletEntry
from .poller import hundredths as _yuan
from .poller import observation_view
from .service import PARAM_DIS, RELAY_ACTIONS, CommandService, InvalidCommand, MeterEntry

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_BATCH = 10_000
"""Meters in one batch at most."""
MAX_KEY = 200
"""Longest idempotency key the ledger takes."""


# --- money ---------------------------------------------------------------------------------------------------


def _decimal(value: Any, places: int, low: Decimal, high: Decimal, unit: str) -> str:
    """A canonical decimal string with ``places`` decimals, or ValueError (a clear 422)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError(f'must be a decimal string in {unit} such as "50.00"')
    text = repr(value) if isinstance(value, float) else str(value).strip()
    if not text or len(text) > 32:
        raise ValueError(f"{text[:32]!r} is not a decimal amount in {unit}")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal amount in {unit}") from None
    if not number.is_finite() or not low <= number <= high:
        raise ValueError(f"{text} is out of range: {low}..{high} {unit}")
    step = Decimal(1).scaleb(-places)
    if number != number.quantize(step):
        raise ValueError(f"{text} has more than {places} decimals")
    return str(number.quantize(step))


def _money_type(low: str, high: str, description: str, example: str, unit: str = "yuan") -> Any:
    lo, hi = Decimal(low), Decimal(high)
    return Annotated[
        str,
        BeforeValidator(lambda v: _decimal(v, 2, lo, hi, unit)),
        WithJsonSchema(
            {
                "type": "string",
                "pattern": r"^\d{1,6}(\.\d{1,2})?$",
                "description": f"{description} Decimal string in {unit}, at most 2 decimals ({low}..{high}); "
                "a JSON number is accepted only if it has at most 2 decimals.",
                "examples": [example],
            }
        ),
    ]


TopupAmount = _money_type("0.01", "999999.99", "Amount to add to the meter's balance.", "50.00")
TopupEnergy = _money_type("0.01", "999999.99", "Energy to add to an energy-wallet meter.", "100.00", "kWh")
Threshold = _money_type("0", "999999.99", "Amount threshold (XXXXXX.XX on the meter).", "20.00")
Price = Annotated[
    str,
    BeforeValidator(lambda v: _decimal(v, 4, Decimal(0), Decimal("9999.9999"), "yuan/kWh")),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^\d{1,4}(\.\d{1,4})?$",
            "description": "Price in yuan/kWh, decimal string with at most 4 decimals (0..9999.9999).",
            "examples": ["0.5883"],
        }
    ),
]


def _params_view(command: Command) -> dict[str, Any]:
    """A command's recorded parameters; a top-up's amount also in yuan (as the MQTT northbound shows it)."""
    params = dict(command.params)
    if command.kind is Kind.TOPUP and "amount_fen" in params:
        params["amount"] = _yuan(params["amount_fen"])
    if command.kind is Kind.TOPUP and "energy_hundredths" in params:
        params["energy_kwh"] = _yuan(params["energy_hundredths"])  # the same 2-decimal text, in kWh
    return params


# --- request models -------------------------------------------------------------------------------------------


def _valid_address(text: str) -> str:
    try:
        return normalize_address(text)
    except Dlt645Error as exc:
        raise ValueError(str(exc)) from None


Address = Annotated[
    str,
    Field(
        min_length=1,
        max_length=12,
        description="Meter address: up to 12 decimal digits (leading zeros may be left out).",
        examples=["000000000001"],
        json_schema_extra={"pattern": r"^\d{1,12}$"},
    ),
    AfterValidator(_valid_address),
]
IdempotencyKey = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_KEY,
        description="Client-chosen key: a repeat with the same key returns the first command and records nothing "
        "(the same key with a different body is a 409). The header Idempotency-Key may be used instead.",
        examples=["order-2026-0001"],
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopupParams(_Strict):
    """Top up the meter's balance (local cost control: on the meter, exactly once by purchase count;
    remote cost control: booked in the gateway's wallet)."""

    model_config = ConfigDict(
        title="Top-up parameters", json_schema_extra={"examples": [{"amount": "50.00"}, {"energy_kwh": "100.00"}]}
    )
    amount: TopupAmount | None = Field(None, description="Yuan to add (a money wallet: most meters).")
    energy_kwh: TopupEnergy | None = Field(
        None, description="kWh to add, for a meter with an energy wallet (prepaid.md §1.8); not with amount."
    )
    opening: bool = Field(False, description="Account opening (070101FF) instead of a recharge.")

    @model_validator(mode="after")
    def _one_amount(self) -> "TopupParams":
        if (self.amount is None) == (self.energy_kwh is None):
            raise ValueError("give amount (yuan) or, for an energy-wallet meter, energy_kwh: one of them")
        return self


class RelayParams(_Strict):
    """Operate the relay (checked against the safety policy before every send)."""

    model_config = ConfigDict(title="Relay parameters", json_schema_extra={"examples": [{"action": "direct-close"}]})
    action: Literal[tuple(sorted(RELAY_ACTIONS))] = Field(  # type: ignore[valid-type]
        description="What the relay should do.", examples=["trip", "direct-close"]
    )
    n2: int = Field(0, ge=0, le=255, description="Trip delay code N2 (0..255).")
    arrears: bool | None = Field(
        None,
        description=(
            "true: a trip for arrears (the grace period after zero and the notice rules apply); false: a trip "
            "for another reason, e.g. safety or move-out (neither applies); omitted: the grace period still "
            "applies, the notice rule does not."
        ),
    )


class TouZone(_Strict):
    """A yearly time zone: from 00:00 of this date until the next zone's date, day table ``table`` runs."""

    model_config = ConfigDict(title="Time zone")
    month: StrictInt = Field(description="Start month, 1..12.")
    day: StrictInt = Field(description="Start day, 1..31 (a real date; 29 February is allowed).")
    table: StrictInt = Field(description="Day table that runs, 1..number of day_tables.")


class TouPeriod(_Strict):
    """A daily period: from this time until the next period's, tariff ``tariff`` applies."""

    model_config = ConfigDict(title="Daily period")
    hour: StrictInt = Field(description="Start hour, 0..23.")
    minute: StrictInt = Field(description="Start minute, 0..59.")
    tariff: StrictInt = Field(description="Tariff 1..4: T1 sharp, T2 peak, T3 flat, T4 valley.")


TOU_EXAMPLE = {
    "zones": [
        {"month": 1, "day": 1, "table": 1},
        {"month": 7, "day": 1, "table": 2},
        {"month": 9, "day": 1, "table": 1},
    ],
    "day_tables": [
        [
            {"hour": 0, "minute": 0, "tariff": 4},
            {"hour": 8, "minute": 0, "tariff": 2},
            {"hour": 23, "minute": 0, "tariff": 4},
        ],
        [
            {"hour": 0, "minute": 0, "tariff": 4},
            {"hour": 8, "minute": 0, "tariff": 2},
            {"hour": 19, "minute": 0, "tariff": 1},
        ],
    ],
}


class TouScheduleParams(_Strict):
    """A time-of-use schedule: the meter's yearly time-zone table and its daily-period tables."""

    model_config = ConfigDict(title="TOU schedule", json_schema_extra={"examples": [TOU_EXAMPLE]})
    zones: list[TouZone] = Field(
        description="1..14 time zones in ascending date order; the last one runs on into the new year."
    )
    day_tables: list[list[TouPeriod]] = Field(
        description="1..8 day tables of 1..14 periods each, in ascending time order, each period at least "
        "15 minutes (the last one runs on past midnight to the first)."
    )


class TariffParams(_Strict):
    """New time-of-use prices, step table and/or TOU schedule into the meter's backup sets, switched in at
    their switch times."""

    model_config = ConfigDict(
        title="Tariff parameters",
        json_schema_extra={
            "examples": [
                {"prices": ["0.5883", "0.2883"], "switch_at": "2026-12-01T00:00:00+08:00"},
                {"tou": TOU_EXAMPLE, "tou_switch_at": "2027-01-01T00:00:00+08:00"},
            ]
        },
    )
    prices: list[Price] | None = Field(None, min_length=1, max_length=12, description="Prices T1..Tn in yuan/kWh.")
    switch_at: AwareDatetime | None = Field(
        None,
        description="When the new prices take effect (ISO 8601 with a time zone, not in the past; default: in a "
        "minute); also the switch time of the steps and TOU schedule given without their own.",
    )
    steps: dict[str, Any] | None = Field(
        None,
        description="Step (ladder) table for the backup set: thresholds (6 kWh values, 0 = unused), prices "
        "(7 increments, yuan/kWh), settlement_dates (up to 4 {month, day, hour}; 99 = unset).",
    )
    steps_switch_at: AwareDatetime | None = Field(
        None, description="When the new step table takes effect (default: switch_at, else in a minute)."
    )
    tou: TouScheduleParams | None = Field(
        None,
        description="TOU schedule for the backup set (time-zone table 04020000, day tables 04020001..08): which "
        "tariff T1..T4 applies when. Checked whole before anything is recorded.",
    )
    tou_switch_at: AwareDatetime | None = Field(
        None,
        description="When the new TOU schedule takes effect (the time-zone and day-table switch times "
        "04000106/04000107; default: switch_at, else in a minute).",
    )
    set: Literal["backup", "current"] = Field(
        "backup",
        description='"backup": written to the backup sets, switched in at the switch times; "current": '
        "switched in at once (the backup sets with a switch time of now), verified on the current sets.",
    )


class MeterParams(_Strict):
    """Amount thresholds of the meter (written with MAC, read back)."""

    model_config = ConfigDict(
        title="Meter parameters", json_schema_extra={"examples": [{"alarm_1": "20.00", "alarm_2": "5.00"}]}
    )
    alarm_1: Threshold | None = Field(None, description="Alarm amount 1.")
    alarm_2: Threshold | None = Field(None, description="Alarm amount 2.")
    overdraft: Threshold | None = Field(None, description="Overdraft limit.")
    hoarding: Threshold | None = Field(None, description="Hoarding limit (largest balance).")
    close_allowed: Threshold | None = Field(None, description="Balance above which closing is allowed.")


class NoticeIn(_Strict):
    """A disconnection notice that went out (SMS, letter...)."""

    sent_at: AwareDatetime | None = Field(None, description="When it went out (default: now).")
    text: str = Field("", max_length=500, description="What was sent, for the audit trail.")


class NoticeOut(BaseModel):
    """A recorded notice."""

    address: str
    sent_at: str
    actor: str


class TimeSyncParams(_Strict):
    """Broadcast time synchronisation (no parameters)."""

    model_config = ConfigDict(title="Time-sync parameters")


PARAMS_MODELS: dict[Kind, type[BaseModel]] = {
    Kind.TOPUP: TopupParams,
    Kind.RELAY: RelayParams,
    Kind.TARIFF: TariffParams,
    Kind.PARAMS: MeterParams,
    Kind.TIME_SYNC: TimeSyncParams,
}


def _params_for_service(kind: Kind, params: BaseModel) -> dict[str, Any]:
    out = params.model_dump(mode="json", exclude_none=True)
    if kind is Kind.PARAMS and not out:
        raise InvalidCommand(f"parameters must be some of {', '.join(PARAM_DIS)}")
    return out


class _Target(_Strict):
    idempotency_key: IdempotencyKey | None = None
    valid_until: AwareDatetime | None = Field(
        None,
        description="The command may start until then, never later (ISO 8601 with a time zone). Relay commands "
        "default to 30 minutes (24 hours in a batch).",
        examples=["2026-12-01T12:30:00+08:00"],
    )


class _Single(_Target):
    address: Address


class TopupCommand(_Single):
    """Top up one meter."""

    model_config = ConfigDict(title="Top-up command")
    kind: Literal["topup"]
    params: TopupParams


class RelayCommandIn(_Single):
    """Operate one meter's relay."""

    model_config = ConfigDict(title="Relay command")
    kind: Literal["relay"]
    params: RelayParams


class TariffCommand(_Single):
    """Send new prices to one meter."""

    model_config = ConfigDict(title="Tariff command")
    kind: Literal["tariff"]
    params: TariffParams


class ParamsCommand(_Single):
    """Write amount thresholds of one meter."""

    model_config = ConfigDict(title="Parameters command")
    kind: Literal["params"]
    params: MeterParams


class TimeSyncCommand(_Single):
    """Synchronise one meter's clock."""

    model_config = ConfigDict(title="Time-sync command")
    kind: Literal["time_sync"]
    params: TimeSyncParams = Field(default_factory=TimeSyncParams)


CommandRequest = Annotated[
    TopupCommand | RelayCommandIn | TariffCommand | ParamsCommand | TimeSyncCommand,
    Field(discriminator="kind"),
]


class _Batch(_Target):
    addresses: list[Address] | None = Field(
        None,
        min_length=1,
        max_length=MAX_BATCH,
        description="The meters (give either addresses or group).",
        examples=[["000000000001", "000000000002"]],
    )
    group: str | None = Field(
        None, min_length=1, max_length=100, description="A configured group of meters.", examples=["feeder-7"]
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_KEY - 13,
        description='Key prefix: each meter\'s command gets the key "<prefix>:<address>", and the batch id is the '
        "prefix. Repeating the batch returns the first commands.",
        examples=["tariff-2026-12"],
    )


class TopupBatch(_Batch):
    model_config = ConfigDict(title="Top-up batch")
    kind: Literal["topup"]
    params: TopupParams


class RelayBatch(_Batch):
    model_config = ConfigDict(title="Relay batch")
    kind: Literal["relay"]
    params: RelayParams


class TariffBatch(_Batch):
    model_config = ConfigDict(title="Tariff batch")
    kind: Literal["tariff"]
    params: TariffParams


class ParamsBatch(_Batch):
    model_config = ConfigDict(title="Parameters batch")
    kind: Literal["params"]
    params: MeterParams


class TimeSyncBatch(_Batch):
    model_config = ConfigDict(title="Time-sync batch")
    kind: Literal["time_sync"]
    params: TimeSyncParams = Field(default_factory=TimeSyncParams)


BatchRequest = Annotated[
    TopupBatch | RelayBatch | TariffBatch | ParamsBatch | TimeSyncBatch,
    Field(discriminator="kind"),
]


# --- response models ----------------------------------------------------------------------------------------


class CommandOut(BaseModel):
    """A command as the ledger holds it."""

    model_config = ConfigDict(title="Command")
    id: str = Field(description="Command id.", examples=["3f1c0e8a9b2d4c6e8f0a1b2c3d4e5f60"])
    idempotency_key: str
    kind: Kind
    address: str = Field(examples=["000000000001"])
    params: dict[str, Any] = Field(
        description="Parameters as recorded (normalised); a top-up's amount_fen (integer, fen) also as amount "
        "(yuan, decimal string).",
        examples=[{"amount_fen": 5000, "amount": "50.00", "opening": False}],
    )
    actor: str = Field(description="Who submitted it.", examples=["api:ops"])
    state: State = Field(
        description="accepted → sent → confirmed; or failed (certainly not applied), refused (policy or meter), "
        "unknown (may have been applied: a person must look)."
    )
    created_at: datetime
    updated_at: datetime
    attempts: int
    valid_until: datetime | None
    not_before: datetime | None = Field(
        None, description="Not sent before this time (a retry's backoff, or a trip deferred past quiet hours)."
    )
    batch: str | None
    progress: dict[str, Any]
    result: dict[str, Any] | None = Field(description="The verified outcome (read back from the meter).")

    @classmethod
    def of(cls, command: Command) -> "CommandOut":
        return cls.model_validate({**command.public(), "params": _params_view(command)})


class EventOut(BaseModel):
    """One state change of a command (an audit record)."""

    model_config = ConfigDict(title="Event")
    id: int
    command_id: str
    at: datetime
    state: State
    actor: str = Field(description="Who made this change: the submitter, or the gateway process executing it.")
    detail: dict[str, Any]
    frames: list[str] = Field(description="DL/T 645 frames on the wire, hex.")

    @classmethod
    def of(cls, event: Event) -> "EventOut":
        return cls.model_validate(event.public())


class MeterOut(BaseModel):
    """A meter the gateway manages."""

    model_config = ConfigDict(title="Meter")
    address: str = Field(examples=["000000000001"])
    bus: str = Field(examples=["bus0"])
    mode: str = Field(description="local (cost control on the meter) or remote (wallet in the gateway).")
    profile: str = Field(description="Meter profile (wire behaviour).", examples=["sgcc-2013"])
    power_hold: bool = Field(description="Power hold (保电): never tripped.")
    residential: bool

    @classmethod
    def of(cls, entry: MeterEntry) -> "MeterOut":
        return cls(
            address=entry.address,
            bus=entry.bus,
            mode=entry.mode,
            profile=entry.profile.name,
            power_hold=entry.power_hold,
            residential=entry.residential,
        )


Yuan = Annotated[str, Field(pattern=r"^-?\d+\.\d{2}$", examples=["50.00"])]
Kwh = Annotated[str, Field(pattern=r"^-?\d+\.\d{2}$", examples=["20.00"])]


class ObservationOut(BaseModel):
    """What the meter poller last saw on the meter (gateway/poller.py)."""

    model_config = ConfigDict(title="Observation")
    at: datetime = Field(description="When the meter was last polled, answered or not.")
    answering: bool = Field(
        description="False once the configured number of polls in a row got no answer ([poll] silent_after)."
    )
    answered_at: datetime | None = Field(description="When it last answered (null: never).")
    silent_since: datetime | None = Field(None, description="When it was found not answering (null: it answers).")
    relay: Literal["closed", "open", "close-allowed"] | None = Field(
        description="Relay as status word 3 (04000503) said at the last answer: close-allowed = open, no trip "
        "commanded any more (the customer may close it). Null: the meter did not serve the status word."
    )
    relay_open: bool | None = Field(description="Status word 3 bit 4, the relay's actual state.")
    trip_commanded: bool | None = Field(description="Status word 3 bit 6, the relay command state.")
    pre_trip_alarm: bool | None = Field(description="Status word 3 bit 7.")
    power_hold: bool | None = Field(description="Status word 3 bit 12: power hold as the meter has it.")
    wallet: Literal["money", "energy"] | None = Field(
        None,
        description="The wallet the meter keeps ([[meter]] wallet): money (yuan) or energy (kWh, prepaid.md §1.8); "
        "null for remote meters, which hold none.",
    )
    unit: Literal["yuan", "kWh"] | None = Field(None, description="The wallet's unit (null: no wallet).")
    remaining_money: Yuan | None = Field(
        description="00900200 in yuan (a money wallet; null for energy wallets and remote meters, which hold no money)."
    )
    overdraft: Yuan | None = Field(description="00900201 in yuan, kept positive (a money wallet).")
    remaining_energy: Kwh | None = Field(None, description="00900100 in kWh (an energy wallet; else null).")
    overdraft_energy: Kwh | None = Field(None, description="00900101 in kWh, kept positive (an energy wallet).")
    level: Literal["normal", "alarm_1", "alarm_2", "zero", "overdraft"] | None = Field(
        description="The balance ladder of prepaid.md §1.4 from the meter's alarm limits and overdraft limit, in "
        "the wallet's unit."
    )
    alarms: list[str] | None = Field(
        description="Thresholds the balance is at or below: balance_alarm_1, balance_alarm_2, balance_zero, overdraft."
    )

    @classmethod
    def of(cls, observation: Observation) -> "ObservationOut":
        return cls.model_validate(observation_view(observation))


class MeterDetail(MeterOut):
    """A meter with what the ledger knows about it."""

    model_config = ConfigDict(title="Meter detail")
    power_hold: bool = Field(
        description="Power hold (保电) as the ledger has it: configured, or set by the last confirmed "
        "power-hold command (power-hold-on / power-hold-off): what the policy applies."
    )
    power_hold_configured: bool = Field(description="Power hold in the gateway configuration ([[meter]] power_hold).")
    wallet_balance: str | None = Field(
        description="Remote cost control: the wallet balance in yuan kept by the ledger (null: no wallet).",
        examples=["50.00"],
    )
    last_topup: CommandOut | None = Field(description="The last confirmed top-up, with its verified result.")
    open_commands: list[CommandOut] = Field(description="Commands not final yet (accepted or sent).")
    last_observation: ObservationOut | None = Field(
        description="What the meter poller last saw ([poll] interval_s; null: never polled)."
    )


class WalletEntryOut(BaseModel):
    """One booking on a remote wallet."""

    model_config = ConfigDict(title="Wallet entry")
    at: datetime = Field(description="When it was booked (UTC).")
    amount: Yuan = Field(description="Yuan, decimal string; negative for consumption.", examples=["-3.20"])
    kind: str = Field(description="What it was: topup, daily charge, ...", examples=["daily charge"])
    reference: str = Field(
        description="What booked it, unique: topup:<command id>, daily:<meter>:<freeze time>, ...",
        examples=["daily:000000000009:2026-11-25T00:00:00+08:00"],
    )

    @classmethod
    def of(cls, entry: WalletEntry) -> "WalletEntryOut":
        return cls(at=entry.at, amount=_yuan(entry.amount_fen) or "0.00", kind=entry.kind, reference=entry.reference)


class WalletOut(BaseModel):
    """A remote cost-control meter's wallet in the ledger, with one page of its entries."""

    model_config = ConfigDict(title="Wallet")
    address: str = Field(examples=["000000000009"])
    balance: Yuan | None = Field(description="The balance in yuan (null: nothing booked yet).")
    total: int = Field(description="Entries in all.")
    limit: int
    offset: int
    entries: list[WalletEntryOut] = Field(description="Newest first.")


class AuditRow(BaseModel):
    """One audit event joined with its command: who, what, when, the frames, the outcome."""

    model_config = ConfigDict(title="Audit row")
    event_id: int
    at: datetime = Field(description="When (UTC).")
    command_id: str
    requested_by: str = Field(description="Who asked for the command.", examples=["api:ops"])
    actor: str = Field(description="Who made this change (the submitter, or the gateway process).")
    kind: str = Field(description="What: the command kind.")
    address: str = Field(description="What: the meter.")
    params: dict[str, Any] = Field(description="What: the parameters as recorded (top-ups: amount also in yuan).")
    state: State = Field(description="The state this event moved the command to.")
    outcome: str = Field(description="The command's state now.")
    result: dict[str, Any] | None = Field(description="The command's verified result, if any.")
    detail: dict[str, Any]
    frames: list[str] = Field(description="DL/T 645 frames of this step, hex.")


AUDIT_COLUMNS = list(AuditRow.model_fields)


class Health(BaseModel):
    model_config = ConfigDict(title="Health")
    status: Literal["ok"] = "ok"
    open_commands: int = Field(description="Commands accepted or sent, not final yet.")


class ErrorOut(BaseModel):
    model_config = ConfigDict(title="Error")
    detail: str | list[dict[str, Any]] = Field(examples=["meter 000000000099 is not managed by this gateway"])


# --- helpers --------------------------------------------------------------------------------------------------


def _keys_by_actor(api_keys: set[str] | dict[str, str] | Iterable[str]) -> list[tuple[str, bytes]]:
    """(actor, key) pairs; named keys record ``api:<name>``, bare keys a fingerprint of the key."""
    if isinstance(api_keys, dict):
        pairs = [(f"api:{name}", key) for name, key in api_keys.items()]
    else:
        pairs = [(f"api:key-{hashlib.sha256(k.encode()).hexdigest()[:10]}", k) for k in api_keys]
    out = []
    for actor, key in pairs:
        if not isinstance(key, str) or not key:
            raise ValueError(f"API key for {actor} is empty")
        if len(actor) > 100:
            raise ValueError(f"API key name {actor[:40]}… is too long")
        out.append((actor, key.encode()))
    return out


def _address(text: str) -> str:
    try:
        return normalize_address(text)
    except Dlt645Error as exc:
        raise InvalidCommand(str(exc)) from None


def _same_body(command: Command, kind: Kind, address: str, clean: dict[str, Any], valid_until: datetime | None) -> bool:
    if command.kind is not kind or command.address != address:
        return False
    if json.dumps(command.params, sort_keys=True, default=str) != json.dumps(clean, sort_keys=True, default=str):
        return False
    return valid_until is None or command.valid_until == valid_until


def _conflict(key: str) -> HTTPException:
    return HTTPException(409, f"idempotency key {key!r} was used before for a different command; nothing was recorded")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


OPENAPI_DESCRIPTION = """
Commands for DL/T 645 prepaid meters: top-ups, relay, tariffs, thresholds, time sync. Every
command goes into a durable ledger first and is executed by the gateway's command service,
one command per meter at a time, checked against the safety policy and verified by reading
the meter back.

**Authentication**: every call that changes something needs the header `X-API-Key` (401 when
missing, 403 when wrong). {reads}

**Money** is a decimal string in yuan (`"50.00"`), never a float. A JSON number is accepted
only if it has at most 2 decimals (`50`, `50.5`); anything else is a 422.

**Idempotency**: give `idempotency_key` (or the header `Idempotency-Key`). A repeat returns the
first command with 200 and records nothing; the same key with a different body is a 409.

**Bad input** is answered with a 4xx and nothing is recorded; a batch is validated as a whole
before its first command is written.

**Rate limit**: the command service starts at most {rate} commands per second (its
`rate_per_s`, 0 = unlimited); batches are accepted at once and executed at that pace.
"""


# --- the application ------------------------------------------------------------------------------------------


def create_api(
    service: CommandService,
    *,
    api_keys: set[str] | dict[str, str],
    read_requires_key: bool = False,
    groups: dict[str, list[str]] | None = None,
) -> FastAPI:
    """The REST API over ``service`` (which the caller starts and stops).

    ``api_keys``: a set of keys, or ``{name: key}`` (the name is recorded as the actor).
    ``groups``: named lists of meter addresses for batches.
    """
    keys = _keys_by_actor(api_keys)
    group_map = {name: list(members) for name, members in (groups or {}).items()}
    store = service.store
    rate = service.config.rate_per_s
    app = FastAPI(
        title="meterlink gateway API",
        version="1",
        description=OPENAPI_DESCRIPTION.format(
            reads="Reads need it too." if read_requires_key else "Reads need no key.",
            rate=f"{rate:g}" if rate > 0 else "unlimited",
        ),
        openapi_tags=[
            {"name": "commands", "description": "Submit commands and follow them."},
            {"name": "meters", "description": "The meter registry and what the ledger knows per meter."},
            {"name": "audit", "description": "Who, what, when, the frames, the outcome."},
            {"name": "health", "description": "Liveness."},
        ],
    )

    key_header = APIKeyHeader(
        name=API_KEY_HEADER,
        scheme_name="ApiKey",
        description="The gateway's API key. Required for every call that changes something"
        + (" and for reads." if read_requires_key else "."),
        auto_error=False,
    )

    async def actor_of(key: Annotated[str | None, Security(key_header)]) -> str:
        """The actor behind the key; 401 without a key, 403 with a wrong one."""
        if not key:
            raise HTTPException(
                401, f"an API key is required (header {API_KEY_HEADER})", {"WWW-Authenticate": "ApiKey"}
            )
        given = key.encode()
        found = None
        for actor, known in keys:  # compare with every key, in constant time
            if hmac.compare_digest(given, known) and found is None:
                found = actor
        if found is None:
            raise HTTPException(403, "the API key is not valid")
        return found

    async def no_key() -> None:
        return None

    reader: Callable[..., Awaitable[Any]] = actor_of if read_requires_key else no_key
    Actor = Annotated[str, Depends(actor_of)]
    read_deps = [Depends(reader)]
    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorOut, "description": "No API key."},
        403: {"model": ErrorOut, "description": "Wrong API key."},
        422: {"model": ErrorOut, "description": "Bad input; nothing was recorded."},
    }
    read_errors = {k: v for k, v in errors.items() if read_requires_key or k == 422}

    # --- errors ----------------------------------------------------------------------------------------------

    @app.exception_handler(InvalidCommand)
    async def invalid_command(request: Request, exc: InvalidCommand) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "json_invalid":
                msg = f"the body is not valid JSON ({(err.get('ctx') or {}).get('error', 'decode error')})"
            detail.append({"loc": list(err.get("loc", [])), "msg": msg, "type": err.get("type")})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        log.error("API %s %s: ledger error: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the ledger is not available"}, status_code=503)

    # --- commands ------------------------------------------------------------------------------------------

    def one_key(body_key: str | None, header_key: str | None) -> str | None:
        if body_key is not None and header_key is not None and body_key != header_key:
            raise InvalidCommand("idempotency_key and the Idempotency-Key header differ")
        key = body_key if body_key is not None else header_key
        if key is not None and not 1 <= len(key) <= MAX_KEY:
            raise InvalidCommand(f"the idempotency key must be 1..{MAX_KEY} characters")
        return key

    def prepare(kind: Kind, address: str, params: BaseModel) -> tuple[MeterEntry, dict[str, Any], dict[str, Any]]:
        entry = service.meter(address)
        raw = _params_for_service(kind, params)
        return entry, raw, service.validate(kind, entry, raw)

    header_key = Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            min_length=1,
            max_length=MAX_KEY,
            description="Alternative to the body's idempotency_key (batches: the key prefix).",
        ),
    ]

    @app.post(
        "/commands",
        tags=["commands"],
        summary="Submit a command",
        response_model=CommandOut,
        status_code=201,
        responses={
            200: {"model": CommandOut, "description": "The idempotency key exists: the FIRST command, nothing new."},
            201: {"description": "Recorded; the command service executes it."},
            409: {"model": ErrorOut, "description": "The idempotency key exists with a different body."},
            **errors,
        },
    )
    async def submit_command(
        response: Response,
        actor: Actor,
        body: Annotated[
            CommandRequest,
            Body(
                openapi_examples={
                    "topup": {
                        "summary": "Top up 50 yuan",
                        "value": {
                            "kind": "topup",
                            "address": "000000000001",
                            "params": {"amount": "50.00"},
                            "idempotency_key": "order-2026-0001",
                        },
                    },
                    "relay": {
                        "summary": "Close the relay",
                        "value": {"kind": "relay", "address": "000000000001", "params": {"action": "direct-close"}},
                    },
                    "tariff": {
                        "summary": "New prices",
                        "value": {
                            "kind": "tariff",
                            "address": "000000000001",
                            "params": {"prices": ["0.5883", "0.2883"], "switch_at": "2026-12-01T00:00:00+08:00"},
                        },
                    },
                    "params": {
                        "summary": "Alarm thresholds",
                        "value": {"kind": "params", "address": "000000000001", "params": {"alarm_1": "20.00"}},
                    },
                    "time_sync": {
                        "summary": "Time sync",
                        "value": {"kind": "time_sync", "address": "000000000001"},
                    },
                }
            ),
        ],
        idempotency_key: header_key = None,
    ) -> CommandOut:
        """Record a command for one meter. 201 with the new command; 200 with the first command when the
        idempotency key was used before (with the same body); 409 if it was used with another body."""
        kind = Kind(body.kind)
        key = one_key(body.idempotency_key, idempotency_key)
        entry, raw, clean = prepare(kind, body.address, body.params)
        # One ledger call: the store returns the first command if the key exists (and records nothing).
        command, created = await service.submit(key, kind, entry.address, raw, actor, valid_until=body.valid_until)
        if not created:  # the key was used before (or concurrently)
            # A derived key leaves the validity out (CommandService._derived_key): so does the check.
            if not _same_body(command, kind, entry.address, clean, body.valid_until if key else None):
                raise _conflict(key or "")
            response.status_code = 200
        else:
            response.headers["Location"] = f"/commands/{command.id}"
        return CommandOut.of(command)

    @app.post(
        "/commands/batch",
        tags=["commands"],
        summary="Submit one command for many meters",
        response_model=list[CommandOut],
        status_code=201,
        responses={
            200: {"model": list[CommandOut], "description": "Every command existed already (a repeated batch)."},
            201: {"description": "Recorded (the list may include commands of an earlier run of this batch)."},
            409: {"model": ErrorOut, "description": "A per-meter idempotency key exists with a different body."},
            **errors,
        },
        description=(
            "The same command for a list of meters (`addresses`) or a configured `group`. All meters and "
            "parameters are validated first: one bad address is a 422 and nothing is recorded. Each meter's "
            'command gets the idempotency key "<prefix>:<address>" and the batch id is the prefix (or a new id), '
            "so a batch interrupted half-way is completed by sending it again. Batches are accepted at once; the "
            "command service starts at most "
            + (f"{rate:g}" if rate > 0 else "an unlimited number of")
            + " commands per second (ServiceConfig.rate_per_s), one command per meter at a time. "
            f"At most {MAX_BATCH} meters per batch."
        ),
    )
    async def submit_batch(
        response: Response,
        actor: Actor,
        body: Annotated[
            BatchRequest,
            Body(
                openapi_examples={
                    "group": {
                        "summary": "Time sync of a group",
                        "value": {"kind": "time_sync", "group": "feeder-7", "idempotency_key": "sync-2026-12-01"},
                    },
                    "list": {
                        "summary": "New prices for two meters",
                        "value": {
                            "kind": "tariff",
                            "addresses": ["000000000001", "000000000002"],
                            "params": {"prices": ["0.5883"]},
                            "idempotency_key": "tariff-2026-12",
                        },
                    },
                }
            ),
        ],
        idempotency_key: header_key = None,
    ) -> list[CommandOut]:
        kind = Kind(body.kind)
        prefix = one_key(body.idempotency_key, idempotency_key)
        if prefix is not None and len(prefix) > MAX_KEY - 13:
            raise InvalidCommand(f"the idempotency key prefix must be at most {MAX_KEY - 13} characters")
        if (body.addresses is None) == (body.group is None):
            raise InvalidCommand("give either addresses or group")
        if body.group is not None:
            if body.group not in group_map:
                raise InvalidCommand(f"unknown group {body.group!r}")
            addresses = group_map[body.group]
            if not addresses:
                raise InvalidCommand(f"group {body.group!r} is empty")
            if len(addresses) > MAX_BATCH:
                raise InvalidCommand(f"group {body.group!r} has more than {MAX_BATCH} meters")
        else:
            addresses = list(body.addresses or [])
        # Validate everything before recording anything.
        plan: list[tuple[MeterEntry, dict[str, Any], dict[str, Any], str | None]] = []
        seen: set[str] = set()
        for i, address in enumerate(addresses):
            try:
                entry, raw, clean = prepare(kind, address, body.params)
            except InvalidCommand as exc:
                raise InvalidCommand(f"addresses[{i}]: {exc}") from None
            if entry.address in seen:
                raise InvalidCommand(f"addresses[{i}]: meter {entry.address} is listed twice")
            seen.add(entry.address)
            plan.append((entry, raw, clean, f"{prefix}:{entry.address}" if prefix is not None else None))
        firsts: dict[str, Command] = {}
        for entry, _raw, clean, key in plan:
            if key is None:
                continue
            first = await store.get_by_key(key)
            if first is not None:
                if not _same_body(first, kind, entry.address, clean, body.valid_until):
                    raise _conflict(key)
                firsts[key] = first
        batch = prefix if prefix is not None else f"batch-{uuid.uuid4().hex}"
        out: list[CommandOut] = []
        created_any = False
        for entry, raw, _clean, key in plan:
            if key is not None and key in firsts:
                out.append(CommandOut.of(firsts[key]))
                continue
            command, created = await service.submit(
                key, kind, entry.address, raw, actor, valid_until=body.valid_until, batch=batch
            )
            created_any = created_any or created
            out.append(CommandOut.of(command))
        response.status_code = 201 if created_any else 200
        response.headers["X-Batch-Id"] = batch
        return out

    @app.get(
        "/commands",
        tags=["commands"],
        summary="List commands",
        response_model=list[CommandOut],
        dependencies=read_deps,
        responses=read_errors,
    )
    async def list_commands(
        address: Annotated[str | None, Query(max_length=12, description="Only this meter.")] = None,
        state: Annotated[State | None, Query(description="Only commands in this state.")] = None,
        batch: Annotated[str | None, Query(max_length=200, description="Only this batch.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[CommandOut]:
        """Commands, newest first."""
        addr = _address(address) if address is not None else None
        found = await store.commands(address=addr, state=state, batch=batch, limit=limit, offset=offset)
        return [CommandOut.of(c) for c in found]

    CommandId = Annotated[str, Path(min_length=1, max_length=64, description="Command id.")]

    async def command_or_404(command_id: str) -> Command:
        command = await store.get(command_id)
        if command is None:
            raise HTTPException(404, f"no command {command_id}")
        return command

    @app.get(
        "/commands/{command_id}",
        tags=["commands"],
        summary="One command",
        response_model=CommandOut,
        dependencies=read_deps,
        responses={404: {"model": ErrorOut, "description": "No such command."}, **read_errors},
    )
    async def get_command(command_id: CommandId) -> CommandOut:
        return CommandOut.of(await command_or_404(command_id))

    @app.get(
        "/commands/{command_id}/events",
        tags=["commands", "audit"],
        summary="A command's audit events",
        response_model=list[EventOut],
        dependencies=read_deps,
        responses={404: {"model": ErrorOut, "description": "No such command."}, **read_errors},
    )
    async def command_events(command_id: CommandId) -> list[EventOut]:
        await command_or_404(command_id)
        return [EventOut.of(e) for e in await store.events(command_id=command_id, limit=100_000)]

    # --- meters -------------------------------------------------------------------------------------------------

    @app.get(
        "/meters",
        tags=["meters"],
        summary="The meter registry",
        response_model=list[MeterOut],
        dependencies=read_deps,
        responses=read_errors,
    )
    async def list_meters() -> list[MeterOut]:
        return [MeterOut.of(e) for _, e in sorted(service.meters.items())]

    @app.get(
        "/meters/{address}",
        tags=["meters"],
        summary="One meter: its wallet, last top-up, open commands, power hold and last observation",
        response_model=MeterDetail,
        dependencies=read_deps,
        responses={404: {"model": ErrorOut, "description": "The gateway does not manage this meter."}, **read_errors},
    )
    async def get_meter(address: Annotated[str, Path(max_length=12, description="Meter address.")]) -> MeterDetail:
        addr = _address(address)
        entry = service.meters.get(addr)
        if entry is None:
            raise HTTPException(404, f"meter {addr} is not managed by this gateway")
        last = None
        offset, page = 0, 200
        while last is None:
            confirmed = await store.commands(address=addr, state=State.CONFIRMED, limit=page, offset=offset)
            last = next((c for c in confirmed if c.kind is Kind.TOPUP), None)
            if len(confirmed) < page:
                break
            offset += page
        open_ = [c for s in (State.SENT, State.ACCEPTED) for c in await store.commands(address=addr, state=s)]
        observed = await store.observation(addr)
        hold = entry.power_hold or bool(await store.confirmed_power_hold(addr))
        return MeterDetail(
            **{**MeterOut.of(entry).model_dump(), "power_hold": hold},
            power_hold_configured=entry.power_hold,
            wallet_balance=_yuan(await store.wallet(addr)),
            last_topup=CommandOut.of(last) if last else None,
            open_commands=[CommandOut.of(c) for c in open_],
            last_observation=ObservationOut.of(observed) if observed else None,
        )

    @app.get(
        "/meters/{address}/wallet",
        tags=["meters"],
        summary="A remote meter's wallet: balance and entries",
        response_model=WalletOut,
        dependencies=read_deps,
        responses={
            404: {
                "model": ErrorOut,
                "description": "The gateway does not manage this meter, or it is a local cost-control meter "
                "(the meter holds its wallet: see last_observation in GET /meters/{address}).",
            },
            **read_errors,
        },
    )
    async def get_wallet(
        address: Annotated[str, Path(max_length=12, description="Meter address.")],
        limit: Annotated[int, Query(ge=1, le=1000, description="Entries per page.")] = 100,
        offset: Annotated[int, Query(ge=0, description="Entries to skip (newest first).")] = 0,
    ) -> WalletOut:
        """The ledger's wallet of a remote cost-control meter: its balance and its bookings (top-ups, daily
        charges), newest first, one page at a time."""
        addr = _address(address)
        entry = service.meters.get(addr)
        if entry is None:
            raise HTTPException(404, f"meter {addr} is not managed by this gateway")
        if entry.mode != "remote":
            raise HTTPException(404, f"meter {addr} is a local cost-control meter: the meter holds its wallet")
        entries, total = await store.wallet_entries(addr, limit, offset)
        return WalletOut(
            address=addr,
            balance=_yuan(await store.wallet(addr)),
            total=total,
            limit=limit,
            offset=offset,
            entries=[WalletEntryOut.of(e) for e in entries],
        )

    @app.post(
        "/meters/{address}/notices",
        tags=["meters"],
        summary="Record a disconnection notice sent to the customer",
        status_code=201,
        response_model=NoticeOut,
        responses={404: {"model": ErrorOut, "description": "The gateway does not manage this meter."}, **errors},
    )
    async def record_notice(
        address: Annotated[str, Path(max_length=12, description="Meter address.")],
        actor: Actor,
        body: NoticeIn | None = None,
    ) -> NoticeOut:
        """The policy's notice rule (``[policy] require_notice``) counts the notice period from this time."""
        addr = _address(address)
        if addr not in service.meters:
            raise HTTPException(404, f"meter {addr} is not managed by this gateway")
        body = body or NoticeIn()
        try:
            when = await service.record_notice(addr, actor, body.sent_at, body.text)
        except InvalidCommand as exc:
            raise HTTPException(422, str(exc)) from None
        return NoticeOut(address=addr, sent_at=when.isoformat(), actor=actor)

    # --- audit --------------------------------------------------------------------------------------------------

    @app.get(
        "/audit",
        tags=["audit"],
        summary="Audit export (JSON or CSV)",
        response_model=list[AuditRow],
        dependencies=read_deps,
        responses={
            200: {
                "description": "One row per event, oldest first; CSV with a header row when format=csv "
                "(params, result and detail as JSON, frames space-separated hex).",
                "content": {"text/csv": {"schema": {"type": "string"}}},
            },
            **read_errors,
        },
    )
    async def audit(
        since: Annotated[AwareDatetime | None, Query(description="From (inclusive), ISO 8601 with time zone.")] = None,
        until: Annotated[AwareDatetime | None, Query(description="Until (exclusive), ISO 8601 with time zone.")] = None,
        command_id: Annotated[str | None, Query(max_length=64, description="Only this command.")] = None,
        address: Annotated[str | None, Query(max_length=20, description="Only this meter's commands.")] = None,
        customer: Annotated[
            str | None, Query(max_length=20, description="Only the commands of this customer's meters.")
        ] = None,
        after_id: Annotated[
            int | None, Query(ge=0, description="Only events after this event_id (the next page: X-Next-After).")
        ] = None,
        fmt: Annotated[Literal["json", "csv"], Query(alias="format", description="json (default) or csv.")] = "json",
        limit: Annotated[int, Query(ge=1, le=100_000, description="Events at most.")] = 10_000,
    ) -> Any:
        """Every state change of every command in the window, joined with its command: who asked and who acted,
        what (kind, meter, parameters), when, the state it moved to, the command's outcome, and the frames.

        By command, meter or customer (prepaid.md §5.3: reports "by command" and "by customer"). When the
        limit cut the export short, the ``X-Next-After`` header holds the last event_id: ask again with
        ``after_id`` set to it for the rest."""
        if since is not None and until is not None and until <= since:
            raise InvalidCommand("until must be after since")
        addresses: list[str | None] = [None]
        if address is not None:
            addresses = [_address(address)]
        if customer is not None:
            mine = sorted(a for a, m in service.meters.items() if m.customer_number == customer)
            if not mine:
                raise InvalidCommand(f"no meter of customer {customer!r} is managed by this gateway")
            addresses = mine if address is None else [a for a in mine if a in addresses]
        events = []
        for one in addresses:
            events += await store.events(
                command_id=command_id, since=since, until=until, limit=limit, address=one, after_id=after_id
            )
        events = sorted(events, key=lambda e: e.id)[:limit]
        more = {"X-Next-After": str(events[-1].id)} if events and len(events) == limit else {}
        commands: dict[str, Command | None] = {}
        rows: list[AuditRow] = []
        for event in events:
            if event.command_id not in commands:
                commands[event.command_id] = await store.get(event.command_id)
            command = commands[event.command_id]
            if command is None:
                continue
            rows.append(
                AuditRow(
                    event_id=event.id,
                    at=event.at,
                    command_id=event.command_id,
                    requested_by=command.actor,
                    actor=event.actor,
                    kind=command.kind.value,
                    address=command.address,
                    params=_params_view(command),
                    state=event.state,
                    outcome=command.state.value,
                    result=command.result,
                    detail=event.detail,
                    frames=event.frames,
                )
            )
        if fmt == "json":
            return JSONResponse(jsonable_encoder(rows), headers=more)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(AUDIT_COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(getattr(row, c)) for c in AUDIT_COLUMNS])
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Response(
            buffer.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="meterlink-audit-{stamp}.csv"', **more},
        )

    # --- health -------------------------------------------------------------------------------------------------

    @app.get("/health", tags=["health"], summary="Liveness", response_model=Health)
    async def health() -> Health:
        return Health(open_commands=await store.open_commands())

    return app


__all__ = [
    "AuditRow",
    "CommandOut",
    "EventOut",
    "MeterDetail",
    "MeterOut",
    "ObservationOut",
    "WalletEntryOut",
    "WalletOut",
    "create_api",
]
