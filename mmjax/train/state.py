"""The train state: a plain pytree, checkpointed as a whole; its device layout is `parallel.state_shardings`."""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import optax


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, model state, optimizer state and the run's base RNG key.

    `model_state` holds the non-trained variable collections (e.g. batch-norm `batch_stats`; `{}` when the model
    has none). `opt_state` covers only the trainable parameters (frozen ones have none, see `step.py`).
    Each step's randomness is `fold_in(rng, step)`, so a resumed run draws exactly what an uninterrupted run would.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: optax.OptState
    rng: jax.Array


def step_rng(state: TrainState) -> jax.Array:
    return jax.random.fold_in(state.rng, state.step)


def count_parameters(params: Any) -> int:
    """Number of scalar parameters in a (possibly abstract) parameter tree."""
    return sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
