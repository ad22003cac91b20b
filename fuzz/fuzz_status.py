"""Fuzz ``binhead.read_status``: a site's status, JSON or binary (FLH1), as the aggregator, secure
aggregation's cohorts and the observer read it.

A status is unsigned and anyone with a site's broker login can write it, so the reader must never raise: any
input gives a dict or None. A binary status that decodes must pack again to one that reads the same.
"""

from __future__ import annotations

import json

from _harness import instrumented, main

with instrumented():
    from broker_bridge import binhead


def target(data: bytes) -> None:
    doc = binhead.read_status(data)
    assert doc is None or isinstance(doc, dict)
    if doc is not None and data[:4] == binhead.STATUS_MAGIC:
        again = binhead.pack_status(doc)
        assert again is not None and binhead.read_status(again) == doc


def seeds() -> list[bytes]:
    doc = {
        "state": "online",
        "version": 7,
        "epoch": 1,
        "privacy": "on",
        "accounting": "per_record",
        "epsilon": 1.25,
        "epsilon_budget": 8.0,
        "delta": 1e-05,
        "privacy_unit": "row",
        "publishing": "ok",
        "outbox_depth": 0,
        "model_refused": {"version": 6, "reason": "step"},
        "reads": ["FLT2", "FLR2", "FLM2", "FLM3", "FLR3"],
        "ts": 1.7e9,
    }
    packed = binhead.pack_status(doc)
    assert packed is not None
    return [packed, json.dumps(doc).encode(), b'{"state":"offline","reason":"connection lost"}']


if __name__ == "__main__":
    main(target, seeds())
