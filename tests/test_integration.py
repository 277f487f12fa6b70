"""Integration: the real all-MiniLM-L6-v2 on real banking77 rows (skipped without the data)."""

from pathlib import Path

import pytest
import torch

from fedpeft.config import Config
from fedpeft.experiment import build_experiment, run_experiment
from fedpeft.federation.client import evaluate

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_lora_minilm_banking77_learns_and_exports(shared_data_dir, tmp_path):
    cfg = Config.from_dict({
        "model": {"name": "minilm", "max_length": 32},
        "data": {"name": "banking77", "data_dir": str(shared_data_dir), "max_train_samples": 512, "max_test_samples": 256},
        "partition": {"scheme": "iid", "num_clients": 4},
        "method": {"name": "lora", "r": 8},
        "federation": {"rounds": 2, "clients_per_round": 4, "local_epochs": 3, "batch_size": 16, "lr": 1e-2},
        "runtime": {"seed": 0, "progress": False},
    })
    summary = run_experiment(cfg, out=tmp_path / "run")
    chance = 1 / 77
    assert summary["final_accuracy"] > 8 * chance, summary["final_accuracy"]
    assert summary["upload_reduction_vs_full"] > 50  # LoRA r=8 + head vs 22.7M parameters

    # the exported model/ folder loads with plain transformers + peft and scores the same
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedpeft.models import minilm_dir

    exp = build_experiment(cfg)  # for the encoded test split only
    torch.manual_seed(123)  # a different head init: the adapter folder must carry the head
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=77)
    plain = PeftModel.from_pretrained(base, tmp_path / "run" / "model")
    metrics = evaluate(plain, exp.test, 64, 77)
    assert metrics["accuracy"] == pytest.approx(summary["final_accuracy"], abs=1e-9)


@pytest.mark.parametrize("example", ["quickstart", "sst2_instability", "fedpeft_comparison", "oneshot_vs_multiround"])
def test_example_partitions_are_feasible_on_the_real_data(example, shared_data_dir):
    """Each preset's partition (scheme, clients, min_samples) works on its real rows, also at
    alpha 0.1 where a preset sweeps it."""
    import numpy as np

    from fedpeft.config import load_config
    from fedpeft.data import load_data, partition

    sets = [f"data.data_dir={str(shared_data_dir)!r}"]
    alphas = [0.1, 0.5] if example == "fedpeft_comparison" else [None]
    for alpha in alphas:
        cfg = load_config(ROOT / "examples" / f"{example}.toml", sets + ([f"partition.alpha={alpha}"] if alpha else []))
        data = load_data(cfg.data, cfg.runtime.seed)
        parts = partition(np.asarray(data.train["label"]), cfg.partition, cfg.runtime.seed)
        assert len(parts) == cfg.partition.num_clients
        assert min(len(p) for p in parts) >= cfg.partition.min_samples
