"""``fedline infer``: the line-inference service, and ``--rollback`` to the previous good model.

Registration imports nothing heavy; the handler imports onnxruntime (never torch).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="score live line data with ONNX Runtime, hot-reloading new models",
        description="Line inference: read the configured sources, score rows with the model in "
        "service, publish predictions; take new models from the signed manifest or the "
        "model directory after probe and canary checks.",
    )
    p.add_argument("--config", required=True, help="the line's TOML file (line.toml)")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="put the previous good model back in service (the running service applies "
        "it within poll_s; with none running, the saved state is changed) and exit",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=None,
        help="with --rollback: seconds to wait for a running service (default 2 x poll_s + 1)",
    )
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    import time

    from edge.inference.config import load_infer_config
    from edge.inference.state import StateDir

    cfg = load_infer_config(args.config)
    if not args.rollback:
        from edge.inference.service import run_service
        from fedline.threadname import run_named

        run_named(run_service(cfg), "fedline-line")  # its threads by name in `top -H` and `ps`
        return 0
    state = StateDir(cfg.path(cfg.line.state_dir))
    before = state.load()
    if before.current is None or before.previous is None:
        print(
            f"fedline infer: nothing to roll back to in {state.path} "
            f"(serving {before.current.version if before.current else 'nothing'}, no previous model)"
        )
        return 1
    state.request_rollback()
    deadline = time.monotonic() + (args.wait if args.wait is not None else 2 * cfg.line.poll_s + 1)
    while time.monotonic() < deadline:
        if not state.rollback_requested():
            after = state.load()
            print(
                f"fedline infer: the running service rolled back from version {before.current.version} "
                f"to {after.current.version if after.current else '?'}"
            )
            return 0
        time.sleep(0.1)
    done = state.rollback_offline()
    if done is None:
        print("fedline infer: nothing to roll back to")
        return 1
    print(
        f"fedline infer: no running service answered; saved state now serves version "
        f"{done.current.version if done.current else '?'} (version {before.current.version} is blocked)"
    )
    return 0
