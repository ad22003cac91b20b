"""Wire-format benchmark: what sealing and signing an update costs, against the bare cipher.

For updates of 10k, 100k and 1M float32 parameters it measures

- seal+sign (``envelope.seal_update``: encode, BLAKE2b digest, Ed25519 sign,
  X25519 SealedBox) and open+verify (``envelope.open_update``) throughput in MB/s
  of raw parameter bytes;
- bare PyNaCl ``SecretBox`` encrypt/decrypt of the same plaintext bytes, the
  practical limit (XSalsa20-Poly1305 with no key exchange, no signature, no framing);
- their ratio (fedline / SecretBox: 1.0 would mean the envelope costs nothing extra);
- bytes on the wire per raw parameter byte: the sealed message split into
  100 KiB chunks (chunk headers included), and with MQTT 5 PUBLISH headers too;
- the same update quantised to int8 (``[update] quantise = "int8"``,
  :mod:`broker_bridge.quantised`): its bytes on the wire (MQTT included) over the
  float32 update's (the issue's target: <= 0.3x), quantise+seal and open+decode times.

Usage: ``python bench/wire.py`` (table) or ``python bench/wire.py --json`` (one JSON object).
Each timing is the best of several repeats, so other load on the machine inflates it less.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import nacl
import numpy as np
from nacl.secret import SecretBox
from nacl.utils import random as nacl_random

from broker_bridge import envelope, quantised
from broker_bridge.chunking import DEFAULT_MAX_CHUNK, split
from broker_bridge.client import publish_packet_size
from broker_bridge.keys import create_federation
from broker_bridge.topics import Topics

SIZES = (10_000, 100_000, 1_000_000)


def best_time(fn: Callable[[], object], budget_s: float = 0.5, min_repeats: int = 5, max_repeats: int = 200) -> float:
    """Best wall time of ``fn`` over repeats that fill about ``budget_s`` seconds."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(n_params: int, budget_s: float = 0.5) -> dict[str, Any]:
    fed = create_federation("bench", ["site-a"])
    agg, site, enrollment = fed.aggregator, fed.sites["site-a"], fed.enrollment
    agg_box_pub = bytes(agg.box_key.public_key)
    tensors = {"delta": np.random.default_rng(0).standard_normal(n_params, dtype=np.float32)}
    raw = n_params * 4
    header = envelope.UpdateHeader(
        "site-a", 1, "site-a-u1", 0, 256, {"clip_norm": 1.0, "noise_multiplier": 1.1, "epsilon": 0.7}
    )

    sealed = envelope.seal_update(header, tensors, site, agg_box_pub)
    t_seal = best_time(lambda: envelope.seal_update(header, tensors, site, agg_box_pub), budget_s)
    got_header, got = envelope.open_update(sealed, agg, enrollment)
    assert got_header == header and got["delta"].tobytes() == tensors["delta"].tobytes()
    t_open = best_time(lambda: envelope.open_update(sealed, agg, enrollment), budget_s)

    plain = envelope.encode_update(header, tensors)  # the same bytes, under the bare cipher
    box = SecretBox(nacl_random(SecretBox.KEY_SIZE))
    boxed = box.encrypt(plain)
    t_box_enc = best_time(lambda: box.encrypt(plain), budget_s)
    t_box_dec = best_time(lambda: box.decrypt(boxed), budget_s)

    topics = Topics("bench")
    chunks = split(sealed, header.msg_id, DEFAULT_MAX_CHUNK)
    chunk_bytes = sum(len(c) for c in chunks)
    mqtt_bytes = sum(
        publish_packet_size(topics.update_chunk("site-a", header.msg_id, i), len(c), 1, True)
        for i, c in enumerate(chunks)
    )

    # the same delta as an int8 update: what [update] quantise = "int8" sends
    header8 = envelope.UpdateHeader(
        "site-a", 2, "site-a-u2", 0, 256, {"clip_norm": 1.0, "noise_multiplier": 1.1, "epsilon": 0.7}, encoding="int8"
    )
    sealed8 = envelope.seal_update(header8, quantised.encode(tensors, "int8"), site, agg_box_pub)
    t_seal8 = best_time(
        lambda: envelope.seal_update(header8, quantised.encode(tensors, "int8"), site, agg_box_pub), budget_s
    )

    def open8() -> dict[str, np.ndarray]:
        h, t = envelope.open_update(sealed8, agg, enrollment)
        return quantised.decode(t, h.encoding)

    back = open8()["delta"]
    step = float(np.abs(tensors["delta"]).max()) / quantised.LEVELS
    assert float(np.abs(back - tensors["delta"]).max()) <= step * (1 + 1e-5)  # one step at most
    t_open8 = best_time(open8, budget_s)
    chunks8 = split(sealed8, header8.msg_id, DEFAULT_MAX_CHUNK)
    mqtt8 = sum(
        publish_packet_size(topics.update_chunk("site-a", header8.msg_id, i), len(c), 1, True)
        for i, c in enumerate(chunks8)
    )

    mb = raw / 1e6
    return {
        "params": n_params,
        "raw_bytes": raw,
        "sealed_bytes": len(sealed),
        "chunks": len(chunks),
        "seal_sign_ms": t_seal * 1e3,
        "open_verify_ms": t_open * 1e3,
        "seal_sign_MBps": mb / t_seal,
        "open_verify_MBps": mb / t_open,
        "secretbox_encrypt_MBps": mb / t_box_enc,
        "secretbox_decrypt_MBps": mb / t_box_dec,
        "seal_vs_secretbox": t_box_enc / t_seal,
        "open_vs_secretbox": t_box_dec / t_open,
        "wire_per_raw_byte": chunk_bytes / raw,
        "mqtt_wire_per_raw_byte": mqtt_bytes / raw,
        "int8_sealed_bytes": len(sealed8),
        "int8_quantise_seal_ms": t_seal8 * 1e3,
        "int8_open_decode_ms": t_open8 * 1e3,
        "int8_wire_vs_float32": mqtt8 / mqtt_bytes,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = [
        ("params", "params", "{:,}"),
        ("sealed", "sealed_bytes", "{:,}"),
        ("chunks", "chunks", "{}"),
        ("seal+sign MB/s", "seal_sign_MBps", "{:.0f}"),
        ("SecretBox enc MB/s", "secretbox_encrypt_MBps", "{:.0f}"),
        ("seal/limit", "seal_vs_secretbox", "{:.2f}"),
        ("open+verify MB/s", "open_verify_MBps", "{:.0f}"),
        ("SecretBox dec MB/s", "secretbox_decrypt_MBps", "{:.0f}"),
        ("open/limit", "open_vs_secretbox", "{:.2f}"),
        ("wire/raw", "wire_per_raw_byte", "{:.4f}"),
        ("wire+MQTT/raw", "mqtt_wire_per_raw_byte", "{:.4f}"),
        ("int8 sealed", "int8_sealed_bytes", "{:,}"),
        ("int8 quantise+seal ms", "int8_quantise_seal_ms", "{:.2f}"),
        ("int8 open+decode ms", "int8_open_decode_ms", "{:.2f}"),
        ("int8 wire/float32", "int8_wire_vs_float32", "{:.4f}"),
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text when rich is missing
        print(" | ".join(c[0] for c in cols))
        for r in rows:
            print(" | ".join(fmt.format(r[key]) for _, key, fmt in cols))
        return
    table = Table(title="fedline wire: sealed update vs bare SecretBox (MB/s of raw float32 bytes, best of repeats)")
    for name, _, _ in cols:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*(fmt.format(r[key]) for _, key, fmt in cols))
    console = Console()
    if not console.is_terminal:  # piped to a file: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    print(
        "seal/limit, open/limit: fedline throughput as a fraction of bare SecretBox on the same bytes.\n"
        f"wire/raw: sealed bytes split into {DEFAULT_MAX_CHUNK // 1024} KiB chunks, headers included, "
        "per raw parameter byte; +MQTT adds MQTT 5 PUBLISH headers.\n"
        "int8: the same delta quantised (stochastic rounding, a float32 step per 1,024 values); "
        "int8 wire/float32 counts MQTT bytes of both."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of repeats per timing (default 0.5)")
    args = ap.parse_args(argv)
    rows = [measure(n, args.budget) for n in SIZES]
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "wire",
                    "python": platform.python_version(),
                    "pynacl": nacl.__version__,
                    "chunk_bytes": DEFAULT_MAX_CHUNK,
                    "results": rows,
                }
            )
        )
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
