"""Shared fixtures: tiny models by family name and synthetic batches for them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedpeft.config import ModelConfig
from fedpeft.errors import FedPeftError
from fedpeft.experiment import run_experiment
from fedpeft.federation.client import ClientTrainer
from fedpeft.models import LoadedModel, load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model or data hub
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One pytest-xdist worker per core: a second torch thread per worker only oversubscribes.
    torch.set_num_threads(1)


# Files that each take minutes (real Flower deployments, Ray simulations, MiniLM): collected
# first, so the two pytest-xdist workers (``--dist loadfile``: a file stays on one worker) start
# them early and end together, not one worker finishing a deployment alone at the end.
SLOW_FILES = ("test_flower_secure.py", "test_integration.py", "test_flower.py", "test_flower_killed_node.py",
              "test_flower_privacy.py", "test_robust_rounds.py", "test_lora_aggregation.py", "test_runs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Encoded-data cache in a temporary folder, not the user's ~/.cache/fedpeft."""
    old = os.environ.get("FEDPEFT_CACHE")
    os.environ["FEDPEFT_CACHE"] = str(tmp_path_factory.mktemp("fedpeft-cache"))
    yield
    if old is None:
        os.environ.pop("FEDPEFT_CACHE", None)
    else:
        os.environ["FEDPEFT_CACHE"] = old


@pytest.fixture
def flower_identity(monkeypatch):
    """Flower builds instruction messages only inside a task; give this process one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra threads only add overhead. One torch thread for the module that asks
    (``pytestmark = pytest.mark.usefixtures("one_thread")``), restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_FAMILIES = ["tiny-bert", "tiny-vit", "tiny-gpt2", "tiny-llama"]
LABELS = ["a", "b", "c"]
TEXTS = [
    "a short one",
    "the quick brown fox jumps over the lazy dog",
    "federated learning with few parameters",
    "ok",
]


def interrupt_at(monkeypatch: pytest.MonkeyPatch, rnd: int) -> Callable:
    """Make every client's fit in round ``rnd`` raise KeyboardInterrupt (Ctrl-C); returns the
    real ``ClientTrainer.fit`` to put back."""
    real_fit = ClientTrainer.fit

    def fit(self, client, indices, state, r, **kwargs):
        if r == rnd:
            raise KeyboardInterrupt
        return real_fit(self, client, indices, state, r, **kwargs)

    monkeypatch.setattr(ClientTrainer, "fit", fit)
    return real_fit


def interrupt_and_resume(monkeypatch: pytest.MonkeyPatch, cfg, out: Path, rnd: int) -> dict:
    """Run ``cfg`` into ``out`` killed (Ctrl-C) in round ``rnd``, check it says so, then resume
    it to the end; returns the resumed run's summary."""
    real_fit = interrupt_at(monkeypatch, rnd)
    with pytest.raises(FedPeftError, match=f"interrupted after round {rnd - 1}"):
        run_experiment(cfg, out=out)
    monkeypatch.setattr(ClientTrainer, "fit", real_fit)
    return run_experiment(cfg, out=out, resume=True)


def make_batch(loaded: LoadedModel, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small labelled batch for ``loaded``: tokenized texts (padded as fedpeft pads them) or
    random pixels, plus random labels in ``range(num_labels)``."""
    gen = torch.Generator().manual_seed(seed)
    config = loaded.model.config
    if loaded.info.modality == "image":
        size = config.image_size
        batch = {"pixel_values": torch.randn(n, config.num_channels, size, size, generator=gen)}
    else:
        texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
        batch = dict(loaded.processor(texts, padding=True, return_tensors="pt"))
        if not getattr(config, "type_vocab_size", 0):  # only BERT-like models take segment ids
            batch.pop("token_type_ids", None)
    batch["labels"] = torch.randint(0, config.num_labels, (n,), generator=gen)
    return batch


@pytest.fixture
def tiny() -> Callable[..., LoadedModel]:
    """Factory: ``tiny("tiny-bert")`` loads a fresh, seeded tiny model with 3 labels."""

    def load(name: str, labels: list[str] = LABELS, seed: int = 0) -> LoadedModel:
        return load_model(ModelConfig(name=name), label_names=labels, seed=seed)

    return load


@pytest.fixture
def batch_for() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``batch_for(loaded, n=4)`` -> a synthetic batch for that model."""
    return make_batch


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data: $FEDPEFT_DATA_DIR, else ../shared/data next to the repository."""
    folder = Path(os.environ.get("FEDPEFT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (folder / "banking77" / "train.csv").is_file():
        pytest.skip(f"real data not found at {folder} (set FEDPEFT_DATA_DIR to the shared data folder)")
    return folder
