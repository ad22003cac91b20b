"""Fuzz ``Topics.parse``: every incoming topic name is parsed before anything else.

Any string must give a ``TopicInfo`` or ``TopicError``; what parses must name
a valid site and message id, and the topic rebuilt from it parses the same.
"""

from __future__ import annotations

import atheris
from _harness import instrumented, main

with instrumented():
    from broker_bridge.topics import Topics, validate_site_id

TOPICS = Topics("fuzz")


def target(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    prefix = "fedline/fuzz/" if fdp.ConsumeBool() else ""
    topic = prefix + fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    info = TOPICS.parse(topic)
    if info.site is not None:
        validate_site_id(info.site)
    # Rebuilding from what was parsed names the same thing (leading zeros in an index may differ).
    if info.kind == "update":
        rebuilt = TOPICS.update_chunk(info.site, info.msg_id, info.index)
    elif info.kind in ("receipts", "status"):
        rebuilt = getattr(TOPICS, info.kind)(info.site)
    elif info.kind == "manifest":
        rebuilt = TOPICS.manifest()
    else:
        build = TOPICS.weights_chunk if info.kind == "weights" else TOPICS.onnx_chunk
        rebuilt = build(info.version, info.index)
    assert TOPICS.parse(rebuilt) == info, (topic, rebuilt)


def seeds() -> list[bytes]:
    return [
        b"\x01sites/site-a/update/m-1/0",
        b"\x01sites/site-a/receipts",
        b"\x01model/manifest",
        b"\x01model/12/weights/3",
        b"\x01model/4/onnx/0",
        b"\x00fedline/other/model/manifest",
    ]


if __name__ == "__main__":
    main(target, seeds())
