"""The split study's federation keeps every version it made (fedline/demo/bufferloop.py), oldest first, so a
site's average of recent versions (edge/version_average.py) is taken over what its edge would have adopted."""

from __future__ import annotations

import numpy as np

from edge.config import TrainingConfig
from fedline.demo.bufferloop import run_buffered
from fedline.demo.data import load_demo_data
from fedline.demo.workspace import Tuning, model_table, strategy_table
from models.spec import ModelSpec


def test_every_version_is_kept_in_order_and_the_last_is_the_result():
    data = load_demo_data(max_rows_per_site=120)
    spec = ModelSpec.from_dict({**model_table(data, Tuning(hidden=(4,))), "personal": []})
    xs = {s.site: data.fit_rows(s)[0] for s in data.sites}
    ys = {s.site: data.fit_rows(s)[1] for s in data.sites}
    tcfg = TrainingConfig(epochs=1, batch_size=32, lr=0.05, threads=1)
    r = run_buffered(spec, xs, ys, 3, dict.fromkeys(xs, tcfg), None, strategy_table(Tuning()), seed=1)
    assert r.versions == len(r.history) == 3
    for k, v in r.history[-1].items():
        np.testing.assert_array_equal(r.params[k], v)
    first = next(iter(r.history[0]))
    assert not np.array_equal(r.history[0][first], r.history[1][first])  # each version its own arrays
