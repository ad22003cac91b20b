"""Flower 1.42's server receive path for one client's reply, from the bytes the SuperLink receives (issue 19).

Why this exists: fedline's side of the quantised-path comparison starts from the sealed bytes the aggregator
receives. The older Flower baseline (``parameters_to_ndarrays`` + the legacy ``aggregate``) starts from NumPy
``.npy`` bytes already out of their message and skips what Flower's deployment engine does to a reply before
its strategy sees it. This module runs that path with Flower's own functions, in one process, in the order a
SuperLink and its ServerApp run them (flwr 1.42.0 from PyPI; file paths inside the ``flwr`` package):

1. **SuperLink, Fleet API** (``superlink/servicer/fleet/fleet_handlers.py``):
   - ``push_messages``: the ``PushMessagesRequest`` protobuf is parsed, ``message_from_proto`` builds the
     reply's metadata (the content travels as objects), and the message's object tree is preregistered in the
     object store (``InMemoryObjectStore.preregister``; the default ``--database`` is ``:flwr-in-memory:``);
   - ``push_object``, once per object (Message, RecordDict, ArrayRecord, MetricRecord, one Array and its
     ArrayChunks per tensor): the ``PushObjectRequest`` protobuf is parsed and ``InMemoryObjectStore.put``
     checks that the object's id is the SHA-256 of its content and validates the content's head
     (``supercore/object_store/in_memory_object_store.py``; ``verify=True`` is its default).
2. **SuperLink -> ServerApp** (the default isolation is ``subprocess``: the ServerApp is its own process and
   pulls each object over the Runtime API, protobuf over HTTP): ``superlink/servicer/runtime/
   runtime_handlers.py::pull_object`` answers a ``PullObjectResponse`` (serialised), the ServerApp's
   ``superlink/grid/http_grid.py::HttpGrid.pull_messages`` parses it and inflates the Message from the
   objects' contents (``supercore/inflatable/inflatable_utils.py::inflate_object_from_contents``).
3. **Strategy**: ``flwr.serverapp.strategy.FedAvg.aggregate_train`` (1.42's FedAvg for the Message API)
   over the K replies of a round: ``strategy_utils.aggregate_arrayrecords`` (``Array.numpy`` per tensor and
   a weighted in-place sum) and ``aggregate_metricrecords``.

Left out, so Flower is never charged for what it may not do: the gRPC and HTTP transports themselves, the
LinkState's message bookkeeping (``store_message_res``, traffic counters), logging (Flower's logger is set to
WARNING), the ConfirmMessageReceived call and the deletion of the objects afterwards. Each reply is built
by Flower's own client-side functions (``get_all_nested_objects``, ``get_object_tree``, ``message_to_proto``
of the message without its content, ``Array.deflate``), outside the timed part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SUPERNODE_ID = 5
WEIGHT_KEY = "num-examples"  # FedAvg's default ``weighted_by_key``


@dataclass
class Reply:
    """One client's reply as the SuperLink receives it: one PushMessages request and its PushObject requests."""

    push_messages: bytes
    push_objects: list[bytes]


def flower_version() -> str | None:
    """flwr's version if Flower 1.42's Message API and in-memory object store import, else ``None``."""
    try:
        import flwr
        from flwr.serverapp.strategy import FedAvg  # noqa: F401
        from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore  # noqa: F401
    except Exception:
        return None
    logging.getLogger("flwr").setLevel(logging.WARNING)
    return str(flwr.__version__)


def _instruction() -> Any:
    """The ServerApp's train instruction a reply answers (its id as the Grid would set it)."""
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a SuperNode's process sets these
    ins = Message(RecordDict({"arrays": ArrayRecord()}), dst_node_id=SUPERNODE_ID, message_type="train")
    ins.metadata.__dict__["_message_id"] = ins.object_id
    return ins


def replies(deltas: Sequence[Sequence[np.ndarray]], samples: Sequence[int]) -> list[Reply]:
    """Each delta as the serialised requests its SuperNode sends (``supernode/fleet_http_connection.py::send``)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

    ins, node, out = _instruction(), Node(node_id=SUPERNODE_ID), []
    for delta, n in zip(deltas, samples):
        content = RecordDict({"arrays": ArrayRecord(list(delta)), "metrics": MetricRecord({WEIGHT_KEY: n})})
        reply = Message(content, reply_to=ins)
        reply.metadata.__dict__["_message_id"] = reply.object_id
        tree = get_object_tree(reply)
        push = PushMessagesRequest(
            node=node, messages_list=[message_to_proto(remove_content_from_message(reply))], message_object_trees=[tree]
        )
        objects = [
            PushObjectRequest(node=node, run_id=1, object_id=oid, object_content=obj.deflate(), session_id="s")
            for oid, obj in get_all_nested_objects(reply).items()
        ]
        out.append(Reply(push.SerializeToString(), [o.SerializeToString() for o in objects]))
    return out


def new_store() -> Any:
    """A SuperLink's object store, as its default ``--database`` makes it."""
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    return InMemoryObjectStore()


def superlink_receive(store: Any, reply: Reply) -> Any:
    """Fleet API ``push_messages`` then ``push_object`` per object: the reply's object tree, its objects stored."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import PushObjectRequest

    request = PushMessagesRequest.FromString(reply.push_messages)
    message = message_from_proto(request.messages_list[0])
    tree = request.message_object_trees[0]
    store.preregister(message.metadata.run_id, tree)
    for raw in reply.push_objects:
        obj = PushObjectRequest.FromString(raw)
        store.put(obj.object_id, obj.object_content)  # SHA-256 of the content against its id, head validated
    return tree


def serverapp_pull(store: Any, tree: Any) -> Any:
    """Each object answered by the SuperLink's Runtime API and parsed by the ServerApp, then the Message inflated."""
    from flwr.proto.message_pb2 import PullObjectResponse
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents: dict[str, bytes] = {}
    for node in iterate_object_tree(tree):
        content = store.get(node.object_id)
        wire = PullObjectResponse(object_found=True, object_available=content != b"", object_content=content)
        contents[node.object_id] = PullObjectResponse.FromString(wire.SerializeToString()).object_content
    return inflate_object_from_contents(tree.object_id, contents)


def fedavg(messages: Sequence[Any]) -> Any:
    """1.42's FedAvg (Message API) over one round's replies: the aggregated ArrayRecord."""
    from flwr.serverapp.strategy import FedAvg

    arrays, _ = FedAvg().aggregate_train(1, list(messages))
    return arrays


def receive_and_aggregate(batch: Sequence[Reply]) -> Any:
    """The whole path for one round of replies: a fresh store, each reply received and pulled, then FedAvg."""
    store = new_store()
    return fedavg([serverapp_pull(store, superlink_receive(store, r)) for r in batch])
