"""Membership inference against a site's published delta, with and without DP-SGD.

The attacker is anyone who sees a site's deltas in the clear: the aggregator,
or whoever holds its key. It knows the base model (every edge gets it) and the
delta, so it has the site's trained model ``base + delta``. It also has a pool
of candidate records, half of which were in the site's training data
(members), half not (non-members, from the same distribution), and guesses
"member" when a record's loss is below a threshold (Yeom et al., CSF 2018).
Its **advantage** is ``max over thresholds of (TPR − FPR)``: 0 is a coin toss,
1 is perfect. Under (ε, δ)-DP no attacker's advantage can exceed
``(e^ε − 1 + 2δ) / (e^ε + 1)`` (Humphries et al., 2020; Yeom et al. Thm 1).

The task is built to be easy to over-fit, so the DP-off figure is clearly
visible: few records, random labels (the only way to fit them is to memorise
each one), a wide MLP and many epochs. Training is the edge agent's own round
(``edge.trainer.train_round``), so DP on means Opacus DP-SGD with Poisson
sampling, per-sample clipping and Gaussian noise, and ε is what the site's
accountant (``edge.privacy.PrivacyBudget``) would book for that release.

The "floor" row is the same attack against the untrained base model: its
advantage is only sampling noise (members and non-members are exchangeable),
the value a perfectly private release would get with this many records.

    .venv/bin/python bench/privacy_mia.py [--json] [--seed 0] [--members 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge.config import PrivacyConfig, TrainingConfig  # noqa: E402
from edge.privacy import PrivacyBudget  # noqa: E402
from edge.trainer import plan_round, train_round  # noqa: E402
from models import ModelSpec, build_model, load_shared_state, loss_per_sample, shared_state  # noqa: E402


@dataclass(frozen=True)
class Setup:
    """The attacked site's round: what it trains and how private it is."""

    members: int = 256
    n_features: int = 8
    hidden: tuple[int, ...] = (64, 64)
    epochs: int = 200
    batch_size: int = 32
    lr: float = 0.1
    noise_multiplier: float = 8.0  # with 1,600 steps at q = 1/8: ε ≈ 2.8 at δ = 1e-5
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    seed: int = 0


@dataclass(frozen=True)
class Result:
    case: str  # "DP off", "DP on", "floor (base model)"
    advantage: float
    member_loss: float
    nonmember_loss: float
    epsilon: float | None  # None: no privacy guarantee
    bound: float | None  # the DP bound on any attacker's advantage at this ε
    seconds: float


def advantage(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """max over thresholds t of P[loss_member <= t] - P[loss_nonmember <= t] (>= 0)."""
    thresholds = np.unique(np.concatenate([member_losses, nonmember_losses]))
    tpr = np.searchsorted(np.sort(member_losses), thresholds, side="right") / len(member_losses)
    fpr = np.searchsorted(np.sort(nonmember_losses), thresholds, side="right") / len(nonmember_losses)
    return float(max(0.0, np.max(tpr - fpr)))


def dp_bound(epsilon: float, delta: float) -> float:
    """Largest membership advantage (ε, δ)-DP allows: (e^ε − 1 + 2δ) / (e^ε + 1)."""
    return float((np.expm1(epsilon) + 2 * delta) / (np.exp(epsilon) + 1))


def make_data(s: Setup) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Members and non-members from one distribution: Gaussian rows, coin-flip labels."""
    rng = np.random.default_rng(s.seed)
    x = rng.standard_normal((2 * s.members, s.n_features)).astype(np.float32)
    y = rng.integers(0, 2, size=(2 * s.members, 1)).astype(np.float32)
    return x[: s.members], y[: s.members], x[s.members :], y[s.members :]


def _losses(spec: ModelSpec, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    import torch

    model = build_model(spec, seed=0)
    load_shared_state(model, spec, weights)
    model.eval()
    with torch.no_grad():
        return loss_per_sample(model, spec, torch.from_numpy(x), torch.from_numpy(y)).numpy()


def attack(
    spec: ModelSpec,
    base: dict[str, np.ndarray],
    delta: dict[str, np.ndarray],
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[float, float, float]:
    """What the attacker does with a delta: rebuild the site's model, threshold the losses."""
    weights = {k: base[k] + delta[k] for k in base}
    xm, ym, xn, yn = data
    lm, ln = _losses(spec, weights, xm, ym), _losses(spec, weights, xn, yn)
    return advantage(lm, ln), float(lm.mean()), float(ln.mean())


def run_case(s: Setup, dp: bool) -> Result:
    """Train the site's round (DP on or off) from the base model and attack its delta."""
    import torch

    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    spec = ModelSpec(kind="mlp", n_features=s.n_features, hidden=list(s.hidden))
    base = shared_state(build_model(spec, seed=0), spec)
    data = make_data(s)
    cfg = TrainingConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, min_rows=2, threads=1, seed=s.seed)
    privacy = (
        PrivacyConfig(epsilon=1e9, delta=s.delta, noise_multiplier=s.noise_multiplier, max_grad_norm=s.max_grad_norm)
        if dp
        else None
    )
    started = time.perf_counter()
    result = train_round(spec, base, None, data[0], data[1], cfg, privacy)
    adv, lm, ln = attack(spec, base, result.delta, data)
    eps = None
    if privacy is not None:
        plan = plan_round(s.members, cfg)
        eps = PrivacyBudget(privacy).epsilon_after(plan.sample_rate, plan.steps)
    return Result(
        "DP on" if dp else "DP off",
        adv,
        lm,
        ln,
        eps,
        dp_bound(eps, s.delta) if eps is not None else None,
        time.perf_counter() - started,
    )


def floor_case(s: Setup) -> Result:
    """The attack on the untrained base model: the noise floor of the advantage estimate."""
    spec = ModelSpec(kind="mlp", n_features=s.n_features, hidden=list(s.hidden))
    base = shared_state(build_model(spec, seed=0), spec)
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    adv, lm, ln = attack(spec, base, zero, make_data(s))
    return Result("floor (base model)", adv, lm, ln, 0.0, 0.0, 0.0)


def measure(s: Setup) -> list[Result]:
    return [run_case(s, dp=False), run_case(s, dp=True), floor_case(s)]


def _table(s: Setup, results: list[Result]) -> str:
    plan = plan_round(s.members, TrainingConfig(epochs=s.epochs, batch_size=s.batch_size, min_rows=2))
    lines = [
        f"membership inference on a site's delta: {s.members} members vs {s.members} non-members, "
        f"random labels, MLP {list(s.hidden)}, {s.epochs} epochs ({plan.steps} steps, q={plan.sample_rate:.3f}), "
        f"DP: sigma={s.noise_multiplier}, clip={s.max_grad_norm}, delta={s.delta}, seed={s.seed}",
        f"{'case':<20} {'advantage':>9} {'loss members':>13} {'loss others':>12} {'epsilon':>8} {'DP bound':>9} {'s':>6}",
    ]
    for r in results:
        eps = "-" if r.epsilon is None else f"{r.epsilon:.2f}"
        bound = "-" if r.bound is None else f"{r.bound:.3f}"
        lines.append(
            f"{r.case:<20} {r.advantage:>9.3f} {r.member_loss:>13.4f} {r.nonmember_loss:>12.4f} "
            f"{eps:>8} {bound:>9} {r.seconds:>6.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--members", type=int, default=Setup.members)
    ap.add_argument("--epochs", type=int, default=Setup.epochs)
    ap.add_argument("--noise-multiplier", type=float, default=Setup.noise_multiplier)
    args = ap.parse_args(argv)
    s = Setup(members=args.members, epochs=args.epochs, noise_multiplier=args.noise_multiplier, seed=args.seed)
    results = measure(s)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "privacy_mia",
                    "cpu_count": os.cpu_count(),
                    "setup": asdict(s),
                    "results": [asdict(r) for r in results],
                }
            )
        )
    else:
        print(_table(s, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
