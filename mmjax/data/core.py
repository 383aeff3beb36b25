"""What every data module shares: the `Dataset` description, its checks, and the names of the batch format.

The leaf of `mmjax.data`: it imports only the standard library and numpy (JAX only inside
`build_on_process_zero`), so the dataset modules, the ops, the pipeline and code outside `mmjax.data` (training,
evaluation) can all import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CheckedLabels",
    "Dataset",
    "Example",
    "VALID_KEY",
    "build_on_process_zero",
    "check_dataset",
    "check_label",
    "identity",
    "is_int",
    "frame_mask_key",
    "mask_key",
    "positive_int",
]

Example = dict[str, np.ndarray]

VALID_KEY = "_valid"  # 1 for real examples, 0 for padding added to complete the last evaluation batch.


def mask_key(modality: str) -> str:
    """The key of the `[B]` float32 presence mask of `modality` (1.0 present, 0.0 missing)."""
    return f"{modality}_mask"


def frame_mask_key(modality: str) -> str:
    """The key of the `[B, T]` frame mask of a padded sequence `modality` (1.0 = a real frame, 0.0 = padding after
    the end), for datasets of variable-length examples padded to one length (speech: Spoken-Numbers). Models that
    read a modality's tokens honour it when the batch has it (`mmjax.nn.common.frames_to_token_mask`)."""
    return f"{modality}_frame_mask"


def is_int(value: Any) -> bool:
    """Whether `value` is an integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """`value` as an int; a ValueError naming `name` unless it is an integer > 0."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def identity(example):
    """The example unchanged: a picklable `preprocess` for data that needs none."""
    return example


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset ready for the pipeline.

    `source(split)` returns a random-access sequence of raw examples; `preprocess(example)` turns one into model
    inputs (one array per modality key plus `label`). `preprocess` must be picklable (Grain worker processes).
    `task` names the label type (see `mmjax.tasks`); `num_classes` is the number of outputs it needs.
    `augment(example, rng)` (training stream only, after `preprocess` and any in-memory cache) draws from the
    `numpy.random.Generator` that Grain seeds from the run's seed and the example's position in the stream, so a
    resumed run sees exactly the same augmented batches. It must be picklable too. `class_prompts` (image-text
    datasets) are the tokenised prompts per class that the zero-shot evaluator embeds with the text tower.

    `optional_modalities` maps each modality that some examples lack to the `(shape, dtype)` of its preprocessed
    array (no batch axis), e.g. `{"audio": ((49, 40), "float32")}`. `preprocess` may then return an example
    without that key (or with `None`); the pipeline fills zeros of that shape and adds `<modality>_mask` (float32
    1.0 present / 0.0 missing, which the fusion modules honour) to every example, so all batches have the same keys.

    `inputs` maps each modality to its evaluation preprocessing of ONE raw input (an image file's bytes, a
    waveform, a text): a `mmjax.data.raw_inputs.RawInput`. Prediction, search and export on your own files use it
    (a dataset without it can only be evaluated on its own splits).
    """

    name: str
    source: Callable[[str], Sequence[Mapping[str, Any]]]
    preprocess: Callable[[Mapping[str, Any]], Example]
    splits: Mapping[str, int]
    num_classes: int
    modalities: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    task: str = "classification"
    augment: Callable[[Example, np.random.Generator], Example] | None = None
    class_prompts: np.ndarray | None = None  # int32 [classes, templates, L] token ids, for zero-shot evaluation.
    optional_modalities: Mapping[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
    inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # modality -> RawInput (see above).

    def __post_init__(self):
        unknown = sorted(set(self.optional_modalities) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"dataset {self.name!r}: optional_modalities {unknown} are not among its modalities "
                f"{list(self.modalities)}"
            )
        specs = {}
        for modality, spec in self.optional_modalities.items():
            try:
                shape, dtype = spec
                specs[modality] = (tuple(int(d) for d in shape), str(np.dtype(dtype)))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"dataset {self.name!r}: optional_modalities[{modality!r}]={spec!r} must be (shape, dtype), "
                    f"e.g. ((49, 40), 'float32'): {error}"
                ) from None
        object.__setattr__(self, "optional_modalities", specs)  # Normalised: tuple shapes, dtype names.
        extra = sorted(set(self.inputs) - set(self.modalities))
        if extra:
            raise ValueError(f"dataset {self.name!r}: inputs {extra} are not among its modalities "
                             f"{list(self.modalities)}")


def build_on_process_zero(build: Callable[[], Any]) -> Any:
    """Runs an offline dataset build on process 0 first, then on the others (which then find it built)."""
    import jax  # Here, not at the top: this module stays importable without JAX's start-up cost.

    if jax.process_count() == 1:
        return build()
    from jax.experimental import multihost_utils

    result = build() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("mmjax-dataset-built")
    return result if result is not None else build()


def check_dataset(dataset: Dataset) -> None:
    """A dataset's own description is consistent: a positive number of outputs, one class name per output,
    at least one modality, split sizes that are non-negative integers."""
    where = f"dataset {dataset.name!r}"
    if not is_int(dataset.num_classes) or dataset.num_classes <= 0:
        raise ValueError(f"{where}: num_classes={dataset.num_classes!r} must be a positive integer")
    if dataset.class_names and len(dataset.class_names) != dataset.num_classes:
        raise ValueError(
            f"{where}: {len(dataset.class_names)} label names {list(dataset.class_names)[:12]} for "
            f"num_classes={dataset.num_classes}; every class needs exactly one name"
        )
    if not dataset.modalities:
        raise ValueError(f"{where} provides no modality")
    bad = {k: v for k, v in dataset.splits.items() if not is_int(v) or v < 0}
    if bad:
        raise ValueError(f"{where}: split sizes {bad} must be non-negative integers")


@dataclasses.dataclass(frozen=True)
class CheckedLabels:
    """`preprocess`, then a host check of the example's label (picklable, for Grain workers).

    classification: an integer in [0, num_classes) (a negative id would index the last classes, a large one give
    a NaN loss); multilabel: `num_classes` finite values in [0, 1]; regression: `num_classes` finite values.
    """

    preprocess: Callable[[Mapping[str, Any]], Example]
    dataset: str
    task: str
    num_classes: int

    TASKS = ("classification", "multilabel", "regression")

    def __call__(self, example: Mapping[str, Any]) -> Example:
        out = self.preprocess(example)
        if "label" in out:
            check_label(out["label"], self.task, self.num_classes, f"dataset {self.dataset!r}")
        return out


def check_label(label: Any, task: str, num_classes: int, where: str) -> None:
    """Raises a ValueError naming the label when it does not fit `task` with `num_classes` outputs."""
    value = np.asarray(label)
    shown = value.tolist() if value.size <= 16 else f"array of shape {value.shape}"
    if task == "classification":
        if value.shape != () or value.dtype.kind not in "iu":
            raise ValueError(f"{where}: a classification label must be one integer class id, got {shown!r}")
        if not 0 <= int(value) < num_classes:
            raise ValueError(
                f"{where}: label {int(value)} is out of range for {num_classes} classes "
                f"(valid ids: 0..{num_classes - 1})"
            )
        return
    if value.size != num_classes:
        raise ValueError(f"{where}: a {task} label needs {num_classes} value(s), got shape {value.shape}: {shown!r}")
    if value.dtype.kind not in "iuf" or not np.all(np.isfinite(value)):
        raise ValueError(f"{where}: {task} label {shown!r} must be finite numbers")
    if task == "multilabel" and not np.all((value >= 0) & (value <= 1)):
        raise ValueError(f"{where}: multilabel label {shown!r} must be multi-hot (values in [0, 1])")
