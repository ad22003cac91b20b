"""Scale benchmark: a thousand real sites on one machine, against a real Mosquitto and ``fedline aggregator``.

What is real: every simulated site has its own enrolled key pair, its own
MQTT session (username = site id, under the broker's ACL), its own outbox
(:class:`edge.outbox.Outbox`, SQLite on disk, ``synchronous=FULL``), seals a
real update (SHA-256 + Ed25519 signature, SealedBox to the aggregator) of the
model's shared parameters and sends it chunked at QoS 1, in order, at most one
without a receipt (the agent's defaults); it forgets an update only on a
receipt the aggregator signed. The aggregator is the ``fedline aggregator``
process with FedBuff, its SQLite store and ONNX publishing on. What is not:
training (each site seals one of a few noise deltas drawn before the timed
phases, afresh each time: new header, counter, signature and encryption;
training and noise cost the site, not the federation), the outbox's record of
the send itself (``Outbox.mark_sent``: an SQLite UPDATE rewrites the whole
row, blob included, which was 30 % of the site processes' CPU at 1M
parameters; the sites keep the sent time in memory, and send the blob they
sealed rather than reading it back) and model downloads (sites follow the
signed manifest for their base version; at 1,000 sites × every version the
weights' fan-out is a broker-sizing question of its own, see BENCHMARKS.md).

The sites' outboxes live on ``/dev/shm`` by default (``--outbox-dir``): in a
plant each site commits (``fsync``) to its own disk, while here a thousand
would queue on one, and the bench would measure this machine's disk instead of
the federation (measured: ~65 commits of a 400 kB update per second over all
threads). The aggregator's store stays on disk, as deployed. A thousand
sites hold a few GB there at 100k parameters: in a container with a small
``/dev/shm`` pass ``--outbox-dir``.

Sites are spread over ``--procs`` worker processes (asyncio, one MQTT client
per site). Each site seals at Poisson times; the offered rate is set per phase:

1. **steady**: ``--rate-per-site`` (default 1 per minute) for ``--minutes``;
2. **search**: the total rate grows by ``--step-factor`` per phase of
   ``--step-s`` seconds until the backlog stops being flat (or, when the steady
   rate was not flat, shrinks until it is); the highest flat phase gives
   ``max_flat_updates_per_s``;
3. **drain**: no new updates until every site has its receipts.

Backlog = updates sealed and not yet answered by a receipt, summed over the
sites and sampled every second. A phase's backlog is *flat* when its fitted
growth over the phase (after a warm-up quarter) is under 5 % of the updates
offered in it (and under 2 updates at tiny rates). Receipt latency = seal
(committed to the outbox) → signed receipt verified at the site.

``intake_vs_limit`` compares CPU per update: the bare decrypt + verify + axpy
of one update on one core (``bench/aggregator.py``'s limit, measured here on
the same update size in the same run) against the aggregator process's CPU
seconds per update in the highest flat phase (all its threads: MQTT,
reassembly, opening, validation, SQLite, reduce, receipts, publishing): the
whole service against the bare limit, so well under 1 even when the opening
itself runs near the limit.

Where that CPU goes, thread by thread: at the start and end of each phase the
bench reads every thread of the aggregator process (/proc/<pid>/task/<tid>:
``comm``, the name fedline gives each thread at the OS level,
``fedline/threadname.py``, and ``utime + stime``) and reports CPU ms per update
by role (``aggregator_cpu_ms_per_update_by_thread``, and per phase):
``MainThread`` (the event loop: MQTT I/O, chunk reassembly, receipts sealed,
signed and published, version publishing), ``agg-decide`` (decisions, SQLite,
the reduce), ``agg-open`` (decrypt, verify, validate; summed over the pool),
``agg-export`` (a version's weights and ONNX), ``asyncio`` (the event loop's
default executor, idle in steady state) and ``other`` (threads without a
fedline name, and threads that ended within the phase: the process's CPU not
in the named ones, so the roles sum to ``aggregator_cpu_ms_per_update``, within
the few clock ticks between reading the two).
A thread a library starts carries the name of the thread that started it
(Linux), so it counts with that role. ``open_vs_limit`` = the limit over the
opening threads' CPU per update: what ``bench/aggregator.py`` calls the intake
without its reduce, near 1 when opening costs what the bare limit does.
With ``--workers N >= 2`` the intake workers' threads are summed over the
workers under ``workers/MainThread``, ``workers/intake-open`` and
``workers/other``, and ``open_vs_limit`` uses ``workers/intake-open``.

``--workers N`` (N >= 2) runs the aggregator as a reducer with N intake
workers (``fedline aggregator --worker I``, issue 20); ``--workers 1`` (or 0)
is the single process. The JSON fields are the same; "aggregator" CPU and RSS
are then the reducer's and its workers' together (``cpu_cores`` also splits
them), so CPU per update stays comparable.

Usage: ``python bench/scale.py`` (1,000 sites, 100k parameters; table) or
``--json``; ``--sites N --params P --minutes M`` shorten a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this folder holds bench/aggregator.py: keep it off the path so "aggregator" is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from fedline.testing.bench_trees import load_script  # noqa: E402 (after the path fix above)

FEDERATION = "scale"
N_FEATURES = 128
FLAT_GROWTH = 0.05  # a phase is flat when its backlog grows by less than this share of what was offered
REPORT_S = 1.0
DELTA_POOL = 4  # distinct noise deltas per site process, drawn before the timed phases


def _bench_aggregator() -> Any:
    """bench/aggregator.py (a script, not a package): its model sizing and its limit, one home for both."""
    return load_script(ROOT / "bench" / "aggregator.py", "bench_aggregator")


def shared_shapes(n_params: int) -> dict[str, tuple[int, ...]]:
    """The shared tensors of the bench's MLP body [F -> H -> H] (its head is personal, never sent)."""
    h = _bench_aggregator().hidden_for(n_params)
    return {"body.0.weight": (h, N_FEATURES), "body.0.bias": (h,), "body.2.weight": (h, h), "body.2.bias": (h,)}


def site_ids(n: int) -> list[str]:
    return [f"s{i:04d}" for i in range(n)]


def buffer_size_for(n_sites: int) -> int:
    """FedBuff K for a federation of ``n_sites``: a tenth of them per version, between 1 and 100.

    Why: at 1,000 sites sending once a minute, K = 100 makes a version every ~6 s
    (each version costs an ONNX export and a manifest to every site); a small K
    would make a version for every handful of updates and spend the aggregator on
    publishing, while the staleness of each update stays at a version or two.
    """
    return max(1, min(100, n_sites // 10))


# --------------------------------------------------------------------------- federation on disk
def write_federation(root: Path, n_sites: int, n_params: int, broker: Any, buffer_size: int, workers: int = 0) -> Path:
    """Keys for the aggregator, every site and the intake workers, the enrollment, and the aggregator's TOML."""
    from broker_bridge.keys import KeyPair, create_federation
    from broker_bridge.mosquitto import intake_users
    from fedline.demo.workspace import write_toml

    keys = root / "keys"
    create_federation(FEDERATION, site_ids(n_sites), keys)
    for w in intake_users(workers):
        kp = KeyPair.generate("worker", w)
        kp.save(keys / f"{w}.key")
        kp.public().save(keys / f"{w}.pub.json")
    h = _bench_aggregator().hidden_for(n_params)
    doc = {
        "aggregator": {
            "federation": FEDERATION,
            "key_file": str(keys / "aggregator.key"),
            "enrollment_file": str(keys / "enrollment.json"),
            "state_dir": str(root / "aggregator"),
            "workers": 2,
        },
        "model": {"kind": "mlp", "n_features": N_FEATURES, "hidden": [h, h], "personal": ["head."]},
        "broker": {
            "url": broker.url,
            "username": "aggregator",
            "password": broker.password("aggregator"),
            "client_id": "aggregator",
            "backoff_min_s": 0.1,
            "backoff_max_s": 1.0,
        },
        # a version every K updates, and at least every 30 s while anything waits
        # min_sites at most K: a tiny bench federation (K = 1 at 4 sites) measures throughput, not the leak rule
        "strategy": {
            "kind": "fedbuff",
            "buffer_size": buffer_size,
            "buffer_timeout_s": 30.0,
            "max_staleness": 20,
            "min_sites": min(3, buffer_size),
        },
        "publish": {"retain_versions": 3, "onnx": True},
        # --workers N >= 2: N intake workers open the updates, the aggregator reduces (aggregator.intake_worker)
        "intake": {"workers": workers, "keys_dir": str(keys)},
    }
    return write_toml(root / "aggregator" / "aggregator.toml", doc)


# --------------------------------------------------------------------------- one simulated site
@dataclass
class WorkerStats:
    """What a worker process reports each second (counts since the last report, except ``backlog``)."""

    backlog: int = 0
    sealed: int = 0
    receipts: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    latency: list[tuple[float, float]] = field(default_factory=list)  # (sealed at, seal -> receipt s)
    send_latency: list[float] = field(default_factory=list)  # first chunk published -> receipt s
    errors: list[str] = field(default_factory=list)

    def take(self, connected: int) -> dict[str, Any]:
        out = {
            "backlog": self.backlog,
            "sealed": self.sealed,
            "receipts": self.receipts,
            "verdicts": self.verdicts,
            "latency": self.latency,
            "send_latency": self.send_latency,
            "errors": self.errors[:5],
            "connected": connected,
            "t": time.time(),
        }
        self.sealed = self.receipts = 0
        self.verdicts, self.latency, self.send_latency, self.errors = {}, [], [], []
        return out


class Pace:
    """The offered rate per site, shared by a worker's sites; waiting sites wake when it changes."""

    def __init__(self) -> None:
        self.rate = 0.0
        self.changed = asyncio.Event()

    def set(self, rate: float) -> None:
        self.rate = rate
        old, self.changed = self.changed, asyncio.Event()
        old.set()


class SimSite:
    """One site: its keys, its outbox, its MQTT session; seals at Poisson times, sends in order, settles."""

    def __init__(
        self,
        site: str,
        root: Path,
        outboxes: str,
        broker: dict[str, Any],
        enrollment: Any,
        deltas: list[dict[str, np.ndarray]],
        stats: WorkerStats,
        pace: Pace,
        manifests: dict[bytes, int],
    ) -> None:
        from broker_bridge.client import BrokerSettings, MqttClient
        from broker_bridge.keys import KeyPair
        from broker_bridge.topics import Topics
        from edge.outbox import Outbox

        self.site = site
        self.keys = KeyPair.load(root / "keys" / f"{site}.key")
        self.enrollment = enrollment  # public keys only, the same file for every site: read once per process
        self.outbox = Outbox(Path(outboxes) / site / "outbox.sqlite", max_bytes=1 << 30, max_count=1000)
        self.client = MqttClient(
            BrokerSettings(
                url=broker["url"],
                username=site,
                password=broker["passwords"][site],
                client_id=f"edge-{site}",
                backoff_min_s=0.2,
                backoff_max_s=2.0,
            )
        )
        self.topics = Topics(FEDERATION)
        self.deltas, self.stats, self.pace, self.manifests = deltas, stats, pace, manifests
        self.base = -1  # no manifest yet: the aggregator has not published version 0
        self.keyring: dict[int, bytes] = {}  # the federation content keys granted to this site, by epoch
        self.sealed_manifest: bytes | None = None  # the newest manifest, kept until its epoch's key arrives
        self.wake = asyncio.Event()
        self.times: dict[int, list[float]] = {}  # counter -> [sealed at (monotonic), sent at]
        # what the outbox holds, in counter order, kept in memory too: the send loop reads the blob it just
        # sealed instead of reading every waiting row's blob back from SQLite on every wake
        self.unsent: dict[int, tuple[str, bytes]] = {}
        self.resend_after_s = 120.0

    async def run(self, start_delay: float) -> None:
        await asyncio.sleep(start_delay)  # do not open every connection in the same millisecond
        async with self.client:
            await self.client.subscribe(self.topics.receipts(self.site), qos=1)
            await self.client.subscribe(self.topics.fedkey(self.site), qos=1)
            await self.client.subscribe(self.topics.manifest(), qos=1)
            await asyncio.gather(self._produce(), self._send(), self._receive())

    async def _produce(self) -> None:
        from broker_bridge.envelope import UpdateHeader, seal_update

        rng = random.Random(self.site)
        while True:
            changed = self.pace.changed
            if self.pace.rate <= 0 or self.base < 0:
                await changed.wait()
                continue
            try:  # Poisson arrivals: memoryless, so a rate change may simply redraw the wait
                await asyncio.wait_for(changed.wait(), rng.expovariate(self.pace.rate))
                continue
            except TimeoutError:
                pass
            counter = self.outbox.last_counter() + 1
            msg_id = f"u{counter}-{rng.getrandbits(48):012x}"
            header = UpdateHeader(
                site=self.site,
                counter=counter,
                msg_id=msg_id,
                base_version=self.base,
                n_samples=100,
                privacy={"mode": "off"},
            )
            delta = self.deltas[counter % len(self.deltas)]
            blob = await asyncio.to_thread(seal_update, header, delta, self.keys, self.enrollment.aggregator.box_pub)
            await asyncio.to_thread(
                self.outbox.put,
                site=self.site,
                counter=counter,
                msg_id=msg_id,
                base_version=self.base,
                n_samples=100,
                epsilon=None,
                blob=blob,
            )
            self.times[counter] = [time.monotonic(), math.nan]
            self.unsent[counter] = (msg_id, blob)
            self.stats.backlog += 1
            self.stats.sealed += 1
            self.wake.set()

    async def _send(self) -> None:
        """The agent's send loop: in counter order, at most one without a receipt, resent after a timeout."""
        from broker_bridge.chunking import split
        from broker_bridge.errors import FedlineError

        while True:
            await self.client.connected.wait()
            for counter, (msg_id, blob) in self.unsent.items():  # the oldest waiting update only
                t = self.times.setdefault(counter, [time.monotonic(), math.nan])
                if not math.isnan(t[1]) and time.monotonic() - t[1] < self.resend_after_s:
                    break  # waiting for its receipt (which wakes this loop)
                topic0 = self.topics.update_chunk(self.site, msg_id, 0)
                chunks = split(blob, msg_id, self.client.chunk_limit(topic0))
                items = [(self.topics.update_chunk(self.site, msg_id, i), c) for i, c in enumerate(chunks)]
                t[1] = time.monotonic()
                try:
                    await self.client.publish_many(items, qos=1)
                except FedlineError as exc:
                    self.stats.errors.append(f"{self.site}: {exc}")
                    t[1] = math.nan
                break
            self.wake.clear()
            try:  # woken by a new update or a receipt; the timeout only resends what got no receipt
                await asyncio.wait_for(self.wake.wait(), self.resend_after_s / 4)
            except TimeoutError:
                pass

    async def _receive(self) -> None:
        from broker_bridge.envelope import open_receipt
        from broker_bridge.errors import WireError
        from broker_bridge.federation_key import open_grant, open_manifest

        sign_pub = self.enrollment.aggregator.sign_pub
        async for msg in self.client.messages():
            if not msg.payload:
                continue
            try:
                if msg.topic == self.topics.fedkey(self.site):  # a grant: the key may open a waiting manifest
                    epoch, key = open_grant(msg.payload, self.keys, sign_pub, FEDERATION)
                    self.keyring[epoch] = key
                if msg.topic == self.topics.manifest():
                    self.sealed_manifest = bytes(msg.payload)
                if msg.topic in (self.topics.fedkey(self.site), self.topics.manifest()):
                    blob = self.sealed_manifest
                    if blob is None:
                        continue
                    version = self.manifests.get(blob)
                    if version is None:  # every site gets its own copy; open and verify each distinct one once
                        try:
                            version = int(open_manifest(blob, self.keyring, sign_pub)[0]["version"])
                        except WireError as exc:
                            if exc.reason == "epoch":
                                continue  # its grant comes next (retained messages arrive in any order)
                            raise
                        self.manifests[blob] = version
                    self.base = max(self.base, version)
                    continue
                doc = open_receipt(msg.payload, self.keys, sign_pub)
            except WireError as exc:
                self.stats.errors.append(f"{self.site}: {exc}")
                continue
            found = await asyncio.to_thread(
                self.outbox.settle, doc["counter"], doc["msg_id"], doc["verdict"], doc.get("reason"), doc.get("version")
            )
            self.stats.verdicts[doc["verdict"]] = self.stats.verdicts.get(doc["verdict"], 0) + 1
            if not found:
                continue  # FedBuff's later "applied" for an update its "buffered" receipt already settled
            self.unsent = {c: v for c, v in self.unsent.items() if v[0] != doc["msg_id"]}
            self.stats.backlog -= 1
            self.stats.receipts += 1
            t = self.times.pop(doc["counter"], None)
            if t is not None:
                now = time.monotonic()
                self.stats.latency.append((time.time() - (now - t[0]), now - t[0]))
                if not math.isnan(t[1]):
                    self.stats.send_latency.append(now - t[1])
            self.wake.set()


# --------------------------------------------------------------------------- a worker process
def worker_main(spec: dict[str, Any]) -> None:
    """Entry point of one worker process (``scale.py --worker SPEC``): commands on stdin, reports on stdout."""
    import logging

    from fedline.heap import keep_freed_buffers

    logging.disable(logging.WARNING)  # a thousand clients' connection logs are not the measurement
    keep_freed_buffers()  # as the aggregator does: sealing reuses its buffers instead of page-faulting new ones
    asyncio.run(_worker(Path(spec["root"]), spec["outboxes"], spec["sites"], spec["broker"]))


async def _worker(root: Path, outboxes: str, sites: list[str], broker: dict[str, Any]) -> None:
    rng = np.random.default_rng(len(sites))
    shapes = json.loads((root / "shapes.json").read_text())
    # a small pool drawn before any phase: noise generation is not the system under test (each update is
    # still sealed afresh, with its own header, counter, signature and encryption)
    deltas = [
        {k: (rng.standard_normal(v) * 0.01).astype(np.float32) for k, v in shapes.items()} for _ in range(DELTA_POOL)
    ]
    stats, pace, manifests = WorkerStats(), Pace(), {}
    from broker_bridge.keys import Enrollment

    enrollment = Enrollment.load(root / "keys" / "enrollment.json")
    sims = [SimSite(s, root, outboxes, broker, enrollment, deltas, stats, pace, manifests) for s in sites]
    tasks = [asyncio.create_task(sim.run(0.01 * i)) for i, sim in enumerate(sims)]
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, {"stop": True})  # the conductor is gone

    def report(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    import threading

    threading.Thread(target=read_commands, daemon=True).start()
    try:
        while True:
            try:
                cmd = await asyncio.wait_for(commands.get(), REPORT_S)
            except TimeoutError:
                cmd = None
            if cmd is not None:
                if cmd.get("stop"):
                    break
                pace.set(float(cmd["rate_per_site"]))
            failed = [t for t in tasks if t.done()]
            if failed:
                stats.errors.append(f"a site stopped: {failed[0].exception()!r}")
            report(stats.take(sum(1 for s in sims if s.client.connected.is_set() and s.base >= 0)))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in sims:
            s.outbox.close()
        report({"stopped": True})


# --------------------------------------------------------------------------- the conductor
@dataclass
class Phase:
    name: str
    rate_per_site: float
    started: float = 0.0
    ended: float = 0.0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, backlog)
    sealed: int = 0
    receipts: int = 0
    latency: list[float] = field(default_factory=list)
    send_latency: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process group over the phase
    threads: dict[str, float] = field(default_factory=dict)  # the aggregator's CPU seconds per thread role
    aggregator_rss_mb: float = 0.0  # the aggregator's largest RSS sampled in the phase (each second)

    def summary(self, n_sites: int) -> dict[str, Any]:
        dur = max(self.ended - self.started, 1e-9)
        growth = backlog_growth(self.samples)
        offered = self.sealed
        flat = growth <= max(2.0, FLAT_GROWTH * offered)
        lat = np.array(self.latency) if self.latency else np.array([math.nan])
        slat = np.array(self.send_latency) if self.send_latency else np.array([math.nan])
        received = self.receipts / dur
        return {
            "phase": self.name,
            "rate_per_site_per_min": 60 * self.rate_per_site,
            "offered_updates_per_s": offered / dur,
            "updates_per_s": received,
            "seconds": dur,
            "backlog_growth": growth,
            "backlog_flat": bool(flat),
            "backlog_start": self.samples[0][1] if self.samples else None,
            "backlog_end": self.samples[-1][1] if self.samples else None,
            "receipt_p50_s": float(np.percentile(lat, 50)),
            "receipt_p99_s": float(np.percentile(lat, 99)),
            "send_to_receipt_p50_s": float(np.percentile(slat, 50)),
            "send_to_receipt_p99_s": float(np.percentile(slat, 99)),
            "receipts_counted": len(self.latency),
            "aggregator_rss_mb": self.aggregator_rss_mb,
            "cpu_cores": {k: v / dur for k, v in self.cpu.items()},
            "aggregator_cpu_ms_per_update": 1e3 * self.cpu.get("aggregator", math.nan) / max(self.receipts, 1),
            "aggregator_cpu_ms_per_update_by_thread": {
                k: 1e3 * v / max(self.receipts, 1) for k, v in self.threads.items()
            },
            "cpu_ms_per_update": cpu_budget(self.cpu, self.receipts),
            "machine_cpu_busy": sum(self.cpu.get(k, 0.0) for k in BUDGET_TOTAL) / dur / (os.cpu_count() or 1),
        }


BUDGET_TOTAL = ("sites", "broker", "aggregator")  # the groups that partition the run's CPU ("aggregator" sums
# the reducer and its intake workers, which the budget also lists on their own)


def cpu_budget(cpu: dict[str, float], updates: int) -> dict[str, float]:
    """CPU ms per update answered, per component, and their total (the run's whole CPU per update).

    Why: on a machine whose cores the load generator shares, the highest flat rate is set by whichever
    component runs out of CPU first, or by the sum of them all; this budget says which, from evidence.
    """
    out = {k: 1e3 * v / max(updates, 1) for k, v in cpu.items()}
    out["total"] = sum(out.get(k, 0.0) for k in BUDGET_TOTAL)
    return out


def backlog_growth(samples: list[tuple[float, int]]) -> float:
    """Fitted backlog growth over a phase, skipping its first quarter (the backlog of the last phase settling)."""
    if len(samples) < 4:
        return 0.0
    t0, t1 = samples[0][0], samples[-1][0]
    kept = [(t, b) for t, b in samples if t >= t0 + 0.25 * (t1 - t0)]
    t = np.array([s[0] for s in kept]) - kept[0][0]
    b = np.array([s[1] for s in kept], dtype=float)
    if len(kept) < 3 or t[-1] <= 0:
        return 0.0
    slope = float(np.polyfit(t, b, 1)[0])
    return slope * (t1 - t0)


# --------------------------------------------------------------------------- the aggregator's CPU by thread
CLK_TCK = os.sysconf("SC_CLK_TCK")  # the unit of /proc's utime and stime


@dataclass(frozen=True)
class ThreadSnapshot:
    """One process's CPU at one moment, in clock ticks: its total (ended threads included) and each live thread's."""

    pid: int
    total: int
    threads: dict[int, tuple[str, int]]  # tid -> (OS name, utime + stime)


def stat_ticks(stat: str) -> int:
    """utime + stime (fields 14 and 15) of a /proc/.../stat line; the name in parentheses before them may hold
    spaces and parentheses, so the fields are counted from its last ")"."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def read_threads(pid: int) -> ThreadSnapshot:
    """The process's CPU ticks and each live thread's name and ticks (a thread that ends mid-read is left out)."""
    base = Path(f"/proc/{pid}")
    threads: dict[int, tuple[str, int]] = {}
    for task in (base / "task").iterdir():
        try:
            threads[int(task.name)] = (
                (task / "comm").read_text().rstrip("\n"),
                stat_ticks((task / "stat").read_text()),
            )
        except OSError:
            continue
    return ThreadSnapshot(pid, stat_ticks((base / "stat").read_text()), threads)


def thread_role(pid: int, tid: int, comm: str) -> str:
    """A thread's role: ``MainThread`` (the event loop; tid = pid, whatever its name), a pool's name without
    its ``_N`` (``agg-open_1`` -> ``agg-open``), else ``other`` (a thread fedline did not name)."""
    if tid == pid:
        return "MainThread"
    name, _, n = comm.rpartition("_")
    return name if name and n.isdigit() else "other"


def cpu_by_thread(before: ThreadSnapshot, after: ThreadSnapshot, clk_tck: int = CLK_TCK) -> dict[str, float]:
    """CPU seconds per thread role of one process between two snapshots; the roles sum to the process's CPU.

    A thread started in between counts from zero (so does a thread id reused by a new thread). The process's
    CPU that no live thread accounts for (threads that ended in between) is ``other``'s.
    """
    ticks: dict[str, int] = {}
    for tid, (comm, now) in after.threads.items():
        was = before.threads.get(tid)
        start = was[1] if was is not None and was[1] <= now else 0
        role = thread_role(after.pid, tid, comm)
        ticks[role] = ticks.get(role, 0) + now - start
    rest = (after.total - before.total) - sum(ticks.values())
    ticks["other"] = ticks.get("other", 0) + rest
    order = sorted(ticks, key=lambda r: (r != "MainThread", r == "other", r))
    return {r: ticks[r] / clk_tck for r in order}


def aggregator_threads_cpu_s(before: list[ThreadSnapshot], after: list[ThreadSnapshot]) -> dict[str, float]:
    """CPU seconds per role: the aggregator's (or reducer's) threads, then the intake workers' summed over the
    workers under ``workers/<role>`` (snapshots in the same order: the aggregator first)."""
    out = cpu_by_thread(before[0], after[0])
    for b, a in zip(before[1:], after[1:], strict=True):
        for role, v in cpu_by_thread(b, a).items():
            out[f"workers/{role}"] = out.get(f"workers/{role}", 0.0) + v
    return out


def open_vs_limit(limit_ms: float, by_thread: dict[str, float]) -> float | None:
    """The bare limit's CPU per update over the opening threads' (the intake workers' where there are, else the
    aggregator's ``agg-open`` pool): ``bench/aggregator.py``'s intake without its reduce, in the service."""
    opening = by_thread.get("workers/intake-open", by_thread.get("agg-open", 0.0))
    return limit_ms / opening if opening > 0 else None


class Conductor:
    """Starts the broker, the aggregator and the workers; sets each phase's rate; collects the reports."""

    def __init__(self, args: argparse.Namespace, root: Path, outboxes: Path) -> None:
        self.args, self.root, self.outboxes = args, root, outboxes
        self.procs: list[subprocess.Popen] = []
        self.latest: list[dict[str, Any]] = []
        self.series: list[tuple[float, int, str]] = []  # (seconds since start, backlog, phase)
        self.verdicts: dict[str, int] = {}
        self.sealed = self.receipted = 0  # over the whole run: every update sealed must get its receipt
        self.errors: list[str] = []
        self.rss: dict[str, float] = {"aggregator": 0.0, "broker": 0.0, "sites": 0.0}
        self.thread_names: list[str] = []  # the aggregator's threads' OS names at the end of the last phase
        self.t0 = time.time()

    def start(self) -> None:
        import psutil

        from broker_bridge.mosquitto import MosquittoProcess

        a = self.args
        sites = site_ids(a.sites)
        # the deployed default caps connections (256): a thousand sites, the aggregator and spares need more
        self.broker = MosquittoProcess(
            self.root / "broker",
            federation=FEDERATION,
            sites=sites,
            max_connections=a.sites + 64,
            intake_workers=a.workers,
            max_packet_size=a.broker_max_packet,
        ).start()
        self.buffer_size = a.buffer_size or buffer_size_for(a.sites)
        cfg = write_federation(self.root, a.sites, a.params, self.broker, self.buffer_size, a.workers)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.agg_log = (self.root / "aggregator.log").open("wb")
        prof = ["-m", "cProfile", "-o", a.profile_aggregator] if a.profile_aggregator else []
        self.aggregator = subprocess.Popen(
            [sys.executable, *prof, "-m", "fedline.cli", "aggregator", "--config", str(cfg)],
            cwd=self.root,
            env=env,
            stdout=self.agg_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.intake: list[subprocess.Popen[bytes]] = []  # intake workers (--workers N >= 2)
        for i in range(a.workers if a.workers >= 2 else 0):
            pw = self.broker.workdir / "credentials" / f"intake-{i}.password"
            cmd = ["-m", "fedline.cli", "aggregator", "--config", str(cfg), "--worker", str(i)]
            cmd += ["--password-file", str(pw)]
            self.intake.append(
                subprocess.Popen(
                    [sys.executable, *cmd],
                    cwd=self.root,
                    env=env,
                    stdout=(self.root / f"intake-{i}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.handles = {
            "aggregator": psutil.Process(self.aggregator.pid),
            "broker": psutil.Process(self.broker.proc.pid),  # type: ignore[union-attr]
        }
        self.intake_handles = [psutil.Process(p.pid) for p in self.intake]
        self.shapes = shared_shapes(a.params)  # a wrong guess would show as "names" rejections
        (self.root / "shapes.json").write_text(json.dumps(self.shapes))
        broker = {"url": self.broker.url, "passwords": {s: self.broker.password(s) for s in sites}}
        n = max(1, min(a.procs, a.sites))
        for i in range(n):
            spec = {"root": str(self.root), "outboxes": str(self.outboxes), "sites": sites[i::n], "broker": broker}
            (self.root / f"worker-{i}.json").write_text(json.dumps(spec))
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", str(self.root / f"worker-{i}.json")],
                    env=env,
                    text=True,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=(self.root / f"worker-{i}.log").open("w"),
                )
            )
        self.site_handles = [psutil.Process(p.pid) for p in self.procs]

    def collect(self, phase: Phase | None) -> None:
        """Read one report from every worker (they report each second) and sample the processes."""
        reports = [self._read(p) for p in self.procs]
        self.latest = reports
        backlog = sum(r["backlog"] for r in reports)
        now = time.time()
        self.series.append((now - self.t0, backlog, phase.name if phase else "start"))
        for r in reports:
            self.sealed += r["sealed"]
            self.receipted += r["receipts"]
            for k, v in r["verdicts"].items():
                self.verdicts[k] = self.verdicts.get(k, 0) + v
            self.errors.extend(r["errors"])
            if phase is not None:
                phase.sealed += r["sealed"]
                phase.receipts += r["receipts"]
                phase.latency += [lat for _, lat in r["latency"]]
                phase.send_latency += r["send_latency"]
        if phase is not None:
            phase.samples.append((now, backlog))
        agg_rss = self._sample_rss()
        if phase is not None:
            phase.aggregator_rss_mb = max(phase.aggregator_rss_mb, agg_rss)
        if self.aggregator.poll() is not None:
            raise RuntimeError("the aggregator exited: " + (self.root / "aggregator.log").read_text()[-3000:])
        for i, w in enumerate(self.intake):
            if w.poll() is not None:
                raise RuntimeError(f"intake worker {i} exited: " + (self.root / f"intake-{i}.log").read_text()[-3000:])

    def _read(self, p: subprocess.Popen) -> dict[str, Any]:
        line = p.stdout.readline() if p.stdout else ""
        if not line:
            i = self.procs.index(p)
            raise RuntimeError(f"site worker {i} exited: " + (self.root / f"worker-{i}.log").read_text()[-3000:])
        return json.loads(line)

    def _sample_rss(self) -> float:
        """Sample every process's RSS into the run's peaks; returns the aggregator's now (MB)."""
        import psutil

        agg = 0.0
        for name, h in self.handles.items():
            try:
                # with intake workers, "aggregator" is the reducer and its workers together
                extra = sum(w.memory_info().rss for w in self.intake_handles) if name == "aggregator" else 0
                now = (h.memory_info().rss + extra) / 2**20
                self.rss[name] = max(self.rss[name], now)
                agg = now if name == "aggregator" else agg
            except psutil.Error:
                pass
        try:
            self.rss["sites"] = max(self.rss["sites"], sum(h.memory_info().rss for h in self.site_handles) / 2**20)
        except psutil.Error:
            pass
        return agg

    def cpu(self) -> dict[str, float]:
        def total(h: Any) -> float:
            t = h.cpu_times()
            return t.user + t.system

        reducer = total(self.handles["aggregator"])
        intake = [total(h) for h in self.intake_handles]
        return {
            "aggregator": reducer + sum(intake),  # with --workers N >= 2: the reducer and its intake workers
            **({"reducer": reducer, "intake_workers": sum(intake)} if intake else {}),
            "broker": total(self.handles["broker"]),
            "sites": sum(total(h) for h in self.site_handles),
        }

    def thread_snapshots(self) -> list[ThreadSnapshot]:
        """The aggregator's threads now (the reducer first, then each intake worker)."""
        return [read_threads(p.pid) for p in (self.aggregator, *self.intake)]

    def intake_ready(self) -> bool:
        """Every intake worker has subscribed to its share of the sites (its log says so)."""
        logs = [(self.root / f"intake-{i}.log") for i in range(len(self.intake))]
        return all(p.exists() and b"intake.share" in p.read_bytes() for p in logs)

    def connected(self) -> int:
        """Sites connected that hold a verified manifest (so the aggregator is subscribed and has published)."""
        return sum(r["connected"] for r in self.latest)

    def set_rate(self, rate_per_site: float) -> None:
        for p in self.procs:
            self._command(p, {"rate_per_site": rate_per_site})

    @staticmethod
    def _command(p: subprocess.Popen, doc: dict[str, Any]) -> None:
        if p.stdin is not None and p.poll() is None:
            p.stdin.write(json.dumps(doc) + "\n")
            p.stdin.flush()

    def run_phase(self, name: str, rate_per_site: float, seconds: float) -> Phase:
        ph = Phase(name, rate_per_site)
        self.set_rate(rate_per_site)
        c0, t0 = self.cpu(), self.thread_snapshots()
        ph.started = time.time()
        while time.time() - ph.started < seconds:
            self.collect(ph)
        ph.ended = time.time()
        ph.cpu = {k: v - c0[k] for k, v in self.cpu().items()}
        t1 = self.thread_snapshots()
        ph.threads = aggregator_threads_cpu_s(t0, t1)
        self.thread_names = sorted({comm for snap in t1 for comm, _ in snap.threads.values()})
        if not self.args.json:
            s = ph.summary(self.args.sites)
            print(
                f"  {name:>10}: offered {s['offered_updates_per_s']:7.1f}/s, receipts {s['updates_per_s']:7.1f}/s, "
                f"backlog {s['backlog_start']} -> {s['backlog_end']} ({'flat' if s['backlog_flat'] else 'GROWS'}), "
                f"receipt p50 {s['receipt_p50_s']:.3f} s p99 {s['receipt_p99_s']:.3f} s, CPU cores: "
                + ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_cores"].items())
                + f"; aggregator RSS {s['aggregator_rss_mb']:.0f} MB",
                flush=True,
            )
        return ph

    def wait(self, pred: Any, timeout: float, what: str) -> float:
        t0 = time.time()
        while not pred():
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{what} did not happen within {timeout} s; errors: {self.errors[:5]}")
            self.collect(None)
        return time.time() - t0

    def stop(self) -> None:
        for p in self.procs:
            try:
                self._command(p, {"stop": True})
            except OSError:
                pass
        for p in self.procs:
            try:
                p.communicate(timeout=20)  # reads what is left of its reports, waits for it
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for w in self.intake:
            if w.poll() is None:
                w.terminate()
                try:
                    w.wait(20)
                except subprocess.TimeoutExpired:
                    w.kill()
        if self.aggregator.poll() is None:
            self.aggregator.terminate()
            try:
                self.aggregator.wait(20)
            except subprocess.TimeoutExpired:
                self.aggregator.kill()
        self.agg_log.close()
        self.broker.stop()


def raise_fd_limit() -> int:
    """Soft limit of open files up to the hard limit: the broker (started from here) holds one per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def measure_limit(n_params: int, n_updates: int) -> dict[str, float]:
    """CPU seconds of bare decrypt + verify + axpy per update of ``n_params`` on one core (bench/aggregator.py)."""
    from broker_bridge import envelope
    from broker_bridge.envelope import UpdateHeader
    from broker_bridge.keys import KeyPair

    bench = _bench_aggregator()
    agg, site = KeyPair.generate("aggregator", "aggregator"), KeyPair.generate("site", "s0000")
    rng = np.random.default_rng(0)
    shapes = shared_shapes(n_params)
    delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
    blobs = [
        envelope.seal_update(
            UpdateHeader("s0000", i + 1, f"u{i}", 0, 100, {"mode": "off"}), delta, site, agg.public().box_pub
        )
        for i in range(n_updates)
    ]
    box, acc = agg.box_key, {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    best = math.inf
    for _ in range(3):
        c0 = time.process_time()
        for b in blobs:
            bench.open_and_add(box, b, acc, 100.0)
        best = min(best, (time.process_time() - c0) / n_updates)
    return {
        "limit_cpu_ms_per_update": 1e3 * best,
        "limit_updates_per_s_per_core": 1 / best,
        "sealed_bytes": len(blobs[0]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    limit = measure_limit(args.params, 30 if args.params <= 200_000 else 8)
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="fedline-scale-"))
        shm = args.outbox_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        outboxes = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedline-scale-outboxes-", dir=shm))
        c = Conductor(args, Path(tmp), Path(outboxes))
        c.start()
        try:
            say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
            say(
                f"{args.sites} sites in {len(c.procs)} processes, {sum(math.prod(s) for s in c.shapes.values()):,} "
                f"shared parameters, FedBuff K = {c.buffer_size}; limit (decrypt + verify + axpy, one core) "
                f"{limit['limit_updates_per_s_per_core']:.0f} updates/s"
            )
            c.collect(None)
            connect_s = c.wait(
                lambda: c.connected() >= args.sites,
                args.connect_timeout,
                "every site connected and holding the signed manifest of version 0",
            )
            say(f"  all {args.sites} sites connected (and hold version 0's manifest) in {connect_s:.1f} s")
            if c.intake:  # a site's update sent before its worker subscribed would wait for the outbox's resend
                c.wait(c.intake_ready, args.connect_timeout, "every intake worker subscribed to its share")
            phases = [c.run_phase("steady", args.rate_per_site, 60 * args.minutes)]
            steady = phases[0].summary(args.sites)
            best: dict[str, Any] | None = steady if steady["backlog_flat"] else None
            # up from the steady rate while the backlog stays flat; or, when the steady rate was already too much
            # for this machine, down until it is flat (the first flat rate found is the highest)
            up = best is not None
            total = args.search_from or args.sites * args.rate_per_site
            for i in range(args.max_steps):
                total = total * args.step_factor if up else total / args.step_factor
                ph = c.run_phase(f"{'up' if up else 'down'}-{i + 1}", total / args.sites, args.step_s)
                phases.append(ph)
                s = ph.summary(args.sites)
                if s["backlog_flat"] and (up or best is None):
                    best = s
                if s["backlog_flat"] != up:
                    break
            c.set_rate(0.0)  # drain: every update sealed gets its receipt
            drain_s = c.wait(
                lambda: sum(r["backlog"] for r in c.latest) == 0, args.drain_timeout, "the backlog drained"
            )
            say(f"  drained in {drain_s:.1f} s")
        finally:
            c.stop()
    load_after = os.getloadavg()[0]
    summaries = [p.summary(args.sites) for p in phases]
    agg_ms = best["aggregator_cpu_ms_per_update"] if best else math.nan
    by_thread = best["aggregator_cpu_ms_per_update_by_thread"] if best else {}
    return {
        "benchmark": "scale",
        "sites": args.sites,
        "params": sum(math.prod(s) for s in c.shapes.values()),
        "procs": len(c.procs),
        "workers": args.workers,
        "buffer_size": c.buffer_size,
        "broker_max_packet": args.broker_max_packet,
        "minutes": args.minutes,
        "rate_per_site_per_min": 60 * args.rate_per_site,
        "updates_per_s": steady["updates_per_s"],
        "offered_updates_per_s": steady["offered_updates_per_s"],
        "receipt_p50_s": steady["receipt_p50_s"],
        "receipt_p99_s": steady["receipt_p99_s"],
        "send_to_receipt_p99_s": steady["send_to_receipt_p99_s"],
        "backlog_flat": steady["backlog_flat"],
        "max_flat_updates_per_s": best["updates_per_s"] if best else None,
        "max_flat_phase": best["phase"] if best else None,
        "aggregator_cpu_ms_per_update": agg_ms,
        # CPU ms per update per component (sites, broker, aggregator = single process or reducer + workers)
        # in the highest flat phase, and the share of the machine's cores the whole run used there
        "cpu_ms_per_update": best["cpu_ms_per_update"] if best else None,
        "machine_cpu_busy": best["machine_cpu_busy"] if best else None,
        "steady_cpu_ms_per_update": steady["cpu_ms_per_update"],
        **limit,
        # the whole service (every thread of the aggregator process) against the bare limit
        "intake_vs_limit": limit["limit_cpu_ms_per_update"] / agg_ms if best else None,
        # the aggregator's CPU per update by thread role in the highest flat phase (the docstring says which)
        "aggregator_cpu_ms_per_update_by_thread": by_thread or None,
        # the opening threads alone (decrypt, verify, validate) against the bare limit
        "open_vs_limit": open_vs_limit(limit["limit_cpu_ms_per_update"], by_thread),
        "aggregator_thread_names": c.thread_names,  # as `top -H` shows them (with workers: theirs too)
        "aggregator_rss_mb": c.rss["aggregator"],
        "broker_rss_mb": c.rss["broker"],
        "sites_rss_mb": c.rss["sites"],
        "sealed": c.sealed,
        "receipted": c.receipted,
        "verdicts": c.verdicts,
        "errors": c.errors[:10],
        "connect_s": connect_s,
        "drain_s": drain_s,
        "phases": summaries,
        "backlog": [[round(t, 1), b, p] for t, b, p in c.series],
        "fd_limit": fd_limit,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }


def print_budget(phases: list[dict[str, Any]]) -> None:
    """The CPU budget table: ms of CPU per update answered, per component and phase, and the machine's use."""
    keys = [
        k for k in ("sites", "broker", "aggregator", "reducer", "intake_workers") if k in phases[0]["cpu_ms_per_update"]
    ]
    print(f"\nCPU ms per update: {'phase':>10} " + " ".join(f"{k:>14}" for k in (*keys, "total")) + "  machine busy")
    for s in phases:
        b = s["cpu_ms_per_update"]
        row = " ".join(f"{b[k]:14.1f}" for k in (*keys, "total"))
        print(f"{'':19}{s['phase']:>10} {row}  {100 * s['machine_cpu_busy']:11.0f} %")


def print_threads(phases: list[dict[str, Any]]) -> None:
    """The aggregator's CPU ms per update by thread role, per phase."""
    roles: list[str] = []
    for s in phases:
        roles += [r for r in s["aggregator_cpu_ms_per_update_by_thread"] if r not in roles]
    print(f"\naggregator CPU ms per update by thread: {'phase':>10} " + " ".join(f"{r:>12}" for r in roles))
    for s in phases:
        b = s["aggregator_cpu_ms_per_update_by_thread"]
        print(f"{'':40}{s['phase']:>10} " + " ".join(f"{b.get(r, 0.0):12.2f}" for r in roles))


def main(argv: list[str] | None = None) -> int:
    from broker_bridge.mosquitto import DEFAULT_MAX_PACKET

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--params", type=int, default=100_000, help="shared float32 parameters (about)")
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the steady phase")
    ap.add_argument("--rate-per-site", type=float, default=1 / 60, help="updates per second per site (steady)")
    ap.add_argument("--procs", type=int, default=4, help="processes the simulated sites are spread over")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="aggregator intake workers ([intake] workers): 0 or 1 = the single aggregator process, "
        "N >= 2 = N `fedline aggregator --worker` processes and the aggregator as reducer",
    )
    ap.add_argument("--buffer-size", type=int, default=0, help="FedBuff K (default: sites / 10, at most 100)")
    ap.add_argument(
        "--broker-max-packet",
        type=int,
        default=DEFAULT_MAX_PACKET,
        help="Mosquitto's max_packet_size (default: the deployed 256 KiB). Sites chunk at their own 100 KiB "
        "whatever it is; an intake worker sends a forward in chunks of up to 1 MiB where it allows (2097152)",
    )
    ap.add_argument("--step-s", type=float, default=30.0, help="length of each search phase")
    ap.add_argument("--step-factor", type=float, default=1.6, help="rate growth from one search phase to the next")
    ap.add_argument(
        "--search-from",
        type=float,
        default=0.0,
        help="total updates/s the search starts from (default: the steady rate)",
    )
    ap.add_argument("--max-steps", type=int, default=12, help="search phases at most")
    ap.add_argument("--connect-timeout", type=float, default=180.0)
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--outbox-dir", help="where the sites' outboxes live (default /dev/shm: see the docstring)")
    ap.add_argument("--workdir", help="keep keys, stores and logs here (default: a temporary folder, removed)")
    ap.add_argument(
        "--profile-aggregator",
        metavar="FILE",
        help="run the aggregator under cProfile (its event loop thread), writing FILE",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(Path(args.worker).read_text()))
        return 0
    if args.sites < 1 or args.params < 100 or args.minutes <= 0:
        ap.error("need --sites >= 1, --params >= 100 and --minutes > 0")
    r = run(args)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"\n{'phase':>10} {'per site/min':>12} {'offered/s':>10} {'receipts/s':>10} {'backlog':>12} {'flat':>5} "
        f"{'p50 s':>7} {'p99 s':>7} {'agg cores':>9} {'agg ms/upd':>10}"
    )
    for s in r["phases"]:
        print(
            f"{s['phase']:>10} {s['rate_per_site_per_min']:12.2f} {s['offered_updates_per_s']:10.1f} "
            f"{s['updates_per_s']:10.1f} {str(s['backlog_start']) + '->' + str(s['backlog_end']):>12} "
            f"{'yes' if s['backlog_flat'] else 'NO':>5} {s['receipt_p50_s']:7.3f} {s['receipt_p99_s']:7.3f} "
            f"{s['cpu_cores']['aggregator']:9.2f} {s['aggregator_cpu_ms_per_update']:10.2f}"
        )
    print(
        f"\n{r['sites']} sites, {r['params']:,} params, K = {r['buffer_size']}: steady {r['updates_per_s']:.1f} "
        f"updates/s, receipt p50 {r['receipt_p50_s']:.3f} s p99 {r['receipt_p99_s']:.3f} s, backlog "
        f"{'flat' if r['backlog_flat'] else 'GROWING'}; highest flat rate {r['max_flat_updates_per_s']} updates/s"
    )
    print_budget(r["phases"])
    print_threads(r["phases"])
    print(
        f"limit (CPU per update, decrypt + verify + axpy on one core) {r['limit_cpu_ms_per_update']:.2f} ms: "
        f"over the whole aggregator (intake_vs_limit) {r['intake_vs_limit']}, "
        f"over its opening threads (open_vs_limit) {r['open_vs_limit']}"
    )
    print(
        f"peak RSS: aggregator {r['aggregator_rss_mb']:.0f} MB, broker {r['broker_rss_mb']:.0f} MB, "
        f"{r['procs']} site processes {r['sites_rss_mb']:.0f} MB; verdicts {r['verdicts']}; "
        f"load average {r['load_average']}"
    )
    if r["errors"]:
        print("errors:", r["errors"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
