"""Encode a split into model-ready tensors once, and cache the result on disk.

Text is tokenized in large batches and padded to ``max_length`` on the tokenizer's
``padding_side`` ("left" for decoder-only models); :meth:`EncodedSplit.batch` later trims each
batch to its longest row, so short texts cost less compute. Images go through the model's image
processor (which resizes and normalizes them).

The result is cached as ``<cache_dir>/encoded/<key>.safetensors``; the key hashes the dataset
fingerprint, the processor's identity and ``max_length``, so a changed dataset, tokenizer or
length gives a new file. ``cache_dir`` defaults to ``$FEDPEFT_CACHE``, else ``~/.cache/fedpeft``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedpeft.errors import DataError

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when the stored layout changes, to ignore old cache files
TEXT_CHUNK = 8192  # rows per tokenizer call
IMAGE_CHUNK = 256  # images per image-processor call


@dataclass
class EncodedSplit:
    """Encoded inputs and labels of one split, indexable by row."""

    # text: "input_ids" (N, L) int64 and "attention_mask" (N, L) int64, L = max_length;
    # image: "pixel_values" (N, C, H, W) float32
    features: dict[str, torch.Tensor]
    labels: torch.Tensor  # (N,) int64; causal-lm: (N, L), -100 where no loss (fedpeft.data.instruction_encode)
    padding_side: str = "right"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Any) -> dict[str, torch.Tensor]:
        """Model inputs plus ``"labels"`` for rows ``index`` (LongTensor, numpy array or list).

        Text is trimmed to the longest row of the batch: columns that are padding in every row
        are dropped from the padding side (dynamic padding); per-token labels (causal-lm) with them.
        """
        if isinstance(index, torch.Tensor):
            rows = index.to(torch.long)
        else:
            rows = torch.as_tensor(np.asarray(index, dtype=np.int64))
        out = {name: tensor[rows] for name, tensor in self.features.items()}
        labels = self.labels[rows]
        mask = out.get("attention_mask")
        if mask is not None and mask.shape[0] > 0:
            used = mask.any(dim=0).nonzero().flatten()  # (L_used,) columns with a real token
            if len(used) > 0:
                if self.padding_side == "left":
                    keep = slice(int(used[0]), None)
                else:
                    keep = slice(0, int(used[-1]) + 1)
                out = {name: t[:, keep] if t.dim() == 2 else t for name, t in out.items()}
                if labels.dim() == 2:  # a label per token (causal-lm): trimmed with its tokens
                    labels = labels[:, keep]
            if self.padding_side == "left":
                # decoders with absolute positions (GPT-2) must not count the left padding
                out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, L)
        out["labels"] = labels
        return out


def default_cache_dir() -> Path:
    """``$FEDPEFT_CACHE``, else ``~/.cache/fedpeft``."""
    return Path(os.environ.get("FEDPEFT_CACHE") or "~/.cache/fedpeft").expanduser()


def encode(
    split: datasets.Dataset,
    processor: Any,
    modality: str,
    max_length: int,
    cache_dir: str | Path | None = None,
) -> EncodedSplit:
    """Tokenize (text) or preprocess (image) ``split``, or load the result from the cache.

    Parameters
    ----------
    split : datasets.Dataset
        Columns ``"text"`` or ``"image"`` and ``"label"`` (as made by :func:`fedpeft.data.load_data`).
    processor
        A transformers tokenizer (text; its ``padding_side`` is respected) or an image processor.
    modality : {"text", "image"}
    max_length : int
        Tokens per text (longer texts are truncated, shorter ones padded); unused for images.
    cache_dir : str or Path, optional
        Cache root; the file goes to ``<cache_dir>/encoded/<key>.safetensors``.
    """
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    for column in (modality, "label"):
        if column not in split.column_names:
            raise DataError(
                f"cannot encode {modality} data: no column {column!r}; "
                f"available columns: {', '.join(split.column_names)}"
            )
    key = cache_key(split, processor, modality, max_length)
    path = Path(cache_dir or default_cache_dir()).expanduser() / "encoded" / f"{key}.safetensors"
    if path.is_file():
        try:
            encoded = _load(path)
            log.info("encoded %d rows loaded from cache %s", len(encoded), path)
            return encoded
        except Exception as exc:  # noqa: BLE001 - a corrupt cache file is rebuilt, never fatal
            log.warning("ignoring unreadable cache file %s (%s); re-encoding", path, exc)
    labels = torch.from_numpy(
        np.asarray(split.select_columns(["label"]).with_format("numpy")[:]["label"], dtype=np.int64)
    )  # (N,)
    inputs = split.select_columns([modality])
    if modality == "text":
        encoded = EncodedSplit(_tokenize(inputs, processor, max_length), labels, processor.padding_side)
    else:
        encoded = EncodedSplit(_preprocess_images(inputs, processor), labels)
    try:
        _save(encoded, path)
    except OSError as exc:
        log.warning("could not write the encoding cache %s: %s", path, exc)
    return encoded


def cache_key(split: datasets.Dataset, processor: Any, modality: str, max_length: int) -> str:
    """A hex digest of the dataset fingerprint, the processor's identity and ``max_length``."""
    identity: dict[str, Any] = {
        "class": f"{type(processor).__module__}.{type(processor).__qualname__}",
        "name_or_path": str(getattr(processor, "name_or_path", "")),
    }
    if modality == "text":
        identity.update(
            vocab_size=len(processor),
            padding_side=processor.padding_side,
            truncation_side=getattr(processor, "truncation_side", None),
            pad_token_id=processor.pad_token_id,
        )
    else:  # image size, resampling, normalization constants, ...
        to_json = getattr(processor, "to_json_string", None)
        identity["config"] = to_json() if to_json is not None else repr(processor)
    key = dict(format=CACHE_FORMAT, fingerprint=split._fingerprint, rows=len(split),
               modality=modality, max_length=max_length, processor=identity)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _tokenize(texts: datasets.Dataset, tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, each (N, max_length) int64, in chunks of TEXT_CHUNK rows."""
    if tokenizer.pad_token is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad token; set "
            "tokenizer.pad_token (fedpeft.models.load_model does this for decoder-only models)"
        )
    ids, masks = [np.zeros((0, max_length), np.int64)], [np.zeros((0, max_length), np.int64)]
    for start in range(0, len(texts), TEXT_CHUNK):
        batch = texts[start : start + TEXT_CHUNK]["text"]
        out = tokenizer(
            batch, padding="max_length", truncation=True, max_length=max_length,
            return_attention_mask=True, return_token_type_ids=False, return_tensors="np",
        )
        ids.append(out["input_ids"].astype(np.int64))  # (B, L)
        masks.append(out["attention_mask"].astype(np.int64))  # (B, L)
    return {
        "input_ids": torch.from_numpy(np.concatenate(ids)),
        "attention_mask": torch.from_numpy(np.concatenate(masks)),
    }


def _preprocess_images(images: datasets.Dataset, processor: Any) -> dict[str, torch.Tensor]:
    """``pixel_values`` (N, C, H, W) float32, in chunks of IMAGE_CHUNK images."""
    chunks = []
    for start in range(0, len(images), IMAGE_CHUNK):
        batch = [image.convert("RGB") for image in images[start : start + IMAGE_CHUNK]["image"]]
        chunks.append(processor(images=batch, return_tensors="pt")["pixel_values"].to(torch.float32))
    if not chunks:
        raise DataError("cannot encode an empty image split")
    return {"pixel_values": torch.cat(chunks)}


def _save(encoded: EncodedSplit, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"features.{name}": t.contiguous() for name, t in encoded.features.items()}
    tensors["labels"] = encoded.labels.contiguous()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache file is ordinary data
    try:
        save_file(tensors, tmp, metadata={"format": CACHE_FORMAT, "padding_side": encoded.padding_side})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> EncodedSplit:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {metadata.get('format')!r}, expected {CACHE_FORMAT!r}")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    features = {n.removeprefix("features."): t for n, t in tensors.items() if n.startswith("features.")}
    return EncodedSplit(features, tensors["labels"], metadata.get("padding_side", "right"))
