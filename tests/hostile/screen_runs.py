"""A paired development-seed screen of ``[strategy]`` variants with the attack suite (issue 14, RELIABILITY.md
robust14e): per seed, optionally the like-for-like clean model, then each arm's attacks; one JSON line per run.

``python -m tests.hostile.screen_runs --seeds 200-239 --arm mda= --arm mean='robust = "none"' --attacks samples
[--clean]``: an arm is ``name=extra`` (the extra lines of the aggregator's ``[strategy]`` table, ``;`` between lines;
robust14e's arms were the options of commit d7d470c, reverted after the screen).
Each line: seed, arm, attack (``clean`` for the clean model), the final model's backdoor rate, late rate, ROC AUC,
distance from the clean model (``--clean``: relative to how far it moved), and the versions whose lineage gave the
fourth site a coefficient above 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path


async def screen(seeds: list[int], arms: list[tuple[str, str]], attacks: list[str], loops: int, clean: bool) -> None:
    from aggregator.config import load_config
    from models import build_model, shared_state
    from tests.hostile import attack_suite as s

    data = s.load_data()
    value = data.trigger_value("ood")
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            honest = None
            if clean:
                honest = await s.clean_reference(root / "clean", loops, 3, "", data, seed, True)
                spec = load_config(root / "clean" / "aggregator.toml").model
                moved = s.distance(honest.model, shared_state(build_model(spec, seed=3), spec))
                print(
                    json.dumps(
                        {
                            "seed": seed,
                            "arm": "-",
                            "attack": "clean",
                            "moved": moved,
                            **_rates(s, spec, honest, data, value),
                        }
                    ),
                    flush=True,
                )
            for arm, extra in arms:
                for attack in attacks:
                    work = root / f"{arm}-{attack}"
                    res = await s.run(work, attack, loops, extra.replace(";", "\n"), data, seed)
                    spec = load_config(work / "aggregator.toml").model
                    row = {"seed": seed, "arm": arm, "attack": attack, **_rates(s, spec, res, data, value)}
                    row["kept"] = [e["version"] for e in res.attacker_entries if e["weight"] > 0]
                    row["max_weight"] = max((e["weight"] for e in res.attacker_entries), default=0.0)
                    row["versions"], row["k"], row["reduces"] = res.versions, res.k, sorted(set(res.reduces))
                    if honest is not None:
                        row["distance"] = s.distance(res.model, honest.model)
                        row["relative"] = row["distance"] / moved
                    print(json.dumps(row), flush=True)


def _rates(s, spec, out, data, value) -> dict:  # type: ignore[no-untyped-def]
    return {
        "rate": s.backdoor_rate(spec, out.model, data, value),
        "late": s.late_rate(spec, out, data, value),
        "auc": s.roc_auc(spec, out.model, data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", required=True, help="a-b or a comma list")
    ap.add_argument("--arm", action="append", required=True, help="name=extra ([strategy] lines, ';' between)")
    ap.add_argument("--attacks", default="samples")
    ap.add_argument("--loops", type=int, default=6)
    ap.add_argument("--clean", action="store_true", help="run the like-for-like clean model per seed first")
    args = ap.parse_args()
    if "-" in args.seeds:
        lo, hi = (int(x) for x in args.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(x) for x in args.seeds.split(",")]
    arms = [tuple(a.split("=", 1)) if "=" in a else (a, "") for a in args.arm]
    asyncio.run(screen(seeds, arms, [a for a in args.attacks.split(",") if a], args.loops, args.clean))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
