"""Tests for the Intents TFDS builder and its dataset entry (mmjax.data.intents). A build takes about a second."""

import collections
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import intents  # Registers the "intents" dataset entry.
from mmjax.data.tokenization import load_tokenizer, save_tokenizer, tokenizer_path, train_tokenizer
from mmjax.registry import DATASETS
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    intents.build(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def examples(data_dir):
    """Every split read back through tfds.data_source, as lists of example dicts."""
    out = {}
    for split in intents.SPLITS:
        source = tfds.data_source("intents", data_dir=data_dir, split=split)
        out[split] = [source[i] for i in range(len(source))]
    return out


def _digests(data_dir):
    folder = os.path.join(data_dir, "intents", str(intents.Intents.VERSION))
    names = sorted(n for n in os.listdir(folder) if ".array_record" in n)
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in names}


# --- built dataset ---------------------------------------------------------------------------


def test_builder_metadata_and_split_sizes(data_dir, examples):
    builder = intents.build(data_dir)  # Already built: returns without rebuilding.
    assert builder.name == "intents"
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert builder.info.features["label"].names == list(intents.INTENTS)
    assert {s: builder.info.splits[s].num_examples for s in intents.SPLITS} == intents.SPLIT_SIZES
    assert {s: len(e) for s, e in examples.items()} == intents.SPLIT_SIZES == {
        "train": 2000, "validation": 300, "test": 600
    }
    assert set(_digests(data_dir)) == {f"intents-{s}.array_record-00000-of-00001" for s in intents.SPLITS}


def test_built_examples_are_the_generated_ones(examples):
    for split, rows in examples.items():
        generated = intents.generate_split(split)
        assert [r["text"].decode() for r in rows] == [u.text for u in generated]
        assert [int(r["label"]) for r in rows] == [u.label for u in generated]


def test_every_label_in_every_split_balanced(examples):
    for split, rows in examples.items():
        counts = collections.Counter(int(r["label"]) for r in rows)
        assert sorted(counts) == list(range(len(intents.INTENTS))), split
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)


def test_rebuild_is_byte_identical_in_process_and_in_a_fresh_process(data_dir, tmp_path):
    again = str(tmp_path / "again")
    intents.build(again)
    fresh = str(tmp_path / "fresh")
    code = f"from mmjax.data import intents; intents.build({fresh!r})"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=REPO_ROOT)
    assert _digests(again) == _digests(data_dir) == _digests(fresh)


# --- grammar and splits ----------------------------------------------------------------------


def test_test_templates_are_held_out_of_train_and_validation():
    assignment = intents.split_templates()
    for intent in intents.INTENTS:
        train, validation, test = (set(assignment[s][intent]) for s in intents.SPLITS)
        assert train == validation
        assert not train & test
        assert train | test == set(intents.TEMPLATES[intent])
        assert len(test) == intents.TEST_TEMPLATES_PER_INTENT
    for split in intents.SPLITS:
        generated = intents.generate_split(split)
        used = {(intents.INTENTS[u.label], u.template) for u in generated}
        allowed = {(i, t) for i, ts in assignment[split].items() for t in ts}
        assert used == allowed, split  # Only the split's own templates, and every one of them.
    test_templates = {u.template for u in intents.generate_split("test")}
    assert not test_templates & {u.template for u in intents.generate_split("train")}
    assert not test_templates & {u.template for u in intents.generate_split("validation")}


def test_no_text_occurs_twice_in_the_dataset():
    texts = [u.text for s in intents.SPLITS for u in intents.generate_split(s)]
    assert len(set(texts)) == len(texts)


def test_templates_and_slots_are_well_formed():
    for intent, templates in intents.TEMPLATES.items():
        assert len(set(templates)) == len(templates) == 20, intent
        for template in templates:
            slots = intents.template_slots(template)
            assert slots, template  # Every template has a slot, so it has many fillings.
            assert all(s.rstrip("0123456789") in intents.SLOTS for s in slots), template
    two_items = [u.text for u in intents.generate_split("train") if u.template == "put {item} and {item2} on the list"]
    for text in two_items:
        body = text.split("put ", 1)[1].split(" on the list")[0]
        first, second = body.split(" and ")
        assert first != second


def test_generation_is_seeded_and_sizes_are_configurable(tmp_path):
    assert intents.generate_split("test") == intents.generate_split("test")
    small = {"train": 40, "validation": 16, "test": 24}
    builder = intents.build(str(tmp_path), sizes=small)
    assert {s: builder.info.splits[s].num_examples for s in intents.SPLITS} == small
    assert intents.generate_split("test", small) == intents.generate_split("test", small)
    with pytest.raises(ValueError, match="unknown split"):
        intents.generate_split("dev")


def test_every_text_fits_the_default_max_len_in_minilm_tokens():
    tokenizer = load_tokenizer(tokenizer_path("minilm"))
    tokenizer.no_padding()
    lengths = [len(tokenizer.encode(u.text).ids) for s in intents.SPLITS for u in intents.generate_split(s)]
    assert max(lengths) <= 32  # [CLS] ... [SEP]: nothing is truncated at data.max_len=32.


# --- dataset entry ---------------------------------------------------------------------------


def test_dataset_entry_with_the_minilm_tokenizer(data_dir):
    config = ml_collections.ConfigDict({"name": "intents", "data_dir": data_dir, "tokenizer": "minilm", "max_len": 32})
    dataset = DATASETS.get("intents")(config)
    assert dataset.name == "intents" and dataset.modalities == ("text",) and dataset.task == "classification"
    assert dataset.num_classes == 8 and dataset.class_names == intents.INTENTS
    assert dataset.splits == intents.SPLIT_SIZES
    source = dataset.source("test")
    assert len(source) == 600
    example = source[0]
    assert isinstance(example["text"], str) and example["text"] == intents.generate_split("test")[0].text
    assert example["label"] == intents.generate_split("test")[0].label

    out = pickle.loads(pickle.dumps(dataset.preprocess))(example)
    ids, label = out["text"], out["label"]
    assert ids.dtype == np.int32 and ids.shape == (32,)
    assert label.dtype == np.int32 and label == example["label"]
    tokenizer = load_tokenizer(tokenizer_path("minilm"))
    real = int((ids != 0).sum())
    assert ids[0] == tokenizer.token_to_id("[CLS]") and ids[real - 1] == tokenizer.token_to_id("[SEP]")
    assert real < 32 and (ids[real:] == 0).all() and (ids[:real] != 0).all()  # Right-padded with [PAD] = 0.


def test_dataset_entry_with_a_tokenizer_file_and_truncation(data_dir, tmp_path):
    texts = [u.text for u in intents.generate_split("train")]
    path = save_tokenizer(train_tokenizer(texts, vocab_size=300), str(tmp_path / "tok.json"))
    config = ml_collections.ConfigDict({"name": "intents", "data_dir": data_dir, "tokenizer": path, "max_len": 6})
    dataset = DATASETS.get("intents")(config)
    batch = [dataset.preprocess(dataset.source("train")[i]) for i in range(20)]
    assert all(b["text"].shape == (6,) and b["text"].dtype == np.int32 for b in batch)
    assert any((b["text"] != 0).all() for b in batch)  # Long texts are truncated to max_len...
    assert all(b["text"][0] == 2 for b in batch)  # ... and still start with [CLS].
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        tokenizer_path(str(tmp_path / "missing.json"))


def test_reading_needs_no_builder_code(data_dir):
    code = textwrap.dedent(f"""
        import sys, tensorflow_datasets as tfds
        source = tfds.data_source("intents", data_dir={data_dir!r}, split="validation")
        assert len(source) == 300 and isinstance(source[0]["text"], bytes)
        assert "mmjax.data.intents" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO_ROOT)
