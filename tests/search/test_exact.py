"""Exact search on 8 devices equals a single-device brute force (indices and scores, ties included), and faiss's
approximate search reports its recall against it."""

import numpy as np
import pytest

from mmjax.search import ann
from mmjax.search.exact import ExactIndex, brute_force


@pytest.mark.parametrize("count, chunk", [(5, 4), (37, 4), (1000, 16), (1000, 65536)])
def test_sharded_top_k_equals_brute_force_with_ties(count, chunk):
    """Integer embeddings: every product is exact in float32, so many scores tie; the merged top k over 8 devices
    (chunked scans, per-device top k, merge) is numpy's stable ordering: the lower row first among equal scores."""
    import jax

    assert jax.device_count() == 8
    rng = np.random.default_rng(count)
    embeddings = rng.integers(-2, 3, (count, 16)).astype(np.float32)
    queries = rng.integers(-2, 3, (9, 16)).astype(np.float32)
    index = ExactIndex.from_array(embeddings, chunk=chunk)
    assert len(index.rows.sharding.device_set) == 8
    scores, rows = index.search(queries, 10)
    k = min(10, count)
    all_scores = queries @ embeddings.T
    stable = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(rows[:, :k], stable)
    np.testing.assert_array_equal(scores[:, :k], np.take_along_axis(all_scores, stable, 1))
    reference_scores, reference_rows = brute_force(embeddings, queries, 10)
    np.testing.assert_array_equal(rows[:, :k], reference_rows)
    np.testing.assert_array_equal(scores[:, :k], reference_scores)
    if count < 10:  # Fewer rows than k: the rest is marked -1.
        assert (rows[:, count:] == -1).all()


def test_float_embeddings_on_any_mesh_agree():
    import jax

    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((777, 32)).astype(np.float32)
    queries = rng.standard_normal((5, 32)).astype(np.float32)
    eight = ExactIndex.from_array(embeddings, chunk=32).search(queries, 7)
    one = ExactIndex.from_array(embeddings, mesh=ExactIndex.mesh(jax.devices()[:1])).search(queries, 7)
    np.testing.assert_array_equal(eight[1], one[1])
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-6)


def test_bad_queries_are_refused():
    index = ExactIndex.from_array(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match=r"queries of shape \(2, 3\); the collection's rows have 8 dimensions"):
        index.search(np.ones((2, 3)), 2)
    with pytest.raises(ValueError, match="k=0 must be at least 1"):
        index.search(np.ones((2, 8)), 0)
    with pytest.raises(ValueError, match="the collection is empty"):
        ExactIndex.from_array(np.zeros((0, 8), np.float32))


@pytest.mark.parametrize("kind", ann.KINDS)
def test_ann_recall_is_measured_against_exact(kind, tmp_path):
    """Clustered embeddings: faiss finds nearly all of the exact top 10, and the build records how many."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((20, 16))
    embeddings = (centres[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, 16))).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    info = ann.build(embeddings, kind, str(tmp_path / "a.faiss"), queries=200, nprobe=8)
    assert info["kind"] == kind and info["recall_queries"] == 200
    assert 0.8 <= info["recall@10"] <= 1.0
    loaded = ann.load(str(tmp_path / "a.faiss"))
    exact = ExactIndex.from_array(embeddings).search(embeddings[:50], 10)[1]
    assert ann.recall_at(ann.search(loaded, embeddings[:50], 10)[1], exact) >= 0.8
    assert ann.recall_at(exact, exact) == 1.0
    with pytest.raises(ValueError, match="--ann 'lsh'; valid: ivf, hnsw"):
        ann.make("lsh", 16, 100)
