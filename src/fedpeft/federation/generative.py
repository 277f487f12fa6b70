"""Evaluation of a causal LM on held-out instruction data: token loss, perplexity and generations.

Token loss
    The mean cross-entropy over every held-out response token (and EOS), the tokens the model
    trains on (:mod:`fedpeft.data.instruction_encode`): a sum over all rows divided by their number
    of target tokens, so long responses weigh by their length. ``perplexity = exp(eval_loss)``.
    Logits are computed a few rows at a time (at most :data:`LOGITS_BYTES` of float32 logits), so
    a vocabulary of 150k tokens does not need ``eval_batch_size x L x V`` floats at once.
Generation
    On the first ``task.generation_samples`` held-out rows: the row's prompt exactly as trained
    (prefix and kept prompt tokens), greedy decoding (``model.generate(do_sample=False)``) of at
    most ``task.max_new_tokens`` tokens, stopping at EOS, batched with left padding (prompt tuning:
    prompts of one length together, unpadded). The generation is the new tokens decoded with
    ``skip_special_tokens``.
Scores
    ``exact_match``: the share of generations equal to the reference response after both went
    through the tokenizer (encode + decode: an uncased vocabulary's lowercasing is no miss) and
    whitespace is collapsed. ``rouge_l``: the mean ROUGE-L F-measure (Lin 2004,
    https://aclanthology.org/W04-1013/) of generation against the reference, by Google's
    ``rouge-score`` package (its default tokenizer: lowercased, ASCII letters and digits only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedpeft.data.encode import EncodedSplit
from fedpeft.data.instruction_encode import IGNORE, prompt_lengths
from fedpeft.errors import DataError

LOGITS_BYTES = 256 * 2**20  # float32 logits held at once while computing the token loss


@torch.no_grad()
def token_loss(model: nn.Module, split: EncodedSplit, batch_size: int) -> tuple[float, int]:
    """(sum of the cross-entropy over every target token of ``split``, the number of those tokens)."""
    model.eval()
    vocab = int(_base_config(model).vocab_size)
    total, count = 0.0, 0
    order = torch.arange(len(split))
    for i in range(0, len(split), batch_size):
        batch = split.batch(order[i:i + batch_size])
        rows = max(1, LOGITS_BYTES // (4 * vocab * batch["input_ids"].shape[1]))
        for j in range(0, len(batch["labels"]), rows):
            part = {k: v[j:j + rows] for k, v in batch.items()}
            labels = part.pop("labels")  # (b, L)
            logits = model(**part).logits[:, -labels.shape[1]:].float()  # prompt tuning prepends its tokens
            total += float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                       ignore_index=IGNORE, reduction="sum"))
            count += int((labels[:, 1:] != IGNORE).sum())
    return total, count


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], pad_id: int, eos_ids: list[int],
                    max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy continuations (the new token ids, cut before the first EOS) of ``prompts``.

    Batched with left padding; a peft prompt-tuning model drops position ids, so left padding
    would shift its positions: its prompts are batched by length instead (no padding at all).
    """
    model.eval()
    if is_prompt_learning(model):
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(i)
        groups = [rows[j:j + batch_size] for rows in by_length.values() for j in range(0, len(rows), batch_size)]
    else:
        groups = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    out: dict[int, list[int]] = {}
    for rows in groups:
        width = max(len(prompts[r]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(prompts[r]):] = torch.tensor(prompts[r])
            mask[k, width - len(prompts[r]):] = 1
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids)
        for r, row in zip(rows, generated[:, width:].tolist()):
            out[r] = row[:next((k for k, t in enumerate(row) if t in eos_ids), len(row))]
    return [out[i] for i in range(len(prompts))]


def is_prompt_learning(model: nn.Module) -> bool:
    """True for a peft prompt-tuning model (it prepends its prompts and ignores position ids)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def evaluate_causal_lm(model: nn.Module, split: EncodedSplit, references: list[str], tokenizer: Any,
                       batch_size: int, eos_ids: list[int], max_new_tokens: int,
                       samples: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Held-out token loss and perplexity on ``split``, and greedy generation on its first
    ``samples`` rows scored against ``references`` (their response texts).

    Returns
    -------
    metrics : dict
        ``eval_loss``, ``perplexity``, ``exact_match``, ``rouge_l`` (the last two None when
        ``samples`` is 0) and ``loss`` (= ``eval_loss``).
    generations : list of dict
        One per generated row: ``row``, ``prompt``, ``reference``, ``generation``,
        ``exact_match``, ``rouge_l``.
    """
    total, count = token_loss(model, split, batch_size)
    loss = total / max(1, count)
    metrics: dict[str, Any] = {"loss": loss, "eval_loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
                               "exact_match": None, "rouge_l": None}
    n = min(samples, len(split))
    if n == 0:
        return metrics, []
    ids, lengths = split.features["input_ids"], prompt_lengths(split)
    prompts = [ids[i, :int(lengths[i])].tolist() for i in range(n)]
    continuations = greedy_generate(model, prompts, tokenizer.pad_token_id, eos_ids, max_new_tokens, batch_size)
    scorer = _rouge()
    generations = []
    for i, (prompt, tokens) in enumerate(zip(prompts, continuations)):
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        reference = references[i]
        exact = _normalized(text) == _normalized(_round_trip(tokenizer, reference))
        rouge = float(scorer.score(reference, text)["rougeL"].fmeasure)
        generations.append({"row": i, "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                            "reference": reference, "generation": text, "exact_match": exact, "rouge_l": rouge})
    metrics.update(exact_match=sum(g["exact_match"] for g in generations) / n,
                   rouge_l=sum(g["rouge_l"] for g in generations) / n)
    return metrics, generations


def eos_token_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The ids that end a response: first the one fedpeft appends to every response (the
    tokenizer's EOS, else the model config's), then the generation config's (instruct models also
    stop at their end-of-turn token).

    Raises
    ------
    DataError
        When neither the tokenizer nor the model has an EOS token.
    """
    first = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _base_config(model).eos_token_id
    first = first[0] if isinstance(first, (list, tuple)) else first
    if first is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} and the model have no EOS token: "
                        "a response needs one to end; set tokenizer.eos_token")
    generation = getattr(_base_model(model), "generation_config", None)
    more = getattr(generation, "eos_token_id", None)
    more = list(more) if isinstance(more, (list, tuple)) else [more]
    return list(dict.fromkeys(int(i) for i in [first, *more] if i is not None))


def _round_trip(tokenizer: Any, text: str) -> str:
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _base_config(model: nn.Module) -> Any:
    return _base_model(model).config
