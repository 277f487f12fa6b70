"""The model card parts of a causal-LM export (``task.kind = "causal-lm"``; :mod:`fedpeft.export`).

The folder itself is what :func:`fedpeft.export.export_model` writes for every task: ``lora`` and
``prompt`` a peft adapter folder (task type ``CAUSAL_LM``) that
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads;
``full`` and ``layers`` the whole model (:func:`save_full_weights`: ``model.safetensors`` +
``config.json``, which ``AutoModelForCausalLM.from_pretrained(folder)`` loads alone); ``bias`` the
trained tensors in ``exchanged.safetensors`` over the base; ``adapter`` the same after
``add_adapters``. The config carries no labels. The card's snippets
load it with ``AutoModelForCausalLM`` and generate greedily from a prompt rendered as in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from fedpeft.experiment import Experiment


def save_full_weights(model: nn.Module, directory: Path) -> None:
    """Write ``model`` (its global state loaded) as a plain ``transformers`` model folder.

    ``save_pretrained`` writes every weight (a tied LM head once, as ``transformers`` ties it on
    load) in the model's dtype, and its generation config.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))


def results_rows(exp: "Experiment", summary: dict[str, Any]) -> list[str]:
    """The card's task-specific rows: data and the final held-out scores."""
    def number(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return [
        f"| data | {exp.data.source}, format `{exp.data.format}`, {len(exp.train)} train rows |",
        f"| rounds | {summary.get('rounds_completed', 'n/a')} |",
        f"| final held-out token loss / perplexity | {number(summary.get('final_eval_loss'))} / "
        f"{number(summary.get('final_perplexity'))} |",
        f"| final exact match / ROUGE-L (greedy, {exp.cfg.task.generation('generation_samples')} held-out rows) | "
        f"{number(summary.get('final_exact_match'))} / {number(summary.get('final_rouge_l'))} |",
    ]


def load_code(base_kind: str, base_reference: str, is_peft: bool, rebuild: str | None, merged: bool) -> str:
    """Python that builds ``model`` (a causal LM) and ``tokenizer`` from this folder."""
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer", ""]
    if merged:
        return "\n".join(lines + ['model_dir = "model"  # this folder',
                                  "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
                                  "model = AutoModelForCausalLM.from_pretrained(model_dir).eval()"])
    ref = 'f"{model_dir}/base"' if base_kind == "included" else json.dumps(base_reference)
    lines[0:0] = ["from peft import PeftModel" if is_peft else "from safetensors.torch import load_file"]
    lines += ['model_dir = "model"  # this folder', f"base_ref = {ref}",
              "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
              "model = AutoModelForCausalLM.from_pretrained(base_ref)"]
    if is_peft:
        lines.append("model = PeftModel.from_pretrained(model, model_dir)")
    else:
        lines += ["", rebuild, ""] if rebuild else []
        lines += ['missing, unexpected = model.load_state_dict(load_file(f"{model_dir}/exchanged.safetensors"), strict=False)',
                  "assert not unexpected  # missing: the frozen pre-trained parameters"]
    return "\n".join(lines + ["model.eval()"])


def generate_code(exp: "Experiment") -> str:
    """Python that generates a response greedily, the prompt tokenized as fedpeft trained on it."""
    eos = exp.eos_ids
    prompt = {"alpaca": '"### Instruction:\\nName a colour.\\n\\n### Response:\\n"  # the Alpaca template (docs/config.md)',
              "chat": '"user: Name a colour.\\nassistant: "  # the chat template, or this plain one (docs/config.md)'}.get(
        exp.data.format, '"Name a colour."')
    return "\n".join([
        "import torch", "",
        f"prompt = {prompt}",
        "ids = tokenizer(prompt, add_special_tokens=False, return_tensors=\"pt\").input_ids"
        + ("" if not _bos(exp) else "\nids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)  # as trained"),
        "with torch.no_grad():",
        f"    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens="
        f"{exp.cfg.task.generation('max_new_tokens')}, do_sample=False, eos_token_id={eos}, "
        "pad_token_id=tokenizer.pad_token_id)",
        "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
    ])


def _bos(exp: "Experiment") -> bool:
    from fedpeft.data.instruction_encode import special_prefix

    return bool(special_prefix(exp.processor)) and not (exp.data.format == "chat" and exp.processor.chat_template)
