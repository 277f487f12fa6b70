"""Robust aggregation rules against brute-force NumPy references written here, against Flower's
own strategies fed the same replies, under one client sending 1000x its delta, and check_rule."""

import numpy as np
import pytest

from fedpeft.federation.robust import (
    AGGREGATORS,
    bulyan,
    check_rule,
    clip_to_norm,
    coordinate_median,
    flatten,
    krum,
    krum_scores,
    multikrum,
    robust_aggregate,
    trimmed_mean,
    unflatten,
    update_norms,
)

SHAPES = {"lora_A": (3, 4), "lora_B": (4, 2), "bias": (5,)}  # 25 values, three shapes


def _deltas(k, seed=0, dtype=np.float64):
    """``k`` deltas around a common drift; client c's noise scale grows with c (distinct scores)."""
    rng = np.random.default_rng([seed, k])
    drift = {n: rng.normal(size=s) for n, s in SHAPES.items()}
    return [
        {n: (drift[n] + rng.normal(0, 0.2 * (1 + c % 4) + 0.01 * c, size=s)).astype(dtype) for n, s in SHAPES.items()}
        for c in range(k)
    ]


def _weights(k, seed=0):
    return [int(w) for w in np.random.default_rng([seed, k, 7]).integers(1, 100, size=k)]


def _vec(named):
    """One delta as a flat float64 vector in SHAPES order (independent of the module's flatten)."""
    return np.concatenate([np.asarray(named[n], dtype=np.float64).reshape(-1) for n in SHAPES])


# ------------------------------------------------------------------ brute-force references


def _ref_median(vectors):
    out = []
    for column in zip(*vectors):
        s = sorted(column)
        out.append((s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2)
    return np.array(out)


def _ref_trimmed_mean(vectors, fraction):
    cut = int(fraction * len(vectors))
    return np.array([sum(sorted(col)[cut : len(col) - cut]) / (len(col) - 2 * cut) for col in zip(*vectors)])


def _ref_scores(vectors, f, neighbours=None):
    n = len(vectors)
    m = n - f - 2 if neighbours is None else neighbours
    scores = []
    for i in range(n):
        dist = sorted(sum((a - b) ** 2 for a, b in zip(vectors[i], vectors[j])) for j in range(n) if j != i)
        scores.append(sum(dist[:m]))
    return scores


def _ranked(scores):
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def _ref_bulyan(vectors, f, selection):
    k = len(vectors)
    theta, beta = k - 2 * f, k - 4 * f
    if selection == "multikrum":
        chosen = _ranked(_ref_scores(vectors, f))[:theta]
    else:  # the paper: Krum, remove, repeat
        pool, chosen = list(range(k)), []
        while len(chosen) < theta:
            n = len(pool)
            scores = _ref_scores([vectors[i] for i in pool], f, min(max(1, n - f - 2), n - 1))
            chosen.append(pool.pop(_ranked(scores)[0]))
    out = []
    for column in zip(*(vectors[i] for i in chosen)):
        med = _ref_median([[v] for v in column])[0]
        near = sorted(column, key=lambda v: abs(v - med))[:beta]
        out.append(sum(near) / beta)
    return np.array(out), chosen


# ------------------------------------------------------------------ against the references


def test_flatten_unflatten_and_norms():
    deltas = _deltas(4, dtype=np.float32)
    deltas[2] = dict(reversed(list(deltas[2].items())))  # read by name, laid out in delta 0's order
    matrix = flatten(deltas)
    assert matrix.shape == (4, 25) and matrix.dtype == np.float64
    for row, delta in zip(matrix, deltas):
        np.testing.assert_array_equal(row, _vec(delta))
        back = unflatten(row, like=deltas[0])
        assert list(back) == list(SHAPES)
        for n in SHAPES:
            assert back[n].dtype == np.float32 and back[n].shape == SHAPES[n]
            np.testing.assert_array_equal(back[n], delta[n])
    np.testing.assert_allclose(update_norms(deltas), [np.linalg.norm(_vec(d)) for d in deltas], rtol=1e-12)
    with pytest.raises(ValueError, match="25 values"):
        unflatten(matrix[0][:-1], like=deltas[0])
    with pytest.raises(ValueError, match="shape"):
        flatten([deltas[0], {**deltas[1], "bias": np.zeros(4)}])


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_coordinate_median(k):
    deltas = _deltas(k)
    np.testing.assert_allclose(_vec(coordinate_median(deltas)), _ref_median([_vec(d) for d in deltas]), rtol=1e-14)


@pytest.mark.parametrize(("k", "fraction"), [(5, 0.0), (5, 0.2), (8, 0.25), (10, 0.3), (3, 0.49), (9, 0.1)])
def test_trimmed_mean(k, fraction):
    deltas = _deltas(k)
    got = _vec(trimmed_mean(deltas, fraction))
    np.testing.assert_allclose(got, _ref_trimmed_mean([_vec(d) for d in deltas], fraction), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("k", "f"), [(3, 0), (5, 0), (7, 1), (9, 2), (10, 3)])
def test_krum_and_multikrum(k, f):
    deltas, weights = _deltas(k), _weights(k)
    vectors = [_vec(d) for d in deltas]
    scores = _ref_scores(vectors, f)
    np.testing.assert_allclose(krum_scores(deltas, f), scores, rtol=1e-12)
    ranked = _ranked(scores)

    result, selected = krum(deltas, f)
    assert selected == ranked[:1]
    np.testing.assert_array_equal(_vec(result), vectors[ranked[0]])

    for keep in (None, 1, 2, k):
        chosen = ranked[: k - f if keep is None else keep]
        for w in (None, weights):
            ws = [1.0] * k if w is None else w
            expected = sum(ws[i] * vectors[i] for i in chosen) / sum(ws[i] for i in chosen)
            result, selected = multikrum(deltas, f, keep=keep, weights=w)
            assert selected == chosen
            np.testing.assert_allclose(_vec(result), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("selection", ["repeated_krum", "multikrum"])
@pytest.mark.parametrize(("k", "f"), [(3, 0), (7, 1), (9, 1), (11, 2), (12, 2)])
def test_bulyan(k, f, selection):
    deltas = _deltas(k)
    expected, chosen = _ref_bulyan([_vec(d) for d in deltas], f, selection)
    result, selected = bulyan(deltas, f, selection=selection)
    assert selected == chosen
    np.testing.assert_allclose(_vec(result), expected, rtol=1e-12, atol=1e-14)


def test_the_two_bulyan_selections_can_differ():
    """Repeated Krum rescoring the shrinking pool is not one MultiKrum pass (else one test covers both)."""
    pairs = [(bulyan(_deltas(11, seed), 2)[1], bulyan(_deltas(11, seed), 2, "multikrum")[1]) for seed in range(20)]
    assert any(set(repeated) != set(one_pass) for repeated, one_pass in pairs)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_dispatcher_statuses_dtypes_and_inputs_untouched(aggregator):
    k, f = 11, 2
    deltas, weights = _deltas(k, dtype=np.float32), _weights(k)
    before = [{n: v.copy() for n, v in d.items()} for d in deltas]
    result, status = robust_aggregate(aggregator, deltas, weights, trim_fraction=0.2, byzantine=f)
    assert list(result) == list(SHAPES)
    assert all(v.dtype == np.float32 and v.shape == SHAPES[n] for n, v in result.items())
    for d, b in zip(deltas, before):
        for n in SHAPES:
            np.testing.assert_array_equal(d[n], b[n])
    vectors = [_vec(d) for d in deltas]
    kept = {"krum": 1, "multikrum": k - f, "bulyan": k - 2 * f}.get(aggregator, k)
    assert len(status) == k and status.count("kept") == kept and status.count("excluded") == k - kept
    if aggregator == "mean":
        expected = sum(w * v for w, v in zip(weights, vectors)) / sum(weights)
        np.testing.assert_allclose(_vec(result), expected, rtol=1e-6)
    if aggregator == "multikrum":
        chosen = _ranked(_ref_scores(vectors, f))[: k - f]
        assert [i for i, s in enumerate(status) if s == "kept"] == sorted(chosen)
        expected = sum(weights[i] * vectors[i] for i in chosen) / sum(weights[i] for i in chosen)
        np.testing.assert_allclose(_vec(result), expected, rtol=1e-6)


# ------------------------------------------------------------------ against Flower's strategies


class _Grid:
    def __init__(self, k):
        self.k = k

    def get_node_ids(self):
        return list(range(101, 101 + self.k))


def _flower_aggregate(strategy, global_state, states, weights):
    """Flower's aggregate of the clients' *states* (parameters), as its ServerApp would get them."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    def record(state):
        return ArrayRecord({n: Array(np.asarray(v)) for n, v in state.items()})

    instructions = list(strategy.configure_train(1, record(global_state), ConfigRecord(), _Grid(len(states))))
    assert len(instructions) == len(states)
    replies = [
        Message(RecordDict({"arrays": record(state), "metrics": MetricRecord({"num-examples": n})}), reply_to=msg)
        for msg, state, n in zip(instructions, states, weights)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    return {n: a.numpy() for n, a in arrays.items()}


def _repeated_krum_rule(contents, f, theta):
    """The paper's Bulyan selection built from Flower's own Krum: pick one, remove it, repeat."""
    from flwr.serverapp.strategy.multikrum import select_multikrum

    pool, chosen = list(contents), []
    while len(chosen) < theta:
        best = select_multikrum(pool, f, 1)[0]
        chosen.append(pool.pop(next(i for i, c in enumerate(pool) if c is best)))
    return chosen


CASES = [  # (rule, k, f, trim_fraction, keep)
    ("median", 5, 0, 0.0, None), ("median", 8, 0, 0.0, None),
    ("trimmed_mean", 10, 0, 0.2, None), ("trimmed_mean", 9, 0, 0.3, None), ("trimmed_mean", 8, 0, 0.0, None),
    ("krum", 5, 0, 0.0, None), ("krum", 9, 2, 0.0, None),
    ("multikrum", 9, 2, 0.0, None), ("multikrum", 8, 1, 0.0, 3), ("multikrum", 7, 1, 0.0, 1),
    ("bulyan", 7, 1, 0.0, None), ("bulyan", 12, 2, 0.0, None),
    ("bulyan_multikrum", 7, 1, 0.0, None), ("bulyan_multikrum", 12, 2, 0.0, None),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("rule", "k", "f", "fraction", "keep"), CASES)
def test_matches_flower_strategy(rule, k, f, fraction, keep, dtype, flower_identity):
    """The same clients to Flower (their states) and to ours (their deltas): ``global + ours`` is
    Flower's aggregate. MultiKrum weights by num-examples in both."""
    from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

    rng = np.random.default_rng([k, f])
    global_state = {n: rng.normal(size=s).astype(dtype) for n, s in SHAPES.items()}
    states = [{n: (global_state[n] + d[n]).astype(dtype) for n in SHAPES} for d in _deltas(k, seed=3)]
    deltas = [{n: (s[n].astype(np.float64) - global_state[n]).astype(dtype) for n in SHAPES} for s in states]
    weights = _weights(k, seed=3)
    strategy, ours = {
        "median": (FedMedian(), lambda: coordinate_median(deltas)),
        "trimmed_mean": (FedTrimmedAvg(beta=fraction), lambda: trimmed_mean(deltas, fraction)),
        "krum": (Krum(num_malicious_nodes=f), lambda: krum(deltas, f)[0]),
        "multikrum": (
            MultiKrum(num_malicious_nodes=f, num_nodes_to_select=k - f if keep is None else keep),
            lambda: multikrum(deltas, f, keep=keep, weights=weights)[0],
        ),
        "bulyan": (Bulyan(num_malicious_nodes=f, selection_rule=_repeated_krum_rule), lambda: bulyan(deltas, f)[0]),
        "bulyan_multikrum": (Bulyan(num_malicious_nodes=f), lambda: bulyan(deltas, f, selection="multikrum")[0]),
    }[rule]
    theirs = _flower_aggregate(strategy, global_state, states, weights)
    mine = ours()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 2e-6, "atol": 2e-6}
    for n in SHAPES:
        assert mine[n].dtype == dtype
        np.testing.assert_allclose(global_state[n] + mine[n].astype(np.float64), theirs[n], err_msg=n, **tol)


def test_flower_multikrum_default_is_krum_and_it_is_weighted(flower_identity):
    """Flower's MultiKrum defaults to one selected (Krum); with several its mean is weighted."""
    from flwr.serverapp.strategy import MultiKrum

    k, f = 8, 1
    deltas, weights = _deltas(k, seed=5), _weights(k, seed=5)
    zero = {n: np.zeros(s) for n, s in SHAPES.items()}
    default = _flower_aggregate(MultiKrum(num_malicious_nodes=f), zero, deltas, weights)
    np.testing.assert_allclose(_vec(default), _vec(krum(deltas, f)[0]), rtol=1e-12)
    several = _vec(_flower_aggregate(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=5), zero, deltas, weights))
    np.testing.assert_allclose(several, _vec(multikrum(deltas, f, keep=5, weights=weights)[0]), rtol=1e-12)
    assert not np.allclose(several, _vec(multikrum(deltas, f, keep=5)[0]), rtol=1e-6)


def test_clip_to_norm_matches_flower_flat_clip():
    from flwr.supercore.differential_privacy import adaptive_clip_inputs_inplace

    for delta in _deltas(6, seed=2):
        for bound in (0.5, 3.0, 1e3):
            clipped, was_clipped = clip_to_norm(delta, bound)
            theirs = [delta[n].copy() for n in SHAPES]
            assert was_clipped == adaptive_clip_inputs_inplace(theirs, bound)
            np.testing.assert_allclose(_vec(clipped), np.concatenate([a.ravel() for a in theirs]), rtol=1e-12)
            assert np.linalg.norm(_vec(clipped)) <= bound * (1 + 1e-12)
            assert was_clipped == (np.linalg.norm(_vec(delta)) > bound)


# ------------------------------------------------------------------ one client sends 1000x its delta


@pytest.mark.parametrize("seed", range(4))
def test_robust_rules_resist_one_scaled_client_of_eight(seed):
    k, attacker = 8, seed % 8
    rng = np.random.default_rng(seed)
    drift = {n: rng.normal(0, 1, size=s) for n, s in SHAPES.items()}
    clean = [{n: drift[n] + rng.normal(0, 0.3, size=s) for n, s in SHAPES.items()} for _ in range(k)]
    clean_mean = np.mean([_vec(d) for d in clean], axis=0)
    spread = np.sqrt(np.mean([np.sum((_vec(d) - clean_mean) ** 2) for d in clean]))
    attacked = [dict(d) for d in clean]
    attacked[attacker] = {n: 1000 * v for n, v in clean[attacker].items()}
    weights = [10] * k

    mean, _ = robust_aggregate("mean", attacked, weights)
    assert np.linalg.norm(_vec(mean) - clean_mean) > 50 * spread
    settings = {"median": {}, "trimmed_mean": {"trim_fraction": 0.125}, "krum": {"byzantine": 1},
                "multikrum": {"byzantine": 1}, "bulyan": {"byzantine": 1}}  # fmt: skip
    for aggregator, options in settings.items():
        result, status = robust_aggregate(aggregator, attacked, weights, **options)
        assert np.linalg.norm(_vec(result) - clean_mean) < 1.5 * spread, aggregator
        if aggregator in ("krum", "multikrum", "bulyan"):
            assert status[attacker] == "excluded", aggregator

    bound = float(np.median(update_norms(attacked)))
    clipped = [clip_to_norm(d, bound) for d in attacked]
    assert clipped[attacker][1] and np.linalg.norm(_vec(clipped[attacker][0])) <= bound * (1 + 1e-12)
    clipped_mean, _ = robust_aggregate("mean", [c for c, _ in clipped], weights)
    assert np.linalg.norm(_vec(clipped_mean) - clean_mean) < np.linalg.norm(_vec(mean) - clean_mean) / 100


# ------------------------------------------------------------------ check_rule


@pytest.mark.parametrize(
    ("aggregator", "clients", "fraction", "f", "words"),
    [
        ("krum", 4, 0.0, 1, ["krum", "byzantine=1", "2*1 + 2 = 4", "got 4"]),
        ("multikrum", 6, 0.0, 2, ["multikrum", "byzantine=2", "2*2 + 2 = 6", "got 6"]),
        ("bulyan", 10, 0.0, 2, ["bulyan", "byzantine=2", "4*2 + 3 = 11", "got 10"]),
        ("bulyan", 2, 0.0, 0, ["4*0 + 3 = 3", "got 2"]),
        ("trimmed_mean", 10, 0.5, 0, ["trim_fraction", "[0, 0.5)", "0.5"]),
        ("trimmed_mean", 10, -0.1, 0, ["trim_fraction", "-0.1"]),
        ("median", 5, 0.0, -1, ["byzantine", "-1"]),
        ("krum", 9, 0.0, 1.5, ["byzantine", "1.5"]),
        ("median", 0, 0.0, 0, ["median", "at least 1", "got 0"]),
        ("fedavg", 5, 0.0, 0, ["'fedavg'", "mean, median, trimmed_mean, krum, multikrum, bulyan"]),
    ],
)
def test_check_rule_names_the_numbers(aggregator, clients, fraction, f, words):
    with pytest.raises(ValueError) as error:
        check_rule(aggregator, clients, trim_fraction=fraction, byzantine=f)
    for word in words:
        assert word in str(error.value)


def test_check_rule_accepts_the_boundaries_and_aggregation_time_enforces_them():
    check_rule("krum", 5, byzantine=1)
    check_rule("multikrum", 3, byzantine=0)
    check_rule("bulyan", 11, byzantine=2)
    check_rule("trimmed_mean", 3, trim_fraction=0.49)  # cuts 1 of 3 at each end: 1 value left
    check_rule("median", 1)
    with pytest.raises(ValueError, match=r"4\*2 \+ 3 = 11 client updates, got 10"):
        robust_aggregate("bulyan", _deltas(10), [1] * 10, byzantine=2)
    with pytest.raises(ValueError, match=r"2\*1 \+ 2 = 4 client updates, got 4"):
        krum(_deltas(4), 1)
    with pytest.raises(ValueError, match="keep"):
        multikrum(_deltas(6), 1, keep=7)
    with pytest.raises(ValueError, match="3 weights for 4"):
        robust_aggregate("mean", _deltas(4), [1, 2, 3])
    with pytest.raises(ValueError, match="names"):
        coordinate_median([_deltas(2)[0], {"bias": np.zeros(5)}])
