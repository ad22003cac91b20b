"""Fuzz ``envelope.decode_tensors``: the tensor block inside every update (FLT1, and FLT2: the table by id).

Random bytes must give ``WireError`` (never a crash, never an allocation of a
size the block only claims); what decodes must re-encode to the same bytes.
Two layouts are registered (float32 and int8 of a small model), as a party's
own spec would, so the fuzzer reaches FLT2's reads as well as its refusals.
"""

from __future__ import annotations

import numpy as np
from _harness import instrumented, main

with instrumented():
    from broker_bridge import envelope, layouts

SHAPES = {"w": (3, 4), "b": (3,)}
layouts.register_model(SHAPES)


def target(data: bytes) -> None:
    tensors = envelope.decode_tensors(data)
    # What decodes is a faithful view: encoding it again gives the same tensor data.
    again = envelope.decode_tensors(envelope.encode_tensors(tensors))
    if data[:4] == b"FLT2":  # by reference: the same bytes again (the id was registered)
        assert envelope.encode_tensors(tensors, by_reference=True) == data
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
        envelope.encode_tensors({n: np.ones(s, np.float32) for n, s in SHAPES.items()}, by_reference=True),
        envelope.encode_tensors(
            {
                "w": np.ones((3, 4), np.int8),
                "w#scale": np.ones(1, np.float32),
                "b": np.ones(3, np.int8),
                "b#scale": np.ones(1, np.float32),
            },
            by_reference=True,
        ),
    ]


if __name__ == "__main__":
    main(target, seeds())
