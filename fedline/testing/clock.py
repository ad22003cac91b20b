"""Run a ``fedline`` command with its wall clock shifted: ``python -m fedline.testing.clock 420 edge --config site.toml``.

Why this and not libfaketime: every timestamp fedline writes or compares
(update headers, receipts, manifests, outbox resend timers, status ages) comes
from Python's ``time.time``/``time.time_ns`` or ``datetime.now``, so shifting
those in the child process is the skew that matters, and it needs no system
package. Monotonic clocks (timeouts, keep-alives, backoff) are not shifted:
a skewed wall clock does not make a machine's seconds longer.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time

_real_time = time.time
_real_time_ns = time.time_ns


def shift_wall_clock(offset_s: float) -> None:
    """Make ``time.time``, ``time.time_ns`` and ``datetime.now/utcnow`` run ``offset_s`` seconds off."""
    offset_ns = int(offset_s * 1e9)
    time.time = lambda: _real_time() + offset_s
    time.time_ns = lambda: _real_time_ns() + offset_ns

    class _SkewedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz: _dt.tzinfo | None = None) -> _dt.datetime:  # type: ignore[override]
            return _dt.datetime.fromtimestamp(time.time(), tz)

        @classmethod
        def utcnow(cls) -> _dt.datetime:  # type: ignore[override]
            return _dt.datetime.fromtimestamp(time.time(), _dt.UTC).replace(tzinfo=None)

    _dt.datetime = _SkewedDatetime  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m fedline.testing.clock OFFSET_SECONDS [fedline arguments...]", file=sys.stderr)
        return 2
    try:
        offset = float(argv[0])
    except ValueError:
        print(f"clock offset {argv[0]!r} is not a number of seconds", file=sys.stderr)
        return 2
    shift_wall_clock(offset)
    from fedline.cli import main as fedline_main  # imported after the shift: module-level time.time copies see it

    return fedline_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
