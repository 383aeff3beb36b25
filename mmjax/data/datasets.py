"""Datasets by name: `get_dataset(config.data)` turns a config into a checked `Dataset`.

Each dataset module registers its entry in `mmjax.registry.DATASETS` when imported; this module imports them all,
so every name is known here. Our own datasets are TFDS builders built offline on first use into the TFDS data dir
(`config.data.data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`) and read with `tfds.data_source`
(array_record, no TensorFlow).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mmjax.data import (  # noqa: F401  (register)
    av_digits,
    catalog,
    files,
    intents,
    shapes_captions,
    shapes_vqa,
    spoken_numbers,
    synthetic,
)
from mmjax.data.core import CheckedLabels, Dataset, check_dataset
from mmjax.registry import DATASETS

__all__ = ["dataset_names", "get_dataset"]


def dataset_names() -> list[str]:
    """Every registered dataset name, sorted."""
    return DATASETS.names()


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
