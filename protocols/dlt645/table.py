"""The data-identifier table: what each DI is called, how its value is encoded, its unit.

The table itself is data (``data/di_2007.toml`` and ``data/di_1997.toml``), not code; this
module loads it, expands ranges (settlement days, tariffs, record numbers) and looks DIs up.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .control import Edition
from .errors import UnknownDIError, ValueFormatError
from .formats import Groups, ListOf, Record, ValueFormat, parse_format


@dataclass(frozen=True, slots=True)
class DataItem:
    """One data identifier: id, names, format, unit, sign rule, access and edition."""

    di: int
    edition: Edition
    name: str
    name_zh: str
    format: ValueFormat
    unit: str | None
    signed: bool
    access: str  # "r", "w" or "rw"
    block: bool  # DI1 or DI0 = FF: decodes to a list or record
    param_class: int | None = None
    """SGCC parameter security class of a writable DI (dlt645.md §5.5, prepaid.md §2.3): 1 =
    written at the MAC level (99: plaintext + MAC), 2 = at the cipher level (98: ciphertext +
    MAC); None = neither (only a plaintext password write, e.g. the passwords themselves)."""

    @property
    def code(self) -> str:
        """The DI as uppercase hex, DI3 first (8 digits for 2007, 4 for 1997)."""
        return f"{self.di:0{8 if self.edition is Edition.V2007 else 4}X}"

    @property
    def size(self) -> int | None:
        """Value size in bytes, or None when it varies (blocks of n tariffs)."""
        return self.format.size

    def decode(self, raw: bytes) -> Any:
        """The value of this DI from its plain data bytes (after the DI)."""
        return self.format.decode(raw)

    def encode(self, value: Any) -> bytes:
        """The plain data bytes for ``value``."""
        return self.format.encode(value)


class DataTable:
    """All known data identifiers of one edition."""

    def __init__(self, edition: Edition, items: Mapping[int, DataItem]) -> None:
        self.edition = edition
        self._items = dict(items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[DataItem]:
        return iter(self._items.values())

    def __contains__(self, di: object) -> bool:
        return di in self._items

    def get(self, di: int) -> DataItem | None:
        """The item for ``di``, or None."""
        return self._items.get(di)

    def lookup(self, di: int) -> DataItem:
        """The item for ``di``; raises :class:`UnknownDIError` if the table lacks it."""
        try:
            return self._items[di]
        except KeyError:
            raise UnknownDIError(di, self.edition.value) from None


def _expand(item: Mapping[str, Any], expansions: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[int, str, str]]:
    """(di, name, name_zh) for every DI an entry stands for."""
    base = int(item["di"], 16)
    axes = []
    for key in item.get("vary", []):
        spec = expansions[key]
        shift = 8 * spec["byte"]
        axis = []
        for n in range(spec["from"], spec["to"] + 1):
            first = n == spec["from"] and "first" in spec
            suffix = spec["first"] if first else spec["suffix"]
            suffix_zh = spec.get("first_zh", "") if first else spec["suffix_zh"]
            axis.append((n << shift, suffix.format(n=n), suffix_zh.format(n=n), shift))
        axes.append(axis)
    for combo in itertools.product(*axes):
        di = base
        name, name_zh = item["name"], item["name_zh"]
        for value, suffix, suffix_zh, shift in combo:
            di = (di & ~(0xFF << shift)) | value
            name += suffix
            name_zh += suffix_zh
        yield di, name, name_zh


def _part_format(part: Mapping[str, Any], status_words: Mapping[str, Mapping[str, str]]) -> ValueFormat:
    """The format of one record field or group: ``format`` (with ``signed``, ``count``) or ``fields``."""
    if "fields" in part:
        return Record([(f["name"], _part_format(f, status_words)) for f in part["fields"]])
    fmt = parse_format(part["format"], bool(part.get("signed", False)), status_words)
    if "count" in part:
        count = part["count"]
        fmt = ListOf(fmt, None if count == "n" else int(count))
    return fmt


def _item_format(entry: Mapping[str, Any], status_words: Mapping[str, Mapping[str, str]]) -> ValueFormat:
    signed = bool(entry.get("signed", False))
    if "groups" in entry:  # a whole freeze record: AA between the groups (dlt645.md §3.6)
        return Groups([(g["name"], _part_format(g, status_words)) for g in entry["groups"]])
    if "fields" in entry:
        return Record([(f["name"], _part_format(f, status_words)) for f in entry["fields"]])
    fmt = parse_format(entry["format"], signed, status_words)
    if "count" in entry:
        count = entry["count"]
        fmt = ListOf(fmt, None if count == "n" else int(count), entry.get("max"))
    elif "max" in entry:
        raise ValueError('max caps a block of count = "n"')
    return fmt


PARAM_CLASSES = (1, 2)


def _param_class(entry: Mapping[str, Any]) -> int | None:
    """The ``param_class`` of an entry: 1 or 2, and only on a writable entry."""
    value = entry.get("param_class")
    if value is None:
        return None
    if isinstance(value, bool) or value not in PARAM_CLASSES:
        raise ValueError(f"param_class must be one of {PARAM_CLASSES}, not {value!r}")
    if "w" not in entry.get("access", "r"):
        raise ValueError("param_class is only meaningful on a writable entry")
    return int(value)


def load_table(edition: Edition) -> DataTable:
    """Load and expand the table of ``edition`` from the package data."""
    name = "di_2007.toml" if edition is Edition.V2007 else "di_1997.toml"
    text = resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    status_words = doc.get("status_words", {})
    expansions = doc.get("expansions", {})
    items: dict[int, DataItem] = {}
    for entry in doc["item"]:
        try:
            fmt = _item_format(entry, status_words)
            param_class = _param_class(entry)
        except (ValueError, KeyError, ValueFormatError) as exc:
            raise ValueError(f"{name}: bad entry {entry.get('di')}: {exc}") from exc
        for di, item_name, item_name_zh in _expand(entry, expansions):
            if di in items:
                raise ValueError(f"{name}: DI {di:X} is defined twice")
            code = f"{di:08X}" if edition is Edition.V2007 else f"{di:04X}"
            items[di] = DataItem(
                di=di,
                edition=edition,
                name=item_name,
                name_zh=item_name_zh,
                format=fmt,
                unit=entry.get("unit"),
                signed=bool(entry.get("signed", False)),
                access=entry.get("access", "r"),
                block="FF" in (code[-4:-2], code[-2:]) if edition is Edition.V2007 else code.endswith("F"),
                param_class=param_class,
            )
    return DataTable(edition, items)


DI_2007 = load_table(Edition.V2007)
DI_1997 = load_table(Edition.V1997)


def table_for(edition: Edition) -> DataTable:
    """The table of ``edition``."""
    return DI_2007 if edition is Edition.V2007 else DI_1997
