"""Simulated ESAM cryptography, shared by the master station (gateway) and the meter model.

**This is a simulated ESAM.** It is *not* the confidential SGCC specification (Q/GDW 1365,
DL/T 698.45 security) and it is not bit-compatible with a real ESAM or a utility HSM: the
real key hierarchy, diversification, MAC and encryption modes are not public and the real
cipher is SM1 (prepaid.md §2.1). What it does emulate is the *shape* of the protocol — field
sizes, who holds which random, what each MAC binds, what is encrypted — following the
"sim-ESAM" design of prepaid.md §2.5. Talking to real meters needs a genuine HSM.

Everything here is pure: no I/O, no clock reads, and no randomness except through the
``random`` callable injected into :class:`MasterStation`.

Keys (prepaid.md §2.5)
----------------------
* A fleet master key (default :data:`TEST_MASTER_KEY`, a public test key).
* Per function ``f`` in auth / control / param / recharge, a function master key
  ``K_f = SM4-ECB(master, label_f)`` with ``label_f`` the ASCII text in :data:`FUNCTION_LABELS`
  padded with zero bytes to 16.
* Per meter ``K_m,f = SM4-ECB(K_f, div ‖ ¬div)`` with ``div = 00 00 ‖ meter number`` (8 bytes).
  This is the 16-byte-block (PBOC 3.0 SM4) form of the classic ``E(div) ‖ E(¬div)`` smart-card
  diversification: with an 8-byte-block cipher each half is one block; SM4's block is 16 bytes,
  so the two halves are encrypted as one block.

Byte strings below are in ESAM order (the codec reverses them on the wire, dlt645.md §5.1).
``meter`` is the 6-byte meter number in reading order (``"112233445566"`` → ``11 22 33 44 55
66``), ``DI`` is 4 bytes big-endian (DI3 first), integers are big-endian, ``R2`` is the meter's
4-byte random from the identity authentication that opened the session.

``MAC(K, x)`` = the first 4 bytes of CMAC-SM4(K, x). Layouts:

=========================  =======  ==========================================================
what                       key      input / construction
=========================  =======  ==========================================================
ciphertext1 (070000FF)     auth     first 8 bytes of SM4-ECB(K, R1 ‖ div)
validity MAC (070001FF)    param    MAC(K, R2 ‖ meter ‖ 070001FF ‖ minutes, 2 BCD bytes)
recharge MAC1 (070101FF /  recharge MAC(K, R2 ‖ meter ‖ DI ‖ amount(4) ‖ count(4)); DI is the command's
070102FF)                           DI, so an opening MAC does not verify as a recharge
recharge MAC2              recharge MAC(K, R2 ‖ meter ‖ DI ‖ customer number, 6 BCD bytes)
wallet init (070103FF)     recharge MAC1 over ``amount(4)``, MAC2 over ``count(4)``, same prefix
status query (078102FF)    recharge meter → master: MAC1 over ``remaining(4)``, MAC2 over ``count(4)``
level-99 parameter (0x14)  param    MAC(K, R2 ‖ meter ‖ DI ‖ value), value = the write's data bytes
                                    before the MAC, exactly as they sit in ``WriteRequest.data``
level-98 parameter (0x14)  param    C = SM4-CBC(K, IV=0, pad(L ‖ DI ‖ value)), L = 4 + len(value)
                                    (DI + data, one byte); blob = C ‖ MAC(K, R2 ‖ meter ‖ C)
remote control (0x1C, 98)  control  C = SM4-CBC(K, IV=0, N1..N8 ‖ 80 00 00 00 00 00 00 00) (16);
                                    block = C ‖ MAC(K, R2 ‖ meter ‖ C) (20 bytes)
=========================  =======  ==========================================================

``pad`` is ISO/IEC 7816-4 padding: ``80`` then ``00`` up to a multiple of 16, always at least
one byte. The encrypted forms MAC the ciphertext without a DI: the 0x1C command has no DI and
the level-98 DI travels *inside* the ciphertext, which the meter compares with the frame DI
(dlt645.md §5.5, mismatch → ERR bit1), so a valid blob replayed under another DI is refused by
that check rather than by the MAC.

The level-98 blob (and the level-99 value ‖ MAC) is the 0x14 data field after the operator
code exactly as returned (``WriteRequest.data``; ``WriteRequest.mac_split`` separates the last 4
bytes); the 20-byte control block is kept in ESAM order and reversed on the wire by
``EncryptedRelayControlRequest``.

Every check raises :class:`EsamCryptoError` on failure (:class:`EsamDIMismatch` for the
level-98 embedded DI); the state machine in ``firmware_stubs.esam`` turns those into refusals.
"""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .dlt645.errors import PayloadError
from .dlt645.formats import METER_TZ
from .dlt645.payloads import decode_clock, encode_clock
from .dlt645.security import (
    IdentityAuthReply,
    IdentityAuthRequest,
    RechargeRequest,
    SecurityDI,
    StatusQueryReply,
    ValidityPeriodRequest,
    WalletInitRequest,
)

TEST_MASTER_KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
"""The fleet's default master key: a public *test* key (00 11 22 ... ff). Every simulated
meter derives its keys from it unless configured otherwise, so the gateway works with the
simulator out of the box. Never a production key."""

TEST_KEY_INFO = bytes(4)
"""Default 4-byte key information: all zero = every key in the test ("public-key") state."""

FUNCTION_LABELS: dict[str, bytes] = {
    "auth": b"SIMESAM:AUTH",
    "control": b"SIMESAM:CONTROL",
    "param": b"SIMESAM:PARAM",
    "recharge": b"SIMESAM:RECHARGE",
}
"""Label block (zero-padded to 16) from which each function master key is derived."""

BLOCK = 16
KEY_SIZE = 16
MAC_SIZE = 4
R1_SIZE = 8
R2_SIZE = 4
SERIAL_SIZE = 8
CONTROL_PLAINTEXT = 8
CONTROL_BLOCK = 20
MAX_PARAM_VALUE = 255 - 4
"""Longest level-98 value: the length byte counts DI + data."""


class EsamCryptoError(Exception):
    """A simulated-ESAM check failed: wrong MAC, wrong ciphertext, bad padding or block layout."""


class EsamDIMismatch(EsamCryptoError):
    """A level-98 block decrypted and verified, but its embedded DI is not the frame's DI (§5.5)."""

    def __init__(self, expected: int, embedded: int) -> None:
        super().__init__(f"embedded DI {embedded:08X} differs from the frame DI {expected:08X}")
        self.expected = expected
        self.embedded = embedded


# --- primitives -------------------------------------------------------------------------------


def _check_len(value: bytes, size: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
    return value


def sm4_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """SM4-ECB of whole 16-byte blocks."""
    if len(data) % BLOCK:
        raise ValueError("SM4-ECB input must be a multiple of 16 bytes")
    enc = Cipher(algorithms.SM4(_check_len(key, KEY_SIZE, "SM4 key")), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def _cbc(key: bytes, data: bytes, decrypt: bool) -> bytes:
    cipher = Cipher(algorithms.SM4(_check_len(key, KEY_SIZE, "SM4 key")), modes.CBC(bytes(BLOCK)))
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    return ctx.update(data) + ctx.finalize()


def cmac_sm4(key: bytes, data: bytes) -> bytes:
    """The full 16-byte CMAC-SM4 of ``data``."""
    c = cmac.CMAC(algorithms.SM4(_check_len(key, KEY_SIZE, "CMAC key")))
    c.update(data)
    return c.finalize()


def pad(data: bytes) -> bytes:
    """ISO/IEC 7816-4 padding to a multiple of 16: ``80`` then zeros (always at least one byte)."""
    data = bytes(data) + b"\x80"
    return data + bytes(-len(data) % BLOCK)


def unpad(data: bytes) -> bytes:
    """Inverse of :func:`pad`; raises :class:`EsamCryptoError` on bad padding."""
    stripped = bytes(data).rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80 or len(data) - len(stripped) >= BLOCK:
        raise EsamCryptoError("bad ISO/IEC 7816-4 padding")
    return stripped[:-1]


# --- keys -------------------------------------------------------------------------------------


def meter_bytes(meter_number: str) -> bytes:
    """The 6 BCD bytes of a 12-digit meter number, in reading order."""
    if (
        not isinstance(meter_number, str)
        or len(meter_number) != 12
        or not meter_number.isascii()
        or not meter_number.isdigit()
    ):
        raise ValueError(f"meter number {meter_number!r} is not 12 decimal digits")
    return bytes.fromhex(meter_number)


def dispersion_factor(meter_number: str) -> bytes:
    """``00 00`` + the 6-byte meter number (BCD, reading order): the ESAM diversification input."""
    return b"\x00\x00" + meter_bytes(meter_number)


@dataclass(frozen=True, slots=True)
class MeterKeys:
    """One meter's four diversified 16-byte keys and its 4-byte key information."""

    auth: bytes = field(repr=False)
    control: bytes = field(repr=False)
    param: bytes = field(repr=False)
    recharge: bytes = field(repr=False)
    key_info: bytes = TEST_KEY_INFO

    def __post_init__(self) -> None:
        for name in ("auth", "control", "param", "recharge"):
            object.__setattr__(self, name, _check_len(getattr(self, name), KEY_SIZE, f"{name} key"))
        object.__setattr__(self, "key_info", _check_len(self.key_info, 4, "key information"))


@functools.lru_cache(maxsize=64)
def function_master(master_key: bytes, function: str) -> bytes:
    """``K_f = SM4-ECB(master_key, label_f)`` for ``function`` in :data:`FUNCTION_LABELS` (cached:
    the same for every meter of a fleet)."""
    return sm4_ecb_encrypt(master_key, FUNCTION_LABELS[function].ljust(BLOCK, b"\x00"))


def diversify(function_key: bytes, meter_number: str) -> bytes:
    """``K_m = SM4-ECB(K_f, div ‖ ¬div)``, ``div`` = :func:`dispersion_factor`."""
    div = dispersion_factor(meter_number)
    return sm4_ecb_encrypt(function_key, div + bytes(b ^ 0xFF for b in div))


def derive_keys(meter_number: str, master_key: bytes = TEST_MASTER_KEY, key_info: bytes = TEST_KEY_INFO) -> MeterKeys:
    """The four keys of one meter, diversified from the fleet master key."""
    master_key = _check_len(master_key, KEY_SIZE, "master key")
    keys = {name: diversify(function_master(master_key, name), meter_number) for name in FUNCTION_LABELS}
    return MeterKeys(key_info=key_info, **keys)


# --- MACs -------------------------------------------------------------------------------------


def _di(di: int) -> bytes:
    if isinstance(di, bool) or not isinstance(di, int) or not 0 <= di <= 0xFFFFFFFF:
        raise ValueError(f"DI {di!r} is not a 32-bit integer")
    return di.to_bytes(4, "big")


def _u32(value: int, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} {value!r} does not fit 4 unsigned bytes")
    return value.to_bytes(4, "big")


def _bcd6(number: str, what: str) -> bytes:
    if not isinstance(number, str) or len(number) != 12 or not number.isascii() or not number.isdigit():
        raise ValueError(f"{what} {number!r} is not 12 decimal digits")
    return bytes.fromhex(number)


def mac(key: bytes, r2: bytes, meter_number: str, di: int | None, payload: bytes) -> bytes:
    """``MAC(K, R2 ‖ meter ‖ DI ‖ payload)``: the first 4 bytes of CMAC-SM4; ``di`` None omits the DI."""
    prefix = _check_len(r2, R2_SIZE, "R2") + meter_bytes(meter_number)
    if di is not None:
        prefix += _di(di)
    return cmac_sm4(key, prefix + bytes(payload))[:MAC_SIZE]


def check_mac(key: bytes, r2: bytes, meter_number: str, di: int | None, payload: bytes, tag: bytes, what: str) -> None:
    """Raise :class:`EsamCryptoError` unless ``tag`` is :func:`mac` of the same input."""
    expected = mac(key, r2, meter_number, di, payload)
    if len(tag) != MAC_SIZE or not hmac.compare_digest(expected, bytes(tag)):
        raise EsamCryptoError(f"{what}: MAC mismatch")


# --- identity authentication (070000FF) ---------------------------------------------------------


def ciphertext1(keys: MeterKeys, random1: bytes, meter_number: str) -> bytes:
    """The first 8 bytes of ``SM4-ECB(K_auth, R1 ‖ div)``."""
    block = _check_len(random1, R1_SIZE, "random1") + dispersion_factor(meter_number)
    return sm4_ecb_encrypt(keys.auth, block)[:R1_SIZE]


def check_identity(keys: MeterKeys, meter_number: str, req: IdentityAuthRequest) -> None:
    """Meter side: raise :class:`EsamCryptoError` unless the dispersion factor is this meter's and
    ciphertext1 is ``E(K_auth, R1 ‖ div)``."""
    if req.dispersion_factor != dispersion_factor(meter_number):
        raise EsamCryptoError(f"dispersion factor {req.dispersion_factor.hex()} is not this meter's")
    if not hmac.compare_digest(ciphertext1(keys, req.random1, meter_number), req.ciphertext1):
        raise EsamCryptoError("ciphertext1 does not match random1")


# --- validity period (070001FF) -------------------------------------------------------------------


def _minutes_bcd(minutes: int) -> bytes:
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= 9999:
        raise ValueError(f"validity period {minutes!r} is outside 1..9999 minutes")
    return bytes.fromhex(f"{minutes:04d}")


def validity_mac(keys: MeterKeys, r2: bytes, meter_number: str, minutes: int) -> bytes:
    """``MAC(K_param, R2 ‖ meter ‖ 070001FF ‖ minutes as 2 BCD bytes)``."""
    return mac(keys.param, r2, meter_number, SecurityDI.VALIDITY_PERIOD, _minutes_bcd(minutes))


def check_validity(keys: MeterKeys, r2: bytes, meter_number: str, req: ValidityPeriodRequest) -> None:
    check_mac(keys.param, r2, meter_number, SecurityDI.VALIDITY_PERIOD, _minutes_bcd(req.minutes), req.mac, "validity")


# --- recharge, account opening, wallet initialisation, status --------------------------------------


def recharge_macs(
    keys: MeterKeys, r2: bytes, meter_number: str, di: int, amount: int, purchase_count: int, customer_number: str
) -> tuple[bytes, bytes]:
    """(MAC1 over amount ‖ count, MAC2 over the customer number), both with the recharge key and ``di``."""
    mac1 = mac(keys.recharge, r2, meter_number, di, _u32(amount, "amount") + _u32(purchase_count, "purchase count"))
    mac2 = mac(keys.recharge, r2, meter_number, di, _bcd6(customer_number, "customer number"))
    return mac1, mac2


def check_recharge(keys: MeterKeys, r2: bytes, meter_number: str, di: int, req: RechargeRequest) -> None:
    """Meter side: MAC1 and MAC2 of a 070101FF / 070102FF request (``di`` = the frame's DI)."""
    amount_count = _u32(req.amount, "amount") + _u32(req.purchase_count, "purchase count")
    check_mac(keys.recharge, r2, meter_number, di, amount_count, req.mac1, "recharge MAC1")
    customer = _bcd6(req.customer_number, "customer number")
    check_mac(keys.recharge, r2, meter_number, di, customer, req.mac2, "recharge MAC2")


def wallet_init_macs(
    keys: MeterKeys, r2: bytes, meter_number: str, amount: int, purchase_count: int = 0
) -> tuple[bytes, bytes]:
    """(MAC1 over amount, MAC2 over count) of a 070103FF wallet initialisation."""
    di = SecurityDI.WALLET_INITIALISATION
    return (
        mac(keys.recharge, r2, meter_number, di, _u32(amount, "amount")),
        mac(keys.recharge, r2, meter_number, di, _u32(purchase_count, "purchase count")),
    )


def check_wallet_init(keys: MeterKeys, r2: bytes, meter_number: str, req: WalletInitRequest) -> None:
    di = SecurityDI.WALLET_INITIALISATION
    check_mac(keys.recharge, r2, meter_number, di, _u32(req.amount, "amount"), req.mac1, "wallet MAC1")
    check_mac(keys.recharge, r2, meter_number, di, _u32(req.purchase_count, "purchase count"), req.mac2, "wallet MAC2")


def status_macs(
    keys: MeterKeys, r2: bytes, meter_number: str, remaining: int, purchase_count: int
) -> tuple[bytes, bytes]:
    """Meter side: (MAC over remaining money, MAC over purchase count) of a 078102FF status reply."""
    di = SecurityDI.STATUS_QUERY
    return (
        mac(keys.recharge, r2, meter_number, di, _u32(remaining, "remaining money")),
        mac(keys.recharge, r2, meter_number, di, _u32(purchase_count, "purchase count")),
    )


def check_status(keys: MeterKeys, r2: bytes, meter_number: str, reply: StatusQueryReply) -> None:
    """Master side: verify the two MACs of a 078102FF status reply."""
    mac1, mac2 = status_macs(keys, r2, meter_number, reply.remaining, reply.purchase_count)
    if not (hmac.compare_digest(mac1, reply.mac1) and hmac.compare_digest(mac2, reply.mac2)):
        raise EsamCryptoError("status query: MAC mismatch")


# --- parameters (0x14, levels 99 and 98) ------------------------------------------------------------


def param_mac(keys: MeterKeys, r2: bytes, meter_number: str, di: int, value: bytes) -> bytes:
    """Level 99: ``MAC(K_param, R2 ‖ meter ‖ DI ‖ value)``."""
    return mac(keys.param, r2, meter_number, di, value)


def check_param_mac(keys: MeterKeys, r2: bytes, meter_number: str, di: int, value: bytes, tag: bytes) -> None:
    check_mac(keys.param, r2, meter_number, di, value, tag, f"parameter {di:08X}")


def encrypt_param(
    keys: MeterKeys, r2: bytes, meter_number: str, di: int, value: bytes, *, embedded_di: int | None = None
) -> bytes:
    """Level 98: ``SM4-CBC(K_param, pad(L ‖ DI ‖ value)) ‖ MAC`` — the data field of the write.

    ``embedded_di`` (default ``di``) exists only to build a deliberately inconsistent block in tests.
    """
    value = bytes(value)
    if len(value) > MAX_PARAM_VALUE:
        raise ValueError(f"a level-98 value holds at most {MAX_PARAM_VALUE} bytes, got {len(value)}")
    _di(di)
    inner = _di(di if embedded_di is None else embedded_di)
    ct = _cbc(keys.param, pad(bytes([4 + len(value)]) + inner + value), decrypt=False)
    return ct + mac(keys.param, r2, meter_number, None, ct)


def decrypt_param(keys: MeterKeys, r2: bytes, meter_number: str, di: int, blob: bytes) -> bytes:
    """Meter side of :func:`encrypt_param`: verify, decrypt, check the embedded DI, return the value."""
    blob = bytes(blob)
    if len(blob) < BLOCK + MAC_SIZE or (len(blob) - MAC_SIZE) % BLOCK:
        raise EsamCryptoError(f"a level-98 block is n x 16 bytes + a 4-byte MAC, got {len(blob)} bytes")
    ct, tag = blob[:-MAC_SIZE], blob[-MAC_SIZE:]
    check_mac(keys.param, r2, meter_number, None, ct, tag, f"parameter {di:08X}")
    plain = unpad(_cbc(keys.param, ct, decrypt=True))
    if len(plain) < 5 or plain[0] != len(plain) - 1:
        raise EsamCryptoError("level-98 block: length byte does not match the decrypted data")
    embedded = int.from_bytes(plain[1:5], "big")
    if embedded != di:
        raise EsamDIMismatch(di, embedded)
    return plain[5:]


# --- remote control (0x1C, level 98) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlPlaintext:
    """N1..N8 of a 0x1C command: command (N1), N2, validity end (N3..N8, None when all zero)."""

    command: int
    n2: int
    valid_until: datetime | None

    def to_bytes(self) -> bytes:
        if not 0 <= self.command <= 0xFF or not 0 <= self.n2 <= 0xFF:
            raise ValueError("N1 and N2 must be bytes")
        return bytes([self.command, self.n2]) + encode_clock(self.valid_until)

    @classmethod
    def from_bytes(cls, data: bytes) -> ControlPlaintext:
        """Parse N1..N8; raises :class:`EsamCryptoError` if N3..N8 is not a valid time."""
        data = bytes(data)
        if len(data) != CONTROL_PLAINTEXT:
            raise EsamCryptoError(f"N1..N8 is 8 bytes, got {len(data)}")
        try:
            valid_until = decode_clock(data[2:])
        except PayloadError as exc:
            raise EsamCryptoError(f"N3..N8: {exc}") from None
        return cls(data[0], data[1], valid_until)  # type: ignore[arg-type]

    def expired(self, now: datetime) -> bool:
        """FW-A: the command may not execute once ``now`` is past its validity end.

        A naive ``now`` is taken as meter-local time (:data:`~.dlt645.formats.METER_TZ`).
        """
        if now.tzinfo is None:
            now = now.replace(tzinfo=METER_TZ)
        return self.valid_until is not None and now > self.valid_until


def encrypt_control(keys: MeterKeys, r2: bytes, meter_number: str, plaintext: bytes) -> bytes:
    """The 20-byte block: ``SM4-CBC(K_control, IV=0, N1..N8 ‖ 80 00..00) ‖ MAC(R2 ‖ meter ‖ C)``."""
    ct = _cbc(keys.control, pad(_check_len(plaintext, CONTROL_PLAINTEXT, "N1..N8")), decrypt=False)
    return ct + mac(keys.control, r2, meter_number, None, ct)


def decrypt_control(keys: MeterKeys, r2: bytes, meter_number: str, block: bytes) -> bytes:
    """Meter side: verify and decrypt a 20-byte control block to N1..N8."""
    block = bytes(block)
    if len(block) != CONTROL_BLOCK:
        raise EsamCryptoError(f"a control block is {CONTROL_BLOCK} bytes, got {len(block)}")
    ct, tag = block[:BLOCK], block[BLOCK:]
    check_mac(keys.control, r2, meter_number, None, ct, tag, "control block")
    plain = unpad(_cbc(keys.control, ct, decrypt=True))
    if len(plain) != CONTROL_PLAINTEXT:
        raise EsamCryptoError(f"control block decrypts to {len(plain)} bytes, not 8")
    return plain


# --- master station ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingAuth:
    """Master side between sending 070000FF and receiving the reply."""

    meter_number: str
    keys: MeterKeys
    random1: bytes


@dataclass(frozen=True, slots=True)
class Session:
    """An authenticated session with one meter, as the master station sees it.

    Holds what every later MAC needs: the meter's keys and number and the meter's R2. Nothing
    here knows when the meter will time the session out; that is the meter's clock.
    """

    meter_number: str
    keys: MeterKeys
    r2: bytes
    esam_serial: bytes
    random1: bytes = b""

    def recharge(
        self, amount_fen: int, purchase_count: int, customer_number: str, opening: bool = False
    ) -> RechargeRequest:
        """The body of 070102FF (recharge) or, with ``opening``, 070101FF (account opening)."""
        di = SecurityDI.ACCOUNT_OPENING if opening else SecurityDI.RECHARGE
        mac1, mac2 = recharge_macs(
            self.keys, self.r2, self.meter_number, di, amount_fen, purchase_count, customer_number
        )
        return RechargeRequest(amount_fen, purchase_count, mac1, customer_number, mac2)

    def validity(self, minutes: int) -> ValidityPeriodRequest:
        """The body of 070001FF."""
        return ValidityPeriodRequest(minutes, validity_mac(self.keys, self.r2, self.meter_number, minutes))

    def wallet_init(self, amount_fen: int) -> WalletInitRequest:
        """The body of 070103FF (purchase count 0)."""
        mac1, mac2 = wallet_init_macs(self.keys, self.r2, self.meter_number, amount_fen, 0)
        return WalletInitRequest(amount_fen, mac1, 0, mac2)

    def param_mac(self, di: int, value_bytes: bytes) -> bytes:
        """Level 99: the 4-byte MAC appended to ``value_bytes`` in the 0x14 data field."""
        return param_mac(self.keys, self.r2, self.meter_number, di, value_bytes)

    def encrypt_param(self, di: int, value_bytes: bytes) -> bytes:
        """Level 98: ciphertext + MAC, the whole 0x14 data field after the operator code."""
        return encrypt_param(self.keys, self.r2, self.meter_number, di, value_bytes)

    def control_block(self, command: int, n2: int = 0, valid_until: datetime | None = None) -> bytes:
        """The 20-byte ESAM block of an :class:`~.dlt645.relay.EncryptedRelayControlRequest`."""
        plaintext = ControlPlaintext(command, n2, valid_until).to_bytes()
        return encrypt_control(self.keys, self.r2, self.meter_number, plaintext)

    def check_status(self, reply: StatusQueryReply) -> None:
        """Verify a 078102FF reply's MACs; raises :class:`EsamCryptoError`."""
        check_status(self.keys, self.r2, self.meter_number, reply)


class MasterStation:
    """The simulated HSM of the master station: keys from a fleet master key, randoms injected."""

    def __init__(self, master_key: bytes = TEST_MASTER_KEY, random: Callable[[int], bytes] = os.urandom) -> None:
        self._master_key = _check_len(master_key, KEY_SIZE, "master key")
        self._random = random
        self._keys: dict[str, MeterKeys] = {}

    def keys_for(self, meter_number: str) -> MeterKeys:
        """The meter's diversified keys (cached)."""
        keys = self._keys.get(meter_number)
        if keys is None:
            keys = self._keys[meter_number] = derive_keys(meter_number, self._master_key)
        return keys

    def start_auth(self, meter_number: str) -> tuple[IdentityAuthRequest, PendingAuth]:
        """A fresh R1 and ciphertext1 for 070000FF, and the state to finish with."""
        keys = self.keys_for(meter_number)
        random1 = _check_len(self._random(R1_SIZE), R1_SIZE, "random1 from the random source")
        req = IdentityAuthRequest.for_meter(ciphertext1(keys, random1, meter_number), random1, meter_number)
        return req, PendingAuth(meter_number, keys, random1)

    def finish_auth(self, pending: PendingAuth, reply: IdentityAuthReply) -> Session:
        """The session opened by the meter's reply (R2 + ESAM serial)."""
        return Session(pending.meter_number, pending.keys, reply.random2, reply.esam_serial, pending.random1)


__all__ = [
    "BLOCK",
    "CONTROL_BLOCK",
    "CONTROL_PLAINTEXT",
    "FUNCTION_LABELS",
    "KEY_SIZE",
    "MAC_SIZE",
    "MAX_PARAM_VALUE",
    "R1_SIZE",
    "R2_SIZE",
    "SERIAL_SIZE",
    "TEST_KEY_INFO",
    "TEST_MASTER_KEY",
    "ControlPlaintext",
    "EsamCryptoError",
    "EsamDIMismatch",
    "MasterStation",
    "MeterKeys",
    "PendingAuth",
    "Session",
    "check_identity",
    "check_mac",
    "check_param_mac",
    "check_recharge",
    "check_status",
    "check_validity",
    "check_wallet_init",
    "ciphertext1",
    "cmac_sm4",
    "decrypt_control",
    "decrypt_param",
    "derive_keys",
    "dispersion_factor",
    "diversify",
    "encrypt_control",
    "encrypt_param",
    "function_master",
    "mac",
    "meter_bytes",
    "pad",
    "param_mac",
    "recharge_macs",
    "sm4_ecb_encrypt",
    "status_macs",
    "unpad",
    "validity_mac",
    "wallet_init_macs",
]
