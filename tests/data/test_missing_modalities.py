"""Examples that lack a modality: zero placeholders plus `<modality>_mask` in every train and eval batch, a model
that ignores the placeholders, and a training run end to end."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.data.core import Dataset
from mmjax.nn.builder import build_model
from mmjax.registry import DATASETS
from mmjax.train import loop
from mmjax.train import setup as setup_lib
from mmjax.train import workdir as workdir_lib
from tests.conftest import tiny_overrides

IMAGE, AUDIO = (8, 8, 1), (12, 8)
SPLITS = {"train": 48, "validation": 20, "test": 21}
OPTIONAL = {"image": (IMAGE, "float32"), "audio": (AUDIO, "float32")}


def lacks_audio(i: int) -> bool:
    return i % 3 == 0  # Example 0 too: the input spec must still see audio.


def lacks_image(i: int) -> bool:
    return i % 4 == 1 and not lacks_audio(i)  # Never both.


def _preprocess(example):
    """Example i: image filled with i, audio with -i; a missing audio key is absent, a missing image is None."""
    i = int(example["id"])
    out = {"label": np.int32(i % 3), "id": np.int32(i)}
    out["image"] = None if lacks_image(i) else np.full(IMAGE, i, np.float32)
    if not lacks_audio(i):
        out["audio"] = np.full(AUDIO, -i, np.float32)
    return out


def partial_dataset(**changes) -> Dataset:
    examples = {split: [{"id": i} for i in range(n)] for split, n in SPLITS.items()}
    return Dataset(
        name="partial", source=examples.__getitem__, preprocess=_preprocess, splits=SPLITS, num_classes=3,
        modalities=("audio", "image"), class_names=("a", "b", "c"), **({"optional_modalities": OPTIONAL} | changes),
    )


def check_rows(batch, rows=None):
    """Every row: placeholder zeros and mask 0 where the example lacks a modality, its own values and mask 1 else."""
    assert batch["image_mask"].dtype == np.float32 and batch["audio_mask"].dtype == np.float32
    ids = batch["id"] if rows is None else batch["id"][rows]
    for row, i in zip(range(len(ids)) if rows is None else np.flatnonzero(rows), ids, strict=True):
        for modality, lacks, value in (("image", lacks_image, i), ("audio", lacks_audio, -i)):
            expected = 0.0 if lacks(int(i)) else float(value)
            assert np.all(batch[modality][row] == expected), (modality, i)
            assert batch[f"{modality}_mask"][row] == (0.0 if lacks(int(i)) else 1.0), (modality, i)


@pytest.mark.parametrize("cached", [False, True])
def test_train_and_eval_batches_hold_placeholders_and_masks(cached):
    dataset = partial_dataset()
    if cached:  # The in-memory cache stores completed examples; completing them again changes nothing.
        dataset = pipeline.cache_in_memory(dataset)
    spec = pipeline.input_spec(dataset, "train")
    assert spec["audio"] == (AUDIO, "float32") and spec["image"] == (IMAGE, "float32")
    assert spec["audio_mask"] == ((), "float32") and spec["image_mask"] == ((), "float32")
    train = iter(pipeline.train_dataset(dataset, "train", global_batch_size=16, seed=0))
    seen = []
    for _ in range(3):  # One epoch.
        batch = next(train)
        pipeline.check_batch(batch, spec, 16)
        check_rows(batch)
        seen.extend(batch["id"].tolist())
    assert sorted(seen) == list(range(48))
    assert {0.0, 1.0} <= set(np.concatenate([batch["audio_mask"], batch["image_mask"]]).tolist())
    seen = []
    for batch in pipeline.eval_batches(dataset, "test", global_batch_size=8):
        assert set(batch) == set(spec) | {pipeline.VALID_KEY}
        valid = batch[pipeline.VALID_KEY] == 1
        check_rows(batch, valid)
        seen.extend(batch["id"][valid].tolist())
    assert sorted(seen) == list(range(21))


def test_declared_placeholders_are_checked():
    with pytest.raises(ValueError, match=r"optional_modalities \['text'\] are not among its modalities"):
        partial_dataset(optional_modalities={"text": ((4,), "int32")})
    with pytest.raises(ValueError, match=r"optional_modalities\['audio'\]=.* must be \(shape, dtype\)"):
        partial_dataset(optional_modalities={"audio": ((12, 8), "not_a_dtype")})
    wrong = partial_dataset(optional_modalities={"image": (IMAGE, "float32"), "audio": ((12, 9), "float32")})
    with pytest.raises(ValueError, match=r"example\['audio'\] has shape \(12, 8\).*declares .*\(12, 9\)"):
        list(pipeline.eval_batches(wrong, "validation", global_batch_size=8))  # Example 1 has audio (12, 8).
    only_audio = partial_dataset(optional_modalities={"audio": (AUDIO, "float32")})  # Image is required ...
    with pytest.raises(ValueError, match="modality 'image' = None, but it is not one of the dataset's optional"):
        list(pipeline.eval_batches(only_audio, "train", global_batch_size=8))  # ... and example 1 lacks it.


@pytest.mark.parametrize("fusion", ["concat", "late"])
def test_model_output_of_a_masked_example_ignores_the_placeholder(fusion):
    model = build_model(ml_collections.ConfigDict(dict(
        num_classes=3,
        encoders=dict(image=dict(name="small_cnn", features=(4,), width=8),
                      audio=dict(name="spectrogram_cnn", features=(4,), width=8)),
        fusion=dict(name=fusion),
        head=dict(name="classifier", hidden=(8,)),
    )))
    batch = next(pipeline.eval_batches(partial_dataset(), "train", global_batch_size=16))
    inputs = {k: batch[k] for k in ("image", "audio", "image_mask", "audio_mask")}
    variables = model.init(jax.random.PRNGKey(0), inputs, train=False)
    rng = np.random.default_rng(0)
    noisy = dict(inputs)
    for modality in ("image", "audio"):
        missing = inputs[f"{modality}_mask"] == 0
        assert missing.any()
        noisy[modality] = np.where(missing.reshape(-1, *[1] * len(inputs[modality].shape[1:])),
                                   rng.normal(size=inputs[modality].shape).astype(np.float32), inputs[modality])
    out, out_noisy = model.apply(variables, inputs, train=False), model.apply(variables, noisy, train=False)
    np.testing.assert_array_equal(out, out_noisy)  # Placeholders (whatever they hold) change nothing ...
    unmasked = model.apply(variables, {k: noisy[k] for k in ("image", "audio")}, train=False)
    assert not np.allclose(unmasked, out)  # ... while without the masks the model would read the noise.


def test_training_run_with_missing_modalities(tmp_path, monkeypatch):
    """setup.setup feeds the masks to the train step and evaluation; a short run trains and evaluates end to end."""
    monkeypatch.setitem(DATASETS._items, "partial_test", lambda data_config: partial_dataset())
    monkeypatch.setattr(setup_lib, "_DATASETS", {})
    overrides = tiny_overrides(str(tmp_path / "unused"), **{
        "data.name": "partial_test", "data.cache_in_memory": False, "model.num_classes": 3,
        "model.encoders.audio.features": "(4,)", "train.num_steps": 4, "train.eval_every_steps": 4,
        "checkpoint.every_steps": 4, "model.modality_dropout": 0.2,
    })
    config = config_lib.apply_overrides(av_digits.get_config(), overrides)
    config.data.eval_batch_size = 16
    s = setup_lib.setup(config)
    assert s.keys == ["audio", "image", "audio_mask", "image_mask", "label"]
    assert {"audio_mask", "image_mask"} <= set(s.eval_keys)
    workdir = str(tmp_path / "run")
    results = loop.run(config, workdir)
    assert results["splits"]["test"]["num_examples"] == 21
    assert np.isfinite(results["splits"]["validation"]["loss"])
    with open(os.path.join(workdir, workdir_lib.INPUTS_FILENAME)) as f:
        assert json.load(f)["audio_mask"] == [[], "float32"]
