"""``check_destination``: which requests may go to broadcast 99..99 and to AA wildcards (dlt645.md §1.5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.dlt645 import BROADCAST, WILDCARD, AddressError, Edition, check_destination, normalize_address
from protocols.dlt645.address import is_valid_wildcard

V97 = Edition.V1997


@pytest.mark.parametrize(
    ("address", "function", "edition"),
    [
        (BROADCAST, 0x08, Edition.V2007),  # broadcast time
        (BROADCAST, 0x16, Edition.V2007),  # freeze
        (BROADCAST, 0x1D, Edition.V2007),  # FW-A
        (BROADCAST, 0x08, V97),
        (WILDCARD, 0x13, Edition.V2007),  # read address needs all-AA
        (WILDCARD, 0x15, Edition.V2007),
        (WILDCARD, 0x11, Edition.V2007),  # a read may use the wildcard (one meter on the line)
        (WILDCARD, 0x01, V97),
        ("AAAA12345678", 0x11, Edition.V2007),
        ("AAAA12345678", 0x03, Edition.V2007),  # 0x03: §1.5 says nothing; not restricted here
        ("123456789012", 0x14, Edition.V2007),
        ("123456789012", 0x1C, Edition.V2007),
        ("1", 0x11, Edition.V2007),
        ("aaaaaaaaaa01", 0x12, Edition.V2007),
    ],
)
def test_allowed(address, function, edition):
    assert check_destination(address, function, edition) == normalize_address(address)


@pytest.mark.parametrize(
    ("address", "function", "edition", "match"),
    [
        (WILDCARD, 0x1C, Edition.V2007, "wildcard"),  # review: encode relay AA..AA trip
        (BROADCAST, 0x1C, Edition.V2007, "broadcast"),  # review: encode relay 99..99 trip
        ("12AA56789012", 0x11, Edition.V2007, "not a valid wildcard"),  # review: encode read 12AA..
        ("1234567890AA", 0x11, Edition.V2007, "not a valid wildcard"),
        (BROADCAST, 0x11, Edition.V2007, "broadcast"),  # no meter answers
        (BROADCAST, 0x14, Edition.V2007, "broadcast"),
        (BROADCAST, 0x13, Edition.V2007, "broadcast"),
        (BROADCAST, 0x1D, V97, "broadcast"),
        (BROADCAST, 0x01, V97, "broadcast"),
        ("123456789012", 0x08, Edition.V2007, "broadcast address"),  # broadcast time needs 99..99
        (WILDCARD, 0x08, Edition.V2007, "broadcast address"),
        ("123456789012", 0x13, Edition.V2007, "wildcard address"),
        ("AAAA12345678", 0x15, Edition.V2007, "wildcard address"),
        (WILDCARD, 0x14, Edition.V2007, "wildcard"),
        ("AAAA12345678", 0x1C, Edition.V2007, "wildcard"),  # partial wildcards too (the simulator ignores them)
        ("AAAAAAAAAA01", 0x14, Edition.V2007, "wildcard"),
        (WILDCARD, 0x16, Edition.V2007, "wildcard"),
        (WILDCARD, 0x1A, Edition.V2007, "wildcard"),
        (WILDCARD, 0x04, V97, "wildcard"),
        ("12345678901X", 0x11, Edition.V2007, "non-BCD"),
    ],
)
def test_refused(address, function, edition, match):
    with pytest.raises(AddressError, match=match):
        check_destination(address, function, edition)


@given(st.lists(st.sampled_from(["AA", "12", "00", "99"]), min_size=6, max_size=6).map("".join))
def test_reads_accept_exactly_the_valid_wildcards(address):
    ok = is_valid_wildcard(address) and address != BROADCAST
    try:
        check_destination(address, 0x11)
    except AddressError:
        assert not ok
    else:
        assert ok


def test_normalize_stays_liberal_for_decoding():
    # A frame on the wire may carry a bad wildcard; the meter model must see it to ignore it.
    assert normalize_address("12AA56789012") == "12AA56789012"
