"""What MDA sees, tensor by tensor (issue 14, RELIABILITY.md robust14d): per version of an attack-suite run, each
slot's distance from the other slots in every tensor of the deltas MDA chose among (after ``norm_to_median``).

Why: on the report seeds MDA kept the named attacker in a few late versions (robust14c). The reading to check:
late in training the honest deltas are short and alike, and the attacker's, rescaled to their length, differs
from them mostly in the few weights that read the trigger feature, so the whole-vector L2 distance no longer
marks it. This probe runs the suite's own :func:`tests.hostile.attack_suite.run` with
:meth:`aggregator.strategies.base.Strategy.combine` wrapped to record, per version, the sites in buffer order, the
kept subset, and per tensor the slots' pairwise L2 distances and cosines; it changes nothing in the reduce.

``python -m tests.hostile.mda_probe --seeds 180-199 [--attack samples] [--json out.json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import numpy as np


def tensor_distances(deltas: list[dict[str, np.ndarray]]) -> dict[str, list[list[float]]]:
    """Per tensor, the ``n × n`` pairwise L2 distances of the slots' values in it; ``"all"``: the whole vector; and
    per column of the first 2-D tensor (the first layer's weights, one column per input feature), ``"<name>[:,j]"``."""
    names = list(deltas[0])
    out: dict[str, list[list[float]]] = {}
    first = next((k for k in names if np.asarray(deltas[0][k]).ndim == 2), None)
    if first is not None:
        for j in range(np.asarray(deltas[0][first]).shape[1]):
            rows = np.stack([np.asarray(d[first], np.float64)[:, j] for d in deltas])
            diff = rows[:, None, :] - rows[None, :, :]
            out[f"{first}[:,{j}]"] = np.sqrt((diff**2).sum(axis=2)).tolist()
    for name in [*names, "all"]:
        if name == "all":
            rows = np.stack([np.concatenate([np.asarray(d[k], np.float64).ravel() for k in names]) for d in deltas])
        else:
            rows = np.stack([np.asarray(d[name], np.float64).ravel() for d in deltas])
        diff = rows[:, None, :] - rows[None, :, :]
        out[name] = np.sqrt((diff**2).sum(axis=2)).tolist()
    return out


def probe(seed: int, attack: str, loops: int) -> dict:
    from aggregator.strategies import base
    from tests.hostile import attack_suite as s

    records: list[dict] = []
    original = base.Strategy.combine

    def combine(self, deltas, updates, model, center=None):  # type: ignore[no-untyped-def]
        step = original(self, deltas, updates, model, center)
        dense = [{k: np.asarray(d[k], np.float32) for k in d} for d in deltas]
        records.append(
            {
                "sites": [u.site for u in updates],
                "weights": [float(u.weight) for u in updates],
                "norms": [
                    float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in d.values()))) for d in dense
                ],
                "dist": tensor_distances(dense),
                "tensor_norms": {
                    k: [float(np.linalg.norm(np.asarray(d[k], np.float64))) for d in dense] for k in dense[0]
                },
            }
        )
        return step

    base.Strategy.combine = combine  # type: ignore[method-assign]
    try:
        data = s.load_data()
        with tempfile.TemporaryDirectory() as tmp:
            out = asyncio.run(s.run(Path(tmp), attack, loops, data=data, seed=seed))
    finally:
        base.Strategy.combine = original  # type: ignore[method-assign]
    return {"seed": seed, "attack": attack, "records": records, "versions": out.versions}


def summarise(rec: dict, attacker: str) -> dict:
    """Per tensor, the attacker's mean distance to the others over the largest honest slot's mean distance to the
    others (> 1: the attacker is the farthest slot in that tensor)."""
    sites = rec["sites"]
    out = {"kept": rec["weights"][sites.index(attacker)] > 0 if attacker in sites else None}
    for name, dist in rec["dist"].items():
        d = np.array(dist)
        n = len(sites)
        mean_to_others = d.sum(axis=1) / max(n - 1, 1)
        if attacker not in sites:
            continue
        a = sites.index(attacker)
        honest = [mean_to_others[i] for i in range(n) if i != a]
        out[name] = float(mean_to_others[a] / max(honest))
    return out


def normalised(dist: np.ndarray) -> np.ndarray:
    """``dist`` divided by its median off-diagonal entry (the tensor's typical pairwise distance; 1 if that is 0)."""
    n = dist.shape[0]
    med = float(np.median(dist[np.triu_indices(n, 1)]))
    return dist / med if med > 0 else dist


def cosine_distances(dist: np.ndarray, norms: list[float]) -> np.ndarray:
    """``1 − cos`` between slots from their distances and norms: ``cos_ij = (‖a‖² + ‖b‖² − d²) / (2 ‖a‖ ‖b‖)``."""
    r = np.asarray(norms, np.float64)
    denom = np.maximum(2.0 * np.outer(r, r), 1e-30)
    out = 1.0 - (r[:, None] ** 2 + r[None, :] ** 2 - dist**2) / denom
    np.fill_diagonal(out, 0.0)
    return out


def rules(rec: dict) -> dict[str, np.ndarray]:
    """The selection distances screened (RELIABILITY.md, robust14d): MDA's own (``all``, whole-vector L2), and
    layer-wise variants: each tensor's L2 (or ``1 − cos``) distances normalised by their median pairwise value,
    combined by sum or max; the same with the first layer's weights split per input column (also unnormalised: the
    largest group distance, or the whole-vector distance plus the largest input column's); one tensor alone."""
    dist = {k: np.asarray(v, np.float64) for k, v in rec["dist"].items()}
    tensors = [k for k in dist if k != "all" and "[:," not in k]
    cols = [k for k in dist if "[:," in k]
    first = cols[0].split("[")[0] if cols else None
    groups = cols + [k for k in tensors if k != first]
    out = {"all (MDA now)": dist["all"]}
    for label, keys in (("tensor", tensors), ("column", groups)):
        mats = [normalised(dist[k]) for k in keys]
        out[f"{label} L2 sum"] = np.sum(mats, axis=0)
        out[f"{label} L2 max"] = np.max(mats, axis=0)
    if "tensor_norms" in rec:
        cos = [normalised(cosine_distances(dist[k], rec["tensor_norms"][k])) for k in tensors]
        out["tensor cos sum"] = np.sum(cos, axis=0)
        out["tensor cos max"] = np.max(cos, axis=0)
    if cols:  # unnormalised: each group's own L2, so a small tensor keeps its small say
        out["column L2 max, unnormalised"] = np.max([dist[k] for k in groups], axis=0)
        out["whole + largest column L2"] = dist["all"] + np.max([dist[k] for k in cols], axis=0)
    if first is not None:
        out["first layer alone"] = dist[first]
        out["trigger column alone (oracle)"] = dist[cols[0]]
    return out


def score_left_out(dist: np.ndarray, f: int = 1) -> dict[str, int]:
    """The slot a score-based rule leaves out (``f = 1``), on whole-vector distances: the largest summed distance
    to the others (``sum``), or the largest Krum score (Blanchard et al., NeurIPS 2017: the summed squared
    distances to the ``n − f − 2`` nearest others; ``krum``)."""
    n = dist.shape[0]
    near = max(n - f - 2, 1)
    krum = [float(np.sort(np.delete(dist[i] ** 2, i))[:near].sum()) for i in range(n)]
    return {"sum": int(np.argmax(dist.sum(axis=1))), "krum": int(np.argmax(krum))}


def screen(dump: list[dict], attacker: str, f: int = 1) -> dict[str, dict[str, int]]:
    """Per rule, in how many recorded versions MDA with that distance would keep ``attacker`` (all versions, and
    versions 5 on), along the recorded runs (each version's deltas as the default reduce saw them)."""
    from aggregator import mda

    counts: dict[str, dict[str, int]] = {}
    for run in dump:
        for v, rec in enumerate(run["records"], start=1):
            if attacker not in rec["sites"]:
                continue
            a = rec["sites"].index(attacker)
            out = score_left_out(np.asarray(rec["dist"]["all"], np.float64), f)
            keeps = {name: a in mda.subset(d, f) for name, d in rules(rec).items()}
            keeps |= {f"all, {k} score, largest left out": i != a for k, i in out.items()}
            for name, kept in keeps.items():
                c = counts.setdefault(name, {"versions": 0, "kept": 0, "late": 0, "late_kept": 0})
                c["versions"] += 1
                c["kept"] += kept
                c["late"] += v >= 5
                c["late_kept"] += kept and v >= 5
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="180-199", help="a range a-b or a comma list")
    ap.add_argument("--attack", default="samples")
    ap.add_argument("--loops", type=int, default=6)
    ap.add_argument("--json", default="", help="write every record here")
    ap.add_argument("--screen", default="", help="no runs: screen the selection rules on records written by --json")
    args = ap.parse_args()
    if args.screen:
        from tests.hostile.attack_suite import ATTACKER

        for name, c in screen(json.loads(Path(args.screen).read_text()), ATTACKER).items():
            print(
                f"{name:32s} attacker kept in {c['kept']}/{c['versions']} versions, {c['late_kept']}/{c['late']} from v5"
            )
        return
    if "-" in args.seeds:
        lo, hi = (int(x) for x in args.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(x) for x in args.seeds.split(",")]
    from tests.hostile import attack_suite as s

    dump = []
    for seed in seeds:
        r = probe(seed, args.attack, args.loops)
        for v, rec in enumerate(r["records"], start=1):
            sm = summarise(rec, s.ATTACKER)
            ratios = " ".join(f"{k}={x:.2f}" for k, x in sm.items() if k != "kept")
            print(
                f"seed {seed} v{v} kept={sm['kept']} norms={[round(x, 3) for x in rec['norms']]} {ratios}", flush=True
            )
        dump.append({"seed": seed, "records": r["records"]})
    if args.json:
        Path(args.json).write_text(json.dumps(dump))


if __name__ == "__main__":
    main()
