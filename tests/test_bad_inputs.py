"""The catalogue of malformed inputs: each one fails with a clear error naming the key, value or shape at fault.

One test (or parametrized case) per distinct typo a researcher can make. Every case asserts the error type and
that the message names the problem (and the fix or closest valid name where there is one). Nothing here trains or
compiles: checks run in `config.apply_overrides`, `setup.validate`, `setup.setup` (which traces the model with
`jax.eval_shape`, before any compilation), `build_model`, `get_dataset` and `pipeline.check_batch`.
The README's Reliability section lists these cases.
"""

import json
import os
import re

import ml_collections
import numpy as np
import pytest

from experiments import av_digits
from mmjax import cli
from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.data import pipeline
from mmjax.data.core import Dataset
from mmjax.data.datasets import get_dataset
from mmjax.nn.builder import build_model
from mmjax.registry import DATASETS
from mmjax.tasks import build_task
from mmjax.train import early_stopping
from mmjax.train import setup as setup_lib
from mmjax.train import workdir as workdir_lib
from mmjax.train.preflight import RunRefused
from tests.conftest import tiny_overrides

NO_DATA = "/nonexistent/tfds"  # For checks that must fail before any data is read.


def tiny_config(data_dir: str = NO_DATA, **extra) -> ml_collections.ConfigDict:
    """The AV-Digits experiment in its tiny test configuration (see tests/conftest.py), with `extra` overrides."""
    return config_lib.apply_overrides(av_digits.get_config(), tiny_overrides(data_dir, **extra))


def raises(error, *fragments):
    """`pytest.raises` that requires every fragment (plain text, not a regex) in the message, in order."""
    return pytest.raises(error, match="(?s)" + ".*".join(re.escape(f) for f in fragments))


def case_id(value):
    """A short readable test id for a dict of changes (pytest's default would be `fragments3`)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())[:60]
    return None


# ---------------------------------------------------------------------------------------------------------------
# 1. Command-line overrides (`--config.KEY=VALUE`): unknown keys get the closest valid key, values are parsed to
#    the key's current type, malformed literals are refused instead of being taken as strings.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, fragments",
    [
        # Unknown top-level key: the closest valid key is suggested (and the full list follows).
        ("trian.num_steps=5", ["unknown config key 'trian.num_steps'", "Did you mean train.num_steps"]),
        # Unknown nested key.
        ("model.encoders.image.widht=8",
         ["unknown config key 'model.encoders.image.widht'", "Did you mean model.encoders.image.width"]),
        # A modality group that does not exist.
        ("model.encoders.video.name=vit", ["unknown config key 'model.encoders.video.name'"]),
        # A string for a batch size.
        ("data.batch_size=abc", ["config key 'data.batch_size' expects int, got 'abc'"]),
        # A float for an int.
        ("train.num_steps=1.5", ["config key 'train.num_steps' expects int, got '1.5'"]),
        # Text for a float.
        ("optimizer.lr=fast", ["config key 'optimizer.lr' expects float, got 'fast'"]),
        # A bool that is neither true nor false.
        ("optimizer.nesterov=maybe", ["config key 'optimizer.nesterov' expects a bool (true/false), got 'maybe'"]),
        # An unbalanced tuple literal (used to become the tuple of strings ('(4', '8')).
        ("model.encoders.audio.features=(4, 8", ["'model.encoders.audio.features': '(4, 8' is not a valid Python "
                                                 "literal (unbalanced brackets?)"]),
        # A tuple of ints with a stray word (used to become (4, 'x')).
        ("model.encoders.image.features=4,x", ["'model.encoders.image.features' expects a sequence whose elements "
                                               "are each an int", "element 'x'"]),
        # A float inside a tuple of ints.
        ("model.head.hidden=(16.5,)", ["'model.head.hidden' expects a sequence whose elements are each an int",
                                       "element 16.5"]),
        # No '=' at all.
        ("train.num_steps", ["config override 'train.num_steps' must look like key=value"]),
        # A plain value for a group.
        ("model.encoders.image=vit", ["config key 'model.encoders.image' is a group, not a value",
                                      "replace it whole with a dict literal"]),
        # A broken dict literal for a group.
        ("model.encoders.image={'name': 'vit'", ["config key 'model.encoders.image'", "is not a Python dict literal"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_override(override, fragments):
    with raises(ConfigError, *fragments):
        config_lib.apply_overrides(av_digits.get_config(), [override])


def test_bad_override_on_the_command_line_exits_2_naming_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(av_digits.get_config, ["--workdir", "/tmp/w", "--config.data.batch_size=abc"])
    assert exit_info.value.code == 2
    assert "config key 'data.batch_size' expects int, got 'abc'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 2. Config values (set in Python, loaded from JSON, or from overrides): `setup.validate` checks types, ranges,
#    divisibility by the device count (8 simulated devices) and names before any data is read.
# ---------------------------------------------------------------------------------------------------------------


def _set(config, key, value):
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    with node.ignore_type():  # Simulates a config written in Python or JSON, which overrides would have refused.
        node[leaf] = value


@pytest.mark.parametrize(
    "key, value, fragments",
    [
        # Wrong types.
        ("data.batch_size", "64", ["config data.batch_size='64' must be a positive integer"]),
        ("train.num_steps", 100.0, ["config train.num_steps=100.0 must be a positive integer"]),
        ("optimizer.lr", "3e-4", ["config optimizer.lr='3e-4' must be a number, got str"]),
        ("seed", "0", ["config seed='0' must be an integer"]),
        # Zero / negative sizes and counts.
        ("data.batch_size", 0, ["config data.batch_size=0 must be a positive integer"]),
        ("train.num_steps", -5, ["config train.num_steps=-5 must be a positive integer"]),
        ("checkpoint.keep", 0, ["config checkpoint.keep=0 must be a positive integer"]),
        ("optimizer.warmup_steps", -1, ["config optimizer.warmup_steps=-1 must be in [0, inf)"]),
        ("optimizer.lr", 0.0, ["config optimizer.lr=0.0 must be in (0, inf)"]),
        ("optimizer.b2", 1.0, ["config optimizer.b2=1.0 must be in [0, 1)"]),
        ("optimizer.grad_clip_norm", -1.0, ["config optimizer.grad_clip_norm=-1.0 must be in [0, inf)"]),
        # Batches that do not split over the 8 devices.
        ("data.batch_size", 12, ["config data.batch_size=12 must be a positive multiple of the device count 8",
                                 "e.g. 8"]),
        ("data.eval_batch_size", 100, ["config data.eval_batch_size=100 must be a positive multiple of the device "
                                       "count 8"]),
        ("train.grad_accum_steps", 4, ["config data.batch_size=16 must be a multiple of train.grad_accum_steps=4 x "
                                       "the device count 8 = 32"]),
        ("mesh.fsdp", 3, ["config mesh.fsdp=3 must divide the device count 8; valid: [1, 2, 4, 8]"]),
        # Unknown names, with the closest valid one.
        ("optimizer.name", "adam", ["config optimizer.name='adam'; valid: adamw, sgd.", "Did you mean 'adamw'?"]),
        ("optimizer.schedule", "cosin", ["config optimizer.schedule='cosin'; valid: cosine, constant.",
                                         "Did you mean 'cosine'?"]),
        ("optimizer.warmup_step", 10, ["config optimizer.warmup_step: unknown key.", "Did you mean 'warmup_steps'?"]),
        ("task.name", "multilable", ["config task.name: unknown task 'multilable'.", "Did you mean 'multilabel'?"]),
        # A bare string where a tuple of strings is expected (it would be iterated letter by letter).
        ("train.frozen", "encoders_image", ["config train.frozen='encoders_image' must be a tuple of strings"]),
        ("eval.splits", "test", ["config eval.splits='test' must be a tuple of strings"]),
        # A frozen pattern that is not a regular expression.
        ("train.frozen", ("encoders_(image",), ["config train.frozen pattern 'encoders_(image' is not a valid "
                                                "regular expression"]),
        # Pretrained sources.
        ("train.init_from", {"encoders_text": "minilm6"}, ["config train.init_from['encoders_text']='minilm6'; "
                                                           "valid: minilm, hf_bert:DIRECTORY, hf_vit:DIRECTORY, "
                                                           "word_vectors:FILE.",
                                                           "Did you mean 'minilm'?"]),
        ("train.init_from", {"encoders_image": "hf_vit:/nonexistent/vit"},
         ["config train.init_from['encoders_image']='hf_vit:/nonexistent/vit': directory '/nonexistent/vit' does "
          "not exist"]),
        ("train.init_from", {"encoders_text/embed": "word_vectors:/nonexistent/glove.txt"},
         ["config train.init_from['encoders_text/embed']='word_vectors:/nonexistent/glove.txt': no word-vector file "
          "'/nonexistent/glove.txt'"]),
        # L1 / L2 penalties: coefficients >= 0, parameter groups as regular expressions.
        ("optimizer.l2", -1e-4, ["config optimizer.l2=-0.0001 must be in [0, inf)"]),
        ("optimizer.l1_params", ("encoders_(image",), ["config optimizer.l1_params pattern 'encoders_(image' is not "
                                                       "a valid regular expression"]),
        # The best-checkpoint metric: its split must be evaluated, its metric reported by the task.
        ("checkpoint.best_metric", "valid/accuracy", ["config checkpoint.best_metric='valid/accuracy' must be "
                                                      "'SPLIT/METRIC' with SPLIT one of eval.splits "
                                                      "['validation', 'test']", "Did you mean 'validation'?"]),
        ("checkpoint.best_metric", "validation/acuracy", ["config checkpoint.best_metric='validation/acuracy': "
                                                          "task 'classification' reports no metric 'acuracy'",
                                                          "Did you mean 'accuracy'?"]),
        ("checkpoint.best_mode", "maximum", ["config checkpoint.best_mode='maximum'; valid: max, min.",
                                             "Did you mean 'max'?"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_config_value_fails_validation(key, value, fragments):
    config = tiny_config()
    _set(config, key, value)
    with raises(ValueError, *fragments):
        setup_lib.validate(config)


@pytest.mark.parametrize(
    "value, best_metric, fragments",
    [
        # A negative patience (0 is off).
        (-2, "validation/accuracy", ["config train.early_stopping_patience=-2 must be an int >= 0", "(0 = off)"]),
        # Early stopping with no metric to watch.
        (3, "", ["config train.early_stopping_patience=3 needs checkpoint.best_metric ('SPLIT/METRIC'"]),
    ],
)
def test_bad_early_stopping_patience(value, best_metric, fragments):
    config = tiny_config(**{"checkpoint.best_metric": best_metric})
    config.train.early_stopping_patience = value
    with raises(ValueError, *fragments):
        early_stopping.patience(config)


def test_every_metric_name_a_task_declares_is_one_it_reports():
    """`metric_names` (what validate accepts in checkpoint.best_metric) matches what the tasks really report."""
    from mmjax.tasks.supervised import Classification, MultiLabel, Regression

    labels = np.array([0, 1, 2, 1])
    reported = {
        Classification: Classification(3).metrics({"prediction": labels, "probabilities": np.eye(3)[labels]}, labels),
        MultiLabel: MultiLabel(3).metrics({"scores": np.eye(3)[labels] * 0.9}, np.eye(3)[labels]),
        Regression: Regression(1).metrics({"prediction": labels[:, None] * 1.0}, labels * 1.0),
    }
    for cls, metrics in reported.items():
        scalars = {k for k, v in metrics.items() if isinstance(v, float)}
        assert set(cls.metric_names) == scalars, cls.__name__


# ---------------------------------------------------------------------------------------------------------------
# 3. The model config (`build_model`): unknown names with suggestions, field types from each module's
#    annotations, positive sizes, rates in [0, 1), known choices, dtypes, and fusions that need 2+ modalities.
# ---------------------------------------------------------------------------------------------------------------


def model_config(**changes) -> ml_collections.ConfigDict:
    """The tiny AV-Digits `config.model`, with `changes` {dotted key under model: value} applied."""
    config = tiny_config().model
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    return config


@pytest.mark.parametrize(
    "changes, fragments",
    [
        # Unknown names (registries), with the closest valid name.
        ({"encoders.image.name": "small_cnm"}, ["config model.encoders.image.name: unknown encoder 'small_cnm'.",
                                                "Did you mean 'small_cnn'?", "Valid names:"]),
        ({"fusion.name": "lat"}, ["config model.fusion.name: unknown fusion 'lat'.", "Did you mean 'late'?"]),
        ({"head.name": "clasifier"}, ["config model.head.name: unknown head 'clasifier'.",
                                      "Did you mean 'classifier'?"]),
        ({"name": "twotower"}, ["config model.name='twotower'; valid: fusion, two_tower, matching, captioner, ctc.",
                                "Did you mean 'two_tower'?"]),
        ({"encoders.image.widht": 8}, ["config model.encoders.image (small_cnn): unknown field(s) widht;",
                                       "valid fields:", "width"]),
        # Wrong types, from the module's field annotations.
        ({"encoders.image.width": "128"}, ["config model.encoders.image.width='128' must be an int, got str"]),
        ({"encoders.image.width": 128.0}, ["config model.encoders.image.width=128.0 must be an int, got float"]),
        ({"encoders.audio.features": 32}, ["config model.encoders.audio.features=32 must be a tuple of ints"]),
        # Zero / negative sizes.
        ({"encoders.image.width": -4}, ["config model.encoders.image.width=-4 must be a positive integer"]),
        ({"encoders.audio.features": (16, 0)}, ["config model.encoders.audio.features=(16, 0) must hold positive "
                                                "integers (sizes); 0 is not"]),
        ({"head.hidden": (-1,)}, ["config model.head.hidden=(-1,) must hold positive integers"]),
        ({"encoders.image": {"name": "vit", "num_heads": 0}}, ["config model.encoders.image.num_heads=0 must be a "
                                                               "positive integer"]),
        ({"fusion": {"name": "weighted_sum", "dim": 0}}, ["config model.fusion.dim=0 must be a positive integer"]),
        ({"num_classes": 0}, ["config model.num_classes=0 must be a positive integer"]),
        # Rates.
        ({"encoders.image.dropout": 1.5}, ["config model.encoders.image.dropout=1.5 must be a probability in [0, 1)"]),
        ({"modality_dropout": 1.0}, ["config model.modality_dropout=1.0 must be in [0, 1)"]),
        # Choices: remat policy, convolution and attention implementations.
        ({"encoders.image.remat": "dot"}, ["config model.encoders.image.remat='dot'; valid: none, full, dots.",
                                           "Did you mean 'dots'?"]),
        ({"encoders.audio.conv_impl": "xl"}, ["config model.encoders.audio.conv_impl='xl'; valid: auto, xla, cpu.",
                                              "Did you mean 'xla'?"]),
        ({"encoders.image": {"name": "vit", "attention_impl": "fussed"}},
         ["config model.encoders.image.attention_impl='fussed'; valid: auto, packed, flax, fused.",
          "Did you mean 'fused'?"]),
        # Compute dtypes.
        ({"dtype": "bf16"}, ["config model.dtype='bf16' is not a dtype (e.g. bfloat16, float32)"]),
        ({"dtype": "int32"}, ["config model.dtype='int32' must be a floating-point compute dtype"]),
        ({"encoders.image.dtype": "float8"}, ["config model.encoders.image.dtype='float8' is not a dtype"]),
        # A fusion that needs two modalities, given one.
        ({"encoders": {"image": {"name": "small_cnn", "features": (4,), "width": 16}}, "fusion": {"name": "gmu"}},
         ["config model.fusion.name='gmu' needs at least 2 modalities, but model.encoders has 1 (['image']);",
          "use 'concat'"]),
    ],
    ids=case_id,
)
def test_bad_model_config_fails_in_build_model(changes, fragments):
    with raises(ValueError, *fragments):
        build_model(model_config(**changes))


@pytest.mark.parametrize(
    "task, fragments",
    [
        ({"name": "multilabel", "treshold": 0.3}, ["config task (multilabel): unknown option(s) ['treshold']"]),
        ({"name": "classification", "label_smoothing": 1.0},
         ["config task.label_smoothing=1.0 must be in [0, 1)"]),
        ({"name": "regression", "loss_type": "huber"}, ["config task.loss_type='huber'; valid: mse, mae."]),
    ],
    ids=case_id,
)
def test_bad_task_options(task, fragments):
    with raises(ValueError, *fragments):
        build_task(task, 10)


def test_class_names_that_do_not_match_num_classes():
    with raises(ValueError, "Classification: 3 class names ['a', 'b', 'c'] for num_classes=10"):
        build_task({"name": "classification"}, 10, ("a", "b", "c"))


# ---------------------------------------------------------------------------------------------------------------
# 4. Config vs dataset (`setup.setup` on the real AV-Digits data): modalities, label type, number of classes,
#    split names; and model inputs the encoders cannot take, caught when the model is traced (still before any
#    compilation) and prefixed with the config key of the encoder at fault.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        # An encoder for a modality the dataset does not provide.
        ({"model.encoders": "{'image': {'name': 'small_cnn'}, 'video': {'name': 'small_cnn'}}"},
         ["config model.encoders names modality ['video'] but dataset 'av_digits' provides ['audio', 'image']"]),
        ({"model.num_classes": 7}, ["config model.num_classes=7 but dataset 'av_digits' has 10 classes"]),
        ({"task.name": "regression", "checkpoint.best_metric": "validation/mae"},
         ["config task.name='regression' but dataset 'av_digits' provides 'classification' labels"]),
        ({"data.name": "av_digit"}, ["config data.name: unknown dataset 'av_digit'.", "Did you mean 'av_digits'?"]),
        ({"data.target": "digits"}, ["config data.target='digits'; valid: digit, value, digit_pair"]),
        ({"data.train_split": "trian"}, ["split 'trian' is not in dataset 'av_digits' (config data.train_split); "
                                         "splits: ['test', 'train', 'validation'].", "Did you mean 'train'?"]),
        ({"eval.splits": "validaton,test", "checkpoint.best_metric": "test/accuracy"},
         ["split 'validaton' is not in dataset 'av_digits' (config eval.splits);", "Did you mean 'validation'?"]),
        # Model inputs the encoder cannot take (traced with jax.eval_shape: no compilation).
        ({"model.encoders.audio": "{'name': 'vit', 'patch_size': 7, 'width': 16, 'depth': 1, 'num_heads': 2}"},
         ["model.encoders.audio: ViT expects input of shape [B, H, W, C] (rank 4), got shape (1, 49, 40)"]),
        ({"model.encoders.image": "{'name': 'vit', 'patch_size': 3, 'width': 16, 'depth': 1, 'num_heads': 2}"},
         ["model.encoders.image: ViT: image height x width 8 x 8", "is not divisible by patch_size 3 x 3"]),
        ({"model.encoders.image": "{'name': 'vit', 'patch_size': 4, 'width': 18, 'depth': 1, 'num_heads': 4}"},
         ["model.encoders.image: ViT: width=18 is not divisible by num_heads=4"]),
    ],
    ids=case_id,
)
def test_config_that_does_not_fit_the_dataset_fails_in_setup(av_digits_dir, overrides, fragments):
    config = tiny_config(av_digits_dir, **overrides)
    with raises(ValueError, *fragments):
        setup_lib.setup(config)


def test_text_longer_than_the_encoders_positions_fails_in_setup():
    """Token ids of length 40 for a text encoder with 16 learned positions (max_len)."""
    config = tiny_config(**{"eval.splits": "test", "checkpoint.best_metric": "test/accuracy"})
    config.data = dict(name="synthetic", batch_size=16, eval_batch_size=64, train_split="train", num_threads=1,
                       num_workers=0, cache_in_memory=False,
                       synthetic=dict(text=(40,), task="classification", num_classes=10, num_examples=64))
    config.model.encoders = {"text": dict(name="text_transformer", vocab_size=1000, max_len=16, width=16, depth=1,
                                          num_heads=2, mlp_dim=32)}
    with raises(ValueError, "model.encoders.text: TextTransformer: sequence length L=40 exceeds max_len=16"):
        setup_lib.setup(config)


# ---------------------------------------------------------------------------------------------------------------
# 5. Datasets whose own description or labels are wrong (`get_dataset`): empty splits, label names that do not
#    match num_classes, labels out of range or not of the task's kind (checked as each example is read).
# ---------------------------------------------------------------------------------------------------------------


def fake_dataset(labels, *, task="classification", num_classes=10, class_names=(), splits=None, name="fake"):
    """A registered dataset factory: one float feature `x` per example and the given labels."""
    examples = [{"x": np.full((2,), i, np.float32), "label": label} for i, label in enumerate(labels)]

    def factory(data_config):
        return Dataset(name=name, source=lambda split: examples if splits is None or splits[split] else [],
                       preprocess=dict, splits=splits or {"train": len(examples), "test": len(examples)},
                       num_classes=num_classes, modalities=("x",), class_names=class_names, task=task)

    return factory


@pytest.fixture
def register(monkeypatch):
    """Registers a dataset factory under "fake" for one test only."""

    def add(factory):
        monkeypatch.setitem(DATASETS._items, "fake", factory)
        return get_dataset(ml_collections.ConfigDict({"name": "fake"}))

    return add


def read_all(dataset, split="train"):
    source = dataset.source(split)
    return [dataset.preprocess(source[i]) for i in range(len(source))]


@pytest.mark.parametrize(
    "labels, options, fragments",
    [
        ([np.int32(3), np.int32(10)], {},
         ["dataset 'fake': label 10 is out of range for 10 classes (valid ids: 0..9)"]),
        ([np.int32(-1)], {}, ["dataset 'fake': label -1 is out of range for 10 classes"]),
        ([np.float32(2.0)], {}, ["dataset 'fake': a classification label must be one integer class id, got 2.0"]),
        ([np.array([0.0, 2.0, 1.0], np.float32)], {"task": "multilabel", "num_classes": 3},
         ["dataset 'fake': multilabel label", "must be multi-hot (values in [0, 1])"]),
        ([np.array([1.0, 0.0], np.float32)], {"task": "multilabel", "num_classes": 3},
         ["dataset 'fake': a multilabel label needs 3 value(s), got shape (2,)"]),
        ([np.float32(np.nan)], {"task": "regression", "num_classes": 1},
         ["dataset 'fake': regression label nan must be finite numbers"]),
    ],
    ids=["too-large", "negative", "float-class-id", "not-multi-hot", "multilabel-shape", "nan-target"],
)
def test_bad_label_fails_when_read(register, labels, options, fragments):
    dataset = register(fake_dataset(labels, **options))
    with raises(ValueError, *fragments):
        read_all(dataset)


def test_label_names_that_do_not_match_num_classes(register):
    with raises(ValueError, "dataset 'fake': 3 label names ['zero', 'one', 'two'] for num_classes=10"):
        register(fake_dataset([np.int32(0)], class_names=("zero", "one", "two")))


def test_empty_split_is_refused_before_training(register):
    dataset = register(fake_dataset([np.int32(0)], splits={"train": 1, "test": 0}))
    config = tiny_config(**{"eval.splits": "test", "checkpoint.best_metric": "test/accuracy"})
    config.model.encoders = {"x": {"name": "tabular_mlp"}}
    with raises(ValueError, "split 'test' of dataset 'fake' is empty (config eval.splits): 0 examples"):
        setup_lib.check_dataset(config, dataset)


# ---------------------------------------------------------------------------------------------------------------
# 6. Host batches (`pipeline.check_batch`, run on every training batch before it is sent to the devices).
# ---------------------------------------------------------------------------------------------------------------

SPEC = {"image": ((8, 8, 1), "float32"), "audio": ((49, 40), "float32"), "label": ((), "int32")}


def good_batch(rows=8):
    return {"image": np.zeros((rows, 8, 8, 1), np.float32), "audio": np.zeros((rows, 49, 40), np.float32),
            "label": np.zeros((rows,), np.int32)}


def _with(key, index, value):
    batch = good_batch()
    batch[key][index] = value
    return batch


@pytest.mark.parametrize(
    "batch, error, fragments",
    [
        ({k: v for k, v in good_batch().items() if k != "audio"}, KeyError,
         ["batch is missing key(s) ['audio']; expected ['audio', 'image', 'label']"]),
        (good_batch() | {"image": np.zeros((8, 8, 8), np.float32)}, ValueError,
         ["batch['image'] has shape (8, 8, 8), expected (8, 8, 8, 1)"]),
        (good_batch(rows=6), ValueError, ["batch['image'] has shape (6, 8, 8, 1), expected (8, 8, 8, 1)"]),
        (good_batch() | {"label": np.zeros((8,), np.int64)}, ValueError,
         ["batch['label'] has dtype int64, expected int32"]),
        (good_batch() | {"image": np.zeros((8, 8, 8, 1), np.uint8)}, ValueError,
         ["batch['image'] has dtype uint8, expected float32"]),
        (_with("image", (3, 0, 0, 0), np.nan), ValueError,
         ["batch['image'] has 1 non-finite value(s) (NaN/Inf) in row(s) [3]"]),
        (_with("audio", (slice(5, 7), 0, 0), np.inf), ValueError,
         ["batch['audio'] has 2 non-finite value(s) (NaN/Inf) in row(s) [5, 6]"]),
    ],
    ids=["missing-key", "wrong-rank", "wrong-rows", "label-dtype", "image-dtype", "nan", "inf"],
)
def test_bad_batch(batch, error, fragments):
    with raises(error, *fragments):
        pipeline.check_batch(batch, SPEC, 8)


def test_large_finite_values_are_not_mistaken_for_inf():
    """The fast path sums the array: a float32 overflow of the sum alone must not raise."""
    batch = good_batch()
    batch["audio"][:] = 3e38
    pipeline.check_batch(batch, SPEC, 8)


# ---------------------------------------------------------------------------------------------------------------
# 7. Workdirs (`workdir.check_workdir`, `check_saved_step`, before anything is written): a workdir holding another
#    model's checkpoints, or a step beyond train.num_steps, is refused and left untouched.
# ---------------------------------------------------------------------------------------------------------------

INPUT_SPEC = {"image": [[8, 8, 1], "float32"], "label": [[], "int32"]}


def fake_workdir(path, config, spec=INPUT_SPEC):
    """A workdir as `run()` leaves it: config.json, model_inputs.json and a checkpoint step directory."""
    os.makedirs(os.path.join(path, "checkpoints", "2"))
    config_lib.save(config, str(path))
    with open(os.path.join(path, workdir_lib.INPUTS_FILENAME), "w") as f:
        json.dump(spec, f)
    return str(path)


def test_workdir_of_another_model(tmp_path):
    workdir = fake_workdir(tmp_path / "run", tiny_config())
    other = tiny_config(**{"model.fusion.name": "late"})
    with raises(ValueError, "holds checkpoints of a different model; nothing was changed there",
                "model.fusion: saved {'name': 'concat'}, now {'name': 'late'}", "Use a new --workdir"):
        workdir_lib.check_workdir(workdir, other, INPUT_SPEC)


def test_workdir_of_a_model_with_other_input_shapes(tmp_path):
    workdir = fake_workdir(tmp_path / "run", tiny_config())
    spec = INPUT_SPEC | {"image": [[16, 16, 1], "float32"]}
    with raises(ValueError, "different model", "model inputs: saved"):
        workdir_lib.check_workdir(workdir, tiny_config(), spec)


def test_workdir_with_checkpoints_but_no_config(tmp_path):
    workdir = fake_workdir(tmp_path / "run", tiny_config())
    os.remove(os.path.join(workdir, config_lib.CONFIG_FILENAME))
    with raises(ValueError, "holds checkpoints but no config.json / model_inputs.json to check them against"):
        workdir_lib.check_workdir(workdir, tiny_config(), INPUT_SPEC)


def test_workdir_with_an_unreadable_config(tmp_path):
    workdir = fake_workdir(tmp_path / "run", tiny_config())
    with open(os.path.join(workdir, config_lib.CONFIG_FILENAME), "w") as f:
        f.write('{"model": ')
    with raises(ValueError, "its config.json / model_inputs.json cannot be read"):
        workdir_lib.check_workdir(workdir, tiny_config(), INPUT_SPEC)


def test_workdir_with_a_step_beyond_num_steps(tmp_path):
    workdir = fake_workdir(tmp_path / "run", tiny_config())  # Holds step 2.
    with raises(RunRefused, f"workdir {workdir} holds a checkpoint of step 2, beyond train.num_steps=1",
                "give train.num_steps >= 2; to train train.num_steps=1 from scratch, use a new --workdir"):
        workdir_lib.check_saved_step(workdir, 1)


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with raises(ValueError, f"workdir {path} exists and is not a directory"):
        workdir_lib.check_workdir(str(path), tiny_config(), INPUT_SPEC)


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"tasks": {"a": {"name": "classification", "label": "colour", "num_classes": 10}}},
         ["config tasks.a.label='colour': dataset 'av_digits' has no such key"]),
        ({"tasks": {"a": {"name": "classification", "weight": -0.5}}}, ["tasks.<name>.weight.a=-0.5 is negative"]),
        ({"tasks": {"a": {"name": "classification", "weight": 0}, "b": {"name": "regression", "weight": 0.0}}},
         ["are all zero: nothing would be trained"]),
        ({"data.sources": {"x": {"target": "digit"}, "y": {"target": "value"}},
          "data.mixture": {"x": 1.0, "z": 1.0}},
         ["config data.mixture has a weight for 'z', which is not a source of data.sources: ['x', 'y']"]),
        ({"model.aux_heads": {"video": 0.5}},
         ["config model.aux_heads names 'video', which is not one of ['audio', 'image']"]),
        ({"model.aux_heads": {"audio": -1.0}}, ["model.aux_heads.audio=-1.0 is negative"]),
        ({"train.modulation": {"name": "ogm_ge", "alpha": -1}},
         ["config train.modulation.alpha=-1 must be a number > 0"]),
    ],
    ids=case_id,
)
def test_bad_multitask_mixture_and_remedy_configs_fail_before_compiling(av_digits_dir, changes, fragments):
    config = tiny_config(av_digits_dir, **{"checkpoint.best_metric": "validation/loss", "checkpoint.best_mode": "min"})
    for key, value in changes.items():
        _set(config, key, ml_collections.ConfigDict(value) if isinstance(value, dict) else value)
    with raises(ValueError, *fragments):
        setup_lib.setup(config)
