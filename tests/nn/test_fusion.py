"""The fusion library: every registered method on 2 and 3 modalities of different widths and token counts, sorted
modality order, exact masking (no influence, zero gradient), and the reference formulas of TFN, LMF and late fusion."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mmjax.nn.fusion  # noqa: F401  (registers the fusions)
from mmjax.nn.common import EncoderOutput
from mmjax.nn.heads import ClassifierHead
from mmjax.registry import FUSIONS

B, NUM_CLASSES, DIM = 4, 5, 8
SPECS = {"audio": (6, 4), "image": (8, 5), "text": (7, 3)}  # modality -> (width D_m, tokens T_m)
TEXT_PADDING = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], np.float32)
TINY = dict(dim=DIM, hidden=8, rank=3, num_heads=2, num_layers=1, self_layers=1, mlp_dim=16, num_bottlenecks=2)
OVERRIDES = {"bottleneck": dict(num_layers=2, fusion_layer=1)}  # One layer without, one with bottlenecks.
# Fusions that condition an encoder (FiLM) run inside the model: tests/nn/test_serial_fusion.py.
DIRECT = [n for n in FUSIONS.names() if not getattr(FUSIONS.get(n), "conditions_encoders", False)]
# Every registered name with its defaults, plus the non-default variants of the methods with a choice field.
CASES = [(name, ()) for name in DIRECT] + [
    ("multiplicative", (("form", "matrix"),)),
    ("late", (("combine", "learned"),)),
    ("late", (("combine", "product"),)),
    ("nl_gate", (("query", "image"),)),
]
IDS = [name + "".join(f"-{v}" for _, v in variant) for name, variant in CASES]
# Output widths given the modalities' widths; for a method not listed only the [B, width] rank is checked.
WIDTHS = {
    "concat": lambda dims: sum(dims),
    "tensor": lambda dims: (DIM + 1) ** len(dims),
    "cross_attention": lambda dims: len(dims) * (len(dims) - 1) * DIM,
    "late": lambda dims: NUM_CLASSES,
    **{n: lambda dims: DIM for n in ("weighted_sum", "attention", "max", "product", "gmu", "low_rank_tensor",
                                     "multiplicative", "nl_gate", "bottleneck", "joint_transformer", "serial")},
}
# Methods whose output with a modality masked everywhere equals their output without that modality (same params).
DROP_EQUIVALENT = ("weighted_sum", "attention", "max", "product", "low_rank_tensor", "nl_gate", "bottleneck",
                   "joint_transformer", "late", "serial")
# XLA's CPU backend optimisations dominate this file's run time and buy nothing for tiny arrays.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
# Rows: 0 misses text, 1 misses audio, 2 misses image, 3 misses everything.
MASKS = {
    "audio": np.array([1, 0, 1, 0], np.float32),
    "image": np.array([1, 1, 0, 0], np.float32),
    "text": np.array([0, 1, 1, 0], np.float32),
}


def make(name, variant=(), **extra):
    cls = FUSIONS.get(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in (TINY | OVERRIDES.get(name, {})).items() if k in fields}
    if "head" in fields:
        kwargs["head"] = functools.partial(ClassifierHead, num_classes=NUM_CLASSES)
    return cls(**(kwargs | dict(variant) | extra))


def arrays(names, seed=0):
    """{modality: (tokens, pooled)} of numpy random data."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in names:
        width, length = SPECS[m]
        tokens, pooled = rng.normal(size=(B, length, width)), rng.normal(size=(B, width))
        out[m] = (tokens.astype(np.float32), pooled.astype(np.float32))
    return out


def encoder_outputs(data):
    return {m: EncoderOutput(t, p, TEXT_PADDING if m == "text" else None) for m, (t, p) in data.items()}


def all_present(names, **masks):
    """A mask for every modality (ones unless given), so every call of a compiled function has the same structure."""
    return {m: np.asarray(masks.get(m, np.ones(B)), np.float32) for m in names}


def random_params(module, data, seed=0):
    """Parameters of `module` with random values (non-zero biases too, so a leak through any parameter shows).

    Their shapes and dtypes come from `jax.eval_shape` of `init`: compiling every init (random number generation)
    would dominate this file's run time.
    """
    shapes = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0), encoder_outputs(data))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def subset(full, like):
    """The entries of the nested dict `full` at the paths of `like` (KeyError when one is missing)."""
    return {k: subset(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


@functools.cache
def initialised(name, variant, names):
    """(module, params, apply, grad): compiled once per method and modality set (op-by-op eager is far slower)."""
    module = make(name, variant)
    params = random_params(module, arrays(names))

    def forward(p, data, masks):
        return module.apply(p, encoder_outputs(data), masks=masks, train=False)

    def loss(p, data, masks, cotangent):
        out = forward(p, data, masks)
        return jnp.sum(out * cotangent), out

    # grad(params, data, masks, cotangent) -> (d <out, cotangent> / d data, out).
    return module, params, jit(forward), jit(jax.grad(loss, argnums=1, has_aux=True))


@pytest.mark.parametrize("name, variant", CASES, ids=IDS)
@pytest.mark.parametrize("names", [("audio", "image"), ("audio", "image", "text")], ids=["2", "3"])
def test_output_shape(name, variant, names):
    module, params, _, _ = initialised(name, variant, names)
    data = encoder_outputs(arrays(names))  # Traced, not compiled: values are checked by the tests below.
    out = jax.eval_shape(functools.partial(module.apply, masks=all_present(names), train=False), params, data)
    width = WIDTHS[name]([SPECS[m][0] for m in names]) if name in WIDTHS else out.shape[-1]
    assert out.shape == (B, width) and out.dtype == jnp.float32


@pytest.mark.parametrize("name, variant", CASES, ids=IDS)
def test_dict_order_does_not_matter(name, variant):
    names = ("audio", "image", "text")
    module, params, _, _ = initialised(name, variant, names)

    def program(order):
        """The traced computation when the features and masks dicts are built in `order` (a jaxpr has no dicts)."""

        def forward(p, data, masks):
            features = {m: EncoderOutput(*data[m], TEXT_PADDING if m == "text" else None) for m in order}
            return module.apply(p, features, masks={m: masks[m] for m in order}, train=False)

        return str(jax.make_jaxpr(forward)(params, arrays(names), MASKS))

    # The same program (same operations on the same inputs, in the same order) gives bitwise the same output.
    assert program(names) == program(names[::-1]) == program(("image", "text", "audio"))


@pytest.mark.parametrize("name, variant", CASES, ids=IDS)
def test_a_masked_modality_has_no_influence(name, variant):
    names = ("audio", "image", "text")
    _, params, apply, _ = initialised(name, variant, names)
    data = arrays(names, seed=1)
    out = apply(params, data, MASKS)
    assert np.isfinite(out).all()  # Row 3 has every modality missing.
    # Changing every modality's features where it is masked changes nothing, anywhere...
    keep = {m: MASKS[m].astype(bool) for m in names}
    changed = {
        m: (np.where(keep[m][:, None, None], t, 5 * t + 3), np.where(keep[m][:, None], p, -4 * p - 2))
        for m, (t, p) in data.items()
    }
    np.testing.assert_array_equal(apply(params, changed, MASKS), out)
    # ... while changing them where present does change the output of those rows.
    changed = {m: (5 * t + 3, -4 * p - 2) for m, (t, p) in data.items()}
    assert not np.allclose(apply(params, changed, MASKS)[:3], out[:3])


@pytest.mark.parametrize("name, variant", CASES, ids=IDS)
def test_a_masked_modality_gets_exactly_zero_gradient(name, variant):
    names = ("audio", "image")  # Two modalities keep the compiled gradients small.
    masks = {"audio": np.array([1, 0, 1, 0], np.float32), "image": np.array([1, 1, 0, 0], np.float32)}
    _, params, apply, grad = initialised(name, variant, names)
    data = arrays(names, seed=1)
    shape = jax.eval_shape(apply, params, data, masks).shape
    cotangent = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    grads, _ = grad(params, data, masks, cotangent)
    for m, (g_tokens, g_pooled) in grads.items():
        missing = masks[m] == 0
        assert np.isfinite(g_tokens).all() and np.isfinite(g_pooled).all()
        np.testing.assert_array_equal(g_tokens[missing], 0, err_msg=f"{m} tokens")
        np.testing.assert_array_equal(g_pooled[missing], 0, err_msg=f"{m} pooled")
        assert np.abs(g_tokens[~missing]).sum() + np.abs(g_pooled[~missing]).sum() > 0, m  # Present rows do learn.


@pytest.mark.parametrize("name, variant", [c for c in CASES if c[0] in DROP_EQUIVALENT],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] in DROP_EQUIVALENT])
def test_masked_everywhere_equals_dropped(name, variant):
    names = ("audio", "image", "text")
    _, params, apply, _ = initialised(name, variant, names)
    _, params_without_text, _, grad_without_text = initialised(name, variant, names[:2])
    data = arrays(names, seed=1)
    masked = apply(params, data, all_present(names, text=np.zeros(B)))
    # The same parameters: the model without text has a subset of the parameters of the model with it. (The
    # gradient function, compiled for the gradient test already, also returns the output.)
    without_text, ones = {m: data[m] for m in names[:2]}, np.ones(masked.shape, np.float32)
    _, dropped = grad_without_text(subset(params, params_without_text), without_text, all_present(names[:2]), ones)
    np.testing.assert_allclose(masked, dropped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in DIRECT if FUSIONS.get(n).min_modalities >= 2])
def test_single_modality_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"fusion '{name}' needs at least 2 modalities, got 1"):
        make(name).init(jax.random.PRNGKey(0), encoder_outputs(arrays(("image",))), train=False)


@pytest.mark.parametrize("name", [n for n in DIRECT if FUSIONS.get(n).min_modalities < 2])
def test_single_modality_baselines_work(name):
    module = make(name)
    data = encoder_outputs(arrays(("image",)))
    params = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0), data)
    assert jax.eval_shape(functools.partial(module.apply, train=False), params, data).shape[0] == B


@pytest.mark.parametrize(
    "name, field, value, valid",
    [("late", "combine", "average", "mean, learned, product"), ("multiplicative", "form", "diag", "vector, matrix")],
)
def test_unknown_choice_names_the_valid_values(name, field, value, valid):
    with pytest.raises(ValueError, match=f"fusion '{name}': unknown {field} '{value}'; valid values: {valid}"):
        make(name, **{field: value}).init(jax.random.PRNGKey(0), encoder_outputs(arrays(SPECS)), train=False)


def test_weighted_sum_uses_the_configured_weights_renormalised():
    names = ("audio", "image", "text")
    module = make("weighted_sum", weights=(1.0, 2.0, 3.0))
    data = arrays(names, seed=1)
    params = random_params(module, data)
    out = module.apply(params, encoder_outputs(data), masks=MASKS, train=False)
    p = params["params"]
    z = np.stack([data[m][1] @ p[f"proj_{m}"]["kernel"] + p[f"proj_{m}"]["bias"] for m in names], 1)
    w = np.array([1.0, 2.0, 3.0]) * np.stack([MASKS[m] for m in names], 1)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    np.testing.assert_allclose(out, np.einsum("bm,bmd->bd", w, z), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weighted_sum.*3 non-negative numbers"):
        make("weighted_sum", weights=(1.0, 2.0)).init(jax.random.PRNGKey(0), encoder_outputs(data), train=False)


def test_tensor_fusion_is_the_outer_product_of_the_augmented_projections():
    names = ("audio", "image", "text")
    module, params, _, _ = initialised("tensor", (), names)
    data = arrays(names, seed=1)
    out, state = module.apply(params, encoder_outputs(data), masks=MASKS, train=False, mutable=["intermediates"])
    p = params["params"]
    augmented = []
    for m in names:
        (a,) = state["intermediates"][f"augmented_{m}"]
        z = data[m][1] @ p[f"proj_{m}"]["kernel"] + p[f"proj_{m}"]["bias"]
        expected = np.concatenate([np.ones((B, 1)), z * MASKS[m][:, None]], axis=1)  # Missing: [1, 0, ..., 0].
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
        augmented.append(np.asarray(a))
    explicit = np.einsum("bi,bj,bk->bijk", *augmented).reshape(B, -1)
    np.testing.assert_allclose(out, explicit, rtol=1e-5, atol=1e-6)


def test_low_rank_fusion_matches_its_formula_and_every_factor_learns():
    names = ("audio", "image", "text")
    module, params, _, _ = initialised("low_rank_tensor", (), names)
    data = arrays(names, seed=1)
    p = params["params"]
    product = 1.0
    for m in names:
        x = np.concatenate([np.ones((B, 1)), data[m][1]], axis=1)
        term = np.einsum("bi,rio->bro", x, p[f"factor_{m}"])
        product = product * np.where(MASKS[m][:, None, None] > 0, term, 1.0)
    expected = np.einsum("r,bro->bo", p["rank_weights"], product) + p["bias"]
    out = module.apply(params, encoder_outputs(data), masks=MASKS, train=False)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

    params = module.init(jax.random.key(0, impl="rbg"), encoder_outputs(data), train=False)  # Trains from its init.
    loss = lambda q: jnp.sum(module.apply(q, encoder_outputs(data), train=False) ** 2)  # noqa: E731
    grads = jit(jax.grad(loss))(params)["params"]
    assert set(grads) == {"factor_audio", "factor_image", "factor_text", "rank_weights", "bias"}
    for key, g in grads.items():
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), key


def test_late_fusion_combines_the_per_modality_head_logits():
    names = ("audio", "image", "text")
    data = arrays(names, seed=1)
    present = np.stack([MASKS[m] for m in names], 1)
    results = {}
    for combine in ("mean", "product", "learned"):
        module, params, _, _ = initialised("late", (("combine", combine),), names)
        if combine == "learned":  # Distinct, known modality weights.
            learned = {f"combine_{m}": jnp.float32(v) for m, v in zip(names, (0.5, -1, 2))}
            params = {"params": params["params"] | learned}
        out, state = module.apply(params, encoder_outputs(data), masks=MASKS, train=False, mutable=["intermediates"])
        head = ClassifierHead(num_classes=NUM_CLASSES)
        logits = np.stack(
            [head.apply({"params": params["params"][f"head_{m}"]}, data[m][1], train=False) for m in names], 1
        )
        results[combine] = (out, logits, state, params)
    out, logits, _, _ = results["mean"]
    expected = (present[..., None] * logits).sum(1) / np.maximum(present.sum(1), 1)[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    out, logits, _, _ = results["product"]
    np.testing.assert_allclose(out, (present[..., None] * logits).sum(1), rtol=1e-5, atol=1e-6)
    out, logits, state, params = results["learned"]
    (weights,) = state["intermediates"]["weights"]
    np.testing.assert_allclose(np.asarray(weights).sum(1), [1, 1, 1, 0], rtol=1e-6)  # Row 3: nothing present.
    np.testing.assert_array_equal(np.asarray(weights)[present == 0], 0)
    raw = np.array([params["params"][f"combine_{m}"] for m in names])
    softmax = present * np.exp(raw)
    softmax = softmax / np.maximum(softmax.sum(1, keepdims=True), 1e-12)
    np.testing.assert_allclose(weights, softmax, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out, (softmax[..., None] * logits).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in DIRECT if "dtype" in FUSIONS.get(n).__dataclass_fields__])
def test_bfloat16_compute_keeps_float32_params(name):
    module, data = make(name, dtype=jnp.bfloat16), encoder_outputs(arrays(("audio", "image")))
    params = jax.eval_shape(functools.partial(module.init, train=False), jax.random.PRNGKey(0), data)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    out = jax.eval_shape(functools.partial(module.apply, masks=MASKS, train=False), params, data)
    assert out.shape[0] == B


def test_fusion_fields_come_from_the_model_config():
    from mmjax.nn.builder import build_model

    config = ml_collections.ConfigDict(
        dict(
            num_classes=NUM_CLASSES,
            encoders=dict(
                image=dict(name="small_cnn", features=(4,), width=8),
                audio=dict(name="spectrogram_cnn", features=(4,), width=8),
            ),
            fusion=dict(name="weighted_sum", dim=DIM, weights=[1.0, 3.0]),
            head=dict(name="classifier", hidden=()),
        )
    )
    model = build_model(config)
    batch = {
        "image": np.zeros((2, 8, 8, 1), np.float32),
        "audio": np.zeros((2, 49, 40), np.float32),
        "audio_mask": np.array([1, 0], np.float32),
    }
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), batch)
    assert model.fusion.weights == (1.0, 3.0)
    assert set(params["params"]["fusion"]) == {"proj_audio", "proj_image"}
    out = jax.eval_shape(functools.partial(model.apply, train=False), params, batch)
    assert out.shape == (2, NUM_CLASSES)
