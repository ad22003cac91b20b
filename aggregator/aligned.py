"""An opened update's float32 tensors moved to aligned memory, once, before anything reads them.

Why: the tensors of an opened update are views into its plaintext, and where
their bytes start depends on the lengths of the JSON headers before them (the
site's name, its counter, its message id): three updates in four start at an
address that is not a multiple of 4. NumPy does not hand a misaligned float32
array to BLAS: ``np.dot`` then runs its own scalar loop, about 60x slower
(1M values: 7 ms against 0.11 ms here), and ufuncs go through a buffered path
(``acc += w * x``: 0.79 against 0.57 ms). Validation's norm and the reduce
both read every value, so one copy to aligned memory (one allocation for all
tensors, about 0.1 ms per 4 MB while the bytes are still in cache) costs
less than either pass saves.

Each tensor starts on a 64-byte boundary (a cache line: what SIMD loads and
BLAS like best). The copies are read-only, like the views they replace.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ALIGN = 64


def is_aligned(a: np.ndarray) -> bool:
    """Whether ``a`` starts on an :data:`ALIGN`-byte boundary (then no copy is needed)."""
    return a.ctypes.data % ALIGN == 0


def aligned(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``tensors`` themselves when every one starts aligned, else aligned read-only copies (same names, order)."""
    if all(is_aligned(a) for a in tensors.values()):
        return tensors
    sizes = [-(-a.nbytes // ALIGN) * ALIGN for a in tensors.values()]  # each rounded up to whole lines
    raw = np.empty(sum(sizes) + ALIGN, dtype=np.uint8)
    at = -raw.ctypes.data % ALIGN  # the first aligned byte of the block
    out: dict[str, np.ndarray] = {}
    for (name, a), size in zip(tensors.items(), sizes):
        copy = raw[at : at + a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(copy, a, casting="no")
        copy.flags.writeable = False
        out[name] = copy
        at += size
    return out
