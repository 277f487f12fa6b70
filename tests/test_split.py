"""Split federated fine-tuning (SFPrompt): head/body/tail, the body-server protocol, pruning, costs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import LABELS, make_batch
from fedpeft.config import Config, FederationConfig
from fedpeft.errors import ConfigError
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.methods.sfprompt import SFPrompt, SFPromptOptions
from fedpeft.models import LoadedModel, _model_info, _prepare_tokenizer, minilm_dir, transformer_blocks
from fedpeft.split import InProcessBodyServer, Message, SplitModel, el2n_scores, forward_message, keep_highest
from fedpeft.split.session import SplitSession

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["bert", "vit", "gpt2", "llama"]
DEPTH = 4


def deep_tiny(family: str, seed: int = 0) -> LoadedModel:
    """A 4-block tiny model of ``family`` (conftest's have 2: too few for head + body + tail)."""
    import transformers as tf

    torch.manual_seed(seed)
    labels = {"num_labels": len(LABELS)}
    if family == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=DEPTH,
                              num_attention_heads=2, intermediate_size=64, **labels)
        return LoadedModel(tf.AutoModelForImageClassification.from_config(config).eval(), None,
                           _model_info(tf.AutoModelForImageClassification.from_config(config)))
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_dir())
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **labels)
    config = {
        "bert": lambda: tf.BertConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
                                      intermediate_size=64, **common),
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=DEPTH, n_head=2, bos_token_id=tokenizer.cls_token_id,
                                      eos_token_id=tokenizer.sep_token_id, **common),
        "llama": lambda: tf.LlamaConfig(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64,
                                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                        **common),
    }[family]()
    model = tf.AutoModelForSequenceClassification.from_config(config).eval()
    info = _model_info(model)
    _prepare_tokenizer(tokenizer, model, info)
    return LoadedModel(model, tokenizer, info)


@pytest.fixture(scope="module", params=FAMILIES)
def deep(request) -> LoadedModel:
    return deep_tiny(request.param)


@pytest.mark.parametrize("cut", [(1, 1), (0, 2), (2, 0)])
def test_split_forward_equals_whole_model(deep, cut):
    batch = make_batch(deep, n=4)
    with torch.no_grad():
        whole = deep.model(**batch)
        split = SplitModel(deep.model, transformer_blocks(deep.model, DEPTH), *cut).forward(batch)
    torch.testing.assert_close(split.logits, whole.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.loss, whole.loss, rtol=0, atol=1e-6)


def prepared(family: str, head_blocks: int = 1, tail_blocks: int = 1) -> tuple[LoadedModel, SFPrompt]:
    loaded = deep_tiny(family)
    method = SFPrompt(SFPromptOptions(head_blocks=head_blocks, tail_blocks=tail_blocks, num_prompt_tokens=3))
    torch.manual_seed(0)
    model = method.prepare(loaded.model, loaded.info).eval()
    return LoadedModel(model, loaded.processor, loaded.info), method


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_gradient_through_the_protocol_equals_autograd(family):
    loaded, method = prepared(family)
    model, split = loaded.model, method.split
    batch = make_batch(loaded, n=3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prompt = [n for n in trainable if "prompt" in n]
    assert prompt and any(split.blocks.index_of(n) == DEPTH - 1 for n in trainable)
    model(**batch).loss.backward()  # the reference: autograd through the whole (prompted) model
    ref = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad(set_to_none=True)

    server = InProcessBodyServer(split)
    head = split.head(batch)
    out = server.forward("r0", forward_message(head.hidden, head.context)).tensors["hidden"].requires_grad_(True)
    split.tail(out, batch, head.embedded).loss.backward()
    grad = server.backward("r0", Message({"grad": out.grad})).tensors["grad"]
    head.hidden.backward(grad)
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(p.grad is None for p in (q for b in split.body_blocks for q in b.parameters()))


def test_shortcut_is_the_model_without_its_body_and_pruning_keeps_the_top_el2n_rows():
    loaded = deep_tiny("bert")
    split = SplitModel(loaded.model, transformer_blocks(loaded.model, DEPTH), 1, 1)
    batch = make_batch(loaded, n=7, seed=3)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = split.shortcut(batch).logits
        bodiless = copy.deepcopy(loaded.model)  # independent reference: the body blocks removed
        layers = bodiless.bert.encoder.layer
        bodiless.bert.encoder.layer = nn.ModuleList([layers[0], layers[DEPTH - 1]])
        ref = bodiless(**batch).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)

    probs = np.exp(ref.numpy() - ref.numpy().max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    hand = np.sqrt(((probs - np.eye(len(LABELS))[labels.numpy()]) ** 2).sum(1))
    np.testing.assert_allclose(el2n_scores(logits, labels).numpy(), hand, rtol=1e-5)
    ids = np.arange(100, 107)
    for keep in (0.3, 0.5, 1.0, 0.01):
        kept = keep_highest(ids, hand, keep)
        count = math.ceil(keep * 7)
        assert len(kept) == count
        assert set(kept) == set(ids[np.argsort(-hand)[:count]])


def test_bytes_counted_are_the_tensors_that_crossed():
    from fedpeft.data import EncodedSplit
    from fedpeft.split.trainer import SplitTrainer

    loaded, method = prepared("bert")
    model, split = loaded.model, method.split
    batch = make_batch(loaded, n=4)  # texts of different lengths: padded, so a mask crosses
    labels = batch.pop("labels")
    train = EncodedSplit({k: v for k, v in batch.items()}, labels)  # one batch of these 4 rows: one split step
    fed = FederationConfig(batch_size=4, lr=1e-2, local_steps=1)
    method.options.prune = method.options.local_loss = False
    trainer = SplitTrainer(model, [n for n, p in model.named_parameters() if p.requires_grad], train, fed, 0,
                           split, method.options)
    res = trainer.fit(0, np.arange(4), {}, 1)
    B, H = 4, 32
    L = batch["input_ids"].shape[1] + 3  # + the prompt tokens
    t = trainer.server.traffic
    assert t.hidden_up == t.hidden_down == t.grad_up == t.grad_down == B * L * H * 4  # float32
    assert t.context_up == B * 1 * L * L * 1  # BERT's boolean attention mask (B, 1, L, L)
    assert (t.up, t.down) == (2 * B * L * H * 4 + B * L * L, 2 * B * L * H * 4)  # + grad up; grad down
    assert (res.metrics["activation_bytes_up"], res.metrics["activation_bytes_down"]) == (t.up, t.down)
    assert trainer.server.flops > 0 and res.metrics["server_flops"] == trainer.server.flops
    assert res.metrics["recompute_flops"] == 0  # a live session keeps the head's graph


def restored(session, trainer):
    """``session`` continued from its snapshot (JSON and cloned tensors), as a ClientApp gets it
    at its next message: the model holds another client's values meanwhile, the random state moved."""
    tensors, meta = session.snapshot()
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))
    with torch.no_grad():
        for _, p in trainer.trainable:
            p.add_(1.0)
            p.grad = torch.ones_like(p)
    torch.manual_seed(12345)
    return SplitSession.restore(trainer, tensors, meta)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_session_restored_at_every_message_trains_bit_for_bit_like_the_live_one(family):
    from fedpeft.data import EncodedSplit
    from fedpeft.methods.base import get_state
    from fedpeft.split.trainer import SplitTrainer

    loaded, method = prepared(family)  # 4 blocks: head 1, body 2, tail 1; dropout on (BERT, GPT-2)
    model, split = loaded.model, method.split
    batch = make_batch(loaded, n=12, seed=1)
    labels = batch.pop("labels")
    train = EncodedSplit(batch, labels, getattr(loaded.processor, "padding_side", "right"))
    method.options.prune_keep, method.options.local_loss_steps = 0.75, 1
    fed = FederationConfig(batch_size=4, lr=5e-2, local_steps=3)  # AdamW: its moments are restored too
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainer = SplitTrainer(model, names, train, fed, 0, split, method.options, method.full_flops)
    start = get_state(model, names)
    live = trainer.fit(1, np.arange(12), start, 2)

    server = InProcessBodyServer(split)
    session = SplitSession.begin(trainer, 1, np.arange(12), start, 2)
    while not session.done:
        session = restored(session, trainer)
        request, forward = session.request, session.forward_request()
        session = restored(session, trainer)
        up = session.on_body_output(server.forward(request, forward))
        session = restored(session, trainer)
        session.on_cut_grad(server.backward(request, up))
    cold = session.result()
    assert any(not np.array_equal(live.state[n], start[n]) for n in names)
    for name in names:
        np.testing.assert_array_equal(cold.state[name], live.state[name], err_msg=name)
    for key in ("train_loss", "local_loss", "flops", "client_flops_pct_of_full", "kept_rows", "samples_processed"):
        assert cold.metrics[key] == live.metrics[key], key
    assert live.metrics["recompute_flops"] == 0 < cold.metrics["recompute_flops"] < cold.metrics["flops"]
    assert (server.traffic.up, server.traffic.down) == (live.metrics["activation_bytes_up"],
                                                          live.metrics["activation_bytes_down"])


def csv_cfg(tmp_path, **method):
    rng = np.random.default_rng(0)
    words = {"sport": "goal match team ball score win coach", "food": "pizza bread salad soup cheese taste meal",
             "money": "bank card cash loan price pay account"}
    for split, n in (("train", 60), ("test", 30)):
        lines = ["text,label"] + [f"{' '.join(rng.choice(words[lab].split(), size=int(rng.integers(2, 7))))},{lab}"
                                  for lab in (list(words)[i % 3] for i in range(n))]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return Config.from_dict({
        "model": {"name": "tiny-bert", "max_length": 16},
        "data": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")},
        "partition": {"scheme": "iid", "num_clients": 2},
        "method": {"name": "sfprompt", "head_blocks": 0, "tail_blocks": 1, "num_prompt_tokens": 4,
                   "prune_keep": 0.5, "local_loss_steps": 2, **method},
        "federation": {"rounds": 2, "local_steps": 3, "batch_size": 8, "lr": 2e-2},
        "runtime": {"seed": 0, "progress": False},
        "output": {"save_model": False},
    })


def test_body_never_changes_and_prompts_and_tail_do(tmp_path):
    exp = build_experiment(csv_cfg(tmp_path))
    body = {n: p.detach().clone() for n, p in exp.model.named_parameters()
            if exp.trainer.split.blocks.index_of(n) == 0}
    assert body and not any(n in exp.names for n in body)
    state = exp.initial_state()
    results = [exp.trainer.fit(c, exp.parts[c], state, 1) for c in range(2)]
    for n, p in exp.model.named_parameters():
        if n in body:
            assert torch.equal(p, body[n]), n
    for res in results:
        assert res.metrics["kept_rows"] == math.ceil(0.5 * len(exp.parts[res.client]))
        assert any(not np.array_equal(res.state[n], state[n]) for n in state if "prompt" in n)
        assert any(not np.array_equal(res.state[n], state[n]) for n in state if ".layer.1." in n)


def test_run_experiment_reports_split_costs(tmp_path):
    summary = run_experiment(csv_cfg(tmp_path), out=tmp_path / "run")
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        clients = [c for c in row["clients"] if c["status"] == "ok"]
        for key in ("activation_bytes_up", "activation_bytes_down", "server_flops"):
            assert row[key] == sum(c[key] for c in clients) > 0
        for c in clients:
            assert c["flops"] > 0 and 0 < c["client_flops_pct_of_full"]
            assert c["activation_bytes_up"] > c["activation_bytes_down"]  # masks go up only
    assert summary["activation_bytes_up"] == sum(r["activation_bytes_up"] for r in rows)
    assert summary["server_flops"] == sum(r["server_flops"] for r in rows)
    assert summary["client_flops"]["measured_per_round"] == summary["client_flops_per_update"]
    assert "predicted_per_round" in summary["client_flops"]
    assert summary["client_flops_pct_of_full"] > 0
    assert rows[-1]["train_loss"] < rows[0]["clients"][0]["local_loss"] + 1.0  # trained, finite


@pytest.mark.parametrize("key, value, match", [
    ("prune_keep", 0.0, "method.prune_keep"), ("prune_keep", 1.5, "method.prune_keep"),
    ("local_loss_steps", -1, "method.local_loss_steps"), ("head_blocks", -1, "method.head_blocks"),
    ("tail_blocks", -2, "method.tail_blocks"), ("num_prompt_tokens", 0, "method.num_prompt_tokens"),
])
def test_option_errors_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_dict({"data": {"train": "t.csv"}, "method": {"name": "sfprompt", key: value}})


def test_cut_and_family_and_runtime_errors(tiny):
    loaded = tiny("tiny-bert")  # 2 blocks
    with pytest.raises(ConfigError, match="method.head_blocks = 1 \\+ method.tail_blocks = 1 leave no body"):
        SFPrompt(SFPromptOptions(head_blocks=1, tail_blocks=1)).prepare(loaded.model, loaded.info)
    with pytest.raises(ConfigError, match="method.head_blocks = 3"):
        SFPrompt(SFPromptOptions(head_blocks=3, tail_blocks=0)).prepare(loaded.model, loaded.info)
    info = copy.copy(loaded.info)
    info.family = "t5"
    with pytest.raises(ConfigError, match="method.name: 'sfprompt' splits"):
        SFPrompt(SFPromptOptions(head_blocks=0, tail_blocks=1)).prepare(loaded.model, info)
    flower = {"data": {"train": "t.csv"}, "method": {"name": "sfprompt"}, "runtime": {"kind": "flower-sim"}}
    assert Config.from_dict(flower).runtime.kind == "flower-sim"  # split messages on Flower (tests/test_flower.py)
    with pytest.raises(ConfigError, match='runtime.kind = "flower-sim": .*sfprompt" with attack.kind = "scale"'):
        Config.from_dict({**flower, "attack": {"kind": "scale", "fraction": 0.25}})
    with pytest.raises(ConfigError, match='runtime.kind = "flower".*privacy.mode = "client-local"'):
        Config.from_dict({**flower, "runtime": {"kind": "flower"},
                          "privacy": {"mode": "client-local", "clip_norm": 1.0, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match='runtime.kind = "flower-sim".*privacy.secure_aggregation = true'):
        Config.from_dict({**flower, "partition": {"num_clients": 4}, "federation": {"clients_per_round": 2},
                          "privacy": {"secure_aggregation": True}})
    with pytest.raises(ConfigError, match="federation.scaffold"):
        from fedpeft.split.trainer import SplitTrainer

        SplitTrainer(loaded.model, [], None, FederationConfig(scaffold=True), 0, None, None)
