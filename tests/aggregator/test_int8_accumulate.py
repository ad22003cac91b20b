"""The aggregator reduces int8 updates straight from their int8 blocks: the same step as the formulas, by hand.

FedBuff (K = 3, staleness 0) with clip-to-median: each delta ``Δ_i = q_i · s_i`` (per block) is scaled by
``min(1, m / ‖Δ_i‖)``, ``m`` the median of the three norms, then the mean ``Σ (1/3) clip_i Δ_i`` or the
coordinate-wise median ``3 · med_i((1/3) clip_i Δ_i)`` is added to the model. Expected values are computed
here in float64 from the int8 values and steps, apart from the code under test. The model has a tensor of
1,200 values (one full block and a partial one) so the block arithmetic is exercised.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from broker_bridge import quantised
from broker_bridge.quantised import Int8Delta
from broker_bridge.rounding import private_rng
from tests.aggregator.helpers import make_federation, random_delta

SPEC = '\n[model]\nkind = "mlp"\nn_features = 4\nhidden = [300]\npersonal = ["head."]\n'
EXTRA = "[validation]\nmax_norm = 50.0\nmax_samples = 1000"
SITES = ["site-a", "site-b", "site-c"]


def _strategy(robust: str) -> str:
    return f'kind = "fedbuff"\nbuffer_size = 3\nmax_staleness = 1\nnorm_bound = 0\nclip_to_median = true\nrobust = "{robust}"'


def _by_hand(wire: dict[str, np.ndarray], name: str) -> np.ndarray:
    q = wire[name].astype(np.float64).ravel()
    return (q * np.repeat(wire[f"{name}#scale"].astype(np.float64), 1024)[: q.size]).reshape(wire[name].shape)


def _wires(model: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [quantised.encode(random_delta(model, rng, scale), "int8", private_rng()) for scale in (0.01, 0.02, 0.05)]


@pytest.mark.parametrize("robust", ["none", "median"])
def test_an_int8_buffer_reduces_to_the_hand_computed_step(tmp_path, robust: str) -> None:
    fed = make_federation(tmp_path, SITES)
    core = AggregatorCore(fed.config(strategy=_strategy(robust), extra=EXTRA, spec=SPEC))
    try:
        assert core.strategy.reduce_stat == ("mean" if robust == "none" else "median")
        base = {k: v.astype(np.float64) for k, v in core.model.items()}
        wires = _wires(core.model)
        deltas = [{k: _by_hand(w, k) for k in core.model} for w in wires]
        norms = [math.sqrt(sum(float(np.sum(d[k] ** 2)) for k in d)) for d in deltas]
        median = sorted(norms)[1]
        clips = [min(1.0, median / n) for n in norms]
        assert clips[0] == 1.0 and clips[2] < 1.0  # the largest delta is clipped to the median norm
        if robust == "median":  # norm_to_median (the default under the median): the shortest is scaled up too
            clips = [median / n for n in norms]
            assert clips[0] > 1.0
        for site, w in zip(SITES, wires):
            core.submit(fed.seal(site, w, 0, encoding="int8")[0])
            if site != SITES[-1]:
                assert isinstance(core.buffer[-1].delta, Int8Delta)  # held as int8, a quarter of the memory
                assert core.buffer[-1].norm == pytest.approx(norms[len(core.buffer) - 1], rel=1e-9)
        assert core.version == 1
        for k in core.model:
            scaled = np.stack([c / 3 * d[k] for c, d in zip(clips, deltas)])
            step = scaled.sum(axis=0) if robust == "none" else 3 * np.median(scaled, axis=0)
            np.testing.assert_allclose(core.model[k], base[k] + step, rtol=0, atol=2e-7)
        lineage = core.lineage(1)
        assert lineage is not None
        assert [u["clip_scale"] for u in lineage["updates"]] == pytest.approx(clips, rel=1e-9)
    finally:
        core.close()


def test_a_restart_with_int8_updates_buffered_reduces_bit_for_bit_as_without(tmp_path) -> None:
    """The buffer is read back as the same int8 blocks with the same norms: the version is identical."""
    fed = make_federation(tmp_path / "fed", SITES)
    straight = AggregatorCore(fed.config(strategy=_strategy("none"), extra=EXTRA, spec=SPEC, state_dir="a"))
    wires = _wires(straight.model)
    blobs = [fed.seal(site, w, 0, encoding="int8")[0] for site, w in zip(SITES, wires)]
    try:
        for blob in blobs:
            straight.submit(blob)
        assert straight.version == 1
        want = {k: v.copy() for k, v in straight.model.items()}
    finally:
        straight.close()
    cfg = fed.config(strategy=_strategy("none"), extra=EXTRA, spec=SPEC, state_dir="b")
    first = AggregatorCore(cfg)
    try:
        assert [first.submit(b)["verdict"] for b in blobs[:2]] == ["buffered", "buffered"]
    finally:
        first.close()
    again = AggregatorCore(cfg)
    try:
        assert len(again.buffer) == 2 and all(isinstance(u.delta, Int8Delta) for u in again.buffer)
        assert again.submit(blobs[2])["verdict"] == "applied"
        for k, v in want.items():
            assert np.array_equal(again.model[k], v), k
    finally:
        again.close()
