"""Choose each method's learning rates on a cheap proxy of the federated run (issue 12).

Under label skew the best local learning rate, and even the ranking of methods, do not carry over
from one dataset to another, so ``fedpeft tune CONFIG --methods lora,bias`` chooses them for
CONFIG's own data and federation. The proxy is CONFIG itself (model, training rows, partition,
clients per round, local training) run for few rounds (``rounds``, default 2, never more than
CONFIG's) with ``data.validation_fraction``: each run evaluates on a seeded slice of the train
split and never reads the test split (choosing on test would be tuning on test). A candidate's
score is its validation macro-F1 after the proxy's last round, averaged over seeds. A causal LM
(``task.kind = "causal-lm"``) has no macro-F1: its score is the validation token loss
(``eval_loss``, lower is better: it moves in every round, where exact match stays at 0 until a
model is nearly right; :data:`CAUSAL_LM`).

Ties at the top are run longer. Two candidates tie when their scores differ by at most
:data:`TIE_TOLERANCE` (macro-F1: 1e-3; token loss: exact equality). A short proxy under strong
imbalance can leave every candidate predicting the majority class, so they all get the same
macro-F1. When a method's best candidates tie after the last proxy round, only those candidates
resume their run folders for twice the rounds (never more than CONFIG's ``federation.rounds``)
and are scored again, until the best no longer ties or the cap is reached
(:meth:`fedpeft.tune.proxy._Proxy.settle`).
Only then does the tie-break decide: the lower validation loss (causal LM: the higher exact
match). ``Candidate.rounds`` is the round each candidate was scored at, and :class:`Tie` records
each extension.

Each method's candidates are ``federation.lr`` from :data:`DEFAULT_LRS`, crossed with
``federation.server_lr`` from :data:`DEFAULT_SERVER_LRS` when ``federation.server_optimizer`` is
not fedavg. ``--grid key=v1,v2`` replaces the axis of that key, or adds an axis. With
``halving`` (successive halving) every candidate runs 1 round, then the better half of each
method's candidates continue to 2 rounds, then 4, and so on up to ``rounds``.

When a method's best ``federation.lr`` lies on the edge of its default grid, the grid is extended
there by half a decade (:func:`next_lr`), at most :data:`MAX_EXTENSIONS` times per method: the
new candidate runs as many rounds as the chosen one was scored at, and is chosen if it scores
better (a tie between them runs both longer, as above). A user ``--grid`` of ``federation.lr`` is
taken as given and never extended.

Every proxy run is a sweep run folder under ``out`` (:mod:`fedpeft.sweep`). Running tune again
skips finished candidates and resumes killed ones. A failed candidate is reported and the others
go on.

Modules: :mod:`~fedpeft.tune.candidates` (objectives, candidates, ties, the tuning and its
commands), :mod:`~fedpeft.tune.proxy` (:func:`run_tune`), :mod:`~fedpeft.tune.report`
(``tune.json``, ``tune.md``, ``tune.png``).
"""

from fedpeft.tune.candidates import (
    CAUSAL_LM, CLASSIFICATION, METRICS, TIE_TOLERANCE, Candidate, Objective, Tie, Tuning)
from fedpeft.tune.proxy import (
    DEFAULT_LRS, DEFAULT_SERVER_LRS, MAX_EXTENSIONS, halving_stages, method_grid, next_lr, proxy_sets, run_tune)
from fedpeft.tune.report import grid_table, plot_tuning, tie_notes, tune_markdown, write_tuning

__all__ = ["CAUSAL_LM", "CLASSIFICATION", "DEFAULT_LRS", "DEFAULT_SERVER_LRS", "MAX_EXTENSIONS", "METRICS",
           "TIE_TOLERANCE", "Candidate", "Objective", "Tie", "Tuning", "grid_table", "halving_stages", "method_grid",
           "next_lr", "plot_tuning", "proxy_sets", "run_tune", "tie_notes", "tune_markdown", "write_tuning"]
