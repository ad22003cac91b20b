"""The model a line serves: local-only, global, or the global fine-tuned on the plant's rows, picked on validation.

Why: a plant joins a federation only if it comes out ahead. The DP-trained
global model pays for its privacy with noise, and a large plant's own rows may
hold all it needs; a small plant's may not. So each site keeps three candidates

- **local-only**: trained on the site's own training rows alone, noise-free
  (rows that never leave the plant need no DP noise);
- **global**: the published global model (plus the site's DP-trained personal
  parameters, if the model has any);
- **fine-tuned**: the global model trained on for a few epochs on the site's
  own rows, noise-free (Ditto / FedPer's local adaptation, without the noise);

and serves the one with the best metric on its validation rows (the dataset's
held-out slice, never trained on), re-picked whenever a new global version
arrives. When the validation slice is too small to tell the candidates apart
(too few rows, or too few positives for a ROC AUC), it says so and decides by
what the site's own rows could teach: a site whose training rows hold at least
``min_local_positives`` of the rarer class (regression: rows) keeps its
local-only model, since nothing on validation shows a federation candidate
better and its own model had enough to learn from (a mid-size plant whose
validation slice drew few failures); a site with fewer serves the fine-tuned
model, the federation's knowledge adapted to the plant (the smallest plant,
whose own model learnt from a dozen failures).

Why ε is unchanged: the local-only and fine-tuned models are computed from the
site's rows and from the *published* global model only; their parameters never
leave the plant (they go into the line's ONNX file on the site's own disk) and
the next DP round starts from the published global model and the site's
DP-trained personal parameters, never from these. What leaves the plant about
them is the served kind and its validation metric in the site's status (see
docs/architecture.md, "The served model").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from models.metrics import better, score
from models.spec import ModelSpec

KINDS = ("local", "global", "fine_tuned")


@dataclass(frozen=True)
class PersonalConfig:
    """``[personal]`` of site.toml: which model the line serves, and how the candidates train.

    ``serve = "global"`` (default) hands the line the global model (with the
    site's personal head), as before; ``"pick"`` picks among the three
    candidates on the validation rows (``[dataset] holdout_fraction`` > 0).
    """

    serve: Literal["global", "pick"] = "global"
    finetune_epochs: int = 3
    finetune_lr: float = 0.02
    local_epochs: int = 30
    local_lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 64
    retrain_growth: float = 0.1  # the local-only model is retrained when the training rows grew by this share
    min_validation_rows: int = 30
    min_validation_positives: int = 8  # classification: fewer and one failure decides the AUC
    # validation too small to decide: a site whose training rows hold at least this many of the rarer class
    # (regression: rows) keeps local-only; one with fewer serves the fine-tuned model
    min_local_positives: int = 30
    # a federation candidate replaces local-only only when it is ahead on validation by more than this
    # (ROC AUC points; RMSE: this share of local-only's), so validation noise does not swap a plant's better
    # own model for a worse one
    margin: float = 0.02
    seed: int = 0

    def validate(self) -> None:
        if self.finetune_epochs < 0 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("finetune_epochs must be >= 0, local_epochs and batch_size >= 1")
        if self.finetune_lr <= 0 or self.local_lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("finetune_lr and local_lr must be > 0 and momentum in [0, 1)")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.retrain_growth < 0 or self.min_validation_rows < 1 or self.min_validation_positives < 1:
            raise ValueError("retrain_growth must be >= 0, min_validation_rows and min_validation_positives >= 1")
        if self.min_local_positives < 0:
            raise ValueError(f"min_local_positives must be >= 0, got {self.min_local_positives}")


@dataclass
class Choice:
    """Which candidate the line serves and why (the site's status and the line's model file say so)."""

    kind: str
    metric: str  # roc_auc | rmse (regression: in the model's normalised target units)
    validation_metric: float | None  # the served candidate's, on the validation rows
    candidates: dict[str, float | None] = field(default_factory=dict)
    validation_rows: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None or not math.isfinite(v) else round(float(v), 4)
        return {
            "kind": self.kind,
            "metric": self.metric,
            "validation_metric": r(self.validation_metric),
            "candidates": {k: r(v) for k, v in self.candidates.items()},
            "validation_rows": self.validation_rows,
            "reason": self.reason,
        }


def metric_name(spec: ModelSpec) -> str:
    return "roc_auc" if spec.task == "classification" else "rmse"


def too_small(spec: ModelSpec, y_val: np.ndarray | None, cfg: PersonalConfig) -> str | None:
    """Why the validation rows cannot tell the candidates apart, or None when they can."""
    n = 0 if y_val is None else len(y_val)
    if n < cfg.min_validation_rows:
        return f"validation slice too small to decide: {n} rows < {cfg.min_validation_rows}"
    if spec.task == "classification":
        pos = int(np.sum(np.asarray(y_val) > 0.5))
        least = min(pos, n - pos)
        if least < cfg.min_validation_positives:
            return (
                f"validation slice too small to decide: {least} rows of its rarer class "
                f"< {cfg.min_validation_positives}"
            )
    return None


def local_evidence(spec: ModelSpec, y_fit: np.ndarray | None, n_rows: int) -> int:
    """What the local-only model learnt from: training rows of the rarer class (regression: rows).

    An anomaly model has no labels to score a candidate by: 0, so it serves the fine-tuned model as before.
    """
    if y_fit is None:
        return 0
    if spec.task != "classification":
        return n_rows
    pos = int(np.sum(np.asarray(y_fit) > 0.5))
    return min(pos, len(y_fit) - pos)


def pick(
    spec: ModelSpec,
    scores: dict[str, float],
    y_val: np.ndarray | None,
    cfg: PersonalConfig,
    evidence: int = 0,
) -> Choice:
    """The candidate with the best validation metric, local-only unless a federation one leads by the margin.

    Local-only is the plant's own alternative to joining, so a federation
    candidate (fine-tuned, then global on a tie) replaces it only when it is
    ahead by more than ``cfg.margin``. When the slice is too small to decide,
    ``evidence`` (:func:`local_evidence` of the training rows) decides: at
    least ``cfg.min_local_positives`` keeps local-only, fewer serves the
    fine-tuned model.
    """
    m = metric_name(spec)
    n = 0 if y_val is None else len(y_val)
    small = too_small(spec, y_val, cfg)
    if small is not None:
        if evidence >= cfg.min_local_positives and "local" in scores:  # scores hold every candidate there is
            what = " of its rarer class" if spec.task == "classification" else ""
            reason = f"{small}; local-only kept: it trained on {evidence} rows{what} (>= {cfg.min_local_positives})"
            return Choice("local", m, scores["local"], dict(scores), n, reason)
        return Choice("fine_tuned", m, scores.get("fine_tuned"), dict(scores), n, small)
    fed = None
    for kind in ("fine_tuned", "global"):
        v = scores.get(kind)
        if v is not None and math.isfinite(v) and (fed is None or better(m, v, scores[fed])):
            fed = kind
    local = scores.get("local")
    if local is not None and math.isfinite(local):
        if fed is None or not better(m, _shifted(m, scores[fed], local, cfg.margin), local):
            return Choice(
                "local",
                m,
                local,
                dict(scores),
                n,
                f"best {m} on {n} validation rows (a federation candidate must lead by > {cfg.margin:g})",
            )
    if fed is None:
        return Choice("fine_tuned", m, None, dict(scores), n, "no candidate could be scored on the validation rows")
    return Choice(fed, m, scores[fed], dict(scores), n, f"best {m} on {n} validation rows")


def _shifted(metric: str, v: float, local: float, margin: float) -> float:
    """A federation candidate's score less the margin it must lead local-only by."""
    return v - margin if metric == "roc_auc" else v + margin * local


def predict(spec: ModelSpec, params: dict[str, np.ndarray], x: np.ndarray, model_seed: int = 0) -> np.ndarray:
    """The line's score for rows ``x`` (normalised): probability or value, as the ONNX model returns it."""
    import torch

    from models import Scorer

    model = build(spec, params, model_seed)
    with torch.no_grad():
        return Scorer(model, spec).eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy().ravel()


def build(spec: ModelSpec, params: dict[str, np.ndarray], model_seed: int = 0):
    """A torch model holding ``params`` (every parameter: shared and personal)."""
    import torch

    from models import build_model

    model = build_model(spec, seed=model_seed)
    state = model.state_dict()
    for name, arr in params.items():
        state[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    model.load_state_dict(state)
    return model


def _train(
    spec: ModelSpec,
    start: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    epochs: int,
    lr: float,
    cfg: PersonalConfig,
    model_seed: int,
) -> dict[str, np.ndarray]:
    """Noise-free SGD from ``start`` (every parameter), the edge's own round without DP."""
    import torch

    from edge.config import TrainingConfig
    from edge.trainer import train_round
    from models.flat import personal_state, shared_state

    if epochs == 0 or len(x) < 2:
        return dict(start)
    model = build(spec, start, model_seed)
    torch.manual_seed(cfg.seed)
    tcfg = TrainingConfig(
        epochs=epochs, batch_size=cfg.batch_size, lr=lr, momentum=cfg.momentum, threads=1, seed=cfg.seed
    )
    r = train_round(
        spec, shared_state(model, spec), personal_state(model, spec) or None, x, y, tcfg, None, model_seed=model_seed
    )
    return {**r.shared, **r.personal}


def train_local_only(
    spec: ModelSpec, x: np.ndarray, y: np.ndarray | None, cfg: PersonalConfig, model_seed: int = 0
) -> dict[str, np.ndarray]:
    """The plant's model on its own rows alone, from the federation's version 0, without noise."""
    from models import build_model
    from models.flat import personal_state, shared_state

    base = build_model(spec, seed=model_seed)
    return _train(
        spec,
        {**shared_state(base, spec), **personal_state(base, spec)},
        x,
        y,
        cfg.local_epochs,
        cfg.local_lr,
        cfg,
        model_seed,
    )


def fine_tune(
    spec: ModelSpec,
    global_params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    cfg: PersonalConfig,
    model_seed: int = 0,
) -> dict[str, np.ndarray]:
    """The global model (with the site's personal parameters) trained on for a few noise-free epochs."""
    return _train(spec, global_params, x, y, cfg.finetune_epochs, cfg.finetune_lr, cfg, model_seed)


def validation_scores(
    spec: ModelSpec,
    candidates: dict[str, dict[str, np.ndarray]],
    x_val: np.ndarray,
    y_val: np.ndarray | None,
    model_seed: int = 0,
) -> dict[str, float]:
    """Each candidate's metric on the validation rows (NaN when it cannot be computed)."""
    if y_val is None or len(y_val) == 0:
        return {k: math.nan for k in candidates}
    y = np.asarray(y_val, dtype=np.float64).reshape(len(y_val), -1)[:, 0]
    return {k: score(metric_name(spec), y, predict(spec, p, x_val, model_seed)) for k, p in candidates.items()}


class Personaliser:
    """The site's candidates across versions: the local-only model is kept, the fine-tune redone per version."""

    def __init__(self, cfg: PersonalConfig, spec: ModelSpec, model_seed: int = 0) -> None:
        self.cfg = cfg
        self.spec = spec
        self.model_seed = model_seed
        self.local: dict[str, np.ndarray] | None = None
        self.local_rows = 0
        self.choice: Choice | None = None

    def choose(
        self,
        global_params: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray | None,  # None for an anomaly model (no labels)
        x_val: np.ndarray,
        y_val: np.ndarray | None,
    ) -> tuple[dict[str, np.ndarray], Choice]:
        """The parameters the line serves and the choice, for this global model and these rows."""
        if len(x) >= 2 and (self.local is None or len(x) >= self.local_rows * (1 + self.cfg.retrain_growth)):
            self.local = train_local_only(self.spec, x, y, self.cfg, self.model_seed)
            self.local_rows = len(x)
        candidates = {
            "fine_tuned": fine_tune(self.spec, global_params, x, y, self.cfg, self.model_seed),
            "global": dict(global_params),
        }
        if self.local is not None:
            candidates["local"] = self.local
        scores = validation_scores(self.spec, candidates, x_val, y_val, self.model_seed)
        self.choice = pick(self.spec, scores, y_val, self.cfg, local_evidence(self.spec, y, len(x)))
        return candidates[self.choice.kind], self.choice
