"""How a named state crosses Flower: one ArrayRecord, few objects, names kept.

Flower ships every Array of a record as separate objects (array + chunks), one request per object
per hop (ServerApp -> SuperLink -> SuperNode -> worker and back); LoRA on a 6-layer model has 26
arrays, on a 32-layer LLaMA hundreds. :func:`state_to_record` packs a state into a ``layout``
(names, dtypes, shapes as JSON) and one flat buffer per dtype: 2-3 arrays whatever its size.

bfloat16 (``federation.exchange_dtype``): NumPy, hence Flower's ``Array``, has no bfloat16.
Floating arrays then travel as their 16 bfloat16 bits in one ``uint16`` buffer,
``buffer.bfloat16``, with the dtype ``"bfloat16"`` in the layout; decoding gives float32 arrays
holding exactly those values (:mod:`fedpeft.federation.precision`).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.federation.precision import bf16_bits, from_bf16_bits, is_exchanged_float
from fedpeft.methods.base import NamedArrays

BF16 = "bfloat16"  # the layout's dtype of values carried as bfloat16 bits (a uint16 buffer)


def state_to_record(state: NamedArrays, exchange_dtype: str = "float32") -> ArrayRecord:
    """Named arrays as one ArrayRecord: a ``layout`` (names, dtypes, shapes as JSON) and one flat
    buffer per dtype; the names travel with the data. ``exchange_dtype = "bfloat16"``: floating
    arrays as bfloat16 bits (rounded to nearest even; lossless for values already rounded)."""
    def wire_dtype(a: np.ndarray) -> str:
        return BF16 if exchange_dtype == BF16 and is_exchanged_float(a) else a.dtype.str

    layout = [[name, wire_dtype(a), list(a.shape)] for name, a in state.items()]
    record = {"layout": Array(np.frombuffer(json.dumps(layout).encode(), np.uint8).copy())}
    for dtype in dict.fromkeys(d for _, d, _ in layout):
        flat = [np.ascontiguousarray(a).reshape(-1) for a in state.values() if wire_dtype(a) == dtype]
        values = np.concatenate(flat)
        record[f"buffer.{dtype}"] = Array(bf16_bits(values.astype(np.float32)) if dtype == BF16 else values)
    return ArrayRecord(record)


def record_to_state(record: ArrayRecord, exchange_dtype: str | None = None) -> NamedArrays:
    """The named arrays of :func:`state_to_record` (bfloat16 ones as float32); ``ValueError``
    naming what does not fit. ``exchange_dtype`` (the run's ``federation.exchange_dtype``): every
    floating array must have arrived in it."""
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
        stored = np.dtype(np.uint16) if dtype == BF16 else np.dtype(dtype)
        if buffer.dtype != stored or start + size > buffer.size:
            raise ValueError(f"{name}: {key} holds {buffer.size} {buffer.dtype} values, the layout needs more")
        if exchange_dtype is not None and (dtype == BF16 or stored.kind == "f") and (dtype == BF16) != (exchange_dtype == BF16):
            raise ValueError(f"{name}: arrived as {dtype}, but federation.exchange_dtype = {exchange_dtype!r}")
        values = buffer[start:start + size]
        state[name] = (from_bf16_bits(values) if dtype == BF16 else values).reshape(shape)
        offsets[key] = start + size
    for key in set(record) - {"layout"}:
        if offsets.get(key, 0) != (buffers[key] if key in buffers else record[key].numpy()).size:
            raise ValueError(f"{key} holds values that no name in the layout takes")
    return state


def wire_bytes(content: RecordDict) -> int:
    """Bytes Flower serializes for ``content``: every distinct object it ships, deflated."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
