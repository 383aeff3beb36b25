"""Tests for mmjax.nn.conv (CPU-fast conv2d / Conv) and the mmjax.bench.convolution helpers.

Every 'cpu'-path result is compared with ``lax.conv_general_dilated`` / ``nn.Conv``:
forward values and both gradients. No timing assertions.
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.bench import convolution as bench
from mmjax.nn import conv as conv_lib
from mmjax.nn.conv import Conv, conv2d, examples_per_chunk_for, kernel_grad, resolve_impl

DN = ("NHWC", "HWIO", "NHWC")


def _random(shape, seed, dtype=jnp.float32):
    """Test data from numpy: jax.random's threefry takes seconds to compile per shape on CPU."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _key(seed):
    """PRNG key for module.init; 'rbg' compiles in milliseconds where threefry takes seconds."""
    return jax.random.key(seed, impl="rbg")


def _assert_close(actual, expected, rtol=1e-5):
    """Elementwise closeness relative to the largest reference magnitude (sums reorder)."""
    expected = np.asarray(expected, np.float32)
    scale = float(np.max(np.abs(expected))) or 1.0
    actual = np.asarray(actual, np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _reference(x, k, strides, padding):
    strides = (strides, strides) if isinstance(strides, int) else strides
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


CASES = [
    # (batch, height, width, cin, cout, kernel, strides, padding)
    (2, 9, 7, 3, 5, (3, 3), 1, "SAME"),
    (2, 9, 7, 3, 5, (3, 3), 2, "SAME"),
    (2, 9, 7, 3, 5, (3, 3), 2, "VALID"),
    (2, 11, 9, 1, 4, (5, 5), 1, "SAME"),
    (2, 11, 9, 1, 4, (3, 3), 2, "VALID"),
    (3, 8, 8, 1, 4, (3, 3), 2, "SAME"),
    (2, 8, 8, 4, 6, (1, 1), 1, "VALID"),
    (2, 10, 7, 2, 3, (2, 3), (2, 1), ((1, 2), (0, 1))),
    (3, 13, 10, 8, 4, (3, 5), 2, "SAME"),
    (4, 12, 12, 1, 3, (3, 3), 2, ((-1, 1), (2, 0))),
    # >= 32 input channels: the kernel gradient is a patch matmul.
    (2, 6, 5, 32, 4, (3, 3), 1, "SAME"),
    (2, 9, 7, 33, 2, (3, 3), 2, "VALID"),
    (3, 7, 6, 32, 3, (2, 3), (2, 1), ((1, 2), (0, 1))),
    (2, 8, 8, 32, 3, (3, 3), 2, ((-1, 1), (2, 0))),
]


def _outputs_and_grads(fn, x, k, g):
    """``fn(x, k)`` and its gradients for cotangent ``g``, in one jit (one compilation)."""

    @jax.jit
    def run(x_, k_, g_):
        y, vjp = jax.vjp(fn, x_, k_)
        return (y, *vjp(g_))

    return run(x, k, g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_forward_and_both_gradients_match_lax(case):
    n, h, w, cin, cout, kernel_hw, strides, padding = case
    x, k = _random((n, h, w, cin), 0), _random((*kernel_hw, cin, cout), 1)
    reference = lambda a, b: _reference(a, b, strides, padding)
    ours = lambda a, b: conv2d(a, b, strides=strides, padding=padding, impl="cpu")
    g = _random(jax.eval_shape(reference, x, k).shape, 2)

    for got, want in zip(_outputs_and_grads(ours, x, k, g), _outputs_and_grads(reference, x, k, g)):
        assert got.shape == want.shape and got.dtype == want.dtype
        _assert_close(got, want)


@pytest.mark.parametrize("cin", [3, 32])  # XLA's kernel-gradient convolution / the patch matmul per chunk
def test_kernel_grad_equal_for_every_chunking(cin):
    x, g = _random((6, 7, 5, cin), 0), _random((6, 4, 3, 4), 1)
    strides, padding = (2, 2), "SAME"
    k = jnp.zeros((3, 3, cin, 4))
    want = jax.vjp(lambda b: _reference(x, b, strides, padding), k)[1](g)[0]
    pads = conv_lib.explicit_padding(padding, (7, 5), (3, 3), strides)
    all_chunkings = jax.jit(
        lambda x_, g_: [
            kernel_grad(x_, g_, (3, 3), strides=strides, pads=pads, examples_per_chunk=chunk)
            for chunk in (1, 2, 3, 6)
        ]
    )
    for got in all_chunkings(x, g):
        _assert_close(got, want)
    with pytest.raises(ValueError, match="must divide the batch 6"):
        kernel_grad(x, g, (3, 3), strides=strides, pads=pads, examples_per_chunk=4)


def test_examples_per_chunk_for():
    kib = 1024
    assert examples_per_chunk_for(64, 128 * kib) == 1  # 40x50x16 f32: one example per chunk
    assert examples_per_chunk_for(64, 32 * kib) == 4
    assert examples_per_chunk_for(64, 256) == 64  # tiny examples: a single convolution
    assert examples_per_chunk_for(64, 128 * kib, num_devices=8) == 8  # stays evenly shardable
    assert examples_per_chunk_for(256, 1024 * kib) == 4  # at most 64 chunks
    assert examples_per_chunk_for(7, 1024 * kib, num_devices=8) == 1
    for batch in (1, 5, 12, 30, 64, 100):
        assert batch % examples_per_chunk_for(batch, 10 * kib) == 0


def test_bf16_compute_matches_f32_reference():
    x = _random((4, 10, 9, 3), 0)
    ours = Conv(8, (3, 3), strides=2, dtype=jnp.bfloat16, impl="cpu")
    ref = nn.Conv(8, (3, 3), strides=2)
    params = ref.init(_key(1), x)

    @jax.jit
    def outputs_and_grads(p):
        def loss(p_, layer):
            return jnp.mean(layer.apply(p_, x).astype(jnp.float32) ** 2)

        return ours.apply(p, x), ref.apply(p, x), jax.grad(loss)(p, ours), jax.grad(loss)(p, ref)

    y, y_ref, grads, ref_grads = outputs_and_grads(params)
    assert y.dtype == jnp.bfloat16
    _assert_close(y, y_ref, rtol=3e-2)
    assert grads["params"]["kernel"].dtype == jnp.float32  # param_dtype kept
    for name in ("kernel", "bias"):
        _assert_close(grads["params"][name], ref_grads["params"][name], rtol=5e-2)

    # Functional bf16: output and gradients stay bf16 and match an f32 computation.
    xb, kb = x.astype(jnp.bfloat16), params["params"]["kernel"].astype(jnp.bfloat16)
    g = jnp.ones((4, 10, 9, 8), jnp.bfloat16)
    yb, dx, dk = _outputs_and_grads(lambda a, b: conv2d(a, b, impl="cpu"), xb, kb, g)
    assert yb.dtype == dx.dtype == dk.dtype == jnp.bfloat16
    f32 = lambda t: t.astype(jnp.float32)
    reference = lambda a, b: _reference(a, b, 1, "SAME")
    for got, want in zip((yb, dx, dk), _outputs_and_grads(reference, f32(xb), f32(kb), f32(g))):
        _assert_close(got, want, rtol=2e-2)


def test_jit_with_batch_sharded_over_eight_devices():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py should simulate 8 CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    x = _random((16, 20, 20, 16), 0)  # 25.6 KB per example: kernel grad in 2 chunks of 8
    layer = Conv(8, (3, 3), impl="cpu")
    params = layer.init(_key(1), x)

    def loss(p, inputs):
        return jnp.mean(layer.apply(p, inputs) ** 2)

    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ps = jax.device_put(params, NamedSharding(mesh, P()))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    (value, (g_params, g_x)) = step(ps, xs)

    ref_layer = nn.Conv(8, (3, 3))
    ref_value, (ref_params, ref_x) = jax.value_and_grad(
        lambda p, inputs: jnp.mean(ref_layer.apply(p, inputs) ** 2), argnums=(0, 1)
    )(params, x)
    _assert_close(value, ref_value)
    _assert_close(g_x, ref_x)
    for name in ("kernel", "bias"):
        _assert_close(g_params["params"][name], ref_params["params"][name])
    assert g_x.sharding.spec == P("data")

    hlo = step.lower(ps, xs).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo  # chunks stay device-local


def test_vmap_and_remat():
    x, k = _random((3, 2, 7, 6, 2), 0), _random((3, 3, 2, 4), 1)

    def loss(fn, a, b):
        return jnp.sum(jax.vmap(lambda xi: fn(xi, b))(a) ** 2)

    ours = lambda a, b: conv2d(a, b, strides=2, impl="cpu")
    ref = lambda a, b: _reference(a, b, 2, "SAME")
    grads = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    for got, want in zip(grads(ours, x, k), grads(ref, x, k)):
        _assert_close(got, want)

    class Tower(nn.Module):
        conv_cls: type

        @nn.compact
        def __call__(self, inputs):
            h = nn.relu(nn.remat(self.conv_cls)(4, (3, 3), name="c0")(inputs))
            return nn.remat(self.conv_cls)(6, (3, 3), strides=2, name="c1")(h)

    xi = _random((2, 9, 9, 1), 2)
    params = Tower(nn.Conv).init(_key(3), xi)
    grads = [
        jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply(p, xi) ** 2)))(params)
        for m in (Tower(Conv), Tower(nn.Conv))
    ]
    jax.tree_util.tree_map(_assert_close, grads[0], grads[1])


def test_impl_selection_and_errors():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "cpu"
    assert resolve_impl("xla") == "xla" and resolve_impl("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"'im2colx'.*'auto', 'xla', 'cpu'"):
        resolve_impl("im2colx")

    x, k = _random((2, 6, 6, 2), 0), _random((3, 3, 2, 3), 1)

    def jaxpr(impl):
        return str(jax.make_jaxpr(lambda a, b: conv2d(a, b, impl=impl))(x, k))

    assert "custom_vjp_call" in jaxpr("cpu") and "custom_vjp_call" in jaxpr("auto")
    assert "custom_vjp_call" not in jaxpr("xla")
    with pytest.raises(ValueError, match="Unknown conv impl 'gpu'"):
        conv2d(x, k, impl="gpu")
    with pytest.raises(ValueError, match="Unknown conv impl"):
        Conv(3, (3, 3), impl="bogus").init(_key(0), x)


def test_shape_and_argument_errors():
    x, k = _random((2, 6, 6, 2), 0), _random((3, 3, 2, 3), 1)
    with pytest.raises(ValueError, match=r"\(6, 6, 2\)"):
        conv2d(x[0], k)
    with pytest.raises(ValueError, match=r"got shape \(3, 3, 2\)"):
        conv2d(x, k[..., 0])
    with pytest.raises(ValueError, match=r"Channel mismatch.*\(2, 6, 6, 2\).*\(3, 3, 4, 3\)"):
        conv2d(x, _random((3, 3, 4, 3), 2))
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, k, padding="CIRCULAR")
    with pytest.raises(ValueError, match="strides"):
        conv2d(x, k, strides=(1, 0))

    layer = Conv(3, (3, 3))
    with pytest.raises(ValueError, match=r"rank >= 3.*\(6, 2\)"):
        layer.init(_key(0), x[0, 0])
    params = layer.init(_key(0), x)
    with pytest.raises(ValueError, match=r"\(3, 3, 2, 3\).*\(2, 6, 6, 5\).*\(3, 3, 5, 3\)"):
        layer.apply(params, _random((2, 6, 6, 5), 3))


@pytest.mark.parametrize("use_bias", [True, False])
def test_params_interchangeable_with_nn_conv(use_bias):
    x = _random((2, 9, 8, 3), 0)
    ours = Conv(5, (3, 2), strides=(2, 1), padding="VALID", use_bias=use_bias)
    ref = nn.Conv(5, (3, 2), strides=(2, 1), padding="VALID", use_bias=use_bias)
    ours_params, ref_params = ours.init(_key(1), x), ref.init(_key(1), x)

    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
    assert shapes(ours_params) == shapes(ref_params)
    jax.tree_util.tree_map(_assert_close, ours_params, ref_params)  # same default initialisers
    _assert_close(ours.apply(ref_params, x), ref.apply(ref_params, x))
    _assert_close(ref.apply(ours_params, x), ours.apply(ours_params, x))

    # Like nn.Conv: unbatched inputs and several leading batch dimensions.
    _assert_close(ours.apply(ref_params, x[0]), ref.apply(ref_params, x[0]))
    stacked = jnp.stack([x, 2 * x])
    _assert_close(ours.apply(ref_params, stacked), ref.apply(ref_params, stacked))


def test_benchmark_helpers_smoke(tmp_path, monkeypatch, capsys):
    tiny = bench.ConvCase("tiny", 6, 5, 2, 3, batch=4)
    monkeypatch.setattr(bench, "DEFAULT_CASES", (tiny,))
    monkeypatch.setattr(bench, "run_encoders", functools.partial(bench.run_encoders, batch=2))
    path = tmp_path / "conv.json"
    bench.main(["--repeats", "1", "--warmup", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert "tiny" in out and "Encoders of the default experiment" in out
    record = json.loads(path.read_text())
    assert set(record["encoders"]) == {"audio", "image"}
    for per_impl in record["encoders"].values():
        assert set(per_impl) == {"xla", "cpu"}
        assert all(row["train_step_ms"] > 0 and row["ratio"] > 0 for row in per_impl.values())
    results = record["results"]["tiny"]
    assert set(results) == {"xla", "cpu"}
    for row in results.values():
        assert set(row) == {"fwd_ms", "dx_ms", "dk_ms", "fwd_bwd_ms", "ratio"}
        assert all(np.isfinite(v) and v > 0 for v in row.values())

    figures = bench.benchmark_module(Conv(3, (3, 3)), _random((2, 6, 6, 1), 0), repeats=1, warmup=1)
    assert figures["num_params"] == 3 * 3 * 3 + 3
    assert figures["forward_ms"] > 0 and figures["train_step_ms"] > 0 and figures["ratio"] > 0
