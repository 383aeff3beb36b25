"""A run's workdir: what it holds, whether a config may resume in it, and loading a trained model back from it.

Files: config.json (the resolved config), model_inputs.json (input shapes and dtypes), metrics.jsonl,
tensorboard/, checkpoints/, results.json, curves.png. A workdir holding checkpoints of another model is refused
before anything in it is touched.
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import ml_collections

from mmjax import config as config_lib
from mmjax import reporting
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.setup import Setup, setup
from mmjax.train.state import TrainState

INPUTS_FILENAME = "model_inputs.json"
RESULTS_FILENAME = "results.json"
CHECKPOINTS_DIRNAME = "checkpoints"


def checkpointer(workdir: str, config: ml_collections.ConfigDict) -> Checkpointer:
    """The workdir's checkpoint manager, keeping what `config.checkpoint` says."""
    return Checkpointer(
        os.path.join(workdir, CHECKPOINTS_DIRNAME),
        keep=config.checkpoint.keep,
        best_metric=config.checkpoint.best_metric or None,
        best_mode=config.checkpoint.best_mode,
    )


def _differences(before: dict, now: dict, prefix: str) -> list[str]:
    """`key: saved X, now Y` lines for the top-level keys whose values differ."""
    return [
        f"{prefix}{k}: saved {before.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(before) | set(now))
        if before.get(k) != now.get(k)
    ]


def check_workdir(workdir: str, config: ml_collections.ConfigDict, spec: dict) -> None:
    """Refuses to resume a workdir whose checkpoints belong to a different model; warns on other changes."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} exists and is not a directory; give a directory for --workdir")
    checkpoints = os.path.join(workdir, CHECKPOINTS_DIRNAME)
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        return
    saved_path = os.path.join(workdir, config_lib.CONFIG_FILENAME)
    inputs_path = os.path.join(workdir, INPUTS_FILENAME)
    if not (os.path.exists(saved_path) and os.path.exists(inputs_path)):
        raise ValueError(
            f"workdir {workdir} holds checkpoints but no {config_lib.CONFIG_FILENAME} / {INPUTS_FILENAME} to check "
            "them against; use a new --workdir"
        )
    try:
        before = config_lib.normalize(config_lib.load(saved_path).to_dict())
        with open(inputs_path) as f:
            saved_spec = json.load(f)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError.
        raise ValueError(
            f"workdir {workdir} holds checkpoints but its {config_lib.CONFIG_FILENAME} / {INPUTS_FILENAME} cannot be "
            f"read ({e}), so they cannot be checked against this model; use a new --workdir"
        ) from None
    now = config_lib.normalize(config.to_dict())
    diffs = _differences(before.get("model", {}), now["model"], "model.")
    if saved_spec != config_lib.normalize(spec):
        diffs.append(f"model inputs: saved {saved_spec}, now {config_lib.normalize(spec)}")
    if diffs:
        raise ValueError(
            f"workdir {workdir} holds checkpoints of a different model; nothing was changed there. "
            "Differences:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir to train this model."
        )
    changed = [k for k in sorted(set(before) | set(now)) if k != "model" and before.get(k) != now.get(k)]
    if changed:
        warnings.warn(f"resuming {workdir} with changed config section(s) {changed}", RuntimeWarning, stacklevel=2)


def load_trained(workdir: str, step: int | str = "latest") -> tuple[Setup, TrainState]:
    """The setup and train state of a trained workdir (its saved config), for evaluation or analysis.

    `step` is "latest", "best" (by the config's `checkpoint.best_metric`) or a step number. The state lands on
    this machine's mesh (any device count), not necessarily the one it was saved from.
    """
    config = config_lib.load(os.path.join(workdir, config_lib.CONFIG_FILENAME))
    # The state is restored onto this machine's mesh, whatever the run was trained on (Orbax reshards to the
    # abstract state's shardings). Only what loading and evaluation need must fit the current device count:
    # an FSDP size that does not divide it falls back to 1 (replicated), and an evaluation batch that does not
    # split over the devices is rounded up (metrics stay exact: padding rows are never counted). The training
    # batch is not checked (`training=False`).
    devices = jax.device_count()
    fsdp = (config.get("mesh") or {}).get("fsdp", 1)
    if isinstance(fsdp, int) and fsdp > 0 and devices % fsdp:
        reporting.console(f"{workdir}: mesh.fsdp={fsdp} does not divide the {devices} device(s) here; loading with 1")
        config.mesh.fsdp = 1
    eval_batch = config.data.eval_batch_size
    if isinstance(eval_batch, int) and eval_batch > 0 and eval_batch % devices:
        config.data.eval_batch_size = -(-eval_batch // devices) * devices
        reporting.console(
            f"{workdir}: data.eval_batch_size={eval_batch} does not split over the {devices} device(s) here; "
            f"using {config.data.eval_batch_size}"
        )
    s = setup(config, training=False)
    manager = checkpointer(workdir, config)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {workdir}/{CHECKPOINTS_DIRNAME}")
        if step == "latest":
            step = steps[-1]
        elif step == "best":
            step = manager.best_step()
        if step not in steps:
            raise ValueError(f"checkpoint step {step} is not in {workdir}/{CHECKPOINTS_DIRNAME} (steps: {steps})")
        state = manager.restore_state(step, s.abstract_state)
    finally:
        manager.close()
    return s, state
