"""Gradient accumulation: k micro-batches give the step of the whole batch (loss, metrics, gradient, update)."""

import functools
import re

import jax
import numpy as np
import optax
import pytest

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.nn.builder import build_model
from mmjax.tasks import build_task
from mmjax.train import parallel
from mmjax.train import setup as setup_lib
from mmjax.train.step import init_state, split_micro_batches, train_step
from tests.conftest import tiny_overrides
from tests.train.test_step import batch, model_config

BATCH = 32  # 4 micro-batches x 8 devices.


def run_step(state, data, k, frozen=(), model_cfg=None, hlo=False):
    """One jitted SGD(lr=1) step on 8 devices (data parallel), so `params_before - params_after` is the gradient."""
    model, tx, task = build_model(model_cfg or model_config()), optax.sgd(1.0), build_task(None, 4)
    mesh = parallel.make_mesh()
    sharding = parallel.batch_sharding(mesh)
    step = jax.jit(
        functools.partial(
            train_step, model=model, tx=tx, task=task, frozen=frozen, grad_accum_steps=k, batch_sharding=sharding
        ),
        in_shardings=(parallel.replicated(mesh), sharding),
    )
    data = jax.device_put(data, sharding)
    new_state, metrics = step(state, data)
    return new_state, jax.device_get(metrics), step.lower(state, data).compile().as_text() if hlo else None


def initial_state(frozen=(), model_cfg=None):
    model = build_model(model_cfg or model_config())
    return init_state(model, optax.sgd(1.0), batch(1), jax.random.PRNGKey(0), frozen=frozen)


def gradient(before, after):
    return jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), before, after)


def assert_close_trees(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        scale = max(float(np.max(np.abs(x))), 1e-12)
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


def test_four_micro_batches_equal_one_big_batch():
    state, data = initial_state(), batch(BATCH, seed=1)
    one, metrics_one, _ = run_step(state, data, k=1)
    four, metrics_four, hlo = run_step(state, data, k=4, hlo=True)
    assert metrics_one.keys() == metrics_four.keys() == {"loss", "accuracy", "grad_norm"}
    for key in metrics_one:
        np.testing.assert_allclose(metrics_four[key], metrics_one[key], rtol=1e-6, err_msg=key)
    # Relative to each leaf's largest entry: ~1e-7 is float32 summation order.
    assert_close_trees(gradient(state.params, four.params), gradient(state.params, one.params), rtol=2e-6)
    assert int(four.step) == 1
    # The strided split moves no data: each device already holds its rows of every micro-batch; the only
    # collective is the gradient (and metric) all-reduce.
    collectives = set(re.findall(r"(all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)\(", hlo))
    assert collectives == {"all-reduce"}, collectives


def test_micro_batches_are_strided_and_spread_over_every_device():
    mesh = parallel.make_mesh()
    sharding = parallel.batch_sharding(mesh)
    x = jax.device_put(np.arange(BATCH * 2).reshape(BATCH, 2), sharding)
    micro = jax.jit(lambda b: split_micro_batches(b, 4, sharding))({"x": x})["x"]
    np.testing.assert_array_equal(np.asarray(micro[1, :, 0]), np.arange(BATCH)[1::4] * 2)  # Examples 1, 5, 9, ...
    # Micro-batch axis whole on every device, its batch axis split 8 ways: 1 example of each micro-batch per device.
    assert {s.data.shape for s in micro.addressable_shards} == {(4, BATCH // 8 // 4, 2)}
    assert micro.sharding.spec[0] is None and micro.sharding.spec[1] is not None


def test_frozen_subtree_stays_fixed_with_accumulation():
    frozen = ("encoders_image",)
    state, data = initial_state(frozen), batch(BATCH, seed=2)
    one, metrics_one, _ = run_step(state, data, k=1, frozen=frozen)
    four, metrics_four, _ = run_step(state, data, k=4, frozen=frozen)
    jax.tree_util.tree_map(np.testing.assert_array_equal, four.params["encoders_image"], state.params["encoders_image"])
    np.testing.assert_allclose(metrics_four["loss"], metrics_one["loss"], rtol=1e-6)
    assert_close_trees(gradient(state.params, four.params), gradient(state.params, one.params), rtol=2e-6)


def test_batch_norm_statistics_are_threaded_through_the_micro_batches():
    """Each micro-batch updates the running statistics in turn (as PyTorch / big_vision accumulation do)."""
    config = model_config()
    config.encoders.image = dict(name="resnet", stage_sizes=(1,), width=4, stem="cifar")
    state, data = initial_state(model_cfg=config), batch(16, seed=3)
    new, metrics, _ = run_step(state, data, k=2, model_cfg=config)
    model = build_model(config)
    update = jax.jit(lambda model_state, micro: model.apply(
        {"params": state.params, **model_state}, micro, train=True, mutable=list(model_state)
    )[1])
    model_state = state.model_state
    for j in range(2):  # The same two updates, done by hand on micro-batches j::2.
        model_state = update(model_state, {key: value[j::2] for key, value in data.items()})
    for a, b in zip(jax.tree_util.tree_leaves(new.model_state), jax.tree_util.tree_leaves(model_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.isfinite(metrics["loss"])


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train.grad_accum_steps": 0}, r"train.grad_accum_steps=0 must be a positive integer"),
        ({"train.grad_accum_steps": 3}, r"data.batch_size=16 must be a multiple of train.grad_accum_steps=3 x the "
                                        r"device count 8 = 24"),
        ({"train.grad_accum_steps": 2, "task.name": "clip"}, r"grad_accum_steps=2 with task.name='clip': this loss "
                                                             r"couples the examples"),
    ],
)
def test_bad_accumulation_config_is_refused(override, message):
    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides("/nonexistent", **override))
    with pytest.raises(ValueError, match=message):
        setup_lib.validate(config)
