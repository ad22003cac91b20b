"""How long tests wait for something that should happen: the written timeout times a patience factor.

A wait that succeeds returns the moment its condition holds, so a generous bound costs a passing run
nothing; only a failing run waits it out. The written timeouts are what a quiet 2-core machine needs with
room to spare; a loaded CI machine (or one shared with other jobs) can be several times slower at process
start-up (importing torch alone takes seconds of CPU), so every wait is multiplied by
``FEDLINE_TEST_PATIENCE`` (default 3). Set it to 1 to see the written bounds.
"""

from __future__ import annotations

import os

DEFAULT_PATIENCE = 3.0


def patience() -> float:
    """The factor from ``FEDLINE_TEST_PATIENCE`` (a positive number), default 3."""
    raw = os.environ.get("FEDLINE_TEST_PATIENCE", "")
    try:
        value = float(raw) if raw else DEFAULT_PATIENCE
    except ValueError:
        raise ValueError(f"FEDLINE_TEST_PATIENCE must be a positive number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"FEDLINE_TEST_PATIENCE must be a positive number, got {raw!r}")
    return value


def bound(seconds: float) -> float:
    """``seconds`` times the patience factor."""
    return seconds * patience()
