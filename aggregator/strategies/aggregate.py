"""The papers' update rules as pure functions on ``dict[str, np.ndarray]`` states.

Why one module of pure functions (as Flower's ``strategy/aggregate.py``): each
formula can be read next to its paper and tested against numbers worked by
hand, apart from buffering, receipts and storage. The strategy classes
(one file per paper) only choose which of these their ``reduce`` calls.

Notation: ``x`` the global model, ``Δ_i`` a site's delta (trained from its
base ``x_τ``), ``s_i`` its staleness, ``f`` the staleness function, ``K`` the
buffer size.

- FedBuff (Nguyen et al. 2022, Alg. 1): ``Δ̄ = (1/K) Σ f(s_i) Δ_i``; with sample
  weighting ``Δ̄ = Σ p_i f(s_i) Δ_i`` where ``p_i = w_i / Σ w_j`` and
  ``w_i = min(n_i, cap)``: the normalisation is over samples, never over
  ``f(s)``, so staleness never cancels out.
- FedAsync (Xie et al. 2019, eq. in Alg. 1): ``x_t = (1 − α_t) x_{t−1} + α_t x_new``,
  ``α_t = α f(t − τ)``, ``x_new = x_τ + Δ``.
- FedAvg (McMahan et al. 2017): ``Δ̄ = Σ p_i Δ_i``.
- the robust reduce (Yin et al. 2018, coordinate-wise median or trimmed mean) replaces the sum by
  ``Δ̄ = n · med_i(c_i Δ_i)`` over the ``n`` updates reduced: with FedBuff's ``c_i = f(s_i)/K`` that is
  ``(n/K) · med_i(f(s_i) Δ_i)``, the paper's ``(n/K) · mean_i(f(s_i) Δ_i)`` with the mean replaced by the
  median; so staleness still scales each update before the statistic, a buffer closed early with
  ``n < K`` moves as much less as the mean would, and when all updates agree the step is the mean's.
- FLTrust (Cao et al., NDSS 2021, Alg. 2): the server trains its own update ``g_0`` from the current model
  on a small root dataset it holds; each update gets the trust ``TS_i = ReLU(cos(Δ_i, g_0))``, is rescaled
  to ``Δ̂_i = (‖g_0‖ / ‖Δ_i‖) Δ_i``, and the step is ``Σ TS_i Δ̂_i / Σ TS_j``. Combined with FedBuff as the
  median is (see :func:`fltrust_combination`): ``Δ̄ = n · Σ_i c_i s_i Δ̂_i`` with ``s_i = TS_i / Σ TS_j``
  capped at ``1/n``; with ``c_i = f(s_i)/K`` and a full buffer that is the paper's step with each
  normalised update scaled by its staleness factor and the normalisation over trust only, never over
  ``f(s)`` (so staleness does not cancel out, as FedBuff requires).
- MDA (minimum-diameter averaging, :mod:`aggregator.mda`): ``Δ̄ = Σ_{i ∈ S} c_i Δ_i``, ``S`` the ``n − f``
  deltas whose largest pairwise distance is smallest: a far slot is left out whole. A buffer waits for
  ``K + f`` slots and keeps K, so FedBuff's ``c_i = f(s_i)/K`` is each kept slot's whole weight.
- centered clipping (:mod:`aggregator.cclip`; Karimireddy, He and Jaggi, ICML 2021): ``Δ̄ = v + (1/n) Σ_i
  clip_τ(n c_i Δ_i − v)``, ``v`` the previous version's step, ``clip_τ`` to L2 norm ``τ``: the paper's rule over
  the rows ``n c_i Δ_i`` (= ``f(s_i) Δ_i`` in a full FedBuff buffer), as the median is taken over them.
- the server step: ``x ← x + η_g Δ̄`` (with momentum ``m ← β m + Δ̄``, Hsu et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from aggregator import cclip, mda, robust, scaled_sum
from broker_bridge import quantised
from broker_bridge.quantised import Int8Delta

State = dict[str, np.ndarray]


def copy_state(state: Mapping[str, np.ndarray]) -> State:
    return {k: np.array(v, dtype=np.float32, copy=True) for k, v in state.items()}


def uniform_coefficients(factors: Sequence[float], k: int) -> list[float]:
    """FedBuff's coefficients ``f(s_i) / K``: a site's share is 1/K at most, whatever it claims."""
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    return [f / k for f in factors]


def sample_shares(n_samples: Sequence[int], cap: float) -> list[float]:
    """``p_i = min(n_i, cap) / Σ_j min(n_j, cap)``: the aggregator's cap, never the site's claim alone, sets a weight."""
    if cap <= 0:
        raise ValueError(f"the sample cap must be positive, got {cap}")
    w = [min(float(n), cap) for n in n_samples]
    total = sum(w)
    if total <= 0:
        raise ValueError("sample counts must sum to a positive number")
    return [x / total for x in w]


def sample_coefficients(n_samples: Sequence[int], factors: Sequence[float], cap: float) -> list[float]:
    """FedBuff with sample weighting: ``p_i f(s_i)``, normalised by samples only."""
    return [p * f for p, f in zip(sample_shares(n_samples, cap), factors)]


def linear_combination(deltas: Sequence[Mapping[str, np.ndarray]], coefficients: Sequence[float]) -> State:
    """``Σ_i c_i Δ_i`` (no normalisation: the coefficients are the formula's)."""
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    out: State = {}
    if all(isinstance(d, Int8Delta) for d in deltas):  # every delta int8: all K at once, a chunk at a time
        int8 = [d for d in deltas if isinstance(d, Int8Delta)]
        return {name: quantised.combine(int8, coefficients, name, _shape(int8[0], name)) for name in int8[0]}
    mixed = any(isinstance(d, Int8Delta) for d in deltas)
    for name in deltas[0]:
        acc = np.zeros(_shape(deltas[0], name), dtype=np.float32)
        if not mixed:  # one cache-blocked pass, clip scales folded in (aggregator.scaled_sum): the same floats
            scaled_sum.weighted_sum_into(acc, [scaled_sum.term(d, name, c) for d, c in zip(deltas, coefficients)])
            out[name] = acc
            continue
        for d, c in zip(deltas, coefficients):
            if isinstance(d, Int8Delta):  # straight from the int8 values, no float32 delta
                d.add_to(acc, name, c)
            else:
                robust.add_scaled(acc, d[name], c)
        out[name] = acc
    return out


def robust_combination(
    deltas: Sequence[Mapping[str, np.ndarray]], coefficients: Sequence[float], statistic: str, trim: float = 0.1
) -> State:
    """``n · stat_i(c_i Δ_i)``, ``stat`` the coordinate-wise ``"median"`` or ``"trimmed_mean"`` (Yin et al. 2018).

    The statistic is taken over the scaled deltas, unweighted beyond their coefficients, then multiplied by
    their number ``n``: it equals ``Σ c_i Δ_i`` whenever the scaled deltas agree.
    """
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    if statistic not in ("median", "trimmed_mean"):
        raise ValueError(f"unknown robust statistic {statistic!r} (median or trimmed_mean)")
    out: State = {}
    for name in deltas[0]:
        stacked = _stack(deltas, name, coefficients)  # (n, *shape): c_i Δ_i
        stat = robust.median_of(stacked) if statistic == "median" else robust.trimmed_mean_of(stacked, trim)
        out[name] = (stat * np.float32(len(deltas))).astype(np.float32)
    return out


def mda_keep(deltas: Sequence[Mapping[str, np.ndarray]], f: int = 1) -> tuple[int, ...]:
    """The indices MDA keeps (:mod:`aggregator.mda`): the ``n − f`` deltas whose largest pairwise distance is
    smallest. The distance is between the deltas, not the ``c_i Δ_i``: a stale honest update is shorter after its
    ``f(s)`` and would otherwise look farther from a fresh one than it is."""
    return mda_decisions(deltas, f)[0]


def mda_decisions(
    deltas: Sequence[Mapping[str, np.ndarray]], f: int = 1, gate: float = 0.0
) -> tuple[tuple[int, ...], dict[int, list[int]]]:
    """MDA's kept slots (:func:`mda_keep`) and, with a ``gate`` (``input_column_veto``; 0: none), the column veto's
    drops in the first layer's weights (:func:`input_tensor`, :func:`column_vetoes`): ``(keep, vetoes)``.

    One centred matrix (:func:`_rows`) with the first layer's weights laid out column by column, so each input
    column's rows are a strided view of it (:func:`_columns`, no copy), and one Gram product per column and one for
    the other tensors: the whole vector's Gram matrix is their sum (in float64), not a second product over the
    first layer. Why: the default reduce's decisions cost ~6 ms of CPU per version at 100k parameters, K = 10,
    against ~0.9 ms for the step itself (BENCHMARKS.md, "mda19n"). The distances differ from one product over
    the deltas in their order only by float32 rounding (tests compare them with a float64 computation, and the
    decisions with the per-column code's, tests/aggregator/test_column_veto_stack.py)."""
    if not deltas:
        raise ValueError("need at least one delta")
    n, name = len(deltas), input_tensor(deltas[0])
    rows = _rows(deltas, name)
    if name is None:
        return mda.subset(mda.centred_distances(rows, n), f), {}
    width = math.prod(_shape(deltas[0], name))
    columns = mda.gram(_columns(rows, _shape(deltas[0], name)), n)
    whole = columns.sum(axis=0, dtype=np.float64)
    whole += mda.gram(rows[:, width:], n)
    keep = mda.subset(mda.from_gram(whole), f)
    if not gate or mda.left_out(f, n) == 0:
        return keep, {}
    return keep, _vetoes(mda.from_gram(columns), keep, f, gate)


def input_tensor(delta: Mapping[str, np.ndarray]) -> str | None:
    """The first layer's weights where they are a matrix (``out × in``: column ``j`` holds the weights that read
    input ``j``): the first tensor in ``delta``'s order of two or more dimensions, if it has two (an MLP's, an
    autoencoder's, a GRU's input weights); None if it has more (cnn1d's conv kernels: its first 2-D tensor reads
    channels, not inputs, so the veto stays off there) or there is none."""
    first = next((k for k in delta if len(_shape(delta, k)) >= 2), None)
    return first if first is not None and len(_shape(delta, first)) == 2 else None


def column_vetoes(
    deltas: Sequence[Mapping[str, np.ndarray]], keep: tuple[int, ...], name: str, f: int = 1, gate: float = 1.0
) -> dict[int, list[int]]:
    """The kept slots dropped from each input column of the 2-D tensor ``name`` (``[strategy] input_column_veto``,
    1.2 by default under MDA): ``{j: [i, ...]}`` for every column ``j`` where MDA's subset on the deltas' column ``j``
    alone, ``S_j``, differs from ``keep`` (the whole-vector subset ``S``) and ``S``'s diameter in column ``j`` exceeds
    ``gate`` times ``S_j``'s (beyond float rounding, :data:`aggregator.mda.TIE`); the slots dropped are ``S ∖ S_j``.
    Only ever drops: a slot outside ``S`` is never added, so no slot weighs more in any column than under MDA.

    For any ``keep`` (the reduce takes ``keep`` and the vetoes together, :func:`mda_decisions`, the same code)."""
    rows = _rows(deltas, name)
    return _vetoes(mda.centred_distances(_columns(rows, _shape(deltas[0], name)), len(deltas)), keep, f, gate)


def _vetoes(dist: np.ndarray, keep: tuple[int, ...], f: int, gate: float) -> dict[int, list[int]]:
    """:func:`column_vetoes` from the columns' distance matrices (``in × n × n``).

    Every column at once (a stack of distance matrices, :func:`aggregator.mda.subsets`), the same vetoes as one
    search per column (tests/aggregator/test_column_veto_stack.py keeps that loop as the oracle): the loop's
    hundreds of small NumPy calls per column cost ~2.5 ms per update at K = 10 (BENCHMARKS.md, veto19k)."""
    own, own_diameter = mda.subsets(dist, f)
    kept = np.asarray(keep, np.intp)
    inside = np.zeros(dist.shape[-1], bool)
    inside[kept] = True
    dropped = inside & ~own  # (columns, n): the kept slots S_j leaves out
    fires = dropped.any(axis=1) & (mda.diameters(dist, inside) * (1.0 - mda.TIE) > gate * own_diameter)
    return {int(j): kept[dropped[j, kept]].tolist() for j in np.flatnonzero(fires)}


def vetoed_step(
    step: State,
    deltas: Sequence[Mapping[str, np.ndarray]],
    keep: tuple[int, ...],
    coefficients: Sequence[float],
    name: str,
    vetoes: Mapping[int, Sequence[int]],
) -> State:
    """``step`` with each vetoed column ``j`` of ``name`` recomputed as ``Σ_{i ∈ S, i ∉ vetoes[j]} c_i Δ_i[:, j]``
    (``coefficients`` in ``keep``'s order: each remaining slot keeps its ``f(s)/K``; the column moves less, never
    rescaled up). All vetoed columns at once, slot by slot in ``keep``'s order, a dropped slot's term skipped
    (``where``): the same float32 sums as one column at a time."""
    if not vetoes:
        return step
    columns = np.fromiter(vetoes, np.intp, len(vetoes))
    at = {i: k for k, i in enumerate(keep)}
    skip = np.zeros((len(keep), len(columns)), bool)  # kept slot × vetoed column: its term left out
    for column, dropped in enumerate(vetoes.values()):
        skip[[at[i] for i in dropped if i in at], column] = True
    row = np.empty(_shape(deltas[0], name), np.float32)
    sums = np.zeros((row.shape[0], len(columns)), np.float32)
    for i, c, skipped in zip(keep, coefficients, skip):
        np.add(sums, np.float32(c) * _picked(row, deltas[i], name, columns), out=sums, where=~skipped)
    tensor = np.array(step[name], np.float32, copy=True)
    tensor[:, columns] = sums
    return {**step, name: tensor}


def _picked(row: np.ndarray, d: Mapping[str, np.ndarray], name: str, columns: np.ndarray) -> np.ndarray:
    """``row[:, columns]`` after ``_fill(row, d, name, 1.0)``, bit for bit, reading only those columns of a float32
    tensor, plain or clipped (``1 · x`` is ``x``; a clipped one's ``s · x`` is the same product per value either
    way); an int8 delta is dequantised into ``row`` whole. Why: the vetoed columns are a few of 128, and filling
    every kept slot's whole tensor cost ~0.4 ms a version at 100k parameters, K = 10 (BENCHMARKS.md, mda19n)."""
    inner, scale = (d.delta, d.scale) if isinstance(d, scaled_sum.Scaled) else (d, None)
    if not isinstance(inner, Int8Delta):
        tensor = np.asarray(inner[name])
        if tensor.dtype == np.float32:
            part = tensor[:, columns]
            return part if scale is None else np.multiply(part, np.float32(scale), out=part)
    _fill(row, d, name, 1.0)
    return row[:, columns]


def _columns(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The first layer's weights (``shape`` = ``out × in``, laid out column by column at the start of each row of
    ``rows``, :func:`_rows`) as a stack of its input columns: ``(in, m, out)``, ``[j, i]`` = row ``i``'s ``[:, j]``.
    A view: each column's ``m × out`` matrix has a row stride of a whole row, which BLAS takes as it is."""
    out_, in_ = shape
    return rows[:, : out_ * in_].reshape(rows.shape[0], in_, out_).transpose(1, 0, 2)


def _rows(deltas: Sequence[Mapping[str, np.ndarray]], first: str | None = None) -> np.ndarray:
    """Each delta flattened into one row of an ``m × d`` float32 matrix, centred (:func:`_centred_block`): the 2-D
    tensor ``first`` at the start, transposed (its input columns one after the other, :func:`_columns`), then the
    other tensors in the first delta's order; ``m`` is :func:`aggregator.mda.padded`, the rows past the deltas
    zero."""
    n = len(deltas)
    names = ([first] if first is not None else []) + [k for k in deltas[0] if k != first]
    shapes = [_shape(deltas[0], k) for k in names]
    widths = [math.prod(s) for s in shapes]
    rows = np.empty((mda.padded(n), sum(widths)), np.float32)
    rows[n:] = 0.0
    at = 0
    for name, shape, width in zip(names, shapes, widths):
        _centred_block(rows[:n, at : at + width], deltas, name, shape, name == first)
        at += width
    return rows


def _centred_block(
    block: np.ndarray, deltas: Sequence[Mapping[str, np.ndarray]], name: str, shape: tuple[int, ...], transposed: bool
) -> None:
    """Row ``i`` of ``block`` = delta ``i``'s tensor ``name`` (``shape``; ``transposed``: stored as its transpose)
    less the deltas' :func:`aggregator.mda.mean`, tensor by tensor; each row is added to the mean as soon as it is
    filled, while it is in cache (:func:`_filled`), then the block is centred in one subtraction."""
    block -= mda.mean(_filled(block, deltas, name, shape, transposed))


def _filled(
    block: np.ndarray, deltas: Sequence[Mapping[str, np.ndarray]], name: str, shape: tuple[int, ...], transposed: bool
) -> Iterator[np.ndarray]:
    """Fill row ``i`` of ``block`` with delta ``i``'s tensor ``name`` (``_fill``'s values) and yield it. Transposed,
    a float32 tensor is copied as it is (``_fill``'s ``1 · x`` is ``x``); an int8 or clipped one is filled in its
    own layout first (int8's dequantiser writes contiguously; a product into a transposed view is ~3× slower)."""
    layout = shape[::-1] if transposed else shape  # each row's view of the tensor, contiguous
    scratch = np.empty(shape, np.float32) if transposed else None
    for row, d in zip(block, deltas):
        target = row.reshape(layout)
        if scratch is None:
            _fill(target, d, name, 1.0)
        else:
            plain = None if isinstance(d, (Int8Delta, scaled_sum.Scaled)) else np.asarray(d[name])
            if plain is None or plain.dtype != np.float32:
                _fill(scratch, d, name, 1.0)
                plain = scratch
            np.copyto(target, plain.T)
        yield row


def mda_combination(
    deltas: Sequence[Mapping[str, np.ndarray]], coefficients: Sequence[float], f: int = 1
) -> tuple[State, tuple[int, ...]]:
    """``Σ_{i ∈ S} c_i Δ_i``, ``S`` = :func:`mda_keep`; returns (step, S). A left-out slot gets no part of the step.

    With FedBuff's ``c_i = f(s_i)/K`` and a full buffer of ``K + f`` received (:func:`aggregator.mda.sizes`) the
    K kept slots make the paper's ``(1/K) Σ f(s_i) Δ_i`` over the slots the version sums: each at most 1/K (issue
    14's fair share), and the mean's step when every slot agrees. A buffer closed early with ``n < K + f``
    received keeps ``n − f`` and moves ``(n − f)/K`` as far, as a FedBuff buffer closed early moves ``n/K``.
    (The coefficients a strategy passes are those of the kept slots as it weighs any K slots:
    :meth:`aggregator.strategies.base.Strategy.combine`.)"""
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    keep = mda_keep(deltas, f)
    return linear_combination([deltas[i] for i in keep], [coefficients[i] for i in keep]), keep


def cclip_combination(
    deltas: Sequence[Mapping[str, np.ndarray]],
    coefficients: Sequence[float],
    center: Mapping[str, np.ndarray] | None,
    tau_scale: float = 1.0,
    iters: int = 1,
) -> tuple[State, list[float]]:
    """Centered clipping's step over one buffer (:mod:`aggregator.cclip`); returns (step, each delta's coefficient).

    The rows are ``x_i = n c_i Δ_i``: with FedBuff's ``c_i = f(s_i)/K`` and a full buffer (``n = K``) that is
    ``f(s_i) Δ_i``, so staleness scales each update before the rule, and the step, ``v_L = a v_0 + Σ_i b_i x_i``
    (:func:`aggregator.cclip.iterate`, ``v_0 = center``, the previous version's step; zero if None), equals FedBuff's
    ``(1/K) Σ f(s_i) Δ_i`` whenever no row is clipped (``L = 1``). Each delta's coefficient is ``n c_i b_i``: with
    ``L = 1`` that is ``s_i c_i ≤ c_i`` (a clipped slot keeps ``s_i`` of its share; the rest of its share goes to the
    centre). ``τ`` is ``tau_scale`` times the rows' median distance from the centre (:func:`aggregator.cclip.radius`)."""
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    n = len(deltas)
    names = list(deltas[0])
    rows = np.concatenate([_stack(deltas, k, [n * c for c in coefficients]).reshape(n, -1) for k in names], axis=1)
    v0 = (
        np.concatenate([np.asarray(center[k], np.float32).reshape(-1) for k in names])
        if center is not None
        else np.zeros(rows.shape[1], np.float32)
    )
    tau = cclip.radius(rows, v0, tau_scale)
    _, b, a = cclip.iterate(rows, v0, tau, iters)
    weights = [float(n * c * bi) for c, bi in zip(coefficients, b)]
    terms: list[Mapping[str, np.ndarray]] = list(deltas)
    factors = list(weights)
    if center is not None and a != 0.0:
        terms.append({k: np.asarray(center[k], np.float32) for k in names})
        factors.append(float(a))
    return linear_combination(terms, factors), weights


def _shape(delta: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """A tensor's shape without making its float32 values (an int8 delta knows its shapes; a clipped one's
    tensors are its delta's: reading ``delta[name]`` would make the scaled copy the reduce avoids)."""
    if isinstance(delta, scaled_sum.Scaled):
        delta = delta.delta
    return delta.shapes[name] if isinstance(delta, Int8Delta) else tuple(np.shape(delta[name]))


def _stack(deltas: Sequence[Mapping[str, np.ndarray]], name: str, coefficients: Sequence[float]) -> np.ndarray:
    """The rows ``c_i Δ_i[name]`` (float32), stacked; an int8 delta is dequantised straight into its row,
    already scaled (one multiply per value by ``float32(c_i · f_i · s_b)``, not a pass more over the stack)."""
    out = np.empty((len(deltas), *_shape(deltas[0], name)), np.float32)
    for row, d, c in zip(out, deltas, coefficients):
        _fill(row, d, name, c)
    return out


def _fill(row: np.ndarray, d: Mapping[str, np.ndarray], name: str, c: float) -> None:
    """``row = c · d[name]`` in float32, written in place (``row`` a contiguous float32 view)."""
    if isinstance(d, Int8Delta):
        d.dequantise_into(row, name, c)
    elif isinstance(d, scaled_sum.Scaled):  # clipped: s·x, then c·that, as the scaled copy was (no copy)
        np.multiply(d.delta[name], np.float32(d.scale), out=row)
        row *= np.float32(c)
    else:
        np.multiply(d[name], np.float32(c), out=row)


def cosine(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` over every tensor of ``a`` (0 if either is zero)."""
    dot = sum(
        float(np.dot(np.asarray(a[k], np.float64).reshape(-1), np.asarray(b[k], np.float64).reshape(-1))) for k in a
    )
    na, nb = robust.l2_norm(a), robust.l2_norm({k: b[k] for k in a})
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def fltrust_trust(deltas: Sequence[Mapping[str, np.ndarray]], g0: Mapping[str, np.ndarray]) -> list[float]:
    """FLTrust's trust scores ``TS_i = ReLU(cos(Δ_i, g_0))``: an update pointing away from the server's own
    update on clean rows gets 0, one along it gets 1."""
    return [max(0.0, cosine(d, g0)) for d in deltas]


def fltrust_shares(trust: Sequence[float], fair_cap: bool = True) -> list[float]:
    """Each update's share of the trust-weighted mean: ``TS_i / Σ TS_j`` (Cao et al.), and with ``fair_cap``
    at most ``1/n``: a site's share never exceeds its slot (issue 14), whatever its trust; a share a
    distrusted slot gives up is not handed to the others, so a buffer with distrusted updates steps less.
    All zero (no update trusted) gives no step."""
    total = float(sum(trust))
    if total <= 0:
        return [0.0] * len(trust)
    cap = 1.0 / len(trust) if fair_cap else 1.0
    return [min(t / total, cap) for t in trust]


def fltrust_combination(
    deltas: Sequence[Mapping[str, np.ndarray]],
    coefficients: Sequence[float],
    g0: Mapping[str, np.ndarray],
    fair_cap: bool = True,
) -> tuple[State, list[float], list[float]]:
    """FLTrust's step over one buffer: ``n · Σ_i c_i s_i Δ̂_i``, ``Δ̂_i = (‖g_0‖/‖Δ_i‖) Δ_i``,
    ``s_i`` = :func:`fltrust_shares`; returns (step, each update's coefficient ``n c_i s_i`` on its
    normalised delta, the trust scores).

    Why this combination with staleness (written out in RELIABILITY.md): FedBuff (Nguyen et al. 2022,
    Alg. 1) is ``(1/K) Σ f(s_i) Δ_i = (n/K) · mean_i(f(s_i) Δ_i)``; FLTrust replaces the mean of the
    updates by the trust-weighted mean of the normalised ones, ``Σ TS_i Δ̂_i / Σ TS_j`` (Cao et al. 2021,
    Alg. 2). Keeping FedBuff's ``c_i = f(s_i)/K`` in front gives ``(n/K) Σ f(s_i) s_i Δ̂_i``: with every
    update fresh, the buffer full and trust uncapped, exactly the paper's step; a stale update moves the
    model by ``f(s)`` of a fresh one (the normalisation is over trust, never over ``f``); a buffer closed
    early with ``n < K`` moves ``n/K`` as far, as the mean and the median do.
    """
    if len(deltas) != len(coefficients) or not deltas:
        raise ValueError("need one coefficient per delta, and at least one delta")
    g0_norm = robust.l2_norm(g0)
    trust = fltrust_trust(deltas, g0)
    shares = fltrust_shares(trust, fair_cap)
    n = len(deltas)
    weights = [n * c * s for c, s in zip(coefficients, shares)]
    out: State = {k: np.zeros(_shape(deltas[0], k), np.float32) for k in deltas[0]}
    for d, w in zip(deltas, weights):
        norm = d.norm() if isinstance(d, Int8Delta) else robust.l2_norm(d)
        if w == 0.0 or norm == 0.0:
            continue
        for k in out:
            if isinstance(d, Int8Delta):  # straight from the int8 values, as the mean
                d.add_to(out[k], k, w * g0_norm / norm)
            else:
                robust.add_scaled(out[k], d[k], w * g0_norm / norm)
    return out, weights, trust


def server_step(
    model: Mapping[str, np.ndarray],
    step: Mapping[str, np.ndarray],
    lr: float,
    momentum: Mapping[str, np.ndarray] | None = None,
    beta: float = 0.0,
) -> tuple[State, State | None]:
    """``x ← x + η_g Δ̄``, or with server momentum ``m ← β m + Δ̄; x ← x + η_g m``; returns (x, m)."""
    m: State | None = None
    if beta > 0:
        m = {
            k: (beta * momentum[k] + step[k]).astype(np.float32) if momentum else np.array(step[k], np.float32)
            for k in step
        }
        step = m
    new = {k: _stepped(x, step[k], lr) for k, x in model.items()}
    return new, m if beta > 0 else (dict(momentum) if momentum else None)


def _stepped(x: np.ndarray, step: np.ndarray, lr: float) -> np.ndarray:
    """``x + float32(lr) * step`` in a new float32 array, written straight into it: bit for bit what a copy of ``x``
    followed by :func:`robust.add_scaled` gives (each product rounded to float32, then the sum), in one or two
    passes instead of three (the copy, the product into a block, the add).

    Why: the server step runs on every version; at 100k parameters the copy-then-add cost 68 us, this 42 us
    (``lr`` 1) and 61 us (``lr`` 0.7) on 2 Dec 2026. With ``lr`` 1 (the default) the product is exact and skipped. A model or step that is not
    float32 takes the old path (its rounding differs: the product would be float64).
    """
    x, s = np.asarray(x), np.asarray(step)
    if x.dtype != np.float32 or s.dtype != np.float32 or s.size != x.size:
        out = np.array(x, dtype=np.float32, copy=True)
        robust.add_scaled(out, s, lr)
        return out
    s = s.reshape(x.shape)
    out = np.empty(x.shape, np.float32)
    if lr == 1.0:
        np.add(x, s, out=out)  # 1 * s is s exactly
    else:
        np.multiply(s, np.float32(lr), out=out)
        np.add(x, out, out=out)  # x + (lr * s): addition commutes bit for bit
    return out


def fedasync_mix(
    current: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], alpha_t: float
) -> State:
    """Xie et al.: ``x_t = (1 − α_t) x_{t−1} + α_t (x_τ + Δ)``."""
    if not 0.0 <= alpha_t <= 1.0:
        raise ValueError(f"α_t must be in [0, 1], got {alpha_t}")
    out: State = {}
    for k, x in current.items():
        mixed = np.asarray(x, np.float64) * (1.0 - alpha_t) + alpha_t * (
            np.asarray(base[k], np.float64) + np.asarray(delta[k], np.float64)
        )
        out[k] = mixed.astype(np.float32)
    return out


def fedasync_delta(current: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], alpha_t: float) -> State:
    """The delta form ``x ← x + α_t Δ`` (no pull towards the stale base): an option, not the paper's rule."""
    new = copy_state(current)
    for k in new:
        robust.add_scaled(new[k], delta[k], alpha_t)
    return new
