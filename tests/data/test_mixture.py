"""A weighted mixture of datasets (mmjax.data.pipeline.mixture): proportions, source tags, masked keys, resume."""

import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data.core import Dataset


def _with_digit(example):
    return {"x": np.full((2,), example["id"], np.float32), "digit": np.int32(example["id"] % 10)}


def _with_pair(example):
    pair = np.zeros(3, np.float32)
    pair[example["id"] % 3] = 1
    return {"x": np.full((2,), -example["id"], np.float32), "pair": pair}


def _dataset(name, n, preprocess):
    examples = [{"id": i + 1} for i in range(n)]
    return Dataset(name=name, source=lambda split: examples, preprocess=preprocess,
                   splits={"train": n, "test": n}, num_classes=10, modalities=("x",))


def _mixture(weights):
    datasets = {"a": _dataset("a", 40, _with_digit), "b": _dataset("b", 24, _with_pair)}
    return pipeline.mixture(datasets, weights, ["x", "digit", "pair"], "train")


def test_mixture_proportions_tags_and_masks():
    dataset = _mixture({"a": 0.75, "b": 0.25})
    stream = iter(pipeline.train_dataset(dataset, "train", global_batch_size=16, seed=1))
    batches = [next(stream) for _ in range(60)]
    source = np.concatenate([b[pipeline.SOURCE_KEY] for b in batches])
    assert abs(np.mean(source == 0) - 0.75) < 0.02  # 960 draws
    for batch in batches:
        a = batch[pipeline.SOURCE_KEY] == 0
        np.testing.assert_array_equal(batch["digit_mask"], a.astype(np.float32))
        np.testing.assert_array_equal(batch["pair_mask"], (~a).astype(np.float32))
        assert np.all(batch["x"][a, 0] > 0) and np.all(batch["x"][~a, 0] < 0)  # each row from its tagged source
        np.testing.assert_array_equal(batch["pair"][a], 0.0)  # placeholders, masked out
        np.testing.assert_array_equal(batch["pair"][~a].sum(-1), 1.0)
    # Every source is shuffled and cycled: all of b's examples come up.
    ids = -np.concatenate([b["x"][b[pipeline.SOURCE_KEY] == 1, 0] for b in batches])
    assert set(ids.astype(int)) == set(range(1, 25))


def test_mixture_resumes_exactly():
    dataset = _mixture({"a": 0.5, "b": 0.5})
    stream = iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=3))
    for _ in range(7):
        next(stream)
    state = stream.get_state()
    expected = [next(stream) for _ in range(10)]
    resumed = iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=3))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=4))
    assert not all(np.array_equal(next(other)["x"], e["x"]) for e in expected)


def test_mixture_evaluation_reads_every_example_of_every_source_once():
    dataset = _mixture({"a": 0.9, "b": 0.1})
    batches = list(pipeline.eval_batches(dataset, "test", global_batch_size=16))
    valid = np.concatenate([b[pipeline.VALID_KEY] for b in batches]) > 0
    x = np.concatenate([b["x"][:, 0] for b in batches])[valid]
    assert sorted(x.astype(int).tolist()) == sorted(list(range(1, 41)) + [-i for i in range(1, 25)])


@pytest.mark.parametrize("weights, message", [
    ({"a": 1.0, "c": 1.0}, "'c', which is not a source"),
    ({"a": 1.0}, "no weight for source"),
    ({"a": -1.0, "b": 1.0}, ">= 0"),
    ({"a": 0, "b": 0.0}, "all zero"),
])
def test_bad_mixture_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        _mixture(weights)
