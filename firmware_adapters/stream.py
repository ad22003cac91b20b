"""From several sources to one stream of rows: the one place that turns sources into rows.

Why one home: the edge agent (training rows) and the line inference (rows to
score) both read every configured source concurrently, merge the engineering
ranges the sources know (a register map's), feed one :class:`RowBuilder`, and
must decide what a failing source means. Written twice, the two copies failed
differently; here the caller says it once, with ``on_source_error``::

    stream = row_stream(sources, mapping, file="site.toml",
                        on_source_error=lambda src, exc: log(...))   # None: the error ends the stream
    async for row in stream:          # Row(x, y, ts, historical)
        ...
    stream.builder.stats              # samples, rows, bad_samples, ...
    stream.pending                    # samples read but not yet turned into rows

Sources are read by one task each into a bounded queue (a slow consumer slows
the sources, it does not grow memory). When a source ends, ``on_source_end``
is called; when the last one ends, the builder's open time window is flushed
as the last row. A source that raises is, with ``on_source_error``, reported
and counted as ended while the others go on; without it, the exception ends
the stream (the line service treats a broken source as fatal). Rows made from
historical samples are yielded unless ``live_only`` (a line scores the present,
not a backfill).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from firmware_adapters.rows import Row, RowBuilder, RowMapping
from firmware_adapters.sample import Sample, SourceStats


@runtime_checkable
class Source(Protocol):
    """What every source in :mod:`firmware_adapters` is: a name, counters, and samples.

    A source may also have ``ranges`` (a mapping of tag to (lo, hi), or a
    method returning one) for tags whose engineering range it knows.
    """

    name: str
    stats: SourceStats

    def __aiter__(self) -> AsyncIterator[Sample]: ...


def source_ranges(sources: Iterable[Any]) -> dict[str, tuple[float, float]]:
    """The engineering ranges every source knows, merged (a later source wins a tag)."""
    out: dict[str, tuple[float, float]] = {}
    for src in sources:
        r = getattr(src, "ranges", None)
        out.update((r() if callable(r) else r) or {})
    return out


@dataclass(frozen=True)
class _End:
    source: Any
    error: BaseException | None = None


class RowStream:
    """``async for row in RowStream(...)``: see the module docstring. Iterate once."""

    def __init__(
        self,
        sources: Sequence[Source],
        mapping: RowMapping,
        *,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        file: str | Path | None = None,
        on_source_error: Callable[[Source, BaseException], None] | None = None,
        on_source_end: Callable[[Source], None] | None = None,
        on_sample: Callable[[Sample], None] | None = None,
        live_only: bool = False,
        queue_size: int = 1024,
    ) -> None:
        self.sources = list(sources)
        self.builder = RowBuilder(mapping, ranges=source_ranges(self.sources) if ranges is None else ranges, file=file)
        self.on_source_error = on_source_error
        self.on_source_end = on_source_end
        self.on_sample = on_sample
        self.live_only = live_only
        self._queue: asyncio.Queue[Sample | _End] = asyncio.Queue(maxsize=queue_size)

    @property
    def pending(self) -> int:
        """Samples (and end marks) read from the sources but not yet consumed."""
        return self._queue.qsize()

    async def _pump(self, src: Source) -> None:
        try:
            async for sample in src:
                await self._queue.put(sample)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a source must not take the other sources down
            await self._queue.put(_End(src, exc))
            return
        await self._queue.put(_End(src))

    def _keep(self, row: Row | None) -> Row | None:
        return None if row is None or (self.live_only and row.historical) else row

    async def __aiter__(self) -> AsyncIterator[Row]:
        pumps = [
            asyncio.create_task(self._pump(s), name=f"source:{getattr(s, 'name', i)}")
            for i, s in enumerate(self.sources)
        ]
        live = len(pumps)
        try:
            while live:
                item = await self._queue.get()
                if isinstance(item, _End):
                    live -= 1
                    if item.error is not None:
                        if self.on_source_error is None:
                            raise item.error
                        self.on_source_error(item.source, item.error)
                    if live == 0 and (row := self._keep(self.builder.flush())) is not None:
                        yield row
                    if self.on_source_end is not None:
                        self.on_source_end(item.source)
                    continue
                if self.on_sample is not None:
                    self.on_sample(item)
                if (row := self._keep(self.builder.push(item))) is not None:
                    yield row
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


def row_stream(
    sources: Sequence[Source],
    mapping: RowMapping,
    *,
    on_source_error: Callable[[Source, BaseException], None] | None = None,
    **options: Any,
) -> RowStream:
    """The rows of ``sources`` per ``mapping`` (options: those of :class:`RowStream`)."""
    return RowStream(sources, mapping, on_source_error=on_source_error, **options)


__all__ = ["RowStream", "Source", "row_stream", "source_ranges"]
