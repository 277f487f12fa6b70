"""Bad input fails at once in one clear line: model names, an unreachable hub, moved run data."""

import dataclasses
import logging
import socket
import subprocess
import sys

import datasets
import huggingface_hub
import pytest
import transformers

from fedpeft import hub, models
from fedpeft.config import Config, DataConfig, ModelConfig, load_config
from fedpeft.data import load_data
from fedpeft.errors import ConfigError, DataError, FedPeftError
from fedpeft.experiment import _resumable_config, evaluate_run, run_experiment
from fedpeft.models import check_model_name, is_image_model, load_model
from fedpeft.results import RunDir


def _no_hub_call(*args, **kwargs):
    raise AssertionError(f"no hub call may be made: {args}")


@pytest.fixture
def csv_data(tmp_path):
    """data/train.csv and data/test.csv under tmp_path: 2 readable classes."""
    folder = tmp_path / "data"
    folder.mkdir()
    for split, n in (("train", 16), ("test", 6)):
        rows = [f"{'rain cloud' if i % 2 else 'goal match'} {i},{'weather' if i % 2 else 'sports'}" for i in range(n)]
        (folder / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    return folder


def _cfg(train: str, test: str, rounds: int = 1) -> Config:
    return Config.from_dict({
        "model": {"name": "tiny-bert", "max_length": 8},
        "data": {"train": train, "test": test},
        "partition": {"num_clients": 2},
        "method": {"name": "head"},
        "federation": {"rounds": rounds, "clients_per_round": 2, "local_steps": 1, "batch_size": 4},
        "runtime": {"progress": False},
        "output": {"save_model": False},
    })


# --------------------------------------------------------------------------- model names


@pytest.mark.parametrize("name", ["./my-model", "/no/such/model", "~/no-model", "a/b/c", "owner/model/"])
def test_path_like_model_name_without_a_folder(name, monkeypatch):
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_hub_call)
    with pytest.raises(ConfigError, match=r"^model.name: no folder at /\S+; give an existing model folder"):
        is_image_model(name)


def test_existing_folder_is_accepted_as_a_path(tmp_path):
    check_model_name(str(tmp_path) + "/")  # nothing raised, nothing loaded


@pytest.mark.parametrize("name, alias", [("minilmm", "minilm"), ("tiny-bertt", "tiny-bert"), ("tiny_vit", "tiny-vit")])
def test_near_miss_of_an_alias_says_which_was_meant_without_the_hub(name, alias, monkeypatch):
    monkeypatch.setattr(models, "hub_problem", _no_hub_call)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_hub_call)
    with pytest.raises(ConfigError, match=rf"^model.name: unknown model '{name}'; did you mean '{alias}'\?$"):
        load_model(ModelConfig(name=name), ["a", "b"])


# --------------------------------------------------------------------------- unreachable hub


@pytest.fixture
def unreachable_hub(monkeypatch):
    """The hub is not offline, and the probe's connect fails; yields the list of probed addresses."""
    probes: list = []

    def refuse(address, timeout=None):
        probes.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_hub_call)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", _no_hub_call)
    monkeypatch.setattr(datasets, "load_dataset", _no_hub_call)
    hub._connects.cache_clear()
    yield probes
    hub._connects.cache_clear()


def test_unreachable_hub_fails_model_and_data_at_once_after_one_probe(unreachable_hub, tmp_path):
    reason = r"the Hugging Face hub is unreachable \(no connection to huggingface.co:443 within 3 s; HF_HUB_OFFLINE=1"
    with pytest.raises(ConfigError, match=rf"^model.name: cannot load 'someone/model': {reason}.*; give a local model"):
        load_model(ModelConfig(name="someone/model"), ["a", "b"])
    with pytest.raises(DataError, match=rf"^data.name: cannot load hub:PolyAI/banking77: {reason}.*; no local copy "
                                        rf"at {tmp_path}/banking77: set data.data_dir to the folder holding banking77/$"):
        load_data(DataConfig(name="banking77", data_dir=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match=rf"^data.name: cannot load hub:someone/data: {reason}"):
        load_data(DataConfig(name="someone/data"), seed=0)
    assert unreachable_hub == [(("huggingface.co", 443), hub.PROBE_TIMEOUT_S)]  # one probe per process


def test_offline_hub_is_not_probed_and_the_error_says_offline(monkeypatch, tmp_path):
    def cache_miss(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'PolyAI/banking77' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", _no_hub_call)
    monkeypatch.setattr(datasets, "load_dataset", cache_miss)
    with pytest.raises(DataError, match=r"OfflineModeIsEnabled\) \(the hub is offline: HF_HUB_OFFLINE=1, only the "
                                        r"local hub cache is read\); no local copy at "):
        load_data(DataConfig(name="banking77", data_dir=str(tmp_path)), seed=0)


def test_a_proxy_is_probed_instead_of_the_hub(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "")
    assert hub._probe_address("https://huggingface.co") == ("proxy.example", 3128)
    monkeypatch.delenv("https_proxy")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    assert hub._probe_address("https://hub.internal:8443") == ("hub.internal", 8443)


def test_hub_library_records_are_not_printed_again_through_the_root_logger(caplog):
    hub.single_library_logs()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("datasets.load").warning("something")
    assert caplog.records == []  # the root logger's handlers (the CLI's, here caplog's) saw nothing
    assert logging.getLogger("huggingface_hub").handlers  # the library's own handler still prints it


# --------------------------------------------------------------------------- portable run folders


def test_run_folder_works_from_elsewhere_and_follows_moved_data(csv_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run_experiment(_cfg("data/train.csv", "data/test.csv"), out=run)  # relative paths
    saved = load_config(run / "config.toml")
    assert saved.data.train == str(csv_data / "train.csv") and saved.data.fingerprint.startswith("local:")
    monkeypatch.chdir(tmp_path / "data")  # another working directory
    assert evaluate_run(run)["round"] == 1
    csv_data.rename(tmp_path / "moved")
    with pytest.raises(DataError, match=rf"^data.train: file not found: {csv_data}/train.csv "
                                        r"\(if it moved: --set data.train=NEW_PATH\)$"):
        evaluate_run(run)
    moved = _cfg(str(tmp_path / "moved/train.csv"), "../moved/test.csv", rounds=2)  # relative to the new cwd
    assert run_experiment(moved, out=run, resume=True)["rounds_completed"] == 2
    again = load_config(run / "config.toml")
    assert (again.data.train, again.data.test) == (str(tmp_path / "moved/train.csv"), str(tmp_path / "moved/test.csv"))
    assert again.data.fingerprint == saved.data.fingerprint


def _saved(csv_data, **data) -> Config:
    cfg = _cfg(str(csv_data / "train.csv"), str(csv_data / "test.csv"))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))


def test_resume_compares_data_paths_as_absolute_paths(csv_data, tmp_path, monkeypatch):
    monkeypatch.chdir(csv_data)
    saved = _saved(csv_data, fingerprint="local:abc")
    same = _resumable_config(_cfg("train.csv", "./test.csv"), saved, RunDir(tmp_path))  # no fingerprint given
    assert same.data == saved.data
    with pytest.raises(FedPeftError, match=r"differs from the saved one in data.fingerprint$"):
        _resumable_config(_saved(csv_data, fingerprint="local:other"), saved, RunDir(tmp_path))


def test_resume_moves_data_only_with_a_fingerprint(csv_data, tmp_path):
    moved = _cfg("/new/train.csv", "/new/test.csv")
    cfg = _resumable_config(moved, _saved(csv_data, fingerprint="local:abc"), RunDir(tmp_path))
    assert (cfg.data.train, cfg.data.test, cfg.data.fingerprint) == ("/new/train.csv", "/new/test.csv", "local:abc")
    with pytest.raises(FedPeftError, match=r"data.train, data.test differ from the saved config, which has no "
                                           r"data.fingerprint"):
        _resumable_config(moved, _saved(csv_data), RunDir(tmp_path))


# --------------------------------------------------------------------------- command line


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedpeft.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize(
    "data, sets, message",
    [
        ({}, ["model.name=minilmm"], "error: model.name: unknown model 'minilmm'; did you mean 'minilm'?"),
        ({"train": "data/blank.csv"}, [], "data/blank.csv: label column 'label' is empty in 1 row (line 3)"),
        ({"name": "banking77", "data_dir": "/nowhere"}, [],
         "(the hub is offline: HF_HUB_OFFLINE=1, only the local hub cache is read); no local copy at /nowhere/banking77"),
        ({}, ["federation.clients_per_round=3"], "federation.clients_per_round = 3 is above partition.num_clients = 2"),
    ],
)
def test_cli_prints_one_line_and_exits_2(csv_data, tmp_path, data, sets, message):
    (csv_data / "blank.csv").write_text("text,label\nrain,weather\ngoal,\n")
    raw = _cfg("data/train.csv", "data/test.csv").to_dict()
    raw["data"] = data if "name" in data else {**raw["data"], **data}
    Config.from_dict(raw).save(tmp_path / "c.toml")
    args = ["run", "c.toml", "--out", "o", *(arg for s in sets for arg in ("--set", s))]
    res = _cli(*args, cwd=tmp_path)  # HF_HUB_OFFLINE=1 (conftest) reaches the child too
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and message in res.stderr
