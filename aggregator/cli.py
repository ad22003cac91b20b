"""``fedline aggregator`` and ``fedline status``. Imports nothing heavy: handlers import lazily."""

from __future__ import annotations

import argparse


def _run_aggregator(args: argparse.Namespace) -> int:
    from fedline.startup import StartPause

    # the start's imports, core, preloads and grants: collected never, not walked again and again (fedline.startup);
    # the service ends the pause once it has started (aggregator.service, "aggregator.start_cost")
    pause = StartPause()
    from aggregator.config import load_config
    from aggregator.service import run_aggregator
    from fedline.blas import one_blas_thread
    from fedline.heap import keep_freed_buffers
    from fedline.threadname import run_named

    cfg = load_config(args.config)
    keep_freed_buffers()  # update-sized buffers reused, not page-faulted in again for every update (fedline.heap)
    one_blas_thread()  # the opening threads are the parallelism: no spinning BLAS threads beside them (fedline.blas)
    # run_named: the event loop's thread as `top -H` and `ps` show it (also the process's name there), named
    # after the imports, so threads they started (OpenBLAS's) keep the interpreter's name (fedline.threadname)
    if args.worker is not None:  # one of the [intake] workers, not the aggregator itself
        from aggregator.intake_worker import run_worker

        pause.end()
        run_named(run_worker(cfg, args.worker, args.password_file), "fedline-intake")
        return 0
    run_named(run_aggregator(cfg, start=pause), "fedline-agg")
    return 0


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from aggregator.status import collect, load_status_config, render

    cfg = load_status_config(args.config)
    view = asyncio.run(collect(cfg, args.listen))
    if args.json:
        import json

        from aggregator.status_json import status_document

        print(json.dumps(status_document(view, args.listen), sort_keys=True))
    else:
        print(render(view), end="")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "aggregator",
        help="run the asynchronous aggregator",
        description="Receive sealed updates, reduce them into new global versions, "
        "publish signed manifests, weights and ONNX.",
    )
    p.add_argument("--config", required=True, help="aggregator.toml")
    p.add_argument(
        "--worker",
        type=int,
        metavar="I",
        help="run intake worker I (0 ... [intake] workers - 1) of this aggregator instead: it opens its share of "
        "the sites' updates and forwards them to the aggregator (docs/architecture.md, 'Intake workers')",
    )
    p.add_argument(
        "--password-file",
        help="the intake worker's broker password (default: intake-<I>.password next to [broker] password_file)",
    )
    p.set_defaults(func=_run_aggregator)
    s = subparsers.add_parser("status", help="show the federation from the broker: sites, ε, versions, receipts")
    s.add_argument(
        "--config",
        required=True,
        help="a TOML with federation and [broker] (observer credentials); the aggregator's file works",
    )
    s.add_argument("--listen", type=float, default=3.0, help="seconds to count receipts (default 3)")
    s.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document (schema: docs/architecture.md, 'fedline status --json')",
    )
    s.set_defaults(func=_status)
