"""Secure aggregation against plain FedBuff, in one run, on the same updates.

For each configuration (sites x parameters: 10 x 100k, 50 x 100k, 10 x 1M) it measures

Times are CPU time (``time.process_time``) in the JSON's required keys and wall time beside them:
on a shared, loaded machine the wall time mostly measures the other processes.

- the site's extra time: ``SecAggMember.mask`` (weight, quantise, masks, Shamir shares, sealed
  bundles) plus sealing the masked update, minus sealing the plain float32 delta
  (median over the cohort's sites);
- the aggregator's unmasking time, with 0 % and 20 % of the members never submitting: from the
  deadline (signing the survivors announcement) through checking acks and every share against
  its commitment, reconstructing the seeds and removing the masks, to the float cohort sum
  (member-side work, done on the sites, is not counted);
- the plain aggregator's opening and weighted sum of the same updates, for scale;
- bytes: the sealed masked update over the sealed plain update;
- the largest absolute difference between the secure cohort sum and the plain weighted sum
  (float64) of the same deltas, and the quantisation bound n/scale it must stay under.

Usage: ``python bench/secagg.py`` (table) or ``--json`` (one JSON object); ``--quick`` runs
tiny sizes (the test suite uses it to check the benchmark still runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker_bridge import envelope  # noqa: E402
from broker_bridge.keys import Enrollment, KeyPair, create_federation  # noqa: E402
from broker_bridge.secagg import messages as m  # noqa: E402
from broker_bridge.secagg import quantise  # noqa: E402
from broker_bridge.secagg.member import SecAggMember  # noqa: E402
from broker_bridge.secagg.unmask import CohortUnmasker  # noqa: E402
from broker_bridge.topics import Topics  # noqa: E402

CONFIGS = ((10, 100_000), (50, 100_000), (10, 1_000_000))
QUICK = ((5, 2_000), (8, 2_000))
CLIP = 1.0  # per-site norm bound of the weighted delta (= the quantisation range R)


def _federation(n_sites: int, tmp: Path) -> tuple[KeyPair, dict[str, KeyPair], Enrollment, dict[str, SecAggMember]]:
    names = [f"site-{i:03d}" for i in range(n_sites)]
    fed = create_federation("bench", names)
    agg, keys, enr = fed.aggregator, fed.sites, fed.enrollment
    members = {s: SecAggMember(keys[s], enr, tmp / f"{s}.sqlite") for s in names}
    return agg, keys, enr, members


class _Clock:
    """Adds up wall and CPU time over the ``with`` blocks it times (CPU time is what a loaded,
    shared machine distorts least)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._t
        self.cpu += time.process_time() - self._c


def _header(site: str, counter: int) -> envelope.UpdateHeader:
    return envelope.UpdateHeader(site=site, counter=counter, msg_id=f"{site}-u{counter}", base_version=1, n_samples=100)


def run_cohort(n_sites: int, n_params: int, drop_fraction: float, tmp: Path) -> dict[str, Any]:
    agg, keys, enr, members = _federation(n_sites, tmp)
    names = sorted(members)
    rng = np.random.default_rng(n_sites * 7 + n_params)
    # deltas within the per-site bound, like clipped DP deltas; weights like FedBuff's per-site weights
    deltas = {s: (rng.standard_normal(n_params) * (0.5 * CLIP / np.sqrt(n_params))).astype(np.float32) for s in names}
    weights = {s: float(w) for s, w in zip(names, rng.uniform(0.5, 1.0, n_sites))}
    now = time.time()
    ann = m.CohortAnnouncement(
        "bench",
        secrets.token_hex(16),
        1,
        tuple(names),
        n_sites // 2 + 1,
        min(3, n_sites),
        now + 3600,
        now,
        CLIP,
        weights,
    )
    unmasker, blob = CohortUnmasker.announce(ann, enr, agg)
    for s in names:
        members[s].accept_cohort(blob)
    n_drop = round(drop_fraction * n_sites)
    submitting = names[n_drop:]
    site_plain, site_secure, plain_bytes, secure_bytes, plain_sealed = [], [], [], [], []
    site_plain_cpu: list[float] = []
    site_secure_cpu: list[float] = []
    agg_pub = enr.aggregator.box_pub
    for _i, s in enumerate(submitting):
        t0, c0 = time.perf_counter(), time.process_time()
        sealed = envelope.seal_update(_header(s, 1), {"delta": deltas[s]}, keys[s], agg_pub)
        t1, c1 = time.perf_counter(), time.process_time()
        sub = members[s].mask(ann.cohort, deltas[s].astype(np.float64))
        secure = envelope.seal_update(
            _header(s, 2), {"secagg": np.frombuffer(sub.encode(), dtype=np.uint8)}, keys[s], agg_pub
        )
        t2, c2 = time.perf_counter(), time.process_time()
        site_plain.append(t1 - t0)
        site_secure.append(t2 - t1)
        site_plain_cpu.append(c1 - c0)
        site_secure_cpu.append(c2 - c1)
        plain_bytes.append(len(sealed))
        secure_bytes.append(len(secure))
        plain_sealed.append(sealed)
        _, tensors = envelope.open_update(secure, agg, enr)
        unmasker.add_submission(m.MaskedSubmission.decode(tensors["secagg"].tobytes()), s)

    # plain FedBuff at the aggregator: open each update, weighted sum
    t0 = time.perf_counter()
    plain_sum = np.zeros(n_params, dtype=np.float64)
    for raw in plain_sealed:
        h, tensors = envelope.open_update(raw, agg, enr)
        plain_sum += weights[h.site] * tensors["delta"].astype(np.float64)
    plain_agg_s = time.perf_counter() - t0

    # secure: the aggregator's part of unmasking, timed; the members' part runs untimed in between
    clock = _Clock()
    with clock:
        sblob = unmasker.close()
    acks = {s: members[s].ack(sblob) for s in submitting}
    with clock:
        for s, sig in acks.items():
            unmasker.add_ack(s, sig)
        requests = {s: unmasker.request_for(s).encode() for s in submitting}
    answers = {s: members[s].answer(m.UnmaskRequest.decode(requests[s])).encode() for s in submitting}
    wire = _wire_messages(ann, blob, sblob, unmasker, acks, answers, agg, keys, enr)
    with clock:
        for s, raw in answers.items():
            unmasker.add_answer(m.Answer.decode(raw), s)
        secure_sum = unmasker.cohort_sum()
    for mem in members.values():
        mem.close()
    return {
        "sites": n_sites,
        "params": n_params,
        "dropped": n_drop,
        "site_plain_ms": 1000 * statistics.median(site_plain),
        "site_secure_ms": 1000 * statistics.median(site_secure),
        "site_extra_ms": 1000 * (statistics.median(site_secure) - statistics.median(site_plain)),
        "site_extra_cpu_ms": 1000 * (statistics.median(site_secure_cpu) - statistics.median(site_plain_cpu)),
        "plain_bytes": int(statistics.median(plain_bytes)),
        "secure_bytes": int(statistics.median(secure_bytes)),
        "bytes_ratio": statistics.median(secure_bytes) / statistics.median(plain_bytes),
        "plain_aggregate_s": plain_agg_s,
        "unmask_s": clock.wall,
        "unmask_cpu_s": clock.cpu,
        "max_abs_error": float(np.abs(secure_sum - plain_sum).max()),
        "error_bound": quantise.error_bound(CLIP, n_sites),
        "wire": wire,
    }


def _wire_messages(
    ann: m.CohortAnnouncement,
    ann_blob: bytes,
    survivors_blob: bytes,
    unmasker: CohortUnmasker,
    acks: dict[str, bytes],
    answers: dict[str, bytes],
    agg: KeyPair,
    keys: dict[str, KeyPair],
    enr: Enrollment,
) -> dict[str, Any]:
    """The bytes one cohort puts on the wire, as the service and the edges publish them, grouped into the steps
    the publisher is handed them in (``Aggregator._to_cohorts``: one list per cohort step; an edge: one reply
    per message it receives). Receipts are the JSON form (cohort receipts are JSON), sealed to their sites."""
    from broker_bridge.federation_key import seal_notice

    t = Topics("bench")
    content_key = secrets.token_bytes(32)
    submitters = sorted(acks)

    def receipt(site: str, verdict: str, version: int) -> tuple[str, bytes, bool]:
        # the fields of aggregator.store.Verdict.receipt() (bench/aggregator.py shadows the package here)
        doc = {
            "site": site,
            "counter": 2,
            "msg_id": secrets.token_hex(8),
            "verdict": verdict,
            "reason": None,
            "version": version,
            "detail": None,
            "staleness": 0,
            "weight": 1.0,
        }
        return t.receipts(site), envelope.seal_receipt(doc, agg, enr.sites[site].box_pub), False

    requests = [(t.secagg_request(x), unmasker.request_for(x).seal(enr.sites[x].box_pub), False) for x in submitters]
    steps: list[list[tuple[str, bytes, bool]]] = [
        [(t.secagg_cohort(ann.cohort), seal_notice(ann_blob, 1, content_key), True)]
    ]
    steps += [[receipt(x, "buffered", 1)] for x in submitters]
    steps += [[(t.secagg_survivors(ann.cohort), seal_notice(survivors_blob, 1, content_key), True)]]
    steps += [requests[: ann.threshold]] + [[r] for r in requests[ann.threshold :]]
    steps += [
        [receipt(x, "applied", 2) for x in submitters]
        + [(t.secagg_cohort(ann.cohort), b"", True), (t.secagg_survivors(ann.cohort), b"", True)]
    ]
    box = enr.aggregator.box_pub
    replies = {
        x: [
            (t.secagg_reply(x), m.seal_reply("ack", ann.cohort, acks[x], keys[x], box), False),
            (t.secagg_reply(x), m.seal_reply("answer", ann.cohort, answers[x], keys[x], box), False),
        ]
        for x in submitters
    }
    return {"aggregator_steps": steps, "member_replies": replies}


async def _publish_steps(steps: list[list[tuple[str, bytes, bool]]], publish: Any, settle: Any) -> tuple[float, float]:
    """(the publisher's time held in the steps, the time until every message was acknowledged), wall seconds."""
    held = 0.0
    t0 = time.perf_counter()
    for step in steps:
        s0 = time.perf_counter()
        for topic, payload, retain in step:
            await publish(topic, payload, retain)
        held += time.perf_counter() - s0
    await settle()
    return held, time.perf_counter() - t0


async def _wire_round(broker: Any, wire: dict[str, Any], windowed: bool, clients: dict[str, Any]) -> dict[str, float]:
    """One cohort's messages published over Mosquitto: awaited one by one (the code before) or through a window."""
    from broker_bridge.publish_window import PublishWindow

    out: dict[str, float] = {}
    parties = [("aggregator", wire["aggregator_steps"])]
    parties += [(site, [[r] for r in replies]) for site, replies in wire["member_replies"].items()]
    held_members, acked_members = [], []
    for who, steps in parties:
        client = clients[who]
        window = PublishWindow()

        async def awaited(topic: str, payload: bytes, retain: bool, client: Any = client) -> None:
            await client.publish(topic, payload, qos=1, retain=retain)

        async def windowed_publish(
            topic: str, payload: bytes, retain: bool, client: Any = client, w: Any = window
        ) -> None:
            await w.publish(client, topic, payload, retain=retain)

        async def nothing() -> None:
            return None

        async def drained(w: Any = window) -> None:
            await w.drain(60.0)
            if w.failed:
                raise RuntimeError(f"{w.failed} publishes failed")

        held, acked = await _publish_steps(
            steps, windowed_publish if windowed else awaited, drained if windowed else nothing
        )
        if who == "aggregator":
            out["aggregator_held_ms"], out["aggregator_all_acked_ms"] = 1000 * held, 1000 * acked
        else:
            held_members.append(held / len(steps))
            acked_members.append(acked)
    out["member_held_ms_per_reply"] = 1000 * statistics.median(held_members)
    out["member_all_acked_ms"] = 1000 * statistics.median(acked_members)
    return out


async def _wire_bench(wire: dict[str, Any], rounds: int, tmp: Path) -> dict[str, Any]:
    """The cohort's publishes, old way and new, interleaved ``rounds`` times over one Mosquitto (TLS, as deployed)."""
    from broker_bridge.client import BrokerSettings, MqttClient
    from broker_bridge.mosquitto import MosquittoProcess

    sites = sorted(wire["member_replies"])
    broker = MosquittoProcess(tmp / "broker", federation="bench", sites=sites).start()
    try:
        clients: dict[str, Any] = {}
        for user in ["aggregator", *sites]:
            settings = BrokerSettings(
                url=broker.tls_url,
                ca_file=broker.ca_file,
                username=user,
                password=broker.password(user),
                client_id=f"bench-{user}",
                timeout_s=30.0,
            )
            clients[user] = await MqttClient(settings).__aenter__()
        for c in clients.values():
            await c.wait_connected(30)
        got: list[int] = []

        async def count(c: Any) -> None:
            async for _ in c.messages():
                got.append(1)

        observer = await MqttClient(
            BrokerSettings(
                url=broker.tls_url,
                ca_file=broker.ca_file,
                username="observer",
                password=broker.password("observer"),
                client_id="bench-observer",
            )
        ).__aenter__()
        await observer.wait_connected(30)
        await observer.subscribe("fedline/bench/#")
        counter = asyncio.create_task(count(observer))
        n_messages = sum(len(x) for x in wire["aggregator_steps"]) + 2 * len(sites)
        runs: dict[str, list[dict[str, float]]] = {"awaited": [], "window": []}
        for _ in range(rounds):
            for mode in ("awaited", "window"):
                got.clear()
                runs[mode].append(await _wire_round(broker, wire, mode == "window", clients))
                deadline = time.monotonic() + 30
                while len(got) < n_messages and time.monotonic() < deadline:  # every message reached a subscriber
                    await asyncio.sleep(0.01)
                if len(got) < n_messages:
                    raise RuntimeError(f"{mode}: {len(got)} of {n_messages} messages delivered")
        counter.cancel()
        for c in [*clients.values(), observer]:
            await c.close()
    finally:
        broker.stop()
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    return {
        "sites": len(sites),
        "messages": n_messages,
        "aggregator_steps": len(wire["aggregator_steps"]),
        "rounds": rounds,
        "awaited": med["awaited"],
        "window": med["window"],
        "aggregator_held_ratio": med["window"]["aggregator_held_ms"] / med["awaited"]["aggregator_held_ms"],
        "aggregator_all_acked_ratio": med["window"]["aggregator_all_acked_ms"]
        / med["awaited"]["aggregator_all_acked_ms"],
        "member_held_ratio": med["window"]["member_held_ms_per_reply"] / med["awaited"]["member_held_ms_per_reply"],
    }


def prg_rates(n_masks: int = 100, n_params: int = 100_000) -> dict[str, float]:
    """MB/s of CPU time expanding masks: prg.mask (OpenSSL's ChaCha20) and libsodium's
    randombytes_buf_deterministic (the same keystream), measured in this run."""
    from nacl.bindings import randombytes_buf_deterministic

    from broker_bridge.secagg import prg

    seeds = [secrets.token_bytes(32) for _ in range(n_masks)]
    mb = n_masks * 4 * n_params / 1e6
    c0 = time.process_time()
    for seed in seeds:
        prg.mask(seed, n_params)
    c1 = time.process_time()
    for seed in seeds:
        randombytes_buf_deterministic(4 * n_params, seed)
    c2 = time.process_time()
    return {"prg_mb_per_s": mb / (c1 - c0), "libsodium_mb_per_s": mb / (c2 - c1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the benchmark runs")
    ap.add_argument(
        "--wire",
        action="store_true",
        help="also publish each configuration's cohort messages over a private Mosquitto, awaited one by one "
        "(the code before) and through broker_bridge.publish_window (now), interleaved",
    )
    ap.add_argument("--wire-rounds", type=int, default=5, help="interleaved rounds of the --wire part")
    args = ap.parse_args(argv)
    configs = QUICK if args.quick else CONFIGS
    load_before = os.getloadavg()[0]
    rows = []
    wire_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_sites, n_params in configs:
            for drop in (0.0, 0.2):
                run_dir = Path(tmp) / f"{n_sites}x{n_params}-{drop}"
                rows.append(run_cohort(n_sites, n_params, drop, run_dir))
                wire = rows[-1].pop("wire")
                if args.wire and drop == 0.0 and n_params == configs[0][1]:
                    rounds = 2 if args.quick else args.wire_rounds
                    wire_rows.append(asyncio.run(_wire_bench(wire, rounds, run_dir)))
    rates = prg_rates(10, 2_000) if args.quick else prg_rates()
    load_after = os.getloadavg()[0]

    def pick(sites: int, params: int, drop: float, key: str) -> float | None:
        for r in rows:
            if r["sites"] == sites and r["params"] == params and r["dropped"] == round(drop * sites):
                return r[key]
        return None

    s0, p0 = configs[0]
    s1, p1 = configs[1]
    # the required figures are CPU time: on a shared, loaded machine wall time mostly measures the
    # other processes (both are in the rows)
    result = {
        "benchmark": "secagg",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "time": "cpu",
        f"site_extra_ms_{s0}x{p0 // 1000}k": pick(s0, p0, 0.0, "site_extra_cpu_ms"),
        f"unmask_s_{s1}x{p1 // 1000}k_drop0": pick(s1, p1, 0.0, "unmask_cpu_s"),
        f"unmask_s_{s1}x{p1 // 1000}k_drop20": pick(s1, p1, 0.2, "unmask_cpu_s"),
        f"site_extra_wall_ms_{s0}x{p0 // 1000}k": pick(s0, p0, 0.0, "site_extra_ms"),
        f"unmask_wall_s_{s1}x{p1 // 1000}k_drop0": pick(s1, p1, 0.0, "unmask_s"),
        f"unmask_wall_s_{s1}x{p1 // 1000}k_drop20": pick(s1, p1, 0.2, "unmask_s"),
        f"bytes_ratio_{s0}x{p0 // 1000}k": pick(s0, p0, 0.0, "bytes_ratio"),
        "max_abs_error_vs_plain": max(r["max_abs_error"] for r in rows),
        "max_error_over_bound": max(r["max_abs_error"] / r["error_bound"] for r in rows),
        **rates,
        "rows": rows,
    }
    if args.wire:
        result["wire"] = wire_rows
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"secure aggregation vs plain FedBuff, same updates; {os.cpu_count()} CPUs, load average "
        f"{load_before:.1f} before, {load_after:.1f} after"
    )
    head = (
        f"{'sites':>5} {'params':>9} {'drop':>4} {'site extra ms cpu':>17} {'(wall)':>7} "
        f"{'bytes ratio':>11} {'plain agg s':>11} {'unmask s cpu':>12} {'(wall)':>7} {'max |err|':>10} "
        f"{'bound':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['sites']:>5} {r['params']:>9,} {r['dropped']:>4} {r['site_extra_cpu_ms']:17.1f} "
            f"{r['site_extra_ms']:7.1f} {r['bytes_ratio']:11.4f} {r['plain_aggregate_s']:11.3f} "
            f"{r['unmask_cpu_s']:12.3f} {r['unmask_s']:7.3f} {r['max_abs_error']:10.2e} {r['error_bound']:9.2e}"
        )
    print(
        f"mask expansion (ChaCha20, CPU time): prg.mask (OpenSSL) {rates['prg_mb_per_s']:.0f} MB/s, libsodium "
        f"randombytes_buf_deterministic {rates['libsodium_mb_per_s']:.0f} MB/s (the same bytes)"
    )
    print(
        "site extra = masked update (mask, shares, seal) - plain update (seal), median over sites; unmask = the "
        "aggregator's part only; max |err| = secure cohort sum vs plain float64 weighted sum; bound = n / scale"
    )
    for w in wire_rows:
        a, b = w["awaited"], w["window"]
        print(
            f"wire, {w['sites']} sites, {w['messages']} messages (median of {w['rounds']} interleaved rounds), "
            f"awaited one by one -> window: aggregator held {a['aggregator_held_ms']:.1f} -> "
            f"{b['aggregator_held_ms']:.1f} ms ({w['aggregator_held_ratio']:.3f}x), all acknowledged "
            f"{a['aggregator_all_acked_ms']:.1f} -> {b['aggregator_all_acked_ms']:.1f} ms "
            f"({w['aggregator_all_acked_ratio']:.3f}x); a member's receive loop held per reply "
            f"{a['member_held_ms_per_reply']:.2f} -> {b['member_held_ms_per_reply']:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
