"""Server optimizers against Flower's own strategies, FedAvg exactness, checkpoint round trips and
updates that carry a subset of the names."""

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from fedpeft.federation.aggregate import fedavg
from fedpeft.federation.server_opt import SERVER_OPTIMIZERS, build_server_optimizer

SHAPES = {"enc.weight": (4, 3), "enc.bias": (3,), "head.weight": (3, 2, 2), "scale": ()}
WEIGHTS = [5, 17, 40]  # the three clients' sample counts
NON_DEFAULT = {
    "fedavg": {"server_lr": 0.7},
    "fedavgm": {"server_lr": 0.7, "server_momentum": 0.9},
    "fedadagrad": {"server_lr": 0.05, "tau": 1e-2},
    "fedadam": {"server_lr": 0.03, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-2},
    "fedyogi": {"server_lr": 0.05, "beta_1": 0.7, "beta_2": 0.9, "tau": 1e-4},
}


def _initial(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.normal(size=s)).astype(dtype) for k, s in SHAPES.items()}


def _clients(global_state, rnd, seed=0):
    """Three client results near ``global_state`` (their spread differs per client and round)."""
    rng = np.random.default_rng([seed, rnd])
    return [
        {k: np.asarray(v + rng.normal(0.05 * rnd, 0.1 * (c + 1), size=v.shape)).astype(v.dtype)
         for k, v in global_state.items()}
        for c in range(len(WEIGHTS))
    ]


def _run(opt, global_state, rounds, seed=0):
    """``rounds`` server steps; returns every round's new global state."""
    out = []
    for rnd in rounds:
        global_state = opt.step(global_state, fedavg(zip(_clients(global_state, rnd, seed), WEIGHTS)))
        out.append(global_state)
    return out


# ------------------------------------------------------------------ against Flower's strategies


def _flower_strategy(name, options):
    from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

    o = dict(options)
    if name == "fedavgm":
        renamed = {"server_learning_rate": o.pop("server_lr")} if "server_lr" in o else {}
        return FedAvgM(**renamed, **o)
    if "server_lr" in o:
        o["eta"] = o.pop("server_lr")
    return {"fedadagrad": FedAdagrad, "fedadam": FedAdam, "fedyogi": FedYogi}[name](**o)


class _Grid:
    def get_node_ids(self):
        return [101, 102, 103]


def _flower_round(strategy, rnd, global_state, clients):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    def record(state):
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})

    instructions = list(strategy.configure_train(rnd, record(global_state), ConfigRecord(), _Grid()))
    assert len(instructions) == len(clients)
    replies = [
        Message(RecordDict({"arrays": record(state), "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
        for msg, state, n in zip(instructions, clients, WEIGHTS)
    ]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return {k: a.numpy() for k, a in arrays.items()}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", ["defaults", "non-default"])
@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_matches_flower_strategy_every_round(name, options, dtype, flower_identity):
    """The same client replies to Flower's strategy and to ours, 5 rounds, each side continuing
    from its own result: the same global state every round (defaults: Flower's own)."""
    opts = {} if options == "defaults" else NON_DEFAULT[name]
    ours, theirs = build_server_optimizer(name, **opts), _flower_strategy(name, opts)
    state = flower_state = _initial(dtype)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == np.float64 else {"rtol": 1e-6, "atol": 1e-6}
    for rnd in range(1, 6):
        clients = _clients(state, rnd)
        average = fedavg(zip(clients, WEIGHTS))
        state = ours.step(state, average)
        flower_state = _flower_round(theirs, rnd, flower_state, clients)
        assert list(state) == list(SHAPES)
        for k in SHAPES:
            assert state[k].dtype == dtype and state[k].shape == SHAPES[k]
            np.testing.assert_allclose(state[k], flower_state[k], err_msg=f"{name} round {rnd} {k}", **tol)
        moved = any(not np.allclose(state[k], average[k], rtol=1e-4, atol=1e-5) for k in SHAPES)
        assert moved == (name != "fedavgm" or options != "defaults")  # FedAvgM's defaults are FedAvg


# ------------------------------------------------------------------ fedavg


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fedavg_with_server_lr_1_is_the_average_itself(dtype):
    opt = build_server_optimizer("fedavg")
    global_state = _initial(dtype)
    for rnd in range(1, 4):
        average = fedavg(zip(_clients(global_state, rnd), WEIGHTS))
        new = opt.step(global_state, average)
        for k in SHAPES:
            assert new[k] is average[k]
        global_state = new
    plain_momentum = build_server_optimizer("fedavgm", server_momentum=0.0)  # Flower: no server opt
    assert plain_momentum.step(global_state, average)["enc.bias"] is average["enc.bias"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fedavg_with_server_lr_half_takes_half_the_step(dtype):
    opt = build_server_optimizer("fedavg", server_lr=0.5)
    global_state = _initial(dtype)
    average = fedavg(zip(_clients(global_state, 1), WEIGHTS))
    new = opt.step(global_state, average)
    for k in SHAPES:
        g, a = global_state[k].astype(np.float64), average[k].astype(np.float64)
        np.testing.assert_array_equal(new[k], (g + 0.5 * (a - g)).astype(dtype))
        assert new[k].dtype == dtype
        step, full = new[k].astype(np.float64) - g, a - g
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 0}
        np.testing.assert_allclose(step, 0.5 * full, **tol)
        assert not np.allclose(new[k], average[k])


# ------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("name", list(SERVER_OPTIMIZERS))
def test_resume_from_state_dict_is_bit_identical(name):
    """3 rounds, state through safetensors bytes (as a checkpoint holds it), a fresh optimizer
    loads it and runs 2 more: the same arrays and state as 5 uninterrupted rounds."""
    start = _initial(np.float32)
    full_opt = build_server_optimizer(name, **NON_DEFAULT[name])
    full = _run(full_opt, start, range(1, 6))

    first = build_server_optimizer(name, **NON_DEFAULT[name])
    head = _run(first, start, range(1, 4))
    saved = load_safetensors(save_safetensors(first.state_dict()))  # as they are: contiguous, 0-d kept
    assert saved["step"].shape == () and int(saved["step"]) == 3
    resumed = build_server_optimizer(name, **NON_DEFAULT[name])
    resumed.load_state_dict(saved)
    tail = _run(resumed, head[-1], range(4, 6))

    for ours, expected in zip(head + tail, full):
        for k in SHAPES:
            assert ours[k].dtype == expected[k].dtype
            np.testing.assert_array_equal(ours[k], expected[k])
    end, expected_end = resumed.state_dict(), full_opt.state_dict()
    assert end.keys() == expected_end.keys()
    for k in end:
        assert end[k].dtype == expected_end[k].dtype
        np.testing.assert_array_equal(end[k], expected_end[k])

    if name != "fedavg":  # the loaded state matters: a fresh optimizer would go elsewhere
        fresh = _run(build_server_optimizer(name, **NON_DEFAULT[name]), head[-1], range(4, 6))
        assert not all(np.array_equal(fresh[-1][k], full[-1][k]) for k in SHAPES)


def test_load_state_dict_rejects_a_foreign_state():
    adam = build_server_optimizer("fedadam")
    _run(adam, _initial(np.float64), range(1, 3))
    with pytest.raises(ValueError, match="unexpected 'm/"):
        build_server_optimizer("fedadagrad").load_state_dict(adam.state_dict())  # keeps v only
    state = adam.state_dict()
    del state["v/scale"]
    with pytest.raises(ValueError, match="scale"):
        build_server_optimizer("fedadam").load_state_dict(state)
    with pytest.raises(ValueError, match="step"):
        build_server_optimizer("fedadam").load_state_dict({})


# ------------------------------------------------------------------ updates with a subset of the names


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_only_names_in_the_update_are_stepped(name):
    """A name absent from an update keeps its array and moments; a name first seen late starts
    fresh. Every name's trajectory equals an optimizer that only ever saw that name's updates."""
    opts = NON_DEFAULT[name]
    opt = build_server_optimizer(name, **opts)
    schedule = [
        {"enc.weight", "enc.bias"},  # head.weight and scale not yet trained
        {"enc.weight", "head.weight"},
        {"enc.bias", "head.weight", "scale"},
        {"enc.weight", "enc.bias", "head.weight", "scale"},
    ]
    global_state = _initial(np.float64)
    per_name = {k: build_server_optimizer(name, **opts) for k in SHAPES}
    alone = {k: {k: v} for k, v in global_state.items()}
    for rnd, names in enumerate(schedule, start=1):
        before = opt.state_dict()
        clients = [{k: v for k, v in c.items() if k in names} for c in _clients(global_state, rnd)]
        new = opt.step(global_state, fedavg(zip(clients, WEIGHTS)))
        after = opt.state_dict()
        assert list(new) == list(SHAPES)
        for k in SHAPES:
            if k not in names:
                assert new[k] is global_state[k]
                for key in before:
                    if key.endswith(f"/{k}"):
                        np.testing.assert_array_equal(after[key], before[key])
                        assert key.startswith("step/") or after[key] is before[key]  # moments untouched
                assert (f"step/{k}" in after) == (f"step/{k}" in before)
            else:
                alone[k] = per_name[k].step(alone[k], fedavg(zip([{k: c[k]} for c in clients], WEIGHTS)))
                np.testing.assert_array_equal(new[k], alone[k][k])
                seen = sum(k in s for s in schedule[:rnd])
                assert int(after[f"step/{k}"]) == seen
        assert int(after["step"]) == rnd
        global_state = new


def test_step_rejects_mismatched_inputs():
    opt = build_server_optimizer("fedadam")
    g = {"w": np.zeros(3, dtype=np.float32)}
    with pytest.raises(ValueError, match="not in the global state"):
        opt.step(g, {"x": np.zeros(3, dtype=np.float32)})
    with pytest.raises(ValueError, match="w is float32"):
        opt.step(g, {"w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="w is float64"):
        opt.step(g, {"w": np.zeros(3)})
    assert opt.state_dict().keys() == {"step"} and opt.steps == 0  # nothing stepped


def test_step_leaves_its_inputs_untouched():
    opt = build_server_optimizer("fedyogi")
    g = _initial(np.float32)
    average = fedavg(zip(_clients(g, 1), WEIGHTS))
    copies = [{k: v.copy() for k, v in s.items()} for s in (g, average)]
    for _ in range(2):
        opt.step(g, average)
    for s, c in zip((g, average), copies):
        for k in s:
            np.testing.assert_array_equal(s[k], c[k])


# ------------------------------------------------------------------ building by name


def test_build_by_name_with_flower_defaults():
    assert list(SERVER_OPTIMIZERS) == ["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"]
    adam, yogi = build_server_optimizer("fedadam"), build_server_optimizer("fedyogi")
    assert (adam.server_lr, adam.beta_1, adam.beta_2, adam.tau) == (0.1, 0.9, 0.99, 1e-3)
    assert (yogi.server_lr, yogi.beta_1, yogi.beta_2, yogi.tau) == (1e-2, 0.9, 0.99, 1e-3)
    m = build_server_optimizer("fedavgm")
    assert (m.server_lr, m.server_momentum) == (1.0, 0.0)
    assert "fedadam(server_lr=0.1" in repr(adam)
    with pytest.raises(ValueError, match="fedavg, fedavgm, fedadagrad, fedadam, fedyogi"):
        build_server_optimizer("fedsgd")
    with pytest.raises(ValueError, match="takes server_lr, tau, beta_1; got beta_2"):
        build_server_optimizer("fedadagrad", beta_2=0.9)
    for name, bad in [("fedadam", {"beta_1": 1.0}), ("fedyogi", {"tau": 0.0}), ("fedavg", {"server_lr": 0.0}),
                      ("fedavgm", {"server_momentum": -0.1}), ("fedadam", {"server_lr": float("nan")})]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_server_optimizer(name, **bad)
