"""The plain single-process federated loop: the same training and averaging, no network, no processes.

Why it exists: it is the floor the whole chain is measured against
(``bench/e2e.py``), and the quick way to tune the demo's defaults (rounds,
epochs, learning rate, noise) before paying for real processes. Each round,
every site runs the edge agent's own DP-SGD round (:func:`edge.trainer.train_round`)
from the current global weights, and the global model moves by the aggregator's own
FedAvg reduce (:class:`aggregator.strategies.FedAvg`, built from a ``[strategy]``
table as the service builds it: the same weights, clipping and server step), so the
floor measures the same math as the chain, not a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedline.demo.baselines import evaluate, predict
from fedline.demo.data import DemoData
from models.spec import ModelSpec


@dataclass
class LoopResult:
    metrics: list[dict[str, float]] = field(default_factory=list)  # per round: site -> metric of the global model
    personalised: dict[str, float] = field(default_factory=dict)  # site -> metric of global body + its own head
    epsilon: dict[str, float] = field(default_factory=dict)
    params: dict[str, np.ndarray] = field(default_factory=dict)
    transfers: int = 0  # model transfers (one up and one down per site per round)
    n_params: int = 0
    history: list[dict[str, np.ndarray]] = field(default_factory=list)  # global params per round (keep_params)


def dp_round(
    spec: ModelSpec,
    glob: dict[str, np.ndarray],
    personal: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    tcfg,
    privacy,
    budget,
):
    """One site's round as its edge agent runs it: None when its privacy budget would be exceeded."""
    from edge.trainer import plan_round, train_round

    plan = plan_round(len(x), tcfg)
    if privacy is not None and not budget.allows(plan.sample_rate, plan.steps):
        return None
    r = train_round(spec, glob, personal or None, x, y, tcfg, privacy)
    if privacy is not None:
        budget.commit(budget.state_after(plan.sample_rate, plan.steps))
    return r


def fedavg(
    data: DemoData,
    spec: ModelSpec,
    rounds: int,
    training,
    privacy=None,
    *,
    seed: int = 0,
    server_lr: float = 1.0,
    server_momentum: float = 0.0,
    evaluate_each_round: bool = True,
    keep_params: bool = False,
    absent: dict[str, range] | None = None,
    strategy: dict | None = None,
) -> LoopResult:
    """Run ``rounds`` synchronous rounds; ``training``/``privacy`` are the edge's config dataclasses.

    ``training`` is one :class:`edge.config.TrainingConfig` for every site, or a
    dict ``site -> TrainingConfig`` (e.g. a batch size per site). ``absent``
    maps a site to the rounds (0-based) it misses, as a cut-off site does.
    ``strategy`` overrides keys of the aggregator's ``[strategy]`` table; by default FedAvg weighs each
    delta by its site's rows (McMahan's ``n_i / Σ n``) with the aggregator's other defaults.
    """
    import torch

    from aggregator.config import StrategyConfig
    from aggregator.strategies import Accepted, make_strategy
    from edge.privacy import PrivacyBudget
    from fedline.config import parse
    from models import build_model, shared_state
    from models.flat import personal_state

    table = {
        "kind": "fedavg",
        "min_sites": 1,
        "sample_weighting": True,
        "sample_cap": float(max(len(s.x_train) for s in data.sites)),  # no cap below any site's rows
        "server_lr": server_lr,
        "server_momentum": server_momentum,
        **(strategy or {}),
    }
    reducer = make_strategy(parse(StrategyConfig, table, where="strategy"), len(data.sites))
    torch.manual_seed(seed)
    model = build_model(spec, seed=0)
    glob = shared_state(model, spec)
    personal0 = personal_state(model, spec)
    personal = {s.site: dict(personal0) for s in data.sites}
    budgets = {s.site: PrivacyBudget(privacy) for s in data.sites} if privacy is not None else {}
    xs = {s.site: data.normalise(s.x_train) for s in data.sites}
    ys = {s.site: data.target(s.y_train) for s in data.sites}
    out = LoopResult(n_params=sum(a.size for a in glob.values()))
    mom: dict[str, np.ndarray] | None = None
    for round_no in range(rounds):
        accepted: list[Accepted] = []
        for s in data.sites:
            if absent and round_no in absent.get(s.site, ()):
                continue
            tcfg = training[s.site] if isinstance(training, dict) else training
            r = dp_round(spec, glob, personal[s.site], xs[s.site], ys[s.site], tcfg, privacy, budgets.get(s.site))
            if r is None:
                continue  # its budget is spent: the site sits the round out, as its edge agent would
            personal[s.site] = r.personal
            n = len(xs[s.site])
            accepted.append(
                Accepted(
                    site=s.site,
                    counter=round_no + 1,
                    msg_id=f"{s.site}-{round_no + 1}",
                    base_version=round_no,
                    n_samples=n,
                    staleness=0,
                    factor=reducer.factor(0),
                    weight=reducer.weight(n, 0),
                    delta=r.delta,
                )
            )
            out.transfers += 2
        if not accepted:
            break  # every site has spent its budget
        reduced = reducer.reduce(glob, accepted, mom)
        glob, mom = reduced.model, reduced.momentum
        if keep_params:
            out.history.append({**glob, **personal0})
        if evaluate_each_round:
            params = {**glob, **personal0}
            out.metrics.append(
                {s.site: evaluate(data, lambda x, p=params: predict(spec, p, x), i) for i, s in enumerate(data.sites)}
            )
    out.params = {**glob, **personal0}
    if any(personal0):
        out.personalised = {
            s.site: evaluate(data, lambda x, p={**glob, **personal[s.site]}: predict(spec, p, x), i)
            for i, s in enumerate(data.sites)
        }
    out.epsilon = {k: b.epsilon for k, b in budgets.items()}
    return out
