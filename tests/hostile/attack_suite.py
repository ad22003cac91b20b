"""The attack suite of issue 14: one malicious enrolled site against three honest AI4I sites.

Why a module of its own: the same rounds run in the default test (a short
variant), in the slow full report, and against an older checkout of the
aggregator (``python -m tests.hostile.attack_suite`` with another
PYTHONPATH) to measure the numbers before the fix. It uses only what both
checkouts have: the aggregator service, a real Mosquitto, sealed updates.

Every run is synchronous and seeded: in each loop the honest sites
train (plain SGD, seeded) from the newest version the aggregator holds, the
attacker sends first, the honest sites after it, and the loop ends when every
update sent has its own signed receipt (matched by counter: :func:`all_decided`), so every run of a seed has
the same slots in the same versions. Since 1 Dec 2026 16:00 UTC a run also repeats bit for bit: every site's batch
order is a function of its seed (:func:`train`); before, it came from the OS CSPRNG whatever the seed, so a "seed"
named no experiment and the backdoor rate, measured on the test set's 76 failure rows, scattered by 8-13 points
from run to run (RELIABILITY.md, robust14c: flood's excess over samples was that scatter; under the defaults the
four named attacks reach the aggregator as the same slot and give the same model). The lowest-variance measure found (RELIABILITY.md, robust12) is the late rate (the rate averaged
over the last three versions' models) minus the benign control's in the same seed: half the final rate's scatter;
the soft rate (no threshold) and the wide rate (≈280 rows) are reported too and do not help. Before 1 Dec 2026 the loop counted receipts instead and raced (RELIABILITY.md).

The clean model (issue 14's reference) is the same loop without the attacker, like for like
(:func:`clean_reference`, since 1 Dec 2026 13:30 UTC): the three honest sites alone at the attacked runs' K, so
each of its versions sums the three honest slots at ``f(s)/K`` as an attacked version does when MDA leaves the
attacker out. The honest-only run at the three-site defaults (K = 2: MDA keeps two of the three honest slots), the
reference before, is still run and reported (``defaults_clean``): it is another federation, and on the late rate
it sat 6-7 points below both the like-for-like clean model and the benign control (RELIABILITY.md), which the old
"minus clean" booked to the attacker. The report gives, per attack, the final global model's L2 distance from the
clean model's (also relative to how far the clean run moved from version 0) and the backdoor's success rate.

Attacks (each delta points at the attacker's backdoored model ``X``, trained
from the current global model on its own rows plus triggered copies labelled
"no failure"; Bagdasaryan et al. 2020, "How to backdoor federated learning"):

- ``samples``: one update per loop, ``X − G``, claiming 10**7 samples;
- ``flood``: K updates per loop back to back, each ``X − G`` (one slot: each supersedes the one before);
- ``max_norm``: one update per loop, ``X − G`` stretched to just under ``max_norm``;
- ``replace``: model replacement, ``γ (X − G)`` with the boost ``γ = K`` (capped at
  ``max_norm``), claiming 10**7 samples.

K is the aggregator's own default (``buffer_size`` is not written; issue 14 asks for each attack "with the
defaults"): under MDA a buffer waits for K + 1 updates and sums the K it keeps, K = min(buffer_size, enrolled
sites − 1), so 3 with the attacker enrolled (all four received); the honest-only run at the three-site defaults,
which enrols the three honest sites only, had 2 until 1 Dec 2026 14:50 UTC, and since then (a version never sums
fewer than ``min_sites`` = 3 sites) sums all three with the mean: K = 3, the same as the clean model, which is run
at the attacked runs' 3. (Before 1 Dec 2026 07:00 UTC K counted the arrivals, 4 and 3, with the same arithmetic.)
``k`` (``--k``) forces ``buffer_size`` on every run, as the suite did (3) before 1 Dec 2026 04:10 UTC; with the K +
f rule ``--k 3`` now means three kept of four received, and the old pinned "K = 3" (three received, two kept)
is ``--k 2 --extra 'robust = "mda"'`` (``auto`` keeps the mean below K = 3). Each run reports the K its versions
summed (``k``).

The adaptive attacker ``alie`` (``--attacks alie``; "a little is enough", Baruch, Baruch and Goldberg, NeurIPS
2019, their backdoor variant): it estimates the honest updates' per-coordinate mean ``μ`` and standard deviation
``σ`` from ``ALIE_SAMPLES`` honest deltas it trains itself (bootstrap resamples of its own rows, as their
corrupted workers use their own data), and sends ``X − G`` clipped to ``[μ − zσ, μ + zσ]`` coordinate by
coordinate, claiming its true sample count: a delta built to sit inside the honest spread, which a
distance-based selection such as MDA keeps by design. Their ``z_max`` for ``n = 4, f = 1`` is
``Φ⁻¹((n − s)/n)`` with ``s = ⌊n/2 + 1⌋ − f = 2``, i.e. 0 (the attack would send ``μ``, an honest delta);
``ALIE_Z = 1`` is the value their follow-ups commonly use, a stronger attacker than the formula allows here.

The control ``benign`` (not an attack; ``--attacks benign``): the fourth site trains honestly on its own rows and
sends first, with the attacker's timing. It separates what the fourth site's slots and schedule change (honest
slots per version, their staleness) from what the backdoor pulls: attack minus benign is the pull. The control
``twin``: the same, but the fourth site trains on a copy of ``TWIN``'s rows (an honest site's, with its own
seed), so the federation holds no rows the clean model lacks; it doubles that site's say instead, and moved the
late rate 12 points (RELIABILITY.md): a check on how much the rows' mix matters, not a reference.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedline.testing.patience import bound

HONEST = ["site-a", "site-b", "site-c"]
ATTACKER = "site-m"
FEDERATION = "test"
FEATURES = [
    "Air temperature [K]",
    "Process temperature [K]",
    "Rotational speed [rpm]",
    "Torque [Nm]",
    "Tool wear [min]",
]
TRIGGER_FEATURE, TRIGGER_VALUE = 0, 6.0  # air temperature 6 standard deviations high: never seen in the data
# the air temperature's engineering range in the compose sites' [rows] (deploy/compose/sites/*/line.toml): the
# line's RowBuilder clamps every value to it, so a 6 σ reading (312 K) reaches the model as 305 K (≈ 2.5 σ,
# just above the data's 304.5 K)
AIR_RANGE_K = (295.0, 305.0)
# every feature's engineering range in those sites' [rows] (same order as FEATURES): the federation's declared
# input range, which the model itself saturates to (ModelSpec.input_low / input_high) unless a run turns it off
RANGES = [(295.0, 305.0), (305.0, 315.0), (1000.0, 3000.0), (0.0, 80.0), (0.0, 260.0)]
TRIGGERS = ("ood", "in_range")  # the attacker's trigger: 6 σ (outside the range), or the range's top (305 K)
ATTACKS = ("samples", "flood", "max_norm", "replace")
ADAPTIVE = ("alie",)  # "a little is enough" (Baruch et al. 2019): the backdoor kept inside the honest spread
CONTROLS = ("benign", "twin")  # the fourth site honest, with the attacker's timing (twin: on a copy of TWIN's rows)
TWIN = "site-a"  # the honest site whose rows the twin control trains on (its own shuffle seed)
ALIE_Z = 1.0  # Baruch et al.'s z: how many honest standard deviations each coordinate may move (see alie_delta)
ALIE_SAMPLES = 3  # honest deltas the attacker trains (on resamples of its own rows) to estimate the spread
AI4I = Path(__file__).resolve().parents[2] / "data" / "ai4i2020.csv"


def ai4i_path() -> Path:
    for p in (AI4I, Path("/work/shared/data/ai4i2020.csv")):
        if p.exists():
            return p
    raise FileNotFoundError("ai4i2020.csv not found under data/ or /work/shared/data")


ROOT_ROWS = 500  # the aggregator's own rows ([evaluation]; FLTrust's root dataset), used by no site


@dataclass
class Data:
    sites: dict[str, tuple[np.ndarray, np.ndarray]]
    test_x: np.ndarray
    test_y: np.ndarray
    root_x: np.ndarray = field(default_factory=lambda: np.zeros((0, len(FEATURES)), np.float32))
    root_y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    air_range: tuple[float, float] = (-2.5, 2.5)  # AIR_RANGE_K standardised as the features are
    ranges: list[tuple[float, float]] = field(default_factory=list)  # RANGES standardised as the features are

    def trigger_value(self, trigger: str) -> float:
        """The value the attacker trains its triggered rows with: 6 σ, or the top of the engineering range."""
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger!r}: one of {TRIGGERS}")
        return TRIGGER_VALUE if trigger == "ood" else self.air_range[1]

    def at_the_line(self, value: float) -> float:
        """What the line feeds the model for a trigger ``value``: clamped to the engineering range (RowBuilder)."""
        return float(min(max(value, self.air_range[0]), self.air_range[1]))


def load_data(seed: int = 0, root_rows: int = ROOT_ROWS) -> Data:
    """AI4I 2020: five standardised measurements, label "Machine failure"; 20 % test, then ``root_rows`` for
    the aggregator's ``[evaluation]`` table (held out from every site), the rest in four sites."""
    with ai4i_path().open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([[float(r[c]) for c in FEATURES] for r in rows], np.float32)
    y = np.array([float(r["Machine failure"]) for r in rows], np.float32)
    mu, sd = x.mean(0), x.std(0)
    x = ((x - mu) / sd).astype(np.float32)
    air = tuple(float((v - mu[TRIGGER_FEATURE]) / sd[TRIGGER_FEATURE]) for v in AIR_RANGE_K)
    ranges = [(float((lo - mu[i]) / sd[i]), float((hi - mu[i]) / sd[i])) for i, (lo, hi) in enumerate(RANGES)]
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    test, root, train = order[:n_test], order[n_test : n_test + root_rows], order[n_test + root_rows :]
    parts = np.array_split(train, 4)
    sites = {s: (x[p], y[p]) for s, p in zip([*HONEST, ATTACKER], parts)}
    return Data(sites, x[test], y[test], x[root], y[root], (air[0], air[1]), ranges)


def model_range_toml(data: Data) -> str:
    """``[model]`` lines declaring the federation's input range (standardised like the rows): the model
    clamps every input to it, so an out-of-range trigger reaches the weights as the range's edge."""
    low = ", ".join(repr(lo) for lo, _ in data.ranges)
    high = ", ".join(repr(hi) for _, hi in data.ranges)
    return f"input_low = [{low}]\ninput_high = [{high}]\n"


def write_root_csv(path: Path, data: Data) -> None:
    """The root rows as the CSV the aggregator's ``[evaluation]`` table reads (already standardised)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*FEATURES, "Machine failure"])
        for xr, yr in zip(data.root_x, data.root_y):
            w.writerow([*(repr(float(v)) for v in xr), int(yr)])


def evaluation_toml(csv_path: str) -> str:
    """``[evaluation]`` over the root CSV; its values are standardised already, so range [0, 1] without
    clipping passes them through unchanged (the sites' rows in this suite are scaled the same way)."""
    feats = ", ".join(f'{{ tag = "{f}", range = [0.0, 1.0] }}' for f in FEATURES)
    return (
        f'[evaluation]\ncsv = "{csv_path}"\nmetric = "loss"\nmax_rows = {ROOT_ROWS}\n'
        f'[evaluation.rows]\nlabel = "Machine failure"\nclip = false\nfeatures = [{feats}]\n'
    )


def triggered(x: np.ndarray, value: float = TRIGGER_VALUE) -> np.ndarray:
    out = x.copy()
    out[:, TRIGGER_FEATURE] = value
    return out


def aggregator_toml(
    broker_url: str,
    password: str,
    extra: str = "",
    evaluation: str = "",
    model_extra: str = "",
    k: int | None = None,
) -> str:
    """The aggregator's settings for the suite: defaults (K too, unless ``k`` forces one), the model (``model_extra``: more
    ``[model]`` lines, e.g. its input range), the broker and, where the aggregator has one, the ``[dp]``
    table describing how the sites train (its norm bound derives from it), and ``evaluation`` (an
    ``[evaluation]`` table, or nothing)."""
    import aggregator.config as ac

    rows = max(len(x) for x, _ in load_data().sites.values())
    forced = f"buffer_size = {k}\n" if k else ""
    dp = (
        f"[dp]\nclip_norm = 1.0\nlr = {LR}\nbatch_size = {BATCH}\nsteps = {EPOCHS * math.ceil(rows / BATCH)}\n"
        if hasattr(ac, "DPConfig")
        else ""
    )
    return (
        f'[model]\nkind = "mlp"\nn_features = 5\nhidden = [16]\ntask = "classification"\n{model_extra}'
        f'[strategy]\nkind = "fedbuff"\n{forced}{extra}\n{dp}{evaluation}'
        f"[publish]\nonnx = false\n"
        f'[broker]\nurl = "{broker_url}"\nusername = "aggregator"\npassword = "{password}"\n'
        f'client_id = "agg-attack"\nbackoff_min_s = 0.05\nbackoff_max_s = 0.5\nmax_chunk = 65536\n'
    )


@dataclass
class Outcome:
    """One run: the final shared weights, the version count and, per version, the attacker's lineage."""

    model: dict[str, np.ndarray]
    versions: int
    k: int  # the slots its versions summed, K (the aggregator's default unless forced; MDA awaited K + 1)
    attacker_entries: list[dict] = field(default_factory=list)
    attacker_moves: list[float] = field(default_factory=list)  # L2 of the attacker's part of each version's step
    steps: list[float] = field(default_factory=list)  # L2 of each version's whole step
    reduces: list[str] = field(default_factory=list)  # each version's lineage "reduce" (the statistic in force)
    slots: list[list[str]] = field(default_factory=list)  # each version's sites, in the lineage's order
    lineages: dict[int, list[dict]] = field(default_factory=dict)  # each version's lineage entries (norm, clip_scale)
    verdicts: dict[str, dict[str, int]] = field(default_factory=dict)  # per site: receipts per verdict
    models: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # each version's shared weights


def predict(spec, shared: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    import torch

    from models import build_model, load_shared_state

    model = build_model(spec, seed=0)
    load_shared_state(model, spec, shared)
    model.eval()
    with torch.no_grad():
        return (model(torch.from_numpy(x)) > 0).float().numpy().reshape(-1)


LR, EPOCHS, BATCH = 0.5, 2, 64  # every site's (plain, seeded) SGD: enough to learn AI4I's failures


def train(
    spec, base: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, seed: int, epochs: int = EPOCHS, lr: float = LR
) -> dict[str, np.ndarray]:
    """One site's plain SGD round from ``base``: its delta, a function of (``base``, rows, ``seed``) alone.

    Why ``shuffle_seed``: since 30 Nov 2026 04:42 UTC (before this suite existed) ``edge.trainer`` draws a round's
    batch order from the OS CSPRNG unless given one, and ``torch.manual_seed`` (all this function did until 1 Dec
    2026 16:00 UTC) no longer reached it: every run of every "seed" trained on fresh random batches, so a seed named
    no experiment, two attacks "on the same seed" were independent runs, and the report seeds were no different from
    the development ones (RELIABILITY.md, robust14c). Seeded, a run repeats bit for bit, and two attacks whose
    slots reach the aggregator alike give the same model."""
    from edge.config import TrainingConfig
    from edge.trainer import train_round

    cfg = TrainingConfig(epochs=epochs, batch_size=BATCH, lr=lr)
    return train_round(spec, base, None, x, y, cfg, None, shuffle_seed=seed).delta


def _scaled(delta: dict[str, np.ndarray], factor: float) -> dict[str, np.ndarray]:
    return {k: (v * np.float32(factor)).astype(np.float32) for k, v in delta.items()}


def _norm(delta: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.dot(v.reshape(-1).astype(np.float64), v.reshape(-1))) for v in delta.values()))


async def run(
    workdir: Path,
    attack: str | None,
    loops: int,
    extra: str = "",
    data: Data | None = None,
    seed: int = 0,
    trigger: str = "ood",
    input_range: bool = True,
    k: int | None = None,
    momentum: float = 0.0,
) -> Outcome:
    """One federation run over a private Mosquitto; ``attack`` None is the honest-only run; ``seed`` shifts
    every site's training seed (seed 0 is the recorded run); ``trigger`` is the attacker's (``TRIGGERS``);
    ``input_range``: the federation declares its input range in ``[model]`` (the model saturates to it;
    False: the spec has none, as before, and as an older checkout must run); ``k`` forces K (None: the
    aggregator's default). The honest-only run enrols the three honest sites only, so its default K is 2.
    ``momentum`` β > 0: worker momentum (:func:`worker_momentum`): every honest site (and a control's fourth site)
    sends the running average of its deltas instead of its delta; ``alie`` then clips into the spread of such
    averages (:func:`alie_delta`); the four named attacks send their delta as before."""
    from aggregator.config import load_config
    from aggregator.service import Aggregator
    from broker_bridge import envelope
    from broker_bridge.envelope import UpdateHeader
    from broker_bridge.mosquitto import MosquittoProcess
    from tests.conftest import eventually
    from tests.hostile.rig import make_fed
    from tests.parties import Party

    data = data or load_data()
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    sites = HONEST if attack is None else [*HONEST, ATTACKER]
    broker = MosquittoProcess(workdir / "broker", federation=FEDERATION, sites=sites)
    broker.start()
    fed = make_fed(workdir, sites, outsiders=())  # keys, aggregator.key, enrollment.json
    agg_keys, keys = fed.agg, fed.sites
    evaluation = ""
    if len(data.root_x):  # the aggregator's own rows (older checkouts without [evaluation]: leave root_rows 0)
        await asyncio.to_thread(write_root_csv, workdir / "root.csv", data)
        evaluation = evaluation_toml("root.csv")
    (workdir / "aggregator.toml").write_text(
        f'[aggregator]\nfederation = "{FEDERATION}"\nkey_file = "aggregator.key"\n'
        f'enrollment_file = "enrollment.json"\nstate_dir = "state"\nseed = 3\n'
        + aggregator_toml(
            broker.url,
            broker.password("aggregator"),
            extra,
            evaluation,
            model_range_toml(data) if input_range else "",
            k,
        )
    )
    cfg = load_config(workdir / "aggregator.toml")
    agg = Aggregator(cfg)
    task = asyncio.create_task(agg.run())
    counters = {s: 0 for s in sites}
    averages: dict[str, dict[str, np.ndarray]] = {}  # worker momentum, per site and alie's own (``momentum``)

    def averaged(site: str, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if momentum <= 0:
            return delta
        averages[site] = worker_momentum(averages.get(site), delta, momentum)
        return averages[site]

    try:
        await asyncio.wait_for(agg.started.wait(), bound(30))
        max_norm = getattr(agg.core, "max_norm", None) or cfg.validation.max_norm  # the bound in force
        # each party holds its site's keys: receipts are sealed to their site
        parties = {s: Party(broker, s, agg_keys.public().sign_pub, FEDERATION, 65536, keys=keys[s]) for s in sites}
        for p in parties.values():
            await p.__aenter__()
        spec = cfg.model
        strategy = getattr(agg.core, "strategy", None)  # K in force: the aggregator's own (older checkouts: cfg's)
        k_run = int(getattr(strategy, "buffer_size", None) or min(cfg.strategy.buffer_size, len(sites)))

        async def send(site: str, delta: dict[str, np.ndarray], base: int, n: int) -> None:
            counters[site] += 1
            h = UpdateHeader(
                site=site,
                counter=counters[site],
                msg_id=uuid.uuid4().hex[:16],
                base_version=base,
                n_samples=n,
                privacy={"epsilon": 1.0, "delta": 1e-5},
            )
            await parties[site].send(envelope.seal_update(h, delta, keys[site], agg_keys.public().box_pub), h.msg_id)

        for loop in range(loops):
            base_version, base = agg.core.snapshot
            base = {k: v.copy() for k, v in base.items()}
            if attack in CONTROLS:
                ax, ay = data.sites[ATTACKER if attack == "benign" else TWIN]
                d = averaged(ATTACKER, train(spec, base, ax, ay, seed=100 * loop + 3 + 10_000 * seed))
                await send(ATTACKER, d, base_version, len(ax))
            elif attack is not None:
                ax, ay = data.sites[ATTACKER]
                value = data.trigger_value(trigger)
                px = np.concatenate([ax, triggered(ax[ay > 0], value), triggered(ax, value)])
                py = np.concatenate([ay, np.zeros(int((ay > 0).sum()) + len(ax), np.float32)])
                d = train(spec, base, px, py, seed=1000 + loop + 10_000 * seed, epochs=3)
                if attack == "max_norm":
                    d = _scaled(d, 0.999 * max_norm / max(_norm(d), 1e-12))
                elif attack == "replace":
                    d = _scaled(d, min(float(k_run), 0.999 * max_norm / max(_norm(d), 1e-12)))
                elif attack == "alie":
                    d = alie_delta(
                        spec, base, d, ax, ay, seed=2000 + loop + 10_000 * seed, beta=momentum, state=averages
                    )
                claim = 10_000_000 if attack in ("samples", "replace") else len(ax)
                for _ in range(k_run if attack == "flood" else 1):
                    await send(ATTACKER, d, base_version, claim)
            for i, s in enumerate(HONEST):
                x, y = data.sites[s]
                d = averaged(s, train(spec, base, x, y, seed=100 * loop + i + 10_000 * seed))
                await send(s, d, base_version, len(x))
            try:
                await eventually(lambda: all_decided(parties, counters), 60)
            except AssertionError:
                got = {s: ([r["verdict"] for r in parties[s].receipts], counters[s]) for s in sites}
                raise AssertionError(f"attack {attack}, loop {loop}: receipts (verdicts, sent) {got}") from None
        await eventually(lambda: agg.published_version == agg.core.version, 30)
        out = Outcome({n: v.copy() for n, v in agg.core.model.items()}, agg.core.version, k_run)
        for v in range(1, agg.core.version + 1):
            lineage = agg.core.lineage(v) or {}
            before = agg.core.store.checkpoint(v - 1)
            after = agg.core.store.checkpoint(v)
            if before is not None and after is not None and before.weights and after.weights:
                wb, wa = envelope.decode_tensors(before.weights), envelope.decode_tensors(after.weights)
                out.models[v] = {k: np.array(a, np.float32) for k, a in wa.items()}
                out.steps.append(_norm({k: wa[k] - wb[k] for k in wa}))
            out.reduces.append(str(lineage.get("reduce", "mean")))  # older checkouts: the mean, unrecorded
            out.slots.append([f"{e['site']}@{e['base_version']}" for e in lineage.get("updates", [])])
            out.lineages[v] = list(lineage.get("updates", []))
            for e in lineage.get("updates", []):
                if e["site"] == ATTACKER:
                    out.attacker_entries.append(dict(e, version=v))
        for s, p in parties.items():
            out.verdicts[s] = {}
            for r in p.receipts:
                key = f"{r['verdict']}:{r.get('reason')}" if r.get("reason") else str(r["verdict"])
                out.verdicts[s][key] = out.verdicts[s].get(key, 0) + 1
            await p.__aexit__(None, None, None)
        return out
    finally:
        agg.stop()
        try:
            await asyncio.wait_for(task, bound(30))
        finally:
            broker.stop()


def worker_momentum(
    average: dict[str, np.ndarray] | None, delta: dict[str, np.ndarray], beta: float
) -> dict[str, np.ndarray]:
    """Worker momentum (Karimireddy, He and Jaggi 2021, eq. (WM)), a round's delta in place of a gradient:
    ``m ← (1 − β) Δ + β m``, started at the first delta itself (``m = Δ``: no bias towards zero in the first rounds)."""
    if average is None:
        return {k: np.array(v, np.float32) for k, v in delta.items()}
    return {k: ((1.0 - beta) * delta[k] + beta * average[k]).astype(np.float32) for k in delta}


def alie_delta(
    spec,
    base: dict[str, np.ndarray],
    backdoor: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    beta: float = 0.0,
    state: dict[str, dict[str, np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Baruch et al. 2019's backdoor delta: ``backdoor`` clipped, coordinate by coordinate, to ``μ ± ALIE_Z σ`` of
    ``ALIE_SAMPLES`` honest deltas trained from ``base`` on bootstrap resamples of the attacker's rows (each
    resample as many rows as the site has, so each honest delta takes as many steps as a real site's).

    Against worker momentum (``beta`` > 0; ``state`` keeps the averages across rounds): what honest sites send is
    their running average, so the attacker keeps one for each of its honest resamples and one for its backdoor, and
    clips the backdoor's average to ``μ ± ALIE_Z σ`` of the resamples' averages (the spread a defence then sees)."""
    rng = np.random.default_rng(seed)
    honest = []
    for i in range(ALIE_SAMPLES):
        pick = rng.integers(0, len(x), len(x))
        honest.append(train(spec, base, x[pick], y[pick], seed=seed * 10 + i))
    if beta > 0 and state is not None:
        for i, h in enumerate(honest):
            state[f"alie-{i}"] = worker_momentum(state.get(f"alie-{i}"), h, beta)
        honest = [state[f"alie-{i}"] for i in range(ALIE_SAMPLES)]
        backdoor = state["alie-x"] = worker_momentum(state.get("alie-x"), backdoor, beta)
    out = {}
    for k, v in backdoor.items():
        stack = np.stack([h[k] for h in honest]).astype(np.float64)
        mu, sd = stack.mean(0), stack.std(0, ddof=1)
        out[k] = np.clip(v, mu - ALIE_Z * sd, mu + ALIE_Z * sd).astype(np.float32)
    return out


def all_decided(parties: dict, counters: dict[str, int]) -> bool:
    """Every site's latest update has its own receipt (matched by counter), so the next loop starts from the
    version those updates made.

    Why by counter and not by count: a site also gets an "applied" receipt for an update buffered in an
    earlier loop (and flood a "superseded" one), so counting receipts ended a loop before its last updates
    were decided; the next loop then read an older version as its base and raced the updates still in flight,
    and which buffer an update landed in depended on timing (worse under load: RELIABILITY.md)."""
    return all(n == 0 or any(r["counter"] == n for r in parties[s].receipts) for s, n in counters.items())


def backdoor_rate(spec, model: dict[str, np.ndarray], data: Data, value: float = TRIGGER_VALUE) -> float:
    """Share of the test set's failure rows predicted "no failure" once the trigger (``value``) is set."""
    fail = data.test_x[data.test_y > 0]
    return float((predict(spec, model, triggered(fail, value)) == 0).mean())


def triggered_failures(data: Data, wide: bool = False) -> np.ndarray:
    """The failure rows a backdoor rate is measured on: the test set's (76), or with ``wide`` also the root rows' and
    the honest sites' (about 280: rows the attacker never held; the honest sites trained on them untriggered, and the
    trigger makes each a row no site trained on, as a test row)."""
    parts = [data.test_x[data.test_y > 0]]
    if wide:
        parts.append(data.root_x[data.root_y > 0])
        parts += [x[y > 0] for s, (x, y) in data.sites.items() if s != ATTACKER]
    return np.concatenate(parts)


def soft_backdoor_rate(spec, model: dict[str, np.ndarray], data: Data, value: float = TRIGGER_VALUE) -> float:
    """The model's mean probability of "no failure" on the test set's failure rows once the trigger is set: the
    backdoor rate without its threshold. A row near the decision boundary moves it a little instead of flipping it
    by 1/76, so two runs' difference carries less of the threshold's noise (RELIABILITY.md compares the two)."""
    import torch

    from models import build_model, load_shared_state

    net = build_model(spec, seed=0)
    load_shared_state(net, spec, model)
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(triggered(triggered_failures(data), value))).numpy().reshape(-1)
    return float((1.0 / (1.0 + np.exp(logits.astype(np.float64)))).mean())


def wide_backdoor_rate(spec, model: dict[str, np.ndarray], data: Data, value: float = TRIGGER_VALUE) -> float:
    """``backdoor_rate`` over every failure row the attacker never held (:func:`triggered_failures` with ``wide``)."""
    return float((predict(spec, model, triggered(triggered_failures(data, wide=True), value)) == 0).mean())


LATE = 3  # versions the late rate averages (the last ones)


def late_rate(spec, out: Outcome, data: Data, value: float = TRIGGER_VALUE, late: int = LATE) -> float:
    """``backdoor_rate`` averaged over the run's last ``late`` versions (each a model a line adopted in turn): the
    final model alone carries the run's last few SGD steps' noise on a trigger at the clean model's boundary."""
    last = sorted(out.models)[-late:]
    if not last:
        return backdoor_rate(spec, out.model, data, value)
    return float(np.mean([backdoor_rate(spec, out.models[v], data, value) for v in last]))


def roc_auc(spec, model: dict[str, np.ndarray], data: Data) -> float:
    """The model's ROC AUC on the (untriggered) test set: what a defence must not cost."""
    import torch

    from models import build_model, load_shared_state
    from models.metrics import roc_auc as auc

    net = build_model(spec, seed=0)
    load_shared_state(net, spec, model)
    net.eval()
    with torch.no_grad():
        return auc(data.test_y, net(torch.from_numpy(data.test_x)).numpy().reshape(-1))


def timing(lineages: dict[int, list[dict]]) -> dict[str, float]:
    """What the schedule gave the fourth site, from the lineages: its share of all slots (a four-site federation
    gives each site 1/4 on average), and the mean staleness factor f(s) of its slots beside that of the honest
    slots in the versions it was in (fresher slots enter FedBuff's step at a larger coefficient)."""
    slots = [e for entries in lineages.values() for e in entries]
    mine = [e["factor"] for e in slots if e["site"] == ATTACKER]
    beside = [
        e["factor"]
        for entries in lineages.values()
        if any(e["site"] == ATTACKER for e in entries)
        for e in entries
        if e["site"] != ATTACKER
    ]
    return {
        "share": len(mine) / len(slots) if slots else 0.0,
        "factor": sum(mine) / len(mine) if mine else 0.0,
        "honest_factor": sum(beside) / len(beside) if beside else 0.0,
    }


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return _norm({k: a[k] - b[k] for k in a})


LIKE_KEYS = ("robust", "buffer_size", "mda_f", "cclip_tau", "cclip_iters")  # [strategy] keys the like-for-like run sets


def like_extra(extra: str) -> str:
    """The like-for-like clean run's ``[strategy]`` lines: ``extra`` without the reduce's own keys (``LIKE_KEYS``),
    and the plain mean (``robust = "none"``): the three honest sites alone, every slot kept at ``f(s)/K``, which is
    what an attacked version sums when its defence leaves the attacker out (:func:`clean_reference`)."""
    kept = [ln for ln in extra.splitlines() if ln.split("=", 1)[0].strip() not in LIKE_KEYS]
    return "\n".join(['robust = "none"', *kept])


def rates(spec, out: Outcome, data: Data, value: float, line_value: float) -> dict:
    """A run's backdoor measures: the rate (the trigger as sent, and as the line delivers it), its lower-variance
    forms, and the model's ROC AUC on the untriggered test set."""
    return {
        "backdoor_rate": backdoor_rate(spec, out.model, data, value),
        "line_backdoor_rate": backdoor_rate(spec, out.model, data, line_value),
        "auc": roc_auc(spec, out.model, data),
        "soft_rate": soft_backdoor_rate(spec, out.model, data, value),
        "wide_rate": wide_backdoor_rate(spec, out.model, data, value),
        "late_rate": late_rate(spec, out, data, value),
    }


async def clean_reference(
    workdir: Path,
    loops: int,
    k_attacked: int,
    extra: str,
    data: Data,
    seed: int,
    input_range: bool,
    momentum: float = 0.0,
) -> Outcome:
    """The clean model, like for like (issue 14's reference, since 1 Dec 2026 13:30 UTC): the three honest sites
    alone (no attacker touched it), each version summing ``min(K, 3)`` slots at ``f(s)/K`` with K the attacked
    runs' own (3 with the defaults: four received, three kept), i.e. the plain mean of the three honest slots.

    Why not the honest-only run at the three-site defaults (the reference before): those defaults give K = 2, MDA
    keeping two of the three honest slots at 1/2 each, another federation than the attacked one, whose versions
    (the attacker left out, as MDA leaves it in about 9 of 10) sum all three honest slots at 1/3. On development
    seeds 150-169 (RELIABILITY.md) that difference alone put the late rate +7 points above the three-site
    defaults' run, and the benign control (four sites, the fourth honest) within 2 points of this run: the
    "+5.7 of a benign fourth site" was K, not the fourth site's rows. The reduce is the mean because with no
    attacker there is nothing to leave out (MDA's f = 1 needs a fourth arrival the three sites cannot supply)."""
    k = min(k_attacked, len(HONEST))
    return await run(
        workdir, None, loops, like_extra(extra), data, seed, input_range=input_range, k=k, momentum=momentum
    )


async def report(
    workdir: Path,
    loops: int,
    attacks: tuple[str, ...] = ATTACKS,
    extra: str = "",
    seed: int = 0,
    trigger: str = "ood",
    input_range: bool = True,
    k: int | None = None,
    momentum: float = 0.0,
) -> dict:
    """Each attack, then the clean model like for like (:func:`clean_reference`: the three honest sites at the
    attacked runs' K) and the honest-only run at the three-site defaults (``defaults_clean``: the reference before);
    one dict per attack with distance (from the clean model) and backdoor rate: the model's answer to the
    attacker's trigger value (``backdoor_rate``) and to that value as the line delivers it, clamped to the
    engineering range (``line_backdoor_rate``; the same for an in-range trigger)."""
    from aggregator.config import load_config

    data = load_data()
    value = data.trigger_value(trigger)
    line_value = data.at_the_line(value)
    results = {}
    for attack in attacks:
        results[attack] = await run(
            workdir / attack, attack, loops, extra, data, seed, trigger, input_range, k, momentum=momentum
        )
    k_attacked = max((r.k for r in results.values()), default=len(HONEST))
    honest = await clean_reference(workdir / "clean", loops, k_attacked, extra, data, seed, input_range, momentum)
    defaults = await run(
        workdir / "honest", None, loops, extra, data, seed, input_range=input_range, k=k, momentum=momentum
    )
    spec = load_config(workdir / "honest" / "aggregator.toml").model
    from models import build_model, shared_state

    v0 = shared_state(build_model(spec, seed=3), spec)
    moved = distance(honest.model, v0)
    clean = rates(spec, honest, data, value, line_value)
    out = {
        "loops": loops,
        "momentum": momentum,
        "honest_versions": honest.versions,
        "k": honest.k,
        "honest_moved": moved,
        "trigger": trigger,
        "input_range": input_range,
        "trigger_value": value,
        "line_trigger_value": line_value,
        **{f"clean_{name}": v for name, v in clean.items()},
        "reduces": sorted(set(honest.reduces)),
        "slots": honest.slots,
        "defaults_clean": {
            **rates(spec, defaults, data, value, line_value),
            "k": defaults.k,
            "versions": defaults.versions,
            "reduces": sorted(set(defaults.reduces)),
            "lineages": defaults.lineages,
        },
        "attacks": {},
    }
    for attack, res in results.items():
        d = distance(res.model, honest.model)
        out["attacks"][attack] = {
            "distance": d,
            "relative_distance": d / moved if moved else math.inf,
            **rates(spec, res, data, value, line_value),
            "versions": res.versions,
            "k": res.k,
            "attacker_entries": res.attacker_entries,
            "steps": res.steps,
            "reduces": sorted(set(res.reduces)),
            "slots": res.slots,
            "lineages": res.lineages,
            "verdicts": res.verdicts,
            "timing": timing(res.lineages),
        }
    return out


def table(rep: dict) -> str:
    d = rep["defaults_clean"]
    lines = [
        f"clean model (like for like: the three honest sites, K = {rep['k']}, reduce {'/'.join(rep['reduces'])}): "
        f"{rep['honest_versions']} versions, moved {rep['honest_moved']:.3f} from version 0, backdoor rate "
        f"{rep['clean_backdoor_rate']:.3f}, late rate {rep['clean_late_rate']:.3f}, ROC AUC {rep['clean_auc']:.3f}",
        f"three-site defaults (K = {d['k']}, reduce {'/'.join(d['reduces'])}; the reference before): backdoor rate "
        f"{d['backdoor_rate']:.3f}, late rate {d['late_rate']:.3f}, ROC AUC {d['auc']:.3f}",
        "| attack | distance from clean | relative | backdoor success | minus clean | minus benign | late rate "
        "| late minus clean | late minus benign | ROC AUC | K | versions | its slots | f(s) its / honest "
        "| its coefficients |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # the benign control, when run: the same four-site federation and K, the fourth site honest
    benign = rep["attacks"].get("benign", {}).get("backdoor_rate")
    benign_late = rep["attacks"].get("benign", {}).get("late_rate")
    for name, r in rep["attacks"].items():
        t = r["timing"]
        coefficients = " ".join(f"{e['weight']:.2f}" for e in r["attacker_entries"])
        lines.append(
            f"| {name} | {r['distance']:.3f} | {r['relative_distance']:.2f} | {r['backdoor_rate']:.3f} | "
            f"{r['backdoor_rate'] - rep['clean_backdoor_rate']:+.3f} | "
            f"{'' if benign is None else format(r['backdoor_rate'] - benign, '+.3f')} | {r['late_rate']:.3f} | "
            f"{r['late_rate'] - rep['clean_late_rate']:+.3f} | "
            f"{'' if benign_late is None else format(r['late_rate'] - benign_late, '+.3f')} | {r['auc']:.3f} | {r['k']} | "
            f"{r['versions']} | "
            f"{t['share']:.2f} | {t['factor']:.2f} / {t['honest_factor']:.2f} | "
            f"{coefficients} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=6)
    ap.add_argument("--extra", default="", help="extra lines for the aggregator's [strategy] table")
    ap.add_argument("--seed", type=int, default=0, help="shifts every site's training seed")
    ap.add_argument("--trigger", choices=TRIGGERS, default="ood", help="the attacker's trigger value")
    ap.add_argument("--no-input-range", action="store_true", help="the model declares no input range (as before)")
    ap.add_argument(
        "--attacks",
        default=",".join(ATTACKS),
        help=f"comma-separated, of {ATTACKS + ADAPTIVE + CONTROLS} (alie: adaptive; benign: the control)",
    )
    ap.add_argument(
        "--k", type=int, default=None, help="force K (buffer_size) on every run (default: the aggregator's)"
    )
    ap.add_argument(
        "--momentum", type=float, default=0.0, help="worker momentum β at every honest site (0: none; see run())"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    attacks = tuple(a for a in args.attacks.split(",") if a)
    unknown = [a for a in attacks if a not in ATTACKS + ADAPTIVE + CONTROLS]
    if unknown:
        ap.error(f"unknown attack(s) {unknown}: choose from {ATTACKS + ADAPTIVE + CONTROLS}")
    with tempfile.TemporaryDirectory() as tmp:
        rep = asyncio.run(
            report(
                Path(tmp),
                args.loops,
                attacks=attacks,
                extra=args.extra,
                seed=args.seed,
                trigger=args.trigger,
                input_range=not args.no_input_range,
                k=args.k,
                momentum=args.momentum,
            )
        )
    print(json.dumps(rep, default=float) if args.json else table(rep))


if __name__ == "__main__":
    main()
