"""Fuzz ``envelope.verify_receipt``: the only thing that lets a site forget an update.

First byte 0: raw bytes on the receipts topic; 1: a body signed by a key that
is not the aggregator's (must never verify); 2: signed by the aggregator.
"""

from __future__ import annotations

from _harness import AGGREGATOR, SITE_A, instrumented, main

with instrumented():
    from broker_bridge import envelope

AGG_PUB = bytes(AGGREGATOR.signing_key.verify_key)


def _signed(keys, body: bytes) -> bytes:
    return envelope.sign_body(envelope._RECEIPT_MAGIC, envelope._RECEIPT_DOMAIN, body, keys)


def target(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    blob = body if mode == 0 else _signed(SITE_A if mode == 1 else AGGREGATOR, body)
    doc = envelope.verify_receipt(blob, AGG_PUB)
    assert mode != 1, "a receipt signed by a site's key verified"
    assert doc["verdict"] in envelope.VERDICTS


def seeds() -> list[bytes]:
    doc = {"site": "site-a", "counter": 4, "msg_id": "site-a-u4", "verdict": "applied", "reason": "", "version": 9}
    body = envelope.canonical_json(doc)
    return [
        b"\x00" + envelope.sign_receipt(doc, AGGREGATOR),
        b"\x01" + body,
        b"\x02" + body,
        b"\x02" + envelope.canonical_json({**doc, "verdict": "maybe"}),
    ]


if __name__ == "__main__":
    main(target, seeds())
