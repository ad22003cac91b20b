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

import torch
from torch import nn

from models.spec import ModelSpec


class _Standardise(nn.Module):
    """``(x - mean) / scale`` with constants from the spec (buffers, never trained or sent)."""

    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        n = spec.n_features
        mean = spec.input_mean or [0.0] * n
        scale = spec.input_scale or [1.0] * n
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def _dense(sizes: list[int], *, last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
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
        for a, b in zip(channels[:-1], channels[1:]):
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
        from opacus.layers import DPGRU  # per-sample gradients need Opacus's GRU

        self.norm = _Standardise(spec)
        self.body = DPGRU(spec.n_features, spec.hidden[0], batch_first=True)
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
        """The target the reconstruction is compared with."""
        return self.norm(x).flatten(1)


_KINDS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d, "gru": GRU, "autoencoder": Autoencoder}


def build_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """Build the network for ``spec`` with a deterministic initialisation.

    Why seeded: the aggregator and every site build version 0 independently and
    must get bit-identical weights. The global RNG is forked so the caller's
    random state is untouched.
    """
    spec.validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _KINDS[spec.kind](spec)
    return model.float()


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
