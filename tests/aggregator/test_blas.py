"""fedline.blas: the aggregator's processes run NumPy's OpenBLAS on one thread (their own threads are the parallelism)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json, numpy as np
from fedline.blas import blas_threads, one_blas_thread
before = blas_threads()
ok = one_blas_thread()
x = np.ones(200_000, dtype=np.float32)
print(json.dumps({"before": before, "ok": ok, "after": blas_threads(), "dot": float(np.dot(x, x))}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_one_blas_thread_in_a_fresh_process() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}  # OpenBLAS's own default
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    # The locked NumPy wheel bundles OpenBLAS; a NumPy without it would leave fedline.blas doing nothing.
    assert got["before"] is not None, "NumPy here does not use OpenBLAS: fedline.blas cannot limit its threads"
    assert got["before"] > 1  # OpenBLAS starts with a thread per core
    assert got["ok"] is True and got["after"] == 1
    assert got["dot"] == 200_000.0  # still the same BLAS, still right
