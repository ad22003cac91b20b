"""The column veto's cost: one default reduce (MDA + ``input_column_veto``) against FedBuff's mean, CPU per version.

Why (issue 19, BENCHMARKS.md "veto19k"): ``bench/aggregator.py`` showed the default reduce costing ~3.1 ms of CPU per
update at 100k parameters against the mean's ~1.2, most of it the column veto's per-column subset search. This
times only the reduce (``FedBuff.reduce`` on a full buffer of float32 deltas, no intake), for the default and for
``robust = "none"`` alternated in one process, and reports each one's median CPU ms per version, the default's
extra over the mean, and the vetoed columns. Compare two trees by running this file with each one first on
``PYTHONPATH`` (the file imports ``aggregator`` from there), alternated: ``PYTHONPATH=<tree> python
bench/column_veto.py --k 10 --json``.

The model is ``bench/aggregator.py``'s MLP body (128 inputs, two hidden layers of ``H`` with ``H² + 130 H ≈``
``--params``); the deltas are Gaussian noise with one far slot, which MDA leaves out, and one kept slot that stands
out in 8 input columns, where the veto drops it (``vetoed_columns``: the step's vetoed columns are recomputed too).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# bench/aggregator.py would shadow the package: keep this folder off the path (the tree comes from PYTHONPATH)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from aggregator.config import StrategyConfig  # noqa: E402
from aggregator.strategies import aggregate  # noqa: E402
from aggregator.strategies.base import Accepted  # noqa: E402
from aggregator.strategies.fedbuff import FedBuff  # noqa: E402
from fedline.blas import one_blas_thread  # noqa: E402

N_FEATURES = 128
VETOED = 8  # input columns where one kept slot stands out


def model_shapes(n_params: int) -> dict[str, tuple[int, ...]]:
    """``bench/aggregator.py``'s body: [128 → H → H], H² + 130 H ≈ ``n_params``."""
    h = max(1, round((-(N_FEATURES + 2) + math.sqrt((N_FEATURES + 2) ** 2 + 4 * n_params)) / 2))
    return {"l0.weight": (h, N_FEATURES), "l0.bias": (h,), "l1.weight": (h, h), "l1.bias": (h,)}


def updates(shapes: dict[str, tuple[int, ...]], n: int, seed: int) -> list[Accepted]:
    """``n`` fresh updates of Gaussian deltas (σ = 0.01): the last one 3× farther out (MDA leaves it out), the first
    one pushed by 0.05 in the first layer's first ``VETOED`` input columns (MDA keeps it; the veto drops it there)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scale = 0.03 if i == n - 1 else 0.01
        delta = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}
        if i == 0:
            delta["l0.weight"][:, :VETOED] += np.float32(0.05)
        out.append(Accepted(f"s{i}", 1, f"m{i}", 0, 100, 0, 1.0, 0.0, delta))
    return out


def cpu_ms(strategy: FedBuff, model: dict[str, np.ndarray], ups: list[Accepted]) -> float:
    t = time.process_time()
    strategy.reduce(model, ups, None)
    return (time.process_time() - t) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--k", type=int, default=10, help="buffer_size K (MDA waits for K + 1)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    one_blas_thread()  # as `fedline aggregator` runs (fedline.blas): no spinning BLAS thread counted
    shapes = model_shapes(a.params)
    model = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    default = FedBuff(StrategyConfig(buffer_size=a.k, norm_bound=0, clip_to_median=False), a.k + 1)
    mean = FedBuff(StrategyConfig(buffer_size=a.k, norm_bound=0, clip_to_median=False, robust="none"), a.k)
    ups = updates(shapes, default.arrivals, 7)
    times: dict[str, list[float]] = {"default": [], "mean": []}
    for r in range(a.repeats + 1):
        for name in ("default", "mean") if r % 2 else ("mean", "default"):
            s = default if name == "default" else mean
            ms = cpu_ms(s, model, ups if s is default else ups[: s.arrivals])
            if r:  # the first round warms caches and imports
                times[name].append(ms)
    deltas = [u.delta for u in ups]
    vetoes = aggregate.column_vetoes(
        deltas, aggregate.mda_keep(deltas, 1), "l0.weight", 1, default.cfg.input_column_veto
    )
    row = {
        "params": sum(math.prod(s) for s in shapes.values()),
        "k": a.k,
        "arrivals": default.arrivals,
        "reduce": default.reduce_stat,
        "default_ms": statistics.median(times["default"]),
        "mean_ms": statistics.median(times["mean"]),
        "vetoed_columns": len(vetoes),
    }
    row["extra_ms"] = row["default_ms"] - row["mean_ms"]
    print(
        json.dumps(row)
        if a.json
        else "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
