"""Simulated-ESAM cryptography (protocols/esam.py, prepaid.md §2.5).

The SM4 primitive against GB/T 32907; golden vectors of the *simulated* scheme (simulator-only:
they pin our own construction against accidental change and say nothing about a real ESAM);
and properties: whatever the master station builds verifies on the meter side, and any
single-bit change of a MAC, a ciphertext, an amount, a count or a customer number is refused.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocols import esam
from protocols.dlt645.formats import METER_TZ
from protocols.dlt645.payloads import Password, WriteRequest
from protocols.dlt645.relay import EncryptedRelayControlRequest, RelayCommand
from protocols.dlt645.security import (
    IdentityAuthReply,
    IdentityAuthRequest,
    RechargeRequest,
    SecurityDI,
    StatusQueryReply,
    ValidityPeriodRequest,
    WalletInitRequest,
)
from protocols.esam import (
    TEST_MASTER_KEY,
    ControlPlaintext,
    EsamCryptoError,
    EsamDIMismatch,
    MasterStation,
    Session,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

METER = "112233445566"
R1 = bytes(range(1, 9))
R2 = bytes.fromhex("a1b2c3d4")
SERIAL = b"SM" + bytes.fromhex(METER)

meter_numbers = st.text("0123456789", min_size=12, max_size=12)
customers = meter_numbers
u32 = st.integers(0, 0xFFFFFFFF)
keys16 = st.binary(min_size=16, max_size=16)
r1s = st.binary(min_size=8, max_size=8)
r2s = st.binary(min_size=4, max_size=4)
dis = st.integers(0, 0xFFFFFFFF)
times = st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31)).map(
    lambda t: t.replace(microsecond=0, tzinfo=METER_TZ)
)


def flip(data: bytes, bit: int) -> bytes:
    bit %= 8 * len(data)
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def open_session(meter: str, master_key: bytes, r1: bytes, r2: bytes) -> tuple[IdentityAuthRequest, Session]:
    station = MasterStation(master_key, random=lambda n: r1[:n])
    req, pending = station.start_auth(meter)
    return req, station.finish_auth(pending, IdentityAuthReply(r2, b"SM" + bytes.fromhex(meter)))


def golden_session() -> tuple[IdentityAuthRequest, Session]:
    return open_session(METER, TEST_MASTER_KEY, R1, R2)


# --- SM4 primitive --------------------------------------------------------------------------------


def test_sm4_gbt32907_vector() -> None:
    key = bytes.fromhex("0123456789abcdeffedcba9876543210")
    assert esam.sm4_ecb_encrypt(key, key).hex() == "681edf34d206965e86b3e94f536e4246"


def test_padding() -> None:
    assert esam.pad(b"") == b"\x80" + bytes(15)
    assert esam.pad(bytes(8)) == bytes(8) + b"\x80" + bytes(7)
    assert len(esam.pad(bytes(16))) == 32
    for n in range(40):
        data = bytes([0, 0x80] * n)[:n]
        assert esam.unpad(esam.pad(data)) == data
    for bad in (bytes(16), b"\x01" * 16, bytes(15) + b"\x01", b"\x80" + bytes(16)):
        with pytest.raises(EsamCryptoError):
            esam.unpad(bad)


# --- golden vectors: SIMULATOR-ONLY (our own sim-ESAM scheme, not a real ESAM) ----------------------

GOLDEN_KEYS = {
    "auth": "bd455855ed816916ed645ce3c1969661",
    "control": "c17a4cc6e98326b462ee405507fa6738",
    "param": "8602025457a44afcab4d1938865476d4",
    "recharge": "441c819b94ea1f2b016a876f2b0800a8",
}


def test_golden_test_master_key_and_dispersion() -> None:
    assert TEST_MASTER_KEY.hex() == "00112233445566778899aabbccddeeff"
    assert esam.dispersion_factor(METER).hex() == "0000112233445566"
    assert esam.dispersion_factor(METER) == IdentityAuthRequest.dispersion_for(METER)


def test_golden_derived_keys() -> None:
    keys = esam.derive_keys(METER)
    assert {name: getattr(keys, name).hex() for name in GOLDEN_KEYS} == GOLDEN_KEYS
    assert keys.key_info == bytes(4)


def test_golden_identity_authentication() -> None:
    req, session = golden_session()
    assert req.random1 == R1
    assert req.ciphertext1.hex() == "9b03d0b5bfc879dd"
    assert req.dispersion_factor.hex() == "0000112233445566"
    assert session.r2 == R2 and session.esam_serial == SERIAL and session.meter_number == METER


def test_golden_macs() -> None:
    _, s = golden_session()
    recharge = s.recharge(10000, 3, "000000012345")
    assert (recharge.mac1.hex(), recharge.mac2.hex()) == ("f8ac1447", "e625f26b")
    opening = s.recharge(10000, 1, "000000012345", opening=True)
    assert (opening.mac1.hex(), opening.mac2.hex()) == ("bc039ae4", "ab36a7e6")
    assert s.validity(5).mac.hex() == "9642a254"
    wallet = s.wallet_init(5000)
    assert (wallet.mac1.hex(), wallet.purchase_count, wallet.mac2.hex()) == ("c2b2bdbe", 0, "87e918ee")
    assert s.param_mac(0x04001001, bytes.fromhex("00100000")).hex() == "60d9603b"


def test_golden_ciphertexts() -> None:
    _, s = golden_session()
    blob = s.encrypt_param(0x04001003, bytes.fromhex("00500000"))
    assert blob.hex() == "004deefeb4af85e2f2de20ccdeb22d42e0ce51ab"
    block = s.control_block(RelayCommand.TRIP, 0, datetime(2024, 5, 6, 7, 8, 9, tzinfo=METER_TZ))
    assert block.hex() == "1325c76623dd9d1bc4fb109cb8ed9838e25eff9f"
    keys = esam.derive_keys(METER)
    assert esam.decrypt_control(keys, R2, METER, block) == bytes.fromhex("1a00090807060524")
    assert esam.decrypt_param(keys, R2, METER, 0x04001003, blob) == bytes.fromhex("00500000")


# --- properties: master output verifies on the meter side ---------------------------------------


@FAST
@given(meter=meter_numbers, master=keys16, r1=r1s, r2=r2s)
def test_authentication_verifies(meter: str, master: bytes, r1: bytes, r2: bytes) -> None:
    req, session = open_session(meter, master, r1, r2)
    keys = esam.derive_keys(meter, master)
    assert session.keys == keys
    esam.check_identity(keys, meter, req)
    assert req.meter_number == meter
    # a round trip through the wire codec changes nothing
    esam.check_identity(keys, meter, IdentityAuthRequest.from_bytes(req.to_bytes()))


@FAST
@given(
    meter=meter_numbers,
    master=keys16,
    r2=r2s,
    amount=u32,
    count=u32,
    customer=customers,
    opening=st.booleans(),
    minutes=st.integers(1, 9999),
)
def test_recharge_validity_wallet_verify(
    meter: str, master: bytes, r2: bytes, amount: int, count: int, customer: str, opening: bool, minutes: int
) -> None:
    _, s = open_session(meter, master, R1, r2)
    keys = esam.derive_keys(meter, master)
    di = SecurityDI.ACCOUNT_OPENING if opening else SecurityDI.RECHARGE
    req = s.recharge(amount, count, customer, opening=opening)
    esam.check_recharge(keys, r2, meter, di, req)
    esam.check_recharge(keys, r2, meter, di, RechargeRequest.from_bytes(req.to_bytes()))
    other = SecurityDI.RECHARGE if opening else SecurityDI.ACCOUNT_OPENING
    with pytest.raises(EsamCryptoError):
        esam.check_recharge(keys, r2, meter, other, req)
    esam.check_validity(keys, r2, meter, s.validity(minutes))
    wallet = s.wallet_init(amount)
    esam.check_wallet_init(keys, r2, meter, WalletInitRequest.from_bytes(wallet.to_bytes()))
    mac1, mac2 = esam.status_macs(keys, r2, meter, amount, count)
    s.check_status(StatusQueryReply(amount, mac1, count, mac2, customer, keys.key_info))


@FAST
@given(meter=meter_numbers, r2=r2s, di=dis, value=st.binary(max_size=esam.MAX_PARAM_VALUE))
def test_params_verify(meter: str, r2: bytes, di: int, value: bytes) -> None:
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    keys = s.keys
    esam.check_param_mac(keys, r2, meter, di, value, s.param_mac(di, value))
    blob = s.encrypt_param(di, value)
    assert len(blob) % 16 == 4 and len(blob) >= 20
    assert esam.decrypt_param(keys, r2, meter, di, blob) == value
    # as the data field of a level-98 0x14 write, through the codec
    write = WriteRequest.from_bytes(WriteRequest(di, Password(0x98), "00000000", blob).to_bytes())
    ct, mac = write.mac_split()
    assert esam.decrypt_param(keys, r2, meter, write.di, ct + mac) == value


@FAST
@given(meter=meter_numbers, r2=r2s, command=st.sampled_from(list(RelayCommand)), n2=st.integers(0, 255), until=times)
def test_control_block_verifies(meter: str, r2: bytes, command: int, n2: int, until: datetime) -> None:
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    block = s.control_block(command, n2, until)
    assert len(block) == esam.CONTROL_BLOCK
    wire = EncryptedRelayControlRequest.from_bytes(
        EncryptedRelayControlRequest(Password(0x98), "00000000", block).to_bytes()
    )
    plain = ControlPlaintext.from_bytes(esam.decrypt_control(s.keys, r2, meter, wire.block))
    assert plain == ControlPlaintext(command, n2, until)
    assert not plain.expired(until) and plain.expired(until + timedelta(seconds=1))


def test_control_without_end_time() -> None:
    _, s = golden_session()
    plain = esam.decrypt_control(s.keys, R2, METER, s.control_block(RelayCommand.DIRECT_CLOSE))
    parsed = ControlPlaintext.from_bytes(plain)
    assert parsed.valid_until is None and not parsed.expired(datetime(2099, 1, 1))


# --- properties: single-bit changes are refused ----------------------------------------------------


@FAST
@given(
    meter=meter_numbers,
    r2=r2s,
    amount=u32,
    count=u32,
    customer=customers,
    field=st.sampled_from(["mac1", "mac2", "amount", "purchase_count", "customer_number"]),
    bit=st.integers(0, 63),
)
def test_recharge_bit_flip_refused(
    meter: str, r2: bytes, amount: int, count: int, customer: str, field: str, bit: int
) -> None:
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    good = s.recharge(amount, count, customer)
    values = {
        "amount": good.amount,
        "purchase_count": good.purchase_count,
        "mac1": good.mac1,
        "customer_number": good.customer_number,
        "mac2": good.mac2,
    }
    if field in ("amount", "purchase_count"):
        values[field] ^= 1 << (bit % 32)
    elif field == "customer_number":
        changed = flip(bytes.fromhex(customer), bit).hex()
        assume(changed.isdigit())  # a non-BCD customer number cannot even be encoded
        values[field] = changed
    else:
        values[field] = flip(values[field], bit)
    with pytest.raises(EsamCryptoError):
        esam.check_recharge(s.keys, r2, meter, SecurityDI.RECHARGE, RechargeRequest(**values))


@FAST
@given(meter=meter_numbers, r1=r1s, r2=r2s, bit=st.integers(0, 255), which=st.sampled_from(["c1", "r1", "div"]))
def test_identity_bit_flip_refused(meter: str, r1: bytes, r2: bytes, bit: int, which: str) -> None:
    req, s = open_session(meter, TEST_MASTER_KEY, r1, r2)
    c1, rand1, div = req.ciphertext1, req.random1, req.dispersion_factor
    if which == "c1":
        c1 = flip(c1, bit)
    elif which == "r1":
        rand1 = flip(rand1, bit)
    else:
        div = flip(div, bit)
    with pytest.raises(EsamCryptoError):
        esam.check_identity(s.keys, meter, IdentityAuthRequest(c1, rand1, div))


@FAST
@given(meter=meter_numbers, r2=r2s, minutes=st.integers(1, 9999), bit=st.integers(0, 31), on_mac=st.booleans())
def test_validity_bit_flip_refused(meter: str, r2: bytes, minutes: int, bit: int, on_mac: bool) -> None:
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    good = s.validity(minutes)
    if on_mac:
        bad = ValidityPeriodRequest(minutes, flip(good.mac, bit))
    else:
        changed = minutes ^ (1 << (bit % 14))
        assume(1 <= changed <= 9999)
        bad = ValidityPeriodRequest(changed, good.mac)
    with pytest.raises(EsamCryptoError):
        esam.check_validity(s.keys, r2, meter, bad)


@FAST
@given(meter=meter_numbers, r2=r2s, until=times, bit=st.integers(0, 159))
def test_control_bit_flip_refused(meter: str, r2: bytes, until: datetime, bit: int) -> None:
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    block = s.control_block(RelayCommand.TRIP, 0, until)
    with pytest.raises(EsamCryptoError):
        esam.decrypt_control(s.keys, r2, meter, flip(block, bit))


@FAST
@given(meter=meter_numbers, r2=r2s, di=dis, value=st.binary(max_size=40), bit=st.integers(0, 10_000))
def test_param_bit_flip_refused(meter: str, r2: bytes, di: int, value: bytes, bit: int) -> None:
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    blob = s.encrypt_param(di, value)
    with pytest.raises(EsamCryptoError):
        esam.decrypt_param(s.keys, r2, meter, di, flip(blob, bit))
    mac = s.param_mac(di, value)
    with pytest.raises(EsamCryptoError):
        esam.check_param_mac(s.keys, r2, meter, di, value, flip(mac, bit))
    if value:
        with pytest.raises(EsamCryptoError):
            esam.check_param_mac(s.keys, r2, meter, di, flip(value, bit), mac)


@FAST
@given(meter=meter_numbers, r2=r2s, other_r2=r2s, di=dis, other_di=dis, value=st.binary(max_size=20))
def test_binding_to_r2_and_di(meter: str, r2: bytes, other_r2: bytes, di: int, other_di: int, value: bytes) -> None:
    """A MAC is only good for the session's R2; a level-98 block only under its own DI."""
    assume(r2 != other_r2 and di != other_di)
    _, s = open_session(meter, TEST_MASTER_KEY, R1, r2)
    with pytest.raises(EsamCryptoError):
        esam.check_param_mac(s.keys, other_r2, meter, di, value, s.param_mac(di, value))
    with pytest.raises(EsamCryptoError):
        esam.decrypt_control(s.keys, other_r2, meter, s.control_block(RelayCommand.TRIP))
    with pytest.raises(EsamDIMismatch) as info:
        esam.decrypt_param(s.keys, r2, meter, other_di, s.encrypt_param(di, value))
    assert (info.value.expected, info.value.embedded) == (other_di, di)


# --- keys -------------------------------------------------------------------------------------------


@FAST
@given(a=meter_numbers, b=meter_numbers, master=keys16)
def test_different_meters_different_keys(a: str, b: str, master: bytes) -> None:
    assume(a != b)
    ka, kb = esam.derive_keys(a, master), esam.derive_keys(b, master)
    for name in ("auth", "control", "param", "recharge"):
        assert getattr(ka, name) != getattr(kb, name)
    assert len({ka.auth, ka.control, ka.param, ka.recharge}) == 4


@FAST
@given(meter=meter_numbers, m1=keys16, m2=keys16)
def test_different_master_keys_different_keys(meter: str, m1: bytes, m2: bytes) -> None:
    assume(m1 != m2)
    assert esam.derive_keys(meter, m1).auth != esam.derive_keys(meter, m2).auth


def test_cross_meter_session_is_useless() -> None:
    """Keys of meter A do not authenticate at meter B even with B's dispersion factor."""
    station = MasterStation(random=lambda n: R1[:n])
    req, _ = station.start_auth("000000000001")
    forged = IdentityAuthRequest(req.ciphertext1, req.random1, esam.dispersion_factor("000000000002"))
    with pytest.raises(EsamCryptoError):
        esam.check_identity(esam.derive_keys("000000000002"), "000000000002", forged)


# --- master-station API ------------------------------------------------------------------------------


def test_master_station_uses_injected_random_only() -> None:
    calls: list[int] = []

    def rnd(n: int) -> bytes:
        calls.append(n)
        return bytes([len(calls)]) * n

    station = MasterStation(random=rnd)
    a, _ = station.start_auth(METER)
    b, _ = station.start_auth(METER)
    assert calls == [8, 8]
    assert a.random1 == b"\x01" * 8 and b.random1 == b"\x02" * 8
    assert a.ciphertext1 != b.ciphertext1
    with pytest.raises(ValueError):
        MasterStation(random=lambda n: b"short").start_auth(METER)


def test_malformed_inputs() -> None:
    keys = esam.derive_keys(METER)
    with pytest.raises(ValueError):
        esam.derive_keys("12345")
    with pytest.raises(ValueError):
        esam.derive_keys(METER, b"short")
    with pytest.raises(ValueError):
        esam.encrypt_param(keys, R2, METER, 0x04000101, bytes(esam.MAX_PARAM_VALUE + 1))
    for bad in (b"", bytes(19), bytes(21)):
        with pytest.raises(EsamCryptoError):
            esam.decrypt_control(keys, R2, METER, bad)
    for bad in (b"", bytes(4), bytes(19), bytes(21), bytes(36 + 1)):
        with pytest.raises(EsamCryptoError):
            esam.decrypt_param(keys, R2, METER, 0x04000101, bad)
    with pytest.raises(EsamCryptoError):
        ControlPlaintext.from_bytes(bytes.fromhex("1a00ff0807060524"))  # seconds = FF


def test_level98_length_byte_is_checked() -> None:
    """A block whose length byte lies is refused even though its MAC is right."""
    keys = esam.derive_keys(METER)
    inner = esam.pad(bytes([9]) + (0x04001003).to_bytes(4, "big") + b"\x01\x02")
    enc = Cipher(algorithms.SM4(keys.param), modes.CBC(bytes(16))).encryptor()
    ct = enc.update(inner) + enc.finalize()
    blob = ct + esam.mac(keys.param, R2, METER, None, ct)
    with pytest.raises(EsamCryptoError) as info:
        esam.decrypt_param(keys, R2, METER, 0x04001003, blob)
    assert not isinstance(info.value, EsamDIMismatch)
