"""Line inference: score live plant rows with ONNX Runtime and hot-reload models.

``fedline infer --config line.toml`` runs :class:`edge.inference.service.InferenceService`.
It never imports torch (a line-side gateway may have little memory); models
arrive as ONNX bytes, from one of two places:

- ``model_source = "manifest"``: the aggregator's signed manifest (retained on
  ``Topics.manifest()``) names the global model's ONNX, whose chunks are
  retained on ``Topics.onnx_chunk(version, i)``. The service checks the
  manifest's signature with the aggregator's key, reassembles the chunks and
  checks ``envelope.content_hash`` and size against the manifest.
- ``model_source = "model_dir"``: the edge agent writes the site's personalised
  ONNX (global body + local head) into a model directory, layout below.

Model directory layout (the contract with the edge agent; see
:func:`edge.inference.model_dir.publish_model`, which writes it)::

    <model_dir>/v<version>-<hash[:12]>.onnx   immutable, written temp file + fsync + rename
    <model_dir>/current.json                  written temp file + fsync + rename, *after* the .onnx:
        {"version": 7,                        int: the global version of the model's body
         "hash": "<hex BLAKE2b-256>",         broker_bridge.envelope.content_hash of the .onnx bytes
         "file": "v7-0123456789ab.onnx",      file name inside model_dir (default "current.onnx")
         "base_version": 6, ...}              anything else is kept as metadata

A pointer with a newer version, or with the same version and another hash
(the edge agent re-exports after each local round: same global body, retrained
personal head), is taken; an older version is ignored. Predictions carry the
version and the first 12 hex digits of the hash (``model``) that scored them.

Because the ONNX file a ``current.json`` names is never rewritten in place,
a reader never sees half a model or a pointer to a model that is not there
yet; files older than the previous two versions may be deleted by the writer.

Hot reload (:mod:`edge.inference.hotswap`): a new version is built into an
``onnxruntime.InferenceSession`` in a worker thread, probed (input name and
width, output shape, finite scores), optionally checked on a canary of recent
labelled rows against the model in service, and only then swapped in with a
single reference assignment on the event loop, between two batches. Every
prediction carries the version that scored it. The previous good version is
kept for rollback (``fedline infer --rollback`` or the command topic).
"""
