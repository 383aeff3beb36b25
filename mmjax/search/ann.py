"""Approximate nearest neighbours with faiss (faiss-cpu), for collections too large to scan at memory-bandwidth speed.

Kinds (inner product, so cosine for unit embeddings):

    ivf    faiss.IndexIVFFlat: k-means into `nlist` cells (default 4 sqrt(N), at most N / 39; trained on at most
           256 points per cell), a query scans its `nprobe` nearest cells (default 16, at most `nlist`)
    hnsw   faiss.IndexHNSWFlat: a navigable small-world graph of `m` links per node (default 32), searched with
           `ef_search` candidates (default 64)

Every build measures its recall@10 against the exact top 10 (`recall_at`), on up to 1,000 of the collection's own
items as queries, and records it with the index (`index.json` "ann"), so the accuracy given up is known. The build
runs in one process (process 0 of a multi-process `index`), its exact search on that process's devices.
`check_options` refuses settings that do not fit before anything is embedded.
Optional dependency: `pip install -e ".[search]"` (faiss-cpu).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

KINDS = ("ivf", "hnsw")
DEFAULT_NPROBE = 16


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("approximate search needs faiss: pip install faiss-cpu (or pip install -e \".[search]\")") \
            from None
    return faiss


def default_nlist(count: int) -> int:
    """4 sqrt(N) IVF cells, at most one per 39 items (faiss's minimum of training points per cell), at least 1."""
    return int(max(1, min(count // 39, round(4 * math.sqrt(count)))))


def check_options(kind: str | None, count: int, options: Mapping[str, Any]) -> None:
    """Refuses, before any embedding is computed, ANN settings that do not fit: IVF settings without `--ann ivf`,
    values below 1, more cells than items (k-means needs a point per cell) or more cells probed than there are;
    and a missing faiss."""
    given = {k: v for k, v in options.items() if v is not None}
    flags = " / ".join(f"--{k}" for k in given)
    if kind is None:
        if given:
            raise ValueError(f"{flags}: settings of the IVF index that --ann ivf builds, and no --ann was given; "
                             "add --ann ivf, or leave them out")
        return
    if kind not in KINDS:
        raise ValueError(f"--ann {kind!r}; valid: {', '.join(KINDS)}")
    if kind != "ivf" and given:
        raise ValueError(f"{flags}: IVF settings, which --ann {kind} does not have; leave them out or use --ann ivf")
    for name, value in given.items():
        if value < 1:
            raise ValueError(f"--{name} {value} must be at least 1")
    nlist = given.get("nlist", default_nlist(count))
    if nlist > count:
        raise ValueError(f"--nlist {nlist}: an IVF index of {count:,} items has at most {count:,} cells (k-means "
                         f"needs a point per cell; the default for {count:,} items is {default_nlist(count)})")
    if given.get("nprobe", 0) > nlist:
        source = "--nlist" if "nlist" in given else f"the default --nlist for {count:,} items"
        raise ValueError(f"--nprobe {given['nprobe']} scans more cells than the index has ({nlist}, {source}); "
                         f"give at most {nlist}")
    _faiss()


def make(kind: str, dim: int, count: int, *, nlist: int | None = None, nprobe: int | None = None, m: int = 32,
         ef_search: int = 64, ef_construction: int = 80):
    """An empty faiss index of `kind` for `count` vectors of `dim` dimensions (module docstring; `nprobe` is at
    most `nlist`)."""
    faiss = _faiss()
    if kind == "ivf":
        nlist = int(nlist or default_nlist(count))
        nprobe = nprobe or DEFAULT_NPROBE
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(nprobe, nlist)
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        return index
    raise ValueError(f"--ann {kind!r}; valid: {', '.join(KINDS)}")


def fill(index, embeddings: np.ndarray, seed: int = 0, per_cell: int = 256) -> None:
    """Trains (IVF: k-means on at most `per_cell` points per cell) and adds the embeddings."""
    embeddings = np.ascontiguousarray(embeddings, np.float32)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = min(len(embeddings), per_cell * index.nlist)
        index.train(embeddings[np.sort(rng.choice(len(embeddings), sample, replace=False))])
    index.add(embeddings)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`(scores [Q, k], rows [Q, k])`, best first; rows are -1 where fewer than k were found."""
    scores, rows = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, rows


def recall_at(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approximate top k ∩ exact top k| / k."""
    k = exact.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approximate, exact)]
    return float(np.mean(hits) / k)


def build(embeddings: np.ndarray, kind: str, path: str, *, queries: int = 1000, seed: int = 0,
          **options: Any) -> dict[str, Any]:
    """Builds the `kind` index of `embeddings`, writes it to `path` and returns what index.json records about it:
    its kind and parameters, build time, and recall@10 against exact search on up to `queries` of the items."""
    import jax

    from mmjax.search.exact import ExactIndex

    faiss = _faiss()
    started = time.perf_counter()
    index = make(kind, embeddings.shape[1], len(embeddings), **options)
    fill(index, embeddings, seed)
    seconds = time.perf_counter() - started
    faiss.write_index(index, path)
    rng = np.random.default_rng(seed)
    sample = embeddings[np.sort(rng.choice(len(embeddings), min(queries, len(embeddings)), replace=False))]
    k = min(10, len(embeddings))
    local = ExactIndex.mesh(jax.local_devices())  # Process 0 alone builds it (module docstring).
    exact = ExactIndex.from_array(embeddings, mesh=local).search(sample, k)[1]
    approximate = search(index, sample, k)[1]
    params = ({"nlist": index.nlist, "nprobe": index.nprobe} if kind == "ivf"
              else {"m": index.hnsw.nb_neighbors(1), "ef_search": index.hnsw.efSearch})
    return {"kind": kind, "params": params, "build_seconds": round(seconds, 2), f"recall@{k}": recall_at(approximate,
            exact), "recall_queries": len(sample), "file": "ann.faiss"}


def load(path: str):
    return _faiss().read_index(path)
