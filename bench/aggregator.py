"""Aggregator benchmark: sealed updates per second through intake and reduce, beside two baselines.

For models of about 10k, 100k and 1M shared float32 parameters (an MLP body,
four tensors), on the same delta arrays:

- **fedline**: ``AggregatorCore.process_stream`` — SealedBox decrypt, Ed25519
  verify, parse, validate (names, shapes, dtype, finite, norm), dedupe against
  SQLite, staleness weight, FedBuff (K = 10) with the buffer and every
  checkpoint written to SQLite (WAL) on disk. Opening runs in a thread pool of
  ``--workers`` threads, overlapped with the serial decisions.
- **limit**: one loop of decrypt (SealedBox, in place, the tensors onto an aligned
  address as fedline's opener places them), verify (SHA-256 of the plaintext +
  Ed25519) and ``acc += w * delta`` in numpy: no enrollment, no validation, no
  storage — the physical limit of intake on one core.
- **fedline int8**: the same, for the same deltas sent as int8 updates
  (``[update] quantise = "int8"``, :mod:`broker_bridge.quantised`): a quarter
  of the bytes to decrypt, hash and log; the norm and the reduce straight from the
  int8 blocks. Its per-update CPU is compared with Flower's float32 path (issue 19);
  ``bench/int8_budget.py`` splits it into parts.
- **int8 floor**: the limit's loop for the int8 updates, plus the norm from the int8
  blocks (no intake may skip the norm bound), adding straight from the int8 values.
- **flower faithful**: Flower 1.42's server receive path for each reply, from the
  serialised requests its SuperLink receives to 1.42's ``FedAvg.aggregate_train``
  every 10 replies (``bench/flower_receive.py`` says which Flower code each step
  follows: protobuf parsing, the object store's SHA-256 check of every object, the
  hop to the ServerApp process, the Message inflated). Flower receives plaintext
  (TLS is the transport's job), so it decrypts nothing.
- **flower** (narrow, the older baseline): Flower's own decode
  (``flwr.common.parameters_to_ndarrays``, NumPy ``.npy`` bytes as Flower ships them)
  plus the legacy FedAvg reduce (``flwr.server.strategy.aggregate.aggregate``) every
  10 updates: no message, no object store, no ServerApp.

Two fedline rows: the default reduce (``robust = "auto"``: minimum-diameter averaging at K = 10
since 1 Dec 2026, the coordinate-wise median before) and FedBuff's weighted mean (``robust = "none"``). Issue 19's intake
ratio is the mean's: intake *including* the reduce, where the mean's reduce is the limit's axpy; the robust
default is a different statistic whose extra cost is reported beside it, not hidden in the ratio.
Ratios: fedline / limit and fedline / flower (> 1 means fedline is faster), in
updates/s (fedline on ``--workers`` threads, the others on one core), and **per
core**: the limit's CPU time per update over fedline's (all threads). Each fedline aggregator first takes ``WARMUP``
(two versions' worth of) updates untimed, so the timed ones measure a running aggregator, not a fresh state
directory's first files; the mean into a fresh state directory is timed beside it (``..._cold_...``).

**Paired rounds.** The updates are sealed once; then ``--rounds`` (6) rounds each build fresh aggregators (a new
state directory each, warmed as above) and time the limit, the mean, the cold mean, the int8 floor and the int8
mean on those same updates, one after the other, the order reversed every other round (``PAIRED``,
``round_order``); the default reduce, int8 with it and Flower are timed in the first ``--repeats`` (2) rounds
only. Each ratio of a fedline column to its limit is taken per round and reported as the median of the
per-round ratios: ``fedline_mean_vs_limit_per_core_median`` (list: ``..._rounds``), and the same for
``fedline_mean_cold_vs_limit_per_core`` and ``int8_mean_vs_limit_int8_cpu``.
**Issue 19's intake ratio is ``fedline_mean_vs_limit_per_core_median``**: on this shared 2-vCPU machine the
limit's own CPU per update moves by 20-30 % from minute to minute; in a round the limit and the mean see the same
updates seconds apart, so a slower machine slows both and cancels in their ratio, the alternated order cancels any
bias of going first or second (none shown in nine runs: BENCHMARKS.md "The intake bench's method"), and the
median ignores one disturbed round. Every key without ``_median`` / ``_rounds`` keeps its meaning: each column's
best over the first ``--repeats`` (2) rounds, on its own, and the ratios of those bests, as BENCHMARKS.md rows up
to 2 Dec 2026 report them (then from 2 runs of 100 updates at 100k; six runs on a quiet machine gave 0.62-0.74):
comparable with them, not the figure to read the target (≥ 0.7×) from. Timed updates: ``n_updates_for`` (400 at
100k, about 0.6 s of the mean's CPU per window; 60 at 1M).
Then peak RSS of a process running an aggregator with 1,000 enrolled sites
taking updates from 200 different sites (100k-parameter model).

Usage: ``python bench/aggregator.py`` (table) or ``--json`` (one JSON object);
``--sizes 10000,100000`` to choose. Flower is optional; without it, the table says so.
``pip install flwr==1.42.0`` into fedline's venv would downgrade packages fedline uses
(protobuf, packaging, rich, typer), so install it beside the venv and put it on the path
for the run only: ``pip install --no-deps --target /tmp/flwr flwr==1.42.0 grpcio
grpcio-health-checking iterators pycryptodome httpx httpcore h11 certifi requests urllib3
charset-normalizer tomli sniffio sqlalchemy alembic mako`` then ``PYTHONPATH=.:/tmp/flwr python
bench/aggregator.py`` (the faithful path needs the object store's imports: sqlalchemy, alembic, mako).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this file is bench/aggregator.py: keep its folder off the path so "aggregator" is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # after the repository: flower_receive, never "aggregator"

import flower_receive  # noqa: E402
from nacl.public import PrivateKey  # noqa: E402
from nacl.signing import VerifyKey  # noqa: E402

from aggregator import robust  # noqa: E402
from aggregator.config import parse_config  # noqa: E402
from aggregator.core import AggregatorCore  # noqa: E402
from broker_bridge import envelope, quantised  # noqa: E402
from broker_bridge.envelope import UpdateHeader  # noqa: E402
from broker_bridge.keys import KeyPair, create_federation  # noqa: E402
from broker_bridge.sealopen import seal_open  # noqa: E402
from fedline.blas import one_blas_thread  # noqa: E402
from fedline.heap import keep_freed_buffers  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
K = 10
N_FEATURES = 128


def hidden_for(n_params: int) -> int:
    """Width H of an MLP body [F -> H -> H] with about ``n_params`` parameters: H² + (F + 2) H = n."""
    f = N_FEATURES
    return max(1, round((-(f + 2) + math.sqrt((f + 2) ** 2 + 4 * n_params)) / 2))


def flower() -> tuple[Any, Any, Any, str] | None:
    try:
        import flwr
        from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.server.strategy.aggregate import aggregate
    except Exception:
        return None
    if flower_receive.flower_version() is None:
        return None
    return ndarrays_to_parameters, parameters_to_ndarrays, aggregate, flwr.__version__


def setup(root: Path, n_params: int, n_sites: int, workers: int, strategy: str, robust: str = "auto"):
    """A federation on disk and an AggregatorCore for an MLP of about ``n_params`` shared parameters.

    ``robust``: the reduce's statistic (``"auto"``, the default: minimum-diameter averaging at K = 10;
    ``"none"``: FedBuff's weighted mean, the reduce the limit's axpy stands for).
    """
    fed = create_federation("bench", [f"site-{i:04d}" for i in range(n_sites)])
    agg, enr, sites = fed.aggregator, fed.enrollment, list(fed.sites.values())
    h = hidden_for(n_params)
    table = {
        "aggregator": {
            "federation": "bench",
            "key_file": "unused",
            "enrollment_file": "unused",
            "state_dir": str(root / "state"),
            "workers": workers,
        },
        "model": {"kind": "mlp", "n_features": N_FEATURES, "hidden": [h, h], "personal": ["head."]},
        "strategy": {
            "kind": strategy,
            "buffer_size": K,
            "max_staleness": 1000,
            "min_sites": 1 if strategy == "fedasync" else 3,
            "robust": robust,
        },
        "validation": {"max_norm": 1e9},
    }
    core = AggregatorCore(parse_config(table), keys=agg, enrollment=enr)
    return core, agg, sites


def make_updates(
    core: AggregatorCore,
    agg: KeyPair,
    sites: list[KeyPair],
    n: int,
    seed: int = 0,
    encodings: tuple[str, ...] = ("float32",),
) -> tuple[list[dict[str, np.ndarray]], dict[str, list[bytes]], list[int]]:
    """``n`` random deltas (the same for the same seed), each sealed once per encoding: (deltas, blobs by
    encoding, sample counts). One draw for every encoding: at 1M parameters the draw costs more than the seal."""
    rng = np.random.default_rng(seed)
    box_pub = agg.public().box_pub
    deltas: list[dict[str, np.ndarray]] = []
    blobs: dict[str, list[bytes]] = {e: [] for e in encodings}
    samples: list[int] = []
    for i in range(n):
        d = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in core.model.items()}
        site = sites[i % len(sites)]
        n_samples = int(rng.integers(10, 1000))
        for encoding in encodings:
            header = UpdateHeader(
                site.ident, 1 + i // len(sites), f"u{i}", 0, n_samples, {"epsilon": 1.0}, encoding=encoding
            )
            blobs[encoding].append(envelope.seal_update(header, quantised.encode(d, encoding), site, box_pub))
        deltas.append(d)
        samples.append(n_samples)
    return deltas, blobs, samples


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def timed_alone(fn, *args) -> tuple[float, float, float]:
    """:func:`timed` and the CPU seconds that threads other than this one used meanwhile: for a one-thread
    loop that should be about 0 (a library's thread still spinning after fedline's run was once charged to
    the limit's loop this way: ``fedline.blas``)."""
    t0 = time.thread_time()
    wall, cpu = timed(fn, *args)
    return wall, cpu, cpu - (time.thread_time() - t0)


def run_fedline(core: AggregatorCore, blobs: list[bytes]) -> None:
    verdicts = [d.receipt["verdict"] for d in core.process_stream(blobs)]
    assert all(v in ("applied", "buffered") for v in verdicts), verdicts[:5]


def open_verified(box: PrivateKey, blob: bytes, tensor_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Decrypt (SealedBox, in place) and verify (SHA-256 of the plaintext + Ed25519) one sealed update: its tensors.

    The tensors are opened onto an aligned address, as fedline's opener places them (``tensor_bytes``: the float32
    model's size, known to the receiver; None: placed from the plaintext's first bytes, as for an int8 update).
    Until 2 Dec 2026 the limit opened them anywhere: in about 6 of 10 updates unaligned, and its axpy then cost
    about 15 us more per 100k-parameter update (62 against 47 us), a limit slower than the least an intake must do.
    """
    inner = seal_open(memoryview(blob)[4:], box, place=envelope._tensor_data_at, tail=tensor_bytes)
    slen = inner[4]
    site, vk, sig = inner[5 : 5 + slen], bytes(inner[5 + slen : 37 + slen]), bytes(inner[37 + slen : 101 + slen])
    plain = inner[101 + slen :]
    VerifyKey(vk).verify(envelope.digest(site, envelope._UPDATE_DOMAIN, b"\x00", plain), sig)
    _, rest = envelope._decode_update_header(plain)
    return envelope.decode_tensors(rest)


def open_and_add(box: PrivateKey, blob: bytes, acc: dict[str, np.ndarray], weight: float) -> None:
    """The least any intake must do with one sealed update: decrypt, verify the signature, ``acc += w * delta``.

    No enrollment lookup, no validation, no storage, no copies beyond what the
    libraries make: the physical limit the aggregator's intake is measured against.
    """
    for k, a in open_verified(box, blob, sum(v.nbytes for v in acc.values())).items():
        robust.add_scaled(acc[k], a, weight)


def open_and_add_int8(box: PrivateKey, blob: bytes, acc: dict[str, np.ndarray], weight: float) -> None:
    """The int8 path's floor: decrypt, verify, the norm from the int8 blocks, ``acc += w * delta`` from them.

    The norm is in the floor because no intake may skip it: the norm bound is what stops one site from
    steering the model (validation and clipping). No SQLite, no durable append, no checkpoint, no receipts.
    """
    delta = quantised.read_int8(open_verified(box, blob))
    delta.norm()
    for k in delta:
        delta.add_to(acc[k], k, weight)


def run_limit_int8(agg: KeyPair, blobs: list[bytes], samples: list[int], reference: dict[str, np.ndarray]) -> None:
    """:func:`open_and_add_int8` over every int8 update, in one loop on one core."""
    acc = {k: np.zeros_like(v) for k, v in reference.items()}
    for blob, n in zip(blobs, samples):
        open_and_add_int8(agg.box_key, blob, acc, float(n))


def run_limit(agg: KeyPair, blobs: list[bytes], samples: list[int], reference: dict[str, np.ndarray]) -> None:
    """:func:`open_and_add` over every update, in one loop on one core."""
    acc = {k: np.zeros_like(v) for k, v in reference.items()}
    for blob, n in zip(blobs, samples):
        open_and_add(agg.box_key, blob, acc, float(n))


def flower_wire(fl, deltas: list[dict[str, np.ndarray]]) -> list[Any]:
    return [fl[0](list(d.values())) for d in deltas]  # what Flower's server receives


def run_flower(fl, wire: list[Any], samples: list[int]) -> None:
    _, from_params, aggregate, _ = fl
    results = []
    for params, n in zip(wire, samples):
        results.append((from_params(params), n))
        if len(results) == K:
            aggregate(results)
            results = []
    if results:
        aggregate(results)


def run_flower_faithful(replies: list[flower_receive.Reply]) -> None:
    """Flower 1.42's receive path (:mod:`flower_receive`) for every reply, FedAvg every K replies."""
    for lo in range(0, len(replies), K):
        flower_receive.receive_and_aggregate(replies[lo : lo + K])


def n_updates_for(n_params: int) -> int:
    """Timed updates per measurement: about 0.5 s or more of the mean intake's CPU per window at 100k and 1M (100 at
    100k gave 150-200 ms, short enough that the machine's drift, not the code, set the ratio)."""
    return {10_000: 200, 100_000: 400}.get(n_params, 60)


#: updates each fedline aggregator takes, untimed, before the timed ones (two versions at K = 10): intake is
#: measured running, not on a fresh state directory's first files (a log segment, the WAL) and first versions.
#: Every round builds its aggregators afresh (a new state directory each) and warms each of them so, just before
#: its timed updates: each round is today's measurement again, never a longer-running aggregator than the last.
WARMUP = 2 * K


def warm_and_time(core: AggregatorCore, blobs: list[bytes], warm: int = WARMUP) -> tuple[float, float]:
    """:func:`run_fedline` over ``blobs[:warm]`` untimed, then timed over the rest."""
    run_fedline(core, blobs[:warm])
    return timed(run_fedline, core, blobs[warm:])


#: paired rounds per size (even, so each pair is timed limit-first in half of them)
ROUNDS = 6

#: the columns timed in every round, in an even round's order (an odd round runs it reversed, so each fedline
#: column and its limit swap places): each figure and its limit on the same updates, seconds apart
PAIRED = ("limit", "fedline_mean", "fedline_mean_cold", "limit_int8", "fedline_int8_mean")

#: the columns timed only in the first ``--repeats`` rounds (their figures are best-of, as before the rounds)
ONCE = ("fedline", "fedline_int8", "flower", "flower_faithful")

#: the ratios taken per round: key -> (the limit's column, the fedline column); CPU per update, limit over fedline
ROUND_RATIOS = {
    "fedline_mean_vs_limit_per_core": ("limit", "fedline_mean"),  # issue 19's intake ratio
    "fedline_mean_cold_vs_limit_per_core": ("limit", "fedline_mean_cold"),
    "int8_mean_vs_limit_int8_cpu": ("limit_int8", "fedline_int8_mean"),
}


def round_order(r: int) -> tuple[str, ...]:
    """The paired columns in round ``r``'s order: :data:`PAIRED` in even rounds, reversed in odd ones."""
    return PAIRED if r % 2 == 0 else PAIRED[::-1]


def paired_ratios(cpu_rounds: list[dict[str, float]]) -> dict[str, Any]:
    """Each of :data:`ROUND_RATIOS` per round (the limit's CPU over the fedline column's, both from that round)
    and the median of those per-round ratios (``<key>_rounds``, ``<key>_median``).

    Why per round: a round times both on the same updates seconds apart, so a slower machine slows both and
    cancels in the ratio; the best-of figure divides two minima taken in different rounds, each at its own
    luckiest moment. Why the median: one disturbed round moves it by one rank, not by its size.
    """
    out: dict[str, Any] = {}
    for key, (limit, fedline) in ROUND_RATIOS.items():
        ratios = [c[limit] / c[fedline] for c in cpu_rounds]
        out[f"{key}_rounds"] = ratios
        out[f"{key}_median"] = statistics.median(ratios)
    return out


@dataclass
class Updates:
    """The updates every round takes (sealed once; each round's aggregators have fresh state directories, so the
    same updates are new to them), the federation's keys, and the baselines' views of the same deltas."""

    agg: KeyPair
    enrollment: Any
    model: dict[str, np.ndarray]
    blobs: list[bytes]  # float32, WARMUP + n
    blobs8: list[bytes]  # int8, the same deltas
    samples: list[int]  # of the timed updates
    wire: list[Any] | None  # Flower's narrow baseline (the timed updates)
    replies: list[Any] | None  # Flower's faithful receive path (the timed updates)


def seal_updates(root: Path, n_params: int, n: int, fl: Any) -> Updates:
    """``WARMUP + n`` sealed updates, float32 and int8, of the same random deltas (seed 0)."""
    core, agg, sites = setup(root, n_params, K, 1, "fedbuff")
    deltas, sealed, samples = make_updates(core, agg, sites, WARMUP + n, encodings=("float32", "int8"))
    blobs, blobs8 = sealed["float32"], sealed["int8"]
    deltas, samples = deltas[WARMUP:], samples[WARMUP:]  # the baselines take the timed updates only
    wire = flower_wire(fl, deltas) if fl else None
    replies = flower_receive.replies([list(d.values()) for d in deltas], samples) if fl else None
    ups = Updates(agg, core.enrollment, core.model, blobs, blobs8, samples, wire, replies)
    core.close()
    return ups


class Round:
    """One round's columns, each timed by :meth:`time`; every fedline column on an aggregator of its own, built
    (untimed) into a fresh state directory just before it, and warmed unless it is the cold one."""

    def __init__(self, root: Path, ups: Updates, n_params: int, workers: int, fl: Any) -> None:
        self.root, self.ups, self.n_params, self.workers, self.fl = root, ups, n_params, workers, fl
        self.reduce_default = ""
        self.limit_others = 0.0  # CPU of other threads during the limit's loop

    def _fedline(self, name: str, robust: str, blobs: list[bytes], warm: bool) -> tuple[float, float]:
        core, _, _ = setup(self.root / name, self.n_params, K, self.workers, "fedbuff", robust)
        core.keys, core.enrollment = self.ups.agg, self.ups.enrollment  # the same federation: the same blobs
        if robust == "auto":
            self.reduce_default = core.strategy.reduce_stat
        try:
            return warm_and_time(core, blobs) if warm else timed(run_fedline, core, blobs[WARMUP:])
        finally:
            core.close()
            shutil.rmtree(self.root / name)  # 1M: a few hundred MB of log and checkpoints per aggregator

    def time(self, column: str) -> tuple[float, float]:
        """(wall, CPU) seconds of ``column`` over the round's timed updates."""
        u = self.ups
        if column == "limit":
            wall, cpu, others = timed_alone(run_limit, u.agg, u.blobs[WARMUP:], u.samples, u.model)
            self.limit_others = others
            return wall, cpu
        if column == "limit_int8":
            return timed(run_limit_int8, u.agg, u.blobs8[WARMUP:], u.samples, u.model)
        if column == "flower":
            return timed(run_flower, self.fl, u.wire, u.samples)
        if column == "flower_faithful":
            return timed(run_flower_faithful, u.replies)
        blobs = u.blobs8 if "int8" in column else u.blobs
        robust = "none" if column.endswith(("_mean", "_mean_cold")) else "auto"
        return self._fedline(column, robust, blobs, warm=not column.endswith("_cold"))


def measure(
    n_params: int, workers: int, repeats: int, rounds: int = ROUNDS, n_updates: int | None = None
) -> dict[str, Any]:
    """One row: ``rounds`` paired rounds over the same updates (:data:`PAIRED` every round, in :func:`round_order`;
    :data:`ONCE` in the first ``repeats`` rounds, after the pairs)."""
    fl = flower()
    n = n_updates or n_updates_for(n_params)
    walls: list[dict[str, float]] = []
    cpus: list[dict[str, float]] = []
    limit_others = 0.0  # the most of any round
    reduce_default = ""
    with tempfile.TemporaryDirectory(prefix="fedline-bench-") as tmp:
        ups = seal_updates(Path(tmp) / "keys", n_params, n, fl)
        for r in range(rounds):
            rnd = Round(Path(tmp) / f"r{r}", ups, n_params, workers, fl)
            once = [c for c in ONCE if fl or not c.startswith("flower")] if r < repeats else []
            t = {c: rnd.time(c) for c in (*round_order(r), *once)}
            walls.append({c: v[0] for c, v in t.items()})
            cpus.append({c: v[1] for c, v in t.items()})
            limit_others = max(limit_others, rnd.limit_others)
            if r == 0:
                reduce_default = rnd.reduce_default
    row: dict[str, Any] = {
        "params": sum(v.size for v in ups.model.values()),
        "reduce_default": reduce_default,  # the statistic of the "fedline" and "fedline_int8" columns
        "updates": n,
        "warmup_updates": WARMUP,  # taken by each fedline aggregator (but the cold one) before the timed ones
        "rounds": rounds,  # paired rounds (PAIRED every round; ONCE in the first `repeats` of them)
        "repeats": min(repeats, rounds),
        "sealed_bytes": len(ups.blobs[0]),
        "int8_sealed_bytes": len(ups.blobs8[0]),
    }
    # the older keys: each column's best of the first `repeats` rounds, on its own (the bench's best of `repeats`
    # runs before the rounds; the best of all six read higher, each column's minimum falling further)
    for k in walls[0]:
        row[f"{k}_per_s"] = n / min(w[k] for w in walls[:repeats])
        row[f"{k}_cpu_ms_per_update"] = 1e3 * min(c[k] for c in cpus[:repeats]) / n
    row["cpu_ms_per_update_rounds"] = {k: [1e3 * c[k] / n for c in cpus] for k in PAIRED}
    row["limit_other_threads_cpu_ms_per_update"] = 1e3 * limit_others / n  # should be about 0
    ratios(row, fl is not None)
    row.update(paired_ratios(cpus))
    return row


def ratios(row: dict[str, Any], fl: bool) -> None:
    """The ratios of the best-of figures (the keys older BENCHMARKS.md rows report), into ``row``."""
    row["fedline_vs_limit"] = row["fedline_per_s"] / row["limit_per_s"]
    row["fedline_vs_limit_per_core"] = row["limit_cpu_ms_per_update"] / row["fedline_cpu_ms_per_update"]
    # issue 19's intake ratio: intake + FedBuff's mean reduce (one axpy per update, as the limit does) against
    # the limit; the default reduce (MDA, above) is a different statistic with its own cost
    row["fedline_mean_vs_limit_per_core"] = row["limit_cpu_ms_per_update"] / row["fedline_mean_cpu_ms_per_update"]
    row["fedline_mean_cold_vs_limit_per_core"] = (
        row["limit_cpu_ms_per_update"] / row["fedline_mean_cold_cpu_ms_per_update"]
    )
    row["fedline_vs_flower"] = row["fedline_per_s"] / row["flower_per_s"] if fl else None
    # int8: CPU per update against fedline's float32 path and against Flower's float32 decode + aggregate
    # (> 1: the int8 path costs less); Flower runs on one core, so its CPU per update is its whole cost
    row["int8_vs_float32_cpu"] = row["fedline_cpu_ms_per_update"] / row["fedline_int8_cpu_ms_per_update"]
    row["int8_vs_flower_cpu"] = row["flower_cpu_ms_per_update"] / row["fedline_int8_cpu_ms_per_update"] if fl else None
    row["int8_vs_flower"] = row["fedline_int8_per_s"] / row["flower_per_s"] if fl else None
    row["int8_mean_vs_flower_cpu"] = (
        row["flower_cpu_ms_per_update"] / row["fedline_int8_mean_cpu_ms_per_update"] if fl else None
    )
    row["int8_mean_vs_flower"] = row["fedline_int8_mean_per_s"] / row["flower_per_s"] if fl else None
    # against Flower's faithful receive path (from the serialised requests its SuperLink receives)
    faithful = row.get("flower_faithful_cpu_ms_per_update")
    row["int8_vs_flower_faithful_cpu"] = faithful / row["fedline_int8_cpu_ms_per_update"] if fl else None
    row["int8_mean_vs_flower_faithful_cpu"] = faithful / row["fedline_int8_mean_cpu_ms_per_update"] if fl else None
    # the int8 floor (decrypt + verify + norm + add from the int8 blocks, one core): how close the int8 mean
    # runs to it, and whether the floor alone could beat Flower (< 1: even the floor costs more than Flower)
    row["int8_mean_vs_limit_int8_cpu"] = (
        row["limit_int8_cpu_ms_per_update"] / row["fedline_int8_mean_cpu_ms_per_update"]
    )
    row["limit_int8_vs_flower_cpu"] = (
        row["flower_cpu_ms_per_update"] / row["limit_int8_cpu_ms_per_update"] if fl else None
    )


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: per address space, so not inherited across exec
    the way getrusage's ru_maxrss is from a large parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(n_sites: int, n_params: int, n_updates: int) -> None:
    """In a fresh process: an aggregator with ``n_sites`` enrolled, fed ``n_updates`` from different sites."""
    with tempfile.TemporaryDirectory(prefix="fedline-bench-rss-") as tmp:
        core, agg, sites = setup(Path(tmp), n_params, n_sites, 2, "fedbuff")
        blobs = make_updates(core, agg, sites[:n_updates], n_updates)[1]["float32"]
        base = peak_rss_mb()
        for _ in core.process_stream(blobs):
            pass
        peak = peak_rss_mb()
        core.close()
    print(
        json.dumps(
            {
                "sites": n_sites,
                "params": sum(v.size for v in core.model.values()),
                "updates": n_updates,
                "peak_rss_mb": peak,
                "rss_before_intake_mb": base,
            }
        )
    )


def measure_rss(n_sites: int = 1000, n_params: int = 100_000, n_updates: int = 200) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", f"{n_sites},{n_params},{n_updates}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    if out.returncode != 0:
        raise SystemExit(f"the RSS measurement failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_paired(rows: list[dict[str, Any]]) -> None:
    """The paired rounds: per-round ratios and their medians (issue 19's intake ratio is the mean's median)."""
    print(
        "\npaired rounds (limit CPU / fedline CPU per update, both timed in the round on the same updates; "
        "order reversed every other round): median [per round]"
    )
    for r in rows:
        for key, label in (
            ("fedline_mean_vs_limit_per_core", "mean vs limit (issue 19)"),
            ("fedline_mean_cold_vs_limit_per_core", "cold mean vs limit"),
            ("int8_mean_vs_limit_int8_cpu", "int8 mean vs int8 floor"),
        ):
            per_round = ", ".join(f"{x:.3f}" for x in r[f"{key}_rounds"])
            print(f"{r['params']:>10,} {label:>26}: {r[f'{key}_median']:.3f}x [{per_round}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="parameter counts, comma-separated")
    ap.add_argument("--workers", type=int, default=2, help="threads opening sealed updates (default 2)")
    ap.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"paired rounds per size (default {ROUNDS}): limit, mean, cold, int8"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="the first rounds that also time the default reduce, int8 with it and Flower (best kept; default 2)",
    )
    ap.add_argument("--updates", type=int, help="timed updates per measurement (default: by size, 400 at 100k)")
    ap.add_argument("--no-rss", action="store_true", help="skip the 1,000-site memory measurement")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not 1 <= args.repeats <= args.rounds:
        ap.error("need 1 <= --repeats <= --rounds")
    keep_freed_buffers()  # as `fedline aggregator` runs (fedline.heap): the limit's loop runs in the same process
    # as `fedline aggregator` runs (fedline.blas); without it OpenBLAS's thread, woken by the MDA reduce's Gram
    # matrix, went on spinning after each fedline run and its CPU was counted in the limit's loop timed next
    one_blas_thread()
    if args.rss_child:
        rss_child(*map(int, args.rss_child.split(",")))
        return 0
    import logging

    logging.disable(logging.INFO)  # one log line per update would be timed too
    fl = flower()
    load_before = os.getloadavg()[0]
    rows = [measure(int(s), args.workers, args.repeats, args.rounds, args.updates) for s in args.sizes.split(",")]
    rss = None if args.no_rss else measure_rss()
    load_after = os.getloadavg()[0]
    result = {
        "benchmark": "aggregator",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "workers": args.workers,
        "buffer_size": K,
        "flower": fl[3] if fl else None,
        "rows": rows,
        "rss_1000_sites": rss,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"fedline aggregator: sealed updates/s through intake + FedBuff(K={K}) reduce, "
        f"{args.workers} worker threads, {os.cpu_count()} CPUs"
    )
    if not fl:
        print(
            "Flower baseline: NOT MEASURED - flwr is not installed (pip install flwr into the venv for the "
            "benchmark only)"
        )
    print(
        f"load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine slows every "
        "column; CPU ms per update is less affected)"
    )
    head = (
        f"{'params':>10} {'sealed KB':>10} {'fedline/s':>10} {'limit/s':>10} {'flower/s':>10} "
        f"{'vs limit':>9} {'per core':>9} {'mean/core':>10} {'cold':>6} {'vs flower':>10} {'CPU ms/update: fedline':>23} "
        f"{'mean':>6} {'limit':>6} {'flower':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        fl_s = f"{r['flower_per_s']:10.1f}" if fl else f"{'n/a':>10}"
        vs = f"{r['fedline_vs_flower']:9.2f}x" if fl else f"{'n/a':>10}"
        fl_cpu = f"{r['flower_cpu_ms_per_update']:7.3f}" if fl else f"{'n/a':>7}"
        print(
            f"{r['params']:>10,} {r['sealed_bytes'] / 1024:10.1f} {r['fedline_per_s']:10.1f} "
            f"{r['limit_per_s']:10.1f} {fl_s} {r['fedline_vs_limit']:8.2f}x {r['fedline_vs_limit_per_core']:8.2f}x "
            f"{r['fedline_mean_vs_limit_per_core']:9.2f}x {r['fedline_mean_cold_vs_limit_per_core']:5.2f}x {vs} "
            f"{r['fedline_cpu_ms_per_update']:23.3f} "
            f"{r['fedline_mean_cpu_ms_per_update']:6.3f} {r['limit_cpu_ms_per_update']:6.3f} {fl_cpu}"
        )
    print(
        "limit = SealedBox decrypt + signature verify + numpy weighted add, one loop on one core; per core = limit "
        "CPU / fedline CPU per update (fedline: the default reduce, minimum-diameter averaging; mean: FedBuff's "
        "weighted mean, the reduce the limit's axpy stands for; each fedline aggregator takes "
        f"{WARMUP} updates untimed first, cold = the mean into a fresh state directory); every column here is the "
        "best of the first --repeats rounds, each on its own (issue 19's figure is the paired median below); flower = flwr "
        f"{fl[3] if fl else '(missing)'} parameters_to_ndarrays + aggregate (no decryption)"
    )
    print_paired(rows)
    for r in rows:
        other = r["limit_other_threads_cpu_ms_per_update"]
        if other > 0.05 * r["limit_cpu_ms_per_update"]:
            print(
                f"WARNING {r['params']:,}: other threads used {other:.3f} ms of CPU per update during the limit's "
                "one-thread loop (charged to the limit: its per-core ratios read too high)"
            )
    print()
    head8 = (
        f"{'params':>10} {'int8 KB':>8} {'int8/s':>8} {'CPU ms/update: int8':>20} {'int8 mean':>10} {'float32':>8} "
        f"{'flower':>7} {'int8 floor':>11} {'int8 vs float32':>16} {'int8 vs flower':>15} {'int8 mean vs flower':>20} "
        f"{'floor vs flower':>16} {'faithful':>9} {'int8 vs faithful':>17} {'int8 mean vs faithful':>22}"
    )
    print(head8)
    print("-" * len(head8))
    for r in rows:
        vs_fl = f"{r['int8_vs_flower_cpu']:14.2f}x" if fl else f"{'n/a':>15}"
        vs_fl_m = f"{r['int8_mean_vs_flower_cpu']:19.2f}x" if fl else f"{'n/a':>20}"
        fl_cpu = f"{r['flower_cpu_ms_per_update']:7.3f}" if fl else f"{'n/a':>7}"
        vs_floor = f"{r['limit_int8_vs_flower_cpu']:15.2f}x" if fl else f"{'n/a':>16}"
        faithful = (
            f"{r['flower_faithful_cpu_ms_per_update']:9.3f} {r['int8_vs_flower_faithful_cpu']:16.2f}x "
            f"{r['int8_mean_vs_flower_faithful_cpu']:21.2f}x"
            if fl
            else f"{'n/a':>9}"
        )
        print(
            f"{r['params']:>10,} {r['int8_sealed_bytes'] / 1024:8.1f} {r['fedline_int8_per_s']:8.1f} "
            f"{r['fedline_int8_cpu_ms_per_update']:20.3f} {r['fedline_int8_mean_cpu_ms_per_update']:10.3f} "
            f"{r['fedline_cpu_ms_per_update']:8.3f} {fl_cpu} {r['limit_int8_cpu_ms_per_update']:11.3f} "
            f"{r['int8_vs_float32_cpu']:15.2f}x {vs_fl} {vs_fl_m} {vs_floor} {faithful}"
        )
    print(
        "int8 = the default reduce (" + rows[0]["reduce_default"] + ' for K = 10); int8 mean = robust = "none" '
        "(pure accumulation from the int8 blocks, as with FedAvg-style means); int8 vs X = X's CPU ms per update / "
        "the int8 path's (> 1: the int8 path costs less); int8 floor = decrypt + verify + the norm + the add from the "
        "int8 blocks, one loop on one core (no storage, no receipts); floor vs flower = Flower's CPU / the floor's "
        "(< 1: even the floor costs more than Flower's decode + aggregate); flower = the narrow baseline "
        "(parameters_to_ndarrays + the legacy aggregate); faithful = Flower 1.42's receive path from the serialised "
        "requests its SuperLink receives to FedAvg.aggregate_train (bench/flower_receive.py)"
    )
    if rss:
        print(
            f"peak RSS with {rss['sites']:,} enrolled sites, {rss['updates']} updates of {rss['params']:,} params: "
            f"{rss['peak_rss_mb']:.0f} MB (before intake {rss['rss_before_intake_mb']:.0f} MB, most of it torch, "
            "loaded to build version 0 and export ONNX)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
