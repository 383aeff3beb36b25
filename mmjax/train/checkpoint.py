"""Orbax checkpoints of the train state and the data iterator, with a safe resume.

Saves are asynchronous (training continues while the files are written); Orbax commits a step atomically, so a
crash mid-write never leaves a half-written step in view. The latest N steps and the best step by a chosen
metric are kept. A latest step that fails to restore is moved aside to `<dir>/corrupt/` (never deleted) and the
previous step is used instead.

A state restores onto any mesh, not only the one it was saved from (another FSDP size or device count, one
device, another number of processes): Orbax reads each saved array straight into the sharding that the
abstract state passed to `restore` asks for (every leaf must carry one, as `loop.Setup.abstract_state` does).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CORRUPT_DIRNAME = "corrupt"


class Checkpointer:
    """Save/restore `{state, data}` steps under `directory`."""

    def __init__(self, directory: str, *, keep: int, best_metric: str | None, best_mode: str = "max"):
        if keep < 1:
            raise ValueError(f"config checkpoint.keep={keep} must be >= 1")
        if best_mode not in ("max", "min"):
            raise ValueError(f"config checkpoint.best_mode={best_mode!r}; valid: max, min")
        self.directory = os.path.abspath(directory)
        policies = [checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            # Orbax writes a step's metrics to disk only when `best_fn` is set; without them a restarted run could
            # not tell which kept step was the best (and BestN would no longer protect it).
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._best_metric, self._best_mode = best_metric, best_mode

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, metrics: dict | None = None) -> None:
        """Starts an asynchronous save (the previous one is finished first)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator))
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores `step` into the shardings of `abstract_state` (whatever mesh it was saved from); sets
        `data_iterator` to the saved position."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
        )
        return self._manager.restore(step, args=args).state

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Restores only the train state of `step` (for evaluation; the data position is not needed)."""
        return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state

    def best_step(self) -> int:
        """The kept step with the best `best_metric` value (error when no step recorded it)."""
        if not self._best_metric:
            raise ValueError("no checkpoint.best_metric is configured, so there is no best step")
        scored = [(m[self._best_metric], s) for s in self.all_steps() if (m := self.metrics(s)) and self._best_metric in m]
        if not scored:
            raise ValueError(f"no checkpoint in {self.directory} recorded {self._best_metric!r}")
        return (max if self._best_mode == "max" else min)(scored)[1]

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """Restores the newest step that restores cleanly; returns (step, state) or None when there is none.

        A step that fails is reported, moved to `<directory>/corrupt/` (kept for inspection) and skipped.
        """
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as error:  # Orbax/tensorstore raise many types for damaged files.
                moved = self._quarantine(step)
                message = (
                    f"checkpoint step {step} in {self.directory} could not be restored "
                    f"({type(error).__name__}: {str(error)[:300]}); moved it to {moved} and trying the previous one"
                )
                warnings.warn(message, RuntimeWarning, stacklevel=2)
        return None

    def _quarantine(self, step: int) -> str:
        """Moves a damaged step out of the manager's view (process 0 only) and reloads the step list."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, CORRUPT_DIRNAME, f"{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.exists(source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(source, target)
        _sync(f"quarantine-{step}")
        self._manager.reload()
        return target

    def metrics(self, step: int) -> dict | None:
        return self._manager.metrics(step)

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
