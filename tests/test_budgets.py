"""Client budgets ([budgets], fedpeft.budgets.clients): profiles, each client's layers depth,
infeasible clients in runs, and `fedpeft plan` (Pfeiffer et al. 2024, https://arxiv.org/abs/2411.07826)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_runs import csv_data, make_cfg  # noqa: F401 - fixture reused
from typer.testing import CliRunner

from fedpeft.budgets import predict
from fedpeft.budgets.clients import assign_profiles, largest_remainder
from fedpeft.budgets.planner import plan
from fedpeft.cli import app
from fedpeft.config import Config
from fedpeft.errors import ConfigError
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.models import load_model, transformer_blocks

pytestmark = pytest.mark.usefixtures("one_thread")
MIB = 2**20


def rows_of(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def top_k_costs(cfg, k):
    """The cost model on a tiny-bert whose last ``k`` blocks and everything outside the blocks
    but the embeddings are trainable (flagged here, not by the layers method)."""
    loaded = load_model(cfg.model, ["a", "b", "c"], 0)
    model, info = loaded.model, loaded.info
    blocks = transformer_blocks(model, info.num_layers)
    for name, p in model.named_parameters():
        i = blocks.index_of(name)
        p.requires_grad_(i >= info.num_layers - k if i is not None else not name.startswith("bert.embeddings"))
    return predict(model, info, cfg)


def between(low, high):
    assert low < high
    return (low + high) / 2


def test_each_client_gets_the_deepest_suffix_its_memory_flops_and_upload_budgets_allow(csv_data):  # noqa: F811
    base = make_cfg(csv_data, method={"name": "layers"}, federation={"local_steps": 3})
    costs = [top_k_costs(base, k) for k in range(3)]  # tiny-bert: 2 blocks
    n = 24  # 120 rows, 5 iid clients
    profiles = [
        {"name": "k0-memory", "memory_mb": between(costs[0].memory.peak, costs[1].memory.peak) / MIB},
        {"name": "k1-memory", "memory_mb": between(costs[1].memory.peak, costs[2].memory.peak) / MIB},
        {"name": "k1-flops", "flops_per_round": between(costs[1].flops_per_round(n), costs[2].flops_per_round(n))},
        {"name": "k0-upload", "upload_mb_per_round": between(costs[0].upload_bytes, costs[1].upload_bytes) / 1e6},
        {"name": "all"},
    ]
    cfg = make_cfg(csv_data, method={"name": "layers"}, federation={"local_steps": 3, "clients_per_round": 4},
                   partition={"num_clients": 5},
                   budgets={"profiles": profiles, "assign": "list", "clients": [p["name"] for p in profiles]})
    exp = build_experiment(cfg)
    assert exp.budgets.depths == [0, 1, 1, 0, 2]
    assert [c.fits for c in exp.budgets.clients] == [True] * 5
    assert {c: exp.assignment.labels[c]["k"] for c in range(5)} == dict(enumerate([0, 1, 1, 0, 2]))
    assert exp.assignment.of(4) is None and len(exp.assignment.of(0)) < len(exp.assignment.of(1)) < len(exp.names)
    fit = exp.budgets.clients[1]
    assert fit.memory_bytes == costs[1].memory.peak and fit.upload_bytes == costs[1].upload_bytes


def test_infeasible_clients_do_not_train_and_are_recorded(csv_data, tmp_path):  # noqa: F811
    # lora's weights alone (tiny-bert: ~1M float32 parameters) exceed a 1 MiB profile
    profiles = [{"name": "big"}, {"name": "small", "memory_mb": 1.0}]
    cfg = make_cfg(csv_data, federation={"rounds": 1, "clients_per_round": 4}, output={"save_model": False},
                   budgets={"profiles": profiles, "assign": "list", "clients": ["big", "small", "big", "small"]})
    summary = run_experiment(cfg, out=tmp_path / "run")
    (row,) = rows_of(tmp_path / "run")
    assert row["clients_infeasible"] == [1, 3] and row["aggregated"] and row["clients_reported"] == 2
    by_id = {c["id"]: c for c in row["clients"]}
    assert [by_id[c]["status"] for c in range(4)] == ["ok", "infeasible", "ok", "infeasible"]
    assert all(by_id[c]["bytes_up"] == 0 and by_id[c]["bytes_down"] == 0 and "samples" not in by_id[c] for c in (1, 3))
    assert summary["clients_infeasible_total"] == 2 and summary["budgets"]["clients_infeasible"] == [1, 3]
    written = json.loads((tmp_path / "run" / "budgets.json").read_text())
    assert [(c["profile"], c["fits"], c["exceeds"]) for c in written["clients"]] == [
        ("big", True, []), ("small", False, ["memory_mb"]), ("big", True, []), ("small", False, ["memory_mb"])]
    # every selected client infeasible: nothing trains, the round says so and is not aggregated
    cfg.budgets.clients = ["small"] * 4
    run_experiment(cfg, out=tmp_path / "none")
    (row,) = rows_of(tmp_path / "none")
    assert not row["aggregated"] and row["clients_reported"] == 0 and "infeasible" in row["message"]


def test_a_resumed_run_reassigns_the_same_depths(csv_data, tmp_path):  # noqa: F811
    costs = [top_k_costs(make_cfg(csv_data), k) for k in (1, 2)]
    profiles = [{"name": "low", "memory_mb": between(costs[0].memory.peak, costs[1].memory.peak) / MIB}, {"name": "high"}]

    def cfg(rounds):
        return make_cfg(csv_data, method={"name": "layers"}, federation={"rounds": rounds, "clients_per_round": 4},
                        output={"save_model": False},
                        budgets={"profiles": profiles, "assign": "fractions", "fractions": [0.5, 0.5]})

    run_experiment(cfg(1), out=tmp_path / "cut")
    first = (tmp_path / "cut" / "budgets.json").read_text()
    run_experiment(cfg(2), out=tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "budgets.json").read_text() == first
    assert sorted(c["k"] for c in json.loads(first)["clients"]) == [1, 1, 2, 2]
    one, two = rows_of(tmp_path / "cut")
    assert [(c["id"], c["k"]) for c in one["clients"]] == [(c["id"], c["k"]) for c in two["clients"]]
    assert sorted(c["k"] for c in two["clients"]) == [1, 1, 2, 2]


def test_measured_memory_sits_next_to_the_prediction_per_depth_and_changes_no_result(csv_data, tmp_path):  # noqa: F811
    """runtime.measure_memory: one real step per depth (torch's memory profiler), within the cost
    model's stated peak tolerance (docs/budgets.md: 25%), deeper clients measure more, and the run
    ends in exactly the state of the unmeasured run (values, flags and random state restored)."""
    from test_runs import final_state

    costs = [top_k_costs(make_cfg(csv_data), k) for k in (1, 2)]
    profiles = [{"name": "low", "memory_mb": between(costs[0].memory.peak, costs[1].memory.peak) / MIB}, {"name": "high"}]

    def cfg(measure):
        return make_cfg(csv_data, method={"name": "layers"}, federation={"rounds": 1, "clients_per_round": 4},
                        runtime={"measure_memory": measure},
                        budgets={"profiles": profiles, "assign": "fractions", "fractions": [0.5, 0.5]})

    plain, measured = (run_experiment(cfg(m), out=tmp_path / str(m)) for m in (False, True))
    assert plain["client_peak_memory_mb"]["measured"] is None
    summary = measured["client_peak_memory_mb"]
    assert summary["measured"] == pytest.approx(summary["predicted"], rel=0.25)
    clients = json.loads((tmp_path / "True" / "budgets.json").read_text())["clients"]
    assert all(c["measured_memory_mb"] is None for c in json.loads((tmp_path / "False" / "budgets.json").read_text())["clients"])
    by_k = {c["k"]: c["measured_memory_mb"] for c in clients}
    assert sorted(by_k) == [1, 2] and by_k[1] < by_k[2]
    for c in clients:
        assert c["measured_memory_mb"] == pytest.approx(c["memory_mb"], rel=0.25), c
    a, b = final_state(tmp_path / "False"), final_state(tmp_path / "True")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_round_plan_never_sends_work_to_infeasible_clients():
    """Every runtime (in process, flower-sim, flower) sends work to ``plan.training`` only."""
    from fedpeft.config import FederationConfig
    from fedpeft.federation.assignment import Assignment
    from fedpeft.federation.strategy import FedAvgStrategy

    fed = FederationConfig(clients_per_round=4, dropout=0.5)
    plain = FedAvgStrategy(fed, 4, 0).plan_round(1)
    strategy = FedAvgStrategy(fed, 4, 0, assignment=Assignment({1: ("x",), 2: ("x",)}), infeasible=[2, 3])
    planned = strategy.plan_round(1)
    assert planned.infeasible == [2, 3] and not {2, 3} & set(planned.training) and 2 not in planned.assigned
    assert planned.dropped == [c for c in plain.dropped if c not in (2, 3)]  # the same dropout draws


def test_fractions_give_exact_counts_by_largest_remainder_and_a_seeded_shuffle(csv_data):  # noqa: F811
    assert largest_remainder([1 / 3, 1 / 3, 1 / 3], 4) == [2, 1, 1]
    assert largest_remainder([0.55, 0.25, 0.2], 10) == [6, 2, 2] and largest_remainder([0.5, 0.5], 7) == [4, 3]
    cfg = make_cfg(csv_data, partition={"num_clients": 10}, budgets={
        "profiles": [{"name": "a"}, {"name": "b"}, {"name": "c"}], "assign": "fractions", "fractions": [0.5, 0.3, 0.2]})
    names = {s: [p.name for p in assign_profiles(cfg.budgets, 10, s)] for s in (0, 1)}
    assert Counter(names[0]) == Counter(names[1]) == {"a": 5, "b": 3, "c": 2}
    assert names[0] == [p.name for p in assign_profiles(cfg.budgets, 10, 0)] and names[0] != names[1]


@pytest.mark.parametrize("budgets,message", [
    ({"profiles": [{"name": "a"}, {"name": "b", "memory_mb": -1}], "assign": "list", "clients": ["a"] * 4},
     "budgets.profiles[1].memory_mb: must be > 0"),
    ({"profiles": [{"name": "a", "flops_per_round": 0}]}, "budgets.profiles[0].flops_per_round: must be > 0"),
    ({"profiles": [{"name": "a"}, {"name": "b"}], "assign": "fractions", "fractions": [0.5, 0.4]},
     "budgets.fractions: must sum to 1"),
    ({"profiles": [{"name": "a"}, {"name": "b"}], "assign": "list", "clients": ["a", "b"]},
     "budgets.clients: needs one profile name per client (partition.num_clients = 4), got 2"),
    ({"profiles": [{"name": "a"}], "assign": "list", "clients": ["a", "x", "a", "a"]},
     "budgets.clients: unknown profile name(s) 'x'"),
    ({"profiles": [{"name": "a", "disk_mb": 3}]}, "budgets.profiles[0]: unknown key(s) disk_mb; valid keys: name"),
    ({"profiles": [{"name": "a"}, {"name": "b"}]}, 'budgets.assign: "same" gives every client the one profile'),
])
def test_budget_config_errors_name_the_key(csv_data, budgets, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        make_cfg(csv_data, budgets=budgets)


def test_plan_prints_fits_and_json_and_exits_0_when_nothing_fits(csv_data, tmp_path):  # noqa: F811
    cfg = make_cfg(csv_data, budgets={"profiles": [{"name": "phone", "memory_mb": 4.2}, {"name": "pc"}],
                                      "assign": "fractions", "fractions": [0.5, 0.5]})
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    runner = CliRunner()
    text = runner.invoke(app, ["plan", str(tmp_path / "c.toml"), "--methods", "head,full"])
    assert text.exit_code == 0, text.output
    lines = {tuple(c.strip() for c in line.split("│")[1:3]): line for line in text.output.splitlines() if "│" in line}
    assert "yes" in lines[("head", "phone")] and "no: memory_mb" in lines[("full", "phone")]
    assert "yes" in lines[("full", "pc")] and "fits every profile: head" in text.output
    out = runner.invoke(app, ["plan", str(tmp_path / "c.toml"), "--methods", "full", "--json"])
    got = {r["profile"]: r for r in json.loads(out.output)}
    full = predict(*_prepared(cfg, "full"), cfg)
    assert got["phone"]["memory_mb"] == pytest.approx(full.memory.peak / MIB) and not got["phone"]["fits"]
    assert got["pc"]["fits"] and got["pc"]["upload_mb"] == pytest.approx(full.upload_bytes / 1e6)
    assert {"method", "profile", "memory_mb", "flops_per_round", "upload_mb", "download_mb", "fits", "k",
            "trainable_params"} <= set(got["pc"])
    tiny = tmp_path / "tiny.toml"  # a budget nothing meets: said plainly, exit 0
    tiny.write_text(make_cfg(csv_data, budgets={"profiles": [{"name": "watch", "memory_mb": 0.5}]}).to_toml())
    res = runner.invoke(app, ["plan", str(tiny), "--methods", "head,lora"])
    assert res.exit_code == 0 and "no method fits the budgets of every profile" in res.output
    none = tmp_path / "none.toml"
    none.write_text(make_cfg(csv_data).to_toml())
    (row,) = json.loads(runner.invoke(app, ["plan", str(none), "--json"]).output)
    assert row["profile"] == "none" and row["fits"] and row["method"] == "lora"


def _prepared(cfg, method):
    from fedpeft.methods import build_method

    loaded = load_model(cfg.model, ["a", "b", "c"], 0)
    return build_method(method, None).prepare(loaded.model, loaded.info), loaded.info


def test_plan_models_picks_the_backbone_on_which_layers_trains_more_blocks(csv_data):  # noqa: F811
    cfg = make_cfg(csv_data, method={"name": "layers"})
    bert = top_k_costs(cfg, 2).memory.peak
    gpt2 = predict(*_prepared(make_cfg(csv_data, model={"name": "tiny-gpt2"}), "layers"), cfg).memory.peak
    assert bert < gpt2  # tiny-bert's 2 blocks fit below the budget, tiny-gpt2's do not
    cfg.budgets = Config.from_dict({**cfg.to_dict(), "budgets": {"profiles": [
        {"name": "dev", "memory_mb": between(bert, gpt2) / MIB}]}}).budgets
    planning = plan(cfg, models=["tiny-gpt2", "tiny-bert"])
    means = {m.model: m.mean_k for m in planning.models}
    assert means["tiny-bert"] == 2 and means["tiny-gpt2"] < 2 and planning.best_model == "tiny-bert"
