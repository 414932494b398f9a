"""A simulated ESAM: the security chip of one meter, as a deterministic state machine.

**Simulated**, not the confidential SGCC ESAM: the cryptography is the sim-ESAM scheme of
:mod:`protocols.esam` (prepaid.md §2.5). What is emulated faithfully is the behaviour the
master station sees:

* identity authentication (070000FF) checks the dispersion factor (``00 00`` + this meter's
  number) and ciphertext1, answers R2 (4 bytes, from a seeded RNG) and the 8-byte ESAM serial,
  and opens a session valid for the configured period (default 5 min, prepaid.md §2.3). Any
  authentication attempt ends the previous session; a successful one replaces it;
* the session ends on timeout, on 070002FF, and on any MAC failure (prepaid.md §2.5);
* MAC failures are counted per meter-local day (:data:`~protocols.dlt645.formats.METER_TZ`);
  the 200th in a day suspends every security operation until the next local midnight, when
  the counter and the suspension clear (prepaid.md §2.4 "Lock-out"; like the firmware's
  power-up check, any change of local date clears them, also a clock set back);
* refusals raise :class:`EsamRefusal` with the SERR bit (dlt645.md §5.4): SUSPENDED first,
  then AUTHENTICATION (no valid session, or the authentication itself failed), then
  ESAM_VERIFICATION (MAC or decryption failure). Only ESAM_VERIFICATION failures count
  towards the lock-out; a failed identity authentication does not.

The purchase-count rule, the customer-number comparison and hoarding belong to the meter's
wallet, not here. Time is always an argument: ``now`` is the meter's clock, aware (converted
to meter-local time) or naive (taken as meter-local time). Nothing reads the wall clock.
"""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta
from typing import Any

from protocols import esam as crypto
from protocols.dlt645.formats import METER_TZ
from protocols.dlt645.payloads import ErrorFlags, RelayErrorFlags, SecurityFlags
from protocols.dlt645.security import (
    IdentityAuthReply,
    IdentityAuthRequest,
    RechargeRequest,
    StatusQueryReply,
    ValidityPeriodRequest,
    WalletInitRequest,
)

DEFAULT_VALIDITY_MINUTES = 5
"""Identity-authentication validity before any 070001FF (prepaid.md §2.3)."""

SUSPEND_AFTER = 200
"""MAC failures in one meter-local day that suspend the meter (prepaid.md §2.4)."""

SERIAL_PREFIX = b"SM"
"""Default ESAM serial = ``53 4D`` ("SM", simulated) + the 6-byte meter number."""


class EsamRefusal(Exception):
    """The simulated ESAM refused an operation.

    ``flags`` is the SERR word of a 0x03 refusal (dlt645.md §5.4). A 0x14 or 0x1C refusal
    carries a one-byte ERR instead: :attr:`error_flags` (bit2 "password/unauthorised" for
    security failures, bit1 for a level-98 block whose embedded DI is not the frame's, §5.5),
    or the newer 2-byte relay error word: :attr:`relay_flags`.
    """

    def __init__(self, flags: SecurityFlags, reason: str = "", error_flags: ErrorFlags = ErrorFlags.PASSWORD) -> None:
        super().__init__(reason or flags.name or str(int(flags)))
        self.flags = flags
        self.reason = reason
        self.error_flags = error_flags

    @property
    def relay_flags(self) -> RelayErrorFlags:
        """The refusal in the 2-byte 0xDC error word (FW-A, dlt645.md §4.3)."""
        if self.flags & SecurityFlags.SUSPENDED:
            return RelayErrorFlags.SUSPENDED
        if self.flags & SecurityFlags.ESAM_VERIFICATION:
            return RelayErrorFlags.MAC
        if self.flags & SecurityFlags.AUTHENTICATION:
            return RelayErrorFlags.AUTHENTICATION_TIMEOUT
        return RelayErrorFlags.PASSWORD


def _local(now: datetime) -> datetime:
    """``now`` as naive meter-local time."""
    if not isinstance(now, datetime):
        raise TypeError(f"now must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None:
        return now
    return now.astimezone(METER_TZ).replace(tzinfo=None)


class SimulatedEsam:
    """The simulated ESAM of one meter (see the module docstring)."""

    def __init__(
        self,
        meter_number: str,
        keys: crypto.MeterKeys | None = None,
        serial: bytes | None = None,
        seed: int = 0,
        validity_minutes: int = DEFAULT_VALIDITY_MINUTES,
    ) -> None:
        self.meter_number = meter_number
        self._meter = crypto.meter_bytes(meter_number)
        self._keys = keys  # derived from the meter number on first use (fleets of 1e5 meters)
        serial = SERIAL_PREFIX + self._meter if serial is None else bytes(serial)
        if len(serial) != crypto.SERIAL_SIZE:
            raise ValueError(f"an ESAM serial is {crypto.SERIAL_SIZE} bytes, got {len(serial)}")
        self.serial = serial
        if not 1 <= validity_minutes <= 9999:
            raise ValueError(f"validity {validity_minutes} min is outside 1..9999")
        self.validity_minutes = validity_minutes
        self._seed = seed
        self._rng: random.Random | None = None  # made on first use: 2.5 KB a meter
        self._r2: bytes | None = None
        self._expires: datetime | None = None  # naive meter-local
        self._day: date | None = None
        self._failures = 0
        self._suspended = False
        self.failures_total = 0
        self.authentications = 0

    # --- state --------------------------------------------------------------------------------

    @property
    def keys(self) -> crypto.MeterKeys:
        """The meter's four keys (diversified from the test master key unless given)."""
        if self._keys is None:
            self._keys = crypto.derive_keys(self._meter.hex())
        return self._keys

    @keys.setter
    def keys(self, keys: crypto.MeterKeys) -> None:
        self._keys = keys

    @property
    def key_info(self) -> bytes:
        """The 4-byte key information (070002FF / 078102FF replies)."""
        return self.keys.key_info

    @property
    def session_r2(self) -> bytes | None:
        """R2 of the current session, None once it was terminated or ended by a MAC failure.

        Expiry needs the clock: ask :meth:`authenticated` for that.
        """
        return self._r2

    def _roll(self, now: datetime) -> datetime:
        """Meter-local ``now``; on a new local day the failure counter and the suspension clear."""
        local = _local(now)
        if local.date() != self._day:
            self._day = local.date()
            self._failures = 0
            self._suspended = False
        return local

    def _valid(self, local: datetime) -> bool:
        if self._r2 is None or self._expires is None:
            return False
        if local >= self._expires:
            self._end()
            return False
        return True

    def _end(self) -> None:
        self._r2 = None
        self._expires = None

    def authenticated(self, now: datetime) -> bool:
        """Whether a session is open at ``now`` (and the meter is not suspended)."""
        local = self._roll(now)
        return not self._suspended and self._valid(local)

    def suspended(self, now: datetime) -> bool:
        """Whether the 200-failure lock-out is in force at ``now``."""
        self._roll(now)
        return self._suspended

    def mac_failures(self, now: datetime) -> int:
        """MAC failures counted so far on ``now``'s local day."""
        self._roll(now)
        return self._failures

    def session_expires(self, now: datetime) -> datetime | None:
        """When the current session times out (meter-local, aware), None without one."""
        local = self._roll(now)
        if not self._valid(local) or self._expires is None:
            return None
        return self._expires.replace(tzinfo=METER_TZ)

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """A small JSON-ready view for the simulator's admin API (``now`` to evaluate expiry and day)."""
        out: dict[str, Any] = {
            "simulated": True,
            "meter_number": self.meter_number,
            "esam_serial": self.serial.hex().upper(),
            "key_info": self.key_info.hex().upper(),
            "validity_minutes": self.validity_minutes,
            "mac_failures_total": self.failures_total,
            "authentications": self.authentications,
        }
        if now is not None:
            expires = self.session_expires(now)
            out.update(
                authenticated=self.authenticated(now),
                session_expires=None if expires is None else expires.isoformat(),
                session_r2=None if self._r2 is None else self._r2.hex().upper(),
                mac_failures_today=self._failures,
                suspended=self._suspended,
            )
        else:
            out.update(mac_failures_today=self._failures, suspended=self._suspended)
        return out

    # --- guards -----------------------------------------------------------------------------------

    def _guard(self, now: datetime, session: bool = True) -> tuple[datetime, bytes]:
        local = self._roll(now)
        if self._suspended:
            raise EsamRefusal(SecurityFlags.SUSPENDED, "meter suspended after repeated MAC failures")
        if session and not self._valid(local):
            raise EsamRefusal(SecurityFlags.AUTHENTICATION, "no valid identity authentication")
        return local, self._r2 or b""

    def _mac_failure(self, exc: crypto.EsamCryptoError) -> EsamRefusal:
        self._failures += 1
        self.failures_total += 1
        self._end()
        if self._failures >= SUSPEND_AFTER:
            self._suspended = True
        return EsamRefusal(SecurityFlags.ESAM_VERIFICATION, str(exc))

    # --- operations -------------------------------------------------------------------------------

    def authenticate(self, req: IdentityAuthRequest, now: datetime) -> IdentityAuthReply:
        """070000FF: check the dispersion factor and ciphertext1, open a session, answer R2 + serial."""
        local, _ = self._guard(now, session=False)
        self._end()
        try:
            crypto.check_identity(self.keys, self.meter_number, req)
        except crypto.EsamCryptoError as exc:
            raise EsamRefusal(SecurityFlags.AUTHENTICATION, str(exc)) from None
        if self._rng is None:
            self._rng = random.Random(f"sim-esam/{self._meter.hex()}/{self._seed}")
        self._r2 = self._rng.randbytes(crypto.R2_SIZE)
        self._expires = local + timedelta(minutes=self.validity_minutes)
        self.authentications += 1
        return IdentityAuthReply(self._r2, self.serial)

    def set_validity(self, req: ValidityPeriodRequest, now: datetime) -> None:
        """070001FF: a new validity period (MAC-checked); it also restarts the current session's timer."""
        local, r2 = self._guard(now)
        try:
            crypto.check_validity(self.keys, r2, self.meter_number, req)
        except crypto.EsamCryptoError as exc:
            raise self._mac_failure(exc) from None
        self.validity_minutes = req.minutes
        self._expires = local + timedelta(minutes=req.minutes)

    def terminate(self, now: datetime) -> None:
        """070002FF: end the session (needs one, like every 0x03 command but authentication)."""
        self._guard(now)
        self._end()

    def verify_recharge(self, di: int, req: RechargeRequest, now: datetime) -> None:
        """070101FF / 070102FF (``di`` = the frame DI): check MAC1 and MAC2."""
        _, r2 = self._guard(now)
        try:
            crypto.check_recharge(self.keys, r2, self.meter_number, di, req)
        except crypto.EsamCryptoError as exc:
            raise self._mac_failure(exc) from None

    def verify_wallet_init(self, req: WalletInitRequest, now: datetime) -> None:
        """070103FF: check both MACs (the count-must-be-0 rule is the wallet's)."""
        _, r2 = self._guard(now)
        try:
            crypto.check_wallet_init(self.keys, r2, self.meter_number, req)
        except crypto.EsamCryptoError as exc:
            raise self._mac_failure(exc) from None

    def verify_param(self, di: int, value: bytes, mac: bytes, now: datetime) -> None:
        """Level-99 0x14 write: check the MAC over the plaintext value."""
        _, r2 = self._guard(now)
        try:
            crypto.check_param_mac(self.keys, r2, self.meter_number, di, value, mac)
        except crypto.EsamCryptoError as exc:
            raise self._mac_failure(exc) from None

    def decrypt_param(self, di: int, blob: bytes, now: datetime) -> bytes:
        """Level-98 0x14 write: verify and decrypt ciphertext + MAC, return the value bytes.

        A block that verifies but embeds another DI is refused with ERR bit1 (§5.5) and does
        not count as a MAC failure.
        """
        _, r2 = self._guard(now)
        try:
            return crypto.decrypt_param(self.keys, r2, self.meter_number, di, blob)
        except crypto.EsamDIMismatch as exc:
            raise EsamRefusal(SecurityFlags.OTHER, str(exc), ErrorFlags.NO_DATA) from None
        except crypto.EsamCryptoError as exc:
            raise self._mac_failure(exc) from None

    def decrypt_control(self, block: bytes, now: datetime) -> bytes:
        """Level-98 0x1C: verify and decrypt the 20-byte block to N1..N8.

        The validity-end check (N3..N8 vs the meter clock) is the meter's: see
        :class:`protocols.esam.ControlPlaintext`.
        """
        _, r2 = self._guard(now)
        try:
            return crypto.decrypt_control(self.keys, r2, self.meter_number, block)
        except crypto.EsamCryptoError as exc:
            raise self._mac_failure(exc) from None

    def status_reply(
        self, remaining: int, purchase_count: int, customer_number: str, now: datetime
    ) -> StatusQueryReply:
        """078102FF: the wallet values with their MACs (session R2, recharge key)."""
        _, r2 = self._guard(now)
        mac1, mac2 = crypto.status_macs(self.keys, r2, self.meter_number, remaining, purchase_count)
        return StatusQueryReply(remaining, mac1, purchase_count, mac2, customer_number, self.key_info)


__all__ = ["DEFAULT_VALIDITY_MINUTES", "SERIAL_PREFIX", "SUSPEND_AFTER", "EsamRefusal", "SimulatedEsam"]
