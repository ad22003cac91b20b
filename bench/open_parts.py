"""Where one update's opening goes, part by part, beside the physical limit's parts on the same updates.

Why: issue 19 measures the aggregator's intake against "the limit" (decrypt + verify + axpy in one loop,
``bench/aggregator.py``). The opener does the limit's decrypt and verify plus what the limit leaves out
(enrollment, the header's schema, the tensors' layout, the norm bound, non-finite values). This times each
part of both on the same sealed updates, interleaved update by update in one thread (the order of the two
alternated), so a part's difference is read from medians taken over the same minutes of a shared machine.

Usage: ``python bench/open_parts.py [--params 100000] [--updates 60] [--passes 6] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from nacl.signing import VerifyKey  # noqa: E402

from aggregator import robust  # noqa: E402
from aggregator.aligned import aligned  # noqa: E402
from aggregator.opener import _float32_bytes, open_update  # noqa: E402
from aggregator.validate import check_update  # noqa: E402
from broker_bridge import envelope, quantised  # noqa: E402
from broker_bridge.envelope import UpdateHeader  # noqa: E402
from broker_bridge.sealopen import seal_open  # noqa: E402
from fedline.blas import one_blas_thread  # noqa: E402
from fedline.heap import keep_freed_buffers  # noqa: E402


def _limit_parts(box: Any, blob: bytes, acc: dict[str, np.ndarray], w: float, t: dict[str, list[int]]) -> None:
    """``bench/aggregator.py``'s ``open_and_add``, each part timed."""
    c = time.perf_counter_ns
    tail = sum(v.nbytes for v in acc.values())  # onto an aligned address, as open_and_add opens it
    t0 = c()
    inner = seal_open(memoryview(blob)[4:], box, place=envelope._tensor_data_at, tail=tail)
    t1 = c()
    slen = inner[4]
    site, vk, sig = inner[5 : 5 + slen], bytes(inner[5 + slen : 37 + slen]), bytes(inner[37 + slen : 101 + slen])
    plain = inner[101 + slen :]
    VerifyKey(vk).verify(envelope.digest(site, envelope._UPDATE_DOMAIN, b"\x00", plain), sig)
    t2 = c()
    _, rest = envelope._decode_update_header(plain)
    tensors = envelope.decode_tensors(rest)
    t3 = c()
    for k, a in tensors.items():
        robust.add_scaled(acc[k], a, w)
    t4 = c()
    for name, a, b in (("L seal_open", t0, t1), ("L signature", t1, t2), ("L parse", t2, t3), ("L axpy", t3, t4)):
        t[name].append(b - a)
    t["L total"].append(t4 - t0)


def _fedline_parts(core: Any, blob: bytes, t: dict[str, list[int]]) -> None:
    """``aggregator.opener.open_update``'s float32 path, each part timed (the same calls, in the same order)."""
    c = time.perf_counter_ns
    keys, enrollment, reference = core.keys, core.enrollment, core.reference
    view = memoryview(blob)
    t0 = c()
    inner = seal_open(view[4:], keys.box_key, place=envelope._tensor_data_at, tail=_float32_bytes(reference))
    t1 = c()
    site, plain = envelope._signed_by(inner, enrollment)
    t2 = c()
    doc, rest = envelope._decode_update_header(plain, site)
    header = UpdateHeader.from_dict(doc)
    t3 = c()
    tensors = aligned(quantised.read(envelope.decode_tensors(rest, "schema"), header.encoding))
    t4 = c()
    norm = check_update(header, tensors, reference, core.cfg.validation, core.max_norm)
    t5 = c()
    assert norm > 0
    parts = (("F seal_open", t0, t1), ("F signature", t1, t2), ("F header", t2, t3), ("F views", t3, t4))
    for name, a, b in (*parts, ("F validate", t4, t5)):
        t[name].append(b - a)
    t["F total"].append(t5 - t0)


def _whole_open(core: Any, blob: bytes, t: dict[str, list[int]]) -> None:
    """The opener itself, untouched (checks the parts above add up to it)."""
    c = time.perf_counter_ns
    t0 = c()
    op = open_update(
        blob,
        cfg=core.cfg,
        keys=core.keys,
        enrollment=core.enrollment,
        reference=core.reference,
        max_norm=core.max_norm,
    )
    t["F open_update"].append(c() - t0)
    assert op.reason is None, (op.reason, op.detail)


def _bench_module() -> Any:
    """``bench/aggregator.py`` loaded under another name (its own would shadow the ``aggregator`` package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aggregator_bench", Path(__file__).with_name("aggregator.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while they are made
    spec.loader.exec_module(mod)
    return mod


def run(params: int, updates: int, passes: int) -> dict[str, float]:
    """Median microseconds per update of each part, over ``passes`` passes of ``updates`` updates."""
    bench = _bench_module()
    with tempfile.TemporaryDirectory(prefix="fedline-open-parts-") as tmp:
        core, agg, sites = bench.setup(Path(tmp), params, 10, 2, "fedbuff")
        _, by_encoding, samples = bench.make_updates(core, agg, sites, updates)
        blobs = by_encoding["float32"]
        acc = {k: np.zeros_like(v) for k, v in core.model.items()}
        t: dict[str, list[int]] = {
            k: []
            for k in (
                "L seal_open",
                "L signature",
                "L parse",
                "L axpy",
                "L total",
                "F seal_open",
                "F signature",
                "F header",
                "F views",
                "F validate",
                "F total",
                "F open_update",
            )
        }
        steps: list[Callable[[bytes, float], None]] = [
            lambda b, w: _limit_parts(agg.box_key, b, acc, w, t),
            lambda b, w: _fedline_parts(core, b, t),
            lambda b, w: _whole_open(core, b, t),
        ]
        for p in range(passes + 1):
            for i, (blob, n) in enumerate(zip(blobs, samples)):
                for step in steps if (i + p) % 2 == 0 else steps[::-1]:
                    step(blob, float(n))
            if p == 0:  # a warm-up pass, not counted
                for v in t.values():
                    v.clear()
        core.close()
        return {k: statistics.median(v) / 1e3 for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--updates", type=int, default=60)
    ap.add_argument("--passes", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    keep_freed_buffers()  # as `fedline aggregator` runs
    one_blas_thread()
    out = run(args.params, args.updates, args.passes)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>14} {v:9.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
