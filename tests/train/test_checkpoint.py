"""Checkpointer: the best step is known (and kept) after a restart, not only in the process that saved it."""

import grain
import jax.numpy as jnp

from mmjax.train.checkpoint import Checkpointer


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
