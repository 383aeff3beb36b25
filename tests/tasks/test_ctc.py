"""The CTC loss against hand-computed values, a brute-force sum over every alignment and optax; the ctc task's
normalisation, infeasible examples and metrics; best-path decoding on known frames (mmjax.tasks.ctc,
mmjax.nn.models.ctc_head)."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.nn.models.ctc_head import ctc_greedy_decode, ctc_targets
from mmjax.tasks import build_task
from mmjax.tasks.losses import ctc_loss

A, B, BLANK = 0, 1, 2  # Two labels and the blank (the last id, as the CTC head's).


def collapse(path, blank):
    """B(pi) of Graves et al. 2006: merge repeated symbols, then drop blanks."""
    merged = [s for i, s in enumerate(path) if i == 0 or s != path[i - 1]]
    return tuple(s for s in merged if s != blank)


def brute_force_nll(logits, target, blank):
    """-log sum over every alignment pi in K^T with B(pi) = target of prod_t softmax(logits_t)[pi_t]."""
    logp = np.asarray(logits, np.float64) - np.log(np.exp(np.asarray(logits, np.float64)).sum(-1, keepdims=True))
    frames, symbols = logp.shape
    total = sum(math.exp(sum(logp[t, s] for t, s in enumerate(path)))
                for path in itertools.product(range(symbols), repeat=frames) if collapse(path, blank) == tuple(target))
    return -math.log(total)


def _loss(logits, target, frames=None):
    logits = jnp.asarray(logits, jnp.float32)[None]
    frames = logits.shape[1] if frames is None else frames
    mask = jnp.arange(logits.shape[1])[None] < frames
    targets = jnp.asarray(target + [0] * (4 - len(target)), jnp.int32)[None]
    target_mask = jnp.arange(4)[None] < len(target)
    return float(ctc_loss(logits, mask, targets, target_mask, blank_id=BLANK)[0])


# Uniform frame probabilities (1/3 each) over 3 frames: p(y) = (number of alignments of y) / 27, counted by hand.
@pytest.mark.parametrize("target, alignments", [
    ([A], ["a--", "-a-", "--a", "aa-", "-aa", "aaa"]),
    ([A, B], ["ab-", "a-b", "-ab", "aab", "abb"]),
    ([A, A], ["a-a"]),  # A repeat needs a blank between: the only way in 3 frames.
    ([A, B, A], ["aba"]),
])
def test_ctc_loss_of_uniform_frames_counts_the_alignments(target, alignments):
    symbols = {"a": A, "b": B, "-": BLANK}
    assert all(collapse([symbols[c] for c in path], BLANK) == tuple(target) for path in alignments)
    expected = -math.log(len(alignments) / 27)
    uniform = np.zeros((3, 3))
    assert brute_force_nll(uniform, target, BLANK) == pytest.approx(expected, rel=1e-12)
    assert _loss(uniform, target) == pytest.approx(expected, rel=1e-6)


def test_ctc_loss_equals_the_brute_force_sum_and_optax_on_random_frames():
    rng = np.random.default_rng(0)
    for target in ([A], [B, A], [A, A], [B, A, B]):
        logits = rng.normal(size=(5, 3)) * 2.0
        expected = brute_force_nll(logits, target, BLANK)
        assert _loss(logits, target) == pytest.approx(expected, rel=1e-5)
        paddings = np.zeros((1, len(target)))
        direct = optax.ctc_loss(jnp.asarray(logits, jnp.float32)[None], jnp.zeros((1, 5)),
                                jnp.asarray([target]), jnp.asarray(paddings), blank_id=BLANK)
        assert float(direct[0]) == pytest.approx(expected, rel=1e-5)


def test_padded_frames_and_targets_do_not_count():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 3))
    padded = np.concatenate([logits, rng.normal(size=(3, 3)) * 5.0])  # 3 padding frames of anything.
    assert _loss(padded, [A, B], frames=4) == pytest.approx(brute_force_nll(logits, [A, B], BLANK), rel=1e-5)
    assert _loss(padded, [A, B], frames=4) != pytest.approx(_loss(padded, [A, B]), rel=1e-3)


def _outputs(logits, frames, targets, target_mask):
    return {"ctc_logits": jnp.asarray(logits, jnp.float32), "ctc_mask": jnp.asarray(frames, bool),
            "targets": jnp.asarray(targets, jnp.int32), "target_mask": jnp.asarray(target_mask, bool)}


def test_ctc_task_loss_is_per_target_word_and_infeasible_examples_are_reported_not_trained():
    task = build_task({"name": "ctc"}, num_classes=5)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 4, 3))
    frames = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    targets = [[A, B, 0], [A, 0, 0], [A, A, 0]]  # The third: "a a" needs 3 frames, it has 2.
    target_mask = [[1, 1, 0], [1, 0, 0], [1, 1, 0]]
    outputs = _outputs(logits, frames, targets, target_mask)
    loss = np.asarray(task.loss(outputs, None))
    assert loss[0] == pytest.approx(brute_force_nll(logits[0], [A, B], BLANK) / 2, rel=1e-5)
    assert loss[1] == pytest.approx(brute_force_nll(logits[1], [A], BLANK), rel=1e-5)
    assert loss[2] == 0.0
    metrics = task.train_metrics(outputs, None)
    assert float(metrics["infeasible_fraction"]) == pytest.approx(1 / 3)
    best = logits.argmax(-1)
    blank = ((best == BLANK) & np.asarray(frames, bool)).sum() / np.sum(frames)
    assert float(metrics["blank_fraction"]) == pytest.approx(blank)
    split = task.metrics({k: np.asarray(v) for k, v in task.eval_outputs(outputs).items()}, None)
    assert split == {"blank_fraction": pytest.approx(blank), "infeasible_fraction": pytest.approx(1 / 3),
                     "num_examples": 3}


def test_ctc_task_refuses_a_model_without_a_ctc_head():
    task = build_task({"name": "ctc"}, num_classes=5)
    with pytest.raises(KeyError, match="task ctc needs a CTC head's per-frame logits"):
        task.loss({"logits": jnp.zeros((1, 2, 3))}, None)


def test_ctc_targets_are_the_words_of_the_text_moved_to_the_front():
    text = jnp.asarray([[2, 7, 7, 9, 3, 0], [2, 5, 3, 0, 0, 0]])  # [CLS] w w w [SEP] [PAD]...
    targets, mask = ctc_targets(text, (0, 2, 3))
    np.testing.assert_array_equal(np.asarray(targets)[np.asarray(mask)], [7, 7, 9, 5])
    np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(targets)[0, :3], [7, 7, 9])
    assert int(targets[1, 0]) == 5


def test_best_path_decoding_merges_repeats_and_drops_blanks():
    # Most likely symbol per frame:  a a - a b b - - b  (blank = 2), then padding frames.
    path = [A, A, BLANK, A, B, B, BLANK, BLANK, B, A, A]
    logits = np.full((1, len(path), 3), -5.0)
    logits[0, np.arange(len(path)), path] = 5.0
    mask = np.arange(len(path))[None] < 9  # The last two frames are padding.
    decoded = np.asarray(ctc_greedy_decode(jnp.asarray(logits), jnp.asarray(mask), blank_id=BLANK))
    np.testing.assert_array_equal(decoded, [[A, A, B, B, -1, -1, -1, -1, -1, -1, -1]])
    all_blank = np.zeros((1, 4, 3))
    all_blank[..., BLANK] = 1.0
    np.testing.assert_array_equal(ctc_greedy_decode(jnp.asarray(all_blank), jnp.ones((1, 4), bool), BLANK),
                                  [[-1, -1, -1, -1]])
