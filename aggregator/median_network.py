"""The coordinate-wise median of a few stacked deltas with a min/max selection network.

Why: the median (``robust = "median"``; the default reduce until 1 Dec 2026, now
minimum-diameter averaging) runs on every version over K deltas of the whole model. ``ndarray.sort(axis=0)`` on a
(K, P) stack visits P strided columns of K values one by one (about 10 ms of CPU
per update at 1M parameters and K = 10 here). A comparator network does the
same selection as a fixed sequence of whole-row ``np.minimum`` / ``np.maximum``
calls (SIMD, on cache-sized blocks of columns), about four times cheaper.

The network is Batcher's odd-even merge sort for the next power of two (Knuth,
TAOCP vol. 3, 5.3.4), with the padding wires (+inf: a comparator against them
does nothing) and every comparator the middle output(s) do not need removed
(checked on every 0/1 input: for 9 rows, the known optimum of 19). A comparator network permutes each column's values into sorted order
at the wires it keeps, so the middle values, and the mean of the two middle
values for an even K computed as ``np.median`` does, are the very floats
``sort`` gives: the result is bit-identical (one exception: a column whose
middle holds both +0.0 and -0.0 may come out with the other zero's sign, which
no sum or product of the model can tell apart except a model weight of -0.0).
"""

from __future__ import annotations

import functools

import numpy as np

MAX_K = 20  # up to here a network beats ndarray.sort (K = 20, 1M parameters: 2.7x); it grows as K log² K
_PRUNE_K = 16  # up to here redundant comparators are searched for one by one (under 0.3 s at 16)
_BLOCK = 1 << 16  # columns per block: K rows of 256 kB stay in the cache while the network runs

#: one comparator on wires (i, j), i < j, and which of its outputs are still needed (min at i, max at j)
Step = tuple[int, int, bool, bool]


def _batcher(m: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for ``m`` (a power of two) wires."""
    out: list[tuple[int, int]] = []
    p = 1
    while p < m:
        k = p
        while k >= 1:
            for j in range(k % p, m - k, 2 * k):
                for i in range(min(k, m - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        out.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return out


def _prune(k: int, comparators: list[tuple[int, int]]) -> list[Step]:
    """Keep a comparator only if an output it writes is still read by a later one or is a middle wire."""
    need = {k // 2} if k % 2 else {k // 2 - 1, k // 2}
    steps: list[Step] = []
    for i, j in reversed(comparators):  # backwards: what is read later is known
        ni, nj = i in need, j in need
        if ni or nj:
            steps.append((i, j, ni, nj))
            need |= {i, j}
    steps.reverse()
    return steps


def _selects_the_middle(k: int, steps: list[Step], columns: np.ndarray) -> bool:
    """Whether ``steps`` leave every 0/1 column's middle value(s) on the middle wire(s) (for an even ``k``
    the two middle values in either order: their mean is the median)."""
    rows = [columns[r].copy() for r in range(k)]
    for i, j, need_min, need_max in steps:
        a, b = rows[i], rows[j]
        if need_max:
            rows[j] = np.maximum(a, b)
        if need_min:
            rows[i] = np.minimum(a, b)
    ones = columns.sum(axis=0, dtype=np.int32)  # sorted, a column is k - ones zeros then ones
    if k % 2:
        return bool(np.array_equal(rows[k // 2], ones >= k - k // 2))
    got = rows[k // 2 - 1].astype(np.int32) + rows[k // 2]
    return bool(np.array_equal(got, (ones >= k - k // 2 + 1).astype(np.int32) + (ones >= k - k // 2)))


@functools.cache
def network(k: int) -> tuple[Step, ...]:
    """The selection network whose wires ``k // 2`` (odd ``k``) or ``k // 2 - 1, k // 2`` hold the middle.

    Built once per ``k`` (under 0.3 s) and checked on all ``2**k`` columns of zeros and ones: by
    the 0-1 principle (Knuth 5.3.4) a comparator network that selects the middle of every 0/1 input
    does so for every input.
    """
    if not 1 <= k <= MAX_K:
        raise ValueError(f"a median network is built for 1 to {MAX_K} rows, not {k}")
    m = 1 << (k - 1).bit_length()
    # padding wires >= k hold +inf; Batcher's comparators have i < j, so (real, pad) leaves the real at i
    comparators = [(i, j) for i, j in _batcher(m) if j < k]
    columns = ((np.arange(1 << k, dtype=np.uint32) >> np.arange(k, dtype=np.uint32)[:, None]) & 1).astype(np.uint8)
    at = 0
    while k <= _PRUNE_K and at < len(comparators):  # drop, one at a time, the comparators the middle does not need
        trial = comparators[:at] + comparators[at + 1 :]
        if _selects_the_middle(k, _prune(k, trial), columns):
            comparators = trial
        else:
            at += 1
    steps = _prune(k, comparators)
    if not _selects_the_middle(k, steps, columns):  # pragma: no cover - the construction above guarantees it
        raise AssertionError(f"the median network for {k} rows does not select the middle")
    return tuple(steps)


def median_rows(stacked: np.ndarray) -> np.ndarray:
    """The median along axis 0 of a C-contiguous float32 ``(k, ...)`` stack (``k <= MAX_K``), which it overwrites.

    The same floats as ``stacked.sort(axis=0)`` followed by the middle row (odd ``k``) or
    ``stacked[k//2 - 1 : k//2 + 1].mean(axis=0, dtype=np.float32)`` (even ``k``).
    """
    k = stacked.shape[0]
    flat = stacked.reshape(k, -1)
    if not stacked.flags.c_contiguous or stacked.dtype != np.float32:
        raise ValueError("median_rows needs a C-contiguous float32 stack (it works in place)")
    steps = network(k)
    width = flat.shape[1]
    out = np.empty(width, np.float32)
    spare = np.empty(min(_BLOCK, width), np.float32)
    for start in range(0, width, _BLOCK):
        rows = [flat[r, start : start + _BLOCK] for r in range(k)]
        free = spare[: rows[0].shape[0]]  # the previous block's rows are dead: its buffers may be reused
        for i, j, need_min, need_max in steps:
            a, b = rows[i], rows[j]
            if need_min and need_max:
                np.minimum(a, b, out=free)
                np.maximum(a, b, out=b)
                rows[i], free = free, a  # the min now lives in the spare buffer; a's buffer is free
            elif need_min:
                np.minimum(a, b, out=a)
            else:
                np.maximum(a, b, out=b)
        dest = out[start : start + _BLOCK]
        if k % 2:
            dest[...] = rows[k // 2]
        else:  # np.mean's float32 arithmetic: one addition, then a division by the count
            np.add(rows[k // 2 - 1], rows[k // 2], out=dest)
            np.true_divide(dest, np.float32(2), out=dest)
    return out.reshape(stacked.shape[1:])
