"""``fedline demo``: the whole story on one machine. Registration only; the handler imports lazily."""

from __future__ import annotations

import argparse
from pathlib import Path


def _features(text: str) -> list[str]:
    cols = [c.strip() for c in text.split(",") if c.strip()]
    if not cols:
        raise argparse.ArgumentTypeError("expected comma-separated column names, e.g. A,B,C")
    return cols


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _split_site(text: str) -> tuple[str, int]:
    site, sep, n = text.partition("=")
    try:
        count = int(n)
    except ValueError:
        count = 0
    if not sep or not site or count < 1:
        raise argparse.ArgumentTypeError(f"expected SITE=N with N >= 1 (e.g. L=2), got {text!r}")
    return site, count


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a whole federation on this machine and write a report",
        description="Start a broker, an aggregator and one site per product type (or per value of "
        "--site-column), each with a simulated PLC, an edge agent and a line-inference "
        "service, as separate processes; cut one site off for a while; then compare the "
        "federated model with local-only and central training and audit the traffic.",
    )
    data = p.add_argument_group("data (default: the bundled AI4I 2020 file, one site per product type)")
    data.add_argument("--csv", help="bring your own data: a CSV file with a header row")
    data.add_argument("--site-column", help="column whose values name the sites")
    data.add_argument("--label", help="column to predict")
    data.add_argument(
        "--features", type=_features, help="comma-separated feature columns (default: every other numeric column)"
    )
    data.add_argument(
        "--task",
        choices=["classification", "regression"],
        help="default: classification if the label is 0/1, else regression",
    )
    data.add_argument(
        "--sites",
        type=int,
        dest="n_sites",
        metavar="N",
        help="split rows into N sites by a hash of the site column instead of one per value",
    )
    data.add_argument(
        "--group-column",
        metavar="COL",
        help="a unit (machine, engine, batch): test and validation rows are whole units, never "
        "rows of a unit also trained on (default: none; rows are then split by time, the "
        "last ones held out)",
    )
    data.add_argument(
        "--rows-independent",
        action="store_true",
        default=None,
        help="the rows are independent (no unit, no time order): hold out random rows, stratified "
        "by label (the bundled file's default)",
    )
    data.add_argument(
        "--split-site",
        type=_split_site,
        action="append",
        metavar="SITE=N",
        help="run SITE's rows as N plants of consecutive rows (repeatable; default for the bundled "
        "file: L=2, four sites in all; SITE=1 keeps it whole)",
    )
    data.add_argument("--max-rows-per-site", type=int, help="use only the first N rows of each site (shorter run)")
    run = p.add_argument_group("run")
    run.add_argument("--report", type=Path, default=Path("demo-report"), help="report folder (default ./demo-report)")
    run.add_argument(
        "--run-dir",
        type=Path,
        default=Path(".fedline-run"),
        help="keys, configs, state and logs of this run (default ./.fedline-run; replaced each run)",
    )
    run.add_argument("--broker", help="use an existing broker, e.g. mqtt://HOST:PORT, instead of a private one")
    run.add_argument(
        "--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version to speak to --broker (default 5)"
    )
    run.add_argument("--embedded", action="store_true", help="use the embedded broker even if mosquitto is installed")
    run.add_argument("--versions", type=int, default=None, help="global model versions to reach (default 15)")
    run.add_argument(
        "--round-seconds",
        type=_positive,
        default=None,
        help="each site trains and sends an update this often (default 3)",
    )
    run.add_argument("--intermittent", help="site that loses the broker for a while (default: the second site)")
    run.add_argument(
        "--cut-after-version",
        type=int,
        default=None,
        help="cut the intermittent site off once this global version exists (default 2)",
    )
    run.add_argument("--cut-seconds", type=_positive, default=None, help="how long that site is cut off (default 15)")
    run.add_argument("--epsilon", type=_positive, default=None, help="privacy budget ε of every site (default 8)")
    run.add_argument(
        "--splits",
        type=int,
        default=10,
        help="after the run, repeat the federated vs local-only comparison in-process on this many "
        "train/test splits (default 10; 0 skips it)",
    )
    run.add_argument(
        "--study-only",
        action="store_true",
        help="run only the split study, in-process (no broker, no processes): the cut-off site misses the "
        "two versions after --cut-after-version; writes split-study.json in the report folder",
    )
    run.add_argument("--timeout", type=_positive, default=270.0, help="stop the federation after this many seconds")
    run.add_argument("--no-progress", action="store_true", help="no live table (plain log lines)")
    run.add_argument(
        "--no-secure-aggregation",
        action="store_true",
        help="let the aggregator open each update (default with 3 or more sites: FedBuff buffers are "
        "secure-aggregation cohorts and the aggregator sees only their sums)",
    )
    run.add_argument(
        "--revoke-spare-after-version",
        type=int,
        default=None,
        metavar="N",
        help="enrol a spare site that runs nothing and revoke it once version N exists: the "
        "aggregator starts a new key epoch the spare cannot read",
    )
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import asyncio
    from dataclasses import replace

    from rich.console import Console

    from fedline.demo.runner import DemoOptions, run_demo
    from fedline.demo.workspace import Tuning

    tuning = Tuning()
    if args.versions is not None:
        if args.versions < 1:
            print("fedline demo: --versions must be at least 1")
            return 2
        tuning = replace(tuning, versions=args.versions)
    if args.splits < 0:
        print("fedline demo: --splits must be 0 or more")
        return 2
    if args.epsilon is not None:
        tuning = replace(tuning, epsilon=args.epsilon)
    if args.round_seconds is not None:
        tuning = replace(tuning, round_every_s=args.round_seconds)
    if args.no_secure_aggregation:
        tuning = replace(tuning, secure_aggregation=False)
    opts = DemoOptions(
        csv=args.csv,
        site_column=args.site_column,
        label=args.label,
        features=args.features,
        task=args.task,
        n_sites=args.n_sites,
        max_rows_per_site=args.max_rows_per_site,
        split_sites=dict(args.split_site) if args.split_site else None,
        group_column=args.group_column,
        rows_independent=args.rows_independent,
        report_dir=args.report,
        run_dir=args.run_dir,
        broker=args.broker,
        embedded=args.embedded,
        protocol=args.protocol,
        intermittent=args.intermittent,
        timeout_s=args.timeout,
        tuning=tuning,
        progress=not args.no_progress,
        splits=args.splits,
        revoke_spare_after_version=args.revoke_spare_after_version,
    )
    if args.cut_seconds is not None:
        opts.cut_s = args.cut_seconds
    if args.cut_after_version is not None:
        opts.cut_after_version = args.cut_after_version
    console = Console()
    if args.study_only:
        from fedline.demo.study_only import run_study_only

        return run_study_only(opts, console)
    report = asyncio.run(run_demo(opts, console))
    return _summary(console, report)


def _summary(console, report: dict) -> int:
    """Print the headline figures; exit 0 only when every claim of the report holds (1 when one does not)."""
    m = report["metric"]
    console.print()
    for s in report["sites"]:
        console.print(
            f"  site {s['site']:<10} {m}: local-only {_f(s['metric_local'])}  federated {_f(s['metric_federated'])}"
            f"  served {_f(s.get('metric_served'))} ({s.get('served_kind') or '-'})"
            f"  central {_f(s['metric_central'])}  ε {_f(s['epsilon'], 2)}/{s['epsilon_budget']:g}"
        )
    u = report["updates"]
    console.print(
        f"  updates applied {u['applied']}, stale {u['stale_dropped']}, rejected {u['rejected']}; "
        f"{report['model_versions']} versions; {report['bytes_on_wire'] / 1e6:.2f} MB on the wire; "
        f"raw records on the wire: {report['raw_records_on_wire']}; {report['duration_s']:.0f} s"
    )
    checks = report["checks"]
    study = (report.get("split_study") or {}).get("sites", {})
    for site, st in study.items():
        console.print(
            f"  split study, site {site}: served ahead of local-only in {st['served_wins']} of "
            f"{st['splits']} splits, mean {_f(st['mean_served'])} vs {_f(st['mean_local'])} "
            f"(sign test p = {st['served_sign_test_p']:.3f}, signed-rank p = {_f(st.get('served_wilcoxon_p'))})"
        )
    failed = [k for k, v in checks.items() if v is False]
    if failed:
        console.print(f"[red]claims that do not hold in this run: {', '.join(failed)} (see report.md)[/]")
        return 1
    console.print(
        "[green]every claim of the report holds[/]"
        + ("" if study else " (accuracy claims need the split study: --splits > 0)")
    )
    return 0


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"
