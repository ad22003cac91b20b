"""Hostile sites against the real aggregator core (real SQLite on disk, real NaCl), no broker.

The broker path of the same attacks (topics, ACL, the service's intake) is in
test_attacks_broker.py; here each attack is fed straight to
``AggregatorCore.process`` so the verdicts and the model can be checked
exactly. After every refused attack the model and version must be unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.core import AggregatorCore
from broker_bridge.keys import KeyPair
from tests.hostile.rig import copy, forge, like, make_fed, same

SITES = ["site-a", "site-b"]


@pytest.fixture
def fed(tmp_path: Path):
    return make_fed(tmp_path / "fed", SITES)


@pytest.fixture
def core(fed):
    c = AggregatorCore(fed.config('kind = "fedasync"\nalpha = 0.5\nmax_staleness = 50', "max_norm = 100.0"))
    yield c
    c.close()


def verdict(core: AggregatorCore, blob: bytes, topic_site: str | None = None) -> tuple[str, str | None]:
    r = core.process(blob, topic_site).receipt
    return r["verdict"], r["reason"]


def test_replayed_updates_never_count_twice(fed, core) -> None:
    """A site (or anyone who captured its ciphertext) replays updates already decided."""
    first, h1 = fed.seal("site-a", like(core.model, 0.01), 0)
    second, _h2 = fed.seal("site-a", like(core.model, 0.02), 1)
    assert verdict(core, first) == ("applied", None)
    assert verdict(core, second) == ("applied", None)
    after, version = copy(core.model), core.version
    # the same ciphertext again, ten times: the original verdict each time, applied once
    for _ in range(10):
        r = core.process(first).receipt
        assert (r["verdict"], r["counter"], r["version"]) == ("applied", h1.counter, 1)
    # an old counter that was never decided (held back by the attacker, or re-signed): "replay"
    held_back, _ = fed.seal("site-a", like(core.model, 0.5), 0, counter=0)
    assert verdict(core, held_back) == ("rejected", "replay")
    assert same(core.model, after) and core.version == version == 2
    assert core.metrics.value("fedline_aggregator_duplicates_total") == 10
    assert core.store.verdict_counts().get("applied") == 2


def test_replay_survives_an_aggregator_restart(fed, tmp_path) -> None:
    """The replay guard is the durable store, not memory: a restart does not reopen the door."""
    cfg = fed.config('kind = "fedasync"\nalpha = 0.5')
    core = AggregatorCore(cfg)
    blob, _ = fed.seal("site-b", like(core.model, 0.01), 0)
    newer, _ = fed.seal("site-b", like(core.model, 0.01), 1)
    assert verdict(core, blob)[0] == "applied" and verdict(core, newer)[0] == "applied"
    core.close()
    again = AggregatorCore(cfg)
    try:
        before = copy(again.model)
        assert again.process(blob).duplicate
        old, _ = fed.seal("site-b", like(again.model, 0.3), 0, counter=0)
        assert verdict(again, old) == ("rejected", "replay")
        assert same(again.model, before) and again.version == 2
    finally:
        again.close()


def test_a_site_cannot_speak_for_another(fed, core) -> None:
    """site-b signs with its own key but claims to be site-a; an outsider claims site-a or itself;
    a stranger with a fresh key claims site-a."""
    delta = like(core.model, 0.05)
    before = copy(core.model)
    attempts = {
        "enrolled site-b claims site-a": fed.seal("site-a", delta, 0, signer=fed.sites["site-b"])[0],
        "outsider claims site-a": fed.seal("site-a", delta, 0, signer=fed.outsiders["site-c"])[0],
        "outsider as itself": forge(fed.header("site-c", 0), delta, fed.outsiders["site-c"], fed.agg),
        "fresh key claims site-a": fed.seal("site-a", delta, 0, signer=KeyPair.generate("site", "site-a"))[0],
    }
    for name, blob in attempts.items():
        assert verdict(core, blob) == ("rejected", "unenrolled"), name
    # site-b's genuine update sent on site-a's topic (the service passes the topic's site): refused too
    genuine_b, _ = fed.seal("site-b", delta, 0)
    assert verdict(core, genuine_b, topic_site="site-a") == ("rejected", "schema")
    assert same(core.model, before) and core.version == 0
    assert core.metrics.value("fedline_aggregator_rejections_total", {"reason": "unenrolled"}) == 4


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "one-nan", "float32-max"])
def test_model_sized_nonfinite_update_is_rejected(fed, core, poison: str) -> None:
    """A delta with every tensor of the model's shape, full of NaN (or inf, or values whose
    squares overflow): refused before it touches the model, and the service goes on."""
    value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "one-nan": 0.0, "float32-max": np.finfo(np.float32).max}[
        poison
    ]
    delta = like(core.model, value)
    if poison == "one-nan":
        name = list(delta)[-1]
        delta[name].reshape(-1)[-1] = np.nan
    before = copy(core.model)
    blob, _ = fed.seal("site-a", delta, 0)
    expected = "norm" if poison == "float32-max" else "nonfinite"
    assert verdict(core, blob) == ("rejected", expected)
    assert same(core.model, before) and core.version == 0
    good, _ = fed.seal("site-a", like(core.model, 0.01), 0)
    assert verdict(core, good) == ("applied", None) and core.version == 1
    assert all(np.isfinite(v).all() for v in core.model.values())


def _poison_round(fed, robust: str, rng: np.random.Generator, bounds: str = "") -> tuple[dict, dict, dict]:
    """FedBuff K=7: five honest sites send small deltas around +0.01, two attackers send the honest
    direction reversed and scaled x1000 (norm-legal: validation's max_norm is generous)."""
    cfg = fed.config(
        f'kind = "fedbuff"\nbuffer_size = 7\nrobust = "{robust}"\ntrim = 0.3\nstaleness = "constant"\n{bounds}',
        "max_norm = 1.0e6",
    )
    core = AggregatorCore(cfg)
    try:
        base = copy(core.model)
        honest = [
            {k: (0.01 + 0.002 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
            for _ in range(5)
        ]
        evil = [{k: (-1000 * 0.01 * np.ones(v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(2)]
        senders = [f"site-{i}" for i in range(7)]
        for site, d in zip(senders, honest + evil):
            blob, _ = fed.seal(site, d, 0)
            core.process(blob)
        assert core.version == 1
        step = {k: core.model[k] - base[k] for k in base}
        return step, {k: np.stack([h[k] for h in honest]) for k in base}, base
    finally:
        core.close()


@pytest.mark.parametrize("robust", ["median", "trimmed_mean"])
def test_scaled_poison_is_outvoted_by_robust_reduce(tmp_path: Path, robust: str) -> None:
    fed = make_fed(tmp_path / "fed", [f"site-{i}" for i in range(7)])
    step, honest, _ = _poison_round(fed, robust, np.random.default_rng(0))
    for k, h in honest.items():
        # every coordinate of the applied step lies within what the honest sites sent
        assert (step[k] >= h.min(axis=0) - 1e-6).all() and (step[k] <= h.max(axis=0) + 1e-6).all(), k
        assert (step[k] > 0).all(), "the attackers flipped the direction"


def test_scaled_poison_without_robust_reduce_takes_over(tmp_path: Path) -> None:
    """The control: the same round with the plain weighted mean is dominated by the attackers,
    so the robust test above measures the defence, not an attack too weak to matter. The norm bounds are
    off here (they are on by default, and with them the plain mean holds too: the next test)."""
    fed = make_fed(tmp_path / "fed", [f"site-{i}" for i in range(7)])
    step, honest, _ = _poison_round(fed, "none", np.random.default_rng(0), "norm_bound = 0.0\nclip_to_median = false")
    for k in honest:
        assert (step[k] < -1.0).all(), k


def test_scaled_poison_is_held_by_the_default_norm_bounds(tmp_path: Path) -> None:
    """With the defaults (each delta clipped to the buffer's median norm) the two x1000 attackers move each
    coordinate by at most 2/7 of an honest delta's size: the step keeps the honest sign on most coordinates."""
    fed = make_fed(tmp_path / "fed", [f"site-{i}" for i in range(7)])
    step, honest, _ = _poison_round(fed, "none", np.random.default_rng(0))
    for k in honest:
        assert np.abs(step[k]).max() < 0.02, k  # the attack alone (unclipped) moves by 10/7 per coordinate
