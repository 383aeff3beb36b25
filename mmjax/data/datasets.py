"""Datasets by name: each entry turns `config.data` into a `Dataset` (random-access split sources + preprocessing).

Our own datasets are TFDS builders built offline on first use into the TFDS data dir (`config.data.data_dir`,
else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`) and read with `tfds.data_source` (array_record, no TensorFlow).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from mmjax.registry import DATASETS

Example = dict[str, np.ndarray]


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


def build_on_process_zero(build: Callable[[], Any]) -> Any:
    """Runs an offline dataset build on process 0 first, then on the others (which then find it built)."""
    import jax

    if jax.process_count() == 1:
        return build()
    from jax.experimental import multihost_utils

    result = build() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("mmjax-dataset-built")
    return result if result is not None else build()


def get_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """Looks up `config.data.name` and builds the dataset (offline builders build on first use).

    The dataset's description is checked (`check_dataset`) and its `preprocess` checks every label against the
    task and `num_classes` (`CheckedLabels`), so a bad label fails when it is read, naming its value, instead of
    training on a wrapped-around class or a NaN loss.
    """
    if data_config.name not in DATASETS:
        raise ValueError(f"config data.name: {DATASETS.unknown_message(data_config.name)}")
    dataset = DATASETS.get(data_config.name)(data_config)
    check_dataset(dataset)
    if dataset.task in CheckedLabels.TASKS:
        dataset = dataclasses.replace(
            dataset, preprocess=CheckedLabels(dataset.preprocess, dataset.name, dataset.task, dataset.num_classes)
        )
    return dataset


def check_dataset(dataset: Dataset) -> None:
    """A dataset's own description is consistent: a positive number of outputs, one class name per output,
    at least one modality, split sizes that are non-negative integers."""
    where = f"dataset {dataset.name!r}"
    if isinstance(dataset.num_classes, bool) or not isinstance(dataset.num_classes, (int, np.integer)) or (
        dataset.num_classes <= 0
    ):
        raise ValueError(f"{where}: num_classes={dataset.num_classes!r} must be a positive integer")
    if dataset.class_names and len(dataset.class_names) != dataset.num_classes:
        raise ValueError(
            f"{where}: {len(dataset.class_names)} label names {list(dataset.class_names)[:12]} for "
            f"num_classes={dataset.num_classes}; every class needs exactly one name"
        )
    if not dataset.modalities:
        raise ValueError(f"{where} provides no modality")
    bad = {k: v for k, v in dataset.splits.items()
           if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0}
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


AV_DIGITS_TARGETS = {"digit": "classification", "value": "regression", "digit_pair": "multilabel"}


class PairedSource:
    """AV-Digits with each image paired to the speech of another example of the same split (fixed permutation).

    Example i keeps its image and takes the audio of example `perm[i]`: its two digits usually differ, so a
    multi-label target {image digit, spoken digit} needs both modalities.
    """

    def __init__(self, source, seed: int = 20261123):
        self.source = source
        self.partner = np.random.default_rng(seed).permutation(len(source))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.source[int(index)])
        partner = self.source[int(self.partner[int(index)])]
        example["audio"], example["audio_label"] = partner["audio"], partner["label"]
        return example


@dataclasses.dataclass(frozen=True)
class AvDigitsPreprocess:
    """AV-Digits example -> model inputs: image in [-1, 1]; audio as a per-utterance normalised log-mel.

    `target`: "digit" (class id), "value" (the digit as a float, for regression), "digit_pair" (multi-hot of the
    image's digit and the partner utterance's digit, see `PairedSource`).
    """

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    target: str = "digit"

    def __call__(self, example: Mapping[str, Any]) -> Example:
        from mmjax.data.audio_features import log_mel_spectrogram

        image = np.asarray(example["image"], np.float32) / 127.5 - 1.0
        waveform = np.asarray(example["audio"], np.float32) / 32768.0
        mel = log_mel_spectrogram(
            waveform, self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels
        )
        mel = (mel - mel.mean()) / (mel.std() + 1e-5)
        if self.target == "value":
            label = np.float32(example["label"])
        elif self.target == "digit_pair":
            label = np.zeros(10, np.float32)
            label[[int(example["label"]), int(example["audio_label"])]] = 1.0
        else:
            label = np.int32(example["label"])
        return {"image": image, "audio": mel.astype(np.float32), "label": label}


@DATASETS.register("av_digits")
def av_digits(data_config: ml_collections.ConfigDict) -> Dataset:
    """AV-Digits: scikit-learn's handwritten digits paired with eSpeak NG spoken digits (see mmjax.data.av_digits).

    `data.target` picks the label: "digit" (default, 10 classes), "value" (regression) or "digit_pair"
    (multi-label over 10 digits, each image paired with another example's speech).
    """
    from mmjax.data import av_digits as builder_module

    target = data_config.get("target", "digit")
    if target not in AV_DIGITS_TARGETS:
        raise ValueError(f"config data.target={target!r}; valid: {', '.join(AV_DIGITS_TARGETS)}")

    builder = build_on_process_zero(lambda: builder_module.build(data_config.get("data_dir") or None))
    audio = data_config.get("audio", ml_collections.ConfigDict())
    preprocess = AvDigitsPreprocess(
        sample_rate=builder_module.SAMPLE_RATE,
        n_fft=audio.get("n_fft", builder_module.N_FFT),
        hop_length=audio.get("hop_length", builder_module.HOP_LENGTH),
        n_mels=audio.get("n_mels", builder_module.N_MELS),
        target=target,
    )
    label = builder.info.features["label"]
    if target == "digit_pair":
        source = lambda split: PairedSource(builder.as_data_source(split=split))  # noqa: E731
    else:
        source = lambda split: builder.as_data_source(split=split)  # noqa: E731
    return Dataset(
        name="av_digits",
        source=source,
        preprocess=preprocess,
        splits={name: info.num_examples for name, info in builder.info.splits.items()},
        num_classes=1 if target == "value" else label.num_classes,
        modalities=("audio", "image"),
        class_names=("value",) if target == "value" else tuple(label.names),
        task=AV_DIGITS_TARGETS[target],
    )


@DATASETS.register("intents")
def intents(data_config: ml_collections.ConfigDict) -> Dataset:
    """Intents: generated English requests in 8 intents, test phrasings held out (see mmjax.data.intents)."""
    from mmjax.data import intents as module

    return module.dataset(data_config)


@DATASETS.register("synthetic")
def synthetic(data_config: ml_collections.ConfigDict) -> Dataset:
    """Random inputs of any shape, for throughput benchmarks (see mmjax.data.synthetic)."""
    from mmjax.data import synthetic as module

    return module.dataset(data_config)


@DATASETS.register("shapes_captions")
def shapes_captions(data_config: ml_collections.ConfigDict) -> Dataset:
    """Shapes-Captions: rendered scenes with captions and hard negatives (see mmjax.data.shapes_captions)."""
    from mmjax.data import shapes_captions as module

    return module.dataset(data_config)


@DATASETS.register("coco_captions")
def coco_captions(data_config: ml_collections.ConfigDict) -> Dataset:
    """COCO 2014 captions (TFDS coco_captions, Karpathy splits), contrastive image-text; prepared data only
    (see mmjax.data.catalog)."""
    from mmjax.data import catalog

    return catalog.coco_captions(data_config)


@DATASETS.register("coco_objects")
def coco_objects(data_config: ml_collections.ConfigDict) -> Dataset:
    """COCO 2014 image + caption -> the 80 object categories present (multilabel), from the prepared TFDS
    coco_captions data (see mmjax.data.catalog)."""
    from mmjax.data import catalog

    return catalog.coco_objects(data_config)


@DATASETS.register("av_mnist")
def av_mnist(data_config: ml_collections.ConfigDict) -> Dataset:
    """AV-MNIST: TFDS mnist images paired with TFDS spoken_digit recordings of the same digit; prepared data only
    (see mmjax.data.catalog)."""
    from mmjax.data import catalog

    return catalog.av_mnist(data_config)


@DATASETS.register("files")
def files(data_config: ml_collections.ConfigDict) -> Dataset:
    """Your own data: a manifest of image / audio / text files and labels built by `python -m mmjax.data.build`
    into `data.data_dir`, preprocessed by the `data.preprocess` op chains (see mmjax.data.files, mmjax.data.ops)."""
    from mmjax.data import files as module

    return module.dataset(data_config)
