"""Split federated fine-tuning (SFPrompt, https://arxiv.org/abs/2407.17533).

- :mod:`.model`: cut a prepared model into head / body / tail (:class:`SplitModel`);
- :mod:`.protocol`: the transport-free body-server protocol (:class:`BodyServer`, named-tensor
  :class:`Message`, :class:`InProcessBodyServer` counting every byte that crosses);
- :mod:`.pruning`: EL2N scores and top-k row selection;
- :mod:`.session`: a client's round as a resumable state machine, one body-server exchange at a
  time (:class:`~fedpeft.split.session.SplitSession`: snapshot / restore between messages);
- :mod:`.trainer`: a client's SFPrompt round (:class:`~fedpeft.split.trainer.SplitTrainer`).
"""

from fedpeft.split.model import SPLIT_FAMILIES, BlockInputs, HeadOutput, SplitModel, check_cut
from fedpeft.split.protocol import BodyServer, InProcessBodyServer, Message, Traffic, context_of, forward_message
from fedpeft.split.pruning import el2n_scores, keep_count, keep_highest

__all__ = ["SPLIT_FAMILIES", "BlockInputs", "BodyServer", "HeadOutput", "InProcessBodyServer", "Message", "SplitModel",
           "Traffic", "check_cut", "context_of", "el2n_scores", "forward_message", "keep_count", "keep_highest"]
