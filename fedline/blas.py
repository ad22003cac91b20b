"""One BLAS thread in the aggregator's processes: they run their own threads, BLAS must not add spinning ones.

Why: NumPy's OpenBLAS runs a matrix product on every core, and after each
call its worker threads keep spinning, waiting for the next one, for a while
(OpenBLAS's thread timeout). The aggregator's default reduce, minimum-diameter
averaging, takes the Gram matrix of the buffer's deltas (``x @ x.T`` over K
rows of the model's size, :mod:`aggregator.mda`) once per version: measured on
the 2-vCPU VM (1 Dec 2026), an idle 0.3 s just after an intake with that
reduce used 70 ms of CPU (0.02 ms after one with the mean, whose norms are
``dot`` calls that stay on one thread). The opening threads already keep both
cores busy, so BLAS's thread bought nothing and burned a core: at 100k
parameters the intake with that reduce cost 2.1-2.5 ms of CPU per update,
1.2-1.3 ms with one BLAS thread. In ``bench/aggregator.py`` the spinning was
also charged to the limit's loop timed just after (1.1-1.35 against 0.62-0.7 ms
per update at 100k). The same holds for any other process that runs the
aggregator's reduce or checks (intake workers, the reducer).

``OPENBLAS_NUM_THREADS=1`` does the same only if it is set before NumPy is
loaded; this works at any time, on the library NumPy loaded. Only OpenBLAS
(what NumPy's wheels ship) is handled; with another BLAS nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fedline.blas")

# the thread-count setters OpenBLAS builds export: plain, and the renamed ones of the scipy-openblas wheels
# NumPy ships (a ``scipy_`` prefix, and a ``64_`` suffix for the 64-bit-integer build)
_SETTERS = (
    "openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
)
_GETTERS = tuple(name.replace("set_", "get_") for name in _SETTERS)


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (Linux's /proc; none elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split(None, 5)[5] for line in maps.splitlines() if line.count(" ") >= 5 and "openblas" in line}
    return sorted(p for p in paths if ".so" in Path(p).name)


def _first(lib: ctypes.CDLL, names: tuple[str, ...]) -> Any:
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn
    return None


def one_blas_thread() -> bool:
    """Make the OpenBLAS that NumPy loaded use one thread; True if one was found and now runs one thread."""
    import numpy  # noqa: F401  (loads its BLAS, so that it is mapped)

    done = False
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = _first(lib, _SETTERS)
        if setter is not None:
            setter(ctypes.c_int(1))
            done = True
    if not done:
        log.debug("no OpenBLAS found in this process: its BLAS threads stay as they are")
    return done and blas_threads() == 1


def blas_threads() -> int | None:
    """Threads the loaded OpenBLAS uses (None when there is none, or it does not say)."""
    for path in _loaded_openblas():
        try:
            getter = _first(ctypes.CDLL(path), _GETTERS)
        except OSError:
            continue
        if getter is not None:
            getter.restype = ctypes.c_int
            return int(getter())
    return None


__all__ = ["blas_threads", "one_blas_thread"]
