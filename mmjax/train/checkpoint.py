"""Orbax checkpoints of the train state and the data iterator, with a verified, safe resume.

Saves are asynchronous (training continues while the files are written); Orbax commits a step atomically (all of
its files are written into `<step>.orbax-checkpoint-tmp`, which is renamed to `<step>` last), so a crash or a
SIGKILL mid-write never leaves a half-written step in view. The latest N steps and the best step by a chosen
metric are kept.

Each step holds three items: `state` (the train state), `data` (the Grain iterator position) and `meta` (JSON:
a fingerprint of the state, see `state_fingerprint`, plus the loop's own small state, see `loop_state`). Orbax
does not checksum array bytes, so a flipped bit in a parameter file would otherwise restore silently; after every
restore the state's fingerprint is recomputed and compared. A latest step that fails to restore or to verify is
reported (a warning naming the step and the problem), moved aside to `<dir>/corrupt/` (never deleted) and the
previous step is used instead. Steps written before fingerprints existed restore with a note, unverified.

A failed write (e.g. disk full) raises `CheckpointWriteError`, naming the directory and the steps that are still
intact: a step that failed never became visible, and older steps are only deleted after a newer one commits.

A state restores onto any mesh, not only the one it was saved from (another FSDP size or device count, one
device, another number of processes): Orbax reads each saved array straight into the sharding that the
abstract state passed to `restore` asks for (every leaf must carry one, as `setup.Setup.abstract_state` does).
The fingerprint does not depend on the sharding, so cross-mesh restores are verified too.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers

from mmjax import reporting
from mmjax.registry import closest, invalid_choice
from mmjax.train.compilation import OneShot

CORRUPT_DIRNAME = "corrupt"
META_ITEM = "meta"  # JSON item saved with every step: {"format", "step", "fingerprint", "loop"}.
META_FORMAT = 1
FINGERPRINT_ALGORITHM = "uint32 wrap-around sums of the bitcast values: plain, and weighted by odd position hashes"
_GOLDEN = 0x9E3779B1  # Odd multiplier (2^32 / golden ratio) that spreads positions over the 32 bits.
_POLL_SECONDS = 0.005  # How often a wait for a checkpoint write checks whether it finished.


def check_best_metric(checkpoint: Mapping[str, Any], splits: Sequence[str], task: str,
                      metric_names: Sequence[str] | None) -> None:
    """`checkpoint.best_metric` is '' or 'SPLIT/METRIC' with an evaluated split and (when the task's metric
    names are known in advance) one of its metrics; `checkpoint.best_mode` is max or min."""
    if checkpoint.get("best_mode", "max") not in ("max", "min"):
        raise ValueError(invalid_choice("checkpoint.best_mode", checkpoint["best_mode"], ("max", "min")))
    best = checkpoint.get("best_metric") or ""
    if not isinstance(best, str):
        raise ValueError(f"config checkpoint.best_metric={best!r} must be a string 'SPLIT/METRIC' (or '' for none)")
    if not best:
        return
    split, _, metric = best.partition("/")
    if not metric or split not in splits:
        raise ValueError(
            f"config checkpoint.best_metric={best!r} must be 'SPLIT/METRIC' with SPLIT one of eval.splits "
            f"{list(splits)}, e.g. '{(tuple(splits) or ('validation',))[0]}/accuracy'.{closest(split, splits)}"
        )
    if metric_names is not None and metric not in (*metric_names, "loss"):
        valid = (*metric_names, "loss")
        raise ValueError(
            f"config checkpoint.best_metric={best!r}: task {task!r} reports no metric {metric!r}; "
            f"valid: {', '.join(valid)}.{closest(metric, valid)}"
        )


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. disk full); the message names the directory and the intact steps."""


class CheckpointVerificationError(ValueError):
    """A restored state differs from the fingerprint saved with its step (the files changed after the save)."""


# --- Fingerprints ------------------------------------------------------------------------------------------------


def leaf_name(path) -> str:
    """A leaf path as "/"-joined keys, the same for a `TrainState` and for its raw (dict) restore by Orbax."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _bits(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 values (64-bit values become two; 8/16-bit values are zero-extended)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # Adds a trailing axis of 2.
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksums(x: jax.Array) -> jax.Array:
    """`[sum(b), sum(b * w)]` mod 2^32 over the bits b of `x`, with w an odd hash of each value's position.

    Integer sums wrap exactly and in any order, so the result does not depend on the sharding or the number of
    devices. Flipping any single bit changes both sums (by an odd multiple of a power of two below 2^32), and
    the weighted one also changes when values move position.
    """
    bits = _bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        stride = (stride * bits.shape[axis]) % 2**32
    weights = (index * jnp.uint32(_GOLDEN)) | jnp.uint32(1)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])


@functools.lru_cache(maxsize=8)
def _fingerprint_fn(out_sharding):
    def checksums(leaves):
        return jnp.stack([_leaf_checksums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)

    return OneShot(checksums, out_shardings=out_sharding)  # Integer sums: exact whatever the optimisation.


def state_fingerprint(state: Any) -> dict[str, list[int]]:
    """`{leaf path: [sum, weighted sum]}` of every array of `state`, computed on its devices (one small jit).

    Exact integers: equal states give equal fingerprints whatever their sharding, mesh or process count.
    """
    with_paths = jax.tree_util.tree_leaves_with_path(state)
    names = [leaf_name(path) for path, _ in with_paths]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in with_paths]
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding)), None)
    # Replicated output, so that every process can read it (a multi-process state is not fully addressable).
    out_sharding = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    sums = np.asarray(_fingerprint_fn(out_sharding)(leaves))
    return {name: [int(a), int(b)] for name, (a, b) in zip(names, sums)}


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """The leaf paths whose fingerprints differ (or that exist on one side only)."""
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def verify_fingerprint(step: int, directory: str, meta: dict | None, state: Any) -> int | None:
    """Checks a restored `state` against the fingerprint in its step's `meta`; returns the number of leaves
    verified, or None for a step saved without one. Raises `CheckpointVerificationError` on any difference."""
    saved = (meta or {}).get("fingerprint", {}).get("leaves")
    if saved is None:
        return None
    differ = fingerprint_differences(saved, state_fingerprint(state))
    if differ:
        shown = ", ".join(differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise CheckpointVerificationError(
            f"checkpoint step {step} in {directory} failed verification: {len(differ)} of {len(saved)} arrays "
            f"differ from the fingerprint saved with the step ({shown}); its files changed after they were written "
            "(bit rot, a damaged copy, or an edit)"
        )
    return len(saved)


# --- Checkpointer ------------------------------------------------------------------------------------------------


def _first_os_error(error: BaseException) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


class Checkpointer:
    """Save/restore `{state, data, meta}` steps under `directory`."""

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
            async_options=ocp.AsyncOptions(post_finalization_callback=self._on_write_finished),
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", META_ITEM)
        )
        self._best_metric, self._best_mode = best_metric, best_mode
        self._meta: dict[int, dict | None] = {}  # Restored steps' meta items.
        self._in_flight: tuple[int, float] | None = None  # (step, start time) of the save being written.
        self._failed = False  # A write failure was already raised; closing must not raise it again.
        self.save_seconds: list[float] = []  # Wall time of each save, from `save()` until its files are written.

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, metrics: dict | None = None,
             loop_state: dict | None = None) -> None:
        """Starts an asynchronous save of `state`, the iterator position, the state's fingerprint and the JSON-able
        `loop_state` (the previous save is finished first). Raises `CheckpointWriteError` if a write fails."""
        self._wait()  # Errors of the previous save are reported as that step's.
        meta = {
            "format": META_FORMAT,
            "step": int(step),
            "fingerprint": {"algorithm": FINGERPRINT_ALGORITHM, "leaves": state_fingerprint(state)},
            "loop": loop_state or {},
        }
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            **{META_ITEM: ocp.args.JsonSave(meta)},
        )
        self._in_flight = (step, time.perf_counter())
        try:
            self._manager.save(step, args=args, metrics=metrics, force=True)
        except BaseException as error:
            self._in_flight = None  # No write of this step is under way to wait for.
            if isinstance(error, Exception):  # Orbax re-raises the writer threads' errors (OSError, ValueError, ...).
                raise self._write_failure(step, error) from error
            raise

    def _on_write_finished(self) -> None:
        """Orbax's callback once a save's files are all written (just before the step directory is committed)."""
        if self._in_flight is not None:
            self.save_seconds.append(time.perf_counter() - self._in_flight[1])

    @property
    def in_flight_step(self) -> int | None:
        """The step whose save was started and not yet waited for (it may have finished writing meanwhile)."""
        return self._in_flight[0] if self._in_flight is not None else None

    def _writing(self) -> bool:
        return self._in_flight is not None and self._manager.is_saving_in_progress()

    def finish_within(self, seconds: float, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Waits up to `seconds` (less if `give_up()` turns true) for the write in flight; when it finished, closes
        the manager and returns whether the step is committed. Used when a run must stop at once (a second signal):
        a write still running after that is left to Orbax's threads (a partial step is never resumed from)."""
        deadline = time.monotonic() + seconds
        while self._writing() and time.monotonic() < deadline and not give_up():
            time.sleep(_POLL_SECONDS)
        if self._writing():
            return False
        step = self.in_flight_step
        try:
            self.close()
        except CheckpointWriteError as error:
            reporting.console(str(error))
        return step is not None and step in self.committed_steps()

    def _wait(self) -> None:
        """Finishes the save in flight; its failure is reported as a `CheckpointWriteError` naming its step.

        Polls rather than blocking inside Orbax, so that a signal handler's exception (a second Ctrl-C) interrupts
        the wait cleanly, leaving the write running and `in_flight_step` known."""
        while self._writing():
            time.sleep(_POLL_SECONDS)
        in_flight = self._in_flight
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            step = in_flight[0] if in_flight else self.latest_step()
            raise self._write_failure(step, error) from error
        finally:
            self._in_flight = None

    def committed_steps(self) -> list[int]:
        """Steps whose directories were committed (read from disk, not from the manager's memory)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def _write_failure(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        self._failed = True
        os_error = _first_os_error(error)
        if os_error is not None:
            reason = f"{os.strerror(os_error.errno)} (errno {errno.errorcode.get(os_error.errno, os_error.errno)})"
            if os_error.filename:
                reason += f" writing {os_error.filename}"
        else:
            reason = f"{type(error).__name__}: {str(error)[:300]}"
        what = f"checkpoint step {step}" if step is not None else "the last checkpoint"
        intact = [s for s in self.committed_steps() if s != step]
        if intact:
            kept = (
                f"The previous checkpoints are intact (steps {intact}): a step becomes visible only once all of its "
                f"files are written, and {what} never was. Free space and re-run to resume from step {intact[-1]}."
            )
        else:
            kept = "No earlier checkpoint exists there, so a re-run starts from scratch."
        hint = " The disk is full." if os_error is not None and os_error.errno == errno.ENOSPC else ""
        return CheckpointWriteError(f"could not write {what} to {self.directory}: {reason}.{hint} {kept}")

    def _restore_args(self, step: int, state_args: Any, **items: Any) -> ocp.args.Composite:
        if os.path.isdir(os.path.join(self.directory, str(step), META_ITEM)):
            items[META_ITEM] = ocp.args.JsonRestore()
        return ocp.args.Composite(state=state_args, **items)

    def _verified(self, step: int, restored: Any) -> Any:
        meta = restored[META_ITEM] if META_ITEM in restored else None
        verified = verify_fingerprint(step, self.directory, meta, restored.state)
        if verified is None:
            reporting.console(
                f"note: checkpoint step {step} in {self.directory} has no fingerprint (saved before checkpoints were "
                "verified); restored without verification"
            )
        self._meta[step] = meta
        return restored.state

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores `step` into the shardings of `abstract_state` (whatever mesh it was saved from) and verifies it
        against its fingerprint; sets `data_iterator` to the saved position."""
        args = self._restore_args(
            step, ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
        )
        return self._verified(step, self._manager.restore(step, args=args))

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Restores (and verifies) only the train state of `step` (for evaluation; the data position is not needed)."""
        args = self._restore_args(step, ocp.args.StandardRestore(abstract_state))
        return self._verified(step, self._manager.restore(step, args=args))

    def loop_state(self, step: int) -> dict:
        """The `loop_state` saved with a restored `step` (`{}` for steps saved without one)."""
        return dict((self._meta.get(step) or {}).get("loop") or {})

    def best_step(self) -> int:
        """The kept step with the best `best_metric` value, the latest of equal ones (the one Orbax's BestN keeps;
        error when no step recorded it)."""
        if not self._best_metric:
            raise ValueError("no checkpoint.best_metric is configured, so there is no best step")
        scored = [(m[self._best_metric], s) for s in self.all_steps()
                  if (m := self.metrics(s)) and self._best_metric in m]
        if not scored:
            raise ValueError(f"no checkpoint in {self.directory} recorded {self._best_metric!r}")
        sign = 1.0 if self._best_mode == "max" else -1.0
        return max(scored, key=lambda value_step: (sign * value_step[0], value_step[1]))[1]

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """Restores the newest step that restores and verifies cleanly; returns (step, state) or None when there is
        none. A step that fails is reported, moved to `<directory>/corrupt/` (kept for inspection) and skipped."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as error:  # Orbax/tensorstore raise many types for damaged files.
                moved = self._quarantine(step)
                message = (
                    f"checkpoint step {step} in {self.directory} could not be restored "
                    f"({type(error).__name__}: {str(error)[:400]}); moved it to {moved} and trying the previous one"
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
        """Blocks until every pending asynchronous save is committed (raises `CheckpointWriteError` if one failed)."""
        self._wait()

    def close(self) -> None:
        """Finishes the pending save and releases Orbax's threads. A write failure already raised is not raised
        again (Orbax keeps re-raising it), so closing after an error never hides that error."""
        already_failed = self._failed
        try:
            self._wait()  # An interruption (a second signal) propagates from here and leaves the write running.
        except CheckpointWriteError:
            self._close_manager()
            if not already_failed:
                raise
            return
        self._close_manager()

    def _close_manager(self) -> None:
        try:
            self._manager.close()
        except Exception as error:
            if not self._failed:
                raise self._write_failure(None, error) from error


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
