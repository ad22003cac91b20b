"""CSV replay: play a file as a stream of samples, for demos, tests and back-testing.

``rate_hz = 0`` plays as fast as the consumer takes samples; otherwise rows are
paced on a fixed schedule (no drift accumulates from slow consumers: a late
consumer gets the next rows at once). ``columns`` defaults to every column
whose values are numbers in the first kept row; ``filter`` keeps rows where
``column == value`` (e.g. one product type). Values are ``int`` when the text
is an integer, else ``float``; an empty cell is ``None``; a cell that is not a
number in a numeric column makes a bad-quality sample (counted), not a crash.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from fedline.config import ConfigError, resolve_path
from firmware_adapters.config import CsvConfig
from firmware_adapters.sample import Sample, SourceStats, Value


def parse_number(text: str) -> Value:
    """``"12"`` -> 12, ``"1.5"`` -> 1.5, ``""`` -> None; anything else raises ValueError."""
    text = text.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def read_rows(path: Path, filters: dict[str, str]) -> tuple[list[str], Iterator[dict[str, str]]]:
    """The header and an iterator over the kept rows of a CSV file."""
    fh = path.open(newline="", encoding="utf-8")
    reader = csv.DictReader(fh)
    header = list(reader.fieldnames or [])

    def rows() -> Iterator[dict[str, str]]:
        with fh:
            for row in reader:
                if all(row.get(k) == v for k, v in filters.items()):
                    yield row

    return header, rows()


def numeric_columns(path: Path, filters: dict[str, str]) -> list[str]:
    """Columns whose value parses as a number in the first kept row."""
    header, rows = read_rows(path, filters)
    first = next(rows, None)
    rows.close()  # type: ignore[attr-defined]
    if first is None:
        return []
    out = []
    for col in header:
        try:
            if parse_number(first[col] or "") is not None:
                out.append(col)
        except ValueError:
            continue
    return out


class CsvSource:
    """``async for sample in CsvSource(cfg, file=...)``; ends at end of file unless ``loop``."""

    def __init__(self, cfg: CsvConfig, file: str | Path | None = None, where: str = "sources") -> None:
        self.cfg = cfg
        self.name = cfg.source_name
        self.stats = SourceStats()
        self.path = resolve_path(file, cfg.path)
        if not self.path.is_file():
            raise ConfigError(file, f"{where}.path", f"no such file: {self.path}")
        try:
            header, rows = read_rows(self.path, {})
            rows.close()  # type: ignore[attr-defined]
            self.columns = list(cfg.columns) if cfg.columns else numeric_columns(self.path, cfg.filter)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ConfigError(file, f"{where}.path", f"cannot read {self.path} as CSV: {exc}") from None
        for key, col in [*((f"filter.{c}", c) for c in cfg.filter), *(("columns", c) for c in cfg.columns or [])]:
            if col not in header:
                raise ConfigError(
                    file, f"{where}.{key}", f"column {col!r} is not in {self.path.name} (has: {', '.join(header)})"
                )
        if cfg.ts_column is not None and cfg.ts_column not in header:
            raise ConfigError(file, f"{where}.ts_column", f"column {cfg.ts_column!r} is not in {self.path.name}")
        if cfg.ts_column in self.columns:
            self.columns.remove(cfg.ts_column)
        if not self.columns:
            raise ConfigError(file, f"{where}.columns", f"{self.path.name} has no numeric columns (after filter)")

    def _sample(self, row: dict[str, str]) -> Sample:
        ts = time.time()
        try:
            if self.cfg.ts_column is not None:
                ts = float(row[self.cfg.ts_column])
            values = {c: parse_number(row[c] or "") for c in self.columns}
        except (ValueError, TypeError) as exc:
            self.stats.bad_reads += 1
            return Sample.bad(self.name, f"bad cell: {exc}", ts)
        self.stats.reads += 1
        return Sample(ts=ts, source=self.name, values=values)

    async def __aiter__(self) -> AsyncIterator[Sample]:
        period = 1.0 / self.cfg.rate_hz if self.cfg.rate_hz > 0 else 0.0
        next_at = time.monotonic()
        n = 0
        while True:
            _, rows = read_rows(self.path, self.cfg.filter)
            played = 0
            for row in rows:
                if period:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at = max(next_at + period, time.monotonic() - period)
                elif n % 256 == 0:
                    await asyncio.sleep(0)  # let other tasks run even at full speed
                n += 1
                played += 1
                yield self._sample(row)
            if not self.cfg.loop or played == 0:
                return
