"""Fuzz ``binhead.unpack``: the binary update header (FLU version 2) inside every compact update.

Random bytes must give ``WireError`` (never a crash, never an allocation of a
size the block only claims); what decodes must pack again and decode to the
same header.
"""

from __future__ import annotations

from _harness import instrumented, main

with instrumented():
    from broker_bridge import binhead
    from broker_bridge.envelope import UpdateHeader


def target(data: bytes) -> None:
    doc, used = binhead.unpack(memoryview(data), "site-a")
    assert 2 <= used <= len(data)
    again = binhead.pack(doc)  # every decoded header packs again (maybe shorter: a key or string interned)
    assert again is not None and binhead.unpack(memoryview(again), "site-a")[0] == doc
    UpdateHeader.from_dict(doc)  # what the aggregator does next: refuses only with WireError


def seeds() -> list[bytes]:
    dp = {
        "mode": "dp-sgd",
        "accountant": "rdp",
        "accounting": "per_record",
        "clip_norm": 3.0,
        "noise_multiplier": 1.0,
        "sample_rate": 0.03,
        "steps": 66,
        "epsilon": 1.25,
        "delta": 1e-05,
        "unit_group": 1,
        "other": None,
        "note": "free text",
    }
    out = []
    for privacy, enc in ((dp, "int8"), ({"mode": "off"}, "float32"), ({}, "float32")):
        h = UpdateHeader("site-a", 7, "0123456789abcdef", 2, 64, privacy, 1.0e9, encoding=enc)
        block = binhead.pack(h.to_dict())
        assert block is not None
        out.append(block)
    return out


if __name__ == "__main__":
    main(target, seeds())
