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

Each copied tensor starts on a 64-byte boundary (a cache line). The copies
are read-only, like the views they replace.

Usually nothing is copied any more: the opener's ``seal_open`` places the
plaintext so that the first tensor starts on a 64-byte boundary
(:mod:`broker_bridge.sealopen`), and the float32 tensors behind it start on
multiples of 4 bytes, which is all NumPy needs for its fast paths (``np.dot``
and the reduce's ``acc += w * x`` measured the same at offsets 4, 12 and 64).
So a tensor counts as aligned when it is aligned for its dtype (NumPy's own
``aligned`` flag). Since the opener places a float32 update from its end (its
tensors end the plaintext, ``seal_open(tail=...)``), headers of any length are
placed; only an update of another size whose headers were too long to read
before opening (:data:`broker_bridge.sealopen.PEEK_BYTES`) is still copied here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ALIGN = 64


def is_aligned(a: np.ndarray) -> bool:
    """Whether ``a`` starts on a multiple of its item size (NumPy's ``aligned`` flag: then no copy is needed)."""
    return bool(a.flags.aligned)


def aligned(tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """``tensors`` themselves when every one starts aligned, else aligned read-only copies (same names, order)."""
    for a in tensors.values():  # a loop reading the flag (is_aligned's test): a generator and a call per tensor cost
        if not a.flags.aligned:  # 0.5-1 us per update
            break
    else:
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
