"""The multi-process side of `index`: process 0 alone reads and writes the index's files, and tells the other
processes what it found or did through collectives, so the processes need no shared file system and all of them
exit with process 0's outcome.

Every shard's batches are collectives (`mmjax.inference.Runner`), so every process must run the same shards:
`shards_done` gives them process 0's view of an interrupted build. Finishing the index (reading every shard,
building the faiss index, the atomic swap) is process 0's alone: `on_primary` makes the others wait for it in a
collective, which has no time-out of its own (a faiss build of millions of items takes minutes, longer than the
shutdown barrier of `jax.distributed`), while the heartbeats of `mmjax.train.parallel` still end the wait if
process 0 dies; if it raises, the others raise too instead of exiting as if the index had been written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from mmjax.search.index_store import IndexError_

T = TypeVar("T")


def _broadcast(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` on every process (a no-op with one process)."""
    import jax

    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(values))


def shards_done(done: Callable[[int], bool] | None, shards: int) -> list[bool]:
    """Which of `shards` an interrupted build already wrote, as process 0 sees them (`done`: process 0's check;
    None on the other processes)."""
    local = np.asarray([done is not None and done(s) for s in range(shards)] + [False], np.int32)  # Never empty.
    return [bool(x) for x in _broadcast(local)[:shards]]


def on_primary(fn: Callable[[], T], what: str) -> T | None:
    """`fn()` on process 0 (its result; None elsewhere), the other processes waiting until it has finished
    (module docstring); `what` names the work in the error the others raise when process 0 failed."""
    import jax

    if jax.process_count() == 1:
        return fn()
    result, failure = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException as error:  # Re-raised below, once the others know.
            failure = error
    succeeded = bool(_broadcast(np.asarray([failure is None], np.int32))[0])
    if failure is not None:
        raise failure
    if not succeeded:
        raise IndexError_(f"process 0 failed to {what}; its output says why")
    return result

