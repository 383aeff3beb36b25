"""What `setup` builds beyond one dataset, one head and one task: several tasks (`config.tasks`), several datasets
(`config.data.sources` mixed by `config.data.mixture`) and the modality-imbalance remedies (`config.model.aux_heads`,
`config.train.modulation`).

Every option is checked before any data is read (`validate`), then against the data (`load_dataset`,
`task_heads`): a task label the data lacks, a label of the wrong kind, weights that are negative or all zero, a
mixture weight for an unknown source, an auxiliary head on a modality without an encoder all fail here, naming
the key, before anything is compiled. A config without these keys builds exactly what it always did.

    config.tasks = {"digit": {"name": "classification", "label": "digit", "weight": 1.0},
                    "value": {"name": "regression", "label": "value", "weight": 0.1}}
    config.multitask = {"weighting": "uncertainty"}              # or "fixed" (default)
    config.data.sources = {"pairs": {"target": "digit_pair"}, "av": {"target": "digit,value"}}
    config.data.mixture = {"pairs": 0.5, "av": 0.5}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections
import numpy as np

from mmjax.data import pipeline
from mmjax.data.core import Dataset, frame_mask_key, mask_key
from mmjax.tasks import Task, build_task
from mmjax.tasks.multitask import (
    MAPPINGS,
    TaskEntry,
    UnimodalAuxiliary,
    build_multitask,
    check_weights,
    is_multitask,
    metric_names,
    parse_tasks,
    weighting,
)
from mmjax.train.modulation import GradientModulation, build_modulation

MIXTURE_KEYS = ("sources", "mixture")  # Keys of config.data that describe a mixture, not one dataset.


def validate(config: ml_collections.ConfigDict) -> dict[str, TaskEntry] | None:
    """Checks the multi-task, mixture and remedy options (no data read); returns the checked task entries (None
    for a single task)."""
    entries = parse_tasks(config.tasks) if is_multitask(config) else None
    if entries is not None:
        weighting(config)
    model = config.get("model") or {}
    aux = model.get("aux_heads") or {}
    if aux:
        if entries is not None:
            raise ValueError("config model.aux_heads balance the modalities of one task; with several tasks (config "
                             "tasks) they are not supported")
        check_weights(aux, "model.aux_heads", names=sorted(model.get("encoders") or {}))
    fused = model.get("fused_weight", 1.0)
    if isinstance(fused, bool) or not isinstance(fused, (int, float)) or not np.isfinite(fused) or fused < 0:
        raise ValueError(f"config model.fused_weight={fused!r} must be a finite number >= 0")
    modulation(config, entries)
    sources = (config.get("data") or {}).get("sources") or {}
    if sources:
        if not isinstance(sources, MAPPINGS) or not all(isinstance(v, MAPPINGS) for v in sources.values()):
            raise ValueError(f"config data.sources={sources!r} must map source names to dicts of data.* overrides")
        pipeline.check_mixture_weights(config.data.get("mixture") or {}, sorted(sources))
    elif config.get("data") and config.data.get("mixture"):
        raise ValueError(f"config data.mixture={config.data.mixture!r} weighs data sources, but data.sources is "
                         "empty; name the sources there")
    return entries


def modulation(config: ml_collections.ConfigDict, entries: Mapping | None = None) -> GradientModulation | None:
    """`config.train.modulation` (OGM / OGM-GE), checked; None when absent or empty."""
    options = (config.get("train") or {}).get("modulation") or {}
    if not options:
        return None
    if entries is not None:
        raise ValueError("config train.modulation balances the modalities of one task; with several tasks (config "
                         "tasks) it is not supported")
    task = (config.get("task") or {}).get("name", "classification")
    return build_modulation(options, sorted(config.model.encoders), task)


def source_configs(data_config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict] | None:
    """The data config of each mixture source (`data.*` with the source's overrides), None without sources."""
    sources = data_config.get("sources") or {}
    if not sources:
        return None
    base = {k: v for k, v in data_config.to_dict().items() if k not in MIXTURE_KEYS}
    return {name: ml_collections.ConfigDict({**base, **dict(sources[name])}) for name in sorted(sources)}


def label_outputs(entry: TaskEntry, shape: tuple[int, ...], dtype: str, dataset: Dataset) -> int:
    """The number of outputs of `entry`'s head, from its label's shape (and `num_classes` where it must be given);
    a label of the wrong kind is named."""
    where = f"tasks.{entry.name}"
    given = entry.num_classes
    if entry.kind == "classification":
        if shape != () or np.dtype(dtype).kind not in "iu":
            raise ValueError(f"config {where}.label={entry.label!r}: a classification task needs one integer class id "
                             f"per example, but the data's {entry.label!r} has shape {shape} and dtype {dtype}")
        if given is None and entry.label == "label" and dataset.task == "classification":
            return dataset.num_classes
        if given is None:
            raise ValueError(f"config {where}.num_classes is needed: the number of classes of label "
                             f"{entry.label!r} cannot be read from its shape")
        return given
    outputs = int(np.prod(shape)) if shape else 1
    if entry.kind == "multilabel" and len(shape) != 1:
        raise ValueError(f"config {where}.label={entry.label!r}: a multilabel task needs multi-hot labels [K], but "
                         f"the data's {entry.label!r} has shape {shape}")
    if len(shape) > 1:
        raise ValueError(f"config {where}.label={entry.label!r}: a regression target is a number or a vector [K], "
                         f"but the data's {entry.label!r} has shape {shape}")
    if given is not None and given != outputs:
        raise ValueError(f"config {where}.num_classes={given} but label {entry.label!r} has {outputs} value(s) "
                         f"(shape {shape})")
    return outputs


def _label_checks(entries: Mapping[str, TaskEntry], spec: Mapping, dataset: Dataset) -> list[tuple[str, str, int]]:
    checks = []
    for entry in entries.values():
        if entry.label in spec:
            shape, dtype = spec[entry.label]
            checks.append((entry.label, entry.kind, label_outputs(entry, tuple(shape), dtype, dataset)))
    return sorted(set(checks))


def load_dataset(config: ml_collections.ConfigDict, entries: Mapping[str, TaskEntry] | None,
                 load: Callable[..., Dataset], keys: list[str]) -> Dataset:
    """The run's dataset: one, or the weighted mixture of `config.data.sources`, with every task label checked when
    read. `load(data_config, wrap, wrap_key)` is `setup.load_dataset` (built once per process, cached in memory);
    `keys` are the modality and label keys a mixture keeps."""
    wanted = [] if entries is None else sorted((e.label, e.kind, e.num_classes) for e in entries.values())

    def one(data_config: ml_collections.ConfigDict) -> Dataset:
        if entries is None:
            return load(data_config)

        def checked(dataset: Dataset) -> Dataset:
            spec = pipeline.input_spec(dataset, data_config.train_split)
            return pipeline.check_task_labels(dataset, _label_checks(entries, spec, dataset))

        return load(data_config, checked, f"|labels {wanted}")

    configs = source_configs(config.data)
    if configs is None:
        return one(config.data)
    datasets = {name: one(c) for name, c in configs.items()}
    if entries is None:
        lacking = [n for n, d in datasets.items() if "label" not in pipeline.input_spec(d, config.data.train_split)]
        if lacking:
            raise ValueError(f"data source(s) {lacking} have no 'label' for config task; name per-source labels in "
                             "config tasks (missing ones are masked out of the loss)")
    return pipeline.mixture(datasets, config.data.mixture, keys, config.data.train_split)


def label_keys(config: ml_collections.ConfigDict, entries: Mapping[str, TaskEntry] | None) -> list[str]:
    """The label keys the run's tasks read."""
    return ["label"] if entries is None else sorted({e.label for e in entries.values()})


def task_heads(config: ml_collections.ConfigDict, entries: Mapping[str, TaskEntry], dataset: Dataset,
               spec: Mapping) -> tuple[dict[str, tuple[dict, int]], dict[str, int], dict[str, tuple]]:
    """Each task's head config and outputs, after checking its label against the data: `(heads, outputs, class
    names)`. The head is the task's `head`, else `model.head` (a regressor for a regression task)."""
    heads, outputs, names = {}, {}, {}
    for name, entry in entries.items():
        if entry.label not in spec:
            keys = sorted(k for k in spec if not k.endswith("_mask"))
            raise ValueError(f"config tasks.{name}.label={entry.label!r}: dataset {dataset.name!r} has no such key; "
                             f"its keys: {keys}")
        shape, dtype = spec[entry.label]
        outputs[name] = label_outputs(entry, tuple(shape), dtype, dataset)
        if entry.head is not None:
            head = dict(entry.head)
        else:
            head = dict(config.model.head)
            if entry.kind == "regression" and head.get("name") == "classifier":
                head["name"] = "regressor"
        heads[name] = (head, outputs[name])
        if entry.label == "label" and len(dataset.class_names) == outputs[name]:
            names[name] = tuple(dataset.class_names)
    return heads, outputs, names


def input_keys(config: ml_collections.ConfigDict, spec: Mapping, entries: Mapping[str, TaskEntry] | None) -> list[str]:
    """Batch keys the model and task consume: modalities, their masks (and frame masks: padded speech), the labels
    and their masks."""
    modalities = sorted(config.model.encoders)
    keys = modalities + [mask_key(m) for m in modalities if mask_key(m) in spec]
    keys += [frame_mask_key(m) for m in modalities if frame_mask_key(m) in spec]
    labels = label_keys(config, entries)
    return keys + labels + [mask_key(k) for k in labels if mask_key(k) in spec and mask_key(k) not in keys]


def wrap_task(config: ml_collections.ConfigDict, task: Task, modulation_: GradientModulation | None) -> Task:
    """The task of a model with auxiliary heads or unimodal scores (`UnimodalAuxiliary`), else `task` itself."""
    aux = dict(config.model.get("aux_heads") or {})
    if not aux and modulation_ is None:
        return task
    return UnimodalAuxiliary(num_classes=task.num_classes, class_names=task.class_names, task=task,
                             weights={m: float(w) for m, w in aux.items()},
                             fused_weight=float(config.model.get("fused_weight", 1.0)))


def build_tasks(config: ml_collections.ConfigDict, entries: Mapping[str, TaskEntry] | None, dataset: Dataset,
                outputs: Mapping[str, int], class_names: Mapping[str, tuple],
                modulation_: GradientModulation | None) -> Task:
    """The run's task: the single `config.task` (wrapped for remedies) or the `MultiTask` of `config.tasks`."""
    if entries is None:
        task = build_task(config.get("task"), config.model.num_classes, dataset.class_names)
        return wrap_task(config, task, modulation_)
    return build_multitask(entries, outputs, class_names, weighting(config))


def best_metric_names(entries: Mapping[str, TaskEntry] | None) -> tuple[str, ...] | None:
    """The metric names a multi-task run reports (None for a single task: its class says)."""
    return None if entries is None else metric_names(entries)
