"""Synthetic data of any shape, for throughput benchmarks: random inputs, nothing to download or build.

`config.data.name = "synthetic"` with `config.data.synthetic = dict(image=(224, 224, 3), text=(77,), ...)`:
each entry is a modality and its per-example shape; `text` (and any key in `token_keys`) holds int32 token ids
in [1, vocab_size) with the last `pad` positions set to 0, the others float32 N(0, 1). Labels follow `task`:
"contrastive" (an unused class id), "classification" (ids in [0, num_classes)). A pool of `pool_size` distinct
examples is generated once (seeded) and indexed modulo its size, so the input pipeline costs only the copy of
each batch, as a cached real dataset does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from mmjax.data.core import Dataset, identity
from mmjax.registry import DATASETS

TASKS = ("contrastive", "classification")


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """`length` examples drawn from a pool of distinct random examples (random access, picklable)."""

    pool: Mapping[str, np.ndarray]
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = int(index) % len(self.pool["label"])
        return {k: v[row] for k, v in self.pool.items()}


def make_pool(shapes: Mapping[str, tuple[int, ...]], *, token_keys=("text",), vocab_size: int = 1000, pad: int = 0,
              num_classes: int = 10, pool_size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pool = {}
    for key, shape in sorted(shapes.items()):
        shape = tuple(int(s) for s in shape)
        if any(s <= 0 for s in shape):
            raise ValueError(f"config data.synthetic.{key}={shape}: every size must be positive")
        if key in token_keys:
            ids = rng.integers(1, vocab_size, size=(pool_size, *shape), dtype=np.int32)
            if pad:
                ids[..., shape[-1] - pad:] = 0
            pool[key] = ids
        else:
            pool[key] = rng.standard_normal((pool_size, *shape), dtype=np.float32)
    pool["label"] = rng.integers(0, num_classes, size=pool_size, dtype=np.int32)
    return pool


@DATASETS.register("synthetic")
def dataset(data_config: ml_collections.ConfigDict) -> Dataset:
    """Random inputs of the shapes in `data.synthetic` (see the module docstring); splits `train` and `test`."""
    options: dict[str, Any] = dict(data_config.get("synthetic", {}))
    shapes = {k: v for k, v in options.items() if isinstance(v, (tuple, list))}
    if not shapes:
        raise ValueError("config data.synthetic needs at least one modality shape, e.g. image=(224, 224, 3)")
    unknown = sorted(set(options) - set(shapes) - {"task", "vocab_size", "pad", "num_classes", "pool_size",
                                                   "num_examples", "token_keys"})
    if unknown:
        raise ValueError(f"config data.synthetic: unknown option(s) {unknown}")
    task = options.get("task", "contrastive")
    if task not in TASKS:
        raise ValueError(f"config data.synthetic.task={task!r}; valid: {', '.join(TASKS)}")
    num_classes = int(options.get("num_classes", 10))
    pool = make_pool(shapes, token_keys=tuple(options.get("token_keys", ("text",))),
                     vocab_size=int(options.get("vocab_size", 1000)), pad=int(options.get("pad", 0)),
                     num_classes=num_classes, pool_size=int(options.get("pool_size", 64)),
                     seed=int(data_config.get("seed", 0)))
    length = int(options.get("num_examples", 1 << 20))
    sources = {"train": SyntheticSource(pool, length), "test": SyntheticSource(pool, min(length, len(pool["label"])))}
    return Dataset(
        name="synthetic",
        source=lambda split: sources[split],
        preprocess=identity,
        splits={k: len(v) for k, v in sources.items()},
        num_classes=num_classes,
        modalities=tuple(sorted(shapes)),
        class_names=tuple(str(c) for c in range(num_classes)),
        task=task,
    )
