"""Label ops: class ids to one-hot or multi-hot vectors."""

from __future__ import annotations

import dataclasses

import numpy as np

from mmjax.data.ops.op_base import Context, Op, describe, positive_arg, register


def _num_classes(op: Op, context: Context) -> Op:
    count = op.num_classes or context.num_classes
    if count is None:
        raise ValueError(f"{op.name}: the number of classes is unknown here; give it as {op.name}(NUM_CLASSES)")
    positive_arg(op.name, "num_classes", count)
    return dataclasses.replace(op, num_classes=int(count))


@register("one_hot")
@dataclasses.dataclass(frozen=True)
class OneHot(Op):
    """Class id -> float32 one-hot `[num_classes]` (default: the dataset's class count)."""

    num_classes: int | None = None

    def bind(self, context):
        return _num_classes(self, context), context

    def __call__(self, value):
        label = np.asarray(value)
        if label.ndim != 0 or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"one_hot expects one integer class id, got {describe(value)}")
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f"one_hot: class id {int(label)} is outside [0, {self.num_classes})")
        out = np.zeros(self.num_classes, np.float32)
        out[int(label)] = 1.0
        return out


@register("multi_hot")
@dataclasses.dataclass(frozen=True)
class MultiHot(Op):
    """Class ids (any number, possibly none) -> float32 multi-hot `[num_classes]`."""

    num_classes: int | None = None

    def bind(self, context):
        return _num_classes(self, context), context

    def __call__(self, value):
        ids = np.asarray(value).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"multi_hot expects integer class ids, got {describe(value)}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
            raise ValueError(f"multi_hot: class ids {ids.tolist()} are not all in [0, {self.num_classes})")
        out = np.zeros(self.num_classes, np.float32)
        out[ids.astype(np.int64)] = 1.0
        return out
