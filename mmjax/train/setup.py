"""`setup(config)`: everything a run builds from its config before touching the workdir.

The config is validated first (each section by the module that owns it), then the dataset, model, task,
optimizer, evaluators and the abstract, sharded train state are built; nothing is compiled and no file is
written. `Setup` then gives the jitted train step, the jitted eval step and `evaluate(state, split)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import config as config_lib
from mmjax import reporting
from mmjax.checks import check_number, check_positive_int, check_strings, is_int
from mmjax.data import pipeline
from mmjax.data.core import Dataset
from mmjax.data.datasets import get_dataset
from mmjax.evaluate.evaluator import Evaluator, build_evaluators, evaluate
from mmjax.evaluate.outputs import jit_eval_step
from mmjax.nn.builder import build_model
from mmjax.nn.pretrained import check_init_from, init_from_source
from mmjax.registry import closest
from mmjax.tasks import Task, task_class, task_name
from mmjax.tasks.multitask import weighting
from mmjax.train import composition, optimizer, parallel
from mmjax.train.checkpoint import check_best_metric
from mmjax.train.compilation import OneShot
from mmjax.train.modulation import GradientModulation
from mmjax.train.state import TrainState
from mmjax.train.step import check_frozen, check_frozen_patterns, init_state, split_params, train_step

POSITIVE_KEYS = ("train.num_steps", "data.batch_size", "data.eval_batch_size", "train.log_every_steps",
                 "train.eval_every_steps", "checkpoint.every_steps", "checkpoint.keep")


def validate(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
    """Checks values that would otherwise fail late or silently (before any data is read or code compiled).

    `training=False` (loading a trained model, maybe on another machine) skips the checks that only matter for
    train steps: the train batch's divisibility by the device count and by `train.grad_accum_steps`.
    """
    for key in POSITIVE_KEYS:
        section, name = key.split(".")
        check_positive_int(config[section][name], key)
    if not is_int(config.get("seed", 0)):
        raise ValueError(f"config seed={config.seed!r} must be an integer")
    for key in ("num_threads", "num_workers"):
        check_number(config.data, f"data.{key}", low=0, integer=True)
    for key in ("data.name", "data.train_split"):
        section, name = key.split(".")
        if not isinstance(config[section].get(name), str) or not config[section].get(name):
            raise ValueError(f"config {key}={config[section].get(name)!r} must be a non-empty string")
    parallel.check_config(config.get("mesh"))
    accum = config.train.get("grad_accum_steps", 1)
    if not is_int(accum) or accum <= 0:
        raise ValueError(f"config train.grad_accum_steps={accum!r} must be a positive integer (1 = no accumulation)")
    entries = composition.validate(config)  # Several tasks, a mixture of datasets, the imbalance remedies.
    task = task_class(task_name(config.get("task")))
    if accum > 1 and not task.per_example_loss and entries is None:
        raise ValueError(
            f"config train.grad_accum_steps={accum} with task.name={task_name(config.get('task'))!r}: this loss "
            "couples the examples of a batch (in-batch negatives), so micro-batches would change the objective, "
            "not just its memory; use grad_accum_steps=1"
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
    optimizer.check_config(config.optimizer)
    check_frozen_patterns(config.train.get("frozen", ()))
    check_init_from(config.train.get("init_from"))
    splits = check_strings(config.eval.splits, "eval.splits", "('validation', 'test')")
    if entries is None:
        check_best_metric(config.checkpoint, splits, task_name(config.get("task")), task.metric_names)
    else:
        check_best_metric(config.checkpoint, splits, "multitask", composition.best_metric_names(entries))


def check_dataset(config: ml_collections.ConfigDict, dataset: Dataset, multitask: bool = False) -> None:
    """The config asks only for what the dataset has: modalities, label type, number of outputs, non-empty splits
    (a multi-task run's labels are checked per task, `composition.task_heads`).

    Every mismatch is found before the first is reported: one error lists them all, each with its fix, so a run
    stops once (an experiment's config used on another dataset, e.g. your own files, often needs several).
    """
    problems = []
    unknown = sorted(set(config.model.encoders) - set(dataset.modalities))
    if unknown:
        problems.append(
            f"config model.encoders names modality {unknown} but dataset {dataset.name!r} provides "
            f"{list(dataset.modalities)}"
        )
    name = task_name(config.get("task"))
    if not multitask and task_class(name).dataset_task != dataset.task:
        hint = ""
        if dataset.name == "files" and task_class(name).dataset_task == "contrastive":
            hint = ("; a paired dataset for clip / siglip / itm / caption is built from a manifest without a label "
                    "column, or with python -m mmjax.data.build --paired (labels kept as metadata and for zero-shot)")
        problems.append(f"config task.name={name!r} but dataset {dataset.name!r} provides {dataset.task!r} "
                        f"labels{hint}")
    # A text decoder's or a CTC head's outputs are the tokenizer's ids, not classes.
    class_head = config.model.get("name") not in ("captioner", "ctc")
    if not multitask and class_head and config.model.get("num_classes") != dataset.num_classes:
        problems.append(
            f"config model.num_classes={config.model.get('num_classes')!r} but dataset {dataset.name!r} has "
            f"{dataset.num_classes} {'outputs' if dataset.task == 'regression' else 'classes'} (set "
            f"--config.model.num_classes={dataset.num_classes})"
        )
    wanted = [("data.train_split", config.data.train_split), *(("eval.splits", k) for k in config.eval.splits)]
    evaluable = [k for k in config.eval.splits if dataset.splits.get(k)] or [
        k for k in ("validation", "test") if dataset.splits.get(k)]
    for where, key in wanted:
        if key not in dataset.splits:
            fix = (f" (e.g. --config.eval.splits={','.join(evaluable)})" if where == "eval.splits" and evaluable
                   else "")
            problems.append(
                f"split {key!r} is not in dataset {dataset.name!r} (config {where}); splits: "
                f"{sorted(dataset.splits)}.{closest(key, dataset.splits)}{fix}"
            )
        elif dataset.splits[key] == 0:
            problems.append(f"split {key!r} of dataset {dataset.name!r} is empty (config {where}): 0 examples")
    problems += _vocabulary_problems(config, dataset)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"the config does not fit dataset {dataset.name!r} in {len(problems)} ways:\n  "
                         + "\n  ".join(problems))


def _vocabulary_problems(config: ml_collections.ConfigDict, dataset: Dataset) -> list[str]:
    """A text encoder's (or a captioner's decoder's) embedding table must have a row for every token id of the
    dataset's tokenizer: an id past it would silently read another row (JAX clamps gathers), not fail."""
    text = dataset.inputs.get("text")
    tables = {"model.encoders.text": (config.model.get("encoders") or {}).get("text") or {}}
    if config.model.get("name") == "captioner":
        tables["model.decoder"] = config.model.get("decoder") or {}
    sizes = {key: table.get("vocab_size") for key, table in tables.items() if is_int(table.get("vocab_size"))}
    if text is None or not sizes:
        return []
    try:
        vocabulary = text.vocab_size()
    except (OSError, ValueError, ImportError):  # A tokenizer that cannot be read fails later, naming its file.
        return []
    return [f"config {key}.vocab_size={size} but the tokenizer of dataset {dataset.name!r} has {vocabulary} tokens: "
            f"ids >= {size} would read past the embedding table (set --config.{key}.vocab_size={vocabulary})"
            for key, size in sizes.items() if vocabulary is not None and vocabulary > size]


_DATASETS: dict[str, Dataset] = {}


def load_dataset(data_config: ml_collections.ConfigDict, wrap: Callable[[Dataset], Dataset] | None = None,
                 wrap_key: str = "") -> Dataset:
    """The dataset of `config.data`, built once per process (runs of a benchmark share its in-memory cache).

    `wrap` (e.g. the task-label checks of a multi-task run, `composition.load_dataset`) changes the dataset before
    it is cached; `wrap_key` names the change in the cache key."""
    key = json.dumps(config_lib.normalize(data_config.to_dict()), sort_keys=True) + wrap_key
    if key not in _DATASETS:
        dataset = get_dataset(data_config)
        if wrap is not None:
            dataset = wrap(dataset)
        _DATASETS[key] = pipeline.cache_in_memory(dataset) if data_config.cache_in_memory else dataset
    return _DATASETS[key]


def _load(config: ml_collections.ConfigDict, entries) -> Dataset:
    """The run's dataset: `load_dataset(config.data)`, or built by `composition` (task labels, mixtures)."""
    if entries is None and not (config.data.get("sources") or {}):
        return load_dataset(config.data)
    keys = sorted(config.model.encoders) + composition.label_keys(config, entries)
    return composition.load_dataset(config, entries, load_dataset, keys)


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config before touching the workdir: data, model, task, state layout."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh  # (data, fsdp) over all devices; see `parallel`.
    dataset: Dataset
    model: Any
    task: Task
    keys: list[str]  # Batch keys the model consumes (modalities, their masks, label).
    spec: dict
    tx: Any
    frozen: tuple[str, ...]
    init_fn: Any
    abstract_state: TrainState  # Shapes, dtypes and shardings of the state.
    state_sharding: Any  # TrainState of NamedShardings: params/opt_state split over "fsdp" (mesh.fsdp > 1).
    batch_sharding: Any
    replicated: Any
    evaluators: list[Evaluator] = dataclasses.field(default_factory=list)
    modulation: GradientModulation | None = None  # config.train.modulation (OGM-GE), see `mmjax.train.modulation`.
    workdir: str | None = None  # Set by the train loop: where evaluators may write samples (e.g. captions).

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
            penalty=optimizer.build_penalty(self.config.optimizer),  # L1 / L2 (none by default).
            modulation=self.modulation,  # OGM-GE (none by default).
        )
        return jax.jit(
            step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=0,
        )

    @functools.cached_property
    def eval_step_fn(self):
        """The jitted eval step: `(params, model_state, global batch) -> per-example outputs` (compiled once)."""
        return jit_eval_step(self.model, self.task, self.state_sharding, self.batch_sharding)

    @property
    def eval_keys(self) -> list[str]:
        """Batch keys evaluation feeds the model: the training keys plus the extra inputs a model encodes when
        present (e.g. `negatives`, hard-negative captions, for a two-tower model's binding evaluation)."""
        return self.keys + sorted(getattr(self.model, "aliases", None) or {})

    def evaluate(self, state: TrainState, split: str, batches=None) -> dict:
        """The configured evaluators' metrics of `state` over a whole split (or over the given host batches)."""
        return evaluate(self, state, split, self.evaluators, batches)

    def initial_state(self) -> TrainState:
        """A fresh state, created already sharded, with `train.init_from` subtrees replaced by pretrained weights
        (shapes must match exactly; the optimizer state is then re-initialised from them)."""
        state = OneShot(self.init_fn, out_shardings=self.state_sharding)(jax.random.PRNGKey(self.config.seed))
        init_from = self.config.train.get("init_from")
        if not init_from:
            return state
        params = jax.device_get(state.params)
        for subtree, source in sorted(dict(init_from).items()):
            params, note = init_from_source(params, subtree, source, self.config.data)
            reporting.console(f"initialised {subtree} from {source}{note}")
        params = jax.device_put(params, self.state_sharding.params)
        trainable, _ = split_params(params, self.frozen)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_sharding.opt_state)(trainable)
        return state.replace(params=params, opt_state=opt_state)


def setup(config: ml_collections.ConfigDict, *, training: bool = True) -> Setup:
    """Validates `config` and builds the dataset, model, task, optimizer, evaluators and the abstract state.

    The mesh is `(data, fsdp)` with `config.mesh.fsdp` (default 1: data parallelism, everything replicated);
    large params and optimizer-state leaves are split over "fsdp" (`parallel.state_shardings`), and since
    `initial_state` initialises with `out_shardings=state_sharding` they are created split. `training=False`:
    see `validate`.
    """
    validate(config, training=training)
    mesh_config = config.get("mesh") or {}
    mesh = parallel.make_mesh(mesh_config.get("fsdp", 1))
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    entries = composition.validate(config)
    dataset = _load(config, entries)
    check_dataset(config, dataset, multitask=entries is not None)
    full_spec = pipeline.input_spec(dataset, config.data.train_split)
    modulation = composition.modulation(config, entries)
    if entries is None and modulation is None and not config.model.get("aux_heads"):
        model = build_model(config.model)  # The single-task model (exactly as without any composition).
        outputs, class_names = {}, {}
    else:
        heads, outputs, class_names = (composition.task_heads(config, entries, dataset, full_spec)
                                       if entries is not None else (None, {}, {}))
        model = build_model(config.model, task_heads=heads, unimodal_scores=modulation is not None,
                            learned_log_vars=entries is not None and weighting(config) == "uncertainty")
    task = composition.build_tasks(config, entries, dataset, outputs, class_names, modulation).with_mesh(mesh)
    keys = composition.input_keys(config, full_spec, entries)
    missing = sorted(k for k in keys if k not in full_spec)
    if missing:
        raise ValueError(f"dataset {dataset.name!r} has no {missing} (config task); its keys: {sorted(full_spec)}")
    extra = [k for k in getattr(model, "extra_inputs", ()) if k not in keys]  # E.g. a decoder's captions.
    missing = [k for k in extra if k not in full_spec]
    if missing:
        hint = ""
        if dataset.name == "files" and "text" in missing:
            hint = ("; a captioner's targets (captions, transcripts) are the manifest's text column: build the "
                    "dataset from a manifest with one (python -m mmjax.data.build, README \"Your own data\")")
        raise ValueError(f"model {config.model.get('name')!r} reads batch key(s) {missing} that dataset "
                         f"{dataset.name!r} does not provide (it has {sorted(full_spec)}){hint}")
    keys = keys + extra
    spec = {k: full_spec[k] for k in keys}
    frozen = tuple(config.train.get("frozen", ()))
    tx = optimizer.build_optimizer(config.optimizer, config.train.num_steps)
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
    s = Setup(config, mesh, dataset, model, task, keys, spec, tx, frozen, init_fn, abstract, state_sharding,
              batch_sharding, replicated, modulation=modulation)
    s.evaluators = build_evaluators(s)
    return s
