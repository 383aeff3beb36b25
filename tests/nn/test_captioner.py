"""The text decoder (`Captioner`), its losses (`caption`, `coca`) and generation (`mmjax.nn.decoding`): the loss
against a numpy reference, causal and prefix masking, modality masks, cached == uncached decoding, beam 1 ==
greedy, sampling filters, EOS handling, 1 vs 8 devices and the errors raised before compilation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.nn import decoding
from mmjax.nn.builder import build_model
from mmjax.nn.models.captioner import prefix_lm_mask
from mmjax.tasks import build_task
from mmjax.tasks import losses as task_losses

VOCAB, B, L = 24, 8, 9
BOS, EOS, PAD = 2, 3, 0


def _config(mode="cross", **decoder):
    return ml_collections.ConfigDict(dict(
        name="captioner", num_classes=5,
        encoders=dict(image=dict(name="vit", patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
                      audio=dict(name="spectrogram_cnn", features=(4,), width=16)),
        decoder={**dict(mode=mode, condition=("image",), vocab_size=VOCAB, max_len=16, width=16, depth=1,
                        num_heads=2, mlp_dim=32), **decoder}))


def _batch(seed=0, b=B, prompt=0):
    rng = np.random.default_rng(seed)
    text = np.full((b, L), PAD, np.int32)
    for i in range(b):
        n = int(rng.integers(2, L - 2))
        text[i, 0], text[i, 1:n + 1], text[i, n + 1] = BOS, rng.integers(5, VOCAB, n), EOS
    batch = {"image": rng.normal(size=(b, 16, 16, 3)).astype(np.float32),
             "audio": rng.normal(size=(b, 12, 8)).astype(np.float32), "text": text}
    if prompt:
        batch["prompt"] = rng.integers(5, VOCAB, size=(b, prompt)).astype(np.int32)
        batch["prompt"][0, -1] = PAD  # A padded prompt token.
    return batch


_MODELS: dict = {}


def _model(mode):
    """The tiny captioner of `mode` and its variables, built once per module."""
    if mode not in _MODELS:
        model = build_model(_config(mode))
        _MODELS[mode] = model, model.init(jax.random.PRNGKey(0), _batch(prompt=2), train=False)
    return _MODELS[mode]


@pytest.fixture(scope="module", params=["cross", "prefix"])
def model_and_variables(request):
    return _model(request.param)


def test_teacher_forced_loss_equals_a_numpy_reference(model_and_variables):
    model, variables = model_and_variables
    batch = _batch(1)
    outputs = model.apply(variables, batch, train=False)
    assert outputs["logits"].shape == (B, L - 1, VOCAB) and outputs["logits"].dtype == jnp.float32
    logits, targets = np.asarray(outputs["logits"], np.float64), batch["text"][:, 1:]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    for smoothing in (0.0, 0.1):
        task = build_task({"name": "caption", "label_smoothing": smoothing}, 5)
        loss = np.asarray(task.loss(outputs, None))
        for i in range(B):
            real = targets[i] != PAD
            q = np.full((real.sum(), VOCAB), smoothing / VOCAB)
            q[np.arange(real.sum()), targets[i][real]] += 1 - smoothing
            expected = -(q * logp[i][real]).sum(-1).mean()
            np.testing.assert_allclose(loss[i], expected, rtol=1e-5)
    metrics = task.metrics(jax.tree_util.tree_map(np.asarray, task.eval_outputs(outputs)), None)
    assert 0 <= metrics["token_accuracy"] <= 1 and metrics["perplexity"] > 1


def test_changing_a_future_token_leaves_earlier_logits_unchanged(model_and_variables):
    model, variables = model_and_variables
    batch = _batch(2, prompt=2)
    base = np.asarray(model.apply(variables, batch, train=False)["logits"])
    changed = dict(batch, text=batch["text"].copy())
    changed["text"][:, 5] = (changed["text"][:, 5] + 7) % VOCAB  # Input position 5 feeds logits 5 onwards.
    other = np.asarray(model.apply(variables, changed, train=False)["logits"])
    np.testing.assert_array_equal(base[:, :5], other[:, :5])
    assert np.abs(base[:, 5:] - other[:, 5:]).max() > 1e-4
    # The prompt precedes the text: changing its first token changes every text position.
    prompted = dict(batch, prompt=batch["prompt"].copy())
    prompted["prompt"][:, 0] = (prompted["prompt"][:, 0] + 3) % VOCAB
    assert np.abs(np.asarray(model.apply(variables, prompted, train=False)["logits"])[:, 0] - base[:, 0]).min() > 0


def test_prefix_lm_mask_is_bidirectional_over_the_prefix_and_hides_padding():
    model = build_model(_config("prefix"))
    variables = model.init(jax.random.PRNGKey(0), _batch(prompt=2), train=False)
    layout = model.apply(variables, jnp.ones((1, 2), bool), jnp.array([[True, False]]), 3,
                         method=type(model).sequence_layout)
    mask = np.asarray(prefix_lm_mask(jnp.arange(7), *layout))[0, 0].astype(int)
    # Keys: 2 context tokens, 2 prompt tokens (the second padding), 3 text tokens.
    assert mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0]  # The context sees the real prompt, not the text.
    assert mask[5].tolist() == [1, 1, 1, 0, 1, 1, 0]  # Text: the prefix, then causal.
    cross = build_model(_config("cross"))
    layout = cross.apply(cross.init(jax.random.PRNGKey(0), _batch(), train=False), jnp.ones((1, 2), bool),
                         jnp.array([[True, True]]), 2, method=type(cross).sequence_layout)
    assert np.asarray(prefix_lm_mask(jnp.arange(4), *layout))[0, 0].astype(int).tolist() == np.tril(
        np.ones((4, 4), int)).tolist()  # Cross mode: the prompt is causal too.


@pytest.mark.parametrize("mode", ["cross", "prefix"])
def test_a_missing_modality_is_masked_out(mode):
    model = build_model(_config(mode, condition=("image", "audio")))
    batch = _batch(4)
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    missing = dict(batch, audio_mask=np.array([0.0] * 4 + [1.0] * 4, np.float32))
    noisy = dict(missing, audio=batch["audio"] + 5.0)
    a = np.asarray(model.apply(variables, missing, train=False)["logits"])
    b = np.asarray(model.apply(variables, noisy, train=False)["logits"])
    np.testing.assert_allclose(a[:4], b[:4], atol=1e-6)  # Audio absent: its values do not matter.
    assert np.abs(a[4:] - b[4:]).max() > 1e-4  # Audio present: they do.


# Programs compiled without XLA's backend optimisations (as mmjax.train.compilation.OneShot): 40% less compile
# time, and every comparison below compiles both sides the same way.
FAST = {"xla_backend_optimization_level": 0}
_RESULTS = {}


def _generate(model, variables, batch, **options):
    """Generated tokens and scores (memoised per model, batch and options: several tests compare the same runs)."""
    key = (model.mode, tuple(sorted(batch)), tuple(sorted(options.items())))
    if key not in _RESULTS:
        config = decoding.DecodeConfig(**{"max_length": 10, "eos_id": EOS, **options})
        decoding.check_decode(model, config, batch.get("prompt", np.zeros((1, 0))).shape[1])
        fn = jax.jit(lambda v, b: decoding.generate(model, v, b, config, jax.random.PRNGKey(5)))
        compiled = fn.lower(variables, batch).compile(compiler_options=FAST)
        _RESULTS[key] = jax.tree_util.tree_map(np.asarray, compiled(variables, batch))
    return _RESULTS[key]


# Both modes' caches are checked with greedy and beam search; sampling draws through the same loop and cache path
# as greedy, so its cache check runs in one mode (each case compiles two decoders: CI time).
@pytest.mark.parametrize("mode, method", [("cross", "greedy"), ("cross", "beam"), ("cross", "sample"),
                                          ("prefix", "greedy"), ("prefix", "beam")])
def test_cached_decoding_gives_the_tokens_of_uncached_decoding(mode, method):
    model, variables = _model(mode)
    batch = {"image": _batch(5)["image"], "prompt": _batch(5, prompt=2)["prompt"]}
    cached = _generate(model, variables, batch, method=method, beam_size=3)
    uncached = _generate(model, variables, batch, method=method, beam_size=3, use_cache=False)
    np.testing.assert_array_equal(cached["tokens"], uncached["tokens"])
    np.testing.assert_allclose(cached["score"], uncached["score"], rtol=1e-4, atol=1e-4)
    assert (cached["tokens"][:, 0] == BOS).all() and cached["tokens"].shape == (B, 10 - 2)


def test_beam_one_is_greedy_and_top_k_one_is_greedy():
    """The searches only read the decoder's next-token log-probabilities, whatever the mode: checked in one."""
    model, variables = _model("cross")
    batch = {"image": _batch(5)["image"], "prompt": _batch(5, prompt=2)["prompt"]}
    greedy = _generate(model, variables, batch, method="greedy")
    beam_one = _generate(model, variables, batch, method="beam", beam_size=1, length_penalty=0.0)
    np.testing.assert_array_equal(beam_one["tokens"], greedy["tokens"])
    np.testing.assert_allclose(beam_one["score"], greedy["score"], rtol=1e-5)
    np.testing.assert_array_equal(_generate(model, variables, batch, method="sample", top_k=1)["tokens"],
                                  greedy["tokens"])
    # A wider beam never finds a worse summed log-probability than greedy (length penalty off).
    wide = _generate(model, variables, batch, method="beam", beam_size=4, length_penalty=0.0)
    assert (wide["score"] >= greedy["score"] - 1e-4).all()


def test_filters_and_length_penalty():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda f: np.isfinite(np.asarray(f))[0].tolist()
    assert kept(decoding.filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(decoding.filter_logits(logits, top_p=0.7)) == [True, True, False, False]
    assert kept(decoding.filter_logits(logits, top_p=0.85)) == [True, True, True, False]
    np.testing.assert_allclose(decoding.length_penalty(jnp.array([1, 7]), 0.6), [1.0, 2.0 ** 0.6], rtol=1e-6)


def test_eos_ends_a_sequence_with_padding():
    model = build_model(_config("cross"))
    variables = model.init(jax.random.PRNGKey(0), _batch(), train=False)
    # At initialisation the next-token distribution is nearly uniform: [EOS] is drawn with p ~ 1/24 per step.
    tokens = _generate(model, variables, {"image": _batch(7)["image"]}, method="sample")["tokens"]
    assert tokens.shape == (B, 10)
    finished = 0
    for row in tokens:
        ends = np.flatnonzero(row == EOS)
        if len(ends):
            finished += 1
            assert (row[ends[0] + 1:] == PAD).all()
    assert 0 < finished < B  # Some sampled [EOS] early (and stopped there), some ran to max_length.


def test_one_and_eight_devices_generate_the_same_tokens(model_and_variables):
    model, variables = model_and_variables
    batch = {"image": _batch(8)["image"], "prompt": _batch(8, prompt=2)["prompt"]}
    assert jax.device_count() == 8
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.array(devices), ("data",))
        sharding = NamedSharding(mesh, PartitionSpec("data"))
        replicated = NamedSharding(mesh, PartitionSpec())
        methods = ("beam",) if model.mode == "cross" else ("sample",)  # Greedy is the loop of sampling.
        for method in methods:
            config = decoding.DecodeConfig(max_length=10, method=method, beam_size=2, eos_id=EOS)
            args = (jax.device_put(variables, replicated), jax.device_put(batch, sharding), jax.random.PRNGKey(1))
            fn = decoding.jit_generate(model, config, replicated, sharding)
            out = fn.lower(*args).compile(compiler_options=FAST)(*args)
            assert out["tokens"].sharding.is_equivalent_to(sharding, 2)
            results.append(np.asarray(out["tokens"]))
    half = len(results) // 2
    for one, eight in zip(results[:half], results[half:]):
        np.testing.assert_array_equal(one, eight)


def test_coca_loss_is_the_weighted_sum_of_caption_and_clip_losses():
    config = _config("cross", embed_dim=8, contrastive=("image", "text"))
    config.encoders.text = dict(name="text_transformer", vocab_size=VOCAB, max_len=L, width=16, depth=1,
                                num_heads=2, mlp_dim=32)
    model = build_model(config)
    batch = _batch(9)
    variables = model.init(jax.random.PRNGKey(0), batch, train=False)
    outputs = model.apply(variables, batch, train=False)
    coca = build_task({"name": "coca"}, 5)
    caption = build_task({"name": "caption"}, 5)
    clip = task_losses.clip_loss(outputs["image"], outputs["text"], outputs["logit_scale"])
    np.testing.assert_allclose(coca.loss(outputs, None), 2.0 * caption.loss(outputs, None) + clip, rtol=1e-6)
    assert not type(coca).per_example_loss and type(caption).per_example_loss
    with pytest.raises(ValueError, match="use task.name='coca'"):
        build_task({"name": "caption", "contrastive_weight": 1.0}, 5)
    with pytest.raises(ValueError, match="embed_dim > 0"):
        coca.loss({k: outputs[k] for k in ("logits", "targets", "target_mask")}, None)


def test_bad_requests_fail_before_compilation(model_and_variables):
    model, _ = model_and_variables  # max_len 16.
    ok = decoding.DecodeConfig(max_length=14, eos_id=EOS)
    decoding.check_decode(model, ok, prompt_length=12)  # Prompt, [BOS] and one new token fit.
    with pytest.raises(ValueError, match="longer than the decoder's context"):
        decoding.check_decode(model, ok, prompt_length=15)
    with pytest.raises(ValueError, match="must exceed the prompt"):
        decoding.check_decode(model, decoding.DecodeConfig(max_length=5), prompt_length=4)
    with pytest.raises(ValueError, match="exceeds the decoder's max_len"):
        decoding.check_decode(model, decoding.DecodeConfig(max_length=17))
    with pytest.raises(ValueError, match="tokenizer has 30 tokens but the decoder's vocab_size is 24"):
        decoding.check_decode(model, ok, tokenizer_vocab_size=30)
    with pytest.raises(ValueError, match="beam_size=0 must be an integer >= 1"):
        decoding.check_decode(model, decoding.DecodeConfig(method="beam", beam_size=0))
    with pytest.raises(ValueError, match="method 'nucleus' is unknown"):
        decoding.check_decode(model, decoding.DecodeConfig(method="nucleus"))
    with pytest.raises(ValueError, match="top_p=0"):
        decoding.check_decode(model, decoding.DecodeConfig(max_length=8, method="sample", top_p=0.0))
    with pytest.raises(ValueError, match="eos_id=99"):
        decoding.check_decode(model, decoding.DecodeConfig(max_length=8, eos_id=99))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"decoder.condition=\['image', 'table'\].*no encoder for it"):
        build_model(_config(condition=("image", "table")))
    with pytest.raises(ValueError, match="model.decoder.mode='causal'"):
        build_model(_config(mode="causal"))
    with pytest.raises(ValueError, match="width=16 is not divisible by num_heads=3"):
        build_model(_config(num_heads=3))
    with pytest.raises(ValueError, match="unknown field"):
        build_model(_config(layers=2))
    with pytest.raises(ValueError, match="contrastive=.*must name 2 modalities with encoders"):
        build_model(_config(embed_dim=8, contrastive=("image", "text")))
