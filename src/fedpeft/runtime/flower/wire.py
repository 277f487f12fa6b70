"""How a named state crosses Flower: one ArrayRecord, few objects, names kept.

Flower ships every Array of a record as separate objects (array + chunks), one request per object
per hop (ServerApp -> SuperLink -> SuperNode -> worker and back); LoRA on a 6-layer model has 26
arrays, on a 32-layer LLaMA hundreds. :func:`state_to_record` packs a state into a ``layout``
(names, dtypes, shapes as JSON) and one flat buffer per dtype: 2-3 arrays whatever its size.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.methods.base import NamedArrays


def state_to_record(state: NamedArrays) -> ArrayRecord:
    """Named arrays as one ArrayRecord: a ``layout`` (names, dtypes, shapes as JSON) and one flat
    buffer per dtype; the names travel with the data."""
    layout = [[name, a.dtype.str, list(a.shape)] for name, a in state.items()]
    record = {"layout": Array(np.frombuffer(json.dumps(layout).encode(), np.uint8).copy())}
    for dtype in dict.fromkeys(a.dtype for a in state.values()):
        flat = [np.ascontiguousarray(a).reshape(-1) for a in state.values() if a.dtype == dtype]
        record[f"buffer.{dtype.str}"] = Array(np.concatenate(flat))
    return ArrayRecord(record)


def record_to_state(record: ArrayRecord) -> NamedArrays:
    """The named arrays of :func:`state_to_record`; ``ValueError`` naming what does not fit."""
    if "layout" not in record:
        raise ValueError(f"no layout among the arrays {sorted(record)}")
    layout = json.loads(record["layout"].numpy().tobytes().decode())
    offsets: dict[str, int] = {}
    buffers: dict[str, np.ndarray] = {}  # each decoded once (Array.numpy() parses the bytes anew)
    state = {}
    for name, dtype, shape in layout:
        key = f"buffer.{dtype}"
        if key not in record:
            raise ValueError(f"{name}: no {key} array")
        if key not in buffers:
            buffers[key] = record[key].numpy()
        buffer, start = buffers[key], offsets.get(key, 0)
        size = int(np.prod(shape, dtype=np.int64))
        if buffer.dtype != np.dtype(dtype) or start + size > buffer.size:
            raise ValueError(f"{name}: {key} holds {buffer.size} {buffer.dtype} values, the layout needs more")
        state[name] = buffer[start:start + size].reshape(shape)
        offsets[key] = start + size
    for key in set(record) - {"layout"}:
        if offsets.get(key, 0) != (buffers[key] if key in buffers else record[key].numpy()).size:
            raise ValueError(f"{key} holds values that no name in the layout takes")
    return state


def wire_bytes(content: RecordDict) -> int:
    """Bytes Flower serializes for ``content``: every distinct object it ships, deflated."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
