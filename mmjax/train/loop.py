"""`run(config, workdir)`: train, evaluate and checkpoint one model; re-running on the same workdir resumes.

The loop only orchestrates: `setup` builds and checks everything from the config, `preflight` and `workdir` guard
the run's directory (writable, locked, the same model, its config history) and load it back, `checkpoint` saves
and restores, `preemption` turns signals into a clean stop, `reliability` handles NaN/Inf and the time budget,
`early_stopping` ends a run whose best metric stopped improving, and the evaluators (`mmjax.evaluate`) compute
the metrics.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import reporting
from mmjax.data import pipeline
from mmjax.evaluate.outputs import scalars
from mmjax.train import early_stopping, preflight, reliability
from mmjax.train import workdir as workdir_lib
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.memory import step_memory
from mmjax.train.preemption import StopNow, StopRequest, any_process, stopped_at_once
from mmjax.train.setup import Setup, setup
from mmjax.train.state import count_parameters
from mmjax.train.step import split_params
from mmjax.train.workdir import CHECKPOINTS_DIRNAME, INPUTS_FILENAME, RESULTS_FILENAME, check_workdir, checkpointer


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns the results dict.

    Reliability (see README "Reliability"): a run killed at any moment resumes from its last committed checkpoint
    and ends bit-identical (parameters, evaluation results, train-metric records) to an uninterrupted one. On
    SIGTERM/SIGINT or when `train.time_limit_s` (or the CLI's `--time_limit_s`) is about to run out, the current
    step finishes, a checkpoint is written and the returned dict is `{"preempted": True, "step": N}` (the CLI exits
    with `PREEMPTED_EXIT_CODE`). A NaN/Inf loss or gradient raises `reliability.NonFiniteError` before anything of
    that step is saved (or, with `train.nonfinite="skip"`, the update is skipped). A failed checkpoint write raises
    `checkpoint.CheckpointWriteError`. On every exit path the pending checkpoint write is finished and logs closed;
    on a second signal it gets a grace period and `preemption.StoppedAtOnce` is raised after one line naming the
    checkpoint that survives. A workdir that is read-only, locked by another run (`workdir_lock`) or holds a step
    beyond `train.num_steps`, or a read-only TFDS data dir the dataset must be built in, raises
    `preflight.RunRefused` (one line on the command line) before anything is done.
    """
    workdir = os.path.abspath(workdir)
    nonfinite, time_limit_s = reliability.options(config)
    patience = early_stopping.patience(config)
    preflight.check_data_dir(config.data)
    preflight.check_workdir_writable(workdir)
    budget = reliability.TimeBudget(reliability.deadline(time_limit_s))
    try:
        with workdir_lib.locked(workdir):
            return _run(config, workdir, budget, nonfinite, patience)
    except StopNow as error:
        raise stopped_at_once(error, os.path.join(workdir, CHECKPOINTS_DIRNAME)) from None


def _run(config, workdir, budget: reliability.TimeBudget, nonfinite: str, patience: int) -> dict[str, Any]:
    """`run()` once the workdir is locked: set up, train, evaluate and write the results."""
    stop = StopRequest()
    with stop.installed():
        s = setup(config)
        s.workdir = workdir  # Evaluators that write samples (captioning) put them here.
        dataset, spec = s.dataset, s.spec
        check_workdir(workdir, config, spec)
        workdir_lib.check_saved_step(workdir, config.train.num_steps)
        if reporting.is_primary():
            reliability.write_json_atomic(os.path.join(workdir, INPUTS_FILENAME), spec, indent=2)

        # Batches are checked and sent to the devices `data.prefetch` steps ahead by a background thread;
        # `train_iter` checkpoints the position of the batches the steps consumed (pipeline.DevicePrefetcher).
        train_iter = pipeline.device_prefetch(
            iter(
                pipeline.train_dataset(
                    dataset,
                    config.data.train_split,
                    global_batch_size=config.data.batch_size,
                    seed=config.seed,
                    num_threads=config.data.num_threads,
                    num_workers=config.data.num_workers,
                )
            ),
            pipeline.checked_to_global(spec, s.keys, pipeline.local_batch_size(config.data.batch_size),
                                       s.batch_sharding),
            size=config.data.get("prefetch", 2),
        )
        manager = checkpointer(workdir, config)
        writer = reporting.MetricWriter(workdir)
        try:
            outcome = _train(config, workdir, s, train_iter, manager, writer, stop, budget, nonfinite, patience)
            train_iter.close()  # Stops the prefetch thread (and Grain's workers); prefetched batches are dropped.
            manager.close()  # Raises CheckpointWriteError if the last save failed.
            writer.close()
        except BaseException as error:
            train_iter.close()
            _close_after_error(manager, writer, stop, error)
            raise
    if outcome.get("preempted"):
        return outcome
    previous = os.path.join(workdir, RESULTS_FILENAME)
    memory, step_times = outcome["memory"], outcome["step_times"]
    if memory is None and outcome["start_step"] == outcome["step"] and os.path.exists(previous):
        with open(previous) as f:  # A finished run, only restarted: keep the measurements of its training.
            saved = json.load(f)
        memory, step_times = saved.get("step_memory"), [saved["step_time_s"]] if saved.get("step_time_s") else []
    results = {
        "name": config.get("name", ""),
        "workdir": workdir,
        "steps": outcome["step"],  # num_steps, or the step where early stopping ended the run.
        "resumed_from_step": outcome["start_step"],
        "train_seconds_this_run": round(outcome["train_seconds"], 2),
        "step_time_s": float(np.median(step_times)) if step_times else None,
        "input_wait_s_this_run": round(train_iter.wait_seconds, 2),
        "num_parameters": count_parameters(s.abstract_state.params),
        "step_memory": memory,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "splits": outcome["final"],
    }
    if nonfinite == "skip":
        results["nonfinite_skipped_steps"] = outcome["skipped"]
    if outcome["early_stopped"]:
        results["early_stopped"] = outcome["early_stopped"]
    results["config_history"] = workdir_lib.describe_config_history(workdir)
    if reporting.is_primary():
        reliability.write_json_atomic(os.path.join(workdir, RESULTS_FILENAME), results, indent=2)
        reporting.plot_curves(reporting.read_metrics(workdir), os.path.join(workdir, "curves.png"),
                              config.get("name", ""))
    return results


def _close_after_error(checkpointer: Checkpointer, writer: reporting.MetricWriter, stop: StopRequest,
                       error: BaseException) -> None:
    """Finishes the pending checkpoint write (after a second signal: within its grace period) and closes the logs
    while an error propagates; a second failure here is printed, never raised over the first."""
    closes = [checkpointer.close, writer.close]
    if isinstance(error, StopNow):
        stop.finish_pending(error, checkpointer.finish_within, checkpointer.in_flight_step)
        closes = [writer.close]
    for close in closes:
        try:
            close()
        except Exception as failure:  # noqa: BLE001 - the original error is the one to report.
            reporting.console(
                f"while stopping after an error: {close.__qualname__} failed: {type(failure).__name__}: {failure}"
            )


def _train(config, workdir, s: Setup, train_iter, checkpointer: Checkpointer, writer: reporting.MetricWriter,
           stop: StopRequest, budget: reliability.TimeBudget, nonfinite: str, patience: int) -> dict[str, Any]:
    """The body of `run()` between opening and closing the checkpointer and the metric writer."""
    num_steps = config.train.num_steps
    restored = checkpointer.restore_latest(s.abstract_state, train_iter)
    if restored is None:
        state = s.initial_state()
        start_step, saved = 0, {}
    else:
        start_step, state = restored
        saved = checkpointer.loop_state(start_step)
        reporting.console(f"resumed from step {start_step} in {workdir}")
    writer.truncate_after(start_step)  # Records of steps after the checkpoint are recomputed identically.
    workdir_lib.record_config(workdir, config, start_step)
    early = early_stopping.EarlyStopping(patience, config.checkpoint.best_metric, config.checkpoint.best_mode,
                                         saved.get("early_stopping"))

    num_params = count_parameters(s.abstract_state.params)
    frozen_note = ""
    if s.frozen:
        frozen_note = f" ({count_parameters(split_params(s.abstract_state.params, s.frozen)[1]):,} frozen)"
    reporting.console(
        f"{config.get('name', 'run')}: {num_params:,} parameters{frozen_note} | {jax.device_count()} device(s) on "
        f"{jax.process_count()} process(es) | batch {config.data.batch_size} | {num_steps} steps | {workdir}"
    )
    step_fn = s.train_step_fn()

    def evaluate_all(step: int, log: bool = True) -> dict[str, dict]:
        results = {}
        for split in config.eval.splits:
            results[split] = s.evaluate(state, split)
            if log:
                writer.write(step, split, scalars(results[split]))
            shown = " | ".join(f"{k} {v:.4f}" for k, v in scalars(results[split]).items())
            reporting.console(f"eval {split} @ step {step}: {shown}")
        return results

    def flat(results: dict[str, dict]) -> dict[str, float]:
        return {f"{split}/{k}": v for split, m in results.items() for k, v in scalars(m).items()}

    # What a checkpoint must carry besides the state for a resumed run to log exactly what an uninterrupted one
    # does: the per-step metrics since the last logged record, the evaluation of the saved step, the skip count.
    window = reliability.window_from_json(saved.get("window"))
    last_eval: tuple[int, dict] | None = (start_step, saved["eval"]) if "eval" in saved else None
    skipped = int(saved.get("skipped_steps", 0))
    last_checkpoint = start_step if restored is not None else None
    unchecked: list[tuple[int, dict]] = []  # Steps whose loss / gradient norm were not yet checked for NaN/Inf.

    def check_finite() -> None:
        """Called before anything is logged, evaluated or saved: no trace of a non-finite step is ever kept."""
        if nonfinite == "stop" and unchecked:
            reliability.raise_if_nonfinite(unchecked, last_checkpoint, checkpointer.directory)
        unchecked.clear()

    def evaluates(step: int) -> bool:
        return step % config.train.eval_every_steps == 0 or step == num_steps

    progress = reporting.Progress(num_steps, config.data.batch_size, start_step)
    step = start_step
    memory = None
    preempted = False
    step_times: list[float] = []  # Seconds per step over each logging window (after the first, compiled one).
    window_start, window_steps, window_wait = None, 0, 0.0
    train_start = time.perf_counter()
    if early.stopped:
        reporting.console(f"{early.message()}; this run is finished, nothing to train (a new --workdir trains more)")
    elif step < num_steps and any_process(stop.signal is not None or
                                          budget.exhausted(evaluates=evaluates(step + 1))):
        stop.acted_on = True
        reporting.console(f"stopping before training, at step {step} in {workdir}, because of {stop.reason}; re-run to "
                        "continue")
        return {"preempted": True, "step": step}
    while step < num_steps and not early.stopped:
        step_start = time.perf_counter()
        batch = next(train_iter)  # Checked against the input spec and already on the devices.
        state, metrics = step_fn(state, batch)
        if memory is None:
            memory = step_memory(step_fn, s.abstract_state, batch)
        if budget.active:  # Time the step itself, not its dispatch.
            jax.block_until_ready(metrics)
            budget.step_seconds.append(time.perf_counter() - step_start)
        step += 1
        window_steps += 1
        window.append(metrics)
        unchecked.append((step, metrics))
        if step % config.train.log_every_steps == 0 or step == num_steps:
            check_finite()
            averaged = reliability.average_window(window, nonfinite == "skip")
            skipped += averaged.get(reliability.SKIPPED_METRIC, 0)
            window.clear()
            now = time.perf_counter()
            if window_start is not None:
                step_times.append((now - window_start) / window_steps)
                # The share of the window's wall time spent blocked waiting for the next batch.
                averaged["input_wait_fraction"] = (train_iter.wait_seconds - window_wait) / (now - window_start)
            window_start, window_steps, window_wait = now, 0, train_iter.wait_seconds
            averaged["examples_per_s"] = progress.report(step, averaged)
            writer.write(step, "train", averaged)
        evaluated = evaluates(step)
        if evaluated:
            check_finite()
            eval_start = time.perf_counter()
            last_eval = (step, evaluate_all(step))
            budget.eval_seconds.append(time.perf_counter() - eval_start)
            early.update(step, flat(last_eval[1]), num_steps)
            window_start, window_steps = None, 0  # Evaluation time is not step time.
        if step < num_steps:
            stop.time_up = budget.exhausted(evaluates=evaluates(step + 1), save_seconds=checkpointer.save_seconds)
        stopping = stop.requested()
        if stopping or evaluated or step % config.checkpoint.every_steps == 0:
            check_finite()
            loop_state = {
                "window": reliability.window_to_json(window),
                "skipped_steps": skipped,
                **({"eval": last_eval[1]} if evaluated else {}),
                **({"early_stopping": early.to_json()} if early.active else {}),
            }
            with stop.saving():  # A second signal meanwhile waits until this save's write is under way.
                checkpointer.save(step, state, train_iter, flat(last_eval[1]) if evaluated else None, loop_state)
            last_checkpoint = step
            if budget.active and not checkpointer.save_seconds:
                checkpointer.wait()  # Times the first save, which the budget needs.
            window_start, window_steps = None, 0
        if early.stopped:
            reporting.console(early.message())
            break
        if stopping:
            stop.acted_on = True
            reporting.console(f"stopped at step {step} after {stop.reason}; checkpoint saved. Re-run to resume.")
            preempted = True
            break
    check_finite()
    if preempted:
        return {"preempted": True, "step": step}
    train_seconds = time.perf_counter() - train_start
    if last_eval and last_eval[0] == step:
        final = last_eval[1]
    else:  # A finished run saved without its evaluation (older checkpoints): evaluate, logging it only once.
        records = reporting.read_metrics(workdir)
        logged = any(r["step"] == step and r["split"] in config.eval.splits for r in records)
        final = evaluate_all(step, log=not logged)
    return {"preempted": False, "start_step": start_step, "step": step, "final": final, "memory": memory,
            "step_times": step_times, "train_seconds": train_seconds, "skipped": skipped,
            "early_stopped": early.stopped}
