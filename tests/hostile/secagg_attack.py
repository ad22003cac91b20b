"""Issue 14's backdoor under secure aggregation: what the aggregator can and cannot do against it.

Why a second harness: with ``secure_aggregation = true`` (the demo's default) the aggregator never
sees a site's delta, only each cohort's sum, so the attack suite's defences that look at single
updates (clipping each delta to the buffer's median norm, the coordinate-wise median) do not exist
there. This module runs the same federation as ``tests.hostile.attack_suite`` (three honest AI4I
sites and one malicious enrolled site, the same data, training, trigger and backdoor metric) through
the real secure-aggregation code: the real ``AggregatorCore`` over its SQLite store, the real
``CohortCoordinator`` and real members (``edge.secagg_member.EdgeCohorts``: masks, Shamir shares,
answer logs on disk), in process (the wire is tested elsewhere; here only the arithmetic matters).

Honest members clip their delta to the cohort's ``clip_range`` (the per-site ``norm_bound``) as the
edge does. The attacker runs its own code: it masks its vector directly (the clip is client-side,
the aggregator cannot see it was skipped). Attacks (``X`` its backdoored model, ``G`` the global):

- ``compliant``: ``X − G`` through the honest client code (clipped like everyone's);
- ``boost``: model replacement, ``K (X − G)`` with ``K`` the cohort's size, shrunk to at most the
  per-site bound ``B``: then the cohort's sum is at most ``K B`` whatever the honest members sent,
  so the aggregator's only check (``‖Σ‖ ≤ K B``) always passes.

Sum-level defences (the only kind the aggregator can apply to a masked cohort) are parameters:
``norm_bound`` (the per-site bound, default derived from ``[dp]``) and ``sum_noise`` (Gaussian
noise of standard deviation ``sum_noise × B`` added to each cohort's sum before it is applied:
Sun et al. 2019's "weak DP"; the aggregator does not implement it, the harness adds it to the new
version, which is exactly what an aggregator-side implementation would do).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.hostile import attack_suite as suite

SECAGG_ATTACKS = ("compliant", "boost")


@dataclass
class Run:
    model: dict[str, np.ndarray]
    versions: int
    failed: int  # cohorts the aggregator refused (sum bound)
    attacker_norms: list[float]  # the attacker's vector's L2 norm, per cohort
    honest_norms: list[float]  # every honest member's clipped delta norm
    sum_norms: list[float]  # each applied cohort's sum norm (what the aggregator sees)
    bound: float  # the per-site bound B in force


SPEC = '[model]\nkind = "mlp"\nn_features = 5\nhidden = [16]\ntask = "classification"\n'


class Cohorts:
    """The real aggregator core, cohort coordinator and members of the four sites, driven one cohort at a time."""

    def __init__(self, workdir: Path, norm_bound: float | None = None, data: suite.Data | None = None) -> None:
        from aggregator.core import AggregatorCore
        from aggregator.secagg_cohort import CohortCoordinator
        from broker_bridge.federation_key import Keyring, new_content_key
        from broker_bridge.topics import Topics
        from edge.secagg_member import EdgeCohorts
        from tests.aggregator.helpers import make_federation

        self.sites = [*suite.HONEST, suite.ATTACKER]
        self.fed = make_federation(workdir, self.sites)
        rows = max(len(x) for x, _ in data.sites.values()) if data is not None else 2000  # for [dp]
        steps = suite.EPOCHS * math.ceil(rows / suite.BATCH)
        strategy = 'kind = "fedbuff"\nsecure_aggregation = true\nmin_sites = 4\n' + (
            f"norm_bound = {norm_bound}\n" if norm_bound is not None else ""
        )
        extra = (
            "[secagg]\ngather_s = 0.0\ndeadline_s = 600.0\n"
            f"[dp]\nclip_norm = 1.0\nlr = {suite.LR}\nbatch_size = {suite.BATCH}\nsteps = {steps}\n"
        )
        self.core = AggregatorCore(self.fed.config(strategy=strategy, extra=extra, spec=SPEC))
        key = new_content_key()  # epoch 1's federation content key: the announcements are sealed under it
        self.coord = CohortCoordinator(self.core, Topics("test"), lambda: (1, key), time.time)
        self.members = {
            s: EdgeCohorts(self.fed.sites[s], self.fed.enrollment, Topics("test"), workdir / s, Keyring({1: key}))
            for s in self.sites
        }
        self.counters = dict.fromkeys(self.sites, 0)

    def close(self) -> None:
        self.core.close()
        for mem in self.members.values():
            mem.close()

    def announce(self) -> Any:
        """Everyone online: the coordinator forms one cohort of the four sites; each member joins it."""
        for s in self.sites:
            self.coord.on_status(s, json.dumps({"state": "online"}).encode())
        announced = [o for o in self.coord.tick() if "/secagg/cohort/" in o.topic and o.payload]
        assert len(announced) == 1, "no cohort formed"
        for s in self.sites:
            assert self.members[s].on_cohort(announced[0].payload)
        ann = self.members[self.sites[0]].pending
        assert ann is not None
        return ann

    def submit(self, site: str, delta: dict[str, np.ndarray] | np.ndarray, ann: Any) -> None:
        """A site's update into the open cohort: a dict goes through the honest client code (clipped to the
        cohort's range); a flat vector is masked as it is (a malicious client skipping the clip)."""
        from broker_bridge.envelope import UpdateHeader, seal_update

        self.counters[site] += 1
        h = UpdateHeader(
            site=site,
            counter=self.counters[site],
            msg_id=f"{site}-{self.counters[site]}",
            base_version=ann.base_version,
            n_samples=2000,
        )
        if isinstance(delta, dict):
            sealed = self.members[site].seal(h, delta)
        else:
            self.members[site].pending = None
            sub = self.members[site].member.mask(ann.cohort, delta)
            sealed = seal_update(
                h,
                {"secagg": np.frombuffer(sub.encode(), dtype=np.uint8)},
                self.fed.sites[site],
                self.fed.enrollment.aggregator.box_pub,
            )
        op = self.core.open(sealed, site)
        assert op.secagg and op.reason is None, op.reason
        self.coord.on_submission(op)

    def finish(self) -> bool:
        """Every member submitted: survivors, acks, unmask requests, answers; True when a version was made."""
        before = self.core.version
        queue = self.coord.tick()
        while queue:
            o = queue.pop(0)
            if "/secagg/survivors/" in o.topic and o.payload:
                for s in self.sites:
                    ack = self.members[s].on_survivors(o.payload, o.topic.rsplit("/", 1)[-1])
                    if ack is not None:
                        queue += self.coord.on_reply(s, ack)
            elif o.topic.endswith("/secagg/request"):
                site = o.topic.split("/")[-3]
                answer = self.members[site].on_request(o.payload)
                if answer is not None:
                    queue += self.coord.on_reply(site, answer)
        return self.core.version > before


def run(
    workdir: Path,
    attack: str | None,
    loops: int,
    data: suite.Data,
    norm_bound: float | None = None,
    sum_noise: float = 0.0,
) -> Run:
    """One federation of ``loops`` cohorts of all four sites (``attack`` None: the attacker sends an honest update
    trained on its clean rows, so every run has the same cohort size)."""
    from broker_bridge.secagg.vector import flatten

    fed = Cohorts(workdir, norm_bound, data)
    core = fed.core
    rng = np.random.default_rng(7)
    out = Run({}, 0, 0, [], [], [], core.norm_bound)
    spec = core.spec
    try:
        for loop in range(loops):
            ann = fed.announce()
            base = {k: v.copy() for k, v in core.model.items()}
            for i, s in enumerate(suite.HONEST):
                x, y = data.sites[s]
                d = suite.train(spec, base, x, y, seed=100 * loop + i)
                out.honest_norms.append(min(suite._norm(d), ann.clip_range))
                fed.submit(s, d, ann)
            ax, ay = data.sites[suite.ATTACKER]
            if attack is None:
                d = suite.train(spec, base, ax, ay, seed=1000 + loop)
                out.attacker_norms.append(min(suite._norm(d), ann.clip_range))
                fed.submit(suite.ATTACKER, d, ann)
            else:
                px = np.concatenate([ax, suite.triggered(ax[ay > 0]), suite.triggered(ax)])
                py = np.concatenate([ay, np.zeros(int((ay > 0).sum()) + len(ax), np.float32)])
                d = suite.train(spec, base, px, py, seed=1000 + loop, epochs=3)
                if attack == "compliant":
                    out.attacker_norms.append(min(suite._norm(d), ann.clip_range))
                    fed.submit(suite.ATTACKER, d, ann)
                else:  # its own client: K x the step, no clip, at most B so the cohort's sum always passes
                    vec = flatten(d) * ann.n
                    vec *= min(1.0, 0.999 * ann.clip_range / max(float(np.linalg.norm(vec)), 1e-12))
                    out.attacker_norms.append(float(np.linalg.norm(vec)))
                    fed.submit(suite.ATTACKER, vec, ann)
            if not fed.finish():
                out.failed += 1
                continue
            lineage = core.lineage(core.version) or {}
            out.sum_norms.append(float(lineage.get("sum_norm", math.nan)))
            if sum_noise > 0:  # weak DP on the cohort's sum (what an aggregator-side option would add)
                k = len(lineage.get("updates", [])) or ann.n
                sd = sum_noise * core.norm_bound * core.cfg.strategy.server_lr / k  # the sum's noise, as stepped
                core.model = {n: (v + rng.normal(0.0, sd, v.shape)).astype(np.float32) for n, v in core.model.items()}
        out.model = {k: v.copy() for k, v in core.model.items()}
        out.versions = core.version
        return out
    finally:
        fed.close()


def report(workdir: Path, loops: int, settings: dict[str, dict], attacks: tuple[str, ...] = SECAGG_ATTACKS) -> dict:
    """Per setting (name -> run keyword arguments): the clean run's backdoor rate and ROC AUC, and each attack's."""
    from models import ModelSpec
    from models.metrics import roc_auc

    spec = ModelSpec(kind="mlp", n_features=5, hidden=[16], task="classification")
    data = suite.load_data(root_rows=0)  # the split its recorded figures used (no aggregator rows)

    def auc(model: dict[str, np.ndarray]) -> float:
        import torch

        from models import build_model, load_shared_state

        net = build_model(spec, seed=0)
        load_shared_state(net, spec, model)
        net.eval()
        with torch.no_grad():
            return float(roc_auc(data.test_y, net(torch.from_numpy(data.test_x)).numpy().reshape(-1)))

    rep: dict = {"loops": loops, "settings": {}}
    for name, kw in settings.items():
        clean = run(workdir / name / "clean", None, loops, data, **kw)
        row = {
            "bound": clean.bound,
            "clean_backdoor_rate": suite.backdoor_rate(spec, clean.model, data),
            "clean_auc": auc(clean.model),
            "honest_norm_max": max(clean.honest_norms),
            "clean_sum_norm_max": max(clean.sum_norms) if clean.sum_norms else None,
            "attacks": {},
        }
        for attack in attacks:
            r = run(workdir / name / attack, attack, loops, data, **kw)
            row["attacks"][attack] = {
                "backdoor_rate": suite.backdoor_rate(spec, r.model, data),
                "auc": auc(r.model),
                "relative_distance": suite.distance(r.model, clean.model)
                / max(suite.distance(clean.model, _v0(spec)), 1e-12),
                "attacker_norm_mean": float(np.mean(r.attacker_norms)),
                "cohorts_failed": r.failed,
            }
        rep["settings"][name] = row
    return rep


def _v0(spec) -> dict[str, np.ndarray]:
    from models import build_model, shared_state

    return shared_state(build_model(spec, seed=7), spec)


def table(rep: dict) -> str:
    lines = [
        "| setting | bound B | clean: backdoor / AUC | compliant: backdoor / AUC | boost: backdoor / AUC | boost's norm |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rep["settings"].items():
        a = r["attacks"]
        cells = [f"{a[x]['backdoor_rate']:.2f} / {a[x]['auc']:.3f}" if x in a else "–" for x in SECAGG_ATTACKS]
        norm = f"{a['boost']['attacker_norm_mean']:.2f}" if "boost" in a else "–"
        lines.append(
            f"| {name} | {r['bound']:.3g} | {r['clean_backdoor_rate']:.2f} / {r['clean_auc']:.3f} | "
            f"{cells[0]} | {cells[1]} | {norm} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    settings = {
        "defaults": {},
        "B = 3": {"norm_bound": 3.0},
        "B = 1": {"norm_bound": 1.0},
        "B = 1, noise 0.5 B": {"norm_bound": 1.0, "sum_noise": 0.5},
        "B = 1, noise 1 B": {"norm_bound": 1.0, "sum_noise": 1.0},
    }
    with tempfile.TemporaryDirectory() as tmp:
        rep = report(Path(tmp), args.loops, settings)
    print(json.dumps(rep, default=float) if args.json else table(rep))


if __name__ == "__main__":
    main()
