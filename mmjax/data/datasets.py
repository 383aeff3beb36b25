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
    """

    name: str
    source: Callable[[str], Sequence[Mapping[str, Any]]]
    preprocess: Callable[[Mapping[str, Any]], Example]
    splits: Mapping[str, int]
    num_classes: int
    modalities: tuple[str, ...]
    class_names: tuple[str, ...] = ()


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
    """Looks up `config.data.name` and builds the dataset (offline builders build on first use)."""
    if data_config.name not in DATASETS:
        raise ValueError(f"config data.name: {DATASETS.unknown_message(data_config.name)}")
    return DATASETS.get(data_config.name)(data_config)


@dataclasses.dataclass(frozen=True)
class AvDigitsPreprocess:
    """AV-Digits example -> model inputs: image in [-1, 1]; audio as a per-utterance normalised log-mel."""

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int

    def __call__(self, example: Mapping[str, Any]) -> Example:
        from mmjax.data.audio import log_mel_spectrogram

        image = np.asarray(example["image"], np.float32) / 127.5 - 1.0
        waveform = np.asarray(example["audio"], np.float32) / 32768.0
        mel = log_mel_spectrogram(
            waveform, self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length, n_mels=self.n_mels
        )
        mel = (mel - mel.mean()) / (mel.std() + 1e-5)
        return {"image": image, "audio": mel.astype(np.float32), "label": np.int32(example["label"])}


@DATASETS.register("av_digits")
def av_digits(data_config: ml_collections.ConfigDict) -> Dataset:
    """AV-Digits: scikit-learn's handwritten digits paired with eSpeak NG spoken digits (see mmjax.data.av_digits)."""
    from mmjax.data import av_digits as builder_module

    builder = build_on_process_zero(lambda: builder_module.build(data_config.get("data_dir") or None))
    audio = data_config.get("audio", ml_collections.ConfigDict())
    preprocess = AvDigitsPreprocess(
        sample_rate=builder_module.SAMPLE_RATE,
        n_fft=audio.get("n_fft", builder_module.N_FFT),
        hop_length=audio.get("hop_length", builder_module.HOP_LENGTH),
        n_mels=audio.get("n_mels", builder_module.N_MELS),
    )
    label = builder.info.features["label"]
    return Dataset(
        name="av_digits",
        source=lambda split: builder.as_data_source(split=split),
        preprocess=preprocess,
        splits={name: info.num_examples for name, info in builder.info.splits.items()},
        num_classes=label.num_classes,
        modalities=("audio", "image"),
        class_names=tuple(label.names),
    )
