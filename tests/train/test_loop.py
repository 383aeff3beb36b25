"""The trainer end to end on a tiny AV-Digits config: exact resume, safe workdirs, corrupt checkpoints, outputs."""

import json
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.train import loop, preemption
from tests.conftest import tiny_overrides


def tiny_config(data_dir, **extra):
    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides(data_dir, **extra))
    config.name = "tiny"
    return config


def final_params(workdir, step):
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return restored["params"]


def train_losses(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def assert_trees_identical(a, b):
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    return {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def uninterrupted(av_digits_dir, tmp_path_factory):
    """One complete tiny run, the reference for the resume tests."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    results = loop.run(tiny_config(av_digits_dir), workdir)
    return workdir, results


def test_run_writes_every_output(uninterrupted):
    workdir, results = uninterrupted
    for name in ("config.json", "model_inputs.json", "metrics.jsonl", "results.json", "curves.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "grad_norm", "examples_per_s"} <= set(records[0])
    test = results["splits"]["test"]
    # Exact over the whole split: 360 test examples, not a multiple of the eval batch (64).
    assert test["num_examples"] == 360
    assert sum(c["support"] for c in test["per_class"].values()) == 360
    assert np.sum(test["confusion_matrix"]) == 360
    assert 0.0 <= test["accuracy"] <= 1.0 and 0.0 <= test["macro_f1"] <= 1.0
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["splits"]["test"]["accuracy"] == test["accuracy"]
    saved_config = config_lib.normalize(config_lib.load(workdir).to_dict())
    assert saved_config == config_lib.normalize(tiny_config(saved_config["data"]["data_dir"]).to_dict())


def test_interrupted_and_resumed_run_is_bit_identical(uninterrupted, av_digits_dir, tmp_path, monkeypatch):
    reference_dir, reference = uninterrupted
    workdir = str(tmp_path)
    calls = {"n": 0}

    def stop_after_three_steps(self):
        calls["n"] += 1
        return calls["n"] == 3

    with monkeypatch.context() as patch:
        patch.setattr(preemption.StopRequest, "requested", stop_after_three_steps)
        stopped = loop.run(tiny_config(av_digits_dir), workdir)
    assert stopped == {"preempted": True, "step": 3}
    resumed = loop.run(tiny_config(av_digits_dir), workdir)
    assert resumed["resumed_from_step"] == 3
    assert_trees_identical(final_params(workdir, 6), final_params(reference_dir, 6))
    assert resumed["splits"]["test"] == reference["splits"]["test"]
    assert train_losses(workdir) == train_losses(reference_dir)


def test_corrupt_latest_checkpoint_falls_back_to_previous(uninterrupted, av_digits_dir, tmp_path):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    # Damage the newest step: truncate every file of its state.
    state_dir = os.path.join(workdir, "checkpoints", "6", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 3))
    with pytest.warns(RuntimeWarning, match="step 6 .* could not be restored"):
        results = loop.run(tiny_config(av_digits_dir), workdir)
    assert results["resumed_from_step"] == 4
    assert os.listdir(os.path.join(workdir, "checkpoints", "corrupt"))  # Kept, not deleted.
    assert_trees_identical(final_params(workdir, 6), final_params(reference_dir, 6))


@pytest.mark.parametrize(
    "override, difference",
    [
        ({"model.fusion.name": "late"}, "model.fusion: saved"),
        ({"data.audio.n_mels": 32}, r"model inputs: saved .*'audio': \[\[49, 40\]"),  # Same model, other shapes.
    ],
)
def test_workdir_of_another_model_is_refused_and_left_untouched(
    uninterrupted, av_digits_dir, tmp_path, override, difference
):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    before = sorted(os.path.relpath(os.path.join(r, f), workdir) for r, _, fs in os.walk(workdir) for f in fs)
    with pytest.raises(ValueError, match="different model(.|\n)*" + difference):
        loop.run(tiny_config(av_digits_dir, **override), workdir)
    after = sorted(os.path.relpath(os.path.join(r, f), workdir) for r, _, fs in os.walk(workdir) for f in fs)
    assert before == after
    assert config_lib.load(workdir).model.fusion.name == "concat"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"data.batch_size": 12}, "data.batch_size=12 must be a positive multiple of the device count 8"),
        ({"train.num_steps": 0}, "train.num_steps=0 must be a positive integer"),
        ({"model.num_classes": 7}, "num_classes=7 but dataset 'av_digits' has 10"),
        ({"model.encoders.image.name": "small_cnm"}, "unknown encoder 'small_cnm'. Did you mean 'small_cnn'"),
        ({"model.fusion.name": "lat"}, "unknown fusion 'lat'. Did you mean 'late'"),
        ({"data.name": "av_digit"}, "unknown dataset 'av_digit'. Did you mean 'av_digits'"),
        ({"data.train_split": "training"}, "split 'training' is not in dataset 'av_digits'"),
        ({"optimizer.name": "adam"}, "optimizer.name='adam'; valid: adamw, sgd"),
    ],
)
def test_bad_config_fails_before_training(av_digits_dir, tmp_path, override, message):
    with pytest.raises((ValueError, KeyError), match=message):
        loop.run(tiny_config(av_digits_dir, **override), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_unknown_modality_is_named(av_digits_dir, tmp_path):
    config = tiny_config(av_digits_dir)
    config.model.encoders.video = {"name": "small_cnn"}
    with pytest.raises(ValueError, match=r"modality \['video'\] but dataset 'av_digits' provides \['audio', 'image'\]"):
        loop.run(config, str(tmp_path))


def test_sgd_with_momentum_and_constant_schedule_train(av_digits_dir, tmp_path):
    config = tiny_config(av_digits_dir,
                         **{"optimizer.name": "sgd", "optimizer.schedule": "constant", "optimizer.lr": 0.05})
    results = loop.run(config, str(tmp_path))
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert np.all(np.isfinite(losses)) and results["steps"] == 6


def test_partial_checkpoint_write_is_ignored(uninterrupted, av_digits_dir, tmp_path):
    """A crash during a checkpoint write leaves only Orbax's temporary directory: it is never resumed from."""
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    os.rename(os.path.join(checkpoints, "6"), os.path.join(checkpoints, "6.orbax-checkpoint-tmp-1234567"))
    results = loop.run(tiny_config(av_digits_dir), workdir)
    assert results["resumed_from_step"] == 4
    assert_trees_identical(final_params(workdir, 6), final_params(reference_dir, 6))
