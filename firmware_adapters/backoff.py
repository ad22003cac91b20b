"""Reconnect delays: exponential with full jitter, capped.

Why jitter: after a switch reboot every line PC loses its PLC at once; without
jitter they would all hammer the PLC (or broker) in lockstep when it returns.
"""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 30.0, factor: float = 2.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (self.factor ** min(self._attempt, 60)))
        self._attempt += 1  # the exponent is capped: a PLC away for a week must not overflow a float
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0
