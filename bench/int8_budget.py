"""The int8 path's CPU budget per update at the aggregator, part by part, against Flower's whole path.

Why a bench of its own: on a shared machine the whole-path figures of ``bench/aggregator.py`` move by
20-40 % from run to run, more than the changes being measured. Here each part the aggregator cannot
skip for an int8 update runs alone on one core, the parts and Flower's decode + aggregate take turns
round after round in one process, and each keeps its least CPU time over the rounds: load from other
processes only ever adds time, so the minimum is the steadiest estimate of each part's own cost.

Parts, per update (FedBuff K = 10, the mean), on the same deltas:

- ``decrypt``: SealedBox open (X25519 + XSalsa20-Poly1305), in place (``broker_bridge.sealopen``);
- ``verify``: SHA-256 of the plaintext + Ed25519 (the site's signature);
- ``parse``: the header JSON and its checks, the tensor table, the int8 checks (``quantised.read_int8``);
- ``norm``: the L2 norm from the int8 blocks (the norm bound: validation and clipping);
- ``append``: the sealed bytes written to the buffer log (the update durable before its receipt);
- ``combine``: its share of the mean's step straight from the int8 blocks (``quantised.combine``);
- ``step + checkpoint``: its share of the server step and the version's checkpoint (``Store.commit_version``);
- Flower 1.42, two baselines on the same float32 deltas:
  - *faithful*: its server receive path from the serialised requests the SuperLink receives (``flower_receive``
    beside this file: the SuperLink's protobuf parsing and object store, with the SHA-256 check of every
    object; the hop to the ServerApp process; the Message inflated; 1.42's ``FedAvg.aggregate_train``), in
    three timed parts ``flower_superlink``, ``flower_serverapp``, ``flower_fedavg``;
  - *narrow* (the older figure, kept beside it): ``parameters_to_ndarrays`` of its float32 update + its share
    of the legacy ``aggregate``, which starts from ``.npy`` bytes already out of their message.

Not in the parts: SQLite statements, receipts, metrics, the thread pool (``bench/aggregator.py`` measures
the whole path). Usage: ``python bench/int8_budget.py [--params 1000000] [--rounds 12] [--json]``; Flower
must be importable (see ``bench/aggregator.py``: installed beside the venv, never a fedline dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from nacl.signing import VerifyKey

ROOT = Path(__file__).resolve().parents[1]
# bench/aggregator.py is a script beside this one: keep this folder off the path so "aggregator" is the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # after the repository: flower_receive, never "aggregator"

import flower_receive  # noqa: E402

from aggregator.store import Store  # noqa: E402
from aggregator.strategies import aggregate  # noqa: E402
from broker_bridge import envelope, quantised  # noqa: E402
from broker_bridge.envelope import UpdateHeader  # noqa: E402
from broker_bridge.keys import create_federation  # noqa: E402
from broker_bridge.sealopen import seal_open  # noqa: E402
from fedline.blas import one_blas_thread  # noqa: E402
from fedline.heap import keep_freed_buffers  # noqa: E402

K = 10
N_FEATURES = 128


def shapes_for(n_params: int) -> dict[str, tuple[int, ...]]:
    """An MLP body [F -> H -> H] of about ``n_params`` parameters (as ``bench/aggregator.py``'s)."""
    h = max(1, round((-(N_FEATURES + 2) + math.sqrt((N_FEATURES + 2) ** 2 + 4 * n_params)) / 2))
    return {"body.0.weight": (h, N_FEATURES), "body.0.bias": (h,), "body.2.weight": (h, h), "body.2.bias": (h,)}


FLOWER_PARTS = ("flower_superlink", "flower_serverapp", "flower_fedavg")


def sealed_batches(shapes: dict[str, tuple[int, ...]], rounds: int) -> tuple[Any, list[list[bytes]], list[Any]]:
    """``rounds`` batches of K sealed int8 updates (one per site) and Flower's float32 wires for the same deltas:
    per round, (the narrow baseline's ``Parameters``, the faithful baseline's serialised replies)."""
    from flwr.common import ndarrays_to_parameters

    fed = create_federation("bench", [f"site-{i}" for i in range(K)])
    rng = np.random.default_rng(0)
    box_pub = fed.aggregator.public().box_pub
    sealed, flower = [], []
    for r in range(rounds):
        batch, wire, deltas = [], [], []
        for i, site in enumerate(fed.sites.values()):
            delta = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in shapes.items()}
            header = UpdateHeader(site.ident, r + 1, f"u{r}-{i}", 0, 100, {"epsilon": 1.0}, encoding="int8")
            batch.append(envelope.seal_update(header, quantised.encode(delta, "int8"), site, box_pub))
            wire.append(ndarrays_to_parameters(list(delta.values())))
            deltas.append(list(delta.values()))
        sealed.append(batch)
        flower.append((wire, flower_receive.replies(deltas, [100] * K)))
    return fed, sealed, flower


def cpu(fn: Callable[[], object]) -> float:
    c0 = time.process_time()
    fn()
    return time.process_time() - c0


def round_parts(
    batch: list[bytes], wires: Any, version: int, box: Any, log: int, store: Store, shapes: dict[str, Any]
) -> list[Callable[[], object]]:
    """The parts of one round of K updates, in order (each leaves in ``s`` what the next one reads)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate as flower_aggregate

    wire, replies = wires
    s: dict[str, Any] = {"flower_store": flower_receive.new_store()}
    model = {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}

    def decrypt() -> None:
        s["inner"] = [seal_open(memoryview(b)[4:], box) for b in batch]

    def verify() -> None:
        s["plain"] = []
        for inner in s["inner"]:
            n = inner[4]
            site, vk, sig = inner[5 : 5 + n], bytes(inner[5 + n : 37 + n]), bytes(inner[37 + n : 101 + n])
            plain = inner[101 + n :]
            VerifyKey(vk).verify(envelope.digest(site, envelope._UPDATE_DOMAIN, b"\x00", plain), sig)
            s["plain"].append(plain)

    def parse() -> None:
        s["deltas"] = []
        for plain in s["plain"]:
            doc, rest = envelope._decode_update_header(plain)
            UpdateHeader.from_dict(doc)
            s["deltas"].append(quantised.read_int8(envelope.decode_tensors(rest)))

    def norm() -> None:
        for d in s["deltas"]:
            d.norm()

    def append() -> None:  # overwriting the same offsets each round, as the store reuses an emptied log
        at = 0
        for b in batch:
            at += os.pwrite(log, b, at)

    def combine() -> None:
        s["step"] = {k: quantised.combine(s["deltas"], [1 / K] * K, k, shapes[k]) for k in shapes}

    def step_and_checkpoint() -> None:
        new, _ = aggregate.server_step(model, s["step"], 1.0)
        store.commit_version(version, envelope.tensor_parts(new), None, {"updates": []}, [], keep=10)

    def flower() -> None:
        flower_aggregate([(parameters_to_ndarrays(p), 100) for p in wire])

    def flower_superlink() -> None:
        s["trees"] = [flower_receive.superlink_receive(s["flower_store"], r) for r in replies]

    def flower_serverapp() -> None:
        s["messages"] = [flower_receive.serverapp_pull(s["flower_store"], t) for t in s["trees"]]

    def flower_fedavg() -> None:
        flower_receive.fedavg(s["messages"])

    fedline = [decrypt, verify, parse, norm, append, combine, step_and_checkpoint]
    return [*fedline, flower, flower_superlink, flower_serverapp, flower_fedavg]


def measure(n_params: int, rounds: int) -> dict[str, Any]:
    shapes = shapes_for(n_params)
    fed, sealed, wires = sealed_batches(shapes, rounds)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedline-budget-") as tmp:
        store = Store(Path(tmp) / "agg.sqlite")
        log = os.open(Path(tmp) / "buffer.log", os.O_WRONLY | os.O_CREAT, 0o600)
        for r in range(rounds):
            for part in round_parts(sealed[r], wires[r], r + 1, fed.aggregator.box_key, log, store, shapes):
                best[part.__name__] = min(best.get(part.__name__, math.inf), cpu(part) / K)
        os.close(log)
        store.close()
    ms = {k: 1e3 * v for k, v in best.items()}
    fedline = sum(v for k, v in ms.items() if not k.startswith("flower"))
    faithful = sum(ms[k] for k in FLOWER_PARTS)
    return {
        "params": sum(math.prod(s) for s in shapes.values()),
        "ms_per_update": ms,
        "int8_parts_ms": fedline,
        "flower_ms": ms["flower"],  # the narrow baseline
        "flower_faithful_ms": faithful,
        "flower_vs_int8_parts": ms["flower"] / fedline,  # < 1: the parts alone cost more than Flower's narrow path
        "flower_faithful_vs_int8_parts": faithful / fedline,  # > 1: fedline's int8 parts cost less than Flower's
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="1000000", help="parameter counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=12, help="rounds of K updates; each part keeps its least CPU")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    keep_freed_buffers()  # as `fedline aggregator` runs
    one_blas_thread()  # as `fedline aggregator` runs (fedline.blas): no spinning BLAS thread counted in the parts
    if flower_receive.flower_version() is None:
        raise SystemExit("Flower 1.42 is not importable: see bench/aggregator.py for installing it beside the venv")
    load = os.getloadavg()[0]
    rows = [measure(int(p), args.rounds) for p in args.params.split(",")]
    import flwr

    result = {
        "benchmark": "int8_budget",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "flower": flwr.__version__,
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        "buffer_size": K,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"int8 updates at the aggregator: CPU ms per update by part, least over {args.rounds} rounds (K = {K})")
    print(
        f"load average {result['load_average'][0]} before, {result['load_average'][1]} after; flwr {flwr.__version__}"
    )
    names = list(rows[0]["ms_per_update"])
    print(f"{'part':>20} " + " ".join(f"{r['params']:>12,}" for r in rows))
    for name in names:
        print(f"{name:>20} " + " ".join(f"{r['ms_per_update'][name]:12.3f}" for r in rows))
    print(f"{'int8 parts, summed':>20} " + " ".join(f"{r['int8_parts_ms']:12.3f}" for r in rows))
    print(f"{'flower faithful':>20} " + " ".join(f"{r['flower_faithful_ms']:12.3f}" for r in rows))
    print(f"{'faithful / int8':>20} " + " ".join(f"{r['flower_faithful_vs_int8_parts']:11.2f}x" for r in rows))
    print(f"{'narrow / int8':>20} " + " ".join(f"{r['flower_vs_int8_parts']:11.2f}x" for r in rows))
    print("int8 parts summed: decrypt .. step_and_checkpoint (> 1x: fedline's int8 parts cost less than Flower)")
    print("flower faithful = flower_superlink + flower_serverapp + flower_fedavg: Flower 1.42's receive path from")
    print("  the serialised requests (bench/flower_receive.py); flower = the narrow baseline: parameters_to_ndarrays")
    print("  + its share of the legacy aggregate, from .npy bytes already out of their message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
