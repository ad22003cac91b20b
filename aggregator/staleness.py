"""Staleness functions f(s): how much a late update still counts.

Staleness ``s = current_version - base_version``: how many global versions
appeared since the site downloaded the model it trained from. Following
FedAsync (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", 2019,
arXiv:1903.03934, section 5.2), f(0) = 1, f is non-increasing and never
exceeds 1:

- constant:   f(s) = 1
- polynomial: f(s) = (s + 1) ** (-a)
- hinge:      f(s) = 1 if s <= b else 1 / (a * (s - b) + 1)
"""

from __future__ import annotations

from collections.abc import Callable

StalenessFn = Callable[[int], float]


def constant(s: int) -> float:
    return 1.0


def polynomial(a: float) -> StalenessFn:
    def f(s: int) -> float:
        return float((s + 1) ** (-a))

    return f


def hinge(a: float, b: float) -> StalenessFn:
    def f(s: int) -> float:
        return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)

    return f


def make(kind: str, a: float = 0.5, b: float = 4.0) -> StalenessFn:
    """The function named in ``[strategy] staleness``."""
    if kind == "constant":
        return constant
    if kind == "polynomial":
        return polynomial(a)
    if kind == "hinge":
        return hinge(a, b)
    raise ValueError(f"unknown staleness function {kind!r}; expected constant, polynomial or hinge")
