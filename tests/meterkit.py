"""A simulated meter on a test bench, driven only through real DL/T 645 frames.

Shared by the meter-model tests (test_meter_stateful, test_prepaid_ladder, test_relay_rules,
test_dispatcher). Every request is encoded to wire bytes, decoded again and handed to the
dispatcher at an explicit time; replies are parsed back from the frame the meter sends, so
the tests exercise the codec, the dispatcher, the simulated ESAM and the meter together.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

from firmware_stubs.dispatcher import handle
from firmware_stubs.load import ConstantLoad
from firmware_stubs.meter import Meter, MeterConfig
from firmware_stubs.tariff import FLAT_TOU, PriceSet, StepTable, TariffState
from firmware_stubs.wallet import FEN, Limits
from protocols.dlt645 import (
    DI_2007,
    METER_TZ,
    EncryptedRelayControlRequest,
    ErrorReply,
    Frame,
    Password,
    Payload,
    ReadReply,
    ReadRequest,
    RelayControlRequest,
    WriteRequest,
    decode_frame,
    encode_frame,
    encode_payload,
    parse_payload,
)
from protocols.dlt645.security import SecurityDI, SecurityReply, SecurityRequest
from protocols.esam import MasterStation, Session

ADDRESS = "000000000001"
CUSTOMER = "000000000777"
OPERATOR = "0000ABCD"
T0 = datetime(2024, 3, 1, 10, 0, tzinfo=METER_TZ)
"""A Friday morning, meter-local time (UTC+8)."""


NO_STEPS = StepTable((0,) * 6, (0,) * 7, (None,) * 4)
"""A step table that charges no increment (settlement mode "none")."""


def flat_tariff(price: int = 5000, start: datetime = T0) -> TariffState:
    """One price (1e-4 yuan/kWh) all day, all year, without steps."""
    return TariffState(PriceSet((price,) * 4), NO_STEPS, FLAT_TOU, settlement_checked_at=start)


def fen(micro: int) -> int:
    """Micro-yuan to fen, exactly (fails on a fraction of a fen)."""
    assert micro % FEN == 0, micro
    return micro // FEN


class Bench:
    """One meter, its master station and the current time; everything goes over the wire."""

    def __init__(
        self,
        *,
        watts: int = 0,
        balance_fen: int = 3000,
        limits: Limits | None = None,
        price: int | None = 5000,
        start: datetime = T0,
        tariff: TariffState | None = None,
        **config: Any,
    ) -> None:
        config.setdefault("customer", CUSTOMER)
        cfg = MeterConfig(ADDRESS, balance_fen=balance_fen, limits=limits or Limits(), **config)
        if tariff is None and price is not None:
            tariff = flat_tariff(price, start)
        self.load = ConstantLoad(watts)
        self.meter = Meter(cfg, self.load, start, tariff=tariff)
        self.now = start
        counter = itertools.count(1)
        self.station = MasterStation(random=lambda n: next(counter).to_bytes(n, "big"))
        self.session: Session | None = None
        self.session_until: datetime | None = None

    # --- time ---------------------------------------------------------------------------------

    def at(self, when: datetime) -> None:
        """Move to ``when`` and let the meter integrate up to it."""
        assert when >= self.now
        self.now = when
        self.meter.advance(when)

    def wait(self, **delta: float) -> None:
        self.at(self.now + timedelta(**delta))

    # --- wire -----------------------------------------------------------------------------------

    def exchange(self, payload: Payload, address: str = ADDRESS) -> Frame | None:
        """The meter's reply frame to ``payload`` (None when it stays silent)."""
        frame = decode_frame(encode_payload(address, payload))
        return handle(self.meter, frame, self.now)

    def send(self, payload: Payload, address: str = ADDRESS) -> Payload | None:
        """The meter's parsed reply to ``payload`` (None when it stays silent)."""
        reply = self.exchange(payload, address)
        if reply is None:
            return None
        # What the master receives: the reply decoded again from its wire bytes.
        wire = decode_frame(encode_frame(reply.address, reply.control.byte, reply.data))
        return parse_payload(wire)

    def read(self, di: int) -> Any:
        """The decoded value of ``di``, or the ErrorReply."""
        reply = self.send(ReadRequest(di))
        if isinstance(reply, ReadReply):
            assert reply.di == di
            return DI_2007.lookup(di).decode(reply.value)
        assert isinstance(reply, ErrorReply), reply
        return reply

    # --- security -------------------------------------------------------------------------------

    def login(self) -> Session:
        """Identity authentication (070000FF): a new session, valid 5 minutes."""
        req, pending = self.station.start_auth(self.meter.meter_number)
        reply = self.send(SecurityRequest(SecurityDI.IDENTITY_AUTHENTICATION, OPERATOR, req))
        assert isinstance(reply, SecurityReply), reply
        self.session = self.station.finish_auth(pending, reply.body)  # type: ignore[arg-type]
        self.session_until = self.now + timedelta(minutes=5)
        return self.session

    def ensure_session(self) -> Session:
        if self.session is None or self.session_until is None or self.now >= self.session_until - timedelta(seconds=5):
            return self.login()
        return self.session

    def recharge(self, amount: int, count: int, customer: str = CUSTOMER, opening: bool = False) -> Payload | None:
        """A 070102FF recharge (070101FF with ``opening``) with valid MACs."""
        session = self.ensure_session()
        body = session.recharge(amount, count, customer, opening)
        di = SecurityDI.ACCOUNT_OPENING if opening else SecurityDI.RECHARGE
        reply = self.send(SecurityRequest(di, OPERATOR, body))
        if not isinstance(reply, SecurityReply):
            self.session = None  # a refusal may have ended the session (MAC failure)
        return reply

    def control(
        self,
        n1: int,
        n2: int = 0,
        *,
        valid_until: datetime | None = None,
        operator: str = OPERATOR,
    ) -> Payload | None:
        """An encrypted 0x1C command; valid for 30 minutes unless ``valid_until`` says otherwise."""
        session = self.ensure_session()
        password = Password(self.meter.profile.cipher_level, "000000")
        until = valid_until if valid_until is not None else self.now + timedelta(minutes=30)
        block = session.control_block(n1, n2, until.replace(microsecond=0))
        return self.send(EncryptedRelayControlRequest(password, operator, block))

    def plain_control(
        self, n1: int, password: Password, *, n2: int = 0, valid_until: datetime | None = None
    ) -> Payload | None:
        """A plaintext 0x1C command (password levels 02/04)."""
        until = valid_until if valid_until is not None else self.now + timedelta(minutes=30)
        return self.send(RelayControlRequest(password, OPERATOR, n1, until.replace(microsecond=0), n2))

    def write_mac(self, di: int, value: Any, *, good: bool = True) -> Payload | None:
        """A level-99 0x14 write: plaintext + MAC (a corrupted MAC unless ``good``)."""
        session = self.ensure_session()
        raw = DI_2007.lookup(di).encode(value)
        tag = session.param_mac(di, raw)
        if not good:
            tag = bytes(b ^ 0x5A for b in tag)
        level = Password(self.meter.profile.mac_level, "000000")
        reply = self.send(WriteRequest(di, level, OPERATOR, raw + tag))
        if not good:
            self.session = None
        return reply

    def write_cipher(self, di: int, value: Any) -> Payload | None:
        """A level-98 0x14 write: ciphertext + MAC."""
        session = self.ensure_session()
        raw = DI_2007.lookup(di).encode(value)
        level = Password(self.meter.profile.cipher_level, "000000")
        return self.send(WriteRequest(di, level, OPERATOR, session.encrypt_param(di, raw)))

    # --- the customer -----------------------------------------------------------------------------

    def press(self) -> bool:
        """The customer holds the relay button for 3 s."""
        return self.meter.press_button(self.now)

    # --- ground truth -----------------------------------------------------------------------------

    @property
    def relay(self) -> str:
        """``closed``, ``open`` or ``close_allowed``."""
        return self.meter.relay.public_state

    @property
    def contact_open(self) -> bool:
        return self.meter.relay.contact_open()

    @property
    def balance_fen(self) -> int:
        """The signed balance in fen (exact: fails on a fraction of a fen)."""
        return fen(self.meter.wallet.balance)
