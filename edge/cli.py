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
        from edge.agent import EdgeAgent

        agent = EdgeAgent(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await agent.run(stop)
        finally:
            agent.close()

    asyncio.run(main())
    return 0
