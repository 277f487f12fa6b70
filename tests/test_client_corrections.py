"""Client-side corrections (issue 12): FedProx, and the FedLC / FedRS label-skew losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedpeft.config import Config, FederationConfig, ModelConfig, load_config
from fedpeft.data.encode import EncodedSplit
from fedpeft.errors import ConfigError
from fedpeft.experiment import run_experiment
from fedpeft.federation.client import ClientTrainer, client_seed
from fedpeft.federation.label_skew import FEDLC_TAU, FEDRS_ALPHA, fedlc_loss, fedrs_loss
from fedpeft.methods import build_method, get_state, set_state
from fedpeft.models import load_model
from fedpeft.results import RunDir
from conftest import TINY_FAMILIES
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused

TEXTS = [
    "a short one", "the quick brown fox jumps over the lazy dog", "federated learning with few parameters",
    "ok", "my card was declined", "transfer money please", "what is the rate", "banks and cards",
]
CLASSES = ["a", "b", "c", "d"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (conftest)


def client_setup(method: str = "head", labels: list[int] | None = None):
    """A prepared tiny-bert (4 classes), its exchanged names, and 32 encoded rows with ``labels``
    (default: every row of class 0: a client with one label)."""
    loaded = load_model(ModelConfig(name="tiny-bert"), label_names=CLASSES, seed=0)
    m = build_method(method)
    model = m.prepare(loaded.model, loaded.info)
    enc = loaded.processor(TEXTS * 4, padding=True, return_tensors="pt")
    y = torch.zeros(len(TEXTS) * 4, dtype=torch.long) if labels is None else torch.tensor(labels)
    split = EncodedSplit({k: enc[k] for k in ("input_ids", "attention_mask")}, y)
    return model, m.exchanged_names(model), split


def all_logits(model, split) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        batch = split.batch(torch.arange(len(split)))
        batch.pop("labels")
        return model(**batch).logits


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in a))


# --------------------------------------------------------------------------- FedProx


def plain_fit(trainer: ClientTrainer, indices, global_state, rnd: int, client: int = 0):
    """Local training as ClientTrainer.fit did before issue 12, written out: the reference."""
    cfg, model = trainer.cfg, trainer.model
    seed = client_seed(trainer.seed, rnd, client)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    set_state(model, global_state)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for rows in trainer.batch_order(indices, trainer.num_steps(len(indices)), generator):
        opt.zero_grad(set_to_none=True)
        model(**trainer.train.batch(rows)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
    model.eval()
    return get_state(model, trainer.names)


def test_proximal_mu_zero_and_no_label_skew_is_plain_training_bit_for_bit():
    # lora on tiny-bert: dropout is active in training, so the seeding is compared too
    model, names, split = client_setup("lora", labels=[i % 3 for i in range(32)])
    g0 = get_state(model, names)
    rows = np.arange(len(split))
    plain = ClientTrainer(model, names, split, FederationConfig(local_steps=6, batch_size=8), 0)
    reference = plain_fit(plain, rows, g0, 2)
    cfg = FederationConfig(local_steps=6, batch_size=8, proximal_mu=0.0, label_skew="none")
    trainer = ClientTrainer(model, names, split, cfg, 0)
    backward, calls = trainer._backward, []
    trainer._backward = lambda batch, *extra: calls.append(extra) or backward(batch, *extra)
    state = trainer.fit(0, rows, g0, 2).state
    assert calls == [(None, None)] * 6  # no anchor copy, no label counts: nothing extra is computed
    assert distance(reference, g0) > 0  # training moved the state
    for k in reference:
        np.testing.assert_array_equal(state[k], reference[k], err_msg=k)
    # the comparison is sensitive: a small mu already changes the result
    prox = ClientTrainer(model, names, split, FederationConfig(local_steps=6, batch_size=8, proximal_mu=1e-2), 0)
    moved = prox.fit(0, rows, g0, 2).state
    assert any(not np.array_equal(moved[k], reference[k]) for k in reference)


def test_proximal_gradient_is_the_plain_gradient_plus_mu_times_the_drift():
    model, names, split = client_setup("head", labels=[i % 4 for i in range(32)])
    mu = 0.7
    trainer = ClientTrainer(model, names, split, FederationConfig(proximal_mu=mu, max_grad_norm=0.0), 0)
    g0 = get_state(model, names)
    anchor = [p.detach().clone() for p in trainer.params]
    # one plain SGD step away from the global state, so w - w_global is not 0
    away = ClientTrainer(model, names, split, FederationConfig(optimizer="sgd", lr=0.5, local_steps=1), 0)
    set_state(model, away.fit(0, np.arange(32), g0, 1).state)
    drift = [p.detach() - a for p, a in zip(trainer.params, anchor)]
    assert all(float(d.abs().max()) > 0 for d in drift)

    model.eval()  # no dropout: the three gradients below see the same function
    batch = split.batch(torch.arange(8))
    model.zero_grad(set_to_none=True)
    trainer._backward(batch, anchor)
    got = [p.grad.clone() for p in trainer.params]

    model.zero_grad(set_to_none=True)
    objective = model(**batch).loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainer.params, anchor))
    expected = torch.autograd.grad(objective, trainer.params)
    plain = torch.autograd.grad(model(**batch).loss, trainer.params)
    for g, e, p0, d in zip(got, expected, plain, drift):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g, p0 + mu * d, rtol=1e-5, atol=1e-7)
        assert float((g - p0).abs().max()) > 1e-4  # the proximal part is really there


def test_a_large_mu_keeps_the_client_near_the_global_state():
    model, names, split = client_setup("head", labels=[i % 2 for i in range(32)])
    g0 = get_state(model, names)

    def moved(mu: float) -> float:
        cfg = FederationConfig(optimizer="sgd", lr=0.05, momentum=0.0, local_steps=30, batch_size=8, proximal_mu=mu)
        return distance(ClientTrainer(model, names, split, cfg, 0).fit(0, np.arange(32), g0, 1).state, g0)

    free, held = moved(0.0), moved(10.0)
    assert free > 0.1
    # at lr * mu = 0.5 each step pulls half the drift back: it stays a few steps' worth of gradient
    assert held < free / 5, (held, free)


# --------------------------------------------------------------------------- the label-skew losses

LOGITS = np.array([[2.0, 1.0, -1.0, 0.5], [0.0, 3.0, 1.0, -2.0], [1.0, -1.0, 4.0, 0.0]])
LABELS = np.array([0, 1, 3])
COUNTS = np.array([16, 1, 0, 81])  # class 2 absent; n^(-1/4) = 1/2, 1, -, 1/3


def test_fedlc_against_a_hand_computed_example():
    tau = 0.8
    # calibrated logits z - tau * n^(-1/4), class 2 (n = 0) out of the softmax
    shift = {0: tau / 2, 1: tau * 1.0, 3: tau / 3}
    per_row = []
    for z, y in zip(LOGITS, LABELS):
        cal = {c: z[c] - s for c, s in shift.items()}
        per_row.append(-cal[y] + math.log(sum(math.exp(v) for v in cal.values())))
    expected = sum(per_row) / 3
    got = fedlc_loss(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(COUNTS), tau)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # the absent class's logit gets no gradient, and nothing is NaN
    z = torch.tensor(LOGITS, requires_grad=True)
    fedlc_loss(z, torch.tensor(LABELS), torch.tensor(COUNTS), tau).backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[:, 2] == 0).all() and (z.grad[:, [0, 1, 3]] != 0).all()


def test_fedrs_against_a_hand_computed_example():
    alpha = 0.3
    per_row = []
    for z, y in zip(LOGITS, LABELS):
        scaled = [z[0], z[1], alpha * z[2], z[3]]  # only the absent class 2 is scaled
        per_row.append(-scaled[y] + math.log(sum(math.exp(v) for v in scaled)))
    expected = sum(per_row) / 3
    got = fedrs_loss(torch.tensor(LOGITS), torch.tensor(LABELS), torch.tensor(COUNTS), alpha)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_fedrs_alpha_one_and_fedlc_equal_counts_are_plain_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=gen)
    labels = torch.randint(0, 5, (16,), generator=gen)
    plain = F.cross_entropy(logits, labels)
    with_absent = torch.tensor([3, 0, 7, 1, 2])
    labels_present = torch.where(with_absent[labels] > 0, labels, 0)
    torch.testing.assert_close(
        fedrs_loss(logits, labels_present, with_absent, 1.0), F.cross_entropy(logits, labels_present)
    )
    # equal counts shift every logit by the same tau * n^(-1/4): the softmax does not change
    torch.testing.assert_close(fedlc_loss(logits, labels, torch.full((5,), 9), 2.0), plain)
    # and the corrections are not no-ops otherwise
    restricted = fedrs_loss(logits, labels_present, with_absent, 0.5)
    assert not torch.isclose(restricted, F.cross_entropy(logits, labels_present))
    assert not torch.isclose(fedlc_loss(logits, labels, torch.tensor([1, 2, 3, 4, 50]), 1.0), plain)


def test_a_label_with_no_count_is_an_error():
    logits, counts = torch.zeros(2, 3), torch.tensor([4, 0, 1])
    for loss in (fedlc_loss, fedrs_loss):
        with pytest.raises(ValueError, match="count of 0"):
            loss(logits, torch.tensor([0, 1]), counts)
        with pytest.raises(ValueError, match=r"class_counts \(C,\)"):
            loss(logits, torch.tensor([0, 2]), torch.tensor([4, 1]))


def test_one_label_client_no_longer_drives_the_absent_logits_down():
    """A head-only client holding rows of class 0 only, 40 SGD steps (the papers' optimizer).

    With plain cross-entropy the absent classes' logits fall by more than a logit and the gap to
    the present class opens by several; FedRS scales that push by about alpha, FedLC removes the
    absent classes from the client's softmax (its one-class loss is 0: nothing moves)."""
    model, names, split = client_setup("head")
    g0, before = get_state(model, names), all_logits(model, split)

    def train(**options) -> tuple[float, float]:
        cfg = FederationConfig(optimizer="sgd", lr=0.05, local_steps=40, batch_size=8, **options)
        set_state(model, ClientTrainer(model, names, split, cfg, 0).fit(0, np.arange(32), g0, 1).state)
        change = all_logits(model, split) - before
        absent_drop = -float(change[:, 1:].mean())
        gap_opened = float((change[:, 0] - change[:, 1:].mean(1)).mean())
        return absent_drop, gap_opened

    plain_drop, plain_gap = train()
    rs_drop, _ = train(label_skew="fedrs")  # alpha 0.5
    rs_small_drop, _ = train(label_skew="fedrs", fedrs_alpha=0.1)
    lc_drop, lc_gap = train(label_skew="fedlc")
    assert plain_drop > 1.0 and plain_gap > 4.0, (plain_drop, plain_gap)  # measured: 1.5 and 6.0
    assert rs_drop < 0.75 * plain_drop, (rs_drop, plain_drop)  # measured: 0.57x
    assert rs_small_drop < 0.25 * plain_drop, (rs_small_drop, plain_drop)  # measured: 0.12x
    assert abs(lc_drop) < 1e-6 and abs(lc_gap) < 1e-6, (lc_drop, lc_gap)


def test_label_skew_losses_replace_the_model_loss_in_training():
    """The trainer feeds the model's logits and the client's own counts to the loss."""
    model, names, split = client_setup("head", labels=[[0, 1, 1, 3][i % 4] for i in range(32)])
    trainer = ClientTrainer(model, names, split, FederationConfig(label_skew="fedlc", fedlc_tau=0.5), 0)
    counts = trainer.client_class_counts(np.arange(32))
    assert counts.tolist() == [8, 16, 0, 8]
    model.eval()
    batch = split.batch(torch.arange(8))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for cfg, expected in [
        (FederationConfig(label_skew="fedlc", fedlc_tau=0.5), fedlc_loss(logits, batch["labels"], counts, 0.5)),
        (FederationConfig(label_skew="fedlc"), fedlc_loss(logits, batch["labels"], counts, FEDLC_TAU)),
        (FederationConfig(label_skew="fedrs"), fedrs_loss(logits, batch["labels"], counts, FEDRS_ALPHA)),
    ]:
        trainer.cfg = cfg
        model.zero_grad(set_to_none=True)
        assert trainer._backward(batch, None, counts) == pytest.approx(float(expected.detach()), rel=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_model_family_gives_the_losses_class_logits(tiny, batch_for, family):
    """Encoders, ViT and decoders (their sequence-classification logits are (B, C) already); the
    counts are padded to the model's classes when the client's highest labels are absent."""
    loaded = tiny(family)  # 3 classes
    model = build_method("head").prepare(loaded.model, loaded.info)
    model.eval()
    batch = batch_for(loaded, n=6)
    batch["labels"] = torch.tensor([0, 1, 0, 1, 1, 0])  # class 2 absent
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (6, 3)
    split = EncodedSplit({}, batch["labels"])
    trainer = ClientTrainer(model, [], split, FederationConfig(label_skew="fedrs", fedrs_alpha=0.25), 0)
    counts = trainer.client_class_counts(np.arange(6))
    assert counts.tolist() == [3, 3]  # up to the highest label present; padded by the loss
    got = trainer._backward(batch, None, counts)
    assert got == pytest.approx(float(fedrs_loss(logits, batch["labels"], torch.tensor([3, 3, 0]), 0.25)), rel=1e-6)
    assert got != pytest.approx(float(F.cross_entropy(logits, batch["labels"])), rel=1e-4)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.params)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "table, key",
    [
        ({"proximal_mu": -0.1}, "federation.proximal_mu"),
        ({"proximal_mu": float("inf")}, "federation.proximal_mu"),
        ({"label_skew": "fedavg"}, "federation.label_skew"),
        ({"fedlc_tau": 1.0}, "federation.fedlc_tau"),  # label_skew = "none"
        ({"label_skew": "fedrs", "fedlc_tau": 1.0}, "federation.fedlc_tau"),
        ({"label_skew": "fedlc", "fedrs_alpha": 0.5}, "federation.fedrs_alpha"),
        ({"label_skew": "fedlc", "fedlc_tau": 0.0}, "federation.fedlc_tau"),
        ({"label_skew": "fedlc", "fedlc_tau": -1}, "federation.fedlc_tau"),
        ({"label_skew": "fedrs", "fedrs_alpha": 0.0}, "federation.fedrs_alpha"),
        ({"label_skew": "fedrs", "fedrs_alpha": 1.5}, "federation.fedrs_alpha"),
        ({"label_skew": "fedrs", "fedrs_alpha": "half"}, "federation.fedrs_alpha"),
    ],
)
def test_invalid_corrections_are_config_errors_naming_the_key(table, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config.from_dict({"data": {"name": "x"}, "federation": table})


def test_inactive_option_error_says_what_to_do():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"data": {"name": "x"}, "federation": {"label_skew": "fedlc", "fedrs_alpha": 0.5}})
    assert 'federation.fedrs_alpha: is only used with federation.label_skew = "fedrs" (it is "fedlc")' in str(err.value)


@pytest.mark.parametrize(
    "table",
    [
        {},
        {"proximal_mu": 0.01},
        {"label_skew": "fedlc"},
        {"label_skew": "fedlc", "fedlc_tau": 2},
        {"label_skew": "fedrs", "fedrs_alpha": 1, "proximal_mu": 1e-3},
    ],
)
def test_corrections_round_trip_through_config_toml(tmp_path, table):
    cfg = Config.from_dict({"data": {"name": "x"}, "federation": table})
    text = cfg.to_toml()
    (tmp_path / "config.toml").write_text(text)
    again = load_config(tmp_path / "config.toml")
    assert again.federation == cfg.federation
    for key, value in table.items():
        assert getattr(again.federation, key) == value
        assert isinstance(getattr(again.federation, key), type(value) if isinstance(value, str) else float)
    # unset options are left out (TOML has no null), so the file reloads under another label_skew
    assert ("fedlc_tau" in text) == ("fedlc_tau" in table) and ("fedrs_alpha" in text) == ("fedrs_alpha" in table)
    # the Flower runtime sends the config as this TOML text and rebuilds it the same way
    flower_app = pytest.importorskip("fedpeft.runtime.flower.app")
    assert flower_app.config_from_text(text).federation == cfg.federation


# --------------------------------------------------------------------------- end to end


def test_each_correction_runs_end_to_end_and_changes_the_result(csv_data, tmp_path):  # noqa: F811
    # label shards: each client holds about one class, so the label-skew losses have absent classes
    skewed = {"scheme": "shards", "num_clients": 4, "shards_per_client": 1}
    runs = {
        "plain": {},
        "fedprox": {"proximal_mu": 1.0},
        "fedlc": {"label_skew": "fedlc"},
        "fedrs": {"label_skew": "fedrs", "fedrs_alpha": 0.2},
    }
    states = {}
    for name, federation in runs.items():
        cfg = make_cfg(csv_data, partition=skewed, federation={"optimizer": "sgd", "lr": 0.1, **federation})
        summary = run_experiment(cfg, out=tmp_path / name)
        assert summary["status"] == "finished" and summary["rounds"] == 3, name
        saved = load_config(tmp_path / name / "config.toml").federation
        for key, value in federation.items():
            assert getattr(saved, key) == value, (name, key)
        states[name] = RunDir(tmp_path / name).latest_checkpoint().state
    for name in ("fedprox", "fedlc", "fedrs"):
        assert any(not np.array_equal(states[name][k], states["plain"][k]) for k in states["plain"]), name


# --------------------------------------------------------------------------- a client without rows


def test_a_client_without_rows_is_a_data_error_naming_it_not_a_zero_division():
    """partition() refuses an empty client (test_partition); a trainer handed one anyway (library
    use) says which client, and drawing batches from no rows says why, instead of dividing by 0."""
    from fedpeft.errors import DataError

    model, names, split = client_setup()
    trainer = ClientTrainer(model, names, split, FederationConfig(local_steps=2, batch_size=8), 0)
    g0 = get_state(model, names)
    with pytest.raises(DataError, match=r"^client 3 has no training rows"):
        trainer.fit(3, np.zeros(0, np.int64), g0, 1)
    with pytest.raises(DataError, match=r"no training rows to draw 2 batch"):
        trainer.batch_order(np.zeros(0, np.int64), 2, torch.Generator().manual_seed(0))
    assert trainer.batch_order(np.zeros(0, np.int64), 0, torch.Generator()) == []
    assert sum(len(b) for b in trainer.batch_order(np.arange(5), 3, torch.Generator().manual_seed(0))) == 15
