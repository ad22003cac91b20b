"""``fedline plant``: one command starts a plant tier. Imports nothing heavy: the handler imports lazily."""

from __future__ import annotations

import argparse


def _run_plant(args: argparse.Namespace) -> int:
    from fedline.blas import one_blas_thread
    from fedline.threadname import run_named
    from plant.config import load_plant_config
    from plant.service import run_plant

    one_blas_thread()  # as `fedline aggregator`: its reduce's matrix products must not leave a BLAS thread spinning
    cfg = load_plant_config(args.config)
    run_named(run_plant(cfg), "fedline-plant")  # its threads by name in `top -H` and `ps` (fedline.threadname)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plant",
        help="run a plant aggregator (a site of the central federation over its own lines)",
        description="Aggregate the plant's lines with FedBuff on the plant broker, send the plant's combined "
        "delta to the central federation as one sealed update, and serve the lines the central model.",
    )
    p.add_argument("--config", required=True, help="plant.toml (plant/plant.example.toml)")
    p.set_defaults(func=_run_plant)
