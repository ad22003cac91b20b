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

import math
import threading
from collections.abc import Iterator, Mapping, Sequence

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
    out = np.empty(q.shape, np.float32)
    dequantise_into(out, q, steps)
    return out


def dequantise_into(out: np.ndarray, q: np.ndarray, steps: np.ndarray) -> None:
    """Write ``q * s`` per block into ``out`` (float32, ``q``'s size): one rounding per value."""
    flat = out.reshape(-1)
    flat[:] = q.reshape(-1)  # exact: int8 fits float32
    full = flat.size // BLOCK
    if full:
        body = flat[: full * BLOCK].reshape(full, BLOCK)
        np.multiply(body, steps[:full, None], out=body)  # not `body[:] *=`: that copies the result once more
    if flat.size % BLOCK:
        flat[full * BLOCK :] *= steps[full]


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


def _checked_steps(name: str, q: np.ndarray, steps: np.ndarray | None) -> np.ndarray:
    """``name``'s block steps, or ``WireError('encoding')`` naming what is wrong with them."""
    if q.dtype != np.int8:
        raise _refuse(f"{name!r} is {q.dtype}; an int8 update carries int8 values")
    if steps is None:
        raise _refuse(f"{name!r} has no scale tensor {name + SCALE_SUFFIX!r}")
    want = n_blocks(q.size)
    if steps.dtype != np.float32 or steps.shape != (want,):
        raise _refuse(
            f"{name + SCALE_SUFFIX!r} is {steps.dtype} of shape {steps.shape}; "
            f"{q.size} values need float32 of shape ({want},) (one step per {BLOCK})"
        )
    # one pass each: min and max propagate NaN, and a NaN or infinity fails the range test below
    if want and not (float(steps.min()) >= 0 and float(steps.max()) <= MAX_SCALE):
        if not np.isfinite(steps).all():
            raise _refuse(f"{name + SCALE_SUFFIX!r} holds NaN or infinity")
        raise _refuse(f"{name + SCALE_SUFFIX!r} has a step outside [0, {MAX_SCALE:.3g}]")
    return steps


def read(tensors: Mapping[str, np.ndarray], encoding: str) -> Mapping[str, np.ndarray]:
    """An update's tensor block as its delta, checked: float32 as sent, int8 as an :class:`Int8Delta`.

    The aggregator's reading (:mod:`aggregator.opener`): an int8 delta stays int8 (no float32 copy is made
    until something asks for one), or ``WireError('encoding')`` naming the tensor and the fault.
    """
    if encoding == "float32":
        return dict(tensors)
    if encoding != "int8":
        raise _refuse(f"unknown update encoding {encoding!r}; this build reads {', '.join(ENCODINGS)}")
    return read_int8(tensors)


def read_int8(tensors: Mapping[str, np.ndarray]) -> Int8Delta:
    """An int8 tensor block (values and ``#scale`` steps) as an :class:`Int8Delta`, checked."""
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, q in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise _refuse(f"scale tensor {name!r} has no value tensor")
            continue
        parts[name] = (q, _checked_steps(name, q, tensors.get(name + SCALE_SUFFIX)))
    return Int8Delta(parts)


def decode(tensors: Mapping[str, np.ndarray], encoding: str) -> dict[str, np.ndarray]:
    """Float32 tensors (in the order they were sent) from an update's tensor block, or ``WireError('encoding')``."""
    return dict(read(tensors, encoding).items())


# --------------------------------------------------------------------------- the int8 delta, kept int8
_scratch = threading.local()


def _buffer() -> np.ndarray:
    """This thread's float32 scratch of ``CHUNK_BLOCKS`` blocks (256 KiB: stays in cache, never page-faults)."""
    buf: np.ndarray | None = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = np.empty(CHUNK_BLOCKS * BLOCK, np.float32)
    return buf


def _chunks(size: int) -> Iterator[tuple[int, int]]:
    """(first, end) value offsets of runs of whole blocks, ``CHUNK_BLOCKS`` at a time, then the partial block."""
    full = size // BLOCK * BLOCK
    for lo in range(0, full, CHUNK_BLOCKS * BLOCK):
        yield lo, min(full, lo + CHUNK_BLOCKS * BLOCK)
    if full < size:
        yield full, size


SQUARE_BLOCKS = 128  # blocks squared at a time: 256 KiB of int16 scratch, in cache


def _squares_buffer() -> np.ndarray:
    """This thread's int16 scratch of ``SQUARE_BLOCKS`` blocks (:func:`block_sums_of_squares`)."""
    buf: np.ndarray | None = getattr(_scratch, "squares", None)
    if buf is None:
        buf = _scratch.squares = np.empty(SQUARE_BLOCKS * BLOCK, np.int16)
    return buf


def block_sums_of_squares(q: np.ndarray) -> np.ndarray:
    """``S_b = Σ_{j in block b} q_j²`` per block of the flat int8 ``q``, exact (float64 of integers).

    In integers: each square fits int16 (``q² <= 128² = 16,384 < 2^15``) and each block's sum of 1,024 of
    them fits int32 (< 2^24). Why: the conversion to int16 writes half the
    bytes of a conversion to float32, and the squares and the per-block sums stay integer, so this is the
    cheapest of what was measured (2026-11-30, interleaved in one process, 1M values: 0.31-0.33 ms against
    0.37 for float32 squares and a BLAS product with ones, the way before, and 0.35-0.55 for an ``einsum``, a
    ``reduceat`` or float32 squares with a sum per row).
    """
    flat = q.reshape(-1)
    out = np.empty(n_blocks(flat.size), np.float64)
    full = flat.size // BLOCK * BLOCK
    buf = _squares_buffer()
    for lo in range(0, full, SQUARE_BLOCKS * BLOCK):
        hi = min(full, lo + SQUARE_BLOCKS * BLOCK)
        b = buf[: hi - lo]
        b[:] = flat[lo:hi]  # exact: int8 fits int16
        np.multiply(b, b, out=b)
        out[lo // BLOCK : hi // BLOCK] = np.add.reduce(b.reshape(-1, BLOCK), axis=1, dtype=np.int32)
    if full < flat.size:  # the partial last block
        tail = flat[full:].astype(np.int32)
        out[-1] = float(np.dot(tail, tail))
    return out


class Int8Delta(Mapping[str, np.ndarray]):
    """An int8 update's delta as it came: int8 values and block steps per tensor, times one scalar ``factor``.

    Why not decode to float32 at once: a float32 copy is four times the bytes, a fresh model-sized array
    per update (page faults), and the aggregator only ever needs three things from it, each computable
    from the int8 blocks in one cache-resident pass: the norm (validation and clipping, :meth:`norm`),
    the delta scaled into a running sum (the mean, :meth:`add_to`), and, for the median, a row of the
    stack (:meth:`dequantise_into`). Clipping multiplies ``factor`` (:meth:`scaled`), no copy.

    Indexing (``delta[name]``) still gives the float32 values, ``float32(q · s) · float32(factor)``, bit
    for bit what decoding and then clipping gave, so every other reader (a strategy's rule, a forward)
    sees an ordinary delta. Read-only: the arrays are views into the opened update.
    """

    def __init__(self, parts: Mapping[str, tuple[np.ndarray, np.ndarray]], factor: float = 1.0) -> None:
        self._parts = dict(parts)
        self.factor = float(factor)
        self._norm: float | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        q, _ = self._parts[name]
        out = np.empty(q.shape, np.float32)
        self.dequantise_into(out, name)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(q.shape) for name, (q, _) in self._parts.items()}

    def norm(self) -> float:
        """The L2 norm of the float32 delta it stands for: ``|factor| · sqrt(Σ_b s_b² S_b)``, from the int8 blocks.

        Always finite: the integers are, and every step is at most ``MAX_SCALE`` (checked on reading).
        """
        if self._norm is None:
            total = 0.0
            for q, steps in self._parts.values():
                if q.size <= BLOCK:  # one block (a bias, a small layer): one dot, no chunk loop (exact: < 2^24)
                    qf = q.reshape(-1).astype(np.float32)
                    total += float(steps[0]) ** 2 * float(np.dot(qf, qf)) if q.size else 0.0
                    continue
                s = steps.astype(np.float64)
                total += float(np.dot(s * s, block_sums_of_squares(q)))
            self._norm = math.sqrt(total)
        return abs(self.factor) * self._norm

    def scaled(self, factor: float) -> Int8Delta:
        """The same int8 blocks standing for ``factor`` times this delta (clipping): no copy of any value."""
        out = Int8Delta(self._parts, self.factor * factor)
        out._norm = self._norm
        return out

    def add_to(self, acc: np.ndarray, name: str, coefficient: float) -> None:
        """``acc += coefficient · delta[name]`` straight from the int8 values: per block, ``(c · factor · s_b) · q``.

        One multiply per value with the per-block coefficient (computed in float64, rounded once to float32)
        and one add, a cache-sized chunk at a time: no float32 delta is made.
        """
        q, steps = self._parts[name]
        flat_q, flat_acc = q.reshape(-1), acc.reshape(-1)
        if flat_q.size <= BLOCK:  # one block: the same two roundings, without the chunk loop
            if flat_q.size:
                flat_acc += np.float32(float(steps[0]) * (coefficient * self.factor)) * flat_q.astype(np.float32)
            return
        coef = self.coefficients(name, coefficient)
        buf = _buffer()
        for lo, hi in _chunks(flat_q.size):
            b = buf[: hi - lo]
            b[:] = flat_q[lo:hi]
            if (hi - lo) % BLOCK == 0:
                rows = b.reshape(-1, BLOCK)
                np.multiply(rows, coef[lo // BLOCK : hi // BLOCK, None], out=rows)
            else:
                b *= coef[lo // BLOCK]
            flat_acc[lo:hi] += b

    def coefficients(self, name: str, coefficient: float) -> np.ndarray:
        """Per block of ``name``, the float32 ``coefficient · factor · s_b`` :meth:`add_to` multiplies ``q`` by."""
        _, steps = self._parts[name]
        return (steps.astype(np.float64) * (coefficient * self.factor)).astype(np.float32)

    def dequantise_into(self, out: np.ndarray, name: str, coefficient: float | None = None) -> None:
        """Write ``delta[name]`` into ``out`` (float32 of its shape), or with ``coefficient`` the values
        ``float32(coefficient · factor · s_b) · q``: a row of the median's stack, scaled in the same pass."""
        q, steps = self._parts[name]
        if coefficient is not None:
            dequantise_into(out, q, self.coefficients(name, coefficient))
            return
        dequantise_into(out, q, steps)
        if self.factor != 1.0:
            out *= np.float32(self.factor)


STACK_VALUES = 1 << 20  # float32 values of the K deltas' rows combined at a time (4 MiB: stays in L2/L3)
_stack_scratch = threading.local()


def combine(
    deltas: Sequence[Int8Delta], coefficients: Sequence[float], name: str, shape: tuple[int, ...]
) -> np.ndarray:
    """``Σ_i c_i · deltas[i][name]`` as float32 of ``shape``: the mean's step straight from the int8 blocks.

    Why not :meth:`Int8Delta.add_to` once per delta: that reads and writes the whole sum once per delta and
    scales each delta in a pass of its own. Here a chunk of blocks of all K deltas is converted to float32
    (cache-sized), and each block of the sum is one BLAS product ``(c_i · factor_i · s_ib)_i · Q_b`` of the
    K per-block coefficients (float32, as :meth:`Int8Delta.coefficients`) with the K rows of int8 values:
    about half the CPU of the loop at 1M values. The sum is accumulated in float32 by BLAS (its order, with
    fused multiply-adds), so it may differ from the loop's in the last bit; the same inputs always give the
    same bits (a restart reduces its buffer to the same version).
    """
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    out = np.empty(shape, np.float32)  # every value is written below: no zeroing pass over the step
    flat = out.reshape(-1)
    if not flat.size:
        return out
    qs = [d._parts[name][0].reshape(-1) for d in deltas]
    coef = np.stack([d.coefficients(name, c) for d, c in zip(deltas, coefficients)])  # (K, blocks)
    full = flat.size // BLOCK * BLOCK
    if full:
        _combine_blocks(flat[:full], [q[:full] for q in qs], coef)
    if full < flat.size:  # the partial last block (a bias, say): one product of the K coefficients and rows
        flat[full:] = coef[:, -1] @ np.stack([q[full:] for q in qs]).astype(np.float32)
    return out


def _combine_blocks(flat: np.ndarray, qs: Sequence[np.ndarray], coef: np.ndarray) -> None:
    """``flat = Σ_i coef[i, b] · qs[i]`` per whole block ``b``, a cache-sized chunk of the K rows at a time."""
    k = len(qs)
    step = max(1, min(CHUNK_BLOCKS, STACK_VALUES // (BLOCK * k))) * BLOCK
    scratch: np.ndarray | None = getattr(_stack_scratch, "buf", None)
    if scratch is None or scratch.size < k * step:
        scratch = _stack_scratch.buf = np.empty(k * step, np.float32)
    for lo in range(0, flat.size, step):
        hi = min(flat.size, lo + step)
        rows = scratch[: k * (hi - lo)].reshape(k, hi - lo)
        for row, q in zip(rows, qs):
            row[:] = q[lo:hi]  # exact: int8 fits float32
        blocks = (hi - lo) // BLOCK
        weights = np.ascontiguousarray(coef[:, lo // BLOCK : hi // BLOCK].T)[:, None, :]  # (blocks, 1, K)
        values = rows.reshape(k, blocks, BLOCK).transpose(1, 0, 2)  # (blocks, K, BLOCK): no copy
        np.matmul(weights, values, out=flat[lo:hi].reshape(blocks, 1, BLOCK))


# --------------------------------------------------------------------------- the global model as int8 steps
def model_step(
    old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the int8 tensor block of the step ``new - old``, the model it makes): ``old + dequantise(Q(new - old))``.

    With ``[publish] quantise = "int8"`` the aggregator's version v+1 is *defined* as the returned model,
    not the reduce's float32 result: every site that holds version v and applies the same block with
    :func:`apply_step` gets the same float32 bits (one correctly rounded multiply and one add per value),
    so a site can follow the model by its int8 steps and still check each version against the
    signed hash of its full weights. The rounding is unbiased (:func:`quantise`), so it adds noise of
    under one step per value to each version, not a drift.
    """
    block = encode({k: np.asarray(new[k], np.float32) - np.asarray(old[k], np.float32) for k in old}, "int8", rng)
    return block, apply_step(old, block)


def apply_step(base: Mapping[str, np.ndarray], block: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model ``base + dequantise(block)``, in ``base``'s tensor order: the one code that makes a version
    from its int8 step, at the aggregator and at every site (``WireError('encoding')`` on a bad block)."""
    step = read_int8(block)
    if list(step) != list(base):
        raise _refuse(f"the step names {list(step)}, the model {list(base)}")
    out: dict[str, np.ndarray] = {}
    for name, x in base.items():
        if step.shapes[name] != np.shape(x):
            raise _refuse(f"step {name!r} has shape {step.shapes[name]}, the model's is {np.shape(x)}")
        out[name] = np.asarray(x, np.float32) + step[name]
    return out
