"""The one console command, ``fedline``, and its subcommands.

Each part of the product owns its subcommands in its own ``<part>/cli.py``
module, which defines ``register(subparsers)``; this module only discovers
them. Registration modules import nothing heavy (no torch, no onnxruntime):
handlers import what they need when they run, so ``fedline infer`` on a small
gateway never loads torch.

Exit codes (sysexits.h, documented in docs/architecture.md): 0 ok, 1 runtime
failure, 2 usage (argparse), 78 EX_CONFIG for a configuration error (a bad
TOML key, a key or enrollment file that is missing or too open, a broker
option that would weaken it), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from fedline.config import ConfigError
from fedline.logs import setup_logging

EX_OK, EX_RUNTIME, EX_USAGE, EX_CONFIG = 0, 1, 2, 78
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

PARTS = ("broker_bridge", "firmware_adapters", "models", "edge", "edge.inference", "aggregator", "plant", "fedline")


def _version() -> str:
    """The installed distribution's version (pyproject.toml's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedline")
    except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "unknown (not installed)"


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every part's subcommands registered."""
    parser = argparse.ArgumentParser(
        prog="fedline",
        description="Federated learning for factories: edge agents, aggregator, line inference.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=_log_level,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
    )
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
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear last word instead of a bare traceback for known errors
        from broker_bridge.errors import FedlineError, KeyFileError

        if isinstance(exc, KeyFileError):  # a key or enrollment file the configuration names is wrong
            print(f"fedline: configuration error: {exc}", file=sys.stderr)
            return EX_CONFIG
        if isinstance(exc, FedlineError):
            logging.getLogger("fedline").debug("failed", exc_info=True)
            print(f"fedline: {exc}", file=sys.stderr)
            return 1
        raise
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
