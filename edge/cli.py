"""``fedline edge --config site.toml``: run one site's edge agent.

Registration imports nothing heavy; the handler imports torch, Opacus and the
agent only when it runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "edge",
        help="run an edge agent: read plant data, train with DP-SGD, send sealed updates",
        description="Run one site's edge agent until SIGINT/SIGTERM. Every state (dataset, outbox, "
        "privacy accountant, last good model) lives in data_dir and survives restarts.",
    )
    p.add_argument("--config", "-c", required=True, help="the site's TOML file (site.toml)")
    p.add_argument("--check", action="store_true", help="validate the configuration and keys, then exit")
    p.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from edge.config import load_edge_config

    cfg = load_edge_config(args.config)
    if args.check:
        from edge.agent import EdgeAgent

        agent = EdgeAgent(cfg)
        agent.close()
        print(f"{args.config}: OK (site {cfg.site}, federation {cfg.federation}, model {cfg.model.kind})")
        return 0

    async def main() -> None:
        import gc
        import logging
        import time

        from fedline.logs import event
        from fedline.startup import collector_paused

        with collector_paused():  # the start's imports and state: collected never, not again and again
            from edge.agent import EdgeAgent
            from edge.trainer import preload

            agent = EdgeAgent(cfg)
            preload(cfg.dp is not None)  # what the first round would import inside itself
        # the CPU this process has spent so far (Python, torch, Opacus, the stores) and what the collector skips
        event(
            logging.getLogger("fedline.edge"),
            "edge.start_cost",
            site=cfg.site,
            cpu_s=round(time.process_time(), 3),
            frozen_objects=gc.get_freeze_count(),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await agent.run(stop)
        finally:
            agent.close()

    from fedline.threadname import run_named

    run_named(main(), "fedline-edge")  # its threads by name in `top -H` and `ps` (fedline.threadname)
    return 0
