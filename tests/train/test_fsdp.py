"""FSDP: parameters and optimizer state split over the `fsdp` mesh axis train exactly like data parallelism."""

import json
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import av_digits
from mmjax import config as config_lib
from mmjax import runtime
from mmjax.train import parallel
from mmjax.train import setup as setup_lib
from mmjax.train import workdir as workdir_lib
from mmjax.train.checkpoint import Checkpointer
from tests.conftest import REPO_ROOT, tiny_overrides

MIN_SIZE = 256  # Small enough that the tiny model's kernels are split, its biases not.
NUM_STEPS = 3


def fsdp_config(data_dir, fsdp=1, accum=1, **extra):
    """The tiny AV-Digits config without dropout (so micro-batches draw nothing random) and without the cache."""
    overrides = {
        "mesh.fsdp": fsdp,
        "mesh.fsdp_min_size": MIN_SIZE,
        "train.grad_accum_steps": accum,
        "data.cache_in_memory": False,
        "model.encoders.image.dropout": 0.0,
        "model.encoders.audio.dropout": 0.0,
        "model.head.dropout": 0.0,
        **extra,
    }
    return config_lib.apply_overrides(av_digits.get_config(), tiny_overrides(data_dir, **overrides))


def synthetic_batches(spec, n, batch_size=16):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield {
            k: rng.integers(0, 10, (batch_size, *shape)).astype(dtype) if k == "label"
            else rng.normal(size=(batch_size, *shape)).astype(dtype)
            for k, (shape, dtype) in spec.items()
        }


def train(config):
    """Initialises as `loop.run` does and takes NUM_STEPS steps; returns (setup, initial state, losses, final)."""
    s = setup_lib.setup(config)
    initial = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(config.seed))
    step = s.train_step_fn()
    state = jax.tree_util.tree_map(lambda x: x.copy(), initial)  # The step donates its input.
    losses = []
    for batch in synthetic_batches(s.spec, NUM_STEPS):
        state, metrics = step(state, jax.device_put(batch, s.batch_sharding))
        losses.append(float(metrics["loss"]))
    return s, initial, losses, state


def assert_sharded_as_intended(state, fsdp):
    """Params and Adam's mu/nu follow `fsdp_spec`; each device holds 1/fsdp of every split leaf; the rest replicated."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [x for x in jax.tree_util.tree_leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)]
    split = 0
    for tree in (state.params, adam.mu, adam.nu):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            spec = parallel.fsdp_spec(leaf.shape, fsdp, MIN_SIZE)
            assert leaf.sharding.spec == spec, (jax.tree_util.keystr(path), leaf.sharding.spec, spec)
            shards = {s.data.shape for s in leaf.addressable_shards}
            if parallel.FSDP_AXIS in spec:
                axis = list(spec).index(parallel.FSDP_AXIS)
                local = leaf.shape[:axis] + (leaf.shape[axis] // fsdp,) + leaf.shape[axis + 1:]
                assert shards == {local}, (jax.tree_util.keystr(path), shards)  # No device holds the whole leaf.
                split += 1
            else:
                assert shards == {leaf.shape}
    assert split >= 3 * 4  # Conv_1, token_proj and pool_proj kernels of the audio encoder, pool_proj of the image...
    assert state.params["encoders_audio"]["pool_proj"]["kernel"].sharding.spec == P(parallel.FSDP_AXIS, None)
    for leaf in jax.tree_util.tree_leaves((state.step, state.rng, state.model_state, adam.count)):
        assert leaf.sharding.is_fully_replicated


@pytest.mark.slow
def test_fsdp_trains_exactly_like_data_parallelism(av_digits_dir):
    _, _, reference_losses, reference = train(fsdp_config(av_digits_dir))
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(reference))
    reference_params = jax.device_get(reference.params)
    for fsdp, accum in ((4, 1), (8, 2)):  # The second: FSDP over every device with gradient accumulation.
        s, initial, losses, final = train(fsdp_config(av_digits_dir, fsdp=fsdp, accum=accum))
        assert dict(s.mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
        assert_sharded_as_intended(initial, fsdp)  # Created split (init jitted with the state's out_shardings) ...
        assert_sharded_as_intended(final, fsdp)  # ... and kept split by the train step.
        np.testing.assert_allclose(losses, reference_losses, rtol=2e-6, err_msg=f"fsdp={fsdp} accum={accum}")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(final.params)),
                                jax.tree_util.tree_leaves(reference_params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{jax.tree_util.keystr(path)} fsdp={fsdp}")


def test_fsdp_spec_rule():
    assert parallel.fsdp_spec((1040, 16), 4, 256) == P("fsdp", None)  # Largest divisible dimension.
    assert parallel.fsdp_spec((3, 3, 4, 8), 4, 256) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((64, 64), 8, 256) == P("fsdp", None)  # Ties: the first.
    assert parallel.fsdp_spec((1041, 16), 32, 256) == P()  # Nothing divisible: replicated.
    assert parallel.fsdp_spec((255,), 1, 0) == P() and parallel.fsdp_spec((4096,), 1, 0) == P()  # fsdp=1.
    assert parallel.fsdp_spec((60,), 4, 256) == P()  # Below the minimum size.
    assert parallel.fsdp_spec((), 4, 0) == P()


def test_batch_rows_per_device_do_not_depend_on_fsdp():
    """Device i holds rows [i*B/D, (i+1)*B/D) whatever the fsdp size: a process's devices (a contiguous run of
    `jax.devices()`) own a contiguous block of the global batch, as `make_array_from_process_local_data` and the
    per-process data pipeline assume."""
    one_d = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data")).devices_indices_map((32, 3))
    for fsdp in (1, 2, 4, 8):
        sharding = parallel.batch_sharding(parallel.make_mesh(fsdp))
        assert sharding.devices_indices_map((32, 3)) == one_d
        assert sharding.spec == P(("data", "fsdp"))
    assert parallel.batch_sharding(Mesh(np.asarray(jax.devices()), ("data",))).spec == P("data")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"mesh.fsdp": 3}, r"config mesh.fsdp=3 must divide the device count 8; valid: \[1, 2, 4, 8\]"),
        ({"mesh.fsdp": 0}, r"config mesh.fsdp=0 must be a positive integer"),
        ({"mesh.fsdp_min_size": -1}, r"config mesh.fsdp_min_size=-1 must be a non-negative integer"),
    ],
)
def test_bad_fsdp_config_is_refused(override, message):
    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides("/nonexistent", **override))
    with pytest.raises(ValueError, match=message):
        setup_lib.validate(config)


def test_configs_without_a_mesh_group_still_work():
    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides("/nonexistent"))
    del config["mesh"]
    del config.train["grad_accum_steps"]
    setup_lib.validate(config)
    with pytest.raises(ValueError, match="mesh.fsdp=5 must divide the device count 8"):
        parallel.make_mesh(5)


LOAD_SCRIPT = """
import json, sys
import jax, numpy as np
from mmjax.train import workdir as workdir_lib
assert jax.device_count() == 3, jax.devices()
s, state = workdir_lib.load_trained(sys.argv[1])
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)})
print(json.dumps({"mesh": dict(s.mesh.shape), "eval_batch_size": s.config.data.eval_batch_size}))
"""


def test_load_trained_on_another_device_count(av_digits_dir, tmp_path):
    """A workdir saved with fsdp=4 on 8 devices loads on 8 devices (same mesh) and in a 3-device process, where
    neither fsdp=4 nor the batch sizes fit: fsdp falls back to 1, the eval batch is rounded up to 66."""
    config = fsdp_config(av_digits_dir, fsdp=4)
    workdir = str(tmp_path)
    config_lib.save(config, workdir)
    s = setup_lib.setup(config)
    state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(1))
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, best_metric=None)
    checkpointer.save(7, state, iter(grain.MapDataset.range(10).to_iter_dataset()))
    checkpointer.close()
    expected = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state)}

    same, restored = workdir_lib.load_trained(workdir)
    assert_sharded_as_intended(restored, 4)
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        np.testing.assert_array_equal(np.asarray(leaf), expected[jax.tree_util.keystr(path)])

    env = dict(os.environ, XLA_FLAGS=runtime.xla_flags("--xla_force_host_platform_device_count=3"), JAX_PLATFORMS="cpu")
    output = str(tmp_path / "restored.npz")
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, workdir, output], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"mesh": {"data": 3, "fsdp": 1}, "eval_batch_size": 66}
    assert "mesh.fsdp=4 does not divide the 3 device(s)" in proc.stdout
    restored = np.load(output)
    assert sorted(restored.files) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
