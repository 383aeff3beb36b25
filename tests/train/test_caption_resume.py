"""A generation run resumes exactly: the tiny captioner of `experiments.shapes_caption`, interrupted half-way and
resumed, ends with the parameters, optimizer state, logged metrics, final metrics and generated captions
(samples.jsonl) of the same run trained straight through, bit for bit.

Exercised on the way: the training stream's per-epoch caption draw (Grain-seeded augmentation, stopped mid-epoch),
decoder dropout keys, and the captioning evaluator's generation before and after the resume."""

import os

import ml_collections
import pytest

from experiments import shapes_caption
from mmjax import config as config_lib
from mmjax.data import shapes_captions
from mmjax.evaluate import captioning
from mmjax.train import loop, preemption
from tests.train.test_reliability import assert_identical, raw_state, records

SIZES = {"train": 48, "validation": 16, "test": 16, "test_seen": 8}
NUM_STEPS = 8  # Batches of 8: 6 steps an epoch, so the stop after step 4 falls mid-epoch.
STOP_AFTER = 4


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
    """What `python -m experiments.shapes_caption --config.variants=cross` trains, tiny, with decoder dropout:
    evaluations (with generation) at steps 3, 6 and 8, checkpoints every 5 steps and at each evaluation."""
    image = "{'name': 'vit', 'patch_size': 8, 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32}"
    values = {
        "data.data_dir": data_dir, "data.batch_size": 8, "data.eval_batch_size": 16, "model.encoders.image": image,
        "model.decoder.width": 16, "model.decoder.depth": 1, "model.decoder.num_heads": 2,
        "model.decoder.mlp_dim": 32, "train.num_steps": NUM_STEPS,
        "train.log_every_steps": 1, "train.eval_every_steps": 3, "checkpoint.every_steps": 5,
        "checkpoint.keep": 5, "optimizer.warmup_steps": 2, "eval.splits": "validation,test",
        "eval.captioning.grid": 0, "variants": "cross",
    }
    config = config_lib.apply_overrides(shapes_caption.get_config(), [f"{k}={v}" for k, v in values.items()])
    config.model.decoder.dropout = 0.1  # Not in the experiment's config (no dropout there): its keys must resume.
    variant = shapes_caption.VARIANTS["cross"](ml_collections.ConfigDict(config.to_dict()))
    variant.name = f"{config.name}/cross"
    return variant


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tfds"))
    shapes_captions.build(directory, sizes=SIZES)
    return directory


def samples(workdir: str) -> str:
    with open(os.path.join(workdir, captioning.SAMPLES_FILENAME)) as f:
        return f.read()


@pytest.mark.slow  # Three tiny runs, each compiling its train step, eval step and generation: ~1-3 min.
def test_an_interrupted_and_resumed_captioner_run_is_bit_identical(data_dir, tmp_path, monkeypatch):
    reference_dir, workdir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    reference = loop.run(tiny_config(data_dir), reference_dir)
    calls = {"n": 0}

    def stop_after_four_steps(self):
        calls["n"] += 1
        return calls["n"] == STOP_AFTER

    with monkeypatch.context() as patch:
        patch.setattr(preemption.StopRequest, "requested", stop_after_four_steps)
        stopped = loop.run(tiny_config(data_dir), workdir)
    assert stopped == {"preempted": True, "step": STOP_AFTER}
    resumed = loop.run(tiny_config(data_dir), workdir)
    assert resumed["resumed_from_step"] == STOP_AFTER and resumed["steps"] == NUM_STEPS

    assert_identical(raw_state(workdir, NUM_STEPS), raw_state(reference_dir, NUM_STEPS))  # Params, optimizer, rng.
    assert records(workdir) == records(reference_dir)  # Every logged train and evaluation record, timings aside.
    assert [r["loss"] for r in records(workdir) if r["split"] == "train"] and any(
        r["split"] == "test" and r["step"] == 3 for r in records(workdir))  # Evaluated before the stop too.
    assert resumed["splits"] == reference["splits"]
    assert {"bleu4", "cider", "caption_true"} <= set(resumed["splits"]["test"])
    assert samples(workdir) == samples(reference_dir)  # The same generated captions.
