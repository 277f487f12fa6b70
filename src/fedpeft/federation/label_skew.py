"""Client-side losses against label skew, computed from a client's own label counts.

Each loss is a pure function of ``(logits (B, C), labels (B,), class_counts (C,))`` and returns
the mean loss over the batch (a scalar tensor). ``class_counts[c]`` is the number of the client's
training rows of class ``c``; the counts stay on the client (nothing about them is sent).
:class:`~fedpeft.federation.client.ClientTrainer` uses these losses in place of the model's own
cross-entropy when ``federation.label_skew`` is ``"fedlc"`` or ``"fedrs"``; evaluation is
unchanged (plain argmax of the logits).

- FedLC (Zhang et al., ICML 2022, https://proceedings.mlr.press/v162/zhang22p.html): logits
  calibration, cross-entropy on ``logits - tau * n_c^(-1/4)``.
- FedRS (Li and Zhan, KDD 2021, https://dl.acm.org/doi/10.1145/3447548.3467254): restricted
  softmax, the logits of the classes the client has no rows of are scaled by ``alpha``.

FedLC's authors published no code; both losses follow the public implementations (FL-bench,
FedDecorr, the Flower baseline; FedRS also its authors' FedRepo), see ``docs/methods.md``,
"Client-side corrections".
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

FEDLC_TAU = 1.0  # federation.fedlc_tau when unset (FL-bench's default)
FEDRS_ALPHA = 0.5  # federation.fedrs_alpha when unset (FedDecorr's default; the FedRS grid 0.1/0.5/0.9)


def fedlc_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor, tau: float = FEDLC_TAU
) -> torch.Tensor:
    """FedLC's calibrated cross-entropy: cross-entropy on ``logits - tau * n_c^(-1/4)``.

    Zhang et al., "Federated Learning with Label Distribution Skew via Logits Calibration",
    ICML 2022, https://proceedings.mlr.press/v162/zhang22p.html. A class's logit is
    lowered by ``tau * n_c^(-1/4)``: the fewer rows the client has of it, the more, so its rare
    classes must win by a margin and its frequent ones are not over-predicted.

    A class the client has no rows of (``n_c = 0``) has an infinite shift: it leaves the client's
    softmax (its calibrated logit is ``-inf``) and gets no gradient, as in the public
    implementations (FedDecorr's ``class2data ** (-0.25)`` on zero counts, the Flower baseline's
    ``class_count.pow(-0.25)``; FL-bench's ``n_c = 1e-8`` is the same up to ``exp(-100 tau)``).
    The target's own logit stays in the denominator (standard cross-entropy), as in all of them
    (FL-bench notes that the paper's loss leaves it out and that training collapsed that way).

    Parameters
    ----------
    logits : torch.Tensor
        (B, C) raw class scores.
    labels : torch.Tensor
        (B,) int64 class ids; every one must have ``class_counts[label] > 0``.
    class_counts : torch.Tensor
        (C,) the client's number of training rows per class.
    tau : float
        Calibration strength, > 0.

    Returns
    -------
    torch.Tensor
        The mean calibrated loss over the batch (a scalar), in ``logits``' dtype.

    Raises
    ------
    ValueError
        If a label's class has a count of 0 (its loss would be infinite).
    """
    counts = _checked_counts(logits, labels, class_counts)
    present = counts > 0
    shift = tau * counts.clamp(min=1).pow(-0.25)  # (C,); absent classes masked just below
    calibrated = (logits - shift).masked_fill(~present, float("-inf"))
    return F.cross_entropy(calibrated, labels)


def fedrs_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor, alpha: float = FEDRS_ALPHA
) -> torch.Tensor:
    """FedRS's restricted softmax: cross-entropy on logits whose absent classes are scaled by ``alpha``.

    Li and Zhan, "FedRS: Federated Learning with Restricted Softmax for Label Distribution
    Non-IID Data", KDD 2021, https://dl.acm.org/doi/10.1145/3447548.3467254. The logit of every
    class the client has no rows of is multiplied by ``alpha`` in (0, 1], which scales down both
    the softmax weight and the gradient that pushes that class's logit down; ``alpha = 1`` is
    plain cross-entropy.

    The whole logit is scaled, the classifier's bias included, as FedDecorr's ``out *= class2data``
    and the Flower baseline do; the authors' code (FedRepo) scales ``h @ W^T`` of a bias-free
    classifier, where the two are the same. FedRepo also scales present classes by
    ``alpha + (1 - alpha) * n_c / max(n)``; here, as in FedDecorr and the Flower baseline, every
    present class keeps scale 1.

    Parameters
    ----------
    logits : torch.Tensor
        (B, C) raw class scores.
    labels : torch.Tensor
        (B,) int64 class ids; every one must have ``class_counts[label] > 0``.
    class_counts : torch.Tensor
        (C,) the client's number of training rows per class.
    alpha : float
        Scale of the absent classes' logits, in (0, 1].

    Returns
    -------
    torch.Tensor
        The mean restricted loss over the batch (a scalar), in ``logits``' dtype.

    Raises
    ------
    ValueError
        If a label's class has a count of 0 (the counts are not this client's).
    """
    counts = _checked_counts(logits, labels, class_counts)
    scale = torch.full_like(counts, alpha).masked_fill(counts > 0, 1.0)  # (C,) in logits' dtype
    return F.cross_entropy(logits * scale, labels)


def _checked_counts(logits: torch.Tensor, labels: torch.Tensor, class_counts: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 2 or class_counts.shape != (logits.shape[-1],):
        raise ValueError(
            f"expected logits (B, C) and class_counts (C,), got {tuple(logits.shape)} and "
            f"{tuple(class_counts.shape)}"
        )
    counts = class_counts.to(device=logits.device, dtype=logits.dtype)
    if not bool((counts[labels] > 0).all()):
        raise ValueError("a label's class has a count of 0: class_counts must count the client's own rows")
    return counts
