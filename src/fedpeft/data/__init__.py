"""Labelled data for federated fine-tuning: load, encode (cached), and partition over clients.
Instruction data for causal LMs (``task.kind = "causal-lm"``): :func:`load_instructions`,
:func:`encode_instructions`.

>>> data = load_data(cfg.data, seed=0)                    # train/test with "text"|"image" + "label"
>>> train = encode(data.train, processor, data.modality, max_length=64)
>>> parts = partition(train.labels.numpy(), cfg.partition, seed=0)  # one index array per client
>>> batch = train.batch(parts[0][:16])                   # model inputs + "labels"
"""

from fedpeft.data.encode import EncodedSplit, default_cache_dir, encode
from fedpeft.data.instruction_encode import encode_instructions
from fedpeft.data.instructions import InstructionData, load_instructions
from fedpeft.data.partition import label_histograms, partition
from fedpeft.data.sources import (
    KNOWN_DATASETS,
    ClassificationData,
    KnownDataset,
    absolute_path,
    load_data,
    resolve_data_dir,
    resolved_config,
)

__all__ = [
    "KNOWN_DATASETS",
    "ClassificationData",
    "EncodedSplit",
    "InstructionData",
    "KnownDataset",
    "absolute_path",
    "default_cache_dir",
    "encode",
    "encode_instructions",
    "label_histograms",
    "load_data",
    "load_instructions",
    "partition",
    "resolve_data_dir",
    "resolved_config",
]
