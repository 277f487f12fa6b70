"""Exact communication cost, measured client FLOPs and memory.

Message size
    A message is a named state. Its size is the tensor payload plus the UTF-8 parameter names:
    ``sum(a.nbytes) + sum(len(name.encode()))``. That is what any transport must carry at the
    least; framing (safetensors header, gRPC) adds a few hundred bytes per message and is
    reported by the Flower runtime separately.
FLOPs
    One real training step is run under :class:`torch.utils.flop_counter.FlopCounterMode`
    (forward + backward + what the optimizer does in matmuls); the count per processed token
    (text) or sample (image) then scales to every client's work.
Memory
    Peak resident memory of the process, and the bytes a client needs to hold its trainable
    state during training (parameters + gradients + two AdamW moments).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from torch import nn

T = TypeVar("T")


def message_bytes(state: Mapping[str, np.ndarray]) -> int:
    """Bytes of one message carrying ``state``: tensor payload + UTF-8 names."""
    return sum(int(np.asarray(a).nbytes) + len(name.encode("utf-8")) for name, a in state.items())


def model_message_bytes(model: nn.Module) -> int:
    """What one message would cost if it carried every parameter (the full-FedAvg equivalent)."""
    return sum(
        p.numel() * p.element_size() + len(name.encode("utf-8")) for name, p in model.named_parameters()
    )


def measure_step_flops(step: Callable[[], T]) -> tuple[float, T]:
    """Run ``step()`` under a FLOP counter; return (FLOPs, step's return value)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = step()
    return float(counter.get_total_flops()), out


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or :func:`reset_peak_rss`, in MiB."""
    try:
        with open("/proc/self/status") as f:  # Linux: VmHWM, which reset_peak_rss can reset
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never resets
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement at the current RSS, so that several runs in one process
    (a sweep) each report their own peak. Linux only (``/proc/self/clear_refs``); returns whether
    it worked (elsewhere the peak stays the process's maximum so far)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def train_state_bytes(model: nn.Module, optimizer: str = "adamw") -> int:
    """Bytes a client holds for its trainable part: params + grads (+ 2 moments for AdamW)."""
    copies = 4 if optimizer == "adamw" else 3  # sgd: params, grads, momentum
    return copies * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
