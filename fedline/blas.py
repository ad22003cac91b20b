"""One BLAS thread per calling thread: the aggregator's processes run their own threads, BLAS must not add more.

Why: NumPy's OpenBLAS splits a long ``dot`` (the norm of every update the
aggregator validates, over 10,000 values) across every core, and after each
call its worker threads keep spinning, waiting for the next one, for a while
(OpenBLAS's thread timeout, about a tenth of a second). In the aggregator the
opening threads already keep both cores busy, so BLAS's extra thread bought
nothing and burned a core: measured on the 2-vCPU VM (1 Dec 2026), a loop of
decrypt + verify + axpy of 100k-parameter updates run just after an intake
took 1.12 ms of process CPU per update, 0.65 ms of it its own thread's and the
rest OpenBLAS's spinning thread; with one BLAS thread 0.63 ms. The same holds
for any other process that runs the aggregator's checks (intake workers, the
reducer) and for the benchmark, whose baseline loop runs in the bench's process.

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
