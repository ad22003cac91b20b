"""The one console command, ``fedline``, and its subcommands.

Each part of the product owns its subcommands in its own ``<part>/cli.py``
module, which defines ``register(subparsers)``; this module only discovers
them. Registration modules import nothing heavy (no torch, no onnxruntime):
handlers import what they need when they run, so ``fedline infer`` on a small
gateway never loads torch.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from fedline.config import ConfigError
from fedline.logs import setup_logging

PARTS = ("broker_bridge", "firmware_adapters", "models", "edge", "edge.inference", "aggregator", "fedline")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every part's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="fedline",
        description="Federated learning for factories: edge agents, aggregator, line inference.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-json", action="store_true", help="structured logs as JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for part in PARTS:
        name = f"{part}.commands" if part == "fedline" else f"{part}.cli"
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package of this part is not there
            found = False
        if not found:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, set up logging, run the handler, map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, json_lines=args.log_json)
    try:
        rc = args.func(args)
    except ConfigError as exc:
        print(f"fedline: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear last word instead of a bare traceback for known errors
        from broker_bridge.errors import FedlineError

        if isinstance(exc, FedlineError):
            logging.getLogger("fedline").debug("failed", exc_info=True)
            print(f"fedline: {exc}", file=sys.stderr)
            return 1
        raise
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
