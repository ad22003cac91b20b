"""The tensor layouts a model spec implies, for the tensor table by reference (``FLT2``, issue 19).

A model's updates and weights always carry the same tensor table: the shared
parameters in the model's order, float32 (weights, float32 updates) or, for an
int8 update or step (:mod:`broker_bridge.quantised`), each tensor's int8 values
then its float32 block steps. ``FLT2 | layout id | raw data`` names that table
by the first 16 bytes of SHA-256 over its canonical FLT1 JSON, so each message
saves the table's ~300 bytes (1,281 parameters in six tensors).

Each party derives the tables from its *own* model spec (the shared names and
shapes of the model it built) and registers them
(:func:`broker_bridge.envelope.register_layout`); an FLT2 block whose id is not
registered is refused (``WireError`` ``schema``), never guessed. Because the id
is a hash of names, dtypes, shapes and order, a table that differs in any of
them has another id: a mismatched layout cannot be silently accepted.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker_bridge import envelope, quantised

Shapes = Mapping[str, tuple[int, ...]]


def float32_table(shapes: Shapes) -> bytes:
    """The FLT1 table of float32 tensors of ``shapes`` in their order (weights, float32 updates)."""
    return envelope.table_json([{"name": n, "dtype": "<f4", "shape": list(s)} for n, s in shapes.items()])


def int8_table(shapes: Shapes) -> bytes:
    """The FLT1 table of an int8 update or step (:func:`broker_bridge.quantised.encode`'s order)."""
    meta: list[dict[str, object]] = []
    for n, s in shapes.items():
        size = 1
        for d in s:
            size *= d
        meta.append({"name": n, "dtype": "|i1", "shape": list(s)})
        meta.append({"name": n + quantised.SCALE_SUFFIX, "dtype": "<f4", "shape": [quantised.n_blocks(size)]})
    return envelope.table_json(meta)


def register_model(shapes: Shapes) -> dict[str, bytes]:
    """Register the float32 and int8 layouts of a model's shared tensors; their ids by encoding."""
    return {
        "float32": envelope.register_layout(float32_table(shapes)),
        "int8": envelope.register_layout(int8_table(shapes)),
    }
