"""ONNX export benchmark: torch's TorchScript exporter (what fedline uses) against its current one (dynamo).

Why it matters: an edge exports its line's model on every version it adopts, and the aggregator on every
version it publishes, on line-side PCs. For each model kind (the shapes of bench/edge.py) it measures the
CPU seconds of one export (the median of ``--repeats`` after one warm-up export, which pays the exporter's
one-off set-up) and the largest difference between ONNX Runtime and torch on 64 random inputs.

The dynamo exporter needs ``onnxscript`` (in the ``dev`` extra); without it, its columns say so.

    .venv/bin/python bench/onnx_export.py [--json] [--repeats 3] [--kinds mlp,gru]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KINDS: dict[str, dict[str, Any]] = {
    "mlp": {"kind": "mlp", "hidden": [32, 16]},
    "cnn1d": {"kind": "cnn1d", "hidden": [16, 16], "window": 16},
    "gru": {"kind": "gru", "hidden": [16], "window": 16},
    "autoencoder": {"kind": "autoencoder", "hidden": [8, 3], "task": "anomaly"},
}


def _dynamo_export(scorer: Any, example: Any) -> bytes:
    import torch

    program = torch.onnx.export(
        scorer,
        (example,),
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
        verbose=False,
    )
    assert program is not None
    return program.model_proto.SerializeToString()


def _cpu_seconds(fn: Any, repeats: int) -> tuple[float, bytes]:
    out = fn()  # warm-up: the exporter's one-off set-up
    times = []
    for _ in range(repeats):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return statistics.median(times), out


def _max_diff(onnx_bytes: bytes, scorer: Any, spec: Any) -> float:
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((64, *spec.input_shape)).astype(np.float32)
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        ref = scorer(torch.from_numpy(x)).numpy()
    return float(np.abs(y - ref).max())


def measure(repeats: int, kinds: list[str]) -> dict[str, Any]:
    import torch

    from models import ModelSpec, build_model, export_onnx
    from models.nets import Scorer, unwrap

    torch.set_num_threads(1)
    logging.getLogger("torch").setLevel(logging.ERROR)  # the dynamo exporter logs skipped torchvision ops
    try:
        import onnxscript  # noqa: F401

        have_dynamo = True
    except ImportError:
        have_dynamo = False
    rows: dict[str, Any] = {}
    for name in kinds:
        kw = KINDS[name]
        spec = ModelSpec(n_features=5, **kw)
        model = build_model(spec, seed=0).eval()
        scorer = Scorer(copy.deepcopy(unwrap(model)).float(), spec).eval()
        example = torch.zeros((2, *spec.input_shape))
        ts_s, ts_bytes = _cpu_seconds(lambda model=model, spec=spec: export_onnx(model, spec), repeats)
        row: dict[str, Any] = {
            "torchscript_cpu_s": round(ts_s, 4),
            "torchscript_max_diff": _max_diff(ts_bytes, scorer, spec),
        }
        if have_dynamo:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the bench reports times, not torch's own notes
                dy_s, dy_bytes = _cpu_seconds(
                    lambda scorer=scorer, example=example: _dynamo_export(scorer, example), repeats
                )
            row.update(
                dynamo_cpu_s=round(dy_s, 4),
                dynamo_max_diff=_max_diff(dy_bytes, scorer, spec),
                dynamo_over_torchscript=round(dy_s / ts_s, 1) if ts_s > 0 else None,
            )
        rows[name] = row
    return {"repeats": repeats, "dynamo_available": have_dynamo, "kinds": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    args = ap.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        ap.error(f"--kinds: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}")
    result = measure(args.repeats, kinds)
    if args.json:
        print(json.dumps(result))
        return
    print(f"ONNX export, CPU seconds per export (median of {args.repeats}, after a warm-up), one torch thread")
    print(f"{'kind':<12} {'torchscript':>12} {'dynamo':>10} {'ratio':>7} {'max |onnx-torch|':>20}")
    for name, r in result["kinds"].items():
        dy = f"{r['dynamo_cpu_s']:.3f}" if "dynamo_cpu_s" in r else "n/a"
        ratio = f"{r['dynamo_over_torchscript']}×" if r.get("dynamo_over_torchscript") else "n/a"
        diffs = f"{r['torchscript_max_diff']:.1e}" + (
            f" / {r['dynamo_max_diff']:.1e}" if "dynamo_max_diff" in r else ""
        )
        print(f"{name:<12} {r['torchscript_cpu_s']:>12.3f} {dy:>10} {ratio:>7} {diffs:>20}")
    if not result["dynamo_available"]:
        print("dynamo: onnxscript is not installed (pip install -e '.[dev]')")


if __name__ == "__main__":
    main()
