"""Config parsing, validation and overrides: every mistake names its key."""

import pytest

from fedpeft.config import Config, apply_overrides, load_config
from fedpeft.errors import ConfigError

BASE = """
[model]
name = "tiny-bert"
[data]
name = "banking77"
[method]
name = "lora"
r = 4
[federation]
rounds = 3
clients_per_round = 0.5
"""


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_load_applies_defaults_types_and_method_options(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.model.name == "tiny-bert" and cfg.model.max_length == 64
    assert cfg.method.name == "lora" and cfg.method.options.r == 4
    assert cfg.federation.clients_per_round == 0.5 and isinstance(cfg.federation.clients_per_round, float)
    assert cfg.federation.lr == 5e-3


def test_overrides_parse_toml_values_and_bare_strings(tmp_path):
    cfg = load_config(
        _write(tmp_path, BASE),
        ["federation.rounds=7", "federation.clients_per_round=3", "method.name=bias", "data.max_train_samples=100"],
    )
    assert cfg.federation.rounds == 7
    assert cfg.federation.clients_per_round == 3 and isinstance(cfg.federation.clients_per_round, int)
    assert cfg.method.name == "bias"
    assert cfg.data.max_train_samples == 100


def test_other_methods_keys_are_kept_but_inactive(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["method.name=head"])
    assert cfg.method.name == "head" and cfg.method.inactive == {"r": 4}
    cfg.save(tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml").method.inactive == {"r": 4}


def test_int_accepted_for_float_key(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["federation.lr=1"])
    assert cfg.federation.lr == 1.0 and isinstance(cfg.federation.lr, float)


def test_roundtrip_through_saved_toml(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["method.r=16"])
    cfg.save(tmp_path / "saved.toml")
    again = load_config(tmp_path / "saved.toml")
    assert again == cfg
    assert again.to_dict()["method"]["r"] == 16


@pytest.mark.parametrize(
    "override, message",
    [
        ("federation.roundz=3", r"federation: unknown key\(s\) roundz; valid keys: rounds, "),
        ("federation.rounds=0", "federation.rounds: must be >= 1"),
        ("federation.rounds=2.5", "federation.rounds: expected int"),
        ("federation.dropout=1.0", r"federation.dropout: must be in \[0, 1\)"),
        ("federation.clients_per_round=1.5", "federation.clients_per_round: a fraction"),
        ("federation.optimizer=adam", "federation.optimizer: expected one of 'adamw', 'sgd'"),
        ("partition.scheme=random", "partition.scheme: expected one of"),
        ("method.name=nope", "method.name: unknown method 'nope'; known methods: .*lora"),
        ("method.bogus=1", r"method: unknown key\(s\) bogus; valid keys: name, r"),
        ("runtime.seed=abc", "runtime.seed: expected int, got 'abc'"),
        ("federation.rounds", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE), [override])


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section\(s\) modle; valid sections: model"):
        load_config(_write(tmp_path, BASE + "\n[modle]\nname='x'\n"))
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[model\n"))


def test_data_needs_a_source():
    with pytest.raises(ConfigError, match="set data.name"):
        Config.from_dict({"data": {}})


def test_apply_overrides_does_not_mutate_input():
    raw = {"federation": {"rounds": 1}}
    out = apply_overrides(raw, ["federation.rounds=2"])
    assert raw["federation"]["rounds"] == 1 and out["federation"]["rounds"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["partition.num_clients=4", "federation.clients_per_round=5"],
         r"federation.clients_per_round = 5 is above partition.num_clients = 4: give at most 4"),
        (["partition.num_clients=10", "federation.clients_per_round=0.25", "federation.min_clients=4"],
         r"federation.min_clients = 4 is above the 3 clients per round \(federation.clients_per_round = 0.25, "
         r"partition.num_clients = 10\): give at most 3"),
        (["partition.num_clients=4", "federation.clients_per_round=2", "federation.min_clients=3"],
         r"federation.min_clients = 3 is above the 2 clients per round"),
    ],
)
def test_impossible_client_counts_name_both_keys(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE), overrides)


def test_possible_client_counts_pass_and_fractions_round_up(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["partition.num_clients=10", "federation.clients_per_round=0.25",
                                               "federation.min_clients=3"])
    assert cfg.federation.clients_per_round_count(cfg.partition.num_clients) == 3
    cfg = load_config(_write(tmp_path, BASE), ["partition.num_clients=4", "federation.clients_per_round=4",
                                               "federation.min_clients=4"])
    assert cfg.federation.clients_per_round_count(4) == 4


def test_inactive_notice_names_the_other_methods_keys_once(tmp_path):
    assert load_config(_write(tmp_path, BASE)).method.inactive_notice() is None
    head = load_config(_write(tmp_path, BASE), ["method.name=head", "method.alpha=32"])
    assert head.method.inactive_notice() == "method.r, method.alpha belong to lora, not to head: ignored"
    adapter = load_config(_write(tmp_path, BASE), ["method.name=adapter"])
    assert adapter.method.inactive_notice() == "method.r belongs to lora, not to adapter: ignored"
    mixed = load_config(_write(tmp_path, BASE), ["method.name=head", "method.bottleneck=8"])
    assert mixed.method.inactive_notice() == "method.r, method.bottleneck belong to adapter and lora, not to head: ignored"


def test_data_fingerprint_is_an_optional_key_kept_through_toml(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["data.fingerprint=local:abc"])
    assert cfg.data.fingerprint == "local:abc"
    cfg.save(tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml").data.fingerprint == "local:abc"
    assert load_config(_write(tmp_path, BASE)).data.fingerprint is None
