"""What the ledger stores: commands, their state changes (the audit trail) and remote wallets.

A command moves ``accepted`` → ``sent`` → ``confirmed``; or ends ``failed`` (it certainly
did not take effect), ``refused`` (the safety policy or the meter said no), or ``unknown``
(it may have taken effect and a person must look: the ledger never guesses about money).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """Where a command is."""

    ACCEPTED = "accepted"
    SENT = "sent"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    REFUSED = "refused"
    UNKNOWN = "unknown"

    @property
    def final(self) -> bool:
        return self in (State.CONFIRMED, State.FAILED, State.REFUSED, State.UNKNOWN)


OPEN_STATES = (State.ACCEPTED, State.SENT)


class Kind(StrEnum):
    """What a command does."""

    TOPUP = "topup"
    TARIFF = "tariff"
    RELAY = "relay"
    TIME_SYNC = "time_sync"
    PARAMS = "params"


@dataclass(frozen=True, slots=True)
class NewCommand:
    """A command as submitted, before the ledger has it."""

    idempotency_key: str
    kind: Kind
    address: str
    params: dict[str, Any]
    actor: str
    valid_until: datetime | None = None
    batch: str | None = None
    not_before: datetime | None = None
    """Not to be sent before this time (a deferred command, e.g. an arrears trip after quiet hours)."""


@dataclass(frozen=True, slots=True)
class Command:
    """A command as the ledger holds it."""

    id: str
    idempotency_key: str
    kind: Kind
    address: str
    params: dict[str, Any]
    actor: str
    state: State
    created_at: datetime
    updated_at: datetime
    attempts: int = 0
    valid_until: datetime | None = None
    not_before: datetime | None = None
    batch: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    """What the executor recorded before acting (e.g. the purchase count it will use)."""
    result: dict[str, Any] | None = None
    lease_owner: str | None = None

    def public(self) -> dict[str, Any]:
        """A JSON-ready view for APIs."""
        return {
            "id": self.id,
            "idempotency_key": self.idempotency_key,
            "kind": self.kind.value,
            "address": self.address,
            "params": self.params,
            "actor": self.actor,
            "state": self.state.value,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "attempts": self.attempts,
            "valid_until": self.valid_until.isoformat() if self.valid_until else None,
            "not_before": self.not_before.isoformat() if self.not_before else None,
            "batch": self.batch,
            "progress": self.progress,
            "result": self.result,
        }


@dataclass(frozen=True, slots=True)
class Event:
    """One state change of one command: the audit record."""

    id: int
    command_id: str
    at: datetime
    state: State
    actor: str
    detail: dict[str, Any]
    frames: list[str]

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "command_id": self.command_id,
            "at": self.at.isoformat(),
            "state": self.state.value,
            "actor": self.actor,
            "detail": self.detail,
            "frames": self.frames,
        }


def dump(value: Any) -> str:
    """Compact, stable JSON for a ledger column."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def load(text: str | None) -> Any:
    return json.loads(text) if text else None
