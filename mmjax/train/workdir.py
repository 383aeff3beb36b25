"""A run's workdir: what it holds, whether a config may resume in it, and loading a trained model back from it.

Files: config.json (the resolved config the run started with) and config.step_S.json (the config a resumed run
changed to at step S: the config history), model_inputs.json (input shapes and dtypes), metrics.jsonl,
tensorboard/, checkpoints/, results.json, curves.png, .lock (`workdir_lock`: one run at a time). A workdir holding
checkpoints of another model, or of a step beyond `train.num_steps`, is refused before anything in it is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from mmjax import config as config_lib
from mmjax import reporting
from mmjax.train.checkpoint import Checkpointer, state_fingerprint
from mmjax.train.preemption import any_process
from mmjax.train.preflight import RunRefused
from mmjax.train.setup import Setup, setup
from mmjax.train.state import TrainState
from mmjax.train.workdir_lock import WorkdirLock

INPUTS_FILENAME = "model_inputs.json"
RESULTS_FILENAME = "results.json"
CHECKPOINTS_DIRNAME = "checkpoints"
_CONFIG_AT_STEP = re.compile(r"^config\.step_(\d+)\.json$")  # config.step_S.json: the config from step S on.


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock (`workdir_lock.WorkdirLock`, taken by process 0) for the body; every process
    raises `WorkdirBusy` / `RunRefused` when process 0 could not take it, so none of them starts."""
    lock = WorkdirLock(workdir) if reporting.is_primary() else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except RunRefused as error:
            refused = error
    if any_process(refused is not None):
        raise refused or RunRefused(f"workdir {workdir} is in use by another run (process 0 names it)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def committed_steps(workdir: str) -> list[int]:
    """The checkpoint steps committed in the workdir (read from disk), ascending."""
    directory = os.path.join(workdir, CHECKPOINTS_DIRNAME)
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def check_saved_step(workdir: str, num_steps: int) -> None:
    """Refuses a config whose `train.num_steps` is below the workdir's latest checkpoint: resuming would evaluate
    the saved (later) model and label it with the smaller step count."""
    steps = committed_steps(workdir)
    if steps and steps[-1] > num_steps:
        raise RunRefused(
            f"workdir {workdir} holds a checkpoint of step {steps[-1]}, beyond train.num_steps={num_steps}: a run "
            f"cannot be shortened after the fact. To continue it, give train.num_steps >= {steps[-1]}; to train "
            f"train.num_steps={num_steps} from scratch, use a new --workdir"
        )


# --- Config history ----------------------------------------------------------------------------------------------


def config_history(workdir: str) -> list[tuple[int, str]]:
    """`(step, file name)` of every config the workdir records, oldest first: config.json from step 0, then each
    config.step_S.json that a resumed run changed to at step S."""
    if not os.path.isdir(workdir):
        return []
    entries = [(int(m.group(1)), n) for n in os.listdir(workdir) if (m := _CONFIG_AT_STEP.match(n))]
    if os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILENAME)):
        entries.append((0, config_lib.CONFIG_FILENAME))
    return sorted(entries)


def latest_config(workdir: str) -> ml_collections.ConfigDict:
    """The config in effect at the end of the workdir's training (the last of its config history)."""
    history = config_history(workdir)
    name = history[-1][1] if history else config_lib.CONFIG_FILENAME
    return config_lib.load(os.path.join(workdir, name))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def config_changes(before: dict, now: dict) -> dict[str, list]:
    """`{dotted key: [before, now]}` for every leaf that differs (None where a side lacks the key)."""
    a, b = _flat(config_lib.normalize(before)), _flat(config_lib.normalize(now))
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def describe_config_history(workdir: str) -> list[dict[str, Any]]:
    """The config history as results.json shows it: `{"step", "file", "changed": {key: [before, now]}}` each."""
    described, previous = [], None
    for step, name in config_history(workdir):
        current = config_lib.load(os.path.join(workdir, name)).to_dict()
        entry: dict[str, Any] = {"step": step, "file": name}
        if previous is not None:
            entry["changed"] = config_changes(previous, current)
        described.append(entry)
        previous = current
    return described


def record_config(workdir: str, config: ml_collections.ConfigDict, start_step: int) -> None:
    """Records the config a run trains with from `start_step` (its restored step; 0 for a fresh start).

    Entries from `start_step` on describe steps that are about to be recomputed (or none) and are replaced; a
    config that differs from the one in effect at `start_step` is kept as config.step_S.json, never overwriting
    what trained the earlier steps. A change other than `train.num_steps` (the normal way to extend a run, or to
    end it sooner; `check_saved_step` refuses one below the saved step) is also reported with a warning naming
    the keys. Process 0 writes.
    """
    if not reporting.is_primary():
        return
    history = config_history(workdir)
    for step, name in history:
        if step >= start_step and name != config_lib.CONFIG_FILENAME:
            os.remove(os.path.join(workdir, name))
    earlier = [name for step, name in history if step < start_step]
    if not earlier:
        config_lib.save(config, workdir)
        return
    before = config_lib.load(os.path.join(workdir, earlier[-1])).to_dict()
    changes = config_changes(before, config.to_dict())
    if not changes:
        return
    name = f"config.step_{start_step}.json"
    _write_text_atomic(os.path.join(workdir, name), config_lib.to_json(config) + "\n")
    surprising = {k: v for k, v in changes.items() if k != "train.num_steps"}
    if surprising:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(surprising.items())[:12])
        more = f" and {len(surprising) - 12} more" if len(surprising) > 12 else ""
        warnings.warn(
            f"resuming {workdir} at step {start_step} with a changed config ({shown}{more}); the config that "
            f"trained the earlier steps is kept in {earlier[-1]}, this one in {name} (results.json lists the "
            "history)", RuntimeWarning, stacklevel=2,
        )


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
    """Refuses to resume a workdir whose checkpoints belong to a different model (other changes are recorded by
    `record_config` once the run knows the step it resumes from)."""
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


def model_fingerprint(s: Setup, state: TrainState) -> str:
    """A short hash of what a trained model computes: its model config, input shapes and the exact bits of its
    parameters and model state (`checkpoint.state_fingerprint`, the same on any mesh). Two workdirs, or two steps
    of one, give the same fingerprint only if their models give the same outputs; search indexes and exports are
    versioned with it."""
    import hashlib

    described = {
        "model": config_lib.normalize(s.config.model.to_dict()),
        "inputs": config_lib.normalize(s.spec),
        "state": state_fingerprint({"params": state.params, "model_state": state.model_state}),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def check_trained(workdir: str) -> None:
    """Raises a FileNotFoundError saying what is missing when `workdir` is not a trained model's workdir: no such
    directory, the parent of several trained models (a comparison experiment's WORKDIR, whose models are in
    WORKDIR/<variant>/), no config.json, or no checkpoint yet."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist (or is not a directory)")
    if not os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILENAME)):
        variants = sorted(n for n in os.listdir(workdir)
                          if os.path.exists(os.path.join(workdir, n, config_lib.CONFIG_FILENAME)))
        if variants:
            raise FileNotFoundError(
                f"workdir {workdir} holds {len(variants)} trained models, one per variant: give one of "
                + ", ".join(os.path.join(workdir, v) for v in variants)
            )
        raise FileNotFoundError(f"workdir {workdir} has no {config_lib.CONFIG_FILENAME}: not a trained model's "
                                "workdir (training writes it when it starts)")
    if not committed_steps(workdir):
        raise FileNotFoundError(f"workdir {workdir} has no checkpoints in {CHECKPOINTS_DIRNAME}/ yet: train it "
                                "first (a run saves one every checkpoint.every_steps and at the end)")


def load_trained(workdir: str, step: int | str = "latest") -> tuple[Setup, TrainState]:
    """The setup and train state of a trained workdir (its saved config), for evaluation or analysis.

    `step` is "latest", "best" (by the config's `checkpoint.best_metric`) or a step number. The state lands on
    this machine's mesh (any device count), not necessarily the one it was saved from. The config is the last of
    the workdir's config history (`describe_config_history`); when the config changed during training, each
    change is printed with the step it took effect. A directory that holds no trained model raises a
    FileNotFoundError saying why (`check_trained`).
    """
    check_trained(workdir)
    for entry in describe_config_history(workdir)[1:]:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in entry["changed"].items())
        reporting.console(f"{workdir}: config changed at step {entry['step']} ({entry['file']}): {shown}")
    config = latest_config(workdir)
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
