"""Under secure aggregation the per-site bound is the client's own: the aggregator checks only the cohort's sum.

Real AggregatorCore over its SQLite store, real cohort coordinator, real masking members (in process).
This is why the attack suite's per-update defences (clip to the median norm, coordinate-wise median)
do not exist with ``secure_aggregation = true`` (RELIABILITY.md, issue 14's backdoor under secure
aggregation; the measured table: ``python -m tests.hostile.secagg_attack``).
"""

from __future__ import annotations

import numpy as np
import pytest

from broker_bridge.secagg.vector import flatten
from tests.hostile.secagg_attack import Cohorts


def _spread(shapes: dict[str, np.ndarray], norm: float, rng: np.random.Generator) -> np.ndarray:
    """A flat vector of the model's size with L2 norm ``norm``, no coordinate near the clamp range."""
    v = rng.uniform(0.5, 1.0, sum(a.size for a in shapes.values())) * rng.choice([-1.0, 1.0], size=1)
    return v * (norm / np.linalg.norm(v))


def test_a_masked_update_beyond_the_per_site_bound_is_applied_and_one_far_beyond_fails_the_cohort(tmp_path) -> None:
    fed = Cohorts(tmp_path, norm_bound=1.0)
    try:
        core, rng = fed.core, np.random.default_rng(5)
        lr = core.cfg.strategy.server_lr
        ann = fed.announce()
        assert ann.clip_range == 1.0 and ann.n == 4  # the per-site bound B, announced to the members
        honest = {
            s: {k: (rng.standard_normal(v.shape) * 0.02).astype(np.float32) for k, v in core.model.items()}
            for s in fed.sites[:3]
        }
        norms = [float(np.linalg.norm(flatten(d))) for d in honest.values()]
        assert max(norms) < 1.0  # within B: the honest client leaves them as they are
        attacker = _spread(core.model, 2.5, rng)  # 2.5 x B: an honest client would have clipped it to 1
        before = flatten(core.model)
        for s, d in honest.items():
            fed.submit(s, d, ann)
        fed.submit(fed.sites[3], attacker, ann)
        assert fed.finish()  # applied: ‖Σ‖ <= 3 × 0.2 + 2.5 < K B = 4, the only check the aggregator can make
        total = sum(flatten(d).astype(np.float64) for d in honest.values()) + attacker
        # FedBuff over the cohort, staleness 0: x1 = x0 + lr × Σ / K, by hand
        np.testing.assert_allclose(flatten(core.model), before + lr * total / 4, atol=1e-5)
        assert abs(core.lineage(1)["sum_norm"] - np.linalg.norm(total)) < 1e-4
        # the attacker's share of the step: 2.5 / 4 of B, where a compliant site's is at most 1 / 4
        assert np.linalg.norm(lr * attacker / 4) > 2.4 * lr / 4

        # one masked update far beyond (5 x B): the sum exceeds K B and the whole cohort fails, honest work with it
        ann = fed.announce()
        for s in fed.sites[:3]:
            fed.submit(
                s, {k: (rng.standard_normal(v.shape) * 0.02).astype(np.float32) for k, v in core.model.items()}, ann
            )
        fed.submit(fed.sites[3], _spread(core.model, 5.0, rng), ann)
        assert not fed.finish() and core.version == 1
        failed = [v for v in core.store.verdicts() if v.reason == "secagg_cohort_failed"]
        assert sorted(v.site for v in failed) == sorted(fed.sites)
    finally:
        fed.close()


@pytest.mark.slow
def test_no_sum_level_defence_holds_the_backdoor_under_secure_aggregation(tmp_path) -> None:
    """RELIABILITY.md's table (about 2 min): with the defaults and with a tight per-site bound, the masked
    attacker is never caught (no cohort fails) and the backdoor's success stays far above the clean model's."""
    from tests.hostile import secagg_attack as sa

    rep = sa.report(tmp_path, 6, {"defaults": {}, "B = 1": {"norm_bound": 1.0}})
    print("\n" + sa.table(rep))
    for name, row in rep["settings"].items():
        for attack, r in row["attacks"].items():
            assert r["cohorts_failed"] == 0, (name, attack)
            assert r["backdoor_rate"] > row["clean_backdoor_rate"] + 0.5, (name, attack, r["backdoor_rate"])
