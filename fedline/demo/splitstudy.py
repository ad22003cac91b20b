"""The split study: the federation-against-local-only comparison over K train/test splits, not one.

Why it exists: the demo's accuracy claim ("federated beats local-only on the
smallest site") is a statistical statement, and one run measures it on one
draw. The smallest AI4I site (H) has 21 failures, so its held-out 20 % holds
4; one failure ranked above or below a dozen normal rows moves its ROC AUC by
several points, and which 4 failures land in the held-out rows decides how
good a model trained on H's other 17 can look. On the demo's own split H's
local-only model scores 0.91, among the highest of ten splits (0.64-0.99).

So after the multi-process run the demo repeats the comparison in-process, on
split seeds 0..K-1 of the same file (seed 0 is the demo's own split), with the
demo's own federation (:func:`fedline.demo.bufferloop.run_buffered`: the
edge's DP-SGD rounds with the demo's batch share, σ, clip, learning rate and
budget, reduced by the aggregator's strategy object with the demo's
``[strategy]`` table; the run's cut-off site misses the versions it missed),
each edge's served model picked by the edge's own code
(:class:`edge.personal.Personaliser`) on the rows that edge holds out
(:meth:`fedline.demo.data.DemoData.fit_rows`), and the same local-only
yardstick. It reports per site how often the federated and the served model
beat local-only, the mean paired gains and one-sided sign tests. Splits run
in parallel worker processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from typing import Any

import numpy as np

from models.metrics import better, score


def _one_split(
    load_kwargs: dict[str, Any],
    split_seed: int,
    tuning: dict[str, Any],
    batch_fraction: float,
    absent: dict[str, tuple[int, int]],
    encoding: str = "float32",
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Local-only, federated (global) and served metric of every site on one split, and the global model's
    metric on the split's pooled held-out rows (with the pooled labels' standard deviation: regression's bar)."""
    import torch

    from edge.config import PrivacyConfig, TrainingConfig
    from edge.personal import PersonalConfig, Personaliser
    from fedline.config import parse
    from fedline.demo import secure_aggregation
    from fedline.demo.baselines import TrainSettings, evaluate, predict, train_plain
    from fedline.demo.bufferloop import run_buffered
    from fedline.demo.data import load_demo_data
    from fedline.demo.workspace import (
        Tuning,
        baseline_epochs,
        dp_batch_size,
        model_table,
        personal_table,
        strategy_table,
    )
    from models.spec import ModelSpec

    torch.set_num_threads(1)
    t = Tuning(**{**tuning, "hidden": tuple(tuning["hidden"])})
    data = load_demo_data(**load_kwargs, seed=split_seed)
    spec = ModelSpec.from_dict({**model_table(data, t), "personal": []})
    fit = {s.site: data.fit_rows(s) for s in data.sites}  # what each edge trains on and validates with
    training = {
        s.site: TrainingConfig(
            epochs=t.epochs,
            batch_size=dp_batch_size(len(fit[s.site][0]), batch_fraction),
            lr=t.lr,
            momentum=t.momentum,
            threads=1,
            seed=t.seed,
        )
        for s in data.sites
    }
    privacy = PrivacyConfig(
        epsilon=t.epsilon, delta=t.delta, noise_multiplier=t.noise_multiplier, max_grad_norm=t.max_grad_norm
    )
    fed = run_buffered(
        spec,
        {k: v[0] for k, v in fit.items()},
        {k: v[1] for k, v in fit.items()},
        t.versions,
        training,
        privacy,
        # the demo aggregator's table: under secure aggregation its default reduce is the mean, else minimum-diameter averaging
        {**strategy_table(t), "secure_aggregation": secure_aggregation.enabled(t.secure_aggregation, len(data.sites))},
        seed=t.seed + split_seed,
        absent={k: range(*v) for k, v in absent.items()},
        encoding=encoding,
    )
    base = TrainSettings(epochs=baseline_epochs(t), batch_size=64, lr=0.1, momentum=0.9, seed=t.seed)
    pcfg = parse(PersonalConfig, personal_table(t), where="personal")
    out: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(data.sites):
        x, y, xv, yv = fit[s.site]
        local = train_plain(spec, x, y, base)
        p = Personaliser(pcfg, spec)
        p.local, p.local_rows = local, len(x)  # the same model (same code, settings and rows) the edge would train
        for v, g in enumerate(fed.history[:-1], 1):  # the versions the edge adopted before the last one
            p.remember(v, {**g, **fed.personal[s.site]})
        served, choice = p.choose(
            {**fed.params, **fed.personal[s.site]},
            x,
            y,
            xv,
            yv,
            *data.fit_units(s),
            split=data.split,
            version=len(fed.history) or None,
        )
        out[s.site] = {
            "local": evaluate(data, lambda z, q=local: predict(spec, q, z), i),
            "federated": evaluate(data, lambda z: predict(spec, fed.params, z), i),
            "served": evaluate(data, lambda z, q=served: q.predict(spec, z), i),
            "served_kind": choice.kind,
            "served_weight": choice.weight,  # a blend's local-only share (edge/blend.py), else None
            "served_rule": choice.rule,  # which rule of the pick decided (edge/personal.py RULES)
            "served_p": choice.p,  # the paired test's p it rested on (validation, or training folds + validation)
            # the global versions whose mean the fine-tune started from (edge/version_average.py), None: the last
            "served_versions": choice.averaged_versions,
            "validation": choice.to_dict()["candidates"],  # what the pick saw (on the validation rows)
            "epsilon": fed.epsilon.get(s.site, 0.0),
        }
    x_all = np.concatenate([data.normalise(s.x_test) for s in data.sites])
    y_all = np.concatenate([s.y_test for s in data.sites])
    pred = predict(spec, fed.params, x_all)
    pooled = {
        "federated": float(score(data.metric, y_all, pred if data.task == "classification" else data.untarget(pred))),
        "label_std": float(np.std(y_all)),
    }
    return out, pooled


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips), the chance of this many wins by luck."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def signed_rank_p(gains: list[float]) -> float:
    """One-sided Wilcoxon signed-rank p that the paired ``gains`` (positive = served better) lean positive.

    Why not only the sign test: it counts a split lost by two misordered failure/normal pairs like one won by
    0.2 ROC AUC; the signed-rank test weighs each split's difference by its rank among the differences' sizes
    (Demšar, JMLR 2006, recommends it for two models over several splits; docs/tuning.md, tenth pass).
    The statistic is the sum of the positive differences' ranks (midranks for equal sizes); a zero difference
    (a tie) keeps its place in the ranking but counts for neither side (Pratt 1959). Exact: every sign
    pattern of the non-zero differences is equally likely under the null, and up to 20 of them are enumerated;
    beyond that the normal approximation of the same statistic.
    """
    from scipy.stats import norm, rankdata

    d = np.round(np.asarray([g for g in gains if math.isfinite(g)], dtype=np.float64), 12)
    nonzero = d != 0
    if not nonzero.any():
        return 1.0
    ranks = rankdata(np.abs(d))[nonzero]
    observed = float(ranks[d[nonzero] > 0].sum())
    m = len(ranks)
    if m <= 20:
        signs = (np.arange(2**m)[:, None] >> np.arange(m)) & 1  # every pattern of which differences are positive
        w = signs @ ranks
        return float(np.mean(w >= observed - 1e-9))
    mean, var = ranks.sum() / 2, float((ranks**2).sum()) / 4
    return float(norm.sf((observed - mean) / math.sqrt(var)))


def summarise(metric: str, per_split: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per site: wins of the federated model, mean scores, mean paired gain (positive = federated better)."""
    sites: dict[str, dict[str, Any]] = {}
    for site in per_split[0]:
        pairs = [
            (r[site]["federated"], r[site]["local"])
            for r in per_split
            if site in r and all(math.isfinite(v) for v in (r[site]["federated"], r[site]["local"]))
        ]
        sign = 1.0 if metric == "roc_auc" else -1.0
        gains = [sign * (f - loc) for f, loc in pairs]
        wins = sum(better(metric, f, loc) for f, loc in pairs)
        served = [
            (r[site]["served"], r[site]["local"])
            for r in per_split
            if site in r
            and r[site].get("served") is not None
            and all(math.isfinite(v) for v in (r[site]["served"], r[site]["local"]))
        ]
        served_wins = sum(better(metric, v, loc) for v, loc in served)
        served_gains = [sign * (v - loc) for v, loc in served]
        kinds: list[str] = [str(r[site]["served_kind"]) for r in per_split if site in r and r[site].get("served_kind")]
        weights: list[float] = [
            float(r[site]["served_weight"]) for r in per_split if site in r and r[site].get("served_weight") is not None
        ]
        rules: list[str] = [str(r[site]["served_rule"]) for r in per_split if site in r and r[site].get("served_rule")]
        shares = [round(w, 2) for w in weights]
        sites[site] = {
            "splits": len(pairs),
            "federated_wins": wins,
            "mean_local": float(np.mean([loc for _, loc in pairs])) if pairs else math.nan,
            "mean_federated": float(np.mean([f for f, _ in pairs])) if pairs else math.nan,
            "mean_gain": float(np.mean(gains)) if gains else math.nan,
            "sign_test_p": sign_test_p(wins, len(pairs)),
            # the model the line serves (edge/personal.py) against local-only, paired by split
            "served_wins": served_wins,
            "mean_served": float(np.mean([v for v, _ in served])) if served else math.nan,
            "mean_gain_served": float(np.mean(served_gains)) if served else math.nan,
            "served_sign_test_p": sign_test_p(served_wins, len(served)),
            # the same pairs with their sizes: what the report's "smallest site gains" claim is judged on
            "served_wilcoxon_p": signed_rank_p(served_gains),
            # splits where the line served a model worse than local-only, and the largest such loss
            "served_losses": sum(g < 0 for g in served_gains),
            "worst_served_gain": float(min(served_gains)) if served else math.nan,
            "served_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
            # the blends' local-only shares w (edge/blend.py): how many splits served each, to 2 decimals (a small
            # site's spread-matched share differs from split to split)
            "served_weights": {f"{w:.2f}": shares.count(w) for w in sorted(set(shares))},
            "served_rules": {k: rules.count(k) for k in sorted(set(rules))},
        }
    return sites


def run_split_study(
    load_kwargs: dict[str, Any],
    tuning,
    batch_fraction: float,
    metric: str,
    k: int,
    absent: dict[str, tuple[int, int]] | None = None,
    workers: int | None = None,
    on_split: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
    encoding: str = "float32",
) -> dict[str, Any]:
    """The comparison on split seeds ``0..k-1``; ``load_kwargs`` are :func:`load_demo_data`'s (without seed).

    ``absent`` maps a site to the rounds ``(first,
    end)`` it misses in every split: the run's cut-off site misses the
    versions made without it. ``on_split(seed, result)`` is called as each
    split finishes (progress for the terminal: the study takes about a minute). ``encoding``:
    the sites' update encoding (``"int8"`` measures what quantised updates cost, bench/quantise_accuracy.py).
    """
    absent = absent or {}
    workers = max(1, min(k, workers or min(2, os.cpu_count() or 1)))
    t = asdict(tuning)
    results: dict[int, dict[str, dict[str, float]]] = {}
    pooled: dict[int, dict[str, float]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(_one_split, load_kwargs, seed, t, batch_fraction, absent, encoding): seed for seed in range(k)
        }
        for fut in as_completed(futures):
            results[futures[fut]], pooled[futures[fut]] = fut.result()
            if on_split is not None:
                on_split(futures[fut], results[futures[fut]])
    per_split = [results[seed] for seed in range(k)]
    return {
        "splits": k,
        "split_seeds": list(range(k)),
        "method": "the demo's federation in one process (fedline/demo/bufferloop.py: the edge's DP-SGD rounds, "
        "the aggregator's own strategy object and settings, the cut-off site missing the versions it "
        "missed in the run), each site's served model picked by the edge's own code on its validation "
        "rows, against the report's local-only training",
        "absent_rounds": {site: list(v) for site, v in absent.items()},
        "per_split": [{"split_seed": i, "sites": r, "pooled": pooled[i]} for i, r in enumerate(per_split)],
        "sites": summarise(metric, per_split),
        # the global model on each split's pooled held-out rows: what "the federation learns" is judged on
        "pooled": {
            "mean_federated": float(np.mean([pooled[i]["federated"] for i in range(k)])),
            "mean_label_std": float(np.mean([pooled[i]["label_std"] for i in range(k)])),
        },
    }
