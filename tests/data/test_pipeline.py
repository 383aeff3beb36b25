"""The Grain pipeline: exact evaluation, shuffled resumable training stream, batch checks, global arrays."""

import dataclasses
import gc
import threading
import time

import jax
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data.core import Dataset
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


def test_in_memory_splits_give_the_batches_of_the_general_path_and_resume_across_them():
    """A cached split is batched by gathering shuffled indices: the same batches, keys and dtypes as batching
    example by example, and an iterator state saved by either pipeline restores into the other."""
    dataset = fake_dataset(37)
    cached = pipeline.cache_in_memory(dataset)
    assert isinstance(cached.source("train"), pipeline.InMemorySplit)
    make = lambda d: iter(pipeline.train_dataset(d, "train", global_batch_size=8, seed=5))  # noqa: E731
    general, fast = make(dataset), make(cached)
    for _ in range(12):  # Past the end of the first epoch (37 examples, 4 whole batches per epoch).
        want, got = next(general), next(fast)
        assert want.keys() == got.keys()
        for key in want:
            assert want[key].dtype == got[key].dtype
            np.testing.assert_array_equal(got[key], want[key])
    for saved_by, restored_into in ((general, make(cached)), (fast, make(dataset))):
        state = saved_by.get_state()
        expected = next(saved_by)
        restored_into.set_state(state)
        np.testing.assert_array_equal(next(restored_into)["x"], expected["x"])


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
        for example_id, draw in zip(batch["x"][:, 0].astype(int), batch["draw"], strict=True):
            draws.setdefault(example_id, []).append(int(draw))
    assert all(len(d) == 3 and len(set(d)) == 3 for d in draws.values())


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert sorted(g) == sorted(w), step
        for key in w:
            np.testing.assert_array_equal(np.asarray(g[key]), np.asarray(w[key]), err_msg=f"step {step} {key!r}")


def test_worker_processes_give_the_same_batches_and_resume():
    """num_workers=2 (Grain worker processes): the same augmented batches as in-process preprocessing, and a state
    saved from the worker pipeline restores into a fresh one."""
    dataset = dataclasses.replace(fake_dataset(16), augment=_draw)
    make = lambda workers: pipeline.train_dataset(  # noqa: E731
        dataset, "train", global_batch_size=8, seed=2, num_threads=1, num_workers=workers
    )
    reference = iter(make(0))
    expected = [next(reference) for _ in range(6)]  # Three epochs.
    workers = iter(make(2))
    try:
        got = [next(workers) for _ in range(3)]
        state = workers.get_state()
        got += [next(workers) for _ in range(3)]
    finally:
        workers.close()
    _assert_batches_equal(got, expected)
    resumed = iter(make(2))
    try:
        resumed.set_state(state)
        _assert_batches_equal([next(resumed) for _ in range(3)], expected[3:])
    finally:
        resumed.close()


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "mmjax-device-prefetch" and t.is_alive()]


def _to_device(sharding, spec):
    return pipeline.checked_to_global(spec, ["x", "label"], 8, sharding)


def test_device_prefetch_checkpoints_the_consumed_position_and_resumes_exactly(tmp_path):
    """Batches arrive on the devices in order; the checkpoint holds the position of the batches the step consumed
    (not of the prefetched ones), through the real Checkpointer (Grain's Orbax handler); a plain Grain iterator
    restores the same checkpoint (same file format)."""
    from mmjax.train.checkpoint import Checkpointer

    dataset = dataclasses.replace(fake_dataset(24), augment=_draw)
    make = lambda: iter(pipeline.train_dataset(dataset, "train", global_batch_size=8, seed=4))  # noqa: E731
    reference = make()
    states, expected = [], []
    for _ in range(7):
        expected.append(next(reference))
        states.append(reference.get_state())
    sharding = parallel.batch_sharding(parallel.make_mesh())
    spec = pipeline.input_spec(dataset, "train")
    state = {"w": jax.device_put(np.arange(4, dtype=np.float32), parallel.replicated(parallel.make_mesh()))}
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    checkpointer = Checkpointer(str(tmp_path), keep=2, best_metric=None)
    try:
        with pipeline.device_prefetch(make(), _to_device(sharding, spec), size=2) as prefetcher:
            got = [next(prefetcher) for _ in range(3)]
            deadline = time.monotonic() + 30
            while prefetcher.prefetched < 2 and time.monotonic() < deadline:  # The producer is 2 batches ahead ...
                time.sleep(0.01)
            assert prefetcher.prefetched == 2
            assert prefetcher.state == states[2]  # ... but the saved position is that of the consumed batches.
            checkpointer.save(3, state, prefetcher)
            checkpointer.wait()
            got += [next(prefetcher) for _ in range(2)]
        assert all(isinstance(v, jax.Array) and v.sharding == sharding for b in got for v in b.values())
        _assert_batches_equal(got, [{k: b[k] for k in ("x", "label")} for b in expected[:5]])
        assert not _prefetch_threads()
        with pipeline.device_prefetch(make(), _to_device(sharding, spec), size=2) as resumed:
            step, restored = checkpointer.restore_latest(abstract, resumed)
            assert step == 3
            np.testing.assert_array_equal(restored["w"], state["w"])
            _assert_batches_equal([next(resumed) for _ in range(4)],
                                  [{k: b[k] for k in ("x", "label")} for b in expected[3:]])
        plain = make()
        checkpointer.restore(3, abstract, plain)
        _assert_batches_equal([next(plain)], [expected[3]])
        plain.close()
    finally:
        checkpointer.close()


class _Failing:
    """A host iterator whose third batch fails (in the producer thread), with Grain's state protocol."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        if self.position == 3:
            raise ValueError("bad example 3")
        return {"x": np.full((8, 2), self.position, np.float32), "label": np.zeros(8, np.int32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_device_prefetch_propagates_errors_and_never_leaves_a_thread():
    sharding = parallel.batch_sharding(parallel.make_mesh())
    spec = {"x": ((2,), "float32"), "label": ((), "int32")}
    prefetcher = pipeline.device_prefetch(_Failing(), _to_device(sharding, spec), size=2)
    assert [float(next(prefetcher)["x"][0, 0]) for _ in range(2)] == [1.0, 2.0]
    with pytest.raises(ValueError, match="bad example 3"):
        next(prefetcher)
    with pytest.raises(ValueError, match="bad example 3"):  # It stays failed ...
        next(prefetcher)
    prefetcher.set_state({"position": 3})  # ... until moved to a new position (as a restore does).
    assert float(next(prefetcher)["x"][0, 0]) == 4.0
    assert prefetcher.state == {"position": 4}
    prefetcher.close()
    assert not _prefetch_threads()
    with pytest.raises(RuntimeError, match="closed"):
        next(prefetcher)

    # `to_device` errors too (here check_batch's: the spec wants 3 features).
    bad_spec = {"x": ((3,), "float32"), "label": ((), "int32")}
    with pipeline.device_prefetch(_Failing(), _to_device(sharding, bad_spec)) as prefetcher:
        with pytest.raises(ValueError, match=r"batch\['x'\] has shape \(8, 2\), expected \(8, 3\)"):
            next(prefetcher)

    # A consumer that stops early and never closes: the thread ends when the prefetcher is collected.
    abandoned = pipeline.device_prefetch(iter(pipeline.train_dataset(fake_dataset(16), "train", global_batch_size=8,
                                                                      seed=0)), lambda b: b, size=2)
    next(abandoned)
    assert len(_prefetch_threads()) == 1
    del abandoned
    gc.collect()
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match="size=0 must be a positive integer"):
        pipeline.device_prefetch(_Failing(), lambda b: b, size=0)


class _Slow:
    """A host iterator taking `seconds` per batch."""

    def __init__(self, seconds):
        self.seconds, self.position = seconds, 0

    def __next__(self):
        time.sleep(self.seconds)
        self.position += 1
        return {"x": np.full((8, 2), self.position, np.float32), "label": np.zeros(8, np.int32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_device_prefetch_measures_the_time_spent_waiting_for_input():
    identity = lambda b: b  # noqa: E731
    with pipeline.device_prefetch(_Slow(0.05), identity, size=2) as slow_input:
        for _ in range(6):
            next(slow_input)  # A step that takes no time: it waits for every batch.
        assert slow_input.take_wait_seconds() >= 6 * 0.05 * 0.9
        assert slow_input.take_wait_seconds() == 0.0  # Reset by the previous call.
    with pipeline.device_prefetch(_Slow(0.0), identity, size=2) as fast_input:
        next(fast_input)
        fast_input.take_wait_seconds()
        for _ in range(5):
            time.sleep(0.05)  # A 50 ms step; the next batch is ready when it ends.
            next(fast_input)
        assert fast_input.take_wait_seconds() < 5 * 0.05 / 2
        assert fast_input.wait_seconds >= 0.0
