"""Tests of fedpeft.data: loading local files / known names / hub ids, labels, and encoding."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fedpeft.config import DataConfig
from fedpeft.data import KNOWN_DATASETS, EncodedSplit, encode, load_data, resolve_data_dir, resolved_config
from fedpeft.errors import DataError

TRAIN = [("good film", "pos"), ("bad film", "neg"), ("fine film", "neutral"), ("great", "pos"),
         ("awful", "neg"), ("so-so", "neutral"), ("loved it", "pos"), ("hated it", "neg")]
TEST = [("very good", "pos"), ("very bad", "neg"), ("meh", "neutral")]


def _frame(rows, text="text", label="label") -> pd.DataFrame:
    return pd.DataFrame({text: [r[0] for r in rows], label: [r[1] for r in rows]})


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_parquet(path, index=False)
    return path


def _pairs(data, split: str) -> set[tuple[str, str]]:
    ds = getattr(data, split)
    return {(t, data.label_names[i]) for t, i in zip(ds["text"], ds["label"])}


@pytest.fixture
def csv_files(tmp_path) -> tuple[Path, Path]:
    return _write(_frame(TRAIN), tmp_path / "train.csv"), _write(_frame(TEST), tmp_path / "test.csv")


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_local_file_round_trip(tmp_path, suffix):
    train = _write(_frame(TRAIN), tmp_path / f"train{suffix}")
    test = _write(_frame(TEST), tmp_path / f"test{suffix}")
    data = load_data(DataConfig(train=str(train), test=str(test)), seed=0)
    assert data.modality == "text" and data.num_labels == 3
    assert data.label_names == ["neg", "neutral", "pos"]  # sorted unique train labels
    assert data.train.column_names == ["text", "label"] and data.test.column_names == ["text", "label"]
    assert data.train.features["label"].dtype == "int64"
    assert _pairs(data, "train") == set(TRAIN) and _pairs(data, "test") == set(TEST)
    assert str(train.resolve()) in data.source and data.source.endswith("(local)")


def test_int_labels_without_labels_file_sort_numerically(tmp_path):
    rows = [(f"t{i}", i % 12) for i in range(24)]
    train = _write(_frame(rows), tmp_path / "train.csv")
    data = load_data(DataConfig(train=str(train), test=str(train)), seed=0)
    assert data.label_names == [str(i) for i in range(12)]  # "10" after "9", not after "1"
    assert {(t, int(data.label_names[i])) for t, i in zip(data.train["text"], data.train["label"])} == set(rows)


def test_column_override(tmp_path):
    frame = _frame(TRAIN, text="sentence", label="category").assign(extra=1)
    train = _write(frame, tmp_path / "train.csv")
    test = _write(_frame(TEST, text="sentence", label="category"), tmp_path / "test.csv")
    cfg = DataConfig(train=str(train), test=str(test), text_column="sentence", label_column="category")
    data = load_data(cfg, seed=0)
    assert data.train.column_names == ["text", "label"]
    assert _pairs(data, "train") == set(TRAIN)


def test_missing_file(tmp_path, csv_files):
    cfg = DataConfig(train=str(tmp_path / "nope.csv"), test=str(csv_files[1]))
    with pytest.raises(DataError, match=r"data.train: file not found: .*nope\.csv"):
        load_data(cfg, seed=0)


def test_missing_test_split_is_not_split_silently(csv_files):
    with pytest.raises(DataError, match=r"data.test is missing"):
        load_data(DataConfig(train=str(csv_files[0])), seed=0)


def test_missing_column_names_file_and_available_columns(tmp_path, csv_files):
    cfg = DataConfig(train=str(csv_files[0]), test=str(csv_files[1]), text_column="sentence")
    with pytest.raises(DataError, match=r"train\.csv: no column 'sentence' \(set data.text_column\); "
                                        r"available columns: text, label"):
        load_data(cfg, seed=0)
    cfg = DataConfig(train=str(csv_files[0]), test=str(csv_files[1]), label_column="y")
    with pytest.raises(DataError, match=r"no column 'y' \(set data.label_column\); available columns: text, label"):
        load_data(cfg, seed=0)


def test_unsupported_extension(tmp_path, csv_files):
    (tmp_path / "train.txt").write_text("text,label\na,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_data(DataConfig(train=str(tmp_path / "train.txt"), test=str(csv_files[1])), seed=0)


def test_label_mismatch_between_train_and_test(tmp_path, csv_files):
    test = _write(_frame(TEST + [("odd", "zzz")]), tmp_path / "test2.csv")
    with pytest.raises(DataError, match=r"label set mismatch between train and test: "
                                        r"test has labels not in train: \['zzz'\]"):
        load_data(DataConfig(train=str(csv_files[0]), test=str(test)), seed=0)


def test_empty_text_cell_is_an_error(tmp_path, csv_files):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": null, "label": "neg"}\n{"text": "b", "label": "neutral"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl: text column 'text' is empty in 1 row"):
        load_data(DataConfig(train=str(path), test=str(csv_files[1])), seed=0)


def test_test_file_without_train_file_is_an_error(csv_files):
    with pytest.raises(DataError, match=r"data.test is set without data.train"):
        load_data(DataConfig(name="banking77", test=str(csv_files[1])), seed=0)


def test_same_config_and_seed_give_the_same_fingerprint(csv_files):
    """encode() keys its cache on the dataset fingerprint: it must not change between runs."""
    cfg = DataConfig(train=str(csv_files[0]), test=str(csv_files[1]), max_train_samples=5)
    first, again, other = (load_data(cfg, seed=s) for s in (0, 0, 1))
    assert first.train._fingerprint == again.train._fingerprint
    assert first.test._fingerprint == again.test._fingerprint
    assert first.train._fingerprint != other.train._fingerprint


def test_unknown_dataset_name_lists_known_names():
    with pytest.raises(DataError, match=r"unknown dataset 'imdb'; known datasets: .*banking77.*sst2"):
        load_data(DataConfig(name="imdb"), seed=0)


# --------------------------------------------------------------------------- labels.txt


def test_labels_file_with_int_labels(tmp_path):
    rows = [("bad", 0), ("good", 1), ("awful", 0), ("nice", 1)]
    train = _write(_frame(rows), tmp_path / "train.csv")
    (tmp_path / "labels.txt").write_text("negative\npositive\n")
    data = load_data(DataConfig(train=str(train), test=str(train)), seed=0)
    assert data.label_names == ["negative", "positive"]
    assert {(t, i) for t, i in zip(data.train["text"], data.train["label"])} == set(rows)


def test_labels_file_with_string_labels_keeps_file_order_and_unused_names(tmp_path):
    (tmp_path / "labels.txt").write_text("pos\nunused\nneg\nneutral\n")
    train = _write(_frame(TRAIN), tmp_path / "train.csv")
    test = _write(_frame(TEST), tmp_path / "test.csv")
    data = load_data(DataConfig(train=str(train), test=str(test)), seed=0)
    assert data.label_names == ["pos", "unused", "neg", "neutral"]
    assert _pairs(data, "train") == set(TRAIN)
    assert dict(zip(data.test["text"], data.test["label"]))["very bad"] == 2


def test_labels_file_errors(tmp_path):
    (tmp_path / "labels.txt").write_text("pos\nneg\n")
    train = _write(_frame(TRAIN), tmp_path / "train.csv")
    with pytest.raises(DataError, match=r"train\.csv: labels not in .*labels\.txt: \['neutral'\]"):
        load_data(DataConfig(train=str(train), test=str(train)), seed=0)
    ints = _write(_frame([("a", 0), ("b", 5)]), tmp_path / "ints.csv")
    with pytest.raises(DataError, match=r"0-based indices into .*labels\.txt \(2 names\).*out of range: \[5\]"):
        load_data(DataConfig(train=str(ints), test=str(ints)), seed=0)


# --------------------------------------------------------------------------- subsampling


def test_subsampling_is_seeded(tmp_path):
    rows = [(f"text {i}", f"c{i % 5}") for i in range(100)]
    path = _write(_frame(rows), tmp_path / "train.csv")
    cfg = DataConfig(train=str(path), test=str(path), max_train_samples=10, max_test_samples=7)
    first, again, other = (load_data(cfg, seed=s) for s in (1, 1, 2))
    assert len(first.train) == 10 and len(first.test) == 7
    assert first.train["text"][:] == again.train["text"][:] and first.test["text"][:] == again.test["text"][:]
    assert first.train["text"][:] != other.train["text"][:]
    assert set(first.train["text"][:]) <= {r[0] for r in rows}


def test_train_is_always_shuffled_and_test_kept_in_order(tmp_path):
    rows = [(f"text {i}", f"c{i // 20}") for i in range(100)]  # sorted by label, like banking77
    path = _write(_frame(rows), tmp_path / "train.csv")
    data = load_data(DataConfig(train=str(path), test=str(path)), seed=0)
    texts = [r[0] for r in rows]
    assert sorted(data.train["text"][:]) == sorted(texts) and data.train["text"][:] != texts
    assert data.test["text"][:] == texts


# --------------------------------------------------------------------------- known names and hub


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDPEFT_DATA_DIR", raising=False)
    assert resolve_data_dir(DataConfig(name="x")) == Path("data")
    monkeypatch.setenv("FEDPEFT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(DataConfig(name="x")) == tmp_path
    assert resolve_data_dir(DataConfig(name="x", data_dir="/elsewhere")) == Path("/elsewhere")


def _no_hub(*args, **kwargs):
    raise AssertionError(f"the hub must not be used: load_dataset{args}")


def test_known_name_prefers_local_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    folder = tmp_path / "banking77"
    folder.mkdir()
    _write(_frame(TRAIN), folder / "train.csv")
    _write(_frame(TEST), folder / "test.csv")
    data = load_data(DataConfig(name="banking77", data_dir=str(tmp_path)), seed=0)
    assert data.source == f"{folder.resolve()} (local)"
    assert _pairs(data, "test") == set(TEST)


def test_known_name_local_folder_without_test_split(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    (tmp_path / "sst2").mkdir()
    _write(_frame(TRAIN), tmp_path / "sst2" / "train.csv")
    with pytest.raises(DataError, match=r"sst2: no test split found; expected one of: test\.csv"):
        load_data(DataConfig(name="sst2", data_dir=str(tmp_path)), seed=0)


def _fake_hub(calls: list, splits: dict[str, dict], names: list[str], label: str = "label"):
    features = None

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        out = {}
        for split, columns in splits.items():
            feats = datasets.Features({c: datasets.Value("string") for c in columns if c != label})
            feats[label] = datasets.ClassLabel(names=names)
            out[split] = datasets.Dataset.from_dict(columns, features=feats)
        return datasets.DatasetDict(out)

    return load_dataset if features is None else None


def test_known_name_falls_back_to_hub(tmp_path, monkeypatch):
    calls: list = []
    splits = {"train": {"sentence": ["a", "b", "c"], "label": [0, 1, 1]},
              "validation": {"sentence": ["d", "e"], "label": [1, 0]},
              "test": {"sentence": ["f", "g"], "label": [-1, -1]}}  # sst2's test split is unlabelled
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub(calls, splits, ["negative", "positive"]))
    data = load_data(DataConfig(name="sst2", data_dir=str(tmp_path)), seed=0)  # no tmp_path/sst2
    assert calls == [(KNOWN_DATASETS["sst2"].hub_id, None)]
    assert data.source == "hub:stanfordnlp/sst2"
    assert data.label_names == ["negative", "positive"]
    assert data.test.column_names == ["text", "label"]
    assert dict(zip(data.test["text"], data.test["label"])) == {"d": 1, "e": 0}  # validation as test


def test_hub_id_name_uses_defaults_and_validation(monkeypatch):
    calls: list = []
    splits = {"train": {"text": ["a", "b"], "label": [0, 1]}, "validation": {"text": ["c"], "label": [1]}}
    monkeypatch.setattr(datasets, "load_dataset", _fake_hub(calls, splits, ["x", "y"]))
    data = load_data(DataConfig(name="someone/tiny"), seed=0)
    assert calls == [("someone/tiny", None)] and data.source == "hub:someone/tiny"
    assert data.test["text"][:] == ["c"] and data.label_names == ["x", "y"]


def test_hub_errors_become_data_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/tiny' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load hub:someone/tiny from the Hugging Face hub: Couldn't reach"):
        load_data(DataConfig(name="someone/tiny"), seed=0)
    with pytest.raises(DataError, match=r"hub:PolyAI/banking77 .*no local copy at /nowhere/banking77: "
                                        r"set data.data_dir to the folder holding banking77/$"):
        load_data(DataConfig(name="banking77", data_dir="/nowhere"), seed=0)


def test_real_banking77(shared_data_dir):
    data = load_data(DataConfig(name="banking77", data_dir=str(shared_data_dir), max_train_samples=200), seed=0)
    assert data.num_labels == 77 and data.label_names[0] == "card_arrival"
    labels = np.asarray(data.train["label"][:])
    assert len(labels) == 200 and labels.min() >= 0 and labels.max() < 77
    assert len(set(labels.tolist())) > 40  # shuffled: the sorted file's first 200 rows hold 3 classes
    assert len(data.test) == 3080 and max(data.test["label"][:]) < 77


def test_real_sst2_and_ag_news(shared_data_dir):
    sst2 = load_data(DataConfig(name="sst2", data_dir=str(shared_data_dir), max_train_samples=50), seed=0)
    assert sst2.label_names == ["negative", "positive"] and set(sst2.train["label"][:]) <= {0, 1}
    ag = load_data(DataConfig(name="ag_news", data_dir=str(shared_data_dir), max_train_samples=50,
                              max_test_samples=50), seed=0)
    assert ag.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    descriptions = set(pd.read_csv(shared_data_dir / "ag_news" / "test.csv").description)
    assert set(ag.test["text"][:]) <= descriptions  # test text = description column, like train


# --------------------------------------------------------------------------- image folders


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    train = _image_folder(tmp_path / "train", {"cat": 3, "dog": 2, "owl": 2})
    test = _image_folder(tmp_path / "test", {"dog": 2})  # its own ClassLabel would say dog = 0
    data = load_data(DataConfig(train=str(train), test=str(test)), seed=0)
    assert data.modality == "image" and data.label_names == ["cat", "dog", "owl"]
    assert data.train.column_names == ["image", "label"] and len(data.train) == 7
    assert isinstance(data.train[0]["image"], Image.Image)
    assert data.test["label"][:] == [1, 1]


def test_table_of_image_paths(tmp_path):
    _image_folder(tmp_path / "pics", {"a": 2, "b": 2})
    rows = [(f"pics/{c}/{i}.png", c) for c in "ab" for i in range(2)]  # relative to the CSV
    table = _write(_frame(rows, text="path"), tmp_path / "train.csv")
    data = load_data(DataConfig(train=str(table), test=str(table), image_column="path"), seed=0)
    assert data.modality == "image" and data.train.column_names == ["image", "label"]
    assert data.train[0]["image"].size == (10, 12) and data.label_names == ["a", "b"]


# --------------------------------------------------------------------------- encode


TEXTS = ["short", "a much longer sentence with many more words in it than sixteen tokens can hold at all",
         "mid length text here", "x"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fedpeft.models import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture
def text_split() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2, 1]})


def test_encode_text_shapes_and_right_padding_trim(tokenizer, text_split, tmp_path):
    enc = encode(text_split, tokenizer, "text", max_length=16, cache_dir=tmp_path)
    assert isinstance(enc, EncodedSplit) and len(enc) == 4 and enc.padding_side == "right"
    assert enc.features["input_ids"].shape == (4, 16) and enc.features["input_ids"].dtype == torch.int64
    assert enc.features["attention_mask"].shape == (4, 16) and enc.features["attention_mask"].dtype == torch.int64
    assert enc.labels.tolist() == [0, 1, 2, 1]
    assert enc.features["attention_mask"][1].all()  # the long text is truncated to 16 tokens
    short = enc.batch(torch.tensor([0, 3]))  # "short", "x": [CLS] tok [SEP]
    assert short["input_ids"].shape == (2, 3) and short["attention_mask"].all()
    assert short["labels"].tolist() == [0, 1]
    assert torch.equal(short["input_ids"], enc.features["input_ids"][[0, 3], :3])
    mixed = enc.batch(np.array([2, 0]))
    width = int(enc.features["attention_mask"][2].sum())
    assert mixed["input_ids"].shape == (2, width) and mixed["attention_mask"][1, -1] == 0


def test_encode_left_padding_trims_on_the_left(tokenizer, text_split, tmp_path):
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    enc = encode(text_split, left, "text", max_length=16, cache_dir=tmp_path)
    assert enc.padding_side == "left"
    assert (enc.features["input_ids"][:, -1] == left.sep_token_id).all()  # real tokens end each row
    batch = enc.batch([0, 3])
    assert batch["input_ids"].shape == (2, 3)
    assert torch.equal(batch["input_ids"], enc.features["input_ids"][[0, 3], -3:])
    right = encode(text_split, tokenizer, "text", max_length=16, cache_dir=tmp_path)
    assert not torch.equal(right.features["input_ids"], enc.features["input_ids"])
    assert len(list((tmp_path / "encoded").glob("*.safetensors"))) == 2  # padding side is in the key


def test_encode_cache_hit_skips_tokenization(tokenizer, text_split, tmp_path, monkeypatch):
    first = encode(text_split, tokenizer, "text", max_length=16, cache_dir=tmp_path)
    files = list((tmp_path / "encoded").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "encoded").glob("*.tmp"))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenizer called although the cache should be used")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    second = encode(text_split, tokenizer, "text", max_length=16, cache_dir=tmp_path)
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(first.features[name], second.features[name])
    assert torch.equal(first.labels, second.labels) and second.padding_side == "right"
    with pytest.raises(AssertionError, match="tokenizer called"):  # another max_length: a new key
        encode(text_split, tokenizer, "text", max_length=12, cache_dir=tmp_path)


def test_encode_rebuilds_a_corrupt_cache_file(tokenizer, text_split, tmp_path):
    first = encode(text_split, tokenizer, "text", max_length=16, cache_dir=tmp_path)
    (path,) = (tmp_path / "encoded").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    again = encode(text_split, tokenizer, "text", max_length=16, cache_dir=tmp_path)
    assert torch.equal(first.features["input_ids"], again.features["input_ids"])
    assert path.stat().st_size > 100


def test_encode_default_cache_dir_from_env(tokenizer, text_split, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "cache"))
    encode(text_split, tokenizer, "text", max_length=8)
    assert len(list((tmp_path / "cache" / "encoded").glob("*.safetensors"))) == 1


def test_encode_missing_column(tokenizer, tmp_path):
    split = datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]})
    with pytest.raises(DataError, match=r"no column 'text'; available columns: sentence, label"):
        encode(split, tokenizer, "text", max_length=8, cache_dir=tmp_path)


def test_encode_images(tmp_path):
    from transformers import ViTImageProcessor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20 + 5 * i, 30, 3), dtype=np.uint8)) for i in range(3)]
    images.append(Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)))  # grayscale
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]},
                                       features=datasets.Features(image=datasets.Image(),
                                                                  label=datasets.Value("int64")))
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    enc = encode(split, processor, "image", max_length=8, cache_dir=tmp_path)
    pixels = enc.features["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() < pixels.max() <= 1.0  # rescaled and normalized with mean = std = 0.5
    batch = enc.batch([3, 1])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [1, 1]
    again = encode(split, processor, "image", max_length=8, cache_dir=tmp_path)
    assert torch.equal(again.features["pixel_values"], pixels)
    bigger = encode(split, ViTImageProcessor(size={"height": 16, "width": 16}), "image", 8, cache_dir=tmp_path)
    assert bigger.features["pixel_values"].shape == (4, 3, 16, 16)


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-llama"])
def test_left_padded_decoder_batch_scores_like_the_unpadded_row(family):
    """Left padding must not shift a decoder's positions: a row scores the same alone or padded."""
    from fedpeft.config import ModelConfig
    from fedpeft.models import load_model

    loaded = load_model(ModelConfig(name=family), ["a", "b", "c"])
    tok = loaded.processor
    assert tok.padding_side == "left"
    enc = tok(["hello there my good friend", "hi"], padding="max_length", max_length=12, return_tensors="pt")
    split = EncodedSplit({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                         torch.tensor([0, 1]), padding_side="left")
    both = split.batch(torch.tensor([0, 1]))
    alone = split.batch(torch.tensor([1]))
    assert alone["input_ids"].shape[1] < both["input_ids"].shape[1]
    for b in (both, alone):
        b.pop("labels")
    with torch.no_grad():
        diff = (loaded.model(**both).logits[1] - loaded.model(**alone).logits[0]).abs().max()
    assert diff < 1e-5


# --------------------------------------------------------------------------- empty cells


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_empty_and_blank_csv_labels_name_file_column_count_and_lines(tmp_path, csv_files):
    train = _csv(tmp_path / "train.csv", 'text,label\ngood film,pos\nbad film,\n"multi\nline",neg\nfine film,   \n')
    with pytest.raises(DataError, match=r"train\.csv: label column 'label' is empty in 2 rows \(lines 3, 6\); "
                                        r"fill them in or remove those rows$"):
        load_data(DataConfig(train=str(train), test=str(csv_files[1])), seed=0)


def test_blank_csv_text_and_many_empty_labels(tmp_path, csv_files):
    blank_text = _csv(tmp_path / "blank.csv", "text,label\nvery good,pos\n  \t ,neg\n")
    with pytest.raises(DataError, match=r"blank\.csv: text column 'text' is empty in 1 row \(line 3\)"):
        load_data(DataConfig(train=str(csv_files[0]), test=str(blank_text)), seed=0)
    many = _csv(tmp_path / "many.csv", "text,label\n" + "".join(f"t{i},\n" for i in range(7)) + "ok,pos\n")
    with pytest.raises(DataError, match=r"empty in 7 rows \(lines 2, 3, 4, 5, 6, \.\.\.\)"):
        load_data(DataConfig(train=str(many), test=str(csv_files[1])), seed=0)


def test_json_and_parquet_nulls_give_the_same_message_shape(tmp_path, csv_files):
    labels = tmp_path / "train.json"
    labels.write_text('[{"text": "a", "label": "pos"}, {"text": "b", "label": null}]')
    with pytest.raises(DataError, match=r"train\.json: label column 'label' is empty in 1 row \(row 2\); fill"):
        load_data(DataConfig(train=str(labels), test=str(csv_files[1])), seed=0)
    texts = _write(pd.DataFrame({"text": ["a", "b", None], "label": ["pos", "neg", "pos"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: text column 'text' is empty in 1 row \(row 3\); fill"):
        load_data(DataConfig(train=str(texts), test=str(csv_files[1])), seed=0)


# --------------------------------------------------------------------------- fingerprint


def _known_folder(root: Path) -> Path:
    folder = root / "banking77"
    folder.mkdir(parents=True)
    _write(_frame(TRAIN), folder / "train.csv")
    _write(_frame(TEST), folder / "test.csv")
    return root


def test_resolved_config_has_absolute_paths_and_a_local_fingerprint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _known_folder(tmp_path / "data")
    cfg = DataConfig(name="banking77", data_dir="data", cache_dir="cache", max_train_samples=5)
    data = load_data(cfg, seed=0)
    resolved = resolved_config(cfg, data)
    assert resolved.data_dir == str(tmp_path / "data") and resolved.cache_dir == str(tmp_path / "cache")
    assert resolved.fingerprint == data.fingerprint and data.fingerprint.startswith("local:")
    assert load_data(resolved, seed=0).fingerprint == data.fingerprint  # verified: same data
    assert load_data(cfg, seed=1).fingerprint == data.fingerprint  # the dataset, whatever the seed
    monkeypatch.delenv("FEDPEFT_DATA_DIR", raising=False)  # default ./data is recorded too
    assert resolved_config(DataConfig(name="banking77"), load_data(DataConfig(name="banking77"), 0)).data_dir == str(
        tmp_path / "data")
    files = DataConfig(train="data/banking77/train.csv", test="data/banking77/test.csv")
    resolved = resolved_config(files, load_data(files, seed=0))
    assert resolved.train == str(tmp_path / "data/banking77/train.csv") and resolved.data_dir is None


def test_fingerprint_detects_one_edited_label(tmp_path):
    _known_folder(tmp_path)
    cfg = DataConfig(name="banking77", data_dir=str(tmp_path))
    resolved = resolved_config(cfg, load_data(cfg, seed=0))
    edited = _frame(TRAIN[:-1] + [(TRAIN[-1][0], "pos")])  # one label changed, same label set
    _write(edited, tmp_path / "banking77" / "train.csv")
    with pytest.raises(DataError, match=rf"{tmp_path}/banking77 \(local\): the dataset changed since the run "
                                        r"was made .*point data.data_dir"):
        load_data(resolved, seed=0)


def test_moved_local_folder_is_named_and_never_fetched_from_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    _known_folder(tmp_path / "old")
    cfg = DataConfig(name="banking77", data_dir=str(tmp_path / "old"))
    resolved = resolved_config(cfg, load_data(cfg, seed=0))
    (tmp_path / "old").rename(tmp_path / "new")
    with pytest.raises(DataError, match=rf"data.data_dir: no folder {tmp_path}/old/banking77, where this run's "
                                        r"banking77 data was .*--set data.data_dir=NEW"):
        load_data(resolved, seed=0)
    moved = dataclasses.replace(resolved, data_dir=str(tmp_path / "new"))
    assert load_data(moved, seed=0).fingerprint == resolved.fingerprint


def test_moved_file_names_the_path_and_the_key_to_set(tmp_path, csv_files):
    with pytest.raises(DataError, match=rf"data.train: file not found: {tmp_path}/gone.csv "
                                        r"\(if it moved: --set data.train=NEW_PATH\)"):
        load_data(DataConfig(train=str(tmp_path / "gone.csv"), test=str(csv_files[1])), seed=0)


def test_image_fingerprint_hashes_the_image_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    train = _image_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    cfg = DataConfig(train=str(train), test=str(train))
    first = load_data(cfg, seed=0).fingerprint
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(train / "dog" / "1.png")
    assert load_data(cfg, seed=0).fingerprint not in (first, None)
