"""The blend (:mod:`edge.blend`) as one torch module and one ONNX file, so the line hot-reloads a single model.

Why one graph: the line's inference loads one ONNX file per version and knows
nothing of candidates; a graph computing ``w * local(x) + (1 - w) * fed(x)``
keeps that contract (input ``x``, output ``y``), and the line's status reads
the kind and ``w`` from the file's metadata (``served``).
"""

from __future__ import annotations

import torch
from torch import nn

from edge.personal import Served, build
from models import Scorer, export_onnx
from models.export import export_scorer
from models.nets import unwrap
from models.spec import ModelSpec


class BlendScorer(nn.Module):
    """``w * a(x) + (1 - w) * b(x)`` of two scorers (each already the line's score: probability or value), or
    with ``log_odds`` ``sigmoid(w * a(x) + (1 - w) * b(x))`` of two classifiers' logits (``[personal]
    blend_space``: the line still receives a probability); ``floor``: ``a``'s logits floored there first
    (``[personal] fold_blend_floor``)."""

    def __init__(
        self, a: nn.Module, b: nn.Module, w: float, log_odds: bool = False, floor: float | None = None
    ) -> None:
        super().__init__()
        self.a, self.b, self.w, self.log_odds, self.floor = a, b, float(w), log_odds, floor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        if self.floor is not None:
            a = torch.clamp(a, min=float(self.floor))
        mixed = self.w * a + (1.0 - self.w) * self.b(x)
        return torch.sigmoid(mixed) if self.log_odds else mixed


def blend_scorer(
    spec: ModelSpec, local: nn.Module, fed: nn.Module, w: float, log_odds: bool = False, floor: float | None = None
) -> BlendScorer:
    """The blend of two models of ``spec`` (``w``: the local-only model's share), scoring as the line does;
    ``log_odds``: a classifier's parts mixed before their sigmoid, the local-only part's log-odds floored at
    ``floor`` when given."""
    if log_odds:
        if spec.task != "classification":
            raise ValueError(f"a log-odds blend needs a classifier, got task {spec.task!r}")
        return BlendScorer(unwrap(local), unwrap(fed), w, log_odds=True, floor=floor).eval()
    if floor is not None:
        raise ValueError("a floor applies to a log-odds blend only")
    return BlendScorer(Scorer(local, spec), Scorer(fed, spec), w).eval()


def export_blend(
    spec: ModelSpec, local: nn.Module, fed: nn.Module, w: float, log_odds: bool = False, floor: float | None = None
) -> bytes:
    """The blend as one ONNX graph with the line's contract: both models, the weight (and a floor) inside."""
    return export_scorer(blend_scorer(spec, local, fed, w, log_odds, floor), spec)


def export_served(spec: ModelSpec, served: Served, model_seed: int = 0) -> bytes:
    """The line's ONNX for what the pick serves: one candidate as it is, a blend of two as one graph."""
    if len(served.parts) == 1:
        return export_onnx(build(spec, served.parts[0][1], model_seed), spec)
    if len(served.parts) != 2 or abs(sum(w for w, _ in served.parts) - 1.0) > 1e-9:
        raise ValueError(f"a blend has two parts whose weights sum to 1, got {[w for w, _ in served.parts]}")
    (w, local), (_, fed) = served.parts
    local_m, fed_m = build(spec, local, model_seed), build(spec, fed, model_seed)
    return export_blend(spec, local_m, fed_m, w, served.log_odds, served.floor)
