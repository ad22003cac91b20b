"""``fedline demo --study-only``: the demo's split study alone, in-process, without the federation's processes.

Why it exists: the study is what the demo's accuracy claims are judged on, and
measuring a change to the served-model pick or the fine-tune needs the study,
not the multi-process run in front of it (a broker, an aggregator and three
processes per site). This runs the same :func:`run_split_study` on the same
data options, with the cut-off site missing the two versions after
``--cut-after-version`` (what it misses in a typical demo run, where the cut
lasts until a version is made without it), prints each site's table, writes
``split-study.json`` in the report folder, and exits 1 when one of the two
accuracy claims that rest on the study fails
(:func:`fedline.demo.report.study_claims`).
"""

from __future__ import annotations

import json

from fedline.demo.report import _clean, study_claims


def run_study_only(opts, console) -> int:
    """Run the split study of ``opts`` (:class:`fedline.demo.runner.DemoOptions`); 0 when both claims hold."""
    from fedline.demo.data import load_demo_data
    from fedline.demo.runner import _load_kwargs
    from fedline.demo.splitstudy import run_split_study

    kwargs = _load_kwargs(opts)
    data = load_demo_data(**kwargs)
    names = [s.site for s in data.sites]
    intermittent = opts.intermittent or (names[1] if len(names) > 1 else names[0])
    absent = {intermittent: (opts.cut_after_version, opts.cut_after_version + 2)}
    smallest = min(data.sites, key=lambda s: s.rows).site  # as the report judges it
    console.print(
        f"split study only: {opts.splits} splits of {data.source.name}, sites {', '.join(names)}; "
        f"{intermittent} misses versions {absent[intermittent][0] + 1}-{absent[intermittent][1]}"
    )
    study = run_split_study(
        kwargs,
        opts.tuning,
        opts.batch_fraction,
        data.metric,
        opts.splits,
        absent,
        on_split=lambda seed, r: console.print(
            f"  split {seed}: "
            + ", ".join(
                f"{k} {v['local']:.3f}/{v['federated']:.3f}/{v['served']:.3f} ({v['served_kind']}"
                f"{'' if v.get('served_weight') is None else ' w ' + format(v['served_weight'], '.2f')}, {v['served_rule']})"
                for k, v in r.items()
            )
        ),
    )
    checks = study_claims(data.metric, study["sites"], smallest)
    opts.report_dir.mkdir(parents=True, exist_ok=True)
    path = opts.report_dir / "split-study.json"
    doc = {"metric": data.metric, "smallest_site": smallest, "checks": checks, "split_study": study}
    path.write_text(json.dumps(_clean(doc), indent=2) + "\n", encoding="utf-8")
    console.print(
        f"\n  {data.metric}: mean local-only / global / served, served wins over local-only, sign test p, signed-rank p"
    )
    for site, v in study["sites"].items():
        console.print(
            f"  {site:<10} {v['mean_local']:.3f} / {v['mean_federated']:.3f} / {v['mean_served']:.3f}  "
            f"wins {v['served_wins']}/{v['splits']}  p = {v['served_sign_test_p']:.3f} / {v['served_wilcoxon_p']:.3f}  "
            f"worse in {v['served_losses']} (worst {v['worst_served_gain']:+.3f})  kinds {v['served_kinds']}  "
            f"rules {v['served_rules']}"
        )
    console.print(f"  claims: {checks} ({path})")
    return 1 if any(v is False for v in checks.values()) else 0
