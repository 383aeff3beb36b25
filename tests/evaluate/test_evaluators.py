"""The evaluator interface: evaluators by name from the config, their defaults and errors, and what each computes
on a real (untrained, tiny) AV-Digits model against an independent computation."""

import types

import jax
import ml_collections
import numpy as np
import pytest

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.data.core import VALID_KEY
from mmjax.evaluate import classical, robustness
from mmjax.evaluate import evaluator as evaluator_lib
from mmjax.evaluate.features import extract_features
from mmjax.train import setup as setup_lib
from tests.conftest import tiny_overrides


def _context(evaluators=(), prompts=None, model=None, task="classification"):
    """A stand-in for a run's setup with just what evaluator selection reads."""
    config = ml_collections.ConfigDict({"eval": {"splits": ("test",)}})
    if evaluators:
        config.eval.evaluators = tuple(evaluators)
    dataset = types.SimpleNamespace(name="toy", class_prompts=prompts)
    return types.SimpleNamespace(config=config, dataset=dataset, model=model or object(),
                                 task=types.SimpleNamespace(dataset_task=task))


class _Embedder:
    def embed(self, *args, **kwargs):
        raise AssertionError("not called while choosing evaluators")


def test_default_evaluators_follow_what_the_run_supports():
    names = lambda ctx: [type(e).__name__ for e in evaluator_lib.build_evaluators(ctx)]  # noqa: E731
    assert names(_context()) == ["SplitMetrics"]
    assert names(_context(prompts=np.zeros((2, 1, 4), np.int32))) == ["SplitMetrics"]  # No text tower.
    assert names(_context(prompts=np.zeros((2, 1, 4), np.int32), model=_Embedder(), task="contrastive")) == [
        "SplitMetrics", "ZeroShot"]


def test_named_evaluators_must_exist_and_support_the_run():
    with pytest.raises(ValueError, match="config eval.evaluators: unknown evaluator 'zero_sht'. Did you mean "
                                         "'zero_shot'"):
        evaluator_lib.build_evaluators(_context(["split_metrics", "zero_sht"]))
    with pytest.raises(ValueError, match="'zero_shot' cannot evaluate this run: dataset 'toy' has no class prompts"):
        evaluator_lib.build_evaluators(_context(["zero_shot"]))
    with pytest.raises(ValueError, match="'robustness' cannot evaluate this run: it scores class predictions"):
        evaluator_lib.build_evaluators(_context(["robustness"], task="contrastive"))


def test_evaluator_options_come_from_the_config_and_are_checked():
    ctx = _context(["robustness"])
    ctx.config.eval.robustness = {"levels": (0.0, 1.0), "seed": 3}
    (evaluator,) = evaluator_lib.build_evaluators(ctx)
    assert evaluator == robustness.Robustness(levels=(0.0, 1.0), seed=3)
    ctx.config.eval.robustness = {"level": (0.0, 1.0)}
    with pytest.raises(ValueError, match=r"config eval.robustness: unknown option\(s\) \['level'\]; valid: "
                                         r"\['levels', 'seed', 'metric'\]. Did you mean 'levels'"):
        evaluator_lib.build_evaluators(ctx)


@pytest.fixture(scope="module")
def tiny_run(av_digits_dir):
    """The tiny early-fusion AV-Digits setup and a fresh (untrained) state: the evaluators need no training."""
    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides(av_digits_dir))
    s = setup_lib.setup(config)
    return s, s.initial_state()


def test_split_metrics_are_the_task_metrics_of_the_model_outputs(tiny_run):
    s, state = tiny_run
    metrics = s.evaluate(state, "test")
    batches = list(pipeline.eval_batches(s.dataset, "test", global_batch_size=s.config.data.eval_batch_size))
    logits = np.concatenate([
        np.asarray(s.model.apply({"params": state.params, **state.model_state},
                                 {k: b[k] for k in s.keys if k != "label"}, train=False))[b[VALID_KEY] > 0]
        for b in batches])
    labels = np.concatenate([b["label"][b[VALID_KEY] > 0] for b in batches])
    assert metrics["num_examples"] == len(labels) == 360
    assert metrics["accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))


def test_features_come_from_each_encoder_without_knowing_parameter_names(tiny_run):
    s, state = tiny_run
    features, labels = extract_features(s, state, "test")
    assert sorted(features) == ["audio", "image"] and len(labels) == 360
    batches = list(pipeline.eval_batches(s.dataset, "test", global_batch_size=s.config.data.eval_batch_size))
    for modality, encoder in s.model.encoders.items():  # The encoder alone, on its own parameter subtree.
        variables = {"params": state.params[f"encoders_{modality}"]}
        expected = np.concatenate([
            np.asarray(encoder.apply(variables, b[modality], train=False).pooled)[b[VALID_KEY] > 0]
            for b in batches])
        np.testing.assert_allclose(features[modality], expected, rtol=1e-5, atol=1e-6)


def test_robustness_and_classical_evaluators_on_a_real_model(tiny_run):
    s, state = tiny_run
    clean = s.evaluate(state, "test")["accuracy"]
    result = robustness.Robustness(levels=(0.0, 1.0), seed=0)(s, state, "test", None)
    curve = result["robustness"]
    assert curve["clean"] == pytest.approx(clean)
    assert set(curve["noise"]) == {"audio", "image"} and curve["noise"]["audio"][0] == curve["clean"]
    assert result["robustness_audio"] == curve["relative_robustness"]["audio"]
    assert result["missing_image"] == curve["missing"]["image"]
    baselines = classical.ClassicalBaselines(classifiers=("random_forest",))(s, state, "test", None)
    train_f, train_y = extract_features(s, state, "train")
    test_f, test_y = extract_features(s, state, "test")
    expected = classical.classical_late_fusion(train_f, train_y, test_f, test_y, ("random_forest",), seed=0,
                                               num_classes=10)
    assert baselines["classical"] == expected
    assert baselines["classical_random_forest_vote_accuracy"] == expected["random_forest"]["vote"]["accuracy"]
    assert jax.device_count() == 8  # Everything above ran data-parallel on 8 devices.


def test_zero_shot_top_k_is_an_option_with_a_stable_metric_name():
    assert evaluator_lib.build_evaluator("zero_shot", {"top_k": 3}).top_k == 3
    with pytest.raises(ValueError, match="eval.zero_shot.top_k=0"):
        evaluator_lib.build_evaluator("zero_shot", {"top_k": 0})
