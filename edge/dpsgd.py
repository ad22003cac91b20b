"""DP-SGD's step (per-sample clipping, Gaussian noise, SGD with momentum), computed as Opacus's ``DPOptimizer`` over
torch's ``SGD`` compute it, without importing either.

Why: the two classes cost an edge's start more than anything but torch itself. Importing
``opacus.optimizers.optimizer`` imports ``torch.distributed.tensor`` (for a type hint and ``isinstance`` checks on
sharded tensors), and with it SymPy and torch.fx's symbolic shapes; torch's optimizers import ``torch._dynamo`` on
their first construction and step (torch wraps them for ``torch.compile``), whether or not anything is compiled.
Measured on the 2-vCPU VM (1 Dec 2026, fresh processes): 1.2-1.6 s of CPU per edge of a start of 3.2-4.4 s, for
what is a dozen tensor operations per step (BENCHMARKS.md, "Edge start-up without torch._dynamo").

What it computes, in this order and on these dtypes (Opacus 1.6.0, torch 2.13; ``loss_reduction="mean"``, one
backward pass per step):

1. ``clip_and_accumulate``: each sample's gradient norm over every parameter (the norm of the per-parameter norms),
   the clip factor ``min(1, C / (norm + 1e-6))``, and the clipped sum ``einsum("i,i...", factor, grad_sample)``; an
   empty Poisson batch gives a zero sum;
2. ``add_noise``: ``N(0, (σC)²)`` per coordinate from the step's generator (``_generate_noise``: with
   ``secure_mode`` one draw thrown away, then the sum of four draws halved);
3. ``scale_grad``: the noisy sum divided by the expected batch size;
4. torch's single-tensor SGD (the CPU path: torch has no foreach kernels on CPU) for what fedline sets: ``lr`` and
   ``momentum``; no dampening, Nesterov or weight decay. The first step's momentum buffer is the gradient.

The same generator state therefore gives the same parameters bit for bit (``tests/edge/test_dpsgd.py`` runs it
against Opacus's ``DPOptimizer`` over torch's ``SGD``, with and without secure mode, with an empty batch, and
without DP against torch's ``SGD`` alone). Opacus's guard against a gradient used twice is kept as its own check:
a step without a ``zero_grad`` since the last one is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DPSGD:
    """SGD with momentum over ``params``; with ``noise_multiplier`` set, DP-SGD (module docstring).

    Without DP the parameters' ``.grad`` is used as is (a noise-free round); with DP their ``.grad_sample``
    (Opacus's ``GradSampleModule``) is clipped, summed, noised and scaled into ``.grad`` first. ``noise_steps``
    counts the steps that added noise."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        momentum: float = 0.0,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        expected_batch_size: int = 1,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = int(expected_batch_size)
        self.generator = generator
        self.secure_mode = secure_mode
        self.noise_steps = 0
        self._buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self._used = False  # a step since the last zero_grad: its gradients must not be used again

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (and with DP the per-sample ones, always to None, as Opacus does)."""
        for p in self.params:
            if self.private:
                p.grad_sample = None  # type: ignore[attr-defined]
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad.detach_().zero_()
        self._used = False

    def step(self) -> None:
        """One step: with DP clip, noise and scale into ``.grad`` first; then SGD."""
        if self._used:
            raise ValueError("gradients have not been cleared since the last step: call zero_grad() before each step")
        with torch.no_grad():
            if self.private:
                self._privatise()
            self._sgd()
        self._used = True

    def _privatise(self) -> None:
        samples = [_flat_grad_sample(p) for p in self.params]
        passes = {_passes(p) for p in self.params}  # Opacus's ``accumulated_iterations``
        if len(passes) != 1:
            raise ValueError("the per-sample gradients of the parameters come from different numbers of passes")
        if len(samples[0]) == 0:
            factor = torch.zeros((0,), device=samples[0].device)
        else:
            norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        assert self.noise_multiplier is not None
        std = self.noise_multiplier * self.max_grad_norm
        for p, g in zip(self.params, samples, strict=True):
            summed = torch.einsum("i,i...", factor.to(g.device).to(p.dtype), g.to(p.dtype))
            p.grad = (summed + self._noise(std, summed)).view_as(p)
            p.grad /= self.expected_batch_size * next(iter(passes))
        self.noise_steps += 1

    def _noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """Opacus's ``_generate_noise``, draw for draw."""
        zeros = torch.zeros(reference.shape, device=reference.device, dtype=reference.dtype)
        if std == 0:
            return zeros
        if self.secure_mode:
            torch.normal(mean=0, std=std, size=(1, 1), device=reference.device, generator=self.generator)
            total = zeros
            for _ in range(4):
                total += torch.normal(
                    mean=0, std=std, size=reference.shape, device=reference.device, generator=self.generator
                )
            return total / 2
        return torch.normal(
            mean=0,
            std=std,
            size=reference.shape,
            device=reference.device,
            generator=self.generator,
            dtype=reference.dtype,
        )

    def _sgd(self) -> None:
        """torch's single-tensor SGD: momentum buffer ``b ← μ·b + g`` (the first is ``g``), ``p ← p − lr·b``."""
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue  # as torch's SGD: a parameter without a gradient is not stepped
            if self.momentum != 0:
                buf = self._buffers[i]
                if buf is None:
                    buf = self._buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def _flat_grad_sample(p: torch.Tensor) -> torch.Tensor:
    """A parameter's per-sample gradients as one tensor (a list when a module ran twice before the step)."""
    sample = getattr(p, "grad_sample", None)
    if sample is None:
        raise ValueError("no per-sample gradient: the model must be wrapped in Opacus's GradSampleModule")
    return torch.cat(sample, dim=0) if isinstance(sample, list) else sample


def _passes(p: torch.Tensor) -> int:
    """How many backward passes a parameter's per-sample gradients hold (Opacus keeps a list after the first)."""
    sample = getattr(p, "grad_sample", None)
    return len(sample) if isinstance(sample, list) else 1


__all__ = ["DPSGD"]
