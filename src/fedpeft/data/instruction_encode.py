"""Encode prompt/response pairs for a causal LM: the loss on the response tokens only.

A row becomes ``prefix + prompt + response + [eos]``: ``prefix`` is the beginning-of-sequence
token when the tokenizer adds one itself (LLaMA's ``<s>``; GPT-2 and BERT-vocabulary tiny models
add none), prompt and response are tokenized separately without special tokens (so the boundary
is exact), and ``eos`` is the model's end-of-sequence id, which teaches it to stop. ``labels`` are
the ``input_ids`` with every prefix, prompt and padding position set to -100, so the model's
cross-entropy (which predicts ``labels[t + 1]`` from position ``t``) counts the response tokens
and EOS only.

Chat data (``data.format = "chat"``) is rendered with the tokenizer's chat template when it has
one: the prompt is ``apply_chat_template(context, add_generation_prompt=True)``, the response the
rest of ``apply_chat_template(context + [answer])`` (the template's own end-of-turn markup instead
of ``eos``). Without a template, the plain template :func:`plain_chat_prompt`: one
``"{role}: {content}\\n"`` line per context message, then ``"assistant: "``; the response is the
answer + ``eos``.

Truncation to ``model.max_length`` keeps the response (:func:`fit_to_length`): the prompt is cut
from the left first (its end, next to the response, is kept), always keeping one prompt token to
predict the first response token from; only when the response alone does not fit is it cut from
the right (its EOS dropped: the text goes on). A response is never dropped whole.

Rows are stored right-padded to ``max_length`` (``EncodedSplit.padding_side = "right"``: no
position ids are needed) and cached like classification encodings
(:func:`fedpeft.data.encode.cache_key`); :meth:`~fedpeft.data.encode.EncodedSplit.batch` trims a
batch to its longest row, labels included (dynamic padding).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from fedpeft.data.encode import TEXT_CHUNK, EncodedSplit, _load, _save, cache_key, default_cache_dir
from fedpeft.errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a position the loss skips (torch cross_entropy's ignore_index)


def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The documented template for tokenizers without a chat template: one ``"{role}: {content}\\n"``
    line per message, then ``"assistant: "`` (the response follows)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def special_prefix(tokenizer: Any) -> list[int]:
    """The tokens the tokenizer puts before a text by itself, when they are its BOS token (LLaMA's
    ``<s>``); ``[]`` otherwise (GPT-2 adds nothing; a BERT vocabulary's ``[CLS]`` is no BOS)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            prefix = with_special[:start]
            return prefix if prefix and all(t == bos for t in prefix) else []
    return []


def fit_to_length(prefix: list[int], prompt: list[int], response: list[int], eos: list[int],
                  max_length: int) -> tuple[list[int], int]:
    """``prefix + prompt + response + eos`` cut to ``max_length`` tokens, keeping the response.

    Returns
    -------
    ids : list of int
        At most ``max_length`` token ids.
    masked : int
        How many leading ids are not trained on (prefix + the kept prompt); ``ids[masked:]`` is the
        kept response (at least one token when ``max_length >= len(prefix) + 2``).
    """
    room = max_length - len(prefix)
    answer = response + eos
    if len(prompt) + len(answer) <= room:
        kept_prompt, kept_answer = prompt, answer
    elif len(answer) <= room - min(1, len(prompt)):  # cut the prompt from the left, keep its end
        kept_prompt, kept_answer = prompt[len(prompt) - (room - len(answer)):], answer
    else:  # the response alone does not fit: one prompt token, the response cut from the right
        kept_prompt = prompt[-1:]
        kept_answer = response[: room - len(kept_prompt)]
    return prefix + kept_prompt + kept_answer, len(prefix) + len(kept_prompt)


def render_prompts(split: datasets.Dataset, fmt: str, tokenizer: Any) -> tuple[list[str], list[str], bool]:
    """The prompt and response texts of ``split`` as the model sees them, and whether an EOS id
    follows each response (False: a chat template's end-of-turn markup ends it)."""
    prompts, responses = split["prompt"], split["response"]
    if fmt != "chat":
        return prompts, responses, True
    contexts = [json.loads(p) for p in prompts]
    if getattr(tokenizer, "chat_template", None):
        rendered, answers = [], []
        for context, answer in zip(contexts, responses):
            prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
            whole = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}], tokenize=False)
            if not whole.startswith(prompt):
                raise DataError(f"tokenizer {tokenizer.name_or_path!r}: its chat template does not render a "
                                "conversation as the generation prompt followed by the answer; fedpeft cannot "
                                "mask the prompt (use data.format = \"columns\" with rendered prompts)")
            rendered.append(prompt)
            answers.append(whole[len(prompt):])
        return rendered, answers, False
    return [plain_chat_prompt(c) for c in contexts], responses, True


def encode_instructions(split: datasets.Dataset, tokenizer: Any, fmt: str, max_length: int, eos_id: int,
                        cache_dir: str | Path | None = None) -> EncodedSplit:
    """Tokenize ``split`` (``prompt``, ``response``) into ``input_ids``, ``attention_mask`` and
    ``labels`` (each (N, max_length) int64, right-padded), or load them from the cache.

    Parameters
    ----------
    split : datasets.Dataset
        From :func:`fedpeft.data.instructions.load_instructions`.
    tokenizer
        The model's tokenizer (its pad token pads; its chat template renders ``chat`` data).
    fmt : {"columns", "alpaca", "chat"}
    max_length : int
        Tokens per row (``model.max_length``), at least 4.
    eos_id : int
        The end-of-sequence id appended after a response.
    cache_dir : str or Path, optional
        Cache root, as for :func:`fedpeft.data.encode.encode`.
    """
    prefix = special_prefix(tokenizer) if not (fmt == "chat" and getattr(tokenizer, "chat_template", None)) else []
    identity = json.dumps({"base": cache_key(split, tokenizer, "text", max_length), "task": "causal-lm", "format": fmt,
                           "eos": eos_id, "prefix": prefix, "chat": getattr(tokenizer, "chat_template", None)},
                          sort_keys=True, default=str)
    key = "lm-" + hashlib.sha256(identity.encode()).hexdigest()[:32]
    path = Path(cache_dir or default_cache_dir()).expanduser() / "encoded" / f"{key}.safetensors"
    if path.is_file():
        try:
            return _load(path)
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file is rebuilt, never fatal
            log.warning("ignoring unreadable cache file %s (%s); re-encoding", path, exc)
    encoded = _encode(split, tokenizer, fmt, max_length, eos_id, prefix)
    try:
        _save(encoded, path)
    except OSError as exc:
        log.warning("could not write the encoding cache %s: %s", path, exc)
    return encoded


def _encode(split: datasets.Dataset, tokenizer: Any, fmt: str, max_length: int, eos_id: int,
            prefix: list[int]) -> EncodedSplit:
    if tokenizer.pad_token_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token; set tokenizer.pad_token")
    prompts, responses, with_eos = render_prompts(split, fmt, tokenizer)
    eos = [eos_id] if with_eos else []
    n = len(prompts)
    ids = np.full((n, max_length), tokenizer.pad_token_id, np.int64)
    mask = np.zeros((n, max_length), np.int64)
    labels = np.full((n, max_length), IGNORE, np.int64)
    cut = 0
    for start in range(0, n, TEXT_CHUNK):
        p_ids = tokenizer(prompts[start:start + TEXT_CHUNK], add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses[start:start + TEXT_CHUNK], add_special_tokens=False)["input_ids"]
        for i, (p, r) in enumerate(zip(p_ids, r_ids), start):
            if not r:
                raise DataError(f"row {i + 1}: the response {responses[i]!r} has no tokens")
            row, masked = fit_to_length(prefix, list(p), list(r), eos, max_length)
            cut += len(row) < len(prefix) + len(p) + len(r) + len(eos)
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
            labels[i, masked:len(row)] = row[masked:]
    if cut:
        log.info("%d of %d rows cut to model.max_length = %d (prompts from the left first)", cut, n, max_length)
    features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    return EncodedSplit(features, torch.from_numpy(labels), "right")


def prompt_lengths(split: EncodedSplit) -> torch.Tensor:
    """(N,) the number of leading tokens of each row that are not trained on (its prompt)."""
    trained = split.labels != IGNORE  # (N, L)
    return trained.to(torch.int64).argmax(-1)
