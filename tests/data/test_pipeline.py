"""The Grain pipeline: exact evaluation, shuffled resumable training stream, batch checks, global arrays."""

import dataclasses

import jax
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data.datasets import Dataset
from mmjax.train import parallel


def _preprocess(example):
    return {"x": np.full((2,), example["id"], np.float32), "label": np.int32(example["id"] % 3)}


def fake_dataset(n):
    examples = [{"id": i} for i in range(n)]
    return Dataset(
        name="fake",
        source=lambda split: examples if split == "train" else [],
        preprocess=_preprocess,
        splits={"train": n, "empty": 0},
        num_classes=3,
        modalities=("x",),
    )


@pytest.mark.parametrize("n, batch_size", [(37, 16), (64, 16), (5, 16), (1, 8)])
def test_eval_batches_cover_every_example_exactly_once(n, batch_size):
    batches = list(pipeline.eval_batches(fake_dataset(n), "train", global_batch_size=batch_size))
    assert all(len(b[pipeline.VALID_KEY]) == batch_size for b in batches)
    ids = np.concatenate([b["x"][:, 0][b[pipeline.VALID_KEY] == 1] for b in batches])
    assert sorted(ids.astype(int).tolist()) == list(range(n))


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="split 'empty' is empty"):
        next(pipeline.eval_batches(fake_dataset(4), "empty", global_batch_size=8))
    with pytest.raises(ValueError, match="split 'empty' is empty"):
        pipeline.train_dataset(fake_dataset(4), "empty", global_batch_size=8, seed=0)


def test_train_stream_is_shuffled_per_epoch_and_resumes_exactly():
    ds = pipeline.train_dataset(fake_dataset(32), "train", global_batch_size=8, seed=3)
    iterator = iter(ds)
    first_epoch = np.concatenate([next(iterator)["x"][:, 0] for _ in range(4)])
    assert sorted(first_epoch.astype(int).tolist()) == list(range(32))
    assert first_epoch.astype(int).tolist() != list(range(32))
    state = iterator.get_state()
    expected = [next(iterator)["x"] for _ in range(5)]
    resumed = iter(pipeline.train_dataset(fake_dataset(32), "train", global_batch_size=8, seed=3))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["x"], want)
    second_epoch = np.concatenate([e[:, 0] for e in expected[:4]])
    assert second_epoch.tolist() != first_epoch.tolist()  # Reshuffled each epoch.


def test_check_batch_names_the_problem():
    spec = {"x": ((2,), "float32"), "label": ((), "int32")}
    good = {"x": np.zeros((4, 2), np.float32), "label": np.zeros(4, np.int32)}
    pipeline.check_batch(good, spec, 4)
    with pytest.raises(KeyError, match=r"missing key\(s\) \['x'\]"):
        pipeline.check_batch({"label": good["label"]}, spec, 4)
    with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(4, 3\), expected \(4, 2\)"):
        pipeline.check_batch(good | {"x": np.zeros((4, 3), np.float32)}, spec, 4)
    with pytest.raises(ValueError, match=r"batch\['label'\] has dtype float32, expected int32"):
        pipeline.check_batch(good | {"label": np.zeros(4, np.float32)}, spec, 4)


def test_global_batch_is_sharded_over_all_devices():
    mesh = parallel.make_mesh()
    batch = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
    arrays = pipeline.to_global(batch, parallel.batch_sharding(mesh))
    assert arrays["x"].shape == (8, 2)
    assert len(arrays["x"].addressable_shards) == jax.device_count() == 8
    np.testing.assert_array_equal(np.asarray(arrays["x"]), batch["x"])


def test_processes_hold_contiguous_rows_of_the_same_global_batches(monkeypatch):
    """With P processes, concatenating their local batches (in process order) gives the 1-process batch."""
    single = iter(pipeline.train_dataset(fake_dataset(40), "train", global_batch_size=8, seed=1))
    expected = [next(single)["x"] for _ in range(12)]  # Crosses several epochs.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    per_process = []
    for index in range(2):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        stream = iter(pipeline.train_dataset(fake_dataset(40), "train", global_batch_size=8, seed=1))
        per_process.append([next(stream)["x"] for _ in range(12)])
    for step, want in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([per_process[0][step], per_process[1][step]]), want)



def _draw(example, rng):
    return example | {"draw": rng.integers(0, 2**62)}


def test_augmentation_is_seeded_by_position_and_resumes_exactly():
    dataset = dataclasses.replace(fake_dataset(16), augment=_draw)
    assert set(pipeline.input_spec(dataset, "train")) == {"x", "label", "draw"}
    iterator = iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=5))
    first = [next(iterator) for _ in range(3)]
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=5))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["draw"], want["draw"])
    again = next(iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=5)))
    np.testing.assert_array_equal(again["draw"], first[0]["draw"])  # Same seed and position, same draw.
    other = next(iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=6)))
    assert not np.array_equal(np.sort(other["draw"]), np.sort(first[0]["draw"]))
    # Each example gets a new draw in each epoch (16 examples, batches of 8: epochs are batches 0-1, 2-3, 4-5).
    draws: dict[int, list[int]] = {}
    for batch in first + expected:
        for example_id, draw in zip(batch["x"][:, 0].astype(int), batch["draw"]):
            draws.setdefault(example_id, []).append(int(draw))
    assert all(len(d) == 3 and len(set(d)) == 3 for d in draws.values())
