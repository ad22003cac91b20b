"""The networks: small enough for a line-side PC, and trainable with Opacus.

Every model has two submodules, ``body`` and ``head``, so a personalisation
split by name prefix (``personal = ["head."]``) means the same thing for every
kind. Only layers Opacus can compute per-sample gradients for are used (Linear,
Conv1d, Opacus's own DPGRU — plain ``nn.GRU`` is refused by Opacus), and no
BatchNorm, which DP-SGD cannot use.

``forward`` returns what training needs (logits, values, or the
reconstruction); :class:`Scorer` turns that into the score the line sees.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from fedline.opacus_parts import opacus_module
from models.spec import ModelSpec


class _Standardise(nn.Module):
    """Saturate to the spec's range (:meth:`ModelSpec.saturation`), then ``(x - mean) / scale``: constants from the spec
    (buffers, never trained or sent). Without a range in the spec the clamp is not in the graph at all."""

    mean: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        n = spec.n_features
        self.saturate = bool(spec.saturation()[0])  # declared, or the default from the standardisation
        for name, values in self._constants(spec).items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).reshape(n))

    @staticmethod
    def _constants(spec: ModelSpec) -> dict[str, list[float]]:
        n = spec.n_features
        low, high = spec.saturation()
        return {
            "mean": spec.input_mean or [0.0] * n,
            "scale": spec.input_scale or [1.0] * n,
            "low": low or [-math.inf] * n,
            "high": high or [math.inf] * n,
        }

    def fill(self, spec: ModelSpec) -> None:
        """Set the constants again (a model built on ``meta`` has no values yet)."""
        for name, values in self._constants(spec).items():
            getattr(self, name).copy_(torch.tensor(values, dtype=torch.float32))

    def forward(self, x: torch.Tensor, saturate: bool = True) -> torch.Tensor:
        if saturate and self.saturate:  # Min then Max in ONNX (Clip takes only scalar bounds)
            x = torch.maximum(torch.minimum(x, self.high), self.low)
        return (x - self.mean) / self.scale


def _dense(sizes: list[int], *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Dense layers over a row (or a flattened window)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.norm = _Standardise(spec)
        d_in = spec.window * spec.n_features
        self.body = _dense([d_in, *spec.hidden], last_activation=True)
        self.head = nn.Linear(spec.hidden[-1], spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(x).flatten(1)))


class CNN1d(nn.Module):
    """1D convolutions over time, then a mean over time steps (any window length)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.norm = _Standardise(spec)
        layers: list[nn.Module] = []
        channels = [spec.n_features, *spec.hidden]
        for a, b in itertools.pairwise(channels):
            layers += [nn.Conv1d(a, b, kernel_size=3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(spec.hidden[-1], spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.norm(x).transpose(1, 2))  # (B, C, T)
        return self.head(h.mean(dim=2))


class GRU(nn.Module):
    """Opacus's DPGRU over the window, the last hidden state through dense layers."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.norm = _Standardise(spec)
        # per-sample gradients need Opacus's GRU (fedline.opacus_parts: without Opacus's every accountant)
        self.body = opacus_module("layers").DPGRU(spec.n_features, spec.hidden[0], batch_first=True)
        self.dense = _dense(list(spec.hidden), last_activation=True)
        self.head = nn.Linear(spec.hidden[-1], spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.body(self.norm(x))
        return self.head(self.dense(out[:, -1, :]))


class Autoencoder(nn.Module):
    """Encoder (``body``) down to the last hidden width, decoder (``head``) back up.

    Its forward returns the reconstruction in standardised units, so the
    training loss and the anomaly score do not depend on the plant's units.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.norm = _Standardise(spec)
        d_in = spec.window * spec.n_features
        self.body = _dense([d_in, *spec.hidden], last_activation=True)
        self.head = _dense([*reversed(spec.hidden), d_in], last_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(x).flatten(1)))

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """The target the reconstruction is compared with: not saturated, so a reading outside the
        spec's input range still reconstructs badly (it is an anomaly) though the encoder sees it clamped."""
        return self.norm(x, saturate=False).flatten(1)


_KINDS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d, "gru": GRU, "autoencoder": Autoencoder}


def build_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """Build the network for ``spec`` with a deterministic initialisation.

    Why seeded: the aggregator and every site build version 0 independently and
    must get bit-identical weights. Why a private generator (never torch's
    global one): a site draws its DP noise in a worker thread while models are
    built for ONNX export; seeding or even advancing the process-global
    generator here would make that noise predictable or correlated. The
    modules are created on the ``meta`` device (no random draws at all), given
    storage, and filled from ``torch.Generator().manual_seed(seed)`` with PyTorch's
    default schemes (Kaiming-uniform for Linear/Conv, Opacus's uniform for DPGRU).
    """
    spec.validate()
    with torch.device("meta"):
        model = _KINDS[spec.kind](spec)
    _materialise(model)
    _initialise(model, spec, torch.Generator().manual_seed(seed))
    return model.float()


def _materialise(model: nn.Module) -> None:
    """Give every ``meta`` parameter and buffer real (uninitialised) CPU storage, in place.

    Why not ``Module.to_empty``: its first call imports some 500 torch modules
    (seconds of start-up for every process that builds a model).
    """
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _initialise(model: nn.Module, spec: ModelSpec, gen: torch.Generator) -> None:
    """Fill every parameter and constant buffer of a freshly materialised model, drawing only from ``gen``."""
    import sys

    # only a GRU model has imported Opacus's RNN layers; importing Opacus here would cost every MLP
    # process (the aggregator) seconds of start-up
    dp_rnn = sys.modules.get("opacus.layers.dp_rnn")
    DPRNNBase = dp_rnn.DPRNNBase if dp_rnn is not None else ()

    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _Standardise):
                module.fill(spec)
            elif isinstance(module, DPRNNBase):  # as DPRNNBase.reset_parameters
                # materialising replaced the renamed aliases (weight_ih_l0, ...) apart from the cells' own
                # parameters; tie them again, or the optimiser would see two copies of each
                module._register_renamed_parameters()
                bound = 1.0 / math.sqrt(module.hidden_size)
                for p in module.parameters():
                    p.uniform_(-bound, bound, generator=gen)
                    done.add(id(p))
            elif isinstance(module, (nn.Linear, nn.Conv1d)) and id(module.weight) not in done:
                # as nn.Linear / nn.Conv1d.reset_parameters: kaiming_uniform_(a=sqrt(5)) = U(±1/sqrt(fan_in))
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                done.add(id(module.weight))
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    module.bias.uniform_(-bound, bound, generator=gen)
                    done.add(id(module.bias))
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise TypeError(f"build_model does not know how to initialise {missed}: add its layer type to _initialise")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside an Opacus ``GradSampleModule`` (which prefixes names with ``_module.``)."""
    while hasattr(model, "_module") and isinstance(model._module, nn.Module):
        model = model._module
    return model


def loss_per_sample(model: nn.Module, spec: ModelSpec, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Loss of each sample, shape ``(B,)``: BCE for classification, MSE for regression and reconstruction.

    ``y`` is ``(B, n_outputs)`` (0/1 for classification); it is ignored for ``anomaly``.
    """
    out = model(x)
    if spec.task == "anomaly":
        target = unwrap(model).standardised(x)  # type: ignore[operator]
        return ((out - target) ** 2).mean(dim=1)
    assert y is not None, "a supervised task needs targets"
    y = y.reshape(out.shape).to(out.dtype)
    if spec.task == "classification":
        return nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none").mean(dim=1)
    return ((out - y) ** 2).mean(dim=1)


class Scorer(nn.Module):
    """What the line sees, output ``y`` of shape ``(B, n_outputs)``.

    - classification: the probability (sigmoid of the logit),
    - regression: the predicted value,
    - anomaly: the mean squared reconstruction error in standardised units, ``(B, 1)``.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model = unwrap(model)
        self.task = spec.task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.task == "classification":
            return torch.sigmoid(out)
        if self.task == "anomaly":
            target = self.model.standardised(x)  # type: ignore[operator]
            return ((out - target) ** 2).mean(dim=1, keepdim=True)
        return out
