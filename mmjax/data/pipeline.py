"""The input pipeline: Grain over a random-access source -> per-process batches -> global sharded jax.Arrays.

Every process reads only its own rows of each global batch (after one global shuffle), so the global batch of
step k holds the same examples in the same order whatever the number of processes or devices. The training
iterator's position is checkpointed (Grain `get_state`/`set_state`), so a resumed run sees exactly the batches it would
have seen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np

from mmjax.data.datasets import Dataset

VALID_KEY = "_valid"  # 1 for real examples, 0 for padding added to complete the last evaluation batch.

Batch = dict[str, np.ndarray]
InputSpec = dict[str, tuple[tuple[int, ...], str]]


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of the global batch; the global batch must divide evenly."""
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the number of processes {processes}")
    return global_batch_size // processes


class InMemorySplit:
    """A split preprocessed once and held as stacked numpy arrays (random access, picklable).

    For small datasets, where reading and preprocessing each example every epoch would cost more than the
    training step itself. Preprocessing must be deterministic (augmentations belong after the cache).
    """

    def __init__(self, source, preprocess):
        if len(source) == 0:
            self.arrays: dict[str, np.ndarray] = {}
            return
        examples = [preprocess(source[i]) for i in range(len(source))]
        self.arrays = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def __getitem__(self, index: int) -> Batch:
        return {k: v[index] for k, v in self.arrays.items()}


def _identity(example):
    return example


def cache_in_memory(dataset: Dataset) -> Dataset:
    """The same dataset with every split preprocessed on first use and served from memory."""
    splits: dict[str, InMemorySplit] = {}

    def source(split: str) -> InMemorySplit:
        if split not in splits:
            splits[split] = InMemorySplit(dataset.source(split), dataset.preprocess)
        return splits[split]

    return dataclasses.replace(dataset, source=source, preprocess=_identity)


def train_dataset(
    dataset: Dataset, split: str, *, global_batch_size: int, seed: int, num_threads: int = 2, num_workers: int = 0
) -> grain.IterDataset:
    """An infinite, shuffled (reshuffled each epoch), batched stream of this process's shard of `split`."""
    source = dataset.source(split)
    if len(source) == 0:
        raise ValueError(f"dataset {dataset.name!r} split {split!r} is empty")
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).map(dataset.preprocess)
    if dataset.augment is not None:  # Seeded by (seed, position in the stream): resumes reproduce it.
        ds = ds.random_map(dataset.augment)
    # Global batch k is elements [k*B, (k+1)*B) of the shuffled stream; process p holds the contiguous rows
    # [p*L, (p+1)*L) of it (L = B / processes), matching its devices' place in the mesh. Only those rows are read.
    ds = ds.batch(local_batch_size(global_batch_size), drop_remainder=True)
    ds = ds[jax.process_index() :: jax.process_count()]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
    if num_workers > 0:
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter_ds


def _pad(batch: Batch, size: int) -> Batch:
    """Pads a short batch to `size` rows by repeating its first row; VALID_KEY marks the padding."""
    rows = len(batch[VALID_KEY])
    if rows == size:
        return batch
    return {k: np.concatenate([v, np.repeat(v[:1], size - rows, axis=0)]) for k, v in batch.items()} | {
        VALID_KEY: np.concatenate([batch[VALID_KEY], np.zeros(size - rows, np.int32)])
    }


def eval_batches(
    dataset: Dataset, split: str, *, global_batch_size: int, num_threads: int = 2
) -> Iterator[Batch]:
    """Every example of `split` exactly once, in process-local batches padded to a fixed size.

    All processes yield the same number of batches (a collective runs per batch); padded rows have
    `batch[VALID_KEY] == 0` and must be left out of every metric.
    """
    source = dataset.source(split)
    total = len(source)
    if total == 0:
        raise ValueError(f"dataset {dataset.name!r} split {split!r} is empty")
    local = local_batch_size(global_batch_size)
    per_process = math.ceil(total / jax.process_count())
    start = min(total, jax.process_index() * per_process)
    stop = min(total, start + per_process)
    num_batches = math.ceil(per_process / local)

    def with_valid(example: Mapping[str, Any]) -> Batch:
        return dict(dataset.preprocess(example)) | {VALID_KEY: np.int32(1)}

    yielded = 0
    if stop > start:
        ds = grain.MapDataset.source(source)[start:stop].map(with_valid).batch(local, drop_remainder=False)
        for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)):
            yield _pad(batch, local)
            yielded += 1
        template = batch
    else:  # This process holds no examples of a tiny split; it still joins every collective.
        template = {k: v[None] for k, v in with_valid(source[0]).items()}
    while yielded < num_batches:
        empty = {k: np.repeat(v[:1], local, axis=0) for k, v in template.items()}
        empty[VALID_KEY] = np.zeros(local, np.int32)
        yield empty
        yielded += 1


def input_spec(dataset: Dataset, split: str) -> InputSpec:
    """Shapes (without the batch axis) and dtypes of one training example (preprocessed and augmented): what the
    model is built for."""
    example = dataset.preprocess(dataset.source(split)[0])
    if dataset.augment is not None:
        example = dataset.augment(example, np.random.default_rng(0))
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in example.items()}


def check_batch(batch: Mapping[str, np.ndarray], spec: InputSpec, batch_size: int) -> None:
    """Raises a clear error when a host batch does not match the spec the model was built for."""
    missing = sorted(set(spec) - set(batch))
    if missing:
        raise KeyError(f"batch is missing key(s) {missing}; expected {sorted(spec)}, got {sorted(batch)}")
    for key, (shape, dtype) in spec.items():
        value = np.asarray(batch[key])
        expected = (batch_size, *shape)
        if value.shape != expected:
            raise ValueError(f"batch[{key!r}] has shape {value.shape}, expected {expected}")
        if str(value.dtype) != dtype:
            raise ValueError(f"batch[{key!r}] has dtype {value.dtype}, expected {dtype}")


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles process-local numpy batches into global jax.Arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
