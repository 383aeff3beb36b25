"""Retrieval, zero-shot and binding evaluators on embeddings whose answers are known."""

import numpy as np
import pytest

from mmjax.metrics import retrieval as ev


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_retrieval_perfect_and_known_ranks():
    x = np.eye(4, dtype=np.float32)
    perfect = ev.retrieval_metrics(x, x)
    assert perfect["i2t_recall@1"] == perfect["t2i_recall@1"] == 1.0 and perfect["i2t_mean_rank"] == 1.0
    # Image 0's caption is most similar to image 1: caption 0 ranks image 0 second; image 1 ranks its own caption
    # second (caption 0 scores higher).
    y = x.copy()
    y[0] = _unit([0.5, 1.0, 0, 0])
    m = ev.retrieval_metrics(x, y)
    # i2t ranks: image0 -> own caption 0 scores 0.447, caption1 scores 0 -> rank 1; image1 -> caption0 0.894 >
    # caption1 1.0? no: 1.0 > 0.894 -> rank 1. t2i: caption0 -> image1 (0.894) > image0 (0.447) -> rank 2.
    assert m["i2t_recall@1"] == 1.0
    assert m["t2i_recall@1"] == 0.75 and m["t2i_mean_rank"] == pytest.approx(1.25) and m["t2i_recall@5"] == 1.0


def test_retrieval_with_several_captions_per_image():
    x = np.eye(3, dtype=np.float32)
    good = np.eye(3, dtype=np.float32)
    bad = np.roll(np.eye(3, dtype=np.float32), 1, axis=0)  # Example i's second caption describes image i-1.
    y = np.stack([good, bad], axis=1)  # [3, 2, 3]
    m = ev.retrieval_metrics(x, y)
    # Image i's good caption scores 1, and so does image i+1's bad caption: a tie between a correct and a wrong
    # candidate, so rank 1 or 2 with equal chance (it was counted as rank 1, in the model's favour).
    assert m["i2t_recall@1"] == 0.5 and m["i2t_mean_rank"] == 1.5 and m["i2t_recall@5"] == 1.0
    # Bad captions: image i-1 scores 1 > 0 (rank 2 at least) and image i+1 ties the own image at 0: rank 2.5.
    assert m["t2i_recall@1"] == 0.5 and m["t2i_median_rank"] == 1.75 and m["t2i_mean_rank"] == 1.75
    with pytest.raises(ValueError, match="x has shape"):
        ev.retrieval_metrics(np.zeros((2, 3)), y)


def test_zero_shot_uses_renormalised_mean_prompt_embeddings():
    prompts = np.stack([np.stack([_unit([1, 0.2, 0]), _unit([1, -0.2, 0])]),
                        np.stack([_unit([0, 1, 0.1]), _unit([0, 1, -0.1])]),
                        np.stack([_unit([0, 0, 1]), _unit([0, 0.1, 1])])])
    classes = ev.class_embeddings(prompts)
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(classes[0], [1, 0, 0], atol=1e-6)
    x = _unit([[1, 0.1, 0], [0.1, 1, 0], [0, 1, 0.2], [1, 0.3, 0]])  # The last ranks class 2 third.
    m = ev.zero_shot_metrics(x, classes, np.array([0, 1, 2, 2]), top_k=2)
    assert m["zero_shot_top1"] == 0.5 and m["zero_shot_top2"] == 0.75


def test_binding_counts_true_caption_over_negative_pairs():
    x = np.eye(2, dtype=np.float32)
    y = np.stack([np.eye(2, dtype=np.float32)] * 2, axis=1)  # Two identical true captions each.
    negatives = np.stack([np.stack([_unit([0.5, 1]), _unit([1, 1])]),  # Example 0: first negative scores 0.447.
                          np.stack([_unit([1, 0.1]), _unit([0, -1])])], axis=0)  # Example 1: 0.0995, -1.
    m = ev.binding_metrics(x, y, negatives)
    assert m["binding_accuracy"] == 1.0 and m["binding_all"] == 1.0
    negatives[0, 0] = np.array([1, 0], np.float32)  # Now ties the true caption: not "above".
    m = ev.binding_metrics(x, y, negatives)
    assert m["binding_accuracy"] == 0.75 and m["binding_all"] == 0.5


def test_collapsed_embeddings_score_chance_not_perfect():
    """Every embedding identical: open_clip's ranking gives recall@1 = 1/N and mean rank (N + 1) / 2."""
    n = 20
    x = np.tile(_unit([[1.0, 2.0, 3.0]]), (n, 1))
    m = ev.retrieval_metrics(x, x)
    for prefix in ("i2t", "t2i"):
        assert m[f"{prefix}_recall@1"] == pytest.approx(1 / n)
        assert m[f"{prefix}_recall@5"] == pytest.approx(5 / n) and m[f"{prefix}_recall@10"] == pytest.approx(10 / n)
        assert m[f"{prefix}_mean_rank"] == pytest.approx((n + 1) / 2)
        assert m[f"{prefix}_median_rank"] == pytest.approx((n + 1) / 2)
    # K captions per image, all identical: the first of the image's K correct captions among N * K tied ones.
    k = 4
    m = ev.retrieval_metrics(x, np.repeat(x[:, None], k, axis=1))
    assert m["i2t_mean_rank"] == pytest.approx(1 + (n - 1) * k / (k + 1))
    assert m["i2t_recall@1"] == pytest.approx(k / (n * k))
    assert m["t2i_recall@1"] == pytest.approx(1 / n)
    zero_shot = ev.zero_shot_metrics(x, np.tile(x[:1], (5, 1)), np.arange(n) % 5, top_k=2)
    assert zero_shot == pytest.approx({"zero_shot_top1": 1 / 5, "zero_shot_top2": 2 / 5})


def test_tied_rank_probabilities_match_random_tie_breaking():
    rng = np.random.default_rng(0)
    greater, tied, correct = np.array([0, 2, 1, 0, 5]), np.array([6, 3, 0, 2, 1]), np.array([2, 1, 1, 3, 1])
    ranks = ev.TiedRanks(greater, tied, correct)
    draws = []
    for _ in range(20000):
        rank = []
        for g, t, c in zip(greater, tied, correct):
            order = rng.permutation(np.array([0] * t + [1] * c))
            rank.append(g + 1 + int(np.argmax(order)))
        draws.append(rank)
    draws = np.array(draws)
    np.testing.assert_allclose(ranks.expected(), draws.mean(0), atol=0.05)
    for k in (1, 2, 3, 5):
        np.testing.assert_allclose(ranks.within(k), (draws <= k).mean(0), atol=0.015)


def test_zero_shot_key_keeps_its_configured_name_with_few_classes():
    classes = np.eye(3, dtype=np.float32)
    m = ev.zero_shot_metrics(np.eye(3, dtype=np.float32), classes, np.array([0, 1, 2]), top_k=5)
    assert set(m) == {"zero_shot_top1", "zero_shot_top5"} and m["zero_shot_top5"] == 1.0  # Was zero_shot_top3.
    with pytest.raises(ValueError, match="top_k=0"):
        ev.zero_shot_metrics(np.eye(3), classes, np.array([0, 1, 2]), top_k=0)
