"""`python -m mmjax.search bench`: exact and approximate top-10 search speed on random unit embeddings.

    python -m mmjax.search bench [--count 1000000] [--dim 256] [--queries 1024] [--batches 1,16,128,1024]
        [--nprobe 8,32,128] [--nlist 1024] [--no-ann] [--json out.json]

Exact: the collection `[count, dim]` float32 is placed on the devices (`mmjax.search.exact`), and query batches
of each size are timed (median of repeats after a warm-up). Each batch must read the whole matrix once, so
queries/s can be at most `batch x bandwidth / matrix bytes` (the memory-bandwidth bound, with the bandwidth
measured here as one jitted sum over the same matrix) and at most `peak FLOP/s / (2 x count x dim)` (the compute
bound, with the peak measured as a large float32 matmul); both are printed beside the measurement. Approximate:
a faiss IVF index (`mmjax.search.ann`; `nlist` cells, k-means on 64 points per cell), timed at each `nprobe`
with its recall@10 against the exact top 10 of the same queries. Random embeddings have no cluster structure,
the hardest case for an IVF index: its recall here is a floor, not what real embeddings get.

Memory: the collection three times (the numpy matrix, its device copy, the faiss index's copy) plus one batch's
scores; at 1M x 256 on CPU the process peaked at 3.6 GB (`/usr/bin/time -v`, `--batches 1024 --nprobe 8`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_unit(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 65536):  # In blocks: no float64 copy of the whole matrix.
        block = rng.standard_normal((min(65536, count - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def measure_bandwidth(rows: Any, repeats: int = 5) -> float:
    """Bytes/s of one jitted full read (a sum) of the device-resident matrix."""
    import jax
    import jax.numpy as jnp

    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    total(rows).block_until_ready()
    seconds = _median_time(lambda: total(rows).block_until_ready(), repeats)
    return rows.size * rows.dtype.itemsize / seconds


def measure_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted float32 `[size, size] @ [size, size]` on the default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    return 2 * size**3 / _median_time(lambda: product(a).block_until_ready(), repeats)


def run(count: int = 1_000_000, dim: int = 256, queries: int = 1024, batches: Sequence[int] = (1, 16, 128, 1024),
        nprobes: Sequence[int] = (8, 32, 128), nlist: int = 1024, ann: bool = True, seed: int = 0,
        log=print) -> dict[str, Any]:
    import jax

    from mmjax.search import ann as ann_lib
    from mmjax.search.exact import ExactIndex

    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, jax "
        f"{jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    started = time.perf_counter()
    embeddings = random_unit(count, dim, seed)
    query = random_unit(queries, dim, seed + 1)
    index = ExactIndex.from_array(embeddings)
    log(f"collection: {count:,} x {dim} float32 ({embeddings.nbytes / 2**30:.2f} GiB), placed in "
        f"{time.perf_counter() - started:.1f} s")
    bandwidth = measure_bandwidth(index.rows)
    peak = measure_peak_flops()
    matrix_bytes = count * dim * 4
    log(f"measured: read bandwidth {bandwidth / 1e9:.1f} GB/s (jitted sum over the matrix), float32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
    rows = []
    exact_top = None
    for batch in batches:
        batch = min(batch, queries)
        q = query[:batch]
        index.search(q, 10)  # Compile.
        repeats = max(3, min(20, int(2e9 // max(1, matrix_bytes))))
        seconds = _median_time(lambda q=q: index.search(q, 10), repeats)
        bound_bw = batch * bandwidth / matrix_bytes
        bound_flops = peak / (2 * count * dim)
        rows.append({"batch": batch, "queries_per_s": batch / seconds, "batch_ms": seconds * 1e3,
                     "bandwidth_bound_qps": bound_bw, "compute_bound_qps": bound_flops,
                     "of_bound": batch / seconds / min(bound_bw, bound_flops)})
        log(f"exact top-10, batch {batch:5d}: {batch / seconds:10,.1f} queries/s ({seconds * 1e3:8.1f} ms/batch); "
            f"bounds: bandwidth {bound_bw:10,.1f}, compute {bound_flops:8,.1f} queries/s "
            f"-> {rows[-1]['of_bound']:.0%} of the lower")
    exact_top = np.concatenate([index.search(query[i : i + 256], 10)[1] for i in range(0, queries, 256)])
    result: dict[str, Any] = {"count": count, "dim": dim, "queries": queries, "bandwidth_bytes_per_s": bandwidth,
                              "peak_flops": peak, "exact": rows, "devices": jax.device_count()}
    if ann:
        started = time.perf_counter()
        faiss_index = ann_lib.make("ivf", dim, count, nlist=nlist)
        ann_lib.fill(faiss_index, embeddings, seed, per_cell=64)
        built = time.perf_counter() - started
        log(f"faiss IVF-Flat, nlist {faiss_index.nlist}: trained and filled in {built:.1f} s")
        ann_rows = []
        for nprobe in nprobes:
            faiss_index.nprobe = min(nprobe, faiss_index.nlist)
            seconds = _median_time(lambda: ann_lib.search(faiss_index, query, 10), 3)
            recall = ann_lib.recall_at(ann_lib.search(faiss_index, query, 10)[1], exact_top)
            ann_rows.append({"nprobe": faiss_index.nprobe, "queries_per_s": queries / seconds, "recall@10": recall})
            log(f"ANN (IVF) top-10, nprobe {faiss_index.nprobe:4d}: {queries / seconds:10,.1f} queries/s "
                f"(batch {queries}), recall@10 {recall:.4f} against exact")
        result["ann"] = {"kind": "ivf", "nlist": faiss_index.nlist, "build_seconds": built, "rows": ann_rows}
    return result


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m mmjax.search bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--batches", type=_ints, default=[1, 16, 128, 1024])
    p.add_argument("--nprobe", type=_ints, default=[8, 32, 128])
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--no-ann", action="store_true", help="exact search only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.count, args.dim, args.queries, *args.batches) < 1:
        p.error("--count, --dim, --queries and --batches must be positive")
    result = run(args.count, args.dim, args.queries, args.batches, args.nprobe, args.nlist, not args.no_ann,
                 args.seed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
