"""Follow the global model by its int8 steps (``[publish] quantise = "int8"`` at the aggregator).

Why: the model going down to every site every version was half of the federation's bytes. With
``quantise = "int8"`` the aggregator defines version v+1 as ``v + dequantise(step)`` and publishes
the step (about a quarter of the weights' bytes) beside the full weights; a site that holds version v
makes v+1 itself with the same code (:func:`broker_bridge.quantised.apply_step`), so its weights are
the aggregator's bit for bit.

What a site trusts: nothing in the step itself. The signed manifest names the step's hash and the hash
of the full weights it must make; :func:`apply` checks the first before applying anything and the
second on the result (the rest of :func:`edge.model_store.check_global_model` then runs on those
weights as on downloaded ones). A step that is forged, replayed, truncated or applied to another
parent fails one of the two and the site takes the version's full weights instead (``edge.adopt``).
"""

from __future__ import annotations

from typing import Any

from broker_bridge import quantised
from broker_bridge.envelope import content_hash, decode_tensors, encode_tensors
from broker_bridge.errors import ModelRefused
from edge.model_store import GlobalModel


def applies(manifest: dict[str, Any], base: GlobalModel) -> bool:
    """The manifest's version was made by a step from the version this site holds."""
    step = manifest.get("delta")
    if not isinstance(step, dict):
        return False
    chunks, parent = step.get("chunks"), step.get("from")
    return (
        isinstance(chunks, int)
        and not isinstance(chunks, bool)
        and chunks >= 1
        and parent == base.version
        and not isinstance(parent, bool)
    )


def apply(manifest: dict[str, Any], step_blob: bytes, base: GlobalModel) -> bytes:
    """The full weights blob the step makes from ``base``, checked against both signed hashes.

    Raises :class:`ModelRefused` (``step_hash``, ``step_result``) or :class:`WireError` (a malformed block).
    """
    version = manifest["version"]
    if content_hash(step_blob) != manifest["delta"].get("hash"):
        raise ModelRefused("step_hash", "the step's hash does not match the signed manifest", version)
    model = quantised.apply_step(base.shared, decode_tensors(step_blob))
    signed = manifest["weights"].get("hash")
    for by_reference in (False, True):  # the aggregator publishes FLT2 weights once every site reads them
        weights = encode_tensors(model, by_reference)
        if content_hash(weights) == signed:
            return weights
    raise ModelRefused("step_result", "the step does not make the signed weights from this site's", version)
