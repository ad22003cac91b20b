"""How an update's delta is encoded in its tensor block: ``float32`` (default) or ``int8``.

``int8`` (issue 19) cuts an update to about a quarter of its float32 size. Each
tensor is flattened and cut into blocks of :data:`BLOCK` values; a block with
largest magnitude ``m`` gets the step ``s = m / 127`` (rounded *up* to float32,
so ``|x| / s <= 127`` holds exactly and no value can round to 128), and each
value ``x`` becomes ``q = floor(x / s + u)``, ``u ~ U[0, 1)``
(:func:`broker_bridge.rounding.stochastic_round`). So ``E[q s] = x`` (unbiased)
and ``|q s - x| < s`` (less than one step). On the wire the tensor ``name``
carries ``q`` (``|i1``, the tensor's shape) and ``name#scale`` the block steps
(``<f4``, ``ceil(size / BLOCK)`` of them); the signed header says
``encoding = "int8"``. Wire bytes per parameter: 1 + 4/1024.

Why blocks and not one step per tensor: a DP-noised delta is roughly Gaussian,
and the largest of 1M draws is ~5 sigma against ~3.3 sigma for 1,024, so the
step (and the rounding noise) is about a third smaller for 0.4 % more bytes.

Privacy: the encoding runs on the delta after DP-SGD has clipped and noised it,
and uses no data, only the released delta and independent randomness: it is
post-processing, so the site's epsilon is unchanged (docs/architecture.md).

The aggregator decodes before any content check (:mod:`aggregator.opener`):
names, shapes, finiteness and the norm bound are checked on the float32 values
it will apply. A malformed encoding (unknown name, a value tensor that is not
int8, a missing, mis-sized, negative, NaN, infinite or oversized scale) raises
:class:`WireError` with reason ``encoding`` naming the tensor and the fault.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from broker_bridge.errors import WireError
from broker_bridge.rounding import private_rng, stochastic_round

ENCODINGS = ("float32", "int8")
BLOCK = 1024
LEVELS = 127  # symmetric: the encoder never emits -128
SCALE_SUFFIX = "#scale"
# a step above this could make q * s overflow float32 (|q| <= 128 as decoded)
MAX_SCALE = float(np.finfo(np.float32).max) / 128


def n_blocks(size: int) -> int:
    """Number of scale entries a tensor of ``size`` values has."""
    return -(-size // BLOCK)


CHUNK_BLOCKS = 64  # blocks quantised at a time: 512 KiB of float64 temporaries stay in cache


def block_steps(blocks: np.ndarray) -> np.ndarray:
    """Per row of ``blocks`` (float64, one block per row), the smallest float32 ``s >= max|x| / 127``."""
    target = np.maximum(blocks.max(axis=1), -blocks.min(axis=1)) / LEVELS
    steps = target.astype(np.float32)
    low = steps.astype(np.float64) < target  # rounded down to float32: one ulp up
    steps[low] = np.nextafter(steps[low], np.float32(np.inf))
    return steps


def quantise(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One tensor -> (int8 values of its shape, float32 step per block)."""
    a = np.asarray(x)
    flat = a.reshape(-1)
    n = flat.size
    q = np.empty(n, dtype=np.int8)
    steps = np.empty(n_blocks(n), dtype=np.float32)
    for b0 in range(0, steps.size, CHUNK_BLOCKS):
        lo, hi = b0 * BLOCK, min(n, (b0 + CHUNK_BLOCKS) * BLOCK)
        k = n_blocks(hi - lo)
        part = np.zeros(k * BLOCK)
        part[: hi - lo] = flat[lo:hi]
        if not np.isfinite(part).all():
            raise ValueError("cannot quantise a tensor with NaN or infinity")
        blocks = part.reshape(k, BLOCK)
        s = block_steps(blocks)
        # a division, not a product with 1/s: correctly rounded, so |v| <= 127 exactly (an all-zero block: v = 0)
        blocks /= np.where(s > 0, s, 1).astype(np.float64)[:, None]
        v = stochastic_round(part[: hi - lo], rng)
        np.clip(v, -LEVELS, LEVELS, out=v)  # never active (|v| <= 127, u < 1): a guard against int8 wrap-around
        q[lo:hi] = v
        steps[b0 : b0 + k] = s
    return q.reshape(a.shape), steps


def dequantise(q: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """int8 values and their block steps -> float32 of ``q``'s shape (``q * s`` per block)."""
    out = q.reshape(-1).astype(np.float32)  # exact: int8 fits float32
    full = out.size // BLOCK
    if full:
        body = out[: full * BLOCK].reshape(full, BLOCK)
        body *= steps[:full, None]
    if out.size % BLOCK:
        out[full * BLOCK :] *= steps[full]
    return out.reshape(q.shape)


def encode(
    tensors: Mapping[str, np.ndarray], encoding: str, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """The tensor block an update carries for ``encoding`` (float32: the delta itself)."""
    if encoding == "float32":
        return dict(tensors)
    if encoding != "int8":
        raise ValueError(f"unknown update encoding {encoding!r}; one of {ENCODINGS}")
    rng = rng or private_rng()
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r} ends with {SCALE_SUFFIX!r}, reserved for int8 steps")
        out[name], out[name + SCALE_SUFFIX] = quantise(arr, rng)
    return out


def _refuse(detail: str) -> WireError:
    return WireError("encoding", detail)


def decode(tensors: Mapping[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    """Float32 tensors (in the order they were sent) from an update's tensor block, or ``WireError('encoding')``."""
    if encoding == "float32":
        return dict(tensors)
    if encoding != "int8":
        raise _refuse(f"unknown update encoding {encoding!r}; this build reads {', '.join(ENCODINGS)}")
    out: dict[str, np.ndarray] = {}
    for name, q in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise _refuse(f"scale tensor {name!r} has no value tensor")
            continue
        if q.dtype != np.int8:
            raise _refuse(f"{name!r} is {q.dtype}; an int8 update carries int8 values")
        steps = tensors.get(name + SCALE_SUFFIX)
        if steps is None:
            raise _refuse(f"{name!r} has no scale tensor {name + SCALE_SUFFIX!r}")
        want = n_blocks(q.size)
        if steps.dtype != np.float32 or steps.shape != (want,):
            raise _refuse(
                f"{name + SCALE_SUFFIX!r} is {steps.dtype} of shape {steps.shape}; "
                f"{q.size} values need float32 of shape ({want},) (one step per {BLOCK})"
            )
        if not np.isfinite(steps).all():
            raise _refuse(f"{name + SCALE_SUFFIX!r} holds NaN or infinity")
        if want and not (float(steps.min()) >= 0 and float(steps.max()) <= MAX_SCALE):
            raise _refuse(f"{name + SCALE_SUFFIX!r} has a step outside [0, {MAX_SCALE:.3g}]")
        out[name] = dequantise(q, steps)
    return out
