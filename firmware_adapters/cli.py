"""``fedline plc-sim`` (serve a CSV file as a live Modbus TCP PLC),
``fedline sources`` (validate a site file's ``[[sources]]`` and print live samples) and
``fedline opcua-cert`` (the OPC UA source's client certificate).

Registration only; handlers import the protocol libraries when they run.
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
    p.add_argument(
        "--filter",
        type=_filter,
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="serve only rows where COLUMN equals VALUE (repeatable), e.g. Type=L",
    )
    p.add_argument("--once", action="store_true", help="stop at the end of the file instead of looping")
    p.set_defaults(func=_plc_sim)

    s = subparsers.add_parser(
        "sources",
        help="check a site file's [[sources]] and print live samples",
        description="Validate every [[sources]] table of a TOML file (errors name the file and key), "
        "then read samples from them and print one line per sample, and the counters at the end.",
    )
    s.add_argument("--config", required=True, help="site TOML file with [[sources]] tables")
    s.add_argument("--count", type=int, default=10, help="samples to print per source (default 10; 0 = forever)")
    s.add_argument("--check", action="store_true", help="only validate the configuration, read nothing")
    s.set_defaults(func=_sources)

    c = subparsers.add_parser(
        "opcua-cert",
        help="make the OPC UA source's client certificate and private key",
        description="Write a self-signed OPC UA application certificate (DER) and its private key "
        "(PEM, mode 0600) for an opcua source's `certificate` and `private_key`. The OPC UA server "
        "must then trust the certificate (copy it into its trusted folder).",
    )
    c.add_argument("--out", required=True, help="folder to write NAME.der and NAME.pem into")
    c.add_argument("--name", default="client", help="file name stem (default client)")
    c.add_argument("--uri", default=None, help="application URI (default urn:<host>:fedline:opcua-client)")
    c.add_argument("--hostname", default=None, help="DNS name in the certificate (default this host's name)")
    c.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    c.add_argument("--force", action="store_true", help="replace existing files")
    c.set_defaults(func=_opcua_cert)


def _plc_sim(args: argparse.Namespace) -> int:
    import asyncio

    from firmware_adapters.plc_sim import PlcSimulator
    from firmware_adapters.registers import load_register_map

    regmap = load_register_map(args.map)
    sim = PlcSimulator(
        args.csv,
        regmap,
        host=args.host,
        port=args.port,
        rate_hz=args.rate,
        filters=dict(args.filter),
        loop=not args.once,
        map_file=args.map,
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


def _opcua_cert(args: argparse.Namespace) -> int:
    import sys

    from firmware_adapters.opcua_cert import make_client_certificate

    try:
        made = make_client_certificate(
            args.out, name=args.name, application_uri=args.uri, hostname=args.hostname, days=args.days, force=args.force
        )
    except (FileExistsError, ValueError) as exc:
        print(f"fedline opcua-cert: {exc}", file=sys.stderr)
        return 1
    print(
        f'certificate = "{made.certificate}"\nprivate_key = "{made.private_key}"\n'
        f"# application URI {made.application_uri}: have the OPC UA server trust {made.certificate}"
    )
    return 0


def _sources(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from fedline.config import ConfigError, load_toml
    from firmware_adapters import build_sources

    doc = load_toml(args.config)
    tables = doc.get("sources")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(args.config, "sources", "expected one or more [[sources]] tables")
    sources = build_sources(tables, file=args.config)
    for src in sources:
        print(f"{src.name}: {src.cfg.kind} ok")
    if args.check:
        return 0

    async def read(src) -> None:
        n = 0
        agen = src.__aiter__()
        try:
            async for sample in agen:
                values = json.dumps(dict(sample.values), default=str)
                print(
                    f"{sample.ts:.3f} {sample.source} {sample.quality}{' historical' if sample.historical else ''} {values}"
                    + (f" error={sample.error}" if sample.error else ""),
                    flush=True,
                )
                n += 1
                if args.count and n >= args.count:
                    return
        finally:
            await agen.aclose()
            print(f"{src.name}: {src.stats.as_dict()}", flush=True)

    async def main() -> None:
        await asyncio.gather(*(read(src) for src in sources))

    asyncio.run(main())
    return 0
