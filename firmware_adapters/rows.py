"""From samples to training (or inference) rows.

Used by the edge agent (training rows) and the line inference (rows without a
label). The whole API::

    mapping = parse_row_mapping(site["rows"], file="site.toml")   # a RowMapping
    builder = RowBuilder(mapping, ranges=source.ranges)             # ranges: optional
    row = builder.push(sample)       # Row | None
    row.x   # np.ndarray float32: shape (F,), or (N, F) with window = N,
            # or (F * len(aggregates),) with aggregate_s
    row.y   # float (class index or regression target) or None if no label
    row.ts  # timestamp of the newest sample in the row
    builder.flush()                  # the pending time-window row at end of stream
    builder.n_features, builder.shape, builder.stats

The site file's table::

    [rows]
    task = "classification"                 # or "regression"
    label = "Machine failure"               # a tag in the same stream (optional)
    features = [
      { tag = "Air temperature [K]", range = [295.0, 305.0] },
      { tag = "Torque [Nm]" },              # range from the source's register map
    ]
    window = 1                              # last N samples per row (sequence models)
    # aggregate_s = 10.0                    # or: aggregates over tumbling time windows
    # aggregates = ["mean", "min", "max", "std", "last"]

Why engineering ranges and not data statistics: min/max or mean/std of the
local data would be a function of the private records that the DP accountant
does not cover, and would differ between sites, so the federated model would
see differently scaled inputs. Ranges from the configuration are public, equal
across sites, and bound every input to [0, 1] (values outside are clipped and
counted), which also keeps DP-SGD's per-sample gradients tame.

The builder keeps the latest value of every tag, so tags polled in different
groups (or published in different messages) combine into one row; with
``trigger = "tag"`` a row is made only when a sample carrying that tag arrives
(e.g. a row counter), else on every good sample. A row whose features are not
all known and numeric is not made (counted as ``incomplete``). Bad-quality
samples are counted and ignored, and restart a ``window`` (a sequence never
spans a failed read). Nothing here knows any column name.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedline.config import ConfigError, parse
from firmware_adapters.sample import Sample, Value

Aggregate = Literal["mean", "min", "max", "std", "last"]
_AGGREGATES: dict[str, Callable[..., np.ndarray]] = {
    "mean": np.mean,
    "min": np.min,
    "max": np.max,
    "std": np.std,
}  # over a window's rows ("last" apart)


@dataclass(frozen=True)
class Feature:
    tag: str
    range: list[float] | None = None

    def validate(self) -> None:
        if self.range is not None and (len(self.range) != 2 or not self.range[0] < self.range[1]):
            raise ValueError(f"feature {self.tag!r}: range must be [lo, hi] with lo < hi")


@dataclass(frozen=True)
class RowMapping:
    """Which tags make a row, and how (see the module docstring)."""

    features: list[Feature]
    label: str | None = None
    task: Literal["classification", "regression"] = "classification"
    classes: list[str] | None = None  # classification with text labels: their order
    label_range: list[float] | None = None  # regression: normalise the target too
    window: int = 1
    stride: int = 1
    aggregate_s: float | None = None
    aggregates: list[Aggregate] = field(default_factory=lambda: ["mean", "min", "max", "last"])
    label_aggregate: Literal["last", "max", "mean"] | None = None
    clip: bool = True
    trigger: str | None = None

    def validate(self) -> None:
        if not self.features:
            raise ValueError("`features` must list at least one tag")
        tags = [f.tag for f in self.features]
        if len(set(tags)) != len(tags):
            raise ValueError("a tag is listed twice in `features`")
        if self.window < 1 or self.stride < 1:
            raise ValueError("`window` and `stride` must be >= 1")
        if self.aggregate_s is not None:
            if self.aggregate_s <= 0:
                raise ValueError("`aggregate_s` must be > 0")
            if self.window != 1:
                raise ValueError("use either `window` (last N samples) or `aggregate_s` (time windows), not both")
            if not self.aggregates:
                raise ValueError("`aggregates` must not be empty")
        if self.label_range is not None and (
            len(self.label_range) != 2 or not self.label_range[0] < self.label_range[1]
        ):
            raise ValueError("label_range must be [lo, hi] with lo < hi")
        if self.classes is not None and self.task != "classification":
            raise ValueError("`classes` is for task = 'classification'")


def parse_row_mapping(table: dict[str, Any], *, file: str | Path | None = None, where: str = "rows") -> RowMapping:
    return parse(RowMapping, table, file=file, where=where)


@dataclass(frozen=True, slots=True)
class Row:
    x: np.ndarray
    y: float | None
    ts: float
    historical: bool = False  # made from samples marked historical (late data), not from the live state


@dataclass
class RowStats:
    samples: int = 0
    rows: int = 0
    bad_samples: int = 0
    incomplete: int = 0
    out_of_range: int = 0
    bad_labels: int = 0
    historical_rows: int = 0  # also counted in rows


class RowBuilder:
    """Turns samples into :class:`Row` objects per a :class:`RowMapping`."""

    def __init__(
        self,
        mapping: RowMapping,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        *,
        file: str | Path | None = None,
        where: str = "rows",
    ) -> None:
        self.mapping = mapping
        self.stats = RowStats()
        self._args = (ranges, file, where)
        self._history: RowBuilder | None = None  # the lane of historical samples, made on the first one
        self._is_history_lane = False
        lo, hi = [], []
        for i, f in enumerate(mapping.features):
            rng = f.range if f.range is not None else (ranges or {}).get(f.tag)
            if rng is None:
                raise ConfigError(
                    file,
                    f"{where}.features[{i}].range",
                    f"no engineering range for tag {f.tag!r}: give range = [lo, hi] here or in the register map",
                )
            lo.append(float(rng[0]))
            hi.append(float(rng[1]))
        self._lo = np.asarray(lo, dtype=np.float64)
        self._span = np.asarray(hi, dtype=np.float64) - self._lo
        self._tags = [f.tag for f in mapping.features]
        self._state: dict[str, Value] = {}
        self._window: deque[np.ndarray] = deque(maxlen=mapping.window)
        self._since_emit = mapping.stride - 1  # the first full window makes a row
        self._bucket: list[tuple[np.ndarray, float | None]] = []
        self._bucket_end: float | None = None
        self._bucket_ts = 0.0

    @property
    def n_features(self) -> int:
        return len(self._tags)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of ``Row.x``."""
        m = self.mapping
        if m.aggregate_s is not None:
            return (self.n_features * len(m.aggregates),)
        if m.window > 1:
            return (m.window, self.n_features)
        return (self.n_features,)

    # ----------------------------------------------------------- conversion

    def _vector(self) -> np.ndarray | None:
        raw = []
        for tag in self._tags:
            v = self._state.get(tag)
            if v is None or isinstance(v, str):
                return None
            raw.append(float(v))
        x = (np.asarray(raw, dtype=np.float64) - self._lo) / self._span
        if not np.all(np.isfinite(x)):
            return None
        outside = (x < 0.0) | (x > 1.0)
        if outside.any():
            self.stats.out_of_range += int(outside.sum())
            if self.mapping.clip:
                x = np.clip(x, 0.0, 1.0)
        return x.astype(np.float32)

    def _label(self) -> float | None:
        m = self.mapping
        if m.label is None:
            return None
        v = self._state.get(m.label)
        if v is None:
            return None
        try:
            if isinstance(v, str):
                y = float(m.classes.index(v)) if m.classes is not None else float(v)
            else:
                y = float(v)
        except ValueError:
            self.stats.bad_labels += 1
            return None
        if not math.isfinite(y):
            self.stats.bad_labels += 1
            return None
        if m.label_range is not None:
            y = (y - m.label_range[0]) / (m.label_range[1] - m.label_range[0])
        return y

    # ----------------------------------------------------------- rows

    def restart_window(self, historical: bool = False) -> None:
        """Start the next ``window`` afresh in the lane a sample goes to (a new unit: a sequence must not
        span two machines)."""
        lane = self._history_lane() if historical and not self._is_history_lane else self
        lane._window.clear()
        lane._since_emit = lane.mapping.stride - 1

    def _history_lane(self) -> RowBuilder:
        if self._history is None:
            ranges, file, where = self._args
            self._history = RowBuilder(self.mapping, ranges, file=file, where=where)
            self._history._is_history_lane = True
        return self._history

    def push(self, sample: Sample) -> Row | None:
        """Feed one sample; returns a row when one is complete, else None.

        Historical samples (late data, e.g. Sparkplug store-and-forward) go to a
        lane of their own, with its own latest values, window and time bucket:
        they make rows marked ``historical`` and never change the live state.
        """
        if sample.historical and not self._is_history_lane:
            self.stats.samples += 1
            row = self._history_lane().push(sample)
            if row is not None:
                self.stats.rows += 1
                self.stats.historical_rows += 1
            return row
        self.stats.samples += 1
        if not sample.good:
            self.stats.bad_samples += 1
            self.restart_window()  # a sequence must not span a failed read or an outage
            return None
        self._state.update(sample.values)
        m = self.mapping
        if m.trigger is not None and m.trigger not in sample.values:
            return None
        x = self._vector()
        if x is None:
            self.stats.incomplete += 1
            return None
        y = self._label()
        if m.aggregate_s is not None:
            return self._push_bucket(x, y, sample.ts)
        if m.window == 1:
            return self._emit(Row(x=x, y=y, ts=sample.ts))
        self._window.append(x)
        if len(self._window) < m.window:
            return None
        self._since_emit += 1
        if self._since_emit < m.stride:
            return None
        self._since_emit = 0
        return self._emit(Row(x=np.stack(self._window), y=y, ts=sample.ts))

    def _push_bucket(self, x: np.ndarray, y: float | None, ts: float) -> Row | None:
        width = self.mapping.aggregate_s or 1.0
        out = None
        if self._bucket_end is not None and ts >= self._bucket_end:
            out = self.flush()
        if self._bucket_end is None:
            self._bucket_end = (math.floor(ts / width) + 1) * width
        self._bucket.append((x, y))
        self._bucket_ts = ts
        return out

    def flush(self) -> Row | None:
        """Close the current time window (if any) and return its row (else the historical lane's)."""
        if not self._bucket and self._history is not None:
            row = self._history.flush()
            if row is not None:
                self.stats.rows += 1
                self.stats.historical_rows += 1
            return row
        if not self._bucket:
            self._bucket_end = None
            return None
        xs = np.stack([b[0] for b in self._bucket])
        ys = [b[1] for b in self._bucket if b[1] is not None]
        parts = []
        for agg in self.mapping.aggregates:
            parts.append(_AGGREGATES[agg](xs, axis=0) if agg != "last" else xs[-1])
        how = self.mapping.label_aggregate or ("max" if self.mapping.task == "classification" else "last")
        y = None
        if ys:
            y = {"last": ys[-1], "max": max(ys), "mean": sum(ys) / len(ys)}[how]
        self._bucket = []
        self._bucket_end = None
        return self._emit(Row(x=np.concatenate(parts).astype(np.float32), y=y, ts=self._bucket_ts))

    def _emit(self, row: Row) -> Row:
        self.stats.rows += 1
        return replace(row, historical=True) if self._is_history_lane else row


__all__ = ["Feature", "Row", "RowBuilder", "RowMapping", "RowStats", "parse_row_mapping"]
