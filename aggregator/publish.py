"""What goes on the broker for each global version: chunks, then the sealed manifest.

Order matters: every chunk of weights and ONNX is published (retained, QoS 1,
acknowledged) before the manifest that points at them, so an edge that sees
a manifest can always fetch what it names. Each manifest field is the
contract the edge reads (DESIGN.md, issue 5)::

    federation, version, epoch, created_at, spec (ModelSpec.to_dict()),
    weights {hash, size, chunks, msg_id}, onnx {hash, size, chunks, msg_id},
    metric (optional), upstream (optional: a plant's release names the central federation and
    version it serves, ``plant.core``)

Models are for members only (issue 13): the weights and ONNX blobs are
encrypted under the epoch's content key before chunking, and the signed
manifest is sealed under it too (``broker_bridge.federation_key``); hash and
size are the plaintext's. The manifest names no site, no sample count and no
per-update lineage: a member reading it learns nothing about who contributed.
The aggregator's own store keeps the full lineage of every version.

The ONNX file is the global model with the aggregator's copy of the personal
parameters, i.e. those of version 0 (the seed): the aggregator never sees a
site's own head. A site with a personal head runs the published body with its
own head; a federation without personal parameters gets the exact global model.

Superseded versions are cleared from the broker (an empty retained payload on
each chunk topic), keeping the last ``[publish] retain_versions``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from broker_bridge import chunking, envelope
from broker_bridge.federation_key import seal_manifest
from broker_bridge.keys import KeyPair
from broker_bridge.topics import Topics
from fedline.logs import event
from models.spec import ModelSpec

log = logging.getLogger("fedline.aggregator.publish")


@dataclass
class Release:
    version: int
    manifest: dict[str, Any]
    manifest_blob: bytes
    chunks: list[tuple[str, bytes]]
    weights_chunks: int
    onnx_chunks: int


def _sealed_parts(
    version: int,
    parts_of: Sequence[tuple[str, bytes, Callable[[int, int], str]]],
    content_key: bytes,
    chunk_limit: Callable[[str], int],
) -> tuple[list[tuple[str, bytes]], dict[str, dict[str, Any]]]:
    """Each blob sealed under the content key and chunked: the (topic, chunk) pairs and the manifest entries.

    An int8 step goes as plain slices (:func:`broker_bridge.chunking.split_plain`: no chunk header; only the
    sites' step collectors read it, and they join plain slices); weights and ONNX keep the header (the
    observer and the lines reassemble them with ``chunking.Reassembler``)."""
    chunks: list[tuple[str, bytes]] = []
    entries: dict[str, dict[str, Any]] = {}
    for part, blob, topic_of in parts_of:
        msg_id = f"v{version}-{part}"
        sealed = envelope.seal_for_federation(blob, content_key) if blob else b""
        limit = chunk_limit(topic_of(version, 999999))
        plain = chunking.split_plain(sealed, limit) if blob and part == "delta" else None
        parts = plain if plain is not None else chunking.split(sealed, msg_id, limit) if blob else []
        chunks += [(topic_of(version, i), c) for i, c in enumerate(parts)]
        entries[part] = {"hash": envelope.content_hash(blob), "size": len(blob), "chunks": len(parts), "msg_id": msg_id}
    return chunks, entries


def build_release(
    version: int,
    shared: dict[str, np.ndarray],
    spec: ModelSpec,
    federation: str,
    keys: KeyPair,
    topics: Topics,
    chunk_limit: Callable[[str], int],
    onnx_bytes: Callable[[dict[str, np.ndarray]], bytes] | None,
    epoch: int,
    content_key: bytes,
    metric: float | None = None,
    extra: dict[str, Any] | None = None,
    step: tuple[int, dict[str, np.ndarray]] | None = None,
    by_reference: bool = False,
    spec_by_hash: bool = False,
    steps: bool = False,
    binary_manifest: bool = False,
) -> Release:
    """Everything to publish for ``version``, encrypted under ``content_key`` of ``epoch``.

    ``step`` (``[publish] quantise = "int8"``): the parent version and the int8 block that made this
    version from it (:func:`broker_bridge.quantised.model_step`); published on ``model/<v>/delta/<i>`` and
    named in the manifest's ``delta`` entry, beside the full weights (for sites that do not hold the parent).
    ``by_reference``: weights and step with the tensor table by reference (FLT2), when every enrolled site
    reads it (:class:`aggregator.service.Aggregator`); ``spec_by_hash``: the spec named by its hash
    (``spec_hash``) when every enrolled site reads FLM2; ``steps``: the federation's versions come as int8
    steps (``[publish] quantise = "int8"``), said in every manifest, version 0's too, so that a site takes
    the next version's step and not its full weights; ``binary_manifest``: the manifest's body in binary (FLM
    version 3, ``broker_bridge.binhead.pack_manifest``) when every enrolled site reads FLM3. Pure (no I/O), so
    it runs in a worker thread.
    """
    weights = envelope.encode_tensors(shared, by_reference)
    onnx = onnx_bytes(shared) if onnx_bytes else b""
    delta = envelope.encode_tensors(step[1], by_reference) if step is not None else b""
    parts_of = [("weights", weights, topics.weights_chunk), ("onnx", onnx, topics.onnx_chunk)]
    if delta:
        parts_of.append(("delta", delta, topics.delta_chunk))
    chunks, entries = _sealed_parts(version, parts_of, content_key, chunk_limit)
    manifest: dict[str, Any] = {
        "federation": federation,
        "version": version,
        "epoch": epoch,
        "created_at": time.time(),
        **({"spec_hash": envelope.spec_hash(spec.to_dict())} if spec_by_hash else {"spec": spec.to_dict()}),
        "weights": entries["weights"],
        "onnx": entries["onnx"],
        "reads": list(envelope.READS),  # formats of updates this aggregator reads (FLT2 tensors, FLU2 headers)
    }
    if steps:  # signed: the next version will come as a step (a site subscribes to steps, not weights, ahead)
        manifest["steps"] = True
    if step is not None:  # signed with the rest: its hash, and the full weights' hash the step must give
        manifest["delta"] = dict(entries["delta"], **{"from": step[0]})
    if metric is not None:
        manifest["metric"] = metric
    manifest.update({k: v for k, v in (extra or {}).items() if k not in manifest})
    sealed_manifest = seal_manifest(
        envelope.sign_manifest(manifest, keys, binary_manifest), version, epoch, content_key
    )
    return Release(version, manifest, sealed_manifest, chunks, entries["weights"]["chunks"], entries["onnx"]["chunks"])


async def publish_release(client: Any, topics: Topics, release: Release) -> None:
    """Chunks first (retained, all acknowledged), then the manifest (retained)."""
    await client.publish_many(release.chunks, qos=1, retain=True)
    await client.publish(topics.manifest(), release.manifest_blob, qos=1, retain=True)
    event(
        log,
        "model.published",
        version=release.version,
        chunks=len(release.chunks),
        weights=release.manifest["weights"]["size"],
        onnx=release.manifest["onnx"]["size"],
    )


def clear_topics(topics: Topics, version: int, weights_chunks: int, onnx_chunks: int) -> list[str]:
    """Chunk topics of one version (to clear with empty retained payloads).

    An int8 step has fewer chunks than the weights (a quarter of the bytes): clearing as many delta topics
    as weight topics covers it (clearing a topic that holds nothing is harmless).
    """
    return (
        [topics.weights_chunk(version, i) for i in range(weights_chunks)]
        + [topics.onnx_chunk(version, i) for i in range(onnx_chunks)]
        + [topics.delta_chunk(version, i) for i in range(weights_chunks)]
    )
