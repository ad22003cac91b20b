"""The model specification: the one description every party agrees on.

Why a plain frozen dataclass without torch: the spec is read from a site's TOML
file (``fedline.config.parse``), travels inside the signed model manifest as
JSON, and is read by the line-inference service, which must not import torch.
Everything needed to rebuild the exact same network (and so the exact same
parameter names and shapes) is in here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from fedline.config import parse

# with a standardisation but no declared range, the model saturates its inputs this many spreads
# (input_scale) from their centre (input_mean): ModelSpec.saturation
DEFAULT_RANGE_SPREADS = 6.0

Kind = Literal["mlp", "cnn1d", "gru", "autoencoder"]
Task = Literal["classification", "regression", "anomaly"]


@dataclass(frozen=True)
class ModelSpec:
    """Shape and purpose of a federation's model.

    - ``kind``: ``mlp`` (tabular rows, or a flattened window), ``cnn1d`` and
      ``gru`` (windows of ``window`` time steps), ``autoencoder`` (unsupervised
      anomaly detection; the score is the reconstruction error).
    - ``n_features``: values per time step.
    - ``hidden``: layer widths (MLP/autoencoder: dense layers, the last is the
      bottleneck of an autoencoder; cnn1d: conv channels; gru: the first is the
      GRU hidden size, further ones are dense layers after it).
    - ``n_outputs``: outputs of the head (1 for binary classification, regression
      of one value, and always 1 for ``anomaly``).
    - ``window``: time steps per sample; 1 for tabular rows.
    - ``personal``: parameter-name prefixes that stay at the site (FedPer style),
      e.g. ``["head."]``. Every model has a ``body`` and a ``head`` submodule.
    - ``input_mean`` / ``input_scale``: optional per-feature standardisation
      baked into the network (``(x - mean) / scale``), so every site and the
      line inference feed raw plant units. Empty means identity.
    - ``input_low`` / ``input_high``: optional per-feature saturation range, in the units the model is fed
      (a ``[rows]`` feature with an engineering range arrives in [0, 1]). The network clamps every input
      to it before anything else, so the torch model and its ONNX export answer an out-of-range reading
      exactly as they answer the range's edge, for every consumer and whatever the line's ``[rows] clip``.
      Why in the model (issue 14): a backdoor trained on a trigger outside every honest site's data moves
      weights no honest row constrains; saturating the input makes such a trigger unreachable. The
      autoencoder's reconstruction target is not clamped, so an out-of-range reading still scores as an
      anomaly. Both or neither. Left out with a standardisation declared (``input_mean`` /
      ``input_scale``), the model saturates to ``mean ± DEFAULT_RANGE_SPREADS · scale`` instead
      (:meth:`saturation`); with neither, no saturation.
    """

    kind: Kind
    n_features: int
    hidden: list[int] = field(default_factory=lambda: [32, 16])
    n_outputs: int = 1
    task: Task = "classification"
    window: int = 1
    personal: list[str] = field(default_factory=list)
    input_mean: list[float] = field(default_factory=list)
    input_scale: list[float] = field(default_factory=list)
    input_low: list[float] = field(default_factory=list)
    input_high: list[float] = field(default_factory=list)

    def validate(self) -> None:
        """Cross-field checks; ``fedline.config.parse`` reports them against the table."""
        if self.n_features < 1:
            raise ValueError(f"n_features must be at least 1, got {self.n_features}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.n_outputs < 1:
            raise ValueError(f"n_outputs must be at least 1, got {self.n_outputs}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {self.hidden}")
        if (self.kind == "autoencoder") != (self.task == "anomaly"):
            raise ValueError(
                f"kind {self.kind!r} with task {self.task!r}: an autoencoder is for task "
                "'anomaly', and task 'anomaly' needs kind 'autoencoder'"
            )
        if self.task == "anomaly" and self.n_outputs != 1:
            raise ValueError("task 'anomaly' has one output (the reconstruction error); set n_outputs = 1")
        if self.kind in ("cnn1d", "gru") and self.window < 2:
            raise ValueError(f"kind {self.kind!r} reads windows; set window to 2 or more")
        for name in ("input_mean", "input_scale"):
            values = getattr(self, name)
            if values and len(values) != self.n_features:
                raise ValueError(f"{name} has {len(values)} values but n_features is {self.n_features}")
            if any(not math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite numbers")
        self._validate_input_range()
        if any(v <= 0 for v in self.input_scale):
            raise ValueError("input_scale values must be positive")
        if any(not p for p in self.personal):
            raise ValueError("personal prefixes must be non-empty strings")

    def _validate_input_range(self) -> None:
        low, high = self.input_low, self.input_high
        if bool(low) != bool(high):
            raise ValueError("input_low and input_high go together: give both (one value per feature) or neither")
        for name, values in (("input_low", low), ("input_high", high)):
            if values and len(values) != self.n_features:
                raise ValueError(f"{name} has {len(values)} values but n_features is {self.n_features}")
            if any(not math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be finite numbers")
        bad = [i for i, (lo, hi) in enumerate(zip(low, high)) if not lo < hi]
        if bad:
            raise ValueError(f"input_low must be below input_high for every feature; not for feature(s) {bad}")

    def saturation(self) -> tuple[list[float], list[float]]:
        """The per-feature range the network clamps its inputs to: ``(low, high)``, or two empty lists (none).

        The declared ``input_low`` / ``input_high``; else, if the federation declared a standardisation,
        ``mean ± DEFAULT_RANGE_SPREADS · scale``. Why that default (issue 14): the standardisation is the
        federation's own public statement of each input's centre and spread; a reading six spreads out is
        beyond any near-Gaussian sensor's honest data (and by Chebyshev beyond at most 1/36 of any
        distribution's with that spread), so clamping there keeps a trigger far outside every honest row
        (where no honest update constrains the weights) from reaching the network. The cost: an honest rare
        reading beyond it scores as the range's edge (docs/architecture.md gives AI4I's figures); a
        declared range always takes precedence.
        """
        if self.input_low:
            return list(self.input_low), list(self.input_high)
        if not self.input_mean:
            return [], []
        scale = self.input_scale or [1.0] * self.n_features
        r = DEFAULT_RANGE_SPREADS
        return [m - r * s for m, s in zip(self.input_mean, scale)], [m + r * s for m, s in zip(self.input_mean, scale)]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample without the batch axis: ``(n_features,)`` or ``(window, n_features)``."""
        return (self.n_features,) if self.window == 1 else (self.window, self.n_features)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the model manifest)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, file: str | None = None, where: str = "spec") -> ModelSpec:
        """Parse a dict (manifest JSON or TOML table) with the same checks as a config file."""
        return parse(cls, d, file=file, where=where)
