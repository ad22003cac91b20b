"""Fuzz ``envelope.verify_receipt``: the only thing that lets a site forget an update.

First byte 0: raw bytes on the receipts topic; 1: a body signed by a key that
is not the aggregator's (must never verify); 2: signed by the aggregator;
3 and 4: as 1 and 2 for a binary body (FLR version 2, ``binhead.pack_receipt``); 5 and 6: as 1 and 2 for a
compact binary body (FLR version 3: nulls left out, the message id raw).
"""

from __future__ import annotations

from _harness import AGGREGATOR, SITE_A, instrumented, main

with instrumented():
    from broker_bridge import binhead, envelope

AGG_PUB = bytes(AGGREGATOR.signing_key.verify_key)


def _signed(keys, body: bytes) -> bytes:
    return envelope.sign_body(envelope._RECEIPT_MAGIC, envelope._RECEIPT_DOMAIN, body, keys)


def _signed_binary(keys, body: bytes, compact: bool = False) -> bytes:
    domain = envelope._RECEIPT_DOMAIN_V3 if compact else envelope._RECEIPT_DOMAIN_V2
    sig = keys.signing_key.sign(envelope.digest(body, domain)).signature
    return envelope._RECEIPT_MAGIC + bytes([3 if compact else envelope.BINARY_RECEIPT_VERSION]) + sig + body


def target(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 7, data[1:]
    if mode == 0:
        blob = body
    elif mode in (1, 2):
        blob = _signed(SITE_A if mode == 1 else AGGREGATOR, body)
    else:
        blob = _signed_binary(SITE_A if mode in (3, 5) else AGGREGATOR, body, compact=mode >= 5)
    doc = envelope.verify_receipt(blob, AGG_PUB)
    assert mode not in (1, 3, 5), "a receipt signed by a site's key verified"
    assert doc["verdict"] in envelope.VERDICTS


def _binary(doc: dict, compact: bool = False) -> bytes:
    body = binhead.pack_receipt(doc, compact)
    assert body is not None
    return body


def seeds() -> list[bytes]:
    doc = {"site": "site-a", "counter": 4, "msg_id": "site-a-u4", "verdict": "applied", "reason": "", "version": 9}
    body = envelope.canonical_json(doc)
    return [
        b"\x00" + envelope.sign_receipt(doc, AGGREGATOR),
        b"\x01" + body,
        b"\x02" + body,
        b"\x02" + envelope.canonical_json({**doc, "verdict": "maybe"}),
        b"\x00" + envelope.sign_receipt(doc, AGGREGATOR, binary=True),
        b"\x03" + _binary(doc),
        b"\x04" + _binary(doc),
        b"\x04" + _binary({**doc, "verdict": "buffered", "weight": 0.5, "detail": None}),
        b"\x00" + envelope.sign_receipt({**doc, "msg_id": "0123456789abcdef"}, AGGREGATOR, binary=True, compact=True),
        b"\x05" + _binary(doc, compact=True),
        b"\x06" + _binary({**doc, "msg_id": "0123456789abcdef", "reason": None, "weight": 0.5}, compact=True),
    ]


if __name__ == "__main__":
    main(target, seeds())
