"""Modbus register maps: which tag lives where, in what type and order.

A register map is a TOML file (or an inline ``tags`` list in a source table)
that an OT engineer writes from the PLC's documentation::

    row_counter = "row"          # optional: a uint32 tag that advances per new row
    word_order = "big"           # defaults for every tag below
    byte_order = "big"

    [[tags]]
    name = "Air temperature [K]"  # the key in Sample.values
    table = "holding"             # holding | input | coil | discrete
    address = 0                   # 0-based protocol address
    type = "float32"              # int16 uint16 int32 uint32 int64 uint64 float32 float64 bool string
    length = 8                    # string only: registers it spans (2 bytes each, NUL-padded)
    scale = 1.0                   # engineering = raw * scale + offset
    offset = 0.0
    range = [295.0, 305.0]        # engineering range, used for normalisation
    group = "default"             # polling group (interval set by the source)
    column = "Air temperature [K]"  # CSV column plc-sim serves here (default: name)

The same file drives both the Modbus source (decode) and ``fedline plc-sim``
(encode), so a test serves and reads back with one map. Decoding uses pymodbus'
``convert_from_registers`` (word order); byte order inside each 16-bit word is
swapped beforehand when ``byte_order = "little"`` (pymodbus has no option for it).

64-bit integers stay Python ints (exact beyond 2**53) unless ``scale`` or
``offset`` makes them engineering floats. A ``string`` tag holds its bytes in
register order, two per register, high byte first (``byte_order = "little"``
for PLCs that swap them; ``word_order`` does not apply), NUL-padded; it decodes
as UTF-8 with the trailing NULs removed, and bytes that are not UTF-8 make the
read a bad sample, never a guess. Strings take no scale, offset or range.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedline.config import load_toml, parse

Table = Literal["holding", "input", "coil", "discrete"]
DataTypeName = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool", "string"]
Order = Literal["big", "little"]

#: registers (16-bit words) per data type
WORDS: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
    "bool": 1,
}
#: bits of each integer type (for clamping what the simulator writes)
INT_BITS: dict[str, int] = {"int16": 16, "uint16": 16, "int32": 32, "uint32": 32, "int64": 64, "uint64": 64}
#: the Modbus protocol's per-request limits
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000
BIT_TABLES = ("coil", "discrete")


@dataclass(frozen=True)
class TagSpec:
    """One tag in a register map (see the module docstring for the fields)."""

    name: str
    table: Table
    address: int
    type: DataTypeName = "uint16"
    word_order: Order | None = None
    byte_order: Order | None = None
    scale: float = 1.0
    offset: float = 0.0
    range: list[float] | None = None
    group: str = "default"
    column: str | None = None
    length: int | None = None  # string: registers it spans

    def validate(self) -> None:
        if not 0 <= self.address <= 65535:
            raise ValueError(f"address {self.address} is outside 0..65535")
        if self.type == "string":
            if self.length is None or not 1 <= self.length <= MAX_REGISTERS_PER_READ:
                raise ValueError(
                    f"tag {self.name!r}: a string needs `length` (registers) in 1..{MAX_REGISTERS_PER_READ}"
                )
            if self.scale != 1.0 or self.offset != 0.0 or self.range is not None:
                raise ValueError(f"tag {self.name!r}: a string takes no scale, offset or range")
        elif self.length is not None:
            raise ValueError(f"tag {self.name!r}: `length` is for string tags only")
        if self.table in BIT_TABLES and self.type != "bool":
            raise ValueError(f"tag {self.name!r}: a {self.table} holds a bool, not {self.type}")
        if self.range is not None and (len(self.range) != 2 or not self.range[0] < self.range[1]):
            raise ValueError(f"tag {self.name!r}: range must be [lo, hi] with lo < hi")
        if self.scale == 0:
            raise ValueError(f"tag {self.name!r}: scale must not be 0")

    @property
    def words(self) -> int:
        if self.table in BIT_TABLES:
            return 1
        return (self.length or 0) if self.type == "string" else WORDS[self.type]


@dataclass(frozen=True)
class RegisterMap:
    """A list of tags plus defaults; ``row_counter`` names a tag that counts rows."""

    tags: list[TagSpec]
    word_order: Order = "big"
    byte_order: Order = "big"
    row_counter: str | None = None

    def validate(self) -> None:
        if not self.tags:
            raise ValueError("a register map needs at least one tag in [[tags]]")
        names = [t.name for t in self.tags]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate tag name(s): {', '.join(dupes)}")
        if self.row_counter is not None and self.row_counter not in names:
            raise ValueError(f"row_counter {self.row_counter!r} is not a tag in [[tags]]")
        # overlapping registers in one table are almost always a typo in the map
        by_table: dict[str, list[TagSpec]] = {}
        for t in self.tags:
            by_table.setdefault(t.table, []).append(t)
        for table, tags in by_table.items():
            tags = sorted(tags, key=lambda t: t.address)
            for a, b in itertools.pairwise(tags):
                if a.address + a.words > b.address:
                    raise ValueError(f"tags {a.name!r} and {b.name!r} overlap in the {table} table")

    def word_order_of(self, tag: TagSpec) -> Order:
        return tag.word_order or self.word_order

    def byte_order_of(self, tag: TagSpec) -> Order:
        return tag.byte_order or self.byte_order

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Engineering ranges by tag name, for :class:`firmware_adapters.rows.RowBuilder`."""
        return {t.name: (t.range[0], t.range[1]) for t in self.tags if t.range is not None}

    def groups(self) -> dict[str, list[TagSpec]]:
        out: dict[str, list[TagSpec]] = {}
        for t in self.tags:
            out.setdefault(t.group, []).append(t)
        return out


def load_register_map(path: str | Path) -> RegisterMap:
    """Load and validate a register map TOML file (errors name the file and key)."""
    return parse(RegisterMap, load_toml(path), file=path)


def parse_register_map(table: dict[str, Any], *, file: str | Path | None, where: str) -> RegisterMap:
    return parse(RegisterMap, table, file=file, where=where)


# ---------------------------------------------------------------- codec


def _dtype(name: str) -> Any:
    from pymodbus.client.mixin import ModbusClientMixin

    return ModbusClientMixin.DATATYPE[name.upper()]


def _swap_bytes(words: Iterable[int]) -> list[int]:
    return [((w & 0xFF) << 8) | (w >> 8) for w in words]


def decode(regmap: RegisterMap, tag: TagSpec, raw: Sequence[int] | Sequence[bool]) -> float | int | bool | str:
    """Engineering value of ``tag`` from its raw registers (or one bit).

    Raises ``UnicodeDecodeError`` (a ``ValueError``) for a string tag whose bytes are not UTF-8.
    """
    from pymodbus.client.mixin import ModbusClientMixin

    if tag.type == "bool":
        value: Any = bool(raw[0])
        return value
    words = list(raw)
    if regmap.byte_order_of(tag) == "little":
        words = _swap_bytes(words)
    if tag.type == "string":
        text = ModbusClientMixin.convert_from_registers(words, _dtype("string"), word_order="big")
        return str(text)
    value = ModbusClientMixin.convert_from_registers(words, _dtype(tag.type), word_order=regmap.word_order_of(tag))
    if tag.scale != 1.0 or tag.offset != 0.0:
        return float(value) * tag.scale + tag.offset
    return value


def encode(regmap: RegisterMap, tag: TagSpec, value: float | int | bool | str) -> list[int] | list[bool]:
    """Raw registers (or one bit) for an engineering value; the inverse of :func:`decode`.

    Integer types round and clamp to the type's range, so a CSV value that does
    not fit does not crash the simulator; a string is cut (at a character
    boundary) or NUL-padded to the tag's ``length``.
    """
    from pymodbus.client.mixin import ModbusClientMixin

    if tag.type == "bool":
        return [bool(value)]
    if tag.type == "string":
        data = str(value).encode("utf-8")[: 2 * tag.words].decode("utf-8", "ignore").encode("utf-8")
        words = ModbusClientMixin.convert_to_registers(data.decode("utf-8"), _dtype("string")) if data else []
        words = list(words) + [0] * (tag.words - len(words))
        return _swap_bytes(words) if regmap.byte_order_of(tag) == "little" else words
    if isinstance(value, str):
        raise ValueError(f"tag {tag.name!r} is {tag.type}, not a string")
    raw: float | int
    if tag.scale == 1.0 and tag.offset == 0.0 and isinstance(value, int):
        raw = int(value)  # exact: a float would round 64-bit integers
    else:
        raw = (float(value) - tag.offset) / tag.scale
    if tag.type in INT_BITS:
        bits = INT_BITS[tag.type]
        lo, hi = (0, 2**bits - 1) if tag.type.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        raw = int(min(hi, max(lo, round(raw))))
    words = ModbusClientMixin.convert_to_registers(raw, _dtype(tag.type), word_order=regmap.word_order_of(tag))
    if regmap.byte_order_of(tag) == "little":
        words = _swap_bytes(words)
    return words


# ---------------------------------------------------------------- read planning


@dataclass
class ReadBlock:
    """One Modbus request: ``count`` registers/bits of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    tags: list[TagSpec] = field(default_factory=list)


def plan_reads(tags: Iterable[TagSpec], max_gap: int = 0) -> list[ReadBlock]:
    """Merge adjacent tags of one table into as few requests as the protocol allows.

    Tags whose registers are at most ``max_gap`` apart share a request, as long as
    it stays within 125 registers (2000 bits for coils/discrete inputs). Holes are
    not read by default because many PLCs answer "illegal address" for them.
    """
    blocks: list[ReadBlock] = []
    by_table: dict[str, list[TagSpec]] = {}
    for t in tags:
        by_table.setdefault(t.table, []).append(t)
    for table, group in by_table.items():
        limit = MAX_BITS_PER_READ if table in BIT_TABLES else MAX_REGISTERS_PER_READ
        current: ReadBlock | None = None
        for t in sorted(group, key=lambda t: t.address):
            end = t.address + t.words
            if (
                current is not None
                and t.address - (current.address + current.count) <= max_gap
                and end - current.address <= limit
            ):
                current.count = max(current.count, end - current.address)
                current.tags.append(t)
            else:
                current = ReadBlock(table=t.table, address=t.address, count=t.words, tags=[t])
                blocks.append(current)
    return blocks
