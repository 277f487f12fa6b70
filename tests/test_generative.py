"""task.kind = "causal-lm": instruction data, response-only loss, the method matrix on tiny decoders,
evaluation by generation, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import interrupt_and_resume

from fedpeft.config import Config, ModelConfig
from fedpeft.errors import ConfigError
from fedpeft.methods import get_method_class, method_names, trainable_names
from fedpeft.models import load_model

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tiny tensors: one torch thread (conftest)
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),  # peft 0.21 on transformers 5
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`"),  # LoRA on lm_head saves it
]

DECODERS = ["tiny-gpt2", "tiny-llama"]
CAUSAL_METHODS = [m for m in method_names() if get_method_class(m).causal_lm_refused is None]
# bias on LLaMA (no biases, no head: nothing trains) is refused when the model is prepared
MATRIX = [(m, f) for m in CAUSAL_METHODS for f in DECODERS if (m, f) != ("bias", "tiny-llama")]


def causal(name: str, seed: int = 0):
    return load_model(ModelConfig(name=name, max_length=32), [], seed, task="causal-lm")


def prepared(method: str, family: str):
    loaded = causal(family)
    m = get_method_class(method)()
    return loaded, m, m.prepare(loaded.model, loaded.info)


def cfg_dict(**sections) -> dict:
    raw = {"model": {"name": "tiny-gpt2", "max_length": 32}, "task": {"kind": "causal-lm"},
           "data": {"train": "train.jsonl", "test": "test.jsonl"}, "method": {"name": "lora"},
           "partition": {"num_clients": 2}}
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return raw


# --------------------------------------------------------------------------- task axis and refusals


def test_every_method_says_what_it_does_for_causal_lm():
    for name in method_names():
        cls = get_method_class(name)
        assert bool(cls.causal_lm) != (cls.causal_lm_refused is not None), name
    assert {"head", "sfprompt"} == {m for m in method_names() if get_method_class(m).causal_lm_refused}


@pytest.mark.parametrize("method,message", [
    ("head", "no task head"),
    ("sfprompt", "one label per row"),
])
def test_methods_without_causal_lm_are_refused_when_the_config_is_built(method, message):
    with pytest.raises(ConfigError, match=rf'method.name: "{method}" with task.kind = "causal-lm": .*{message}'):
        Config.from_dict(cfg_dict(method={"name": method}))


def test_bias_on_a_model_without_biases_is_refused_when_prepared():
    loaded = causal("tiny-llama")
    with pytest.raises(ConfigError, match="no bias parameters and no classification head"):
        get_method_class("bias")().prepare(loaded.model, loaded.info)


@pytest.mark.parametrize("sections,key", [
    ({"model": {"name": "tiny-bert"}}, "model.name"),
    ({"model": {"name": "minilm"}}, "model.name"),
    ({"model": {"max_length": 3}}, "model.max_length"),
    ({"partition": {"scheme": "dirichlet"}}, "partition.scheme"),
    ({"partition": {"scheme": "shards"}}, "partition.scheme"),
    ({"federation": {"label_skew": "fedlc"}}, "federation.label_skew"),
    ({"attack": {"kind": "label_flip", "fraction": 0.5}}, "attack.kind"),
    ({"data": {"text_column": "text"}}, "data.text_column"),
    ({"data": {"label_column": "label"}}, "data.label_column"),
    ({"data": {"format": "alpaca", "prompt_column": "q"}}, "data.prompt_column"),
    ({"task": {"max_new_tokens": 0}}, "task.max_new_tokens"),
    ({"task": {"generation_samples": -1}}, "task.generation_samples"),
])
def test_causal_lm_config_errors_name_the_key(sections, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        Config.from_dict(cfg_dict(**sections))


@pytest.mark.parametrize("kind", ["flower-sim", "flower"])
def test_the_flower_runtimes_take_causal_lm_configs_unchanged(kind):
    # runs: tests/test_flower.py (the real ClientApp), tests/test_flower_secure.py (a deployment)
    cfg = Config.from_dict(cfg_dict(runtime={"kind": kind}))
    assert cfg.runtime.kind == kind and cfg.task.generative
    with pytest.raises(ConfigError, match='^method.name: "sfprompt" with task.kind = "causal-lm"'):
        Config.from_dict(cfg_dict(runtime={"kind": kind}, method={"name": "sfprompt"}))


@pytest.mark.parametrize("table,key", [
    ({"data": {"prompt_column": "q"}}, "data.prompt_column"),
    ({"data": {"format": "chat"}}, "data.format"),
    ({"data": {"category_column": "domain"}}, "data.category_column"),
    ({"task": {"max_new_tokens": 8}}, "task.max_new_tokens"),
])
def test_causal_lm_keys_are_errors_for_classification(table, key):
    raw = {"model": {"name": "tiny-bert"}, "data": {"train": "a.csv", "test": "b.csv"}}
    for name, t in table.items():
        raw[name] = {**raw.get(name, {}), **t}
    with pytest.raises(ConfigError, match=rf"^{key}: .*only|^{key}: is read for instruction data only"):
        Config.from_dict(raw)


def test_classification_config_has_no_task_section_and_causal_lm_round_trips():
    plain = Config.from_dict({"data": {"name": "banking77"}})
    assert "task" not in plain.to_dict() and "[task]" not in plain.to_toml()
    cfg = Config.from_dict(cfg_dict(task={"max_new_tokens": 8}, data={"format": "alpaca", "category_column": "c"},
                                    partition={"scheme": "dirichlet"}))
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg and again.task.generation("max_new_tokens") == 8
    assert again.task.generation("generation_samples") == 32


def test_encoder_models_are_refused_as_causal_lms():
    with pytest.raises(ConfigError, match="is no decoder"):
        load_model(ModelConfig(name="tiny-bert"), [], 0, task="causal-lm")


# --------------------------------------------------------------------------- the method matrix


@pytest.mark.parametrize("family", DECODERS)
def test_causal_lm_models_have_their_lm_head_and_no_classifier(family):
    loaded = causal(family)
    assert type(loaded.model).__name__.endswith("ForCausalLM") or type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert loaded.info.task == "causal-lm" and loaded.info.head_names == []
    assert not any(n.startswith(("score", "classifier")) for n, _ in loaded.model.named_parameters())


def expected_names(method: str, family: str, model, info) -> set[str]:
    """The exchanged names each method says it trains on a causal LM, derived from the model."""
    names = [n for n, _ in model.named_parameters()]
    if method == "full":
        return set(names)
    if method == "bias":
        return {n for n in names if n.endswith(".bias")}
    if method == "adapter":
        return {n for n in names if ".adapter." in n}
    if method == "lora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    if method == "prompt":
        return {"prompt_encoder.default.embedding.weight"}
    if method == "layers":  # every block, the final norm and (LLaMA: untied) the LM head; never the embeddings
        from fedpeft.models import above_block_names, transformer_blocks

        blocks = transformer_blocks(model, info.num_layers)
        return {n for n in names if blocks.index_of(n) is not None} | set(above_block_names(model, blocks))
    raise AssertionError(method)


@pytest.mark.parametrize("method,family", MATRIX)
def test_gradients_only_where_the_method_says(method, family):
    loaded, m, model = prepared(method, family)
    names = set(m.exchanged_names(model))
    assert names == expected_names(method, family, model, loaded.info) == set(trainable_names(model))
    if method == "layers":
        assert not any("embed" in n or ".wte." in n or ".wpe." in n for n in names)
        assert ("lm_head.weight" in names) == (family == "tiny-llama")  # GPT-2's head is tied to wte
    ids = torch.tensor([[5000, 6000, 7000, 8000, 9000, 102]])
    labels = ids.clone()
    labels[0, :3] = -100
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss.backward()
    for name, p in model.named_parameters():
        if name in names:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if n in names) > 0


# --------------------------------------------------------------------------- instruction data


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load(tmp_path, train_rows, test_rows=None, **data):
    from fedpeft.config import DataConfig
    from fedpeft.data import load_instructions

    cfg = DataConfig(train=write_jsonl(tmp_path / "train.jsonl", train_rows),
                     test=write_jsonl(tmp_path / "test.jsonl", test_rows or train_rows), **data)
    return load_instructions(cfg, seed=0)


PAIRS = [("translate to french: cat", "chat"), ("what is two plus two", "four"),
         ("name a color", "blue"), ("say hello to the federated world please now", "hello world")]


@pytest.mark.parametrize("family", DECODERS)
def test_loss_counts_the_response_tokens_only(family, tmp_path):
    """fedpeft's batch loss = cross-entropy over the response tokens (and EOS), computed here
    independently: each row alone, its tokens assembled by hand, torch.nn.functional."""
    from fedpeft.data import encode_instructions

    loaded = causal(family)
    tok, model = loaded.processor, loaded.model
    data = load(tmp_path, [{"prompt": p, "response": r} for p, r in PAIRS])
    split = encode_instructions(data.train, tok, "columns", 32, eos_id=102)
    batch = split.batch(np.arange(len(split)))
    assert batch["input_ids"].shape[1] < 32  # dynamically padded to the longest row
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss
    total, count, everything = 0.0, 0, 0.0
    for prompt, response in zip(data.train["prompt"], data.train["response"]):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [102]
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]  # (T, V)
        targets = ids[0, len(p):]  # predicted from positions len(p) - 1 .. T - 2
        total += float(torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], targets, reduction="sum"))
        everything += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="mean"))
        count += len(r)
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
    assert abs(float(loss) - everything / len(PAIRS)) > 1e-3  # the prompt tokens would change it


def test_truncation_keeps_the_response():
    from fedpeft.data.instruction_encode import fit_to_length

    rng = np.random.default_rng(0)
    for _ in range(2000):
        max_length = int(rng.integers(4, 20))
        prefix = [1] * int(rng.integers(0, 2))
        prompt = list(rng.integers(10, 99, int(rng.integers(1, 30))))
        response = list(rng.integers(100, 199, int(rng.integers(1, 30))))
        eos = [2]
        ids, masked = fit_to_length(prefix, prompt, response, eos, max_length)
        assert len(ids) <= max_length and ids[:len(prefix)] == prefix
        kept_prompt, kept_answer = ids[len(prefix):masked], ids[masked:]
        assert kept_answer, "the whole response was dropped"
        assert kept_prompt and kept_prompt == prompt[len(prompt) - len(kept_prompt):]  # cut from the left
        if len(prefix) + len(prompt) + len(response) + 1 <= max_length:
            assert ids == prefix + prompt + response + eos
        elif len(response) + 1 <= max_length - len(prefix) - 1:  # the response fits with one prompt token
            assert kept_answer == response + eos and len(ids) == max_length
        else:  # the response alone does not fit: cut from the right, no EOS, one prompt token
            assert len(kept_prompt) == 1 and kept_answer == response[:len(kept_answer)] and len(ids) == max_length


def test_long_rows_keep_their_response_when_encoded(tmp_path):
    from fedpeft.data import encode_instructions

    loaded = causal("tiny-gpt2")
    rows = [{"prompt": "word " * 200, "response": "the answer is here"},
            {"prompt": "short", "response": "very long answer " * 50}]
    split = encode_instructions(load(tmp_path, rows).train, loaded.processor, "columns", 16, eos_id=102)
    trained = (split.labels != -100).sum(-1)
    assert trained.min() >= 1 and split.features["attention_mask"].sum(-1).max() == 16
    answer = loaded.processor("the answer is here", add_special_tokens=False)["input_ids"] + [102]
    row = [i for i, p in enumerate(load(tmp_path, rows).train["prompt"]) if p.startswith("word")][0]
    assert split.labels[row][split.labels[row] != -100].tolist() == answer  # whole, prompt cut instead


def test_alpaca_and_chat_prompts(tmp_path):
    from fedpeft.data.instruction_encode import plain_chat_prompt, render_prompts
    from fedpeft.data.instructions import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"instruction": "Greet", "output": "hi"}]
    data = load(tmp_path, rows, format="alpaca")
    prompts = dict(zip(data.train["response"], data.train["prompt"]))
    assert prompts["5"] == ALPACA_PROMPT.format(instruction="Add", input="2 and 3")
    assert prompts["hi"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Greet")
    assert prompts["5"].endswith("### Response:\n")

    chat = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    data = load(tmp_path, chat, format="chat")
    tok = causal("tiny-gpt2").processor
    assert data.train["response"] == ["hello"]
    prompts, responses, eos = render_prompts(data.train, "chat", tok)  # no chat template: the plain one
    assert prompts == ["system: be brief\nuser: hi\nassistant: "] == [plain_chat_prompt(chat[0]["messages"][:2])]
    assert responses == ["hello"] and eos
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    prompts, responses, eos = render_prompts(data.train, "chat", tok)
    assert prompts == ["<system>be brief</s><user>hi</s><assistant>"] and responses == ["hello</s>"] and not eos


@pytest.mark.parametrize("rows,data,message", [
    ([{"prompt": "a", "answer": "b"}], {}, r"no column 'response' \(set data.response_column\); available columns: prompt, answer"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "  "}], {}, r"response column 'response' is empty in 1 row \(line 2\)"),
    ([{"prompt": "", "response": "b"}], {}, r"prompt column 'prompt' is empty in 1 row \(line 1\)"),
    ([{"q": "a", "a": "b"}], {"prompt_column": "q", "response_column": "x"}, r"no column 'x' \(set data.response_column\)"),
    ([{"instruction": "a"}], {"format": "alpaca"}, r"no column 'output'"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}], {"format": "chat"},
     r"not a usable conversation in 1 row \(line 1\): the last message \(the response\) must be the assistant's"),
    ([{"messages": [{"role": "assistant", "content": "b"}]}], {"format": "chat"}, "at least one message before"),
    ([{"messages": "not json"}], {"format": "chat"}, "not a JSON list"),
    ([{"prompt": "a", "response": "b", "domain": ""}], {"category_column": "domain"}, "category column 'domain' is empty"),
])
def test_bad_instruction_data_is_a_clear_error(tmp_path, rows, data, message):
    from fedpeft.errors import DataError

    with pytest.raises(DataError, match=message):
        load(tmp_path, rows, **data)


def test_categories_partition_like_labels(tmp_path):
    from fedpeft.config import PartitionConfig
    from fedpeft.data import partition

    rows = [{"prompt": f"q{i}", "response": f"a{i}", "domain": ["law", "med", "code"][i % 3]} for i in range(60)]
    data = load(tmp_path, rows, category_column="domain")
    assert data.category_names == ["code", "law", "med"] and "category" not in data.test.column_names
    cats = data.categories()
    assert np.bincount(cats).tolist() == [20, 20, 20]
    for scheme in ("iid", "dirichlet", "shards"):
        parts = partition(cats, PartitionConfig(scheme=scheme, num_clients=3, alpha=0.1, shards_per_client=1), 0)
        assert sorted(np.concatenate(parts).tolist()) == list(range(60))
    parts = partition(cats, PartitionConfig(scheme="shards", num_clients=3, shards_per_client=1), 0)
    assert all(len(set(cats[p].tolist())) == 1 for p in parts)  # one domain per client


# --------------------------------------------------------------------------- training and costs


def small_split(loaded, tmp_path, n: int = 8):
    from fedpeft.data import encode_instructions

    rows = [{"prompt": PAIRS[i % 4][0], "response": PAIRS[i % 4][1]} for i in range(n)]
    data = load(tmp_path, rows)
    return encode_instructions(data.train, loaded.processor, "columns", 24, eos_id=102)


FLOPS_CHECKED = ("full", "lora", "prompt")  # every parameter's backward; adapters on q/v; prompts shift L


@pytest.mark.parametrize("method,family", MATRIX)
def test_one_round_moves_exactly_the_exchanged_state(method, family, tmp_path):
    """One FedAvg round of two clients on causal-lm batches moves every exchanged tensor and no
    other, reports the exchanged bytes, and (FLOPS_CHECKED) counts each client's FLOPs exactly:
    TrainingFlops' closed form = FlopCounterMode on the real (B, L)-labelled batches."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedpeft.config import FederationConfig
    from fedpeft.federation.client import ClientTrainer, client_seed
    from fedpeft.federation.costs import message_bytes
    from fedpeft.federation.strategy import FedAvgStrategy
    from fedpeft.methods import get_state

    loaded, m, model = prepared(method, family)
    names = m.exchanged_names(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in set(names)}
    cfg = FederationConfig(clients_per_round=2, local_steps=2, batch_size=3, lr=1e-2)
    split = small_split(loaded, tmp_path)
    trainer = ClientTrainer(model, names, split, cfg, seed=0)
    strategy = FedAvgStrategy(cfg, num_clients=2, seed=0)
    parts = [np.arange(0, 4), np.arange(4, 8)]
    start = get_state(model, names)
    plan = strategy.plan_round(1)
    results = [trainer.fit(c, parts[c], start, 1) for c in plan.training]
    outcome = strategy.aggregate_round(1, start, results)
    assert outcome.aggregated and set(outcome.state) == set(names)
    assert not [n for n in names if np.array_equal(outcome.state[n], start[n])], "an exchanged tensor did not move"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert all(message_bytes(r.state) == sum(a.nbytes + len(k.encode()) for k, a in start.items()) for r in results)
    if method not in FLOPS_CHECKED:
        return
    # FLOPs: the client's count = the counter on the same batches (same order, same shapes)
    client = plan.training[0]
    order = trainer.batch_order(parts[client], 2, torch.Generator().manual_seed(client_seed(0, 1, client)))
    counted = 0
    for rows in order:
        batch = split.batch(rows)
        assert batch["labels"].shape == batch["input_ids"].shape  # (B, L), trimmed with the tokens
        model.train()
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        counted += counter.get_total_flops()
    assert results[0].metrics["flops"] == counted > 0


# --------------------------------------------------------------------------- a run that learns

FACTS = {"sky": "light blue", "grass": "dark green", "snow": "pure white", "coal": "deep black", "blood": "bright red"}
TRAIN_TEMPLATES = ["color of {}", "colour of {}", "the {}", "what {}"]
TEST_TEMPLATES = ["name {}"]  # held-out phrasing


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A few rounds of federated LoRA on tiny-llama over a synthetic instruction set it can learn:
    a prompt ending in a thing ("what snow") answered by that thing's two-word colour ("pure
    white"), held-out prompts phrased otherwise. LoRA also adapts the LM head: a random tiny
    model's output layer (std 0.02 over 30k tokens) caps every logit near +-0.6, so LoRA on the
    attention alone cannot make any token likely."""
    root = tmp_path_factory.mktemp("learned")
    rng = np.random.default_rng(0)

    def rows(n, templates):
        keys = rng.choice(sorted(FACTS), n)
        return [{"prompt": str(rng.choice(templates)).format(k), "response": FACTS[k], "thing": k} for k in keys]

    raw = {"model": {"name": "tiny-llama", "max_length": 16},
           "task": {"kind": "causal-lm", "max_new_tokens": 4, "generation_samples": 20, "saved_generations": 3},
           "data": {"train": write_jsonl(root / "train.jsonl", rows(80, TRAIN_TEMPLATES)),
                    "test": write_jsonl(root / "test.jsonl", rows(20, TEST_TEMPLATES)), "category_column": "thing"},
           "partition": {"scheme": "iid", "num_clients": 2},  # the category column: histograms in partition.json
           "method": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
           "federation": {"rounds": 4, "local_steps": 15, "batch_size": 4, "lr": 1e-2},
           "runtime": {"seed": 0, "progress": False}}
    from fedpeft.experiment import build_experiment, run_experiment

    cfg = Config.from_dict(raw)
    untrained_exp = build_experiment(cfg)
    untrained = untrained_exp.evaluate(untrained_exp.initial_state())
    summary = run_experiment(cfg, out=root / "run")
    return root / "run", summary, untrained


def test_lora_rounds_learn_the_instructions(learned):
    import json

    run, summary, untrained = learned
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert untrained["eval_loss"] > 9 and untrained["exact_match"] == 0 and untrained["rouge_l"] == 0
    losses = [r["eval_loss"] for r in rows]
    assert losses[-1] < 1.0 < untrained["eval_loss"] / 5 and losses[-1] < losses[0]
    assert rows[-1]["exact_match"] >= 0.6 and rows[-1]["rouge_l"] >= 0.6
    for r in rows:  # causal-lm metrics in place of accuracy
        assert r["accuracy"] is None and r["macro_f1"] is None and r["loss"] == r["eval_loss"]
        assert r["perplexity"] == pytest.approx(np.exp(r["eval_loss"]))
        assert r["client_flops"] > 0 and r["bytes_up"] > 0
    assert summary["task"] == "causal-lm" and summary["final_accuracy"] is None
    assert summary["final_perplexity"] == rows[-1]["perplexity"] and summary["final_rouge_l"] == rows[-1]["rouge_l"]
    assert summary["final_exact_match"] == rows[-1]["exact_match"] and summary["final_eval_loss"] == losses[-1]
    assert summary["client_flops_total"] == sum(r["client_flops"] for r in rows)
    assert summary["client_peak_memory_mb"]["predicted"] > 0  # the cost model traces a causal LM too
    for rnd in range(1, 5):
        saved = [json.loads(line) for line in (run / "generations" / f"round_{rnd}.jsonl").read_text().splitlines()]
        assert len(saved) == 3 and set(saved[0]) == {"row", "prompt", "reference", "generation", "exact_match", "rouge_l"}
    assert all(g["generation"] == g["reference"] for g in saved if g["exact_match"])
    partition = json.loads((run / "partition.json").read_text())
    assert partition["label_names"] == sorted(FACTS)
    assert all(sum(c["label_histogram"]) == c["samples"] for c in partition["clients"])


def test_eval_and_report_read_a_causal_lm_run(learned, tmp_path):
    import shutil

    from fedpeft.experiment import evaluate_run
    from fedpeft.report import write_report
    from fedpeft.results import RunDir

    run, summary, _ = learned
    again = evaluate_run(run)
    assert again["round"] == 4 and again["eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-6)
    assert again["exact_match"] == summary["final_exact_match"]
    shutil.copytree(run, tmp_path / "runs" / "a", ignore=shutil.ignore_patterns("model"))
    report = write_report(tmp_path / "runs")  # the causal-LM metrics in place of accuracy
    assert report.path.is_file() and len(report.rows) == 1
    row = dict(zip(report.columns, report.rows[0]))
    assert "accuracy (mean ± std)" not in row and report.plots == ["lm_vs_round.png", "lm_vs_mb.png", "lm_frontier.png"]
    assert row["eval loss (mean ± std)"] == f"{summary['final_eval_loss']:.3f} ± 0.000"
    assert row["perplexity (mean)"] == f"{summary['final_perplexity']:.4g}"
    assert row["exact match (mean ± std)"] == f"{summary['final_exact_match']:.3f} ± 0.000"
    assert row["ROUGE-L (mean ± std)"] == f"{summary['final_rouge_l']:.3f} ± 0.000"
    assert RunDir(run).latest_checkpoint().round == 4


def test_tune_scores_causal_lm_candidates_by_validation_token_loss(tmp_path):
    """fedpeft tune on a causal-lm config: the proxy runs score validation eval_loss (lower is
    better) on held-out train rows; of lr 1e-7 (learns nothing) and 3e-2 (learns the colours)
    it picks 3e-2, and every number it reports is the proxy runs' own last-round row."""
    import json

    from fedpeft.results import RunDir
    from fedpeft.tune import CAUSAL_LM, run_tune

    rng = np.random.default_rng(0)
    keys = rng.choice(sorted(FACTS), 60)
    rows = [{"prompt": str(rng.choice(TRAIN_TEMPLATES)).format(k), "response": FACTS[k]} for k in keys]
    raw = {"model": {"name": "tiny-llama", "max_length": 16},
           "task": {"kind": "causal-lm", "max_new_tokens": 4, "generation_samples": 4, "saved_generations": 0},
           "data": {"train": write_jsonl(tmp_path / "train.jsonl", rows),
                    "test": write_jsonl(tmp_path / "test.jsonl", rows[:4])},
           "partition": {"scheme": "iid", "num_clients": 2},
           "method": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]},
           "federation": {"rounds": 2, "local_steps": 8, "batch_size": 4, "lr": 1e-3},
           "runtime": {"seed": 0, "progress": False, "threads": 1}, "output": {"save_model": False}}
    path = tmp_path / "c.toml"
    Config.from_dict(raw).save(path)
    out = tmp_path / "t"
    tuning = run_tune(path, out, grid=["federation.lr=1e-7,3e-2"], rounds=2)
    assert tuning.objective is CAUSAL_LM
    assert tuning.choices["lora"].lr == 3e-2
    by_lr = {c.lr: c for c in tuning.candidates}
    assert by_lr[3e-2].metrics["eval_loss"] < by_lr[1e-7].metrics["eval_loss"] - 1.0
    for c in tuning.candidates:
        (name,) = c.runs
        last = RunDir(out / name).read_metrics()[-1]
        assert last["round"] == c.rounds == 2
        assert (c.metrics["eval_loss"], c.metrics["exact_match"], c.metrics["rouge_l"]) == (
            last["eval_loss"], last["exact_match"], last["rouge_l"])
    record = json.loads((out / "tune.json").read_text())
    assert record["proxy"]["score"].startswith("validation token loss (eval_loss, lower is better)")
    assert record["choices"] == {"lora": {"federation.lr": "3e-2"}}
    md = (out / "tune.md").read_text()
    assert "| val token loss | val exact match | val ROUGE-L |" in md and "macro-F1" not in md
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_prices_causal_lm_methods_and_refuses_head(learned, tmp_path):
    from fedpeft.budgets.planner import plan
    from fedpeft.results import RunDir, load_run_config

    cfg, _ = load_run_config(RunDir(learned[0]))
    rows = plan(cfg, methods=["lora", "prompt"]).rows
    assert [r.method for r in rows] == ["lora", "prompt"] and all(r.memory_mb > 0 and r.flops_per_round > 0 for r in rows)
    with pytest.raises(ConfigError, match='--methods: "head" with task.kind = "causal-lm"'):
        plan(cfg, methods=["head"])


def test_resumed_run_ends_as_the_uninterrupted_one(tmp_path, monkeypatch):
    import json

    from fedpeft.experiment import run_experiment
    from fedpeft.results import RunDir

    rows = [{"prompt": p, "response": r} for p, r in PAIRS * 3]
    raw = cfg_dict(data={"train": write_jsonl(tmp_path / "train.jsonl", rows), "test": write_jsonl(tmp_path / "t.jsonl", rows)},
                   task={"max_new_tokens": 3, "generation_samples": 2, "saved_generations": 2},
                   federation={"rounds": 2, "local_steps": 2, "batch_size": 4, "lr": 1e-2, "dropout": 0.3},
                   runtime={"seed": 0, "progress": False}, output={"save_model": False})
    cfg = Config.from_dict(raw)
    full = run_experiment(cfg, out=tmp_path / "full")
    resumed = interrupt_and_resume(monkeypatch, cfg, tmp_path / "cut", 2)
    a, b = RunDir(tmp_path / "full").latest_checkpoint().state, RunDir(tmp_path / "cut").latest_checkpoint().state
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for key in ("final_eval_loss", "final_perplexity", "final_exact_match", "final_rouge_l", "total_bytes_up",
                "client_flops_total"):
        assert resumed[key] == full[key], key
    for rnd in (1, 2):
        name = f"generations/round_{rnd}.jsonl"
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "full" / name).read_text()
    assert [json.loads(x)["round"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_validation_fraction_holds_out_train_rows(tmp_path):
    from fedpeft.config import DataConfig
    from fedpeft.data import load_instructions

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    cfg = DataConfig(train=write_jsonl(tmp_path / "train.jsonl", rows), validation_fraction=0.25)
    data = load_instructions(cfg, seed=0)  # no data.test: never read
    assert len(data.train) == 15 and len(data.test) == 5
    assert not set(data.train["prompt"]) & set(data.test["prompt"])


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    """One short round of soft-prompt tuning on tiny-gpt2 (its export is a peft prompt folder)."""
    from fedpeft.experiment import run_experiment

    root = tmp_path_factory.mktemp("prompt")
    rows = [{"prompt": p, "response": r} for p, r in PAIRS * 2]
    raw = cfg_dict(model={"name": "tiny-gpt2", "max_length": 24},
                   data={"train": write_jsonl(root / "train.jsonl", rows), "test": write_jsonl(root / "test.jsonl", rows)},
                   method={"name": "prompt", "num_virtual_tokens": 4},
                   task={"max_new_tokens": 5, "generation_samples": 4},
                   federation={"rounds": 1, "local_steps": 2, "batch_size": 4, "lr": 1e-1},
                   runtime={"seed": 0, "progress": False})
    run_experiment(Config.from_dict(raw), out=root / "run")
    return root / "run"


def assert_generates(model, prompts, expected, eos_ids, pad_id):
    """Plain transformers' greedy ``generate`` gives fedpeft's tokens for every prompt."""
    for p, want in zip(prompts, expected):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                             eos_token_id=eos_ids, pad_token_id=pad_id)[0, len(p):].tolist()
        cut = next((k for k, t in enumerate(out) if t in eos_ids), len(out))
        assert out[:cut] == want


def run_card_code(card: str) -> dict:
    """Execute a model card's python blocks in one scope (they load from "model" and generate)."""
    import re

    scope: dict = {}
    for code in re.findall(r"```python\n(.*?)```", card, re.S):
        exec(code, scope)
    return scope


@pytest.mark.filterwarnings("ignore:Position ids are not supported")
@pytest.mark.parametrize("which", ["lora", "prompt"])
def test_exported_adapter_generates_fedpeft_tokens_with_plain_transformers_and_peft(which, learned, prompt_run,
                                                                                   tmp_path, monkeypatch):
    """model/ moved elsewhere, loaded with AutoModelForCausalLM + PeftModel only, generates greedily
    the tokens fedpeft's final global model generates on the held-out prompts; the card's code runs."""
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.experiment import build_experiment
    from fedpeft.federation.generative import greedy_generate
    from fedpeft.data.instruction_encode import prompt_lengths
    from fedpeft.results import RunDir, load_run_config

    run = learned[0] if which == "lora" else prompt_run
    folder = tmp_path / "model"
    shutil.copytree(run / "model", folder)
    facts = json.loads((folder / "fedpeft.json").read_text())
    assert facts["task"] == "causal-lm" and json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"

    exp = build_experiment(load_run_config(RunDir(run))[0])
    state = RunDir(run).latest_checkpoint().state
    from fedpeft.methods import set_state

    set_state(exp.model, state)
    lengths = prompt_lengths(exp.test)
    n = 4
    prompts = [exp.test.features["input_ids"][i, :int(lengths[i])].tolist() for i in range(n)]
    expected = [greedy_generate(exp.model, [p], exp.processor.pad_token_id, exp.eos_ids, 5, 1)[0] for p in prompts]

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = exp.data.test["prompt"][:n]
    assert [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] == prompts  # encodes as fedpeft
    base = AutoModelForCausalLM.from_pretrained(folder / "base")
    model = PeftModel.from_pretrained(base, folder).eval()
    assert_generates(model, prompts, expected, exp.eos_ids, tokenizer.pad_token_id)
    if which == "lora":  # the saved generations are the global model's
        saved = [json.loads(line) for line in (run / "generations" / "round_4.jsonl").read_text().splitlines()]
        assert [g["generation"] for g in saved] == [tokenizer.decode(t, skip_special_tokens=True).strip() for t in expected[:3]]
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    monkeypatch.chdir(tmp_path)
    scope = run_card_code(card)
    assert isinstance(scope["model"], PeftModel)


@pytest.fixture(scope="module", params=[("full", "tiny-gpt2"), ("layers", "tiny-llama")], ids=lambda p: "-".join(p))
def whole_model_run(request, tmp_path_factory):
    """One short round of ``full`` (tiny-gpt2) or ``layers`` with k = 1 (tiny-llama): whole blocks
    train, so the export is the whole model."""
    from fedpeft.experiment import run_experiment

    method, family = request.param
    root = tmp_path_factory.mktemp(method)
    rows = [{"prompt": p, "response": r} for p, r in PAIRS * 2]
    raw = cfg_dict(model={"name": family, "max_length": 24},
                   data={"train": write_jsonl(root / "train.jsonl", rows), "test": write_jsonl(root / "test.jsonl", rows)},
                   method={"name": method, **({"k": 1} if method == "layers" else {})},
                   task={"max_new_tokens": 5, "generation_samples": 4},
                   federation={"rounds": 1, "local_steps": 3, "batch_size": 4, "lr": 3e-2},
                   runtime={"seed": 0, "progress": False})
    run_experiment(Config.from_dict(raw), out=root / "run")
    return root / "run", method


def test_full_weight_export_loads_and_generates_with_plain_transformers(whole_model_run, tmp_path, monkeypatch):
    """``full`` / ``layers`` on a causal LM: model/ moved elsewhere is a whole transformers model
    (no base/, no adapter): AutoModelForCausalLM.from_pretrained of the folder alone holds the
    trained weights (not the base's) and generates greedily fedpeft's global model's tokens."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.data.instruction_encode import prompt_lengths
    from fedpeft.experiment import build_experiment
    from fedpeft.federation.generative import greedy_generate
    from fedpeft.methods import set_state
    from fedpeft.results import RunDir, load_run_config

    run, method = whole_model_run
    folder = tmp_path / "model"
    shutil.copytree(run / "model", folder)
    assert (folder / "model.safetensors").is_file() and not (folder / "base").exists()
    assert not (folder / "adapter_config.json").exists() and not (folder / "exchanged.safetensors").exists()
    facts = json.loads((folder / "fedpeft.json").read_text())
    assert facts["full_weights"] is True and facts["merged"] is True and facts["method"] == method

    exp = build_experiment(load_run_config(RunDir(run))[0])
    base = {n: p.detach().clone() for n, p in exp.model.named_parameters()}
    state = RunDir(run).latest_checkpoint().state
    set_state(exp.model, state)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded = dict(model.named_parameters())
    for name in state:  # every trained tensor is in the folder as trained, and it moved
        assert torch.equal(loaded[name], torch.from_numpy(state[name])), name
    assert any(not torch.equal(base[n], torch.from_numpy(state[n])) for n in state)
    for name, p in exp.model.named_parameters():  # the frozen ones as the base had them
        assert torch.equal(loaded[name], p.detach()), name

    lengths = prompt_lengths(exp.test)
    prompts = [exp.test.features["input_ids"][i, :int(lengths[i])].tolist() for i in range(4)]
    expected = [greedy_generate(exp.model, [p], exp.processor.pad_token_id, exp.eos_ids, 5, 1)[0] for p in prompts]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert_generates(model, prompts, expected, exp.eos_ids, tokenizer.pad_token_id)
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "whole model" in card and "PeftModel" not in card
    monkeypatch.chdir(tmp_path)
    scope = run_card_code(card)
    assert type(scope["model"]) is type(model)


def test_oneshot_preset_compares_equal_local_steps_on_a_causal_lm():
    """examples/oneshot_causal_lm.toml's own sweep command: a causal-lm config whose grid pairs one
    round of T*k local steps with T rounds of k steps, for each method."""
    import re
    import shlex
    from pathlib import Path

    from fedpeft.sweep import plan_sweep

    path = Path(__file__).parent.parent / "examples" / "oneshot_causal_lm.toml"
    command = re.search(r"#\s+(fedpeft sweep .*?)\n#\s+fedpeft report", path.read_text(), re.S).group(1)
    args = shlex.split(command.replace("\\\n#", " "))
    grid = [args[i + 1] for i, a in enumerate(args) if a == "--grid"]
    runs = plan_sweep(path, grid, [], [0])
    assert all(r.cfg.task.generative for r in runs)
    by_method: dict[str, set[tuple[int, int]]] = {}
    for r in runs:
        by_method.setdefault(r.cfg.method.name, set()).add((r.cfg.federation.rounds, r.cfg.federation.local_steps))
    for method, schedules in by_method.items():
        (steps,) = {rounds * k for rounds, k in schedules}
        assert (1, steps) in schedules and len(schedules) == 2, method
