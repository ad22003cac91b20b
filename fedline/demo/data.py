"""The demo's data: one CSV split into sites, and each site's rows into train / live / held-out.

Why here and not in the edge agent: the demo plays the role of several plants
at once, so something has to cut one file into per-plant files before any
plant process starts. Each site then only ever sees its own files (its PLC
serves its live rows, its historian replay holds its backfill); the held-out
20 % never reaches any process and is used only to score the models at the end.

Features are normalised by *engineering ranges* (public, equal at every site),
exactly as :class:`firmware_adapters.rows.RowBuilder` does in the edge agent, so
the in-process baselines see the very same inputs the federation trains on.
For the bundled AI4I file the ranges come from its register map; for a
bring-your-own CSV the demo derives them from the pooled file with a 5 %
margin and says so in the report (a real deployment writes them into the
site file from the machine's data sheet instead).
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from broker_bridge.errors import FedlineError

Task = Literal["classification", "regression"]

REPO_ROOT = Path(__file__).resolve().parents[2]
AI4I_CSV = REPO_ROOT / "data" / "ai4i2020.csv"
AI4I_MAP = REPO_ROOT / "firmware_adapters" / "maps" / "ai4i2020.toml"
AI4I_FEATURES = [
    "Air temperature [K]",
    "Process temperature [K]",
    "Rotational speed [rpm]",
    "Torque [Nm]",
    "Tool wear [min]",
]
AI4I_LABEL = "Machine failure"
# The machine's nominal operating point and spread, per feature: rounded public figures (the
# dataset's documentation: air 300 K ± 2 K, process = air + 10 K, torque 40 ± 10 Nm, tool wear
# 0-250 min; speed around 1500 rpm), equal at every site, not statistics of any site's rows.
# They centre and scale the model's inputs (ModelSpec.input_mean / input_scale); under DP-SGD
# inputs with a spread of 0.1 (speed within its 1000-3000 rpm range) train far slower.
AI4I_NOMINAL = {
    "Air temperature [K]": (300.0, 2.0),
    "Process temperature [K]": (310.0, 2.0),
    "Rotational speed [rpm]": (1500.0, 200.0),
    "Torque [Nm]": (40.0, 10.0),
    "Tool wear [min]": (120.0, 70.0),
}
AI4I_SITE_COLUMN = "Type"

# Engineering quantities a machine's PLC commonly computes from its raw signals and serves as
# extra registers: shaft power, the process-air temperature difference, and tool strain. The
# AI4I failure modes are thresholds on exactly these (HDF: ΔT < 8.6 K at < 1380 rpm; PWF: power
# outside 3.5-9 kW; OSF: strain above 11,000-13,000 Nm·min by product type), which a small MLP
# under DP noise finds far more easily in one feature than as a product of two. Each entry:
# name -> (formula over the raw features, engineering range for normalisation, nominal
# (centre, spread)); ranges and nominals are machine figures (torque 0-80 Nm x speed 1000-3000
# rpm, tool wear 0-260 min), not statistics of any site's rows. The register addresses follow
# the raw tags of firmware_adapters/maps/ai4i2020.toml (see :func:`ai4i_plc_map`).
AI4I_DERIVED: dict[str, tuple[Callable[[np.ndarray], np.ndarray], tuple[float, float], tuple[float, float]]] = {
    "Power [W]": (lambda x: x[:, 3] * x[:, 2] * (2.0 * math.pi / 60.0), (0.0, 15000.0), (6000.0, 1500.0)),
    "Temperature difference [K]": (lambda x: x[:, 1] - x[:, 0], (0.0, 20.0), (10.0, 1.0)),
    "Tool strain [Nm min]": (lambda x: x[:, 3] * x[:, 4], (0.0, 20000.0), (5000.0, 3500.0)),
}


class DemoDataError(FedlineError):
    """The demo's input CSV or its column choices are unusable; the message says which and why."""


@dataclass
class SiteData:
    """One plant's share of the file. ``*_rows`` keep the CSV text so files can be written back."""

    site: str  # site id (topic level, user name, file name)
    key: str  # the value of the site column this site stands for
    train_rows: list[dict[str, str]]
    test_rows: list[dict[str, str]]
    x_train: np.ndarray  # raw plant units, float64 (n, F)
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.train_rows) + len(self.test_rows)

    @property
    def positives(self) -> int:
        return int(np.sum(self.y_train > 0.5) + np.sum(self.y_test > 0.5))


@dataclass
class DemoData:
    """All sites, the column choices and the normalisation every party uses."""

    source: Path
    columns: list[str]
    site_column: str
    features: list[str]
    label: str
    task: Task
    ranges: list[tuple[float, float]]  # per feature: engineering range (lo, hi)
    label_range: tuple[float, float] | None  # regression: target normalised to [0, 1] by this range
    sites: list[SiteData] = field(default_factory=list)
    ranges_from_data: bool = False
    seed: int = 0
    # how held-out rows are chosen, here (test) and at each edge (validation, edge.dataset.holdout_mask):
    # "group" (rows of one unit together), "random" (independent rows), "time" (the newest rows)
    split: str = "random"
    group_column: str | None = None
    validation_fraction: float = 0.2  # of each site's training rows: the edge's held-out rows (picks its served model)
    nominal: dict[str, tuple[float, float]] = field(default_factory=dict)  # feature -> (centre, spread), plant units

    def input_standardisation(self) -> tuple[list[float], list[float]]:
        """``ModelSpec.input_mean`` / ``input_scale`` in the normalised units the model sees (empty: none)."""
        if not self.nominal or any(f not in self.nominal for f in self.features):
            return [], []
        mean, scale = [], []
        for f, (lo, hi) in zip(self.features, self.ranges):
            c, sd = self.nominal[f]
            mean.append((c - lo) / (hi - lo))
            scale.append(sd / (hi - lo))
        return mean, scale

    @property
    def n_measured(self) -> int:
        """Leading features read from the machine; the rest (:data:`AI4I_DERIVED`) are computed from them."""
        return sum(1 for f in self.features if f not in AI4I_DERIVED)

    @property
    def metric(self) -> str:
        return "roc_auc" if self.task == "classification" else "rmse"

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw units to [0, 1], clipped: what the edge's RowBuilder feeds the model."""
        lo = np.array([r[0] for r in self.ranges])
        span = np.array([r[1] - r[0] for r in self.ranges])
        return np.clip((np.asarray(x, dtype=np.float64) - lo) / span, 0.0, 1.0).astype(np.float32)

    def target(self, y: np.ndarray) -> np.ndarray:
        """The training target: the class (0/1) or the regression value scaled by ``label_range``."""
        y = np.asarray(y, dtype=np.float64)
        if self.task == "regression" and self.label_range is not None:
            lo, hi = self.label_range
            y = (y - lo) / (hi - lo)
        return y.astype(np.float32)

    def untarget(self, pred: np.ndarray) -> np.ndarray:
        """Model output back to plant units (regression), so RMSE is in the label's own unit."""
        pred = np.asarray(pred, dtype=np.float64)
        if self.task == "regression" and self.label_range is not None:
            lo, hi = self.label_range
            pred = pred * (hi - lo) + lo
        return pred

    def validation_mask(self, site: SiteData) -> np.ndarray:
        """Which of the site's training rows its edge agent holds out (in the order the edge receives them)."""
        from edge.dataset import holdout_mask

        groups = [r[self.group_column] for r in site.train_rows] if self.group_column else None
        return holdout_mask(len(site.train_rows), self.validation_fraction, self.split, groups)  # type: ignore[arg-type]

    def fit_rows(self, site: SiteData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``x_fit, y_fit, x_val, y_val`` of a site as its edge trains and validates: normalised inputs, targets."""
        m = self.validation_mask(site)
        x, y = self.normalise(site.x_train), self.target(site.y_train)
        return x[~m], y[~m], x[m], y[m]

    def fit_units(self, site: SiteData) -> tuple[list[str] | None, int | None, list[str] | None]:
        """Each validation row's unit, the number of units in the training rows and each training row's unit,
        as the site's edge stores them (``[dataset] group_column``; Nones without one: rows are independent)."""
        if not self.group_column:
            return None, None, None
        from edge.dataset import group_key

        m = self.validation_mask(site)
        units = [group_key(r[self.group_column]) for r in site.train_rows]
        train = [u for u, h in zip(units, m) if not h]
        return [u for u, h in zip(units, m) if h], len(set(train)), train

    def site(self, site_id: str) -> SiteData:
        for s in self.sites:
            if s.site == site_id:
                return s
        raise KeyError(site_id)


def site_id_for(value: str) -> str:
    """A valid site id (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``) for a value of the site column."""
    sid = re.sub(r"[^A-Za-z0-9_.\-]", "-", value.strip())[:64]
    if not sid or not sid[0].isalnum():
        sid = ("site-" + sid)[:64]
    return sid


def hash_bucket(value: str, n: int) -> int:
    """Stable bucket of a value (BLAKE2b, not Python's salted ``hash``), so every run splits alike."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "big") % n


def _float(text: str, path: Path, line: int, column: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise DemoDataError(f"{path}: line {line}: column {column!r} holds {text!r}, not a number") from None
    if not math.isfinite(v):
        raise DemoDataError(f"{path}: line {line}: column {column!r} holds {text!r}, not a finite number")
    return v


def read_csv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file (errors name the file)."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise DemoDataError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DemoDataError(f"{p}: cannot read as CSV: {exc}") from None
    if not columns or not rows:
        raise DemoDataError(f"{p}: no header or no rows")
    return columns, rows


def write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _numeric_columns(columns: list[str], rows: list[dict[str, str]], skip: set[str]) -> list[str]:
    out = []
    for c in columns:
        if c in skip:
            continue
        try:
            [float(r[c]) for r in rows[:200]]
        except (TypeError, ValueError):
            continue
        out.append(c)
    return out


def _split(
    n: int,
    y: np.ndarray,
    task: Task,
    test_fraction: float,
    rng: np.random.Generator,
    split: str = "random",
    groups: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and test (see :func:`load_demo_data` for the three rules)."""
    if split == "group":
        return _group_split(groups or [], test_fraction, rng)
    if split == "time":
        k = round(n * test_fraction)
        return np.arange(n - k), np.arange(n - k, n)
    if task == "classification":
        test: list[int] = []
        for cls in np.unique(y):
            idx = np.flatnonzero(y == cls)
            rng.shuffle(idx)
            k = round(len(idx) * test_fraction)
            test.extend(idx[:k].tolist())
        test_idx = np.array(sorted(test), dtype=int)
    else:
        perm = rng.permutation(n)
        test_idx = np.sort(perm[: round(n * test_fraction)])
    mask = np.zeros(n, dtype=bool)
    mask[test_idx] = True
    return np.flatnonzero(~mask), test_idx


def _group_split(groups: list[str], test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Whole units to the test side, in a random order, until they hold ``test_fraction`` of the rows."""
    units = list(dict.fromkeys(groups))
    if len(units) < 3:
        raise DemoDataError(
            f"a site has {len(units)} unit(s) in the group column: a grouped split needs at least 3 "
            "(training, validation and test units)"
        )
    sizes = {u: 0 for u in units}
    for g in groups:
        sizes[g] += 1
    test: set[str] = set()
    held = 0
    for j in rng.permutation(len(units)):
        if held >= test_fraction * len(groups) or len(test) >= len(units) - 2:
            break
        test.add(units[j])
        held += sizes[units[j]]
    mask = np.array([g in test for g in groups], dtype=bool)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def load_demo_data(
    csv_path: str | Path | None = None,
    *,
    site_column: str | None = None,
    label: str | None = None,
    features: list[str] | None = None,
    task: Task | None = None,
    n_sites: int | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    max_rows_per_site: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    derived: bool = False,
    split_sites: dict[str, int] | None = None,
    group_column: str | None = None,
    rows_independent: bool | None = None,
) -> DemoData:
    """Read the CSV and cut it into sites and splits.

    Defaults are the bundled AI4I 2020 file, one site per product type. With
    ``n_sites`` the rows go to ``site-0 .. site-<n-1>`` by a hash of the site
    column instead of one site per distinct value. ``max_rows_per_site`` keeps
    the first rows of each site (in file order) for a shorter run. For the
    bundled file, ``derived=True`` adds the PLC's engineering quantities
    (:data:`AI4I_DERIVED`) as extra columns and features, for every model alike.
    Off by default: measured on the demo's split, they lift the models trained
    without noise (local-only, central) but not the DP-trained federated one.
    ``split_sites`` maps a site id to N: that site's rows become N plants
    ``<id>1 .. <id>N`` of consecutive rows in file order (see :func:`split_plants`).

    Held-out rows (each site's test 20 % here, and its edge's validation
    share of the rest) never mix what should not be mixed: with
    ``group_column`` (a machine, engine or batch) whole units go to one side;
    without it rows are taken as time-ordered and the last ones are held out;
    only with ``rows_independent`` (the bundled AI4I file: one product per
    row) is the test split random, stratified by label.
    """
    path = Path(csv_path) if csv_path is not None else AI4I_CSV
    bundled = csv_path is None
    if bundled:
        rows_independent = True if rows_independent is None else rows_independent
        site_column = site_column or AI4I_SITE_COLUMN
        label = label or AI4I_LABEL
        features = features or list(AI4I_FEATURES)
        task = task or "classification"
    columns, rows = read_csv(path)
    if not site_column:
        raise DemoDataError("--site-column is required with --csv")
    if not label:
        raise DemoDataError("--label is required with --csv")
    for what, col in (("site column", site_column), ("label", label), ("group column", group_column)):
        if col is not None and col not in columns:
            raise DemoDataError(f"{path}: {what} {col!r} is not a column; columns are: {', '.join(columns)}")
    if features:
        missing = [f for f in features if f not in columns]
        if missing:
            raise DemoDataError(
                f"{path}: feature column(s) {', '.join(map(repr, missing))} not found; "
                f"columns are: {', '.join(columns)}"
            )
        if label in features or site_column in features or (group_column and group_column in features):
            raise DemoDataError("the label, the site column and the group column cannot also be features")
    else:
        features = _numeric_columns(columns, rows, {site_column, label, group_column or site_column})
        if not features:
            raise DemoDataError(f"{path}: no numeric feature columns besides {site_column!r} and {label!r}")
    y_all = np.array([_float(r[label], path, i + 2, label) for i, r in enumerate(rows)])
    if task is None:
        task = "classification" if set(np.unique(y_all)) <= {0.0, 1.0} else "regression"
    if task == "classification" and not set(np.unique(y_all)) <= {0.0, 1.0}:
        raise DemoDataError(
            f"{path}: label {label!r} must be 0 or 1 for classification "
            f"(found {sorted(set(np.unique(y_all)))[:5]}...); use --task regression?"
        )
    x_all = np.array([[_float(r[f], path, i + 2, f) for f in features] for i, r in enumerate(rows)])
    if bundled and derived and features == AI4I_FEATURES:
        x_all, features, columns = _add_derived(x_all, rows, columns)

    # group rows into sites, in file order
    groups: dict[str, list[int]] = {}
    if n_sites:
        if n_sites < 2:
            raise DemoDataError(f"--sites must be at least 2, got {n_sites}")
        for i, r in enumerate(rows):
            groups.setdefault(f"site-{hash_bucket(r[site_column], n_sites)}", []).append(i)
        keys = {k: k for k in groups}
    else:
        keys = {}
        for i, r in enumerate(rows):
            sid = site_id_for(r[site_column])
            if sid in keys and keys[sid] != r[site_column]:
                raise DemoDataError(
                    f"site column values {keys[sid]!r} and {r[site_column]!r} map to the same "
                    f"site id {sid!r}; use --sites N"
                )
            keys[sid] = r[site_column]
            groups.setdefault(sid, []).append(i)
        if len(groups) < 2:
            raise DemoDataError(
                f"{path}: site column {site_column!r} has only one value; a federation needs "
                "at least two sites (or use --sites N)"
            )
        if len(groups) > 32:
            raise DemoDataError(
                f"{path}: site column {site_column!r} has {len(groups)} values; the demo runs "
                "up to 32 sites on one machine: use --sites N"
            )

    if split_sites:
        groups, keys = split_plants(groups, keys, split_sites)

    # normalisation: engineering ranges
    ranges_from_data = False
    rng_table: dict[str, tuple[float, float]] = dict(ranges or {})
    if bundled and not rng_table:
        rng_table = ai4i_ranges()
    for j, f in enumerate(features):
        if f not in rng_table:
            lo, hi = float(x_all[:, j].min()), float(x_all[:, j].max())
            pad = 0.05 * (hi - lo) if hi > lo else 1.0
            rng_table[f] = (lo - pad, hi + pad)
            ranges_from_data = True
    label_range = None
    if task == "regression":
        lo, hi = float(y_all.min()), float(y_all.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        label_range = (lo - pad, hi + pad)

    if group_column:
        for i, r in enumerate(rows):
            _float(r[group_column], path, i + 2, group_column)  # the edge reads the unit as a register/number
    split = "group" if group_column else ("random" if rows_independent else "time")
    data = DemoData(
        path,
        columns,
        site_column,
        list(features),
        label,
        task,
        [rng_table[f] for f in features],
        label_range,
        ranges_from_data=ranges_from_data,
        seed=seed,
        split=split,
        group_column=group_column,
        nominal={**AI4I_NOMINAL, **{k: v[2] for k, v in AI4I_DERIVED.items()}} if bundled else {},
    )
    order = sorted(groups, key=lambda s: -len(groups[s]))  # biggest first: L, M, H for AI4I
    for k, sid in enumerate(order):
        idx = np.array(groups[sid][:max_rows_per_site] if max_rows_per_site else groups[sid])
        rng = np.random.default_rng(seed * 1000 + k)
        tr, te = _split(
            len(idx),
            y_all[idx],
            task,
            test_fraction,
            rng,
            split,
            [rows[i][group_column] for i in idx] if group_column else None,
        )
        data.sites.append(
            SiteData(
                site=sid,
                key=keys[sid],
                train_rows=[rows[i] for i in idx[tr]],
                test_rows=[rows[i] for i in idx[te]],
                x_train=x_all[idx[tr]],
                y_train=y_all[idx[tr]],
                x_test=x_all[idx[te]],
                y_test=y_all[idx[te]],
            )
        )
    return data


def split_plants(
    groups: dict[str, list[int]], keys: dict[str, str], split: dict[str, int]
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Cut site ``sid``'s rows into ``n`` plants of consecutive rows (file order), named ``<sid>1 .. <sid>n``.

    Why: a federation that must keep publishing while one site is away needs
    several sites (the aggregator's ``min_sites``, secure aggregation's cohorts);
    the bundled AI4I file has three product types, so the demo runs its 6,000
    L rows as two plants of one product type.
    """
    out_groups: dict[str, list[int]] = {}
    out_keys: dict[str, str] = {}
    for sid, idx in groups.items():
        n = split.get(sid, 1)
        if n < 1:
            raise DemoDataError(f"--split-site {sid}={n}: the number of plants must be at least 1")
        if n == 1:
            out_groups[sid], out_keys[sid] = idx, keys[sid]
            continue
        if len(idx) < 2 * n:
            raise DemoDataError(f"--split-site {sid}={n}: site {sid!r} has only {len(idx)} rows")
        bounds = np.linspace(0, len(idx), n + 1).round().astype(int)
        for k in range(n):
            name = f"{sid}{k + 1}"
            if name in groups:
                raise DemoDataError(f"--split-site {sid}={n}: plant name {name!r} is already a site")
            out_groups[name] = idx[bounds[k] : bounds[k + 1]]
            out_keys[name] = f"{keys[sid]} (plant {k + 1} of {n})"
    unknown = set(split) - set(groups)
    if unknown:
        raise DemoDataError(
            f"--split-site: {', '.join(sorted(unknown))} is not a site; sites are {', '.join(sorted(groups))}"
        )
    return out_groups, out_keys


def ai4i_ranges() -> dict[str, tuple[float, float]]:
    """The engineering ranges of the bundled register map (``firmware_adapters/maps/ai4i2020.toml``)."""
    import tomllib

    with AI4I_MAP.open("rb") as fh:
        doc = tomllib.load(fh)
    out = {t["name"]: (float(t["range"][0]), float(t["range"][1])) for t in doc["tags"] if "range" in t}
    return {**out, **{name: rng for name, (_, rng, _) in AI4I_DERIVED.items()}}


def _add_derived(
    x: np.ndarray, rows: list[dict[str, str]], columns: list[str]
) -> tuple[np.ndarray, list[str], list[str]]:
    """The PLC's computed quantities as extra columns (rows are updated in place, for the site CSVs)."""
    extra = np.column_stack([fn(x) for fn, _, _ in AI4I_DERIVED.values()])
    names = list(AI4I_DERIVED)
    for r, vals in zip(rows, extra):
        for n, v in zip(names, vals):
            r[n] = f"{v:.2f}"
    # the CSV text is what the PLC serves: use the rounded values in the arrays too
    extra = np.array([[float(r[n]) for n in names] for r in rows])
    return np.column_stack([x, extra]), AI4I_FEATURES + names, columns + names


def ai4i_plc_map() -> dict:
    """The bundled register map plus one float32 holding pair per derived quantity (after the raw tags)."""
    import tomllib

    with AI4I_MAP.open("rb") as fh:
        doc = tomllib.load(fh)
    addr = max(
        t["address"] + (2 if t["type"] in ("float32", "uint32", "int32") else 1)
        for t in doc["tags"]
        if t["table"] == "holding"
    )
    for name, (_, rng, _) in AI4I_DERIVED.items():
        doc["tags"].append(
            {
                "name": name,
                "table": "holding",
                "address": addr,
                "type": "float32",
                "range": [float(rng[0]), float(rng[1])],
            }
        )
        addr += 2
    return doc
