"""Fuzz ``envelope.decode_tensors``: the tensor block inside every update.

Random bytes must give ``WireError`` (never a crash, never an allocation of a
size the block only claims); what decodes must re-encode to the same bytes.
"""

from __future__ import annotations

import numpy as np
from _harness import instrumented, main

with instrumented():
    from broker_bridge import envelope


def target(data: bytes) -> None:
    tensors = envelope.decode_tensors(data)
    # What decodes is a faithful view: encoding it again gives the same tensor data.
    again = envelope.decode_tensors(envelope.encode_tensors(tensors))
    assert list(again) == list(tensors)
    for name, arr in tensors.items():
        assert again[name].shape == arr.shape and again[name].dtype == arr.dtype
        assert again[name].tobytes() == arr.tobytes()


def seeds() -> list[bytes]:
    return [
        envelope.encode_tensors({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3)}),
        envelope.encode_tensors({"x": np.array([1, 2], dtype=np.int64), "m": np.array([True, False])}),
        envelope.encode_tensors({"s": np.float32(3.5).reshape(())}),
        envelope.encode_tensors({}),
    ]


if __name__ == "__main__":
    main(target, seeds())
