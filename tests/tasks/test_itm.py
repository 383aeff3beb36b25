"""Image–text matching (ALBEF-style ITM with in-batch hard negatives): model outputs, negative sampling, the loss
formula, 1 vs 8 devices, a short training run and config errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.metrics import retrieval as evaluators
from mmjax.nn.builder import build_model
from mmjax.nn.models.matching import MatchingModel, sample_negatives
from mmjax.tasks import build_task
from mmjax.tasks.itm import Itm
from mmjax.train.step import init_state, train_step

B, L, VOCAB = 8, 6, 20


def _model_config(**matching_options):
    return ml_collections.ConfigDict(dict(
        name="matching",
        num_classes=3,
        encoders=dict(
            image=dict(name="vit", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32),
            text=dict(name="text_transformer", vocab_size=VOCAB, max_len=L, width=16, depth=1, num_heads=2,
                      mlp_dim=32),
        ),
        matching={**dict(embed_dim=8, fusion_dim=16, num_layers=1, num_heads=2, mlp_dim=32), **matching_options},
    ))


def _batch(rng, b=B):
    ids = rng.integers(1, VOCAB, size=(b, L)).astype(np.int32)
    ids[:, 4:] = 0  # Padding.
    return {"image": rng.normal(size=(b, 8, 8, 3)).astype(np.float32), "text": ids, "label": np.zeros(b, np.int32)}


@functools.cache
def _model_and_params():
    model = build_model(_model_config())
    init = jax.jit(lambda key, batch: model.init(key, batch, train=False)["params"])
    return model, init(jax.random.PRNGKey(0), _batch(np.random.default_rng(0)))


@functools.cache
def _apply():
    """`apply(batch, key, train)`, jitted once for every test (compiled once per batch structure)."""
    model, params = _model_and_params()
    return jax.jit(lambda batch, key, train: model.apply({"params": params}, batch, train=train,
                                                         rngs={"dropout": key}), static_argnums=2)


def test_output_shapes_and_pairs_in_train_and_eval_modes():
    model, params = _model_and_params()
    assert isinstance(model, MatchingModel) and model.aliases == {"negatives": "text"}
    batch = _batch(np.random.default_rng(1))
    apply = _apply()
    key0 = jax.random.PRNGKey(0)  # Unused at evaluation.
    out = apply(batch, jax.random.PRNGKey(3), True)
    assert out["image"].shape == (B, 8) and out["text"].shape == (B, 8) and out["logit_scale"].shape == ()
    assert out["itm_logits"].shape == (B, 3) and out["itm_logits"].dtype == jnp.float32
    assert out["negative_text_index"].shape == (B,) and out["negative_image_index"].shape == (B,)
    np.testing.assert_allclose(np.linalg.norm(out["text"], axis=-1), 1.0, rtol=1e-5)

    # The 3 training logits are the cross-encoder's scores of (i, i), (i, negative text), (negative image, i).
    nt, ni = np.asarray(out["negative_text_index"]), np.asarray(out["negative_image_index"])
    score = lambda image, text: apply({"image": image, "text": text}, key0, False)["itm_logits"]  # noqa: E731
    assert score(batch["image"], batch["text"]).shape == (B,)
    np.testing.assert_allclose(out["itm_logits"][:, 0], score(batch["image"], batch["text"]), atol=1e-5)
    np.testing.assert_allclose(out["itm_logits"][:, 1], score(batch["image"], batch["text"][nt]), atol=1e-5)
    np.testing.assert_allclose(out["itm_logits"][:, 2], score(batch["image"][ni], batch["text"]), atol=1e-5)

    # Evaluation: K captions and N hard negatives per image; each scored against its own image.
    k, n = 3, 2
    rng = np.random.default_rng(2)
    captions = np.stack([batch["text"], *[_batch(rng)["text"] for _ in range(k - 1)]], axis=1)
    negatives = np.stack([_batch(rng)["text"] for _ in range(n)], axis=1)
    ev = apply({"image": batch["image"], "text": captions, "negatives": negatives}, key0, False)
    assert ev["text"].shape == (B, k, 8) and ev["negatives"].shape == (B, n, 8)
    assert ev["itm_logits"].shape == (B, k) and ev["negatives_itm_logits"].shape == (B, n)
    assert "negative_text_index" not in ev
    for j in range(k):
        np.testing.assert_allclose(ev["itm_logits"][:, j], score(batch["image"], captions[:, j]), atol=1e-5)
    for j in range(n):
        np.testing.assert_allclose(ev["negatives_itm_logits"][:, j], score(batch["image"], negatives[:, j]),
                                   atol=1e-5)
        alone = apply({"image": batch["image"], "text": negatives[:, j]}, key0, False)["text"]
        np.testing.assert_allclose(ev["negatives"][:, j], alone, atol=1e-6)  # Encoded by the text tower.
    # `embed` (zero-shot evaluation) gives the same unit embeddings as the model's outputs.
    embedded = jax.jit(lambda x: model.apply({"params": params}, "text", x, method="embed"))(captions)
    np.testing.assert_allclose(embedded, ev["text"], atol=1e-6)
    # Training on K captions uses the first one.
    many = apply(batch | {"text": captions}, jax.random.PRNGKey(3), True)
    assert many["text"].shape == (B, k, 8)
    np.testing.assert_allclose(many["itm_logits"], out["itm_logits"], atol=1e-5)


def test_negatives_are_never_the_positive_and_deterministic_given_the_rng():
    model, params = _model_and_params()
    batch = _batch(np.random.default_rng(4))
    apply = _apply()
    draws = []
    for seed in range(20):
        out = apply(batch, jax.random.PRNGKey(seed), True)
        again = apply(batch, jax.random.PRNGKey(seed), True)
        for key in ("negative_text_index", "negative_image_index"):
            np.testing.assert_array_equal(out[key], again[key])
            assert np.all(np.asarray(out[key]) != np.arange(B)) and np.all((0 <= out[key]) & (out[key] < B))
        draws.append(np.asarray(out["negative_text_index"]))
    assert len({d.tobytes() for d in draws}) > 1  # Different rngs, different negatives.
    # Identical texts (a duplicated caption) are still negatives, by index.
    same = batch | {"text": np.repeat(batch["text"][:1], B, axis=0)}
    out = apply(same, jax.random.PRNGKey(0), True)
    assert np.all(np.asarray(out["negative_text_index"]) != np.arange(B))
    with pytest.raises(ValueError, match="rngs=\\{'dropout': key\\}"):
        jax.eval_shape(lambda: model.apply({"params": params}, batch, train=True))
    with pytest.raises(ValueError, match="at least 2 examples"):
        jax.eval_shape(lambda: model.apply({"params": params}, _batch(np.random.default_rng(0), 1), train=True,
                                           rngs={"dropout": jax.random.PRNGKey(0)}))


def test_sampling_follows_the_softmax_over_the_other_examples():
    b, draws = 6, 4000
    rng = np.random.default_rng(5)
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    sample = jax.jit(jax.vmap(sample_negatives, in_axes=(0, None)))
    # One clearly most similar other example per row: it is drawn almost always, the positive never.
    logits = rng.normal(size=(b, b)).astype(np.float32)
    hardest = (np.arange(b) + 1 + rng.integers(0, b - 1, size=b)) % b
    logits[np.arange(b), hardest] += 8.0
    logits[np.arange(b), np.arange(b)] = 50.0  # The positive is the most similar of all, yet never drawn.
    picks = np.asarray(sample(keys[:200], jnp.asarray(logits)))  # [200, b]
    assert np.all(picks != np.arange(b))
    assert np.all(np.mean(picks == hardest, axis=0) > 0.9)
    # Frequencies match softmax_j(logits[i, j]) over j != i.
    logits = rng.normal(size=(b, b)).astype(np.float32)
    picks = np.asarray(sample(keys, jnp.asarray(logits)))
    masked = np.where(np.eye(b, dtype=bool), -np.inf, logits)
    expected = np.exp(masked - masked.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    observed = np.stack([np.bincount(picks[:, i], minlength=b) / draws for i in range(b)])
    np.testing.assert_allclose(observed, expected, atol=0.035)
    # Deterministic given the key; no gradient through the similarities.
    np.testing.assert_array_equal(sample(keys[:5], logits), sample(keys[:5], logits))
    grad = jax.grad(lambda s: sample_negatives(keys[0], s).astype(jnp.float32).sum() * s.sum())(jnp.asarray(logits))
    np.testing.assert_allclose(grad, np.full((b, b), float(sample_negatives(keys[0], logits).sum())))


def _bce(z, t):
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


def _clip(x, y, scale):
    logits = scale * x @ y.T

    def log_softmax(z, axis):
        z = z - z.max(axis=axis, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))

    return -0.5 * (np.diag(log_softmax(logits, 1)) + np.diag(log_softmax(logits, 0)))


def _unit(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_loss_is_the_itm_bce_plus_weighted_clip_on_a_controlled_example():
    rng = np.random.default_rng(6)
    b, d = 5, 4
    x, y = _unit(rng, (b, d)), _unit(rng, (b, 2, d))
    logits = rng.normal(scale=3.0, size=(b, 3)).astype(np.float32)
    outputs = {"image": x, "text": y, "logit_scale": np.float32(np.log(5.0)), "itm_logits": logits,
               "negative_text_index": np.zeros(b, np.int32), "negative_image_index": np.zeros(b, np.int32)}
    targets = np.array([1.0, 0.0, 0.0])
    itm = _bce(logits, targets).mean(1)
    itc = _clip(x, y[:, 0], 5.0)
    task = build_task({"name": "itm", "itc_weight": 0.3}, 3)
    loss = task.loss(jax.tree_util.tree_map(jnp.asarray, outputs), None)
    assert loss.shape == (b,) and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, itm + 0.3 * itc, rtol=1e-5)
    np.testing.assert_allclose(build_task({"name": "itm", "itc_weight": 0.0}, 3).loss(outputs, None), itm, rtol=1e-5)
    metrics = task.train_metrics(outputs, None)
    np.testing.assert_allclose(metrics["itm_accuracy"], np.mean((logits > 0) == (targets > 0.5)))
    np.testing.assert_allclose(metrics["i2t_accuracy"], np.mean(np.argmax(x @ y[:, 0].T, 1) == np.arange(b)))
    # Evaluation layout: K true captions (target 1) and N hard negatives (target 0), averaged per example.
    true, false = rng.normal(size=(b, 2)).astype(np.float32), rng.normal(size=(b, 3)).astype(np.float32)
    ev = {"image": x, "text": y, "logit_scale": np.float32(np.log(5.0)), "itm_logits": true,
          "negatives_itm_logits": false}
    expected = np.concatenate([_bce(true, 1.0), _bce(false, 0.0)], axis=1).mean(1) + 0.3 * itc
    np.testing.assert_allclose(task.loss(ev, None), expected, rtol=1e-5)
    ev_single = {"image": x, "text": y[:, 0], "logit_scale": np.float32(0.0), "itm_logits": true[:, 0]}
    np.testing.assert_allclose(build_task({"name": "itm", "itc_weight": 0.0}, 3).loss(ev_single, None),
                               _bce(true[:, 0], 1.0), rtol=1e-5)


def test_eval_metrics():
    rng = np.random.default_rng(7)
    n, k, m, d = 12, 2, 3, 6
    x, y, z = _unit(rng, (n, d)), _unit(rng, (n, k, d)), _unit(rng, (n, m, d))
    true, false = rng.normal(size=(n, k)), rng.normal(size=(n, m))
    task = build_task({"name": "itm"}, 3)
    outputs = {"image": x, "text": y, "negatives": z, "logit_scale": 0.0, "itm_logits": true,
               "negatives_itm_logits": false}
    ev = jax.device_get(task.eval_outputs(jax.tree_util.tree_map(jnp.asarray, outputs)))
    assert set(ev) == {"image_embedding", "text_embedding", "negatives_embedding", "itm_logits",
                       "negatives_itm_logits"}
    result = task.metrics(ev, np.zeros(n))
    for key, value in {**evaluators.retrieval_metrics(x, y), **evaluators.binding_metrics(x, y, z)}.items():
        assert result[key] == pytest.approx(value)
    pairs = true[:, :, None] > false[:, None, :]
    assert result["itm_binding_accuracy"] == pytest.approx(pairs.mean())
    assert result["itm_binding_all"] == pytest.approx(np.mean(pairs.all(axis=(1, 2))))
    assert result["itm_true_accuracy"] == pytest.approx(np.mean(true > 0))
    assert result["itm_negative_accuracy"] == pytest.approx(np.mean(false < 0))
    assert result["itm_accuracy"] == pytest.approx((np.sum(true > 0) + np.sum(false < 0)) / (n * (k + m)))
    assert result["num_examples"] == n and task.default_best_metric in result
    # On dot-product scores, the score version is the embedding binding metric.
    scores = evaluators.score_binding_metrics(np.einsum("nd,nkd->nk", x, y), np.einsum("nd,nmd->nm", x, z))
    assert scores == pytest.approx(evaluators.binding_metrics(x, y, z))
    # Without negatives (one caption per image): retrieval and ITM accuracy on the true pairs.
    plain = task.metrics({"image_embedding": x, "text_embedding": y[:, 0], "itm_logits": true[:, 0]}, None)
    assert "itm_binding_accuracy" not in plain and plain["itm_accuracy"] == pytest.approx(np.mean(true[:, 0] > 0))


def _loss_and_grads(task, model, params, batch, key, mesh):
    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    replicated = NamedSharding(mesh, PartitionSpec())

    def loss_fn(params, batch, key):
        outputs = model.apply({"params": params}, batch, train=True, rngs={"dropout": key})
        indices = (outputs["negative_text_index"], outputs["negative_image_index"])
        return task.loss(outputs, batch["label"]).mean(), indices

    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(replicated, batch_sharding, replicated),
                 out_shardings=replicated)
    params = jax.device_put(params, replicated)
    batch = jax.device_put(batch, batch_sharding)
    return jax.device_get(fn(params, batch, jax.device_put(key, replicated)))


def test_global_batch_loss_gradients_and_negatives_equal_on_1_and_8_devices():
    assert jax.device_count() == 8
    model, params = _model_and_params()
    batch = _batch(np.random.default_rng(8), 16)
    task = build_task({"name": "itm"}, 3)
    key = jax.random.PRNGKey(11)
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    eight = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))  # Batch over both axes.
    ((loss1, idx1), grads1), ((loss8, idx8), grads8) = (
        _loss_and_grads(task, model, params, batch, key, mesh) for mesh in (one, eight))
    for a, b in zip(idx1, idx8):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    # Gradients are sums over the batch in another order on 8 devices: an element that is a small difference of
    # large terms differs by ~1e-5 of its leaf's scale (seen on AMD EPYC), so the absolute tolerance is relative
    # to each leaf's largest gradient.
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=max(1e-6, 1e-4 * float(np.abs(b).max()))),
        grads8, grads1)
    assert np.isfinite(loss1) and np.abs(grads1["logit_scale"]) > 0
    assert np.abs(grads1["itm_head"]["itm"]["kernel"]).sum() > 0


def _code_batch(rng, b, patterns):
    """Matched pairs share a random 2-digit base-8 code, distinct within a batch (no false negatives): image
    patch p (of 4) shows `patterns[p, digit p]` (the other patches are blank), text is [CLS] then token 1 + 8 p +
    digit p for each digit, then padding. Noise on every pixel."""
    codes = rng.choice(64, size=b, replace=False)
    digits = np.stack([codes // 8, codes % 8], axis=1)  # [b, 2]
    tiles = np.zeros((b, 4, 4, 4, 3), np.float32)
    tiles[:, :2] = patterns[np.arange(2), digits]
    image = tiles.reshape(b, 2, 2, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 8, 8, 3)
    image = image + 0.1 * rng.normal(size=image.shape)
    text = np.zeros((b, L), np.int32)
    text[:, 0] = VOCAB - 1  # [CLS]
    text[:, 1:3] = 1 + 8 * np.arange(2) + digits
    return {"image": image.astype(np.float32), "text": text, "label": np.zeros(b, np.int32)}


def test_short_training_run_learns_to_match():
    rng = np.random.default_rng(9)
    patterns = rng.normal(size=(2, 8, 4, 4, 3)).astype(np.float32)
    model = build_model(_model_config(fusion_dim=32, mlp_dim=64))
    task = build_task({"name": "itm"}, 3)
    tx = optax.adam(3e-3)
    state = jax.jit(functools.partial(init_state, model, tx))(_code_batch(rng, 32, patterns), jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, task=task))
    history = []
    for _ in range(300):  # Steps are cheap (~10 ms); compiling dominates.
        state, metrics = step(state, _code_batch(rng, 32, patterns))
        history.append(metrics)
    history = jax.device_get(history)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert np.mean([h["loss"] for h in history[-20:]]) < 0.5 * history[0]["loss"]
    # On the sampled hard negatives: predicting "mismatched" for every pair scores 2/3.
    assert np.mean([h["itm_accuracy"] for h in history[-20:]]) > 0.8
    # Held-out pairs: each image with its caption and with another image's caption.
    test = _code_batch(rng, 64, patterns)
    other = np.roll(test["text"], 1, axis=0)
    outputs = jax.jit(functools.partial(model.apply, train=False))(
        {"params": state.params}, {"image": test["image"], "text": test["text"], "negatives": other[:, None]})
    result = task.metrics(jax.device_get(task.eval_outputs(outputs)), None)
    assert result["itm_binding_accuracy"] > 0.9  # Chance: 0.5.
    assert result["itm_true_accuracy"] > 0.75 and result["itm_negative_accuracy"] > 0.75


def test_config_errors_and_registration():
    assert Itm.dataset_task == "contrastive" and not Itm.per_example_loss
    with pytest.raises(ValueError, match=r"model.matching: unknown field\(s\) \['fusion_width'\]; valid: "):
        build_model(_model_config(fusion_width=8))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        build_model(_model_config(num_heads=3))
    with pytest.raises(ValueError, match="model.matching.num_layers=0 must be a positive integer"):
        build_model(_model_config(num_layers=0))
    with pytest.raises(ValueError, match="model.matching.pool='max'"):
        build_model(_model_config(pool="max"))
    with pytest.raises(ValueError, match="needs exactly the encoders"):
        config = _model_config()
        config.encoders.audio = dict(name="small_cnn")
        build_model(config)
    with pytest.raises(ValueError, match=r"model.name='match'; valid: .*matching"):
        build_model(ml_collections.ConfigDict({**_model_config().to_dict(), "name": "match"}))
    with pytest.raises(ValueError, match=r"task \(itm\): unknown option\(s\) \['itc'\]"):
        build_task({"name": "itm", "itc": 1.0}, 3)
    with pytest.raises(ValueError, match="itc_weight=-1"):
        build_task({"name": "itm", "itc_weight": -1.0}, 3)
    with pytest.raises(KeyError, match="itm_logits"):
        build_task({"name": "itm"}, 3).loss({"image": jnp.ones((2, 4)), "text": jnp.ones((2, 4)),
                                             "logit_scale": 0.0}, None)
