"""Weight and exchange precision: ``model.dtype`` and ``federation.exchange_dtype``.

NumPy has no bfloat16, so every named state in memory (global state, client results,
checkpoints) stays float32; bfloat16 is a property of what crosses between server and clients.
With ``federation.exchange_dtype = "bfloat16"`` every floating value of a message (the state down
and up, SCAFFOLD's control variates) is rounded to bfloat16 where it leaves its sender
(:func:`to_exchange`: round to nearest, ties to even, as ``torch.Tensor.to(torch.bfloat16)``),
counted at 2 bytes (:func:`value_bytes`), and carried by the Flower runtime as the 16 raw bits
(:func:`bf16_bits`, :mod:`fedpeft.runtime.flower.wire`). A rounded float32 holds a bfloat16 value
exactly, so the bits and back are lossless and every runtime aggregates the same numbers.

The server aggregates those values in float64 (:class:`~fedpeft.federation.aggregate.RunningFedAvg`)
and keeps the global state in float32 (the master weights, which the server optimizer steps); it
is rounded to bfloat16 only when sent.

Examples
--------
>>> import numpy as np
>>> to_exchange({"w": np.array([1.00390625, 3.0], np.float32)}, "bfloat16")["w"]
array([1., 3.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

EXCHANGE_ITEMSIZE = {"float32": 4, "bfloat16": 2}  # bytes per floating value of a message


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` as the bits of the nearest bfloat16 (ties to even), ``uint16``.

    NaN stays a (quiet) NaN of the same sign; infinities and signed zeros are kept; a value
    beyond bfloat16's largest finite one rounds to infinity, as torch does.
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    nan = np.isnan(values)
    if nan.any():
        rounded = np.where(nan, (bits >> 16) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 ``bits`` (``uint16``): exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bf16(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to the nearest bfloat16, as float32."""
    return from_bf16_bits(bf16_bits(values)).reshape(np.shape(values))


def is_exchanged_float(value: np.ndarray) -> bool:
    """Floating arrays take the exchange dtype; integer ones (counters) cross as they are."""
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def to_exchange(state: Mapping[str, np.ndarray] | None, dtype: str) -> Any:
    """``state`` as it crosses in ``dtype``: float32 (unchanged, the same object) or every
    floating array rounded to bfloat16 (kept as float32 arrays holding bfloat16 values)."""
    if state is None or dtype == "float32":
        return state
    return {k: round_bf16(v) if is_exchanged_float(v) else v for k, v in state.items()}


def exchange_result(result: Any, dtype: str) -> Any:
    """A client's :class:`~fedpeft.federation.strategy.ClientResult` as it leaves the client:
    its state and control variate in the exchange dtype."""
    if dtype == "float32":
        return result
    return replace(result, state=to_exchange(result.state, dtype), control=to_exchange(result.control, dtype))


def value_bytes(value: np.ndarray, dtype: str = "float32") -> int:
    """Payload bytes of one array in a message of exchange ``dtype``."""
    value = np.asarray(value)
    if dtype != "float32" and is_exchanged_float(value):
        return value.size * EXCHANGE_ITEMSIZE[dtype]
    return int(value.nbytes)

