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
``min_local_positives`` of the rarer class (regression: units or rows) keeps
its local-only model, since nothing on validation shows a federation
candidate better and its own model had enough to learn from (a mid-size plant
whose validation slice drew few failures); a site with fewer (the smallest
plant, whose own model learnt from a dozen failures or a handful of engines)
compares the candidates on folds of its own training units as well
(:mod:`edge.unit_folds`: each row scored by models that did not train on it)
and serves the one those folds and its validation rows favour, instead of
serving the fine-tuned model blind.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edge import blend
from edge.blend import best_weight, mix
from edge.paired_evidence import Evidence, auc_evidence, mse_evidence
from edge.version_average import VersionAverage
from models.metrics import better, score
from models.spec import ModelSpec

if TYPE_CHECKING:
    from edge.dataset import Dataset

KINDS = ("local", "global", "fine_tuned", "blend")
#: The candidates that replace local-only only on evidence (the pick's switching rule): the blend is one
FEDERATION = ("fine_tuned", "global", "blend")


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
    # regression with a [dataset] group_column: fewer validation units (engines, machines) cannot decide.
    # 5 is the fewest on which a paired comparison can be significant at 5 % whatever the errors' shape
    # (a sign test over 4 units, all four in the challenger's favour, has p = 1/16 > 0.05)
    min_validation_units: int = 5
    # validation too small to decide: a site whose training rows hold at least this much independent evidence
    # keeps local-only, one with less serves the fine-tuned model. Classification: rows of the rarer class
    # (failures); regression: units of the group column (each engine run to failure is one failure), or rows
    # when there is no group column (independent rows)
    min_local_positives: int = 30
    # validation too small and less local evidence than that: the candidates are compared on this many folds of
    # the site's training units (edge/unit_folds.py) instead of serving the fine-tuned model blind; 0 = off
    cross_folds: int = 5
    # a federation candidate replaces local-only only when a one-sided paired test on the validation rows
    # (edge/paired_evidence.py) says it is better with p below this (shared by the federation candidates:
    # each is tested at switch_alpha / their number), so validation noise does not swap a plant's own model.
    # 0.2 (each of the two at 0.1) was chosen on split seeds 10-19 of both demo data sets (docs/tuning.md)
    switch_alpha: float = 0.2
    # the blend candidate (edge/blend.py): the local-only model's shares w tried for w * local + (1 - w) * the
    # better federation candidate, on the same evidence as the pick; empty = no blend
    blend_weights: tuple[float, ...] = (0.25, 0.5, 0.75)
    # a small site deciding on its training folds (cross_folds): the blend's weights there, and it is served when
    # it scores better than local-only on the pool (no switch to a federation model alone); empty = the eighth
    # pass's switching rule on the pool. (0.75,) was chosen on split seeds 10-19 of both demo data sets
    # (docs/tuning.md, ninth pass)
    fold_blend_weights: tuple[float, ...] = (0.75,)
    # the federation model a small site's fold blend mixes in: "fine_tuned" (the global model fine-tuned on the
    # site's rows, noise-free), or "best" (the better-scoring of global and fine-tuned on the pool, the ninth
    # pass). Not chosen by the pool's score: the global model trained, under DP, on the very rows the folds hold
    # out, so the pool flatters it over the fine-tune, whose fold models never saw their fold without noise.
    # "fine_tuned" was chosen on split seeds 200-209 of both demo data sets (docs/tuning.md, tenth pass).
    # "by_task" (the default): "global" for a classifier blending log-odds, "fine_tuned" otherwise (regression,
    # or a probability blend): in log-odds the global partner put the smallest AI4I site ahead in 9, 9, 9 and 8 of
    # 10 development splits (fine-tuned: 8, 9, 9, 8), while on C-MAPSS it cost the smallest site 9 -> 7
    # (docs/tuning.md, twelfth pass, R4g). "global" names it for every task
    fold_blend_of: Literal["by_task", "fine_tuned", "global", "best"] = "by_task"
    # the mean of the last this many global versions the site adopted (edge/version_average.py: DP noise
    # averaged out, ε unchanged) is what the fine-tune starts from; 1 = the newest version alone
    average_versions: int = 5
    # what the average replaces: "fine_tune" (only the fine-tune's start) or "both" (the global candidate too).
    # 5 and "both" were chosen on split seeds 300-309 of both demo data sets (docs/tuning.md, eleventh pass)
    average_for: Literal["fine_tune", "both"] = "both"
    # the fine-tuned candidate is the weight mean of this many noise-free fine-tunes from the same start, each on
    # its own shuffle of the rows (a fine-tune of a few epochs moves a small site's score by its batches' order)
    finetune_repeats: int = 1
    # a classifier's blend mixes its parts' log-odds ("log_odds": sigmoid(w * logit_local + (1 - w) * logit_fed),
    # the logarithmic opinion pool) or their probabilities ("probability", the ninth to eleventh passes). The
    # plant's noise-free model is confident: in probability a three-quarter share of it leaves the partner too
    # little to reorder the rows it is unsure of, so the blend tied it. "log_odds" was chosen on split seeds
    # 300-309, three federation draws (docs/tuning.md, twelfth pass). Regression blends values either way
    blend_space: Literal["log_odds", "probability"] = "log_odds"
    # a small site's log-odds fold blend: "spread" gives local-only the share fold_blend_weights names once each
    # part's log-odds are divided by their standard deviation on the pool (edge/blend.py spread_matched: the
    # plant's noise-free model spreads them 1-4 times as wide as the DP global model, so a nominal 0.75 share
    # was a 0.85 one on average); "raw" mixes the log-odds as they are (the twelfth and thirteenth passes). Chosen on
    # split seeds 300-339, two federation draws (docs/tuning.md, fourteenth pass). Regression and probability
    # blends mix values on one scale already, and the validation rule's blend picks its weight on its rows
    fold_blend_scale: Literal["spread", "raw"] = "spread"
    # a small site's log-odds fold blend floors the plant's own model's log-odds at this quantile of them on the fold
    # pool (max(logit_local, floor), on the pool and in the served graph); 0 = no floor. Below its lower quartile
    # the plant's model says "very normal" with a confidence it learnt from a handful of failures, and a
    # three-fifths share of log-odds 20-30 below the normal rows' kept a failure mode it had barely seen (a power
    # failure) below every normal row whatever the partner said (docs/tuning.md, eighteenth pass)
    fold_blend_floor: float = 0.25
    # the validation rule's blends: "each" (every weight of blend_weights with every federation partner is a
    # candidate of its own with its own paired test, all of them in the switching test's Bonferroni share), or
    # "chosen" (the first to fourteenth passes: the weight and partner that score best on the validation rows are
    # picked, then tested on those same rows as one candidate, so the chance that noise alone switches a site was
    # above switch_alpha). "each" was chosen on split seeds 300-309 of both demo data sets (docs/tuning.md,
    # fifteenth pass)
    blend_tests: Literal["each", "chosen"] = "each"
    seed: int = 0

    def validate(self) -> None:
        if self.finetune_epochs < 0 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("finetune_epochs must be >= 0, local_epochs and batch_size >= 1")
        if self.finetune_lr <= 0 or self.local_lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("finetune_lr and local_lr must be > 0 and momentum in [0, 1)")
        if not 0 < self.switch_alpha <= 1:
            raise ValueError(f"switch_alpha must be in (0, 1], got {self.switch_alpha}")
        if self.retrain_growth < 0 or self.min_validation_rows < 1 or self.min_validation_positives < 1:
            raise ValueError("retrain_growth must be >= 0, min_validation_rows and min_validation_positives >= 1")
        if self.min_validation_units < 2:
            raise ValueError(
                f"min_validation_units must be >= 2 (a paired test needs two), got {self.min_validation_units}"
            )
        if self.min_local_positives < 0:
            raise ValueError(f"min_local_positives must be >= 0, got {self.min_local_positives}")
        if self.cross_folds < 0 or self.cross_folds == 1:
            raise ValueError(f"cross_folds must be 0 (off) or >= 2, got {self.cross_folds}")
        blend.check_grid(self.blend_weights)
        blend.check_grid(self.fold_blend_weights)
        if self.fold_blend_of not in ("by_task", "fine_tuned", "global", "best"):
            raise ValueError(
                f"fold_blend_of must be 'by_task', 'fine_tuned', 'global' or 'best', got {self.fold_blend_of!r}"
            )
        if self.average_versions < 1 or self.finetune_repeats < 1:
            raise ValueError(
                f"average_versions and finetune_repeats must be >= 1, got {self.average_versions} "
                f"and {self.finetune_repeats}"
            )
        if self.average_for not in ("fine_tune", "both"):
            raise ValueError(f"average_for must be 'fine_tune' or 'both', got {self.average_for!r}")
        if self.blend_space not in ("log_odds", "probability"):
            raise ValueError(f"blend_space must be 'log_odds' or 'probability', got {self.blend_space!r}")
        if not 0.0 <= self.fold_blend_floor < 1.0:
            raise ValueError(f"fold_blend_floor must be in [0, 1), got {self.fold_blend_floor}")
        if self.fold_blend_scale not in ("spread", "raw"):
            raise ValueError(f"fold_blend_scale must be 'spread' or 'raw', got {self.fold_blend_scale!r}")
        if self.blend_tests not in ("each", "chosen"):
            raise ValueError(f"blend_tests must be 'each' or 'chosen', got {self.blend_tests!r}")


#: Which rule decided a choice (the site's status says it): the paired test kept local-only or switched away
#: from it; the validation slice was too small and the local evidence decided; there was no local-only model.
RULES = (
    "paired_test_kept_local",
    "paired_test_switched",
    "too_small_kept_local",
    "too_small_fine_tuned",
    "too_small_folds_kept_local",
    "too_small_folds_switched",
    "too_small_folds_blended",
    "no_local",
)


@dataclass(frozen=True)
class FoldEvidence:
    """The candidates scored on the site's training rows out of fold, pooled with its validation rows
    (:mod:`edge.unit_folds`): what a site whose validation slice is too small decides on."""

    scores: dict[str, float]
    tests: dict[str, Evidence]  # each federation candidate against local-only on the pooled rows
    rows: int
    units: int  # independent units the pooled rows hold (rows, or groups)
    folds: int
    blend: BlendFit | None = None  # the blend's weight chosen on the pooled rows


@dataclass
class Choice:
    """Which candidate the line serves and why (the site's status and the line's model file say so)."""

    kind: str
    metric: str  # roc_auc | rmse (regression: in the model's normalised target units)
    validation_metric: float | None  # the served candidate's, on the validation rows
    candidates: dict[str, float | None] = field(default_factory=dict)
    validation_rows: int = 0
    reason: str = ""
    rule: str = ""  # one of RULES
    p: float | None = None  # the paired test's one-sided p of the federation candidate it ran on
    # kind "blend" (edge/blend.py): the local-only model's share w and the federation candidate it is blended with
    weight: float | None = None
    blend_of: str | None = None
    blend_space: str | None = None  # a blend's: what it mixes, "log_odds" or "probability" ([personal] blend_space)
    # the global versions whose mean the fine-tune started from (edge/version_average.py); None: the newest alone
    averaged_versions: list[int] | None = None
    # a fold blend's floor under the local-only part's log-odds ([personal] fold_blend_floor)
    floor: float | None = None

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None or not math.isfinite(v) else round(float(v), 4)
        return {
            "kind": self.kind,
            "weight": self.weight,
            "blend_of": self.blend_of,
            "blend_space": self.blend_space,
            "metric": self.metric,
            "validation_metric": r(self.validation_metric),
            "candidates": {k: r(v) for k, v in self.candidates.items()},
            "validation_rows": self.validation_rows,
            "rule": self.rule,
            "p": r(self.p),
            "reason": self.reason,
            "averaged_versions": self.averaged_versions,
            "floor": r(self.floor),
        }


@dataclass(frozen=True)
class BlendOption:
    """One blend of the validation rule's (``blend_tests = "each"``): its weight, partner, score and paired test."""

    weight: float
    of: str
    score: float
    evidence: Evidence


@dataclass(frozen=True)
class BlendFit:
    """The blend candidate on one body of evidence: the local-only model's share and its federation partner."""

    weight: float
    of: str  # fine_tuned | global: the better-scoring of the two on the same evidence
    nominal: float | None = None  # with spread matching (edge/blend.py spread_matched): the grid's w it matched
    floor: float | None = None  # the floor under the local-only part's log-odds ([personal] fold_blend_floor)
    # blend_tests = "each": every weight with every partner, each tested against local-only (the pick's switching
    # rule counts each one); weight and of are then the best-scoring one's (what the status shows as the blend)
    options: tuple[BlendOption, ...] = ()


@dataclass(frozen=True)
class Served:
    """What the line serves: one candidate's parameters, or a blend's two with their weights
    (``w`` for local-only, ``1 - w`` for the federation model; :mod:`edge.blend_export` writes it as one ONNX)."""

    parts: tuple[tuple[float, dict[str, np.ndarray]], ...]
    log_odds: bool = False  # a classifier's parts are mixed in log-odds (``[personal] blend_space``)
    floor: float | None = None  # log-odds: the first part's (local-only's) log-odds floored here before the mix

    def predict(self, spec: ModelSpec, x: np.ndarray, model_seed: int = 0) -> np.ndarray:
        """The served score of rows ``x`` (normalised): the weighted sum of the parts' scores (with ``log_odds``,
        the sigmoid of the weighted sum of their log-odds)."""
        if self.log_odds and len(self.parts) > 1:
            z = sum(w * self._logits(spec, i, p, x, model_seed) for i, (w, p) in enumerate(self.parts))
            return (1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))).astype(np.float32)
        return sum(w * predict(spec, p, x, model_seed) for w, p in self.parts)  # type: ignore[return-value]

    def _logits(self, spec: ModelSpec, i: int, p: dict[str, np.ndarray], x: np.ndarray, model_seed: int) -> np.ndarray:
        """Part ``i``'s log-odds, the first (local-only) floored at ``floor`` when one is set."""
        z = blend_scores(spec, p, x, True, model_seed)
        return np.maximum(z, self.floor) if i == 0 and self.floor is not None else z


def metric_name(spec: ModelSpec) -> str:
    return "roc_auc" if spec.task == "classification" else "rmse"


def too_small(
    spec: ModelSpec, y_val: np.ndarray | None, cfg: PersonalConfig, units: Sequence[object] | None = None
) -> str | None:
    """Why the validation rows cannot tell the candidates apart, or None when they can.

    ``units``: each validation row's unit (``[dataset] group_column``), or None when rows are independent.
    """
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
    elif units is not None and len(set(units)) < cfg.min_validation_units:
        return f"validation slice too small to decide: {len(set(units))} units < {cfg.min_validation_units}"
    return None


def local_evidence(spec: ModelSpec, y_fit: np.ndarray | None, n_rows: int, train_units: int | None = None) -> int:
    """What the local-only model learnt from: training rows of the rarer class (regression: units, else rows).

    Regression with a group column counts units, not rows: the rows of one engine are one trajectory, one
    failure, and a model fitted to five engines has seen five whatever their length.
    An anomaly model has no labels to score a candidate by: 0, so it serves the fine-tuned model as before.
    """
    if y_fit is None:
        return 0
    if spec.task != "classification":
        return n_rows if train_units is None else train_units
    pos = int(np.sum(np.asarray(y_fit) > 0.5))
    return min(pos, len(y_fit) - pos)


def pick(
    spec: ModelSpec,
    scores: dict[str, float],
    y_val: np.ndarray | None,
    cfg: PersonalConfig,
    evidence: int = 0,
    tests: dict[str, Evidence] | None = None,
    units: Sequence[object] | None = None,
    folds: FoldEvidence | None = None,
    fit: BlendFit | None = None,
) -> Choice:
    """Local-only, unless the paired test on the validation rows shows a federation candidate better.

    Local-only is the plant's own alternative to joining, so a federation
    candidate replaces it only when ``tests[kind]`` (that candidate against
    local-only on the same validation rows, :mod:`edge.paired_evidence`) has a
    one-sided p below ``cfg.switch_alpha`` shared by the candidates tested
    (Bonferroni: each at alpha / their number, so the chance that noise alone
    switches a site is at most alpha); of those that pass, the best score wins.
    When the slice is too small to decide, ``evidence`` (:func:`local_evidence`
    of the training rows) decides: at least ``cfg.min_local_positives`` keeps
    local-only; with less, when ``folds`` is given (the candidates scored out of
    fold on the training units and on the validation rows,
    :mod:`edge.unit_folds`), the same switching rule decides on that larger
    body of evidence; without it the fine-tuned model is served.
    """
    m = metric_name(spec)
    n = 0 if y_val is None else len(y_val)
    tests = tests or {}
    small = too_small(spec, y_val, cfg, units)
    if small is not None:
        if evidence >= cfg.min_local_positives and "local" in scores:  # scores hold every candidate there is
            what = "rows of its rarer class" if spec.task == "classification" else ("units" if units else "rows")
            reason = f"{small}; local-only kept: it trained on {evidence} {what} (>= {cfg.min_local_positives})"
            return Choice("local", m, scores["local"], dict(scores), n, reason, "too_small_kept_local")
        if folds is not None and _finite(folds.scores.get("local")):
            return _on_folds(
                m, scores, folds, cfg, n, f"{small}; local-only trained on {evidence} (< {cfg.min_local_positives}), so"
            )
        why = f"{small}; fine-tuned served: local-only trained on {evidence} (< {cfg.min_local_positives})"
        return Choice("fine_tuned", m, scores.get("fine_tuned"), dict(scores), n, why, "too_small_fine_tuned")
    fed = [k for k in ("fine_tuned", "global") if _finite(scores.get(k))]  # no blend without local-only
    local = scores.get("local")
    if not _finite(local):
        if not fed:
            return Choice("fine_tuned", m, None, dict(scores), n, "no candidate could be scored", "no_local")
        best = _best(m, fed, scores)
        return Choice(
            best, m, scores[best], dict(scores), n, f"no local-only model; best {m} on validation", "no_local"
        )
    options = fit.options if fit is not None else ()
    kind, said, p, switched, option = _switch(m, scores, tests, cfg, "validation", units is not None, options)
    rule = "paired_test_switched" if switched else "paired_test_kept_local"
    if option is not None:  # one blend of several, each tested on its own
        c = Choice(kind, m, option.score, dict(scores), n, said, rule, p, weight=option.weight)
        c.blend_of = option.of
        return c
    return _blended(Choice(kind, m, scores[kind], dict(scores), n, said, rule, p), fit)


def _on_folds(m: str, scores: dict[str, float], folds: FoldEvidence, cfg: PersonalConfig, n: int, small: str) -> Choice:
    """A small site's choice on its training folds pooled with its validation rows (:mod:`edge.unit_folds`).

    With ``fold_blend_weights`` (the default): the blend of local-only and the fine-tuned model (``fold_blend_of``) at
    the grid's best weight on the pool, when it scores better there than local-only; else local-only. Not a
    switch to a federation model alone: the pool flatters the global model (it trained, under DP, on these
    rows), and a blend that keeps a share of the plant's own model hedges that (docs/tuning.md, ninth pass).
    Without them: the switching rule on the pool (the eighth pass)."""
    where = f"{folds.folds} training folds + validation"
    fb, b, local = folds.blend, folds.scores.get(blend.KIND), folds.scores["local"]
    if cfg.fold_blend_weights and fb is not None and b is not None and _finite(b):
        if better(m, b, local):
            matched = "" if fb.nominal is None else f" ({fb.nominal:g} on the parts' common scale)"
            why = (
                f"{small}: blend {fb.weight:.4g} x local-only + {1 - fb.weight:.4g} x {fb.of}{matched} scores {m} "
                f"{b:.4g} on {folds.rows} {where} rows against local-only's {local:.4g}"
            )
            if fb.floor is not None:
                why += f"; local-only's log-odds floored at {fb.floor:.4g}"
            c = Choice(blend.KIND, m, None, dict(scores), n, why, "too_small_folds_blended", weight=fb.weight)
            c.blend_of, c.floor = fb.of, fb.floor
            return c
        why = f"{small}: local-only kept: its {m} {local:.4g} on {folds.rows} {where} rows >= the blend's {b:.4g}"
        return Choice("local", m, scores.get("local"), dict(scores), n, why, "too_small_folds_kept_local")
    kind, said, p, switched, _ = _switch(m, folds.scores, folds.tests, cfg, where, folds.units < folds.rows)
    return Choice(kind, m, scores.get(kind), dict(scores), n, f"{small}: {said}", FOLD_RULES[switched], p)


def _blended(c: Choice, fit: BlendFit | None) -> Choice:
    """A choice of the blend names its weight and partner (the line's status shows them)."""
    if c.kind == blend.KIND:
        if fit is None:
            raise ValueError("the blend was picked without its fit")
        c.weight, c.blend_of = fit.weight, fit.of
    return c


def served_of(candidates: dict[str, dict[str, np.ndarray]], c: Choice, log_odds: bool = False) -> Served:
    """The parameters a choice serves: its candidate's, or the blend's two parts with their weights (``log_odds``:
    mixed as log-odds, :func:`uses_log_odds`)."""
    if c.kind != blend.KIND:
        return Served(((1.0, candidates[c.kind]),))
    if c.weight is None or c.blend_of is None:
        raise ValueError("a blend choice needs its weight and partner")
    parts = ((c.weight, candidates["local"]), (1.0 - c.weight, candidates[c.blend_of]))
    return Served(parts, log_odds, c.floor if log_odds else None)


#: The rule names of a choice made on the folds' evidence: kept local-only, or switched away from it.
FOLD_RULES = {False: "too_small_folds_kept_local", True: "too_small_folds_switched"}


def _switch(
    m: str,
    scores: dict[str, float],
    tests: dict[str, Evidence],
    cfg: PersonalConfig,
    rows: str,
    grouped: bool,
    options: Sequence[BlendOption] = (),
) -> tuple[str, str, float | None, bool, BlendOption | None]:
    """The switching rule on one body of evidence (the validation rows, or those plus the training folds):
    local-only unless a federation candidate's one-sided paired test against it has p < switch_alpha / the
    number tested; of those that pass, the best score. With ``options`` (``blend_tests = "each"``) every blend
    there is a candidate of its own in that count, in place of the one blend whose weight and partner the same
    rows picked (testing only that one, on the rows that picked it, is the smallest p of several tests; counting
    each keeps the chance that noise alone switches a site at most switch_alpha). Returns the kind, why, the p it
    rests on, switched?, and the blend option served (None unless one of ``options`` won)."""
    fed = [k for k in FEDERATION if _finite(scores.get(k)) and not (options and k == blend.KIND)]
    named: list[tuple[str, float, Evidence, BlendOption | None]] = [
        (k, scores[k], tests[k], None) for k in fed if k in tests and math.isfinite(tests[k].p)
    ]
    named += [(blend.KIND, o.score, o.evidence, o) for o in options if _finite(o.score) and math.isfinite(o.evidence.p)]
    level = cfg.switch_alpha / max(1, len(named))
    passing = [c for c in named if c[2].p < level]
    if not passing:
        if not named:
            return "local", "local-only kept: no paired test could be run", None, False, None
        closest = min(named, key=lambda c: c[2].p)
        ev = closest[2]
        what = "units" if ev.test == "paired-mse" and grouped else "rows"
        said = f"{_named(closest)} vs local-only on {ev.units} {rows} {what}: p = {ev.p:.3g} >= {level:.3g}"
        return "local", f"local-only kept: {said}", ev.p, False, None
    best = passing[0]
    for c in passing[1:]:
        if better(m, c[1], best[1]):
            best = c
    ev = best[2]
    said = (
        f"{_named(best)} better than local-only on {rows}: p = {ev.p:.3g} < {level:.3g} ({ev.test}, {ev.units} units)"
    )
    return best[0], said, ev.p, True, best[3]


def _named(c: tuple[str, float, Evidence, BlendOption | None]) -> str:
    """A candidate of the switching rule as its reason names it (a blend option with its weight and partner)."""
    o = c[3]
    return c[0] if o is None else f"blend {o.weight:g} x local-only + {1 - o.weight:g} x {o.of}"


def _best(metric: str, kinds: Sequence[str], scores: dict[str, float]) -> str:
    """The best-scoring of ``kinds`` (the first on a tie: fine-tuned before global)."""
    best = kinds[0]
    for k in kinds[1:]:
        if better(metric, scores[k], scores[best]):
            best = k
    return best


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def predict(spec: ModelSpec, params: dict[str, np.ndarray], x: np.ndarray, model_seed: int = 0) -> np.ndarray:
    """The line's score for rows ``x`` (normalised): probability or value, as the ONNX model returns it."""
    import torch

    from models import Scorer

    model = build(spec, params, model_seed)
    with torch.no_grad():
        return Scorer(model, spec).eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy().ravel()


def uses_log_odds(spec: ModelSpec, cfg: PersonalConfig) -> bool:
    """Whether this site's blends mix log-odds: a classifier with ``blend_space = "log_odds"``."""
    return spec.task == "classification" and cfg.blend_space == "log_odds"


def fold_partner(spec: ModelSpec, cfg: PersonalConfig) -> str | None:
    """The federation candidate a small site's fold blend mixes in (``[personal] fold_blend_of``); None = the
    pool's better-scoring one. "by_task" picks by what the blend mixes: the global model for a classifier's
    log-odds blend (there its conviction reorders the rows the plant's model is unsure of), the fine-tuned one
    otherwise (for regression the global partner cost the smallest C-MAPSS site; docs/tuning.md, twelfth pass)."""
    if cfg.fold_blend_of == "best":
        return None
    if cfg.fold_blend_of == "by_task":
        return "global" if uses_log_odds(spec, cfg) else "fine_tuned"
    return cfg.fold_blend_of


def blend_scores(
    spec: ModelSpec, params: dict[str, np.ndarray], x: np.ndarray, log_odds: bool, model_seed: int = 0
) -> np.ndarray:
    """What a blend mixes, for rows ``x``: the line's score (:func:`predict`), or with ``log_odds`` the
    classifier's log-odds, its logit before the sigmoid (float32 probabilities saturate at 1 above a logit of
    about 17, where the partner could no longer reorder rows). ROC AUC and DeLong's test rank rows, so
    evidence scored on log-odds is scored as on probabilities; only the blend differs."""
    if not log_odds:
        return predict(spec, params, x, model_seed)
    import torch

    with torch.no_grad():
        model = build(spec, params, model_seed).eval()
        return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy().ravel()


def build(spec: ModelSpec, params: dict[str, np.ndarray], model_seed: int = 0):
    """A torch model holding ``params`` (every parameter: shared and personal)."""
    import torch

    from models import build_model

    model = build_model(spec, seed=model_seed)
    state = model.state_dict()
    for name, arr in params.items():
        state[name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a copy: decoded tensors may be read-only
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
    tag: str = "",
) -> dict[str, np.ndarray]:
    """Noise-free SGD from ``start`` (every parameter), the edge's own round without DP, its batches' order
    seeded from ``cfg.seed``, ``tag`` and the rows (:func:`replay_seed`), so a replay trains the same model."""
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
        spec,
        shared_state(model, spec),
        personal_state(model, spec) or None,
        x,
        y,
        tcfg,
        None,
        model_seed=model_seed,
        shuffle_seed=replay_seed(cfg.seed, tag, x, y),
    )
    return {**r.shared, **r.personal}


def replay_seed(seed: int, tag: str, x: np.ndarray, y: np.ndarray | None) -> int:
    """The shuffle seed of a noise-free training run: a 63-bit BLAKE2b digest of ``seed``, ``tag`` (which model:
    local-only, the n-th fine-tune) and the rows.

    Why: the local-only model is the yardstick the line is judged against and a part of its blend; shuffled from
    the OS's generator it moved a small site's ROC AUC by up to 0.10 between two runs of the same split
    (docs/tuning.md, tenth pass). Seeded from what it trains on, the same rows train the same model in every run
    and every replay, and two sites (other rows) still get their own orders. These models never leave the
    plant, so a predictable order costs no privacy (DP rounds stay CSPRNG-drawn: :func:`edge.trainer.train_round`).
    """
    import hashlib

    h = hashlib.blake2b(f"{seed}/{tag}/".encode(), digest_size=8)
    h.update(np.ascontiguousarray(x).tobytes())
    if y is not None:
        h.update(np.ascontiguousarray(y).tobytes())
    return int.from_bytes(h.digest(), "big") >> 1


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
        "local",
    )


def fine_tune(
    spec: ModelSpec,
    global_params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    cfg: PersonalConfig,
    model_seed: int = 0,
) -> dict[str, np.ndarray]:
    """The global model (with the site's personal parameters) trained on for a few noise-free epochs; with
    ``cfg.finetune_repeats`` > 1 the weight mean of that many such fine-tunes, each on its own (seeded) shuffle."""
    runs = [
        _train(spec, global_params, x, y, cfg.finetune_epochs, cfg.finetune_lr, cfg, model_seed, f"fine_tune/{i}")
        for i in range(cfg.finetune_repeats)
    ]
    if len(runs) == 1:
        return runs[0]
    return {k: np.mean([r[k] for r in runs], axis=0).astype(np.float32) for k in runs[0]}


def validate(
    spec: ModelSpec,
    candidates: dict[str, dict[str, np.ndarray]],
    x_val: np.ndarray,
    y_val: np.ndarray | None,
    units: Sequence[object] | None = None,
    model_seed: int = 0,
    grid: Sequence[float] = (),
    log_odds: bool = False,
    each: bool = False,
) -> tuple[dict[str, float], dict[str, Evidence], BlendFit | None]:
    """Each candidate's metric on the validation rows (NaN when it cannot be computed), each federation
    candidate's paired test against local-only on those rows (:mod:`edge.paired_evidence`), and the blend's fit
    when ``grid`` has weights (:func:`compare`; ``log_odds``: the candidates scored by :func:`blend_scores`;
    ``each``: every blend tested on its own, ``[personal] blend_tests``)."""
    if y_val is None or len(y_val) == 0:
        return {k: math.nan for k in candidates}, {}, None
    preds = {k: blend_scores(spec, p, x_val, log_odds, model_seed) for k, p in candidates.items()}
    return compare(spec, y_val, preds, units, grid, each=each)


def compare(
    spec: ModelSpec,
    y_true: np.ndarray,
    preds: dict[str, np.ndarray],
    units: Sequence[object] | None = None,
    grid: Sequence[float] = (),
    partner: str | None = None,
    spread: bool = False,
    each: bool = False,
    floor_q: float = 0.0,
) -> tuple[dict[str, float], dict[str, Evidence], BlendFit | None]:
    """Each candidate's metric on rows ``y_true`` from its predictions, and each federation candidate's
    paired test against local-only on them (``units``: each row's unit, None when rows are independent).

    With a ``grid`` of weights (``[personal] blend_weights``) the blend (:mod:`edge.blend`) joins them: local-only
    blended with the better-scoring federation candidate (or ``partner`` when it could be scored) at the grid's
    best weight on these same rows; with ``spread`` each weight is the share on the parts' common scale
    (:func:`edge.blend.spread_matched` on these rows: what a log-odds blend's share means). With ``each`` every
    weight of the grid with every federation candidate is a blend of its own, scored and tested against
    local-only (``BlendFit.options``); the "blend" score is then the best-scoring one's. ``floor_q`` > 0 (a log-odds
    fold blend, ``[personal] fold_blend_floor``): the blend's local-only part is floored at that quantile of its
    scores on these rows, for the spread matching and the blend alike (local-only's own score is not)."""
    y = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)[:, 0]
    m = metric_name(spec)
    scores = {k: score(m, y, v) for k, v in preds.items()}
    fit = None
    fed = [k for k in ("fine_tuned", "global") if k in preds and _finite(scores[k])]
    if grid and fed and _finite(scores.get("local")) and each:
        fit = _each(m, y, preds, fed, grid, units)
        preds = {**preds, blend.KIND: mix(fit.weight, preds["local"], preds[fit.of])}
        scores[blend.KIND] = score(m, y, preds[blend.KIND])
    elif grid and fed and _finite(scores.get("local")):
        of = partner if partner in fed else _best(m, fed, scores)
        floor = float(np.quantile(preds["local"], floor_q)) if floor_q > 0 else None
        local = preds["local"] if floor is None else np.maximum(preds["local"], floor)
        fit = replace(_fit(m, y, local, preds[of], grid, of, spread), floor=floor)
        preds = {**preds, blend.KIND: mix(fit.weight, local, preds[of])}
        scores[blend.KIND] = score(m, y, preds[blend.KIND])
    tests: dict[str, Evidence] = {}
    if "local" in preds:
        for k in FEDERATION:
            if k in preds:
                tests[k] = (
                    auc_evidence(y, preds[k], preds["local"])
                    if m == "roc_auc"
                    else mse_evidence(y, preds[k], preds["local"], units)
                )
    return scores, tests, fit


def _each(
    m: str,
    y: np.ndarray,
    preds: dict[str, np.ndarray],
    fed: Sequence[str],
    grid: Sequence[float],
    units: Sequence[object] | None,
) -> BlendFit:
    """Every blend of ``grid`` x ``fed`` scored on rows ``y`` and tested against local-only; the fit names the
    best-scoring one (the first of equals, fed's order then the grid's)."""
    options = []
    for of in fed:
        for w in grid:
            b = mix(w, preds["local"], preds[of])
            ev = auc_evidence(y, b, preds["local"]) if m == "roc_auc" else mse_evidence(y, b, preds["local"], units)
            options.append(BlendOption(float(w), of, score(m, y, b), ev))
    top = options[0]
    for o in options[1:]:
        if better(m, o.score, top.score):
            top = o
    return BlendFit(top.weight, top.of, options=tuple(options))


def _fit(
    m: str, y: np.ndarray, local: np.ndarray, fed: np.ndarray, grid: Sequence[float], of: str, spread: bool
) -> BlendFit:
    """The blend's fit on rows ``y``: the grid's best weight, each matched to the parts' spread when asked."""
    if not spread:
        return BlendFit(best_weight(m, y, local, fed, grid), of)
    matched = {blend.spread_matched(w, local, fed): w for w in grid}
    share = best_weight(m, y, local, fed, list(matched))
    return BlendFit(share, of, matched[share])


class Personaliser:
    """The site's candidates across versions: the local-only model is kept, the fine-tune redone per version."""

    def __init__(self, cfg: PersonalConfig, spec: ModelSpec, model_seed: int = 0) -> None:
        self.cfg = cfg
        self.spec = spec
        self.model_seed = model_seed
        self.local: dict[str, np.ndarray] | None = None
        self.local_rows = 0
        self.choice: Choice | None = None
        # local-only models of the training folds (edge/unit_folds.py), kept while the training rows are the same
        self._fold_local: dict[int, dict[str, np.ndarray]] = {}
        self._fold_key = b""
        self.folds: FoldEvidence | None = None  # what the last too-small choice decided on
        # the recent global versions the site adopted, averaged (edge/version_average.py); None = newest only
        self.versions = VersionAverage(cfg.average_versions) if cfg.average_versions > 1 else None

    def choose(
        self,
        global_params: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray | None,  # None for an anomaly model (no labels)
        x_val: np.ndarray,
        y_val: np.ndarray | None,
        val_units: Sequence[object] | None = None,
        train_units: int | None = None,
        train_groups: Sequence[object] | None = None,
        split: str = "random",
        version: int | None = None,
    ) -> tuple[Served, Choice]:
        """What the line serves and the choice, for this global model and these rows.

        ``version``: the global model's version; with ``[personal] average_versions`` > 1 it joins the average
        of the recent versions (:mod:`edge.version_average`) the fine-tune starts from (and, with
        ``average_for = "both"``, that serves as the global candidate). None: this model alone.

        ``val_units``: each validation row's unit and ``train_units`` the number of units in the training
        rows (``[dataset] group_column``); None when rows are independent. ``train_groups`` (each training
        row's unit) and ``split`` (the dataset's held-out rule) cut the training rows into folds when the
        validation slice is too small (:mod:`edge.unit_folds`).
        """
        if len(x) >= 2 and (self.local is None or len(x) >= self.local_rows * (1 + self.cfg.retrain_growth)):
            self.local = train_local_only(self.spec, x, y, self.cfg, self.model_seed)
            self.local_rows = len(x)
        start, global_params, averaged = self._start(global_params, version)
        candidates = {
            "fine_tuned": fine_tune(self.spec, start, x, y, self.cfg, self.model_seed),
            "global": dict(global_params),
        }
        if self.local is not None:
            candidates["local"] = self.local
        log_odds, each = uses_log_odds(self.spec, self.cfg), self.cfg.blend_tests == "each"
        scores, tests, fit = validate(
            self.spec, candidates, x_val, y_val, val_units, self.model_seed, self.cfg.blend_weights, log_odds, each
        )
        evidence = local_evidence(self.spec, y, len(x), train_units)
        folds = None
        if (
            too_small(self.spec, y_val, self.cfg, val_units) is not None
            and evidence < self.cfg.min_local_positives
            and self.cfg.cross_folds >= 2
            and "local" in candidates
            and y is not None
        ):
            folds = self.fold_evidence(
                global_params, candidates, x, y, x_val, y_val, val_units, train_groups, split, start
            )
        self.folds = folds
        self.choice = pick(self.spec, scores, y_val, self.cfg, evidence, tests, val_units, folds, fit)
        self.choice.averaged_versions = averaged
        return self._serve(candidates, self.choice, x_val, y_val), self.choice

    def _serve(
        self, candidates: dict[str, dict[str, np.ndarray]], c: Choice, x_val: np.ndarray, y_val: np.ndarray | None
    ) -> Served:
        """What the choice serves; a blend's choice names what it mixes, and one the folds chose gets its
        validation metric (the folds scored it, the validation rows did not)."""
        log_odds = uses_log_odds(self.spec, self.cfg)
        if c.kind == blend.KIND:
            c.blend_space = "log_odds" if log_odds else "probability"
        served = served_of(candidates, c, log_odds)
        if c.validation_metric is None and y_val is not None and len(y_val):
            y1 = np.asarray(y_val, dtype=np.float64).reshape(len(y_val), -1)[:, 0]
            c.validation_metric = score(c.metric, y1, served.predict(self.spec, x_val))
        return served

    def _start(
        self, global_params: dict[str, np.ndarray], version: int | None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[int] | None]:
        """What the fine-tune starts from, the global candidate, and the versions averaged (None: the newest
        alone): the mean of the recent versions when ``average_versions`` > 1 and the version is known."""
        if self.versions is None or version is None:
            return global_params, global_params, None
        self.remember(version, global_params)
        if not self.versions.versions:  # version 0 alone: nothing trained to average
            return global_params, global_params, None
        mean = self.versions.mean()
        return mean, mean if self.cfg.average_for == "both" else global_params, self.versions.versions

    def remember(self, version: int, global_params: dict[str, np.ndarray]) -> None:
        """A global version the site adopted joins the average of recent versions (when one is kept); version 0,
        the untrained model every federation starts from, never does."""
        if self.versions is not None and version > 0:
            self.versions.add(version, global_params)

    def fold_evidence(
        self,
        global_params: dict[str, np.ndarray],
        candidates: dict[str, dict[str, np.ndarray]],
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray,
        y_val: np.ndarray | None,
        val_units: Sequence[object] | None,
        train_groups: Sequence[object] | None,
        split: str,
        start: dict[str, np.ndarray] | None = None,
    ) -> FoldEvidence | None:
        """The candidates scored out of fold on the training rows plus on the validation rows
        (:mod:`edge.unit_folds`); None when the training rows make fewer than two folds. ``start``: what the
        fold fine-tunes start from (the full fine-tune's start; default the global model)."""
        import hashlib

        from edge.unit_folds import fold_of_rows, out_of_fold

        log_odds = uses_log_odds(self.spec, self.cfg)
        grouped = split == "group" and train_groups is not None
        fold_split = split if grouped or split != "group" else "random"  # a group split without units: rows
        folds = fold_of_rows(len(x), self.cfg.cross_folds, fold_split, train_groups if grouped else None, y)
        k = len(np.unique(folds))
        if k < 2:
            return None
        key = hashlib.blake2b(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).digest()
        if key != self._fold_key:  # other training rows: the folds' local-only models are retrained
            self._fold_local, self._fold_key = {}, key

        def train(rows: np.ndarray, kind: str) -> dict[str, np.ndarray]:
            if kind == "local":
                return train_local_only(self.spec, x[rows], y[rows], self.cfg, self.model_seed)
            return fine_tune(
                self.spec, start if start is not None else global_params, x[rows], y[rows], self.cfg, self.model_seed
            )

        oof = out_of_fold(
            folds,
            train,
            lambda p, rows: blend_scores(self.spec, p, x[rows], log_odds, self.model_seed),
            global_params,
            self._fold_local,
        )
        y_all = np.asarray(y, dtype=np.float64).reshape(len(y), -1)[:, 0]
        # a grouped hold-out: training and validation units are disjoint, so the pooled rows' units are both lists
        units: list[object] | None = list(train_groups) if grouped and train_groups is not None else None
        if y_val is not None and len(y_val):
            val = {k2: blend_scores(self.spec, candidates[k2], x_val, log_odds, self.model_seed) for k2 in oof}
            oof = {k2: np.concatenate([v, val[k2]]) for k2, v in oof.items()}
            y_all = np.concatenate([y_all, np.asarray(y_val, dtype=np.float64).reshape(len(y_val), -1)[:, 0]])
            if units is not None:
                units += (
                    list(val_units) if val_units is not None else [f"validation row {i}" for i in range(len(y_val))]
                )
        scores, tests, fit = self._fold_compare(y_all, oof, units, log_odds)
        n_units = len(set(units)) if units is not None else len(y_all)
        return FoldEvidence(scores, tests, len(y_all), n_units, k, fit)

    def _fold_compare(
        self, y: np.ndarray, oof: dict[str, np.ndarray], units: list[object] | None, log_odds: bool
    ) -> tuple[dict[str, float], dict[str, Evidence], BlendFit | None]:
        """:func:`compare` on the fold pool with the fold blend's settings: its grid, partner, spread matching and
        (a log-odds blend) the floor under local-only's log-odds."""
        cfg = self.cfg
        spread = log_odds and cfg.fold_blend_scale == "spread"
        floor_q = cfg.fold_blend_floor if log_odds else 0.0
        partner = fold_partner(self.spec, cfg)
        return compare(self.spec, y, oof, units, cfg.fold_blend_weights, partner, spread, floor_q=floor_q)

    def choose_from(
        self, dataset: Dataset, global_params: dict[str, np.ndarray], version: int | None = None
    ) -> tuple[Served, Choice]:
        """:meth:`choose` on the site's stored rows: training and validation rows with their units."""
        x, y, units = dataset.arrays_with_units()
        x_val, y_val, val_units = dataset.arrays_with_units(holdout=True)
        grouped = dataset.split == "group"
        return self.choose(
            global_params,
            x,
            y,
            x_val,
            y_val,
            val_units if grouped else None,
            len(set(units)) if grouped else None,
            units if grouped else None,
            dataset.split,
            version,
        )
