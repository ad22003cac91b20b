"""The demo's asynchronous federation in one process: the edge's DP-SGD rounds, the aggregator's own strategy.

Why it exists: the split study must measure the federation the demo runs,
not a synchronous stand-in. Each site's round is the edge agent's
(:func:`fedline.demo.plainloop.dp_round`: DP-SGD, its privacy budget), and
each version is the aggregator's strategy object
(:func:`aggregator.strategies.make_strategy` from the demo's ``[strategy]``
table: FedBuff's K, staleness weighting, max staleness) reducing
:class:`aggregator.strategies.Accepted` updates, as the service does.

Only the clock is simulated, as the demo's edges behave with
``training.on_new_model``: every site without an update in flight trains on
the newest version, in a random order (who finishes first); the buffer takes
updates in that order, K at a time, or what is there when nothing else is
coming (the buffer timeout); an update older than max staleness is dropped.
With four sites and K = 3 one update of every version waits for the next
buffer at staleness 1, as in the demo. A site away (``absent``) trains
nothing while those versions are made.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from models.spec import ModelSpec


@dataclass
class BufferResult:
    params: dict[str, np.ndarray]  # the last global model (shared) + version 0's personal parameters
    personal: dict[str, dict[str, np.ndarray]]  # each site's DP-trained personal parameters
    epsilon: dict[str, float]
    versions: int = 0
    applied: int = 0
    stale: int = 0
    staleness: list[int] = field(default_factory=list)
    # every version's global model (shared), oldest first: what an edge following the run adopted, and what a
    # site's average of recent versions (edge/version_average.py) is taken over
    history: list[dict[str, np.ndarray]] = field(default_factory=list)


def run_buffered(
    spec: ModelSpec,
    xs: dict[str, np.ndarray],
    ys: dict[str, np.ndarray],
    versions: int,
    training,
    privacy,
    strategy_table: dict,
    *,
    seed: int = 0,
    absent: dict[str, range] | None = None,
    encoding: str = "float32",
) -> BufferResult:
    """Run the federation until ``versions`` versions exist or no site can train any more.

    ``training`` maps a site to its :class:`edge.config.TrainingConfig`;
    ``strategy_table`` is the aggregator's ``[strategy]`` table; ``encoding`` is the sites'
    update encoding (``"int8"``: each delta makes the wire's round trip, ``broker_bridge.quantised``).
    """
    import torch

    from aggregator.config import StrategyConfig
    from aggregator.strategies import Accepted, make_strategy
    from broker_bridge import quantised
    from edge.privacy import PrivacyBudget
    from fedline.config import parse
    from fedline.demo.plainloop import dp_round
    from models import build_model, shared_state
    from models.flat import personal_state

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    strategy = make_strategy(parse(StrategyConfig, strategy_table, where="strategy"), len(xs))
    model = build_model(spec, seed=0)
    glob = shared_state(model, spec)
    personal0 = personal_state(model, spec)
    personal = {s: dict(personal0) for s in xs}
    budgets = {s: PrivacyBudget(privacy) for s in xs} if privacy is not None else {}
    out = BufferResult({}, {}, {})
    version, momentum = 0, None
    idle, spent = list(xs), set()
    queue: deque = deque()
    counters = {s: 0 for s in xs}
    while version < versions:
        for i in rng.permutation(len(idle)):
            s = idle[i]
            if s in spent or (absent and version in absent.get(s, ())):
                continue
            r = dp_round(spec, glob, personal[s], xs[s], ys[s], training[s], privacy, budgets.get(s))
            if r is None:
                spent.add(s)  # its budget is spent: it sits out, as its edge agent does
                continue
            personal[s] = r.personal
            counters[s] += 1
            delta = quantised.decode(quantised.encode(r.delta, encoding), encoding)  # what the aggregator reads
            queue.append((s, version, delta, len(xs[s])))
        idle = [s for s in idle if s not in {q[0] for q in queue}]
        if not queue:
            break  # every site has spent its budget (or the only ones left are away): no more versions
        k = min(strategy.arrivals, len(queue))  # as the aggregator: under MDA K + f received, K kept
        batch = [queue.popleft() for _ in range(k)]
        accepted = []
        for site, base, delta, n in batch:
            idle.append(site)
            st = version - base
            if st > strategy.cfg.max_staleness:
                out.stale += 1
                continue
            accepted.append(
                Accepted(
                    site=site,
                    counter=counters[site],
                    msg_id=f"{site}-{counters[site]}",
                    base_version=base,
                    n_samples=n,
                    staleness=st,
                    factor=strategy.factor(st),
                    weight=strategy.weight(n, st),
                    delta=delta,
                )
            )
            out.staleness.append(st)
        if not accepted:
            continue
        red = strategy.reduce(glob, accepted, momentum)
        glob, momentum = red.model, red.momentum
        version += 1
        out.history.append(glob)
        out.applied += len(accepted)
    out.params = {**glob, **personal0}
    out.personal = personal
    out.versions = version
    out.epsilon = {k: b.epsilon for k, b in budgets.items()}
    return out
