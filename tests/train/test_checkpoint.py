"""Checkpointer: the best step is known (and kept) after a restart, not only in the process that saved it; a
state saved from one mesh (FSDP over 8 devices) restores bit for bit onto another (other FSDP size, one device,
a one-device process)."""

import functools
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import runtime
from mmjax.train import parallel
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.step import init_state


def test_best_step_survives_a_restart_and_is_kept(tmp_path):
    directory = str(tmp_path / "checkpoints")
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    state = {"w": jnp.zeros(3)}
    checkpointer = Checkpointer(directory, keep=1, best_metric="validation/accuracy", best_mode="max")
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.7)]:
        checkpointer.save(step, state, data, {"validation/accuracy": accuracy})
    checkpointer.close()

    reopened = Checkpointer(directory, keep=1, best_metric="validation/accuracy", best_mode="max")
    assert reopened.all_steps() == [2, 3]  # The latest, and the best.
    assert reopened.best_step() == 2
    reopened.save(4, state, data, {"validation/accuracy": 0.6})  # After the restart the best is still protected.
    reopened.close()
    assert Checkpointer(directory, keep=1, best_metric="validation/accuracy").all_steps() == [2, 4]


# --- Restoring onto another mesh -----------------------------------------------------------------------------
# (No tests.conftest import here: the 1-device subprocess imports this module, and conftest would force 8 devices.)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIN_SIZE = 64


def abstract_state(mesh):
    """Shapes of a small model's Adam train state, with the FSDP shardings of `mesh` (state_shardings)."""
    from mmjax.nn.builder import build_model
    from tests.train.test_step import batch, model_config

    init = functools.partial(init_state, build_model(model_config()), optax.adam(1e-3), batch(1))
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = parallel.state_shardings(shapes, mesh, MIN_SIZE)
    target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return init, target


def flat(state) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}


def restore_main(directory: str, output: str) -> None:
    """Subprocess entry: restores step 1 onto this process's devices and writes every leaf to `output` (.npz)."""
    assert jax.device_count() == 1, jax.devices()
    _, target = abstract_state(parallel.make_mesh())
    checkpointer = Checkpointer(directory, keep=1, best_metric=None)
    state = checkpointer.restore_state(1, target)
    checkpointer.close()
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(state))
    np.savez(output, **flat(state))


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    """A train state saved from an fsdp=4 mesh on 8 devices, every leaf holding distinct random values."""
    directory = str(tmp_path_factory.mktemp("fsdp") / "checkpoints")
    init, target = abstract_state(parallel.make_mesh(fsdp=4))
    state = jax.jit(init, out_shardings=jax.tree_util.tree_map(lambda x: x.sharding, target))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    values = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x),
        state,
    )
    state = jax.device_put(values, jax.tree_util.tree_map(lambda x: x.sharding, state))
    split = [x for x in jax.tree_util.tree_leaves(state) if not x.sharding.is_fully_replicated]
    assert len(split) >= 6  # Params and Adam's mu and nu of at least two kernels.
    checkpointer = Checkpointer(directory, keep=1, best_metric=None)
    checkpointer.save(1, state, iter(grain.MapDataset.range(10).to_iter_dataset()))
    checkpointer.close()
    return directory, flat(state)


def assert_identical(restored: dict, expected: dict) -> None:
    assert sorted(restored) == sorted(expected)
    for key, value in expected.items():
        assert restored[key].dtype == value.dtype, key
        np.testing.assert_array_equal(restored[key], value, err_msg=key)


@pytest.mark.parametrize("fsdp", [1, 2, 8])
def test_fsdp_checkpoint_restores_onto_another_mesh_of_8_devices(fsdp_checkpoint, fsdp):
    directory, expected = fsdp_checkpoint
    _, target = abstract_state(parallel.make_mesh(fsdp=fsdp))
    checkpointer = Checkpointer(directory, keep=1, best_metric=None)
    state = checkpointer.restore_state(1, target)
    checkpointer.close()
    for leaf, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(target)):
        assert leaf.sharding == want.sharding  # The new mesh's layout, not the saved one.
    assert_identical(flat(state), expected)


def test_fsdp_checkpoint_restores_onto_one_device(fsdp_checkpoint):
    directory, expected = fsdp_checkpoint
    device = jax.devices()[0]
    _, target = abstract_state(parallel.make_mesh(devices=[device]))
    checkpointer = Checkpointer(directory, keep=1, best_metric=None)
    state = checkpointer.restore_state(1, target)
    checkpointer.close()
    assert all(leaf.sharding.device_set == {device} for leaf in jax.tree_util.tree_leaves(state))
    assert_identical(flat(state), expected)


def test_fsdp_checkpoint_restores_in_a_one_device_process(fsdp_checkpoint, tmp_path):
    directory, expected = fsdp_checkpoint
    output = str(tmp_path / "restored.npz")
    env = dict(os.environ, XLA_FLAGS=runtime.xla_flags("--xla_force_host_platform_device_count=1"), JAX_PLATFORMS="cpu")
    code = "import sys; from tests.train.test_checkpoint import restore_main; restore_main(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, directory, output], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(output) as restored:
        assert_identical({k: restored[k] for k in restored.files}, expected)
