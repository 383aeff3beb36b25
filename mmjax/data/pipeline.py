"""The input pipeline: Grain over a random-access source -> per-process batches -> global sharded jax.Arrays.

Every process reads only its own rows of each global batch (after one global shuffle), so the global batch of
step k holds the same examples in the same order whatever the number of processes or devices. The training
iterator's position is checkpointed (Grain `get_state`/`set_state`), so a resumed run sees exactly the batches it would
have seen; `device_prefetch` transfers the next batches to the devices in the background while keeping that position
exact. Examples missing an optional modality get a zero placeholder and `<modality>_mask` = 0 (`example_fn`).

Several datasets in one run (`mixture`): the training stream draws from each source in proportion to its weight
(Grain's deterministic weighted interleaving of per-source shuffled streams, so the mixture's position is the
stream's position and resumes exactly); evaluation reads every example of every source once. Each example is
tagged with its source (`source`, the index in sorted source names), and a key some source lacks (a label, a
modality) gets a zero placeholder and `<key>_mask` = 0 there, which the tasks and fusions honour.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from mmjax.data.core import VALID_KEY, Dataset, check_label, identity, is_int, mask_key

Batch = dict[str, np.ndarray]
InputSpec = dict[str, tuple[tuple[int, ...], str]]
SOURCE_KEY = "source"  # int32 index (sorted source names) of the dataset a mixture's example comes from.


@dataclasses.dataclass(frozen=True)
class CompleteExample:
    """`preprocess` followed by filling the optional modalities an example lacks (picklable for Grain workers).

    For each optional modality: a missing key or `None` becomes zeros of the declared shape and dtype with
    `<modality>_mask` = 0.0; a present value must have that shape and dtype and gets mask 1.0. A mask already in
    the example is kept, so completing twice (e.g. after the in-memory cache) changes nothing.
    """

    preprocess: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    optional: Mapping[str, tuple[tuple[int, ...], str]]
    required: tuple[str, ...] = ()

    def __call__(self, example: Mapping[str, Any]) -> Batch:
        out = dict(self.preprocess(example))
        for modality in self.required:
            if modality in out and out[modality] is None:
                raise ValueError(
                    f"example has modality {modality!r} = None, but it is not one of the dataset's "
                    f"optional_modalities {sorted(self.optional)}; declare its (shape, dtype) there to allow that"
                )
        for modality, (shape, dtype) in self.optional.items():
            value = out.get(modality)
            key = mask_key(modality)
            if value is None:
                out[modality], out[key] = np.zeros(shape, dtype), np.float32(0.0)
                continue
            value = np.asarray(value)
            if value.shape != shape or str(value.dtype) != dtype:
                raise ValueError(
                    f"example[{modality!r}] has shape {value.shape} and dtype {value.dtype}, but the dataset "
                    f"declares optional_modalities[{modality!r}] = ({shape}, {dtype!r})"
                )
            out[modality] = value
            out[key] = np.float32(1.0 if out.get(key) is None else out[key])
        return out


def example_fn(dataset: Dataset) -> Callable[[Mapping[str, Any]], Batch]:
    """The function turning a raw example into complete model inputs: `preprocess`, plus placeholders and masks
    when the dataset has optional modalities (so every example, hence every batch, has the same keys)."""
    if not dataset.optional_modalities:
        return dataset.preprocess
    required = tuple(m for m in dataset.modalities if m not in dataset.optional_modalities)
    return CompleteExample(dataset.preprocess, dict(dataset.optional_modalities), required)


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

    def take(self, indices: np.ndarray) -> Batch:
        """The examples at `indices` as one batch: what batching `self[i]` for each index gives, in one gather."""
        return {k: v[indices] for k, v in self.arrays.items()}


def cache_in_memory(dataset: Dataset) -> Dataset:
    """The same dataset with every split preprocessed on first use and served from memory."""
    splits: dict[str, InMemorySplit] = {}

    def source(split: str) -> InMemorySplit:
        if split not in splits:
            splits[split] = InMemorySplit(dataset.source(split), example_fn(dataset))
        return splits[split]

    return dataclasses.replace(dataset, source=source, preprocess=identity)


@dataclasses.dataclass(frozen=True)
class CheckedTaskLabels:
    """`preprocess`, then a host check of each task label an example has (`mmjax.data.core.check_label`), for
    multi-task models whose labels live under several keys (picklable, for Grain workers)."""

    preprocess: Callable[[Mapping[str, Any]], Batch]
    dataset: str
    labels: tuple[tuple[str, str, int], ...]  # (batch key, task type, number of outputs)

    def __call__(self, example: Mapping[str, Any]) -> Batch:
        out = self.preprocess(example)
        for key, task, outputs in self.labels:
            if out.get(key) is not None:
                check_label(out[key], task, outputs, f"dataset {self.dataset!r} label {key!r}")
        return out


def check_task_labels(dataset: Dataset, labels: Sequence[tuple[str, str, int]]) -> Dataset:
    """The dataset with every example's task labels checked when read (before any in-memory cache)."""
    if not labels:
        return dataset
    return dataclasses.replace(dataset, preprocess=CheckedTaskLabels(dataset.preprocess, dataset.name,
                                                                     tuple(labels)))


@dataclasses.dataclass(frozen=True)
class MixtureExample:
    """One source's raw example -> a mixture example (picklable): the source's preprocessing, only the mixture's
    keys, a zero placeholder and `<key>_mask` = 0 for each key this source lacks, the source's own mask (or 1) for
    each masked key it has, and the `source` tag."""

    preprocess: Callable[[Mapping[str, Any]], Batch]
    keys: tuple[str, ...]
    missing: Mapping[str, tuple[tuple[int, ...], str]]
    masked: tuple[str, ...]
    index: int

    def __call__(self, example: Mapping[str, Any]) -> Batch:
        out = self.preprocess(example)
        result = {k: out[k] for k in self.keys}
        for key in self.masked:
            result[mask_key(key)] = np.float32(out.get(mask_key(key), 1.0))
        for key, (shape, dtype) in self.missing.items():
            result[key], result[mask_key(key)] = np.zeros(shape, dtype), np.float32(0.0)
        result[SOURCE_KEY] = np.int32(self.index)
        return result


class MixtureSplit:
    """One split of a mixture: the concatenation of its sources' splits (sorted source order) for random access and
    evaluation, and the per-source parts and weights the training stream mixes (`train_dataset`)."""

    def __init__(self, parts: Sequence[tuple[str, Any, MixtureExample]], weights: Mapping[str, float]):
        self.parts = list(parts)
        self.weights = dict(weights)
        self.offsets = np.cumsum([0] + [len(source) for _, source, _ in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Batch:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range [0, {len(self)})")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        _, source, complete = self.parts[part]
        return complete(source[index - int(self.offsets[part])])


def check_mixture_weights(weights: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    """`data.mixture` checked: one finite weight >= 0 per source, an unknown source named, not all zero."""
    if not isinstance(weights, (Mapping, ml_collections.ConfigDict)) or not weights:
        raise ValueError(f"config data.mixture={weights!r} must map each source of data.sources {sorted(names)} to "
                         "its weight, e.g. {'a': 0.5, 'b': 0.5}")
    for name, value in weights.items():
        if name not in names:
            raise ValueError(f"config data.mixture has a weight for {name!r}, which is not a source of "
                             f"data.sources: {sorted(names)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"config data.mixture.{name}={value!r} must be a finite number >= 0")
    lacking = sorted(set(names) - set(weights))
    if lacking:
        raise ValueError(f"config data.mixture has no weight for source(s) {lacking}; give every source of "
                         f"data.sources a weight")
    if not any(weights.values()):
        raise ValueError(f"config data.mixture={dict(weights)} are all zero: nothing would be drawn")
    return {k: float(v) for k, v in weights.items()}


def mixture(datasets: Mapping[str, Dataset], weights: Mapping[str, float], keys: Sequence[str],
            spec_split: str) -> Dataset:
    """A weighted mixture of `datasets` (module docstring) keeping `keys` (modalities and labels), as a `Dataset`.

    Every key must come from at least one source, with the same shape and dtype in each that has it; a key some
    sources lack gets placeholders and a `<key>_mask`. Splits are those every source has (sizes summed).
    Augmentations are not mixed: sources must have none.
    """
    names = sorted(datasets)
    weights = check_mixture_weights(weights, names)
    specs = {}
    for name in names:
        if datasets[name].augment is not None:
            raise ValueError(f"data source {name!r} ({datasets[name].name}) augments its examples; a mixture "
                             "draws preprocessed examples and cannot mix augmentations")
        specs[name] = input_spec(datasets[name], spec_split)
    union: InputSpec = {}
    for key in keys:
        having = {n: specs[n][key] for n in names if key in specs[n]}
        if not having:
            raise ValueError(f"no data source provides {key!r}; sources' keys: "
                             + "; ".join(f"{n}: {sorted(specs[n])}" for n in names))
        if len(set(having.values())) > 1:
            raise ValueError(f"data sources disagree on the shape/dtype of {key!r}: {having}")
        union[key] = next(iter(having.values()))
    masked = tuple(k for k in keys if any(k not in specs[n] or mask_key(k) in specs[n] for n in names))
    completions = {}
    for index, name in enumerate(names):
        own = tuple(k for k in keys if k in specs[name])
        completions[name] = MixtureExample(example_fn(datasets[name]), own,
                                           {k: union[k] for k in keys if k not in specs[name]},
                                           tuple(k for k in masked if k in specs[name]), index)
    splits = {split: sum(datasets[n].splits[split] for n in names)
              for split in datasets[names[0]].splits if all(split in datasets[n].splits for n in names)}
    first = datasets[names[0]]
    tasks = {datasets[n].task for n in names}

    def source(split: str) -> MixtureSplit:
        return MixtureSplit([(n, datasets[n].source(split), completions[n]) for n in names], weights)

    return Dataset(
        name="+".join(f"{n}:{datasets[n].name}" for n in names),
        source=source,
        preprocess=identity,
        splits=splits,
        num_classes=first.num_classes,
        modalities=tuple(sorted({m for n in names for m in datasets[n].modalities})),
        class_names=first.class_names,
        task=first.task if len(tasks) == 1 else "mixture",
    )


def _part_seed(seed: int, index: int) -> int:
    """A distinct shuffle seed per mixture source, derived from the run seed."""
    return int(np.random.SeedSequence((int(seed), int(index))).generate_state(1)[0])


def train_dataset(
    dataset: Dataset, split: str, *, global_batch_size: int, seed: int, num_threads: int = 2, num_workers: int = 0
) -> grain.IterDataset:
    """An infinite, shuffled (reshuffled each epoch), batched stream of this process's shard of `split`.

    `num_workers` > 0 preprocesses in that many Grain worker processes: the same batches as 0 (augmentations
    included); the iterator state then records each worker's position, so it restores into a pipeline with the
    same `num_workers`. The source, `preprocess` and `augment` must be picklable.

    A mixture's split (`MixtureSplit`) is drawn source by source: each source's examples are shuffled (each epoch
    anew, with its own seed) and repeated, and `grain.MapDataset.mix` interleaves the sources in proportion to
    their weights; the whole stream is still a map over stream positions, so its iterator state is one position.
    """
    source = dataset.source(split)
    if len(source) == 0:
        raise ValueError(f"dataset {dataset.name!r} split {split!r} is empty")
    batch = local_batch_size(global_batch_size)
    if isinstance(source, MixtureSplit):
        parts, weights = [], []
        for index, (name, part, complete) in enumerate(source.parts):
            if source.weights[name] <= 0:
                continue
            if len(part) == 0:
                raise ValueError(f"data source {name!r} split {split!r} is empty")
            parts.append(grain.MapDataset.source(part).seed(_part_seed(seed, index)).shuffle().repeat(None)
                         .map(complete))
            weights.append(source.weights[name])
        ds = grain.MapDataset.mix(parts, weights)
        ds = ds.batch(batch, drop_remainder=True)[jax.process_index() :: jax.process_count()]
    elif isinstance(source, InMemorySplit) and dataset.augment is None:
        # Examples already preprocessed in memory: shuffle and batch their indices (the same order as the general
        # path below: shuffling permutes positions) and gather each batch in one indexing, instead of handling
        # every example in Python. The batches are identical; only their assembly is faster.
        ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
        ds = ds.batch(batch, drop_remainder=True)[jax.process_index() :: jax.process_count()].map(source.take)
    else:
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).map(example_fn(dataset))
        if dataset.augment is not None:  # Seeded by (seed, position in the stream): resumes reproduce it.
            ds = ds.random_map(dataset.augment)
        # Global batch k is elements [k*B, (k+1)*B) of the shuffled stream; process p holds the contiguous rows
        # [p*L, (p+1)*L) of it (L = B / processes), matching its devices' place in the mesh. Only those are read.
        ds = ds.batch(batch, drop_remainder=True)[jax.process_index() :: jax.process_count()]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4))
    if num_workers > 0:
        _absl_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter_ds


def _absl_flags_parsed() -> None:
    """Marks absl flags parsed (their defaults) when no absl app parsed them: with JAX imported, Grain's
    `mp_prefetch` reads an absl flag and otherwise fails with UnparsedFlagAccessError (google/grain#1355,
    fixed after grain 0.2.18). Our command line is argparse, so nothing else parses absl flags."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


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

    preprocess = example_fn(dataset)

    def with_valid(example: Mapping[str, Any]) -> Batch:
        return dict(preprocess(example)) | {VALID_KEY: np.int32(1)}

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
    """Shapes (without the batch axis) and dtypes of one training example (preprocessed, completed with the
    optional modalities' placeholders and masks, and augmented): what the model is built for."""
    example = example_fn(dataset)(dataset.source(split)[0])
    if dataset.augment is not None:
        example = dataset.augment(example, np.random.default_rng(0))
    return {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in example.items()}


def _check_finite(key: str, value: np.ndarray) -> None:
    """NaN/Inf in a float array would silently turn the loss and every parameter into NaN: name the rows.

    One sum is the fast path (~0.1 ms per MB); only a non-finite sum (NaN/Inf, or an overflow) looks closer.
    """
    if value.size == 0 or not (value.dtype.kind == "f" or value.dtype.name == "bfloat16"):
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(value.sum(dtype=np.float32)):
            return
    bad = ~np.isfinite(value.astype(np.float32))
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0]).tolist()
        raise ValueError(
            f"batch[{key!r}] has {int(bad.sum())} non-finite value(s) (NaN/Inf) in row(s) {rows[:10]}"
            f"{' ...' if len(rows) > 10 else ''} of this batch; check the data and its preprocessing"
        )


def check_batch(batch: Mapping[str, np.ndarray], spec: InputSpec, batch_size: int) -> None:
    """Raises a clear error when a host batch does not match the spec the model was built for: a missing key,
    a shape or dtype other than the spec's, or NaN/Inf in a float array."""
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
        _check_finite(key, value)


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles process-local numpy batches into global jax.Arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def checked_to_global(
    spec: InputSpec, keys: Sequence[str], batch_size: int, sharding: jax.sharding.Sharding
) -> Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]]:
    """The per-batch work between the host iterator and the train step: `check_batch` against `spec` (with the
    process-local `batch_size`), keep `keys`, and `to_global`. Give it to `device_prefetch` as `to_device`."""
    keys = tuple(keys)

    def to_device(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        check_batch(batch, spec, batch_size)
        return to_global({k: batch[k] for k in keys}, sharding)

    return to_device


class _Failure:
    """An exception raised in the producer thread, carried to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()  # The host iterator is exhausted.


def _put(buffer: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Puts `item` unless `stop` is set first; returns whether it was put (never blocks past a stop)."""
    while not stop.is_set():
        try:
            buffer.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue  # Retry until there is room or the consumer stops us.
    return False


def _produce(iterator, to_device, buffer: queue.Queue, stop: threading.Event) -> None:
    """Producer thread: `(to_device(batch), iterator state after that batch)` items, then `_END` or a `_Failure`.

    It holds no reference to the `DevicePrefetcher`, so an abandoned prefetcher is garbage collected (and its
    finalizer stops this thread)."""
    try:
        while not stop.is_set():
            try:
                batch = next(iterator)
            except StopIteration:
                _put(buffer, _END, stop)
                return
            item = (to_device(batch), copy.deepcopy(iterator.get_state()))
            if not _put(buffer, item, stop):
                return
    except BaseException as error:  # noqa: BLE001 - everything reaches the consumer, which re-raises it.
        _put(buffer, _Failure(error), stop)


def _stop_thread(thread: threading.Thread | None, buffer: queue.Queue | None, stop: threading.Event,
                 timeout: float = 60.0) -> None:
    """Stops a producer: sets `stop`, empties the queue (dropping prefetched batches), joins the thread."""
    stop.set()
    if thread is None:
        return
    while True:
        while buffer is not None:
            try:
                buffer.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=0.05)
        timeout -= 0.05
        if not thread.is_alive():
            return
        if timeout <= 0:
            warnings.warn("device_prefetch: the producer thread is still inside the host iterator or the transfer "
                          "after 60 s; leaving it (a daemon thread) behind", RuntimeWarning, stacklevel=3)
            return


class DevicePrefetcher:
    """Iterator over device batches: a background thread keeps the next `size` host batches already transferred
    (`to_device(batch)`, e.g. `checked_to_global`) while the caller's step computes (at most `size` + 1 batches
    beyond the current one exist at a time: the queue's and the one the thread is transferring).

    * Exceptions from the host iterator or `to_device` are re-raised by `next()` (original type and traceback).
    * Checkpointing: the producer records the host iterator's `get_state()` after each batch, and `get_state()`
      returns the state after the last batch *returned by next()*, not after the prefetched ones. It follows the
      protocol of Grain's Orbax handler for non-dataset iterators (`get_state() -> bytes`, `set_state(bytes)`,
      `start_prefetch()`), so pass the prefetcher itself to `grain.checkpoint.CheckpointSave` / `CheckpointRestore`
      (`Checkpointer.save` / `restore_latest`). The bytes are `json.dumps(state, indent=4)`, exactly what the handler
      writes for a Grain `DatasetIterator`, so checkpoints of either restore into the other. `set_state` stops the
      thread, drops the prefetched batches and moves the host iterator; prefetching restarts on the next `next()`.
    * Input wait: `wait_seconds` is the total time `next()` spent blocked on the queue; `take_wait_seconds()` returns
      the time since its previous call (for the fraction of step time spent waiting for input).
    * `close()` (or the context manager, or garbage collection, or interpreter exit) stops the thread and closes the
      host iterator (Grain threads / worker processes). The thread starts on the first `next()` or `start_prefetch()`.
    """

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], to_device: Callable[[Any], Any], size: int = 2):
        if not is_int(size) or size < 1:
            raise ValueError(f"device_prefetch size={size!r} must be a positive integer (batches kept on device)")
        if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
            raise TypeError(
                f"device_prefetch needs a checkpointable iterator (get_state/set_state), got {type(iterator)}"
            )
        self._iterator = iterator
        self._to_device = to_device
        self.size = size
        self._state = copy.deepcopy(iterator.get_state())  # The position after the last consumed batch (none yet).
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._finalizer: weakref.finalize | None = None
        self._outcome: BaseException | None = None  # Set once the producer ended (StopIteration or its error).
        self._closed = False
        self.wait_seconds = 0.0
        self._taken = 0.0

    # Iteration.
    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise RuntimeError("next() on a closed DevicePrefetcher")
        if self._outcome is not None:
            raise self._outcome
        self.start_prefetch()
        start = time.perf_counter()
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._outcome = RuntimeError("device_prefetch: the producer thread ended without a result")
                    raise self._outcome from None
        self.wait_seconds += time.perf_counter() - start
        if item is _END:
            self._outcome = StopIteration()
            raise StopIteration
        if isinstance(item, _Failure):
            self._outcome = item.error
            raise item.error
        batch, self._state = item
        return batch

    @property
    def prefetched(self) -> int:
        """Batches transferred and waiting in the queue (0 before the thread starts): the prefetch depth."""
        return 0 if self._queue is None else self._queue.qsize()

    def take_wait_seconds(self) -> float:
        """Seconds `next()` spent waiting for input since the previous call (the first: since the start)."""
        waited, self._taken = self.wait_seconds - self._taken, self.wait_seconds
        return waited

    # Grain checkpoint protocol (see the class docstring).
    def get_state(self) -> bytes:
        """The host iterator's state after the last batch `next()` returned, as JSON bytes."""
        return json.dumps(self._state, indent=4).encode()

    @property
    def state(self) -> Any:
        """The same position as `get_state()`, as the host iterator's own state object (a dict for Grain)."""
        return copy.deepcopy(self._state)

    def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
        """Moves to a saved position: the next `next()` returns the batch after it (prefetched batches dropped)."""
        if isinstance(state, (bytes, str)):
            state = json.loads(state)
        self._shutdown()
        self._iterator.set_state(state)
        self._state = copy.deepcopy(self._iterator.get_state())
        self._outcome = None

    def start_prefetch(self) -> None:
        """Starts the producer thread if it is not running (Grain's checkpoint handler calls this after restore)."""
        if self._closed:
            raise RuntimeError("start_prefetch() on a closed DevicePrefetcher")
        if self._thread is not None or self._outcome is not None:
            return
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.size)
        self._thread = threading.Thread(
            target=_produce, args=(self._iterator, self._to_device, self._queue, self._stop),
            name="mmjax-device-prefetch", daemon=True,
        )
        # Stops the thread when the prefetcher is garbage collected or at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _stop_thread, self._thread, self._queue, self._stop)
        self._thread.start()

    def _shutdown(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # Runs `_stop_thread` once.
        self._thread, self._queue, self._finalizer = None, None, None

    def close(self) -> None:
        """Stops the producer thread (dropping prefetched batches) and closes the host iterator; idempotent."""
        if self._closed:
            return
        self._shutdown()
        self._closed = True
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def device_prefetch(
    iterator: Iterator[Mapping[str, np.ndarray]], to_device: Callable[[Any], Any], size: int = 2
) -> DevicePrefetcher:
    """`iterator`'s batches passed through `to_device` (e.g. `checked_to_global`) `size` batches ahead in a
    background thread; checkpoint the returned `DevicePrefetcher` instead of `iterator` (see its docstring)."""
    return DevicePrefetcher(iterator, to_device, size)
