"""EL2N data pruning (SFPrompt's first client phase).

Paul, Ganguli, Dziugaite 2021 (https://arxiv.org/abs/2107.07075) score a row by the error L2 norm
``||softmax(f(x)) - onehot(y)||_2``; SFPrompt (https://arxiv.org/abs/2407.17533) computes it with
the client's own model, the head -> tail shortcut, and keeps the highest-scoring rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def el2n_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``||softmax(logits) - onehot(labels)||_2`` per row: ``(n, C), (n,) -> (n,)`` (float32)."""
    probs = torch.softmax(logits.float(), dim=-1)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    return torch.linalg.vector_norm(probs - onehot, dim=-1)


def keep_count(n: int, keep: float) -> int:
    """``ceil(keep * n)`` rows, at least one for a non-empty client (``0 < keep <= 1``)."""
    return min(n, max(1 if n else 0, math.ceil(keep * n - 1e-9)))


def keep_highest(indices: np.ndarray, scores: np.ndarray, keep: float) -> np.ndarray:
    """The ``ceil(keep * n)`` row ids of ``indices`` with the highest ``scores`` (ties: the earlier
    row), in their original order."""
    indices, scores = np.asarray(indices), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[: keep_count(len(indices), keep)]
    return indices[np.sort(order)]
