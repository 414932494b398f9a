"""The data-identifier tables (protocols/dlt645/data/di_2007.toml, di_1997.toml).

* every DI that shared/reference/dlt645.md names in §3 (2007) and §7.3 (1997) is present
  (the lists below are written from the reference, not generated from the tables), and every
  DI, DI range, DI pattern (``1D0001nn``) and event class (``033001``) found in the text of §3
  (a copy in tests/data/dlt645_section3.md) is in the 2007 table;
* per-row expectations from the reference: format, size, unit, sign and access;
* a property test over every distinct value format of both tables: valid raw bytes (built by
  encoding generated values) satisfy decode(encode(decode(raw))) == decode(raw);
* spot checks with hand-computed bytes.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.dlt645.control import Edition
from protocols.dlt645.describe import dumps, jsonable
from protocols.dlt645.errors import ValueFormatError
from protocols.dlt645.formats import (
    BAUD_RATES,
    METER_TZ,
    Ascii,
    Baud,
    Bits,
    DateTime,
    Digits,
    Groups,
    Hex,
    ListOf,
    Number,
    Opaque,
    PartialTime,
    Record,
    StatusWord,
    TouEntry,
    ValueFormat,
)
from protocols.dlt645.read import decode_read_reply
from protocols.dlt645.table import DI_1997, DI_2007, DataItem, _item_format, _param_class, table_for
from protocols.dlt645.values import parse_value

# --- every DI named in the reference -----------------------------------------------------------

# dlt645.md §3.2 (energy), table rows and prose (DI2 classes 00..0A, DI1 = FF blocks, DI0 = 01..0C).
REFERENCE_32 = [
    "00000000",
    "00010000",
    "00010100",
    "00010200",
    "00010300",
    "00010400",
    "0001FF00",
    "00020000",
    "0002FF00",
    "00030000",
    "00040000",
    "00050000",
    "00060000",
    "00070000",
    "00080000",
    "00090000",
    "000A0000",
    "0000FF00",
    "0003FF00",
    "0004FF00",
    "0005FF00",
    "0006FF00",
    "0007FF00",
    "0008FF00",
    "0009FF00",
    "000AFF00",
    "0001FF01",
    "0001FF02",
    "0001FF03",
    "0001FF04",
    "0001FF05",
    "0001FF06",
    "0001FF07",
    "0001FF08",
    "0001FF09",
    "0001FF0A",
    "0001FF0B",
    "0001FF0C",
    "00010001",
    "00010002",
    "0002FF01",  # §7.3 map: 9410 -> 00010001, 9810 -> 00010002
    "000B0000",
    "000B0001",
    "000C0000",
    "000C0001",
    "000D0000",
    "000D0001",
    "000D0002",
    "000D0003",
    "000D0004",
    "000D0005",
    "000D0006",
    "0000FE01",
    "0000FE02",
    "0000FE03",
    "0000FE04",
    "0000FE05",
    "0000FE06",
    "0000FE07",
    "0000FE08",
    "0000FE09",
    "0000FE0A",
    "0000FE0B",
    "0000FE0C",
]
# §3.3 (instantaneous values)
REFERENCE_33 = [
    "02010100",
    "02010200",
    "02010300",
    "0201FF00",
    "02020100",
    "02020200",
    "02020300",
    "0202FF00",
    "02030000",
    "02030100",
    "02030200",
    "02030300",
    "02040000",
    "02040100",
    "02040200",
    "02040300",
    "02050000",
    "02050100",
    "02050200",
    "02050300",
    "02060000",
    "02060100",
    "02060200",
    "02060300",
    "02070100",
    "02070200",
    "02070300",
    "02800001",
    "02800002",
    "02800004",
    "02800005",
    "02800006",
    "02800007",
    "02800008",
    "02800009",
    "0280000A",
    "0280000B",
    "02800020",
]
# §3.4 (parameters, prepaid parameters, prices, ladder tables)
REFERENCE_34 = [
    "04000101",
    "04000102",
    "04000103",
    "04000104",
    "04000106",
    "04000107",
    "04000108",
    "04000109",
    "04000201",
    "04000202",
    "04000203",
    "04000204",
    "04000205",
    "04000206",
    "04000207",
    "04000208",
    "04000306",
    "04000307",
    "04000401",
    "04000402",
    "04000403",
    "0400040E",
    "04000501",
    "04000502",
    "04000503",
    "04000504",
    "04000505",
    "04000506",
    "04000507",
    "040005FF",
    "04000508",
    "04000701",
    "04000702",
    "04000703",
    "04000704",
    "04000705",
    "04000B01",
    "04000B02",
    "04000B03",
    "04000C01",
    "04000C02",
    "04000C03",
    "04000C04",
    "04000C05",
    "04000C06",
    "04000C07",
    "04000C08",
    "04000C09",
    "04000C0A",
    "04000F01",
    "04000F02",
    "04000F03",
    "04000F04",
    "04001001",
    "04001002",
    "04001003",
    "04001004",
    "04001005",
    "04001006",
    "04001401",
    "04001402",
    "04001403",
    "04001404",
    "04001405",
    "04050101",
    "04050102",
    "04050103",
    "04050104",
    "040501FF",
    "04050201",
    "04050202",
    "04050203",
    "04050204",
    "040502FF",
    "040604FF",
    "040605FF",
    "04060AFF",
    "04060BFF",
    "04000409",  # §7.3 map: C030 -> 04000409
]
# §3.5 (prepaid registers)
REFERENCE_35 = ["00900100", "00900101", "00900200", "00900201"]
# §3.6 (frozen data): daily 1..62, hourly 1..254, timed 1..60, instantaneous 1..3, switches 1..2
REFERENCE_36 = [
    "05060001",
    "05060101",
    "05060201",
    "0506003E",
    "0506013E",
    "0506023E",
    "05040001",
    "05040101",
    "05040201",
    "050400FE",
    "050401FE",
    "050402FE",
    "05000001",
    "0500003C",
    "05000101",
    "05010001",
    "05010003",
    "05010103",
    "05020001",
    "05020002",
    "05030002",
    "05050002",
    "05070001",
    "05070102",
    # DI1 = FF: the whole record of each freeze type
    "0500FF01",
    "0500FF3C",
    "0501FF01",
    "0501FF03",
    "0502FF02",
    "0503FF02",
    "0504FF01",
    "0504FFFE",
    "0505FF02",
    "0506FF01",
    "0506FF3E",
    "0507FF01",
]
# §3.7 (trip / close records, purchase records; 033000 programming: count and records 1..10)
REFERENCE_37 = [
    "03300000",
    "03300001",
    "0330000A",
    "1D000001",
    "1D00FF01",
    "1D00FF02",
    "1D00FF03",
    "1D00FF04",
    "1D00FF05",
    "1D00FF06",
    "1D00FF07",
    "1D00FF08",
    "1D00FF09",
    "1D00FF0A",
    "1D000101",
    "1D000201",
    "1D000301",
    "1D000401",
    "1D000501",
    "1D000601",
    "1D000701",
    "1D000801",
    "1D00010A",
    "1D00080A",
    "1E000001",
    "1E00FF01",
    "1E00FF0A",
    "1E000101",
    "1E000201",
    "1E000301",
    "1E000401",
    "1E000501",
    "1E000601",
    "1E000701",
    "1E000801",
    "1E00080A",
    "03330101",
    "03330201",
    "03330301",
    "03330401",
    "03330501",
    "03330601",
    "0333010A",
    "0333060A",
    "0333FF01",
    "0333FF0A",
    "03320101",
    "03320201",
    "03320301",
    "03320401",
    "03320501",
    "03320601",
    "0332FF01",
    "0332FF0A",
    # "Other 0330xxxx records" (033001 meter clear ... 033013 abnormal card insertion): the count
    # (DI0 = 00) and the last 1st / 10th record; key updates keep 2 (FW-B); refunds 033400nn.
    "03300100",
    "03300101",
    "0330010A",
    "03300200",
    "03300201",
    "03300300",
    "03300301",
    "03300400",
    "03300401",
    "03300500",
    "03300501",
    "03300600",
    "03300601",
    "03300700",
    "03300701",
    "03300C00",
    "03300C01",
    "03300D00",
    "03300D01",
    "03300F00",
    "03300F01",
    "03300F0A",
    "03301000",
    "03301001",
    "0330100A",
    "03301200",
    "03301201",
    "03301202",
    "03301300",
    "03301301",
    "0330130A",
    "03340001",
    "0334000A",
]
# dlt645.md §7.3 (1997), table rows and the systematic 9xxx / Axxx ranges
REFERENCE_73 = [
    "9010",
    "9011",
    "9012",
    "9013",
    "9014",
    "901F",
    "9020",
    "902F",
    "9110",
    "9410",
    "941F",
    "9810",
    "B611",
    "B612",
    "B613",
    "B621",
    "B622",
    "B623",
    "B630",
    "B631",
    "B632",
    "B633",
    "B640",
    "B641",
    "B642",
    "B643",
    "B650",
    "B651",
    "B652",
    "B653",
    "C010",
    "C011",
    "C030",
    "C032",
    "C033",
    "C117",
    "C111",
    "C112",
    "9130",
    "9120",
    "9140",
    "9150",
    "9160",
    "911F",
    "916F",
    "9510",
    "9910",
    "9824",
    "A010",
    "A011",
    "A01F",
    "A020",
    "A110",
    "A410",
    "A810",
    "A96F",
]


@pytest.mark.parametrize(
    "code", REFERENCE_32 + REFERENCE_33 + REFERENCE_34 + REFERENCE_35 + REFERENCE_36 + REFERENCE_37
)
def test_reference_2007_di_present(code: str) -> None:
    item = DI_2007.get(int(code, 16))
    assert item is not None, f"{code} (dlt645.md §3) is missing"
    assert item.code == code and item.edition is Edition.V2007


# --- every DI the text of §3 names, extracted from the text ---------------------------------------

SECTION_3 = Path(__file__).parent / "data" / "dlt645_section3.md"
"""A verbatim copy of dlt645.md §3 (the reference is outside this repository)."""
REFERENCE_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "dlt645.md",  # beside the project
    Path("/work/shared/reference/dlt645.md"),  # the workplace's copy, for a clone elsewhere
)
REFERENCE_MD = next((p for p in REFERENCE_CANDIDATES if p.exists()), REFERENCE_CANDIDATES[0])

_L, _R = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"
_DI = re.compile(_L + r"[0-9A-F]{8}" + _R)  # 00900200
_PATTERN = re.compile(_L + r"(?=[0-9A-F]*[xn])[0-9A-Fxn]{8}" + _R)  # 1D0001nn, 03340xxx
_CLASS = re.compile(_L + r"[0-9A-F]{6}" + _R)  # 033001: DI3 DI2 DI1 of an event class (§3.7)
# 04001001–04001005, 00010100 … 00010400, 02800004..06 (the tail replaces the last digits)
_RANGE = re.compile(_L + r"([0-9A-F]{8})\s*(?:\.\.|…|–)\s*([0-9A-F]{2,8})" + _R)
_SLASHES = re.compile(_L + r"([0-9A-F]{8})((?:/[0-9A-F]{2,4})+)" + _R)  # 02010100/0200/0300


def _section_3() -> str:
    text = SECTION_3.read_text(encoding="utf-8")
    return text[text.index("## 3. Data identifiers") :]


def _complete(first: str, tail: str) -> str:
    return first[: 8 - len(tail)] + tail


def _span(first: str, last: str) -> list[str]:
    """The DIs from ``first`` to ``last`` when they differ in one byte (else just the two)."""
    bytes_differ = [k for k in range(4) if first[2 * k : 2 * k + 2] != last[2 * k : 2 * k + 2]]
    if len(bytes_differ) != 1:
        return [first, last]
    k = bytes_differ[0]
    lo, hi = int(first[2 * k : 2 * k + 2], 16), int(last[2 * k : 2 * k + 2], 16)
    return [f"{first[: 2 * k]}{v:02X}{first[2 * k + 2 :]}" for v in range(lo, hi + 1)]


def section_3_dis(text: str) -> set[str]:
    """Every 8-hex-digit DI in ``text``, with the ranges and slash lists expanded."""
    found = set(_DI.findall(text))
    for first, tail in _RANGE.findall(text):
        found.update(_span(first, _complete(first, tail)))
    for first, tails in _SLASHES.findall(text):
        found.update(_complete(first, t) for t in tails.split("/")[1:])
    return found


def test_extraction_finds_what_the_text_says() -> None:
    """The extraction itself (so that an empty result cannot pass the tests below)."""
    sample = "`00900200`, 04001001–04001003, 02800004..06, 02010100/0200, 1D0001nn, 033001 meter clear"
    assert section_3_dis(sample) == {
        "00900200",
        "04001001",
        "04001002",
        "04001003",
        "02800004",
        "02800005",
        "02800006",
        "02010100",
        "02010200",
    }
    assert _PATTERN.findall(sample) == ["1D0001nn"] and _CLASS.findall(sample) == ["033001"]
    text = _section_3()
    assert len(section_3_dis(text)) > 140 and "033013" in _CLASS.findall(text)
    assert {"03340xxx", "1D0001nn", "0333FFnn"} <= set(_PATTERN.findall(text))


@pytest.mark.parametrize("code", sorted(section_3_dis(_section_3())))
def test_every_di_in_the_text_of_section_3_is_in_the_table(code: str) -> None:
    assert int(code, 16) in DI_2007, f"{code} (named in dlt645.md §3) is missing"


@pytest.mark.parametrize("pattern", sorted(set(_PATTERN.findall(_section_3()))))
def test_every_di_pattern_of_section_3_has_entries(pattern: str) -> None:
    """``1D0001nn``, ``040501xx``, ``03340xxx``: x and n stand for any hex digit."""
    regex = re.compile(pattern.replace("x", "[0-9A-F]").replace("n", "[0-9A-F]"))
    assert any(regex.fullmatch(item.code) for item in DI_2007), f"no DI of the form {pattern} (dlt645.md §3)"


@pytest.mark.parametrize("prefix", sorted(set(_CLASS.findall(_section_3()))))
def test_every_event_class_of_section_3_has_a_count_and_records(prefix: str) -> None:
    """§3.7's ``033000 programming, 033001 meter clear, ...``: 0330ee00 the count, 0330ee01.. records."""
    count, last = DI_2007.get(int(prefix + "00", 16)), DI_2007.get(int(prefix + "01", 16))
    assert count is not None and count.format.spec == "XXXXXX", f"{prefix}00 (count) is missing"
    assert last is not None and "record" in last.name.lower(), f"{prefix}01 (last record) is missing"


@pytest.mark.allow_skip  # the reference lies outside the repository: a clone elsewhere may not have it
def test_the_copy_of_section_3_is_the_reference() -> None:
    """tests/data/dlt645_section3.md is §3 of the reference as it is now (where it is at hand)."""
    if not REFERENCE_MD.exists():
        pytest.skip(f"{REFERENCE_MD} is not on this machine")
    reference = REFERENCE_MD.read_text(encoding="utf-8")
    section = reference[reference.index("## 3. Data identifiers") : reference.index("## 4. ")]
    assert section.rstrip("-\n") == _section_3().rstrip("-\n"), "dlt645.md §3 changed: refresh the copy"


@pytest.mark.parametrize("code", REFERENCE_73)
def test_reference_1997_di_present(code: str) -> None:
    item = DI_1997.get(int(code, 16))
    assert item is not None, f"{code} (dlt645.md §7.3) is missing"
    assert item.code == code and item.edition is Edition.V1997


def test_editions_do_not_mix() -> None:
    assert all(item.di <= 0xFFFFFFFF and len(item.code) == 8 for item in DI_2007)
    assert all(item.di <= 0xFFFF and len(item.code) == 4 for item in DI_1997)
    assert 0x9010 not in DI_2007 and 0x00010000 not in DI_1997
    assert table_for(Edition.V2007) is DI_2007 and table_for(Edition.V1997) is DI_1997


# --- per-row expectations from the reference ---------------------------------------------------

# code: (format spec, size in bytes or None, unit, signed, access)
EXPECTED = {
    # §3.2
    "00000000": ("XXXXXX.XX", 4, "kWh", True, "r"),
    "00010000": ("XXXXXX.XX", 4, "kWh", False, "r"),
    "00020000": ("XXXXXX.XX", 4, "kWh", False, "r"),
    "00030000": ("XXXXXX.XX", 4, "kvarh", True, "r"),
    "00040000": ("XXXXXX.XX", 4, "kvarh", True, "r"),
    "00050000": ("XXXXXX.XX", 4, "kvarh", False, "r"),
    "00080000": ("XXXXXX.XX", 4, "kvarh", False, "r"),
    "00090000": ("XXXXXX.XX", 4, "kVAh", False, "r"),
    "000A0000": ("XXXXXX.XX", 4, "kVAh", False, "r"),
    "0001FF00": ("XXXXXX.XX*n", None, "kWh", False, "r"),
    "0000FF0C": ("XXXXXX.XX*n", None, "kWh", True, "r"),
    "000B0000": ("XXXXXX.XX", 4, "kWh", True, "r"),
    "000C0001": ("XXXXXX.XX", 4, "kWh", True, "r"),
    "0000FE01": ("YYMMDDhh", 4, None, False, "r"),
    # §3.3
    "02010100": ("XXX.X", 2, "V", False, "r"),
    "02020100": ("XXX.XXX", 3, "A", True, "r"),
    "0202FF00": ("XXX.XXX*n", None, "A", True, "r"),
    "02030000": ("XX.XXXX", 3, "kW", True, "r"),
    "02040100": ("XX.XXXX", 3, "kvar", True, "r"),
    "02050000": ("XX.XXXX", 3, "kVA", False, "r"),
    "02060000": ("X.XXX", 2, None, True, "r"),
    "02070100": ("XXX.X", 2, "°", False, "r"),
    "02800001": ("XXX.XXX", 3, "A", False, "r"),
    "02800002": ("XX.XX", 2, "Hz", False, "r"),
    "02800004": ("XX.XXXX", 3, "kW", False, "r"),
    "02800005": ("XX.XXXX", 3, "kvar", False, "r"),
    "02800006": ("XX.XXXX", 3, "kVA", False, "r"),
    "02800007": ("XXX.X", 2, "°C", True, "r"),
    "02800008": ("XX.XX", 2, "V", False, "r"),
    "0280000A": ("XXXXXXXX", 4, "min", False, "r"),
    "0280000B": ("XXXX.XXXX", 4, "yuan/kWh", False, "r"),
    "02800020": ("XXXX.XXXX", 4, "yuan/kWh", False, "r"),
    # §3.4
    "04000101": ("YYMMDDWW", 4, None, False, "rw"),
    "04000102": ("hhmmss", 3, None, False, "rw"),
    "04000103": ("NN", 1, "min", False, "rw"),
    "04000106": ("YYMMDDhhmm", 5, None, False, "rw"),
    "04000109": ("YYMMDDhhmm", 5, None, False, "rw"),
    "04000204": ("NN", 1, None, False, "rw"),
    "04000207": ("NN", 1, None, False, "rw"),
    "04000306": ("NNNNNN", 3, None, False, "rw"),
    "04000401": ("BCD12", 6, None, False, "rw"),
    "04000402": ("BCD12", 6, None, False, "rw"),
    "04000403": ("ASCII32", 32, None, False, "rw"),
    "0400040E": ("BCD12", 6, None, False, "rw"),
    "04000501": ("BITS16:running_status_1", 2, None, False, "r"),
    "04000503": ("BITS16:running_status_3", 2, None, False, "r"),
    "04000508": ("HEX4", 4, None, False, "r"),
    "04000703": ("BAUD", 1, None, False, "rw"),
    "04000B01": ("DDhh", 2, None, False, "rw"),
    "04000C01": ("HEX4", 4, None, False, "w"),
    "04000C0A": ("HEX4", 4, None, False, "w"),
    "04000F01": ("XXXXXX.XX", 4, "kWh", False, "rw"),
    "04000F04": ("XXXXXX.XX", 4, "kWh", False, "rw"),
    "04001001": ("XXXXXX.XX", 4, "yuan", False, "rw"),
    "04001005": ("XXXXXX.XX", 4, "yuan", False, "rw"),
    "04001006": ("XXXXXX.XX", 4, "yuan", False, "w"),
    "04001401": ("NNNN", 2, "min", False, "rw"),
    "04001402": ("XXX.XXX", 3, "A", False, "rw"),
    "04001403": ("XXXX", 2, "min", False, "rw"),
    "04001404": ("NN", 1, "min", False, "rw"),
    "04001405": ("NN", 1, "min", False, "rw"),
    "04050101": ("XXXX.XXXX", 4, "yuan/kWh", False, "r"),
    "040501FF": ("XXXX.XXXX*n", None, "yuan/kWh", False, "r"),
    "040502FF": ("XXXX.XXXX*n", None, "yuan/kWh", False, "rw"),
    # §3.5
    "00900100": ("XXXXXX.XX", 4, "kWh", False, "r"),
    "00900101": ("XXXXXX.XX", 4, "kWh", False, "r"),
    "00900200": ("XXXXXX.XX", 4, "yuan", False, "r"),
    "00900201": ("XXXXXX.XX", 4, "yuan", False, "r"),
    # §3.6
    "05060001": ("YYMMDDhhmm", 5, None, False, "r"),
    "05060101": ("XXXXXX.XX*n", None, "kWh", False, "r"),
    "050401FE": ("XXXXXX.XX", 4, "kWh", False, "r"),
    # §3.7
    "1D000001": ("XXXXXX", 3, None, False, "r"),
    "1D000101": ("YYMMDDhhmmss", 6, None, False, "r"),
    "1D000201": ("HEX4", 4, None, False, "r"),
    "1E000301": ("XXXXXX.XX", 4, "kWh", False, "r"),
    "1E000801": ("XXXXXX.XX", 4, "kvarh", False, "r"),
    "03330101": ("YYMMDDhhmm", 5, None, False, "r"),
    "03330201": ("XXXX", 2, None, False, "r"),
    "03330301": ("XXXXXX.XX", 4, "yuan", False, "r"),
    "03330601": ("XXXXXX.XX", 4, "yuan", False, "r"),
    "03320601": ("XXXXXX.XX", 4, "kWh", False, "r"),
}

EXPECTED_1997 = {
    "9010": ("XXXXXX.XX", 4, "kWh", False, "r"),
    "901F": ("XXXXXX.XX*n", None, "kWh", False, "r"),
    "9110": ("XXXXXX.XX", 4, "kvarh", False, "r"),
    "A010": ("XX.XXXX", 3, "kW", False, "r"),
    "B611": ("XXX", 2, "V", False, "r"),
    "B621": ("XX.XX", 2, "A", False, "r"),
    "B630": ("XX.XXXX", 3, "kW", False, "r"),
    "B640": ("XX.XX", 2, "kvar", False, "r"),
    "B650": ("X.XXX", 2, None, False, "r"),
    "C010": ("YYMMDDWW", 4, None, False, "rw"),
    "C011": ("hhmmss", 3, None, False, "rw"),
    "C030": ("XXXXXX", 3, "imp/kWh", False, "rw"),
    "C032": ("BCD12", 6, None, False, "rw"),
    "C033": ("BCD12", 6, None, False, "rw"),
    "C117": ("DDhh", 2, None, False, "rw"),
    "C111": ("NN", 1, "min", False, "rw"),
}


@pytest.mark.parametrize(
    ("table", "code", "expected"),
    [(DI_2007, c, e) for c, e in EXPECTED.items()] + [(DI_1997, c, e) for c, e in EXPECTED_1997.items()],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_reference_rows(table: Any, code: str, expected: tuple[Any, ...]) -> None:
    item = table.lookup(int(code, 16))
    spec, size, unit, signed, access = expected
    assert (item.format.spec, item.size, item.unit, item.signed, item.access) == (spec, size, unit, signed, access)


def test_record_layouts() -> None:
    """The records of §3.4 / §3.7 with their byte counts."""
    sizes = {
        "040604FF": 64,
        "040605FF": 64,  # 6 x 4 + 7 x 4 + 4 x 3
        "04060AFF": 70,
        "04060BFF": 70,  # FW-B: 6 x 4 + 7 x 4 + 6 x 3
        "1D00FF01": 34,
        "1E00FF0A": 34,  # 6 + 4 + 4 + 4 + 4 x 4
        "0333FF01": 23,
        "0332FF0A": 23,  # 5 + 2 + 4 x 4
        "03300001": 50,
        "0330000A": 50,  # 6 + 4 + 10 x 4 (2007 programming record, PY-645)
        "040005FF": 14,  # 7 status words
        "000D0000": 8,  # time stamp + value
    }
    for code, size in sizes.items():
        item = DI_2007.lookup(int(code, 16))
        assert isinstance(item.format, Record), code
        assert item.size == size, code
    ladder = DI_2007.lookup(0x040605FF).format
    assert isinstance(ladder, Record)
    assert [(n, f.spec) for n, f in ladder.fields] == [
        ("thresholds", "XXXXXX.XX*6"),
        ("prices", "XXXX.XXXX*7"),
        ("settlement_dates", "MMDDhh*4"),
    ]
    purchase = DI_2007.lookup(0x0333FF01).format
    assert isinstance(purchase, Record)
    assert [f.size for _, f in purchase.fields] == [5, 2, 4, 4, 4, 4]  # FW-B Tab_Buy


UNITS = {
    None,
    "kWh",
    "kvarh",
    "kVAh",
    "V",
    "A",
    "kW",
    "kvar",
    "kVA",
    "Hz",
    "°C",
    "°",
    "min",
    "yuan",
    "yuan/kWh",
    "imp/kWh",
    "imp/kvarh",
}
_CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.mark.parametrize("table", [DI_2007, DI_1997], ids=["2007", "1997"])
def test_every_item_is_described(table: Any) -> None:
    names: set[str] = set()
    names_zh: set[str] = set()
    for item in table:
        assert item.name and item.name_zh and _CJK.search(item.name_zh), item.code
        assert item.access in {"r", "w", "rw"}, item.code
        assert item.unit in UNITS, (item.code, item.unit)
        assert item.name not in names, f"{item.code}: name {item.name!r} is used twice"
        assert item.name_zh not in names_zh, f"{item.code}: name {item.name_zh!r} is used twice"
        names.add(item.name)
        names_zh.add(item.name_zh)
        if item.block:
            assert isinstance(item.format, (ListOf, Record, Groups)), item.code


def test_access_and_sign_rules() -> None:
    for item in DI_2007:
        di3, di2 = item.di >> 24, (item.di >> 16) & 0xFF
        if item.di >> 8 == 0x04000C:  # passwords
            assert item.access == "w", item.code
        if di3 in (0x00, 0x02, 0x03, 0x05, 0x1D, 0x1E):  # measurements, records, freezes
            assert item.access == "r", item.code
        if item.di >> 8 == 0x0000FE:  # settlement time stamps, not energy
            continue
        if di3 == 0x00 and di2 in (0x00, 0x03, 0x04):  # combined active / combined reactive
            assert item.signed, item.code
        if di3 == 0x00 and di2 in (0x01, 0x02, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x90):
            assert not item.signed, item.code
    assert not any(item.signed for item in DI_1997)  # §7.3 marks nothing signed
    assert len(DI_2007) < 50_000 and len(DI_1997) < 5_000  # keep the load fast


# --- property test: every format round-trips ---------------------------------------------------


def signature(fmt: ValueFormat) -> tuple[Any, ...]:
    """What makes two formats behave alike (the table shares one object per TOML entry)."""
    if isinstance(fmt, Number):
        return ("number", fmt.spec, fmt.signed)
    if isinstance(fmt, ListOf):
        return ("list", signature(fmt.item), fmt.count, fmt.limit)
    if isinstance(fmt, Record):
        return ("record", tuple((name, signature(f)) for name, f in fmt.fields))
    if isinstance(fmt, Bits):
        return ("bits", fmt.spec, fmt.layout)
    if isinstance(fmt, Groups):
        return ("groups", tuple((name, signature(f)) for name, f in fmt.groups))
    return (type(fmt).__name__, fmt.spec)


def distinct_formats() -> list[tuple[str, ValueFormat]]:
    seen: dict[tuple[Any, ...], tuple[str, ValueFormat]] = {}
    for table in (DI_2007, DI_1997):
        for item in table:
            seen.setdefault(signature(item.format), (item.code, item.format))
    return sorted(seen.values(), key=lambda p: (len(p[0]), p[0]))


FORMATS = distinct_formats()

_TIMES = {"YYMMDDhhmmss", "YYMMDDhhmm", "YYMMDDhh"}
_DATES = {"YYMMDD", "YYMMDDWW"}
_CLOCKS = {"hhmmss", "hhmm"}
_PARTIAL_RANGES = {"MM": (1, 12), "DD": (1, 31), "hh": (0, 23), "mm": (0, 59)}
_PARTIAL_ATTRS = {"MM": "month", "DD": "day", "hh": "hour", "mm": "minute"}


def number_values(fmt: Number) -> st.SearchStrategy[Any]:
    count = len(fmt.spec.replace(".", ""))
    top = 8 * 10 ** (count - 1) - 1 if fmt.signed else 10**count - 1
    units = st.integers(-top if fmt.signed else 0, top)
    if fmt.decimals:
        return units.map(lambda u: Decimal(u).scaleb(-fmt.decimals))
    return units


def datetime_values(fmt: DateTime) -> st.SearchStrategy[Any]:
    if fmt.spec in _TIMES:
        values: st.SearchStrategy[Any] = st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31, 23, 59, 59), timezones=st.just(METER_TZ)
        )
    elif fmt.spec in _DATES:
        values = st.dates(min_value=date(2000, 1, 1), max_value=date(2099, 12, 31))
    elif fmt.spec in _CLOCKS:
        return st.times()
    else:  # year-less: a PartialTime, each field in range or 99 ("not set")
        fields = [fmt.spec[i : i + 2] for i in range(0, len(fmt.spec), 2)]
        parts = {_PARTIAL_ATTRS[f]: st.one_of(st.integers(*_PARTIAL_RANGES[f]), st.just(99)) for f in fields}
        values = st.fixed_dictionaries(parts).map(lambda kw: PartialTime(**kw))
    return st.one_of(st.none(), values)


def values_of(fmt: ValueFormat) -> st.SearchStrategy[Any]:
    """Valid values of ``fmt``; encoding them gives valid raw bytes."""
    if isinstance(fmt, Number):
        return number_values(fmt)
    if isinstance(fmt, DateTime):
        return datetime_values(fmt)
    if isinstance(fmt, Hex):
        return st.binary(min_size=fmt.size or 0, max_size=fmt.size or 0).map(lambda b: b.hex().upper())
    if isinstance(fmt, Digits):
        return st.text("0123456789", min_size=1, max_size=2 * (fmt.size or 0))
    if isinstance(fmt, Ascii):
        return st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=fmt.size or 0)
    if isinstance(fmt, Baud):
        return st.sampled_from(sorted(BAUD_RATES.values()))
    if isinstance(fmt, Bits):
        return st.integers(0, (1 << (8 * (fmt.size or 0))) - 1)
    if isinstance(fmt, TouEntry):
        return tou_entries(fmt)
    if isinstance(fmt, ListOf):
        if fmt.count is None:
            return st.lists(values_of(fmt.item), min_size=0, max_size=fmt.limit or 6)
        return st.lists(values_of(fmt.item), min_size=fmt.count, max_size=fmt.count)
    if isinstance(fmt, Record):
        return st.fixed_dictionaries({name: values_of(f) for name, f in fmt.fields})
    if isinstance(fmt, Opaque):
        return st.binary(max_size=40).map(lambda b: b.hex().upper())
    if isinstance(fmt, Groups):
        return group_values(fmt, values_of)
    raise AssertionError(f"no value strategy for {fmt!r}")


def group_values(fmt: Groups, of: Any) -> st.SearchStrategy[Any]:
    """Whole freeze records: any subset of the groups (the others sent empty), each with a value
    that has bytes and no AA in them (a non-empty block, opaque bytes without AA)."""

    def one(f: ValueFormat) -> st.SearchStrategy[Any]:
        if isinstance(f, Opaque):
            return st.binary(min_size=1, max_size=16).filter(lambda b: 0xAA not in b).map(lambda b: b.hex().upper())
        if isinstance(f, ListOf) and f.count is None:
            return st.lists(of(f.item), min_size=1, max_size=6)
        return of(f)

    return st.fixed_dictionaries({}, optional={name: one(f) for name, f in fmt.groups})


def tou_entries(fmt: TouEntry) -> st.SearchStrategy[Any]:
    """MMDDNN: a date of a leap year and a day table 1..8; hhmmNN: a time and a tariff 1..63; or
    None (an unused, all-zero entry)."""
    if fmt.spec == "MMDDNN":
        entry = st.builds(
            lambda d, n: {"month": d.month, "day": d.day, "table": n},
            st.dates(date(2000, 1, 1), date(2000, 12, 31)),
            st.integers(1, 8),
        )
    else:
        entry = st.fixed_dictionaries(
            {"hour": st.integers(0, 23), "minute": st.integers(0, 59), "tariff": st.integers(1, 63)}
        )
    return st.one_of(st.none(), entry)


def test_every_item_has_a_tested_format() -> None:
    tested = {signature(fmt) for _, fmt in FORMATS}
    for table in (DI_2007, DI_1997):
        assert all(signature(item.format) in tested for item in table)
    assert any(isinstance(fmt, Record) for _, fmt in FORMATS) and any(isinstance(fmt, ListOf) for _, fmt in FORMATS)


@pytest.mark.parametrize(("code", "fmt"), FORMATS, ids=[f"{c}:{f.spec}"[:60] for c, f in FORMATS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(code: str, fmt: ValueFormat, data: st.DataObject) -> None:
    raw = fmt.encode(data.draw(values_of(fmt), label="value"))
    if fmt.size is not None:
        assert len(raw) == fmt.size
    decoded = fmt.decode(raw)
    again = fmt.encode(decoded)
    assert fmt.decode(again) == decoded
    if not isinstance(fmt, Ascii) and not (isinstance(fmt, Record) and _has_ascii(fmt)):
        assert again == raw  # canonical: one value, one encoding (ASCII drops edge spaces)


def _has_ascii(fmt: Record) -> bool:
    return any(isinstance(f, Ascii) for _, f in fmt.fields)


# parse(build(x)) == x: typed values in the canonical form decode gives back, built and parsed.

_RESOLUTION = {"YYMMDDhhmmss": {}, "YYMMDDhhmm": {"second": 0}, "YYMMDDhh": {"minute": 0, "second": 0}}


def typed_values(fmt: ValueFormat) -> st.SearchStrategy[Any]:
    """Values exactly as ``fmt.decode`` returns them (status words as their raw int)."""
    if isinstance(fmt, DateTime):
        if fmt.spec in _TIMES:
            cut = _RESOLUTION[fmt.spec]
            return st.one_of(
                st.none(),
                st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31, 23, 59, 59), timezones=st.just(METER_TZ)).map(
                    lambda d: d.replace(microsecond=0, **cut)
                ),
            )
        if fmt.spec in _CLOCKS:  # no None: all zeros is midnight
            return st.times().map(lambda t: t.replace(microsecond=0, **({"second": 0} if fmt.spec == "hhmm" else {})))
        return datetime_values(fmt)
    if isinstance(fmt, Digits):
        n = 2 * (fmt.size or 0)
        return st.text("0123456789", min_size=n, max_size=n)
    if isinstance(fmt, Ascii):
        printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
        return st.text(printable, max_size=fmt.size or 0).map(lambda t: t.strip(" "))
    if isinstance(fmt, ListOf):
        size = (0, fmt.limit or 6) if fmt.count is None else (fmt.count, fmt.count)
        return st.lists(typed_values(fmt.item), min_size=size[0], max_size=size[1])
    if isinstance(fmt, Record):
        return st.fixed_dictionaries({name: typed_values(f) for name, f in fmt.fields})
    if isinstance(fmt, Groups):
        return group_values(fmt, typed_values)
    return values_of(fmt)  # numbers, hex, opaque bytes, baud and status-word ints are canonical already


def same(decoded: Any, value: Any) -> bool:
    """``decoded`` is ``value``: equal and of the same type (a status word: its raw value)."""
    if isinstance(decoded, StatusWord):
        return decoded.raw == value
    if isinstance(decoded, list):
        return isinstance(value, list) and len(decoded) == len(value) and all(map(same, decoded, value))
    if isinstance(decoded, dict):
        keys = decoded.keys() == getattr(value, "keys", dict)()
        return keys and all(same(decoded[k], value[k]) for k in decoded)
    return type(decoded) is type(value) and decoded == value


@pytest.mark.parametrize(("code", "fmt"), FORMATS, ids=[f"{c}:{f.spec}"[:60] for c, f in FORMATS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parse_of_build_is_identity(code: str, fmt: ValueFormat, data: st.DataObject) -> None:
    value = data.draw(typed_values(fmt), label="value")
    decoded = fmt.decode(fmt.encode(value))
    assert same(decoded, value), (decoded, value)


def test_same_can_fail() -> None:
    assert not same(Decimal("1.00"), 1) and not same([1], [2]) and not same({"a": 1}, {"b": 1})
    assert not same(StatusWord(3, {}), 4) and same(StatusWord(3, {}), 3)


@pytest.mark.parametrize(("code", "fmt"), FORMATS, ids=[f"{c}:{f.spec}"[:60] for c, f in FORMATS])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_output_parses_back(code: str, fmt: ValueFormat, data: st.DataObject) -> None:
    """What ``meterlink decode`` prints as ``value`` is a valid VALUE for ``encode write``."""
    raw = fmt.encode(data.draw(typed_values(fmt), label="value"))
    printed = dumps(jsonable(fmt.decode(raw)))
    # Strings (hex, digits, ASCII, ISO times) as a user types them; the rest as printed JSON.
    text = json.loads(printed) if printed.startswith('"') else printed
    assert fmt.encode(parse_value(fmt, text)) == raw


# --- spot checks with hand-computed bytes --------------------------------------------------------


def lookup(code: str) -> DataItem:
    return (DI_2007 if len(code) == 8 else DI_1997).lookup(int(code, 16))


def test_balance_bytes() -> None:
    item = lookup("00900200")
    assert item.encode(Decimal("123.45")) == bytes.fromhex("45 23 01 00")
    assert item.decode(bytes.fromhex("45 23 01 00")) == Decimal("123.45")
    assert item.unit == "yuan" and item.name == "Remaining money" and item.name_zh == "剩余金额"


def test_signed_current() -> None:
    item = lookup("02020100")
    assert item.decode(bytes.fromhex("50 12 80")) == Decimal("-1.250")
    assert item.encode(Decimal("-1.250")) == bytes.fromhex("50 12 80")
    assert item.decode(bytes.fromhex("50 12 00")) == Decimal("1.250")
    combined = lookup("00000000")
    assert combined.decode(bytes.fromhex("01 00 00 80")) == Decimal("-0.01")


def test_status_word_3_fields() -> None:
    item = lookup("04000503")
    word = item.decode(bytes.fromhex("90 02"))  # 0x0290 = bits 9, 7, 4
    assert isinstance(word, StatusWord) and word.raw == 0x0290
    assert word["meter_type"] == 2  # bits 9-8 = 10: money-prepaid
    assert word["pre_trip_alarm"] is True  # bit 7
    assert word["relay_open"] is True  # bit 4
    assert word["relay_trip_commanded"] is False  # bit 6
    assert word["supply"] == 0
    assert item.encode({"meter_type": 2, "pre_trip_alarm": True, "relay_open": True}) == bytes.fromhex("90 02")
    block = lookup("040005FF").decode(bytes.fromhex("00 4001 0090 0200 0001 0000 0020 00"))
    assert block["status_1"]["overdraft"] and block["status_3"]["meter_type"] == 2
    assert block["status_2"]["a_active_reverse"] and block["status_5"]["loss_of_voltage"]
    assert block["status_7"]["power_down"]


def test_ladder_table_64_bytes() -> None:
    item = lookup("040605FF")
    value = {
        "thresholds": [Decimal("2880.00"), Decimal("4800.00")] + [Decimal(0)] * 4,
        "prices": [Decimal("0.5000"), Decimal("0.5500"), Decimal("0.8000")] + [Decimal(0)] * 4,
        "settlement_dates": [PartialTime(month=1, day=1, hour=0)] + [PartialTime(month=99, day=99, hour=99)] * 3,
    }
    raw = item.encode(value)
    assert len(raw) == 64
    assert raw[0:4] == bytes.fromhex("00 80 28 00")  # 2880.00 kWh
    assert raw[4:8] == bytes.fromhex("00 00 48 00")  # 4800.00 kWh
    assert raw[8:24] == bytes(16)
    assert raw[24:28] == bytes.fromhex("00 50 00 00")  # 0.5000 yuan/kWh
    assert raw[28:32] == bytes.fromhex("00 55 00 00")
    assert raw[32:36] == bytes.fromhex("00 80 00 00")
    assert raw[52:55] == bytes.fromhex("00 01 01")  # MMDDhh 01 01 00, sent hh DD MM
    assert raw[55:64] == bytes.fromhex("99") * 9  # unused settlement dates
    assert item.decode(raw) == value
    assert lookup("04060AFF").size == 70


# --- time-of-use schedule tables (0401xxxx first set, 0402xxxx second set) ----------------------


def test_time_zone_and_day_tables_are_listed_with_their_access_and_class() -> None:
    """Both sets of 14 zones (MMDDNN) and 8 day tables of 14 periods (hhmmNN); only the second
    (backup) set is writable, as class 2 like its switch times (prepaid.md §2.3)."""
    for first, second in ((0x04010000, 0x04020000), *((0x04010000 + n, 0x04020000 + n) for n in range(1, 9))):
        a, b = DI_2007.lookup(first), DI_2007.lookup(second)
        spec = "MMDDNN*n<=14" if first & 0xFF == 0 else "hhmmNN*n<=14"
        assert (a.format.spec, a.access, a.param_class) == (spec, "r", None), a.code
        assert (b.format.spec, b.access, b.param_class) == (spec, "rw", 2), b.code
    assert DI_2007.get(0x04010009) is None and DI_2007.get(0x04020009) is None  # 8 day tables
    assert lookup("04020003").name == "Second-set daily-period table 3"
    assert lookup("04010001").name_zh == "第一套第1日时段表"


def test_time_zone_table_bytes() -> None:
    item = lookup("04020000")
    zones = [
        {"month": 1, "day": 1, "table": 1},
        {"month": 7, "day": 1, "table": 2},
        {"month": 2, "day": 29, "table": 3},
    ]
    raw = item.encode(zones)
    assert raw == bytes.fromhex("01 01 01  02 01 07  03 29 02")  # MMDDNN sent NN DD MM
    assert item.decode(raw) == zones
    assert item.decode(bytes(3)) == [None]  # an unused entry
    assert item.decode(b"") == []


def test_day_table_bytes() -> None:
    item = lookup("04020001")
    periods = [{"hour": 0, "minute": 0, "tariff": 4}, {"hour": 8, "minute": 30, "tariff": 2}]
    raw = item.encode(periods)
    assert raw == bytes.fromhex("04 00 00  02 30 08")  # hhmmNN sent NN mm hh
    assert item.decode(raw) == periods
    assert len(item.encode(periods * 7)) == 42  # 14 periods


@pytest.mark.parametrize(
    ("code", "value"),
    [
        ("04020000", [{"month": 1, "day": 1, "table": 1}] * 15),  # at most 14 zones
        ("04020000", [{"month": 13, "day": 1, "table": 1}]),
        ("04020000", [{"month": 2, "day": 30, "table": 1}]),  # not a date
        ("04020000", [{"month": 1, "day": 1, "table": 9}]),  # at most 8 day tables
        ("04020000", [{"month": 1, "day": 1, "table": 0}]),
        ("04020000", [{"month": 1, "day": 1}]),
        ("04020000", [{"month": 1, "day": 1, "table": 1, "tariff": 1}]),
        ("04020000", [{"month": 1, "day": True, "table": 1}]),
        ("04020001", [{"hour": 24, "minute": 0, "tariff": 1}]),
        ("04020001", [{"hour": 0, "minute": 60, "tariff": 1}]),
        ("04020001", [{"hour": 0, "minute": 0, "tariff": 0}]),
        ("04020001", [{"hour": 0, "minute": 0, "tariff": 64}]),
        ("04020001", [(0, 0, 1)]),
        ("04020001", {"hour": 0, "minute": 0, "tariff": 1}),  # a table is a list
    ],
)
def test_bad_schedule_entries_do_not_encode(code: str, value: Any) -> None:
    with pytest.raises(ValueFormatError):
        lookup(code).encode(value)


@pytest.mark.parametrize(
    ("code", "raw"),
    [
        ("04020000", bytes.fromhex("01 01 01") * 15),  # 15 zones
        ("04020000", bytes.fromhex("01 01 13")),  # month 13
        ("04020000", bytes.fromhex("01 31 04")),  # 31 April
        ("04020001", bytes.fromhex("00 00 00 01")),  # not whole entries
        ("04020001", bytes.fromhex("01 00 0A")),  # not BCD
    ],
)
def test_bad_schedule_bytes_do_not_decode(code: str, raw: bytes) -> None:
    with pytest.raises(ValueFormatError):
        lookup(code).decode(raw)


def test_a_limit_needs_a_variable_block() -> None:
    entry = TouEntry("MMDDNN")
    with pytest.raises(ValueError):
        ListOf(entry, 3, 14)
    assert ListOf(entry, None, 2).encode([None, None]) == bytes(6)
    with pytest.raises(ValueFormatError):
        ListOf(entry, None, 2).encode([None] * 3)
    with pytest.raises(ValueError):
        _item_format({"format": "NN", "max": 3}, {})


def test_purchase_record_23_bytes() -> None:
    raw = bytes.fromhex(
        "30 10 15 03 24"  # purchase time 2024-03-15 10:30 (YYMMDDhhmm, sent mm hh DD MM YY)
        "07 00"  # purchase count 7
        "00 00 01 00"  # amount 100.00
        "45 23 00 00"  # balance before 23.45
        "45 23 01 00"  # balance after 123.45
        "00 00 10 00"  # cumulative 1000.00
    )
    assert len(raw) == 23
    record = lookup("0333FF01").decode(raw)
    assert record == {
        "time": datetime(2024, 3, 15, 10, 30, tzinfo=METER_TZ),
        "purchase_count": 7,
        "amount": Decimal("100.00"),
        "balance_before": Decimal("23.45"),
        "balance_after": Decimal("123.45"),
        "total_purchased": Decimal("1000.00"),
    }
    assert lookup("0333FF01").encode(record) == raw
    # The same fields one at a time (033301nn .. 033306nn).
    assert lookup("03330201").decode(raw[5:7]) == 7
    assert lookup("03330501").decode(raw[15:19]) == Decimal("123.45")


def test_trip_record_34_bytes() -> None:
    raw = bytes.fromhex("05 04 03 02 01 2478 56 34 1200 01 00 0001 00 00 00") + bytes(16)
    record = lookup("1D00FF01").decode(raw)
    assert record["time"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=METER_TZ)
    assert record["operator"] == "12345678"
    assert record["forward_active"] == Decimal("1.00") and record["reverse_active"] == Decimal("0.01")
    assert record["reactive_q1_q4"] == [Decimal("0.00")] * 4
    assert lookup("1D000201").decode(raw[6:10]) == "12345678"


def test_dates_and_times() -> None:
    assert lookup("04000101").decode(bytes.fromhex("00 15 03 24")) == date(2024, 3, 15)  # WW DD MM YY
    assert lookup("04000101").encode(date(2024, 3, 17)) == bytes.fromhex("00 17 03 24")  # a Sunday: WW = 0
    assert lookup("04000102").decode(bytes.fromhex("56 34 12")) == time(12, 34, 56)
    assert lookup("04000B01").decode(bytes.fromhex("00 01")) == PartialTime(day=1, hour=0)
    assert lookup("04000B02").decode(bytes.fromhex("99 99")) == PartialTime(day=99, hour=99)  # not set
    assert lookup("000D0001").decode(bytes.fromhex("00 01 01 2400 50 12 00")) == {
        "settlement_time": datetime(2024, 1, 1, 0, tzinfo=METER_TZ),
        "consumption": Decimal("1250.00"),
    }
    assert lookup("C117").decode(bytes.fromhex("00 25")) == PartialTime(day=25, hour=0)


def test_address_meter_number_asset_code() -> None:
    assert lookup("04000401").decode(bytes.fromhex("90 78 56 34 12 00")) == "001234567890"
    assert lookup("04000402").encode("123") == bytes.fromhex("23 01 00 00 00 00")
    asset = lookup("04000403")
    assert asset.decode(asset.encode("ABC-123")) == "ABC-123"
    assert len(asset.encode("ABC-123")) == 32
    assert lookup("04000703").decode(b"\x08") == 2400
    assert lookup("04000C03").encode("02123456") == bytes.fromhex("56 34 12 02")


def test_programming_record_50_bytes() -> None:
    """03300001: time, operator code, the first 10 DIs programmed (DI0 first, FFFFFFFF unused)."""
    raw = bytes.fromhex("05 04 03 02 01 24 78 56 34 12 01 10 00 04 FF 02 05 04") + b"\xff" * 32
    record = lookup("03300001").decode(raw)
    assert record["time"] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=METER_TZ)
    assert record["operator"] == "12345678"
    assert record["data_identifiers"] == ["04001001", "040502FF"] + ["FFFFFFFF"] * 8
    assert lookup("03300001").encode(record) == raw
    assert lookup("03300000").format.spec == "XXXXXX"  # the count stays a 3-byte number
    assert lookup("0330000A").name == "Programming record (last 10)"
    assert DI_2007.get(0x0330000B) is None


# §3.7's other event classes: (DI3 DI2 DI1, English name, Chinese name), in the order §3.7 lists them.
EVENT_CLASSES = [
    ("033001", "Meter clear", "电表清零"),
    ("033002", "Demand clear", "需量清零"),
    ("033003", "Event clear", "事件清零"),
    ("033004", "Time setting", "校时"),
    ("033005", "Daily-period table programming", "时段表编程"),
    ("033006", "Time-zone table programming", "时区表编程"),
    ("033007", "Weekend programming", "周休日编程"),
    ("03300C", "Settlement-day programming", "结算日编程"),
    ("03300D", "Meter cover opening", "开表盖"),
    ("03300F", "Rate-price programming", "费率参数表编程"),
    ("033010", "Ladder table programming", "阶梯表编程"),
    ("033012", "Key update", "密钥更新"),
    ("033013", "Abnormal card insertion", "异常插卡"),
]


@pytest.mark.parametrize(("prefix", "name", "name_zh"), EVENT_CLASSES)
def test_event_records_of_section_3_7(prefix: str, name: str, name_zh: str) -> None:
    """Count 0330ee00 (3-byte XXXXXX), records 0330ee01..0A kept as their exact bytes (no layout in §3.7)."""
    count = lookup(prefix + "00")
    assert (count.format.spec, count.size, count.access, count.name_zh) == ("XXXXXX", 3, "r", name_zh + "总次数")
    assert count.decode(bytes.fromhex("12 00 00")) == 12
    last = 2 if prefix == "033012" else 10  # FW-B keeps 2 key-update records, 10 of the others
    for n in (1, last):
        record = lookup(f"{prefix}{n:02X}")
        assert record.name == f"{name} record (last {n})" and record.name_zh == f"{name_zh}记录（上{n}次）"
        assert isinstance(record.format, Opaque) and record.access == "r" and record.size is None
    assert DI_2007.get(int(f"{prefix}{last + 1:02X}", 16)) is None


def test_refund_records() -> None:
    """03340xxx (§3.7) as FW-B keeps them: 033400nn, nn = 1..10, no total count."""
    assert lookup("03340001").name == "Refund record (last 1)" and lookup("0334000A").name_zh == "退费记录（上10次）"
    assert isinstance(lookup("03340001").format, Opaque)
    assert DI_2007.get(0x03340000) is None and DI_2007.get(0x0334000B) is None


def test_an_opaque_record_keeps_its_bytes() -> None:
    item = lookup("03300101")  # a meter clear record as FW-B sends it: 18 bytes of data, FF padding
    raw = bytes.fromhex("05 04 03 02 01 24 78 56 34 12 00 01 00 00 00 02 00 00") + b"\xff" * 88
    assert item.decode(raw) == raw.hex().upper()  # wire order: the first byte first
    assert item.encode(item.decode(raw)) == raw
    assert item.encode("01 02") == b"\x01\x02" and item.decode(b"") == ""
    with pytest.raises(ValueFormatError):
        item.encode("0G")
    with pytest.raises(ValueFormatError):
        item.encode(12)  # type: ignore[arg-type]


@given(st.binary(max_size=300))
def test_opaque_bytes_round_trip_for_any_bytes(raw: bytes) -> None:
    fmt = Opaque()
    assert fmt.encode(fmt.decode(raw)) == raw
    assert parse_value(fmt, fmt.decode(raw)) == fmt.decode(raw)


def _daily_whole(time: bytes, forward: bytes, reverse: bytes, variables: bytes, last_aa: bool = True) -> bytes:
    """FW-B ReadFreezedRec, DI1 = FF: time AA forward AA reverse AA, 8 x AA, variables AA."""
    raw = time + b"\xaa" + forward + b"\xaa" + reverse + b"\xaa" + b"\xaa" * 8 + variables
    return raw + b"\xaa" if last_aa else raw


def test_whole_daily_freeze_record() -> None:
    """0506FF01 = the groups of 05060001, 05060101, 05060201, 05061001 with AA after each (§3.6)."""
    item = lookup("0506FF01")
    assert item.block and item.name == "Daily freeze: whole record (last 1)" and item.name_zh == "日冻结数据块（上1次）"
    time_ = bytes.fromhex("30 12 15 03 24")  # 2024-03-15 12:30
    forward = bytes.fromhex("00 01 00 00  00 00 00 00  00 01 00 00  00 00 00 00  00 00 00 00")  # 1.00, T2 1.00
    reverse = bytes(20)
    variables = bytes.fromhex("00 10 00") * 2 + bytes(18)  # 0.1000 kW total and phase A
    raw = _daily_whole(time_, forward, reverse, variables)
    assert len(raw) == 5 + 20 + 20 + 24 + 12
    value = item.decode(raw)
    assert value["time"] == lookup("05060001").decode(time_) == datetime(2024, 3, 15, 12, 30, tzinfo=METER_TZ)
    assert value["forward_active"] == lookup("05060101").decode(forward)
    assert value["forward_active"][:3] == [Decimal("1.00"), Decimal("0.00"), Decimal("1.00")]
    assert value["reverse_active"] == [Decimal("0.00")] * 5
    assert value["variables"] == lookup("05061001").decode(variables)
    assert value["variables"]["active_power"][:2] == [Decimal("0.1000")] * 2
    assert set(value) == {"time", "forward_active", "reverse_active", "variables"}  # the empty groups
    assert item.encode(value) == raw
    assert item.decode(_daily_whole(time_, forward, reverse, variables, last_aa=False)) == value


def test_whole_record_groups_left_out() -> None:
    """A group the freeze mode word leaves out is a bare AA and is absent from the value."""
    item = lookup("0506FF02")
    raw = _daily_whole(bytes.fromhex("00 00 01 01 24"), b"", b"", b"")
    assert item.decode(raw) == {"time": datetime(2024, 1, 1, tzinfo=METER_TZ)}
    assert item.decode(b"\xaa" * 12) == {} and item.encode({}) == b"\xaa" * 12
    # Without the final AA the last group may be empty too: 11 separators, 12 groups.
    assert item.decode(b"\xaa" * 11) == {}
    unset = _daily_whole(bytes(5), b"", b"", b"")  # an all-zero time: there, but not set
    assert item.decode(unset) == {"time": None} and item.encode({"time": None}) == unset


def test_whole_hourly_freeze_record() -> None:
    item = lookup("0504FFFE")
    raw = bytes.fromhex("00 10 15 03 24 AA 45 23 01 00 AA 00 00 00 00 AA")
    assert item.decode(raw) == {
        "time": datetime(2024, 3, 15, 10, 0, tzinfo=METER_TZ),
        "forward_active": Decimal("123.45"),
        "reverse_active": Decimal("0.00"),
    }
    assert item.encode(item.decode(raw)) == raw


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # one group (nothing) where the record has 3
        bytes.fromhex("00 10 15 03 24 AA 45 23 01 00"),  # 2 groups
        bytes.fromhex("00 10 15 03 24 AA 45 23 01 00 AA 00 00 00 00 AA AA"),  # 4
        bytes.fromhex("00 10 15 03 24 AA 45 23 01 AA 00 00 00 00 AA"),  # a 3-byte total
        bytes.fromhex("00 10 15 03 2A AA 45 23 01 00 AA 00 00 00 00 AA"),  # not BCD
    ],
)
def test_whole_record_that_does_not_fit_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueFormatError):
        lookup("0504FF01").decode(raw)


@pytest.mark.parametrize(
    "value",
    [
        {"forward_demand": "01AA02"},  # the separator inside a group
        {"forward_demand": ""},  # a present group must carry bytes
        {"forward_active": []},
        {"bogus": 1},
        [1, 2],
    ],
)
def test_whole_record_values_that_cannot_be_sent(value: Any) -> None:
    with pytest.raises(ValueFormatError):
        lookup("0500FF01").encode(value)


def test_whole_records_follow_their_single_items() -> None:
    """Every freeze type of §3.6 has a whole record for each record number its time DI has."""
    for kind in range(8):
        times = [item for item in DI_2007 if item.di >> 8 == (0x05000000 | kind << 16) >> 8]
        assert times, kind
        for item in times:
            whole = DI_2007.lookup(item.di | 0xFF00)
            assert isinstance(whole.format, Groups) and whole.access == "r"
            assert whole.format.groups[0][1].spec == "YYMMDDhhmm"
        assert DI_2007.get(0x0500FF00 | kind << 16) is None  # DI0 = 00 is no record


# --- parameter security classes (dlt645.md §5.5, prepaid.md §2.3) -----------------------------

# Class 1 (level 99, plaintext + MAC): §5.5's FW-A list; FW-B's ladder tables with the other
# step tables (prepaid.md §2.3: the price files, TOU prices and step tables, are class 1).
REFERENCE_CLASS_1 = ["04000108", "04000109", "04001001", "04001002", "040502FF", "040605FF", "04060AFF", "04060BFF"]
# Class 2 (level 98, ciphertext + MAC): §5.5's list, plus the time-zone and day-period switch
# times that prepaid.md §2.3 names.
REFERENCE_CLASS_2 = [
    "04000F01",
    "04000F02",
    "04000F03",
    "04000F04",
    "04001003",
    "04001004",
    "04001005",
    "04001006",
    "04000306",
    "04000307",
    "0400040E",
    "04000106",
    "04000107",
]


def test_parameter_classes_of_the_reference() -> None:
    for code in REFERENCE_CLASS_1:
        assert lookup(code).param_class == 1, code
    for code in REFERENCE_CLASS_2:
        assert lookup(code).param_class == 2, code


def test_every_writable_parameter_has_a_class() -> None:
    """Class 1 is exactly the reference list; every other writable 2007 DI is class 2 ("most
    other meter parameters", prepaid.md §2.3) except the passwords, which have none."""
    class_1 = {int(c, 16) for c in REFERENCE_CLASS_1}
    for item in DI_2007:
        if "w" not in item.access:
            assert item.param_class is None, item.code
        elif item.di >> 8 == 0x04000C:
            assert item.param_class is None, item.code
        else:
            assert item.param_class == (1 if item.di in class_1 else 2), item.code
    assert all(item.param_class is None for item in DI_1997)


@pytest.mark.parametrize(
    ("entry", "ok"),
    [
        ({"access": "rw", "param_class": 1}, True),
        ({"access": "w", "param_class": 2}, True),
        ({"access": "rw"}, True),
        ({"access": "rw", "param_class": 3}, False),
        ({"access": "rw", "param_class": True}, False),
        ({"access": "rw", "param_class": "1"}, False),
        ({"access": "r", "param_class": 1}, False),
        ({"param_class": 2}, False),  # access defaults to r
    ],
)
def test_param_class_is_checked_when_loading(entry: dict[str, Any], ok: bool) -> None:
    if ok:
        assert _param_class(entry) == entry.get("param_class")
    else:
        with pytest.raises(ValueError):
            _param_class(entry)


def test_reference_vectors() -> None:
    """dlt645.md §8 reply frames decode through the table."""
    v10 = bytes.fromhex("FE FE FE FE 68 43 10 00 11 34 00 68 91 06 33 34 34 35 CA 55 EE 16")
    assert decode_read_reply(v10)[1:] == (DI_2007.lookup(0x02010100), Decimal("229.7"))
    v14 = bytes.fromhex("FE FE FE FE 68 00 51 44 18 11 17 68 91 06 35 33 B3 35 36 83 45 16")
    assert decode_read_reply(v14)[2] == Decimal("50.03")
    v15 = bytes.fromhex("68 60 64 02 09 22 04 68 91 0A 33 32 34 35 47 56 33 33 33 33 97 16")
    assert decode_read_reply(v15)[2] == [Decimal("231.4"), Decimal("0.0"), Decimal("0.0")]
    v5 = bytes.fromhex("68 76 02 02 47 02 02 68 91 08 33 33 34 33 35 33 33 33 C9 16")
    assert decode_read_reply(v5)[2] == Decimal("0.02")
    v17b = bytes.fromhex("68 03 00 00 00 00 00 68 81 04 44 E9 33 34 EC 16")
    assert decode_read_reply(v17b)[1:] == (DI_1997.lookup(0xB611), 100)
    v18c = bytes.fromhex("68 54 07 13 00 80 13 68 81 06 43 C3 34 33 33 33 2B 16")
    assert decode_read_reply(v18c)[1:] == (DI_1997.lookup(0x9010), Decimal("0.01"))


def test_names() -> None:
    assert lookup("0001FF01").name == "Forward active energy block (total, T1..Tn), settlement 1 ago"
    assert lookup("00010203").name_zh == "正向有功电能（费率2）（上3结算日）"
    assert lookup("1D00FF0A").name_zh == "跳闸记录（上10次）"
    assert lookup("0506013E").name_zh == "日冻结正向有功电能数据（上62次）"
    assert lookup("9410").name_zh == "上月正向有功总电能"
    assert lookup("B611").name == "Voltage, phase A"
