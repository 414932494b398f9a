"""The durable command ledger: commands, audit events, leases and remote wallets."""

from .model import Command, Event, Kind, NewCommand, State
from .store import LeaseLost, Store, StoreError

__all__ = ["Command", "Event", "Kind", "LeaseLost", "NewCommand", "State", "Store", "StoreError"]
