"""``fedline keys`` and ``fedline broker``: enrol parties and configure the broker."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker_bridge.bridge import BridgeConfig
    from broker_bridge.keys import PublicKeys


from broker_bridge.mosquitto import (
    DEFAULT_AUTOSAVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PACKET,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_MESSAGES,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="create key pairs, export public keys, build the enrollment file")
    ks = keys.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    new = ks.add_parser("new", help="create a site's or the aggregator's key pair (mode 0600)")
    new.add_argument("--role", choices=["site", "aggregator", "worker"], required=True)
    new.add_argument("--id", required=True, help="site id (or aggregator name)")
    new.add_argument(
        "--out", required=True, type=Path, help="private key file to write; <out>.pub.json gets the public part"
    )
    new.add_argument("--force", action="store_true", help="overwrite an existing key file")
    new.set_defaults(func=_keys_new)
    pub = ks.add_parser("public", help="export the public part of a private key file")
    pub.add_argument("key", type=Path)
    pub.add_argument("--out", type=Path, help="write here instead of stdout")
    pub.set_defaults(func=_keys_public)
    enr = ks.add_parser("enroll", help="build or extend the federation's enrollment file")
    enr.add_argument("--federation", required=True)
    enr.add_argument("--aggregator", type=Path, required=True, help="aggregator public key (.pub.json) or key file")
    enr.add_argument("--site", type=Path, action="append", default=[], help="site public key file (repeat)")
    enr.add_argument("--out", type=Path, required=True, help="enrollment file to write (extended if it exists)")
    enr.set_defaults(func=_keys_enroll)
    rev = ks.add_parser("revoke", help="remove a site from the enrollment file")
    rev.add_argument("--enrollment", type=Path, required=True)
    rev.add_argument("--site", required=True)
    rev.set_defaults(func=_keys_revoke)
    cmd = ks.add_parser("command", help="sign a line command (rollback) to publish on a line's command_topic")
    cmd.add_argument("command", choices=["rollback"])
    cmd.add_argument("--key", type=Path, required=True, help="the site's or the aggregator's private key file")
    cmd.add_argument("--federation", required=True)
    cmd.add_argument("--site", required=True, help="the site whose lines take it")
    cmd.add_argument("--out", type=Path, required=True, help="file to write (publish it, e.g. mosquitto_pub -f)")
    cmd.set_defaults(func=_keys_command)
    opening = ks.add_parser(
        "opening-key", help="copy the aggregator's X25519 secret without its signing key, for intake workers"
    )
    opening.add_argument("--key", type=Path, required=True, help="the aggregator's private key file")
    opening.add_argument("--out", type=Path, required=True, help="opening-key file to write (mode 0600)")
    opening.add_argument("--force", action="store_true", help="overwrite an existing file")
    opening.set_defaults(func=_keys_opening)
    show = ks.add_parser("show", help="check and print a key or enrollment file")
    show.add_argument("file", type=Path)
    show.set_defaults(func=_keys_show)

    broker = sub.add_parser("broker", help="Mosquitto configuration, or an embedded broker for a laptop")
    bs = broker.add_subparsers(dest="broker_cmd", required=True, metavar="ACTION")
    conf = bs.add_parser("config", help="write mosquitto.conf, ACL, password file and per-user credentials")
    conf.add_argument("--enrollment", type=Path, help="take federation and site ids from this file")
    conf.add_argument("--federation", help="federation name (if no --enrollment)")
    conf.add_argument("--site", action="append", default=[], help="site id (repeat; adds to the enrollment's)")
    conf.add_argument("--out", type=Path, required=True, help="folder to write into")
    conf.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    conf.add_argument("--bind", default="127.0.0.1", help="address of the TLS listener (0.0.0.0 in a container)")
    conf.add_argument(
        "--host",
        action="append",
        default=[],
        dest="hosts",
        help="name or address sites use to reach the broker, put in the generated server "
        "certificate (repeat; default: --bind, 127.0.0.1, localhost)",
    )
    conf.add_argument(
        "--plain-port",
        type=int,
        help="also open a plaintext listener on this port, on loopback only (tools on this host)",
    )
    conf.add_argument("--plain-bind", default="127.0.0.1", help="loopback address of the plaintext listener")
    conf.add_argument(
        "--ca-file", help="your CA certificate (with --cert-file, --key-file; default: generate in OUT/pki)"
    )
    conf.add_argument("--cert-file")
    conf.add_argument("--key-file")
    conf.add_argument("--require-client-cert", action="store_true")
    conf.add_argument(
        "--max-packet-size",
        type=int,
        default=DEFAULT_MAX_PACKET,
        help=f"largest MQTT packet in bytes (default {DEFAULT_MAX_PACKET})",
    )
    conf.add_argument(
        "--max-queued-messages",
        type=int,
        default=DEFAULT_MAX_QUEUED_MESSAGES,
        help=f"per offline client (default {DEFAULT_MAX_QUEUED_MESSAGES})",
    )
    conf.add_argument(
        "--max-queued-bytes",
        type=int,
        default=DEFAULT_MAX_QUEUED_BYTES,
        help=f"per offline client (default {DEFAULT_MAX_QUEUED_BYTES})",
    )
    conf.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"per listener (default {DEFAULT_MAX_CONNECTIONS})",
    )
    conf.add_argument(
        "--intake-workers",
        type=int,
        default=0,
        help="broker users intake-0 ... for the aggregator's [intake] workers (default 0: none)",
    )
    conf.add_argument(
        "--autosave-interval",
        type=int,
        default=DEFAULT_AUTOSAVE_S,
        help=f"seconds between saves of the broker's store (default {DEFAULT_AUTOSAVE_S})",
    )
    conf.add_argument(
        "--no-bind-client-ids",
        action="store_true",
        help="do not replace client ids by usernames (lets a site take over another's session)",
    )
    conf.add_argument(
        "--persistence-dir",
        help="where Mosquitto keeps its store (default OUT/data; /mosquitto/data in the eclipse-mosquitto image)",
    )
    conf.add_argument("--user", help="system user mosquitto drops to when started as root")
    conf.add_argument(
        "--credentials-dir",
        type=Path,
        help="where each service's <user>.password goes (default OUT/credentials); outside OUT, "
        "the broker's folder holds no plaintext password",
    )
    conf.add_argument(
        "--keep-passwords",
        action="store_true",
        help="reuse the <user>.password files already in the credentials folder",
    )
    conf.add_argument(
        "--bridge-to",
        metavar="HOST:PORT",
        help="a plant broker: bridge the plant's own topics of the central federation to this TLS listener",
    )
    conf.add_argument("--bridge-site", help="with --bridge-to: the plant's site id in the central federation")
    conf.add_argument("--bridge-federation", help="with --bridge-to: the central federation")
    conf.add_argument("--bridge-ca", help="with --bridge-to: the central broker's CA certificate")
    conf.add_argument(
        "--bridge-password-file", type=Path, help="with --bridge-to: the plant site user's central password"
    )
    conf.set_defaults(func=_broker_config)
    emb = bs.add_parser("embedded", help="run the embedded amqtt broker (MQTT 3.1.1, no ACL) in the foreground")
    emb.add_argument("--host", default="127.0.0.1")
    emb.add_argument("--port", type=int, default=1883)
    emb.set_defaults(func=_broker_embedded)


def _keys_new(args: argparse.Namespace) -> int:
    from broker_bridge.keys import KeyPair

    if args.out.exists() and not args.force:
        print(f"fedline: {args.out} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    kp = KeyPair.generate(args.role, args.id)
    kp.save(args.out)
    pub_path = (
        args.out.with_name(args.out.name + ".pub.json")
        if args.out.suffix != ".key"
        else args.out.with_suffix(".pub.json")
    )
    kp.public().save(pub_path)
    print(f"wrote {args.out} (private, 0600) and {pub_path} (public)")
    return 0


def _keys_opening(args: argparse.Namespace) -> int:
    from broker_bridge.keys import KeyPair

    if args.out.exists() and not args.force:
        print(f"fedline: {args.out} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    kp = KeyPair.load(args.key)
    if kp.role != "aggregator":
        print(f"fedline: {args.key} is a {kp.role} key; only an aggregator's has intake workers", file=sys.stderr)
        return 1
    kp.opening_key().save(args.out)
    print(f"wrote {args.out} (private, 0600): opens updates sealed to {kp.ident}, signs nothing")
    return 0


def _keys_command(args: argparse.Namespace) -> int:
    from broker_bridge.keys import KeyPair
    from broker_bridge.line_command import sign_command

    blob = sign_command(args.command, args.federation, args.site, KeyPair.load(args.key))
    args.out.write_bytes(blob)
    print(f"wrote a signed {args.command} for site {args.site} to {args.out} (valid for 5 minutes)")
    return 0


def _load_public(path: Path) -> PublicKeys:
    from broker_bridge.errors import KeyFileError
    from broker_bridge.keys import KeyPair, PublicKeys

    try:
        return PublicKeys.load(path)
    except KeyFileError as first:
        try:
            return KeyPair.load(path).public()
        except KeyFileError:
            raise first from None


def _keys_public(args: argparse.Namespace) -> int:
    from broker_bridge.keys import KeyPair

    pub = KeyPair.load(args.key).public()
    if args.out:
        pub.save(args.out)
    else:
        print(json.dumps({"fedline": "public-key", "version": 1, **pub.to_dict()}, indent=2))
    return 0


def _keys_enroll(args: argparse.Namespace) -> int:
    from broker_bridge.keys import Enrollment

    agg = _load_public(args.aggregator)
    if agg.role != "aggregator":
        print(f"fedline: {args.aggregator} is a {agg.role} key, not the aggregator's", file=sys.stderr)
        return 1
    if args.out.exists():
        enr = Enrollment.load(args.out)
        if enr.federation != args.federation or enr.aggregator != agg:
            print(f"fedline: {args.out} belongs to another federation or aggregator", file=sys.stderr)
            return 1
    else:
        enr = Enrollment(args.federation, agg)
    for s in args.site:
        enr.add(_load_public(s))
    enr.save(args.out)
    print(f"wrote {args.out}: federation {enr.federation!r}, {len(enr.sites)} site(s): {', '.join(enr.sites)}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from broker_bridge.keys import Enrollment

    enr = Enrollment.load(args.enrollment)
    try:
        enr.revoke(args.site)
    except KeyError as exc:
        print(f"fedline: {exc.args[0]}", file=sys.stderr)
        return 1
    enr.save(args.enrollment)
    print(f"revoked {args.site}; restart or reload the aggregator, and remove the site from the broker's passwd")
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from broker_bridge.errors import KeyFileError
    from broker_bridge.keys import Enrollment, KeyPair, OpeningKey, PublicKeys

    text = args.file.read_text() if args.file.exists() else ""
    kind = ""
    try:
        kind = json.loads(text).get("fedline", "")
    except (ValueError, AttributeError):
        pass
    if kind == "enrollment":
        enr = Enrollment.load(args.file)
        print(
            f"enrollment for federation {enr.federation!r}: aggregator {enr.aggregator.ident!r}, sites: "
            + (", ".join(enr.sites) or "none")
        )
    elif kind == "private-key":
        kp = KeyPair.load(args.file)
        print(f"private key of {kp.role} {kp.ident!r} (permissions ok)")
    elif kind == "opening-key":
        ok = OpeningKey.load(args.file)
        print(f"opening key of {ok.role} {ok.ident!r}: opens what is sealed to it, signs nothing (permissions ok)")
    else:
        try:
            pub = PublicKeys.load(args.file)
        except KeyFileError:
            raise
        print(f"public key of {pub.role} {pub.ident!r}")
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    from broker_bridge.keys import Enrollment
    from broker_bridge.mosquitto import MosquittoConfig, write_broker_config

    sites = list(args.site)
    federation = args.federation
    if args.enrollment:
        enr = Enrollment.load(args.enrollment)
        federation = federation or enr.federation
        sites = sorted(set(sites) | set(enr.sites))
    if not federation:
        print("fedline: give --federation or --enrollment", file=sys.stderr)
        return 2
    passwords: dict[str, str] = {}
    creds = args.credentials_dir or args.out / "credentials"
    if args.keep_passwords and creds.is_dir():
        for p in creds.glob("*.password"):
            passwords[p.name[: -len(".password")]] = p.read_text().strip()
    cfg = MosquittoConfig(
        federation=federation,
        sites=sites,
        intake_workers=args.intake_workers,
        port=args.port,
        bind=args.bind,
        hosts=args.hosts,
        plain_port=args.plain_port,
        plain_bind=args.plain_bind,
        max_packet_size=args.max_packet_size,
        max_queued_messages=args.max_queued_messages,
        max_queued_bytes=args.max_queued_bytes,
        max_connections=args.max_connections,
        autosave_interval_s=args.autosave_interval,
        bind_client_ids=not args.no_bind_client_ids,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        require_client_cert=args.require_client_cert,
        passwords=passwords,
        persistence_dir=args.persistence_dir,
        run_as_user=args.user,
        credentials_dir=str(creds),
        bridge=_bridge(args),
    )
    paths = write_broker_config(cfg, args.out)
    plain = f", plaintext {args.plain_bind}:{args.plain_port}" if args.plain_port is not None else ""
    print(f"wrote {paths['conf']} (TLS listener {args.bind}:{args.port}{plain}), {paths['acl']}, {paths['passwd']}")
    if "ca" in paths:
        print(
            f"generated a CA and server certificate in {paths['ca'].parent}: give sites {paths['ca']} "
            f"(public); ca.key never leaves this folder"
        )
    print(
        f"credentials for {len(cfg.users())} users in {creds} (mode 0600): give each "
        "service only its own file (<site> for the edge agent, <site>.line for the line)"
    )
    print(f"run it with: mosquitto -c {paths['conf']}")
    return 0


def _bridge(args: argparse.Namespace) -> BridgeConfig | None:
    """The ``--bridge-*`` options as a :class:`broker_bridge.bridge.BridgeConfig` (None without --bridge-to)."""
    from broker_bridge.bridge import BridgeConfig
    from fedline.config import ConfigError

    if not args.bridge_to:
        return None
    for name in ("bridge_site", "bridge_federation", "bridge_ca", "bridge_password_file"):
        if not getattr(args, name):
            raise ConfigError(None, "--" + name.replace("_", "-"), "missing: --bridge-to needs it")
    return BridgeConfig(
        site=args.bridge_site,
        federation=args.bridge_federation,
        address=args.bridge_to,
        ca_file=str(Path(args.bridge_ca).resolve()),
        password=args.bridge_password_file.read_text().strip(),
    )


def _broker_embedded(args: argparse.Namespace) -> int:
    import asyncio

    from broker_bridge.embedded import serve_forever

    try:
        asyncio.run(serve_forever(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0
