"""Exact top-k search as a jitted, device-sharded matrix product: every device holds a block of the collection's
rows, scores the queries against it chunk by chunk (`lax.scan`, so no `[queries, rows]` matrix is ever held
whole), keeps its own top k, and the devices' candidates are gathered and merged into the global top k.

Ties keep the lower row first at every stage (`lax.top_k` keeps the lower index first, devices hold ascending
row ranges and are merged in that order), so the result equals a single-device brute force (`brute_force`),
indices and scores, whatever the device count (tested on 8 devices with integer embeddings, whose products are
exact). With several processes each one reads only the rows of its own devices (`ExactIndex.from_rows` calls
the row reader per local block).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "rows"
DEFAULT_CHUNK = 65536  # Rows scored per step on a device: [queries, chunk] scores at a time.


def _topk_merge(scores: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top k of `[Q, M]` candidates (scores, global indices), the earlier candidate first among equal scores."""
    top, position = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, position, axis=1)


def _local_topk(queries: jax.Array, rows: jax.Array, first: jax.Array, total: int, k: int, chunk: int):
    """Top k of one device's block `[n, D]` (global rows first..first+n); rows >= total are padding."""
    n = rows.shape[0]
    chunks = n // chunk
    blocks = rows.reshape(chunks, chunk, rows.shape[1])
    kk = min(k, chunk)
    q = queries.shape[0]

    def step(carry, inputs):
        best, best_index = carry
        block, start = inputs
        scores = jnp.dot(queries, block.T, preferred_element_type=jnp.float32)  # [Q, chunk]
        index = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        scores = jnp.where(index < total, scores, -jnp.inf)
        top, where = jax.lax.top_k(scores, kk)
        merged = _topk_merge(jnp.concatenate([best, top], 1), jnp.concatenate([best_index, start + where], 1), k)
        return merged, None

    init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), jnp.iinfo(jnp.int32).max, jnp.int32))
    starts = first + jnp.arange(chunks, dtype=jnp.int32) * chunk
    (best, best_index), _ = jax.lax.scan(step, init, (blocks, starts))
    return best, best_index


@functools.lru_cache(maxsize=16)
def _search_fn(mesh: Mesh, total: int, rows_per_device: int, k: int, chunk: int):
    def per_device(queries, rows):
        first = jax.lax.axis_index(AXIS) * rows_per_device
        best, index = _local_topk(queries, rows, first, total, k, chunk)
        best = jax.lax.all_gather(best, AXIS, axis=1, tiled=True)  # [Q, devices * k], device order.
        index = jax.lax.all_gather(index, AXIS, axis=1, tiled=True)
        return _topk_merge(best, index, k)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(AXIS, None)),
                            out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
    return jax.jit(sharded)


class ExactIndex:
    """A collection `[N, D]` spread over the devices of `mesh` (1-D, axis "rows"; default: every device), padded
    to whole chunks; `search(queries, k)` returns `(scores [Q, k], rows [Q, k])` of the k highest inner products
    (cosine for unit embeddings), best first; rows are -1 where the collection has fewer than k rows."""

    def __init__(self, rows: jax.Array, total: int, mesh: Mesh, chunk: int):
        self.rows, self.total, self.mesh, self.chunk = rows, total, mesh, chunk
        self.rows_per_device = rows.shape[0] // mesh.devices.size

    @staticmethod
    def mesh(devices: list | None = None) -> Mesh:
        return Mesh(np.asarray(devices or jax.devices()), (AXIS,))

    @classmethod
    def from_rows(cls, total: int, dim: int, read: Callable[[int, int], np.ndarray], *, mesh: Mesh | None = None,
                  chunk: int = DEFAULT_CHUNK, dtype=np.float32) -> ExactIndex:
        """Builds the sharded collection from `read(start, stop) -> [stop - start, D]` (called only for the rows
        of this process's devices; rows past `total` are zeros)."""
        if total <= 0:
            raise ValueError("the collection is empty: nothing to search")
        mesh = mesh or cls.mesh()
        devices = mesh.devices.size
        per_device = math.ceil(total / devices)
        chunk = max(1, min(chunk, per_device))
        per_device = math.ceil(per_device / chunk) * chunk
        padded = per_device * devices
        sharding = NamedSharding(mesh, PartitionSpec(AXIS, None))

        def block(index) -> np.ndarray:
            start, stop = index[0].start or 0, index[0].stop if index[0].stop is not None else padded
            out = np.zeros((stop - start, dim), dtype)
            real = min(stop, total)
            if real > start:
                out[: real - start] = read(start, real)
            return out

        rows = jax.make_array_from_callback((padded, dim), sharding, block)
        return cls(rows, total, mesh, chunk)

    @classmethod
    def from_array(cls, embeddings: np.ndarray, **kwargs) -> ExactIndex:
        embeddings = np.asarray(embeddings)
        return cls.from_rows(len(embeddings), embeddings.shape[1], lambda a, b: embeddings[a:b],
                             dtype=embeddings.dtype, **kwargs)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(queries, self.rows.dtype)
        if queries.ndim != 2 or queries.shape[1] != self.rows.shape[1]:
            raise ValueError(f"queries of shape {queries.shape}; the collection's rows have {self.rows.shape[1]} "
                             "dimensions")
        if k < 1:
            raise ValueError(f"k={k} must be at least 1")
        fn = _search_fn(self.mesh, self.total, self.rows_per_device, int(k), self.chunk)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        scores, rows = fn(jax.device_put(queries, replicated), self.rows)
        scores, rows = np.asarray(scores), np.asarray(rows)
        rows = np.where(np.isfinite(scores), rows, -1)  # Fewer than k rows in the collection.
        return scores, rows


def brute_force(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: all scores on one device, one `lax.top_k` (lower row first among equal scores)."""
    device = jax.devices()[0]
    scores = jax.device_put(np.asarray(queries), device) @ jax.device_put(np.asarray(embeddings), device).T
    top, rows = jax.lax.top_k(scores, min(k, embeddings.shape[0]))
    return np.asarray(top), np.asarray(rows)
