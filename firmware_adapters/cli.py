"""``fedline plc-sim``: serve a CSV file as a live Modbus TCP PLC.

Registration only; the handler imports pymodbus when it runs.
"""
from __future__ import annotations

import argparse


def _filter(text: str) -> tuple[str, str]:
    col, sep, value = text.partition("=")
    if not sep or not col:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE, got {text!r}")
    return col, value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plc-sim",
        help="serve a CSV file as a Modbus TCP PLC, one row per tick",
        description="Serve a CSV file as a live Modbus TCP server (pymodbus), advancing one row "
        "per tick, with the register map a modbus_tcp source reads.",
    )
    p.add_argument("--csv", required=True, help="CSV file with a header row")
    p.add_argument("--map", required=True, help="register map TOML (e.g. firmware_adapters/maps/ai4i2020.toml)")
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--rate", type=float, default=1.0, help="rows per second (default 1; 0 = as fast as possible)")
    p.add_argument("--filter", type=_filter, action="append", default=[], metavar="COLUMN=VALUE",
                   help="serve only rows where COLUMN equals VALUE (repeatable), e.g. Type=L")
    p.add_argument("--once", action="store_true", help="stop at the end of the file instead of looping")
    p.set_defaults(func=_plc_sim)


def _plc_sim(args: argparse.Namespace) -> int:
    import asyncio

    from firmware_adapters.plc_sim import PlcSimulator
    from firmware_adapters.registers import load_register_map

    regmap = load_register_map(args.map)
    sim = PlcSimulator(
        args.csv, regmap, host=args.host, port=args.port, rate_hz=args.rate,
        filters=dict(args.filter), loop=not args.once, map_file=args.map,
    )

    async def main() -> None:
        await sim.start()
        print(f"plc-sim: serving {args.csv} on {args.host}:{args.port} at {args.rate} rows/s", flush=True)
        try:
            await sim.run()
        finally:
            await sim.stop()

    asyncio.run(main())
    return 0
