"""Optional server-side metric per version, from a held-out CSV the operator provides.

Why: the aggregator never sees plant data, so a public or synthetic
validation file on the aggregator's side is the only way to put a number on
each version (written to the checkpoint and to the manifest's ``metric``).
Rows are built exactly as a site builds them, by
:class:`firmware_adapters.rows.RowBuilder` from the ``[evaluation.rows]``
mapping, so the features are scaled the same way.

Config::

    [evaluation]
    csv = "data/holdout.csv"
    metric = "loss"        # mean training loss (lower is better), or "accuracy" (classification)
    max_rows = 2000
    [evaluation.rows]      # a [rows] table, as in a site's file
    label = "Machine failure"
    features = [{ tag = "Torque [Nm]", range = [0.0, 80.0] }, ...]

The metric uses the global model with the seed's personal parameters (see
:mod:`aggregator.publish`): for a federation with a personal head it measures
the shared body under a generic head, which is still comparable across versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedline.config import ConfigError, resolve_path


@dataclass(frozen=True)
class EvaluationConfig:
    csv: str
    rows: dict[str, Any]
    metric: Literal["loss", "accuracy"] = "loss"
    max_rows: int = 2000
    filter: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.max_rows < 1:
            raise ValueError("max_rows must be at least 1")


class Evaluator:
    """Loads the rows once; :meth:`__call__` scores one version's shared parameters."""

    def __init__(self, cfg: EvaluationConfig, spec: Any, seed: int, file: str | Path | None = None) -> None:
        from firmware_adapters.csv_replay import parse_number, read_rows
        from firmware_adapters.rows import RowBuilder, parse_row_mapping
        from firmware_adapters.sample import Sample

        self.cfg, self.spec, self.seed = cfg, spec, seed
        path = resolve_path(file, cfg.csv)
        if not path.exists():
            raise ConfigError(file, "evaluation.csv", f"{path} does not exist")
        mapping = parse_row_mapping(cfg.rows, file=file, where="evaluation.rows")
        if cfg.metric == "accuracy" and spec.task != "classification":
            raise ConfigError(file, "evaluation.metric", f"accuracy needs task 'classification', not {spec.task!r}")
        builder = RowBuilder(mapping, file=file, where="evaluation.rows")
        xs, ys = [], []
        _, rows = read_rows(path, cfg.filter)
        for i, raw in enumerate(rows):
            try:
                values = {k: parse_number(v or "") for k, v in raw.items()}
            except ValueError:
                values = {k: v for k, v in raw.items()}
            row = builder.push(Sample(ts=float(i), source="evaluation", values=values))
            if row is not None:
                xs.append(row.x)
                ys.append(row.y)
            if len(xs) >= cfg.max_rows:
                break
        if not xs:
            raise ConfigError(file, "evaluation.rows", f"no complete rows could be built from {path}")
        self.x = np.stack(xs).astype(np.float32)
        self.y = None if spec.task == "anomaly" else np.asarray(ys, dtype=np.float32).reshape(-1, 1)
        self._model: Any = None

    def __call__(self, shared: dict[str, np.ndarray]) -> float:
        import torch

        from models import build_model, load_shared_state, loss_per_sample

        if self._model is None:
            self._model = build_model(self.spec, seed=self.seed)
        load_shared_state(self._model, self.spec, shared)
        self._model.eval()
        x = torch.from_numpy(self.x)
        y = torch.from_numpy(self.y) if self.y is not None else None
        with torch.no_grad():
            if self.cfg.metric == "accuracy":
                pred = (self._model(x) > 0).float()
                return float((pred == y).float().mean())
            return float(loss_per_sample(self._model, self.spec, x, y).mean())
