"""Kill-anywhere test: SIGKILL a real training run at random moments, restart it each time, and check that it ends
bit-identical to an uninterrupted run and that no kill ever lost a committed checkpoint.

    python -m mmjax.train.kill_harness --kills 10 --workdir /tmp/kill_harness [--data_dir DIR] [--seed 0]

It trains a tiny AV-Digits model (`TINY_OVERRIDES`: a few thousand parameters, a checkpoint every 2 steps, an
evaluation every 8) as `python -m experiments.av_digits` subprocesses on CPU, each with its own fresh JAX:

1. a reference run, uninterrupted, in `WORKDIR/reference`;
2. the same run in `WORKDIR/killed`, started, SIGKILLed and restarted `--kills` times. Each kill's moment is drawn
   from a seeded RNG: during start-up (import, restore, compilation), after a given training step, or while an
   asynchronous checkpoint is being written (its `<step>.orbax-checkpoint-tmp` directory exists); the first kill
   always hits the very first checkpoint write. Then the run is restarted once more and left to finish.

Checked on every restart: it starts (a kill never leaves a directory that breaks the next start) and resumes from
the newest committed step, which restores and matches its fingerprint (`checkpoint.verify_fingerprint`).
Checked at the end: every kept step of both runs matches its fingerprint; the final train state (parameters,
optimizer state, RNG, step), the evaluation results (`results.json`) and the train/eval metric records
(`metrics.jsonl`, bar the timing fields `examples_per_s` and `input_wait_fraction`) equal the reference's exactly.

Printed figures (also in `WORKDIR/kill_harness.json`): kills survived (and where they hit), restarts, checkpoints
verified, steps redone (work lost to kills and recomputed) and bytes lost (bytes of committed checkpoints that a
restart could not use: must be 0). Exit status 0 when everything held, 1 otherwise.

A persistent compilation cache in `WORKDIR/jax_cache` keeps each restart to a few seconds; cached executables are
the same programs, so results stay bit-exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmjax.train import checkpoint

EXPERIMENT = "experiments.av_digits"
VARIANT = "early"
TINY_OVERRIDES = {
    "variants": VARIANT,
    "data.batch_size": 16,
    "data.eval_batch_size": 64,
    "data.cache_in_memory": False,  # Preprocess only the batches used: start-up in seconds.
    "model.encoders.image.features": "(4,)",
    "model.encoders.image.width": 16,
    "model.encoders.audio.features": "(4, 8)",
    "model.encoders.audio.width": 16,
    "model.head.hidden": "(16,)",
    "train.log_every_steps": 1,
    "train.eval_every_steps": 8,
    "checkpoint.every_steps": 2,
    "checkpoint.keep": 3,
    "optimizer.warmup_steps": 2,
}
TIMING_KEYS = ("examples_per_s", "input_wait_fraction")  # Metric-record fields that measure speed, not the model.
KINDS = ("start-up", "mid-training", "checkpoint write")
POLL_SECONDS = 0.002
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class KillTestError(RuntimeError):
    """A guarantee did not hold; the message says which."""


def _command(workdir: str, data_dir: str, steps: int) -> list[str]:
    overrides = {**TINY_OVERRIDES, "train.num_steps": steps}
    if data_dir:
        overrides["data.data_dir"] = data_dir
    return [sys.executable, "-m", EXPERIMENT, "--workdir", workdir,
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def _env(root: str, devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MMJAX_START_TIME", "MMJAX_TIME_LIMIT_S")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env


def committed_steps(checkpoints: str) -> dict[int, int]:
    """`{step: bytes}` of the committed steps under `checkpoints` (a step directory is renamed in when complete)."""
    if not os.path.isdir(checkpoints):
        return {}
    return {int(n): _size(os.path.join(checkpoints, n)) for n in os.listdir(checkpoints) if n.isdigit()}


def _writing(checkpoints: str, after: int, since: float | None = None) -> bool:
    """Whether a checkpoint of a step after `after` is being written: its temporary directory exists (and, with
    `since`, was written to after that `time.time()`, so that a leftover of an earlier kill does not count)."""
    try:
        names = os.listdir(checkpoints)
    except FileNotFoundError:
        return False
    for name in names:
        head = name.split(".")[0]
        if ".orbax-checkpoint-tmp" in name and head.isdigit() and int(head) > after:
            try:
                if since is None or os.stat(os.path.join(checkpoints, name)).st_mtime >= since:
                    return True
            except FileNotFoundError:
                continue  # Orbax renamed the temporary directory (the write committed) while we looked.
    return False


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:
                continue  # Removed by checkpoint rotation while we walked: it holds no bytes any more.
    return total


def _records(run_dir: str) -> list[dict]:
    """metrics.jsonl records (a torn last line of a killed process is skipped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


class LogWatcher:
    """Follows an attempt's console log: the last training step it printed ("step N/TOTAL | ..."). Unlike
    metrics.jsonl, which still holds a killed attempt's records until the next one restores, it shows only the
    progress of this attempt."""

    def __init__(self, path: str):
        self.path, self._offset, self._partial, self.last_step = path, 0, "", None

    def poll(self) -> int | None:
        try:
            with open(self.path, errors="replace") as f:
                f.seek(self._offset)
                text = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return self.last_step
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith("step ") and "/" in line:
                head = line[5:].split("/")[0].strip()
                if head.isdigit():
                    self.last_step = int(head)
        return self.last_step


@dataclasses.dataclass
class Attempt:
    """One start of the run under test."""

    index: int
    kind: str | None  # Where the kill was aimed (None: left to finish).
    committed_at_start: dict[int, int]
    returncode: int | None = None
    seconds: float = 0.0
    killed_during_write: bool = False
    reached_step: int = 0  # Last train step logged before the kill.
    resumed_from: int | None = None  # From its log; None when killed before it got that far.
    fresh_start: bool = False
    unverified: bool = False
    quarantined: bool = False


class Harness:
    def __init__(self, workdir: str, data_dir: str, kills: int, seed: int, steps: int, devices: int):
        self.root = os.path.abspath(workdir)
        self.data_dir, self.kills, self.steps, self.devices = data_dir, kills, steps, devices
        self.save_every = TINY_OVERRIDES["checkpoint.every_steps"]
        self.rng = random.Random(seed)
        self.env = _env(self.root, devices)
        self.logs = os.path.join(self.root, "logs")
        os.makedirs(self.logs, exist_ok=True)

    def _start(self, workdir: str, log_name: str) -> tuple[subprocess.Popen, Any]:
        log = open(os.path.join(self.logs, log_name), "w")
        proc = subprocess.Popen(_command(workdir, self.data_dir, self.steps), env=self.env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        return proc, log

    def reference(self) -> dict[str, float]:
        """The uninterrupted run; returns its start-up time (to the first logged step) and seconds per step."""
        workdir = os.path.join(self.root, "reference")
        start = time.monotonic()
        proc, log = self._start(workdir, "reference.log")
        watcher, first_step = LogWatcher(log.name), None
        while proc.poll() is None:
            if first_step is None and watcher.poll() is not None:
                first_step = time.monotonic() - start
            time.sleep(0.02)
        log.close()
        total = time.monotonic() - start
        if proc.returncode != 0:
            raise KillTestError(f"the reference run failed (status {proc.returncode}); see {log.name}")
        first_step = first_step or total
        return {"startup_s": first_step, "seconds": total, "step_s": max(total - first_step, 0.1) / self.steps}

    def _trigger(self, kind: str, checkpoints: str, after: int, timing: dict, since: float,
                 watcher: LogWatcher, nth_save: int | None = None) -> tuple[str, Any]:
        """(kind, condition) for one kill: a function of the attempt's age in seconds that says when to kill.

        `after` is the newest committed step when the attempt starts; `since` its start (`time.time()`), so that a
        temporary directory left by an earlier kill does not count as a write in progress. A "checkpoint write" kill
        hits the `nth_save` (default: a random one of the first 3) save of the attempt.
        """
        if kind == "start-up":  # Import, dataset, restore, compilation: before the first new step at the latest.
            # Near the end a restart has little to do: kill within the interpreter's import, which it cannot skip.
            delay = self.rng.uniform(0.0, timing["startup_s"] if after < self.steps - 2 else 2.0)
            return kind, lambda elapsed: elapsed >= delay or watcher.poll() is not None
        if kind == "checkpoint write":  # While the asynchronous write of the 1st, 2nd or 3rd save is under way.
            target = min(after + (nth_save or self.rng.randint(1, 3)) * self.save_every, self.steps)
            extra = self.rng.uniform(0.0, 0.03)
            seen: list[float] = []

            def during_write(elapsed: float) -> bool:
                if not seen and _writing(checkpoints, target - 1, since):
                    seen.append(elapsed)
                return bool(seen) and elapsed >= seen[0] + extra

            return kind, during_write
        target = min(after + self.rng.randint(1, 4), self.steps - 1)  # Mid-training: after a step, within the next.
        extra = self.rng.uniform(0.0, timing["step_s"])
        reached: list[float] = []

        def mid_training(elapsed: float) -> bool:
            if not reached and (watcher.poll() or 0) >= target:
                reached.append(elapsed)
            return bool(reached) and elapsed >= reached[0] + extra

        return kind, mid_training

    def _read_log(self, attempt: Attempt, path: str) -> None:
        with open(path, errors="replace") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("resumed from step "):
                attempt.resumed_from = int(line.split()[3])
            elif " parameters | " in line and attempt.resumed_from is None:
                attempt.fresh_start = True
        attempt.unverified = "has no fingerprint" in text
        attempt.quarantined = "could not be restored" in text

    def killed_run(self, timing: dict) -> list[Attempt]:
        workdir = os.path.join(self.root, "killed")
        run_dir = os.path.join(workdir, VARIANT)
        checkpoints = os.path.join(run_dir, "checkpoints")
        attempts: list[Attempt] = []
        for index in range(self.kills + 1):
            committed = committed_steps(checkpoints)
            after = max(committed, default=0)
            start_wall = time.time()
            watcher = LogWatcher(os.path.join(self.logs, f"attempt_{index:02d}.log"))
            if index == self.kills:
                kind, condition = None, None
            elif index == 0:  # The very first save of a fresh run.
                _, condition = self._trigger("checkpoint write", checkpoints, after, timing, start_wall, watcher,
                                             nth_save=1)
                kind = "first checkpoint write"
            else:  # Near the end only start-up is left to aim at (no step or save may come).
                aim = self.rng.choices(KINDS, weights=(1, 2, 2))[0] if after < self.steps - 2 else "start-up"
                kind, condition = self._trigger(aim, checkpoints, after, timing, start_wall, watcher)
            attempt = Attempt(index, kind, committed)
            start = time.monotonic()
            proc, log = self._start(workdir, os.path.basename(watcher.path))
            # A kill whose moment never comes (should not happen) falls back to a kill at this age; a last run that
            # takes this long has hung.
            limit = 3 * timing["seconds"] + 30 if condition is not None else 600.0
            while proc.poll() is None:
                elapsed = time.monotonic() - start
                if condition is not None and (condition(elapsed) or elapsed > limit):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    attempt.killed_during_write = _writing(checkpoints, -1, since=start_wall)
                    break
                if elapsed > limit:
                    proc.kill()
                    proc.wait()
                    raise KillTestError(f"attempt {index} did not finish in {limit:.0f} s; see {log.name}")
                time.sleep(POLL_SECONDS)
            log.close()
            attempt.returncode = proc.returncode
            attempt.seconds = time.monotonic() - start
            attempt.reached_step = watcher.poll() or 0
            self._read_log(attempt, log.name)
            attempts.append(attempt)
            if kind is not None and proc.returncode != -signal.SIGKILL:
                raise KillTestError(
                    f"attempt {index} ended by itself (status {proc.returncode}) before its kill ({kind}); "
                    f"{'use more --steps' if proc.returncode == 0 else 'it failed'}: see {log.name}"
                )
            if kind is None and proc.returncode != 0:
                raise KillTestError(f"the final restart failed (status {proc.returncode}); see {log.name}")
        return attempts


def _raw_state(step_dir: str) -> Any:
    """A step's state as saved (numpy leaves), read without a target, and its meta item."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sharding info not provided": read onto this process's CPU.
        state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    with open(os.path.join(step_dir, "meta", "metadata")) as f:
        meta = json.load(f)
    return state, meta


def verify_kept_steps(checkpoints: str) -> int:
    """Checks every committed step of `checkpoints` against its fingerprint; returns how many were verified."""
    steps = sorted(committed_steps(checkpoints))
    for step in steps:
        state, meta = _raw_state(os.path.join(checkpoints, str(step)))
        if checkpoint.verify_fingerprint(step, checkpoints, meta, state) is None:
            raise KillTestError(f"step {step} in {checkpoints} has no fingerprint")
    return len(steps)


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def compare(reference: str, killed: str, steps: int) -> dict[str, int]:
    """Raises `KillTestError` unless the two runs' final states, results and metric records are identical."""
    problems = []
    ref_state, _ = _raw_state(os.path.join(reference, "checkpoints", str(steps)))
    got_state, _ = _raw_state(os.path.join(killed, "checkpoints", str(steps)))
    ref_leaves, got_leaves = _flat(ref_state), _flat(got_state)
    if ref_leaves.keys() != got_leaves.keys():
        problems.append(f"final state structure differs: {sorted(set(ref_leaves) ^ set(got_leaves))[:5]}")
    differ = [k for k in ref_leaves if k in got_leaves and (
        ref_leaves[k].dtype != got_leaves[k].dtype or ref_leaves[k].shape != got_leaves[k].shape
        or ref_leaves[k].tobytes() != got_leaves[k].tobytes())]
    if differ:
        problems.append(f"final state differs in {len(differ)} arrays: {differ[:5]}")
    with open(os.path.join(reference, "results.json")) as f, open(os.path.join(killed, "results.json")) as g:
        if json.load(f)["splits"] != json.load(g)["splits"]:
            problems.append("evaluation results (results.json splits) differ")
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]  # noqa: E731
    ref_records, got_records = strip(_records(reference)), strip(_records(killed))
    if ref_records != got_records:
        first = next((i for i, (a, b) in enumerate(zip(ref_records, got_records)) if a != b),
                     min(len(ref_records), len(got_records)))
        problems.append(f"metrics.jsonl differs ({len(got_records)} vs {len(ref_records)} records; first difference "
                        f"at record {first})")
    if problems:
        raise KillTestError("the killed run does not match the uninterrupted one: " + "; ".join(problems))
    return {"arrays": len(ref_leaves), "records": len(ref_records)}


def figures(attempts: list[Attempt], verified_at_end: int, compared: dict[str, int], steps: int) -> dict[str, Any]:
    """The summary the README quotes; raises `KillTestError` when a restart lost or skipped a committed step."""
    kills = [a for a in attempts if a.kind is not None]
    restarts = attempts[1:]
    bytes_lost, redone, problems = 0, 0, []
    for previous, attempt in zip(attempts, attempts[1:]):
        newest = max(attempt.committed_at_start, default=None)
        redone += max(0, previous.reached_step - (newest or 0))
        if attempt.quarantined or attempt.unverified:
            problems.append(f"attempt {attempt.index}: a checkpoint failed to restore or was not verified")
        if attempt.resumed_from is not None and attempt.resumed_from != newest:
            lost = [s for s in attempt.committed_at_start if s > attempt.resumed_from]
            bytes_lost += sum(attempt.committed_at_start[s] for s in lost)
            problems.append(f"attempt {attempt.index} resumed from step {attempt.resumed_from}, not {newest}")
        if attempt.fresh_start and newest is not None:
            bytes_lost += sum(attempt.committed_at_start.values())
            problems.append(f"attempt {attempt.index} started from scratch although step {newest} was committed")
    if problems:
        raise KillTestError("; ".join(problems))
    where = {kind: sum(a.kind == kind for a in kills) for kind in ("first checkpoint write", *KINDS)}
    return {
        "kills_survived": len(kills),
        "kills_by_aim": where,
        "kills_during_checkpoint_write": sum(a.killed_during_write for a in kills),
        "restarts": len(restarts),
        "restores_verified": sum(a.resumed_from is not None for a in restarts),
        "kept_checkpoints_verified": verified_at_end,
        "checkpoints_verified": sum(a.resumed_from is not None for a in restarts) + verified_at_end,
        "steps_redone": redone,
        "steps": steps,
        "bytes_lost": bytes_lost,
        "identical_arrays": compared["arrays"],
        "identical_metric_records": compared["records"],
        "attempts": [dataclasses.asdict(a) for a in attempts],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="scratch directory: new, empty, or an earlier kill test's")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs before the run is left to finish")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: max(24, 3 x kills))")
    parser.add_argument("--data_dir", default="", help="TFDS data dir holding av_digits (default: TFDS's)")
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices per run")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    steps = args.steps or max(24, 3 * args.kills)
    if os.path.isdir(args.workdir) and os.listdir(args.workdir):
        if not os.path.isdir(os.path.join(args.workdir, "logs")):  # Only ever delete an earlier kill test's files.
            parser.error(f"--workdir {args.workdir} is not empty and holds no earlier kill test; use a new directory")
        shutil.rmtree(args.workdir)
    harness = Harness(args.workdir, args.data_dir, args.kills, args.seed, steps, args.devices)
    started = time.monotonic()
    timing = harness.reference()
    print(f"reference run: {timing['seconds']:.1f} s ({timing['startup_s']:.1f} s to the first step)", flush=True)
    attempts = harness.killed_run(timing)
    reference = os.path.join(harness.root, "reference", VARIANT)
    killed = os.path.join(harness.root, "killed", VARIANT)
    verified = verify_kept_steps(os.path.join(killed, "checkpoints")) + verify_kept_steps(
        os.path.join(reference, "checkpoints"))
    result = figures(attempts, verified, compare(reference, killed, steps), steps)
    result["seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(harness.root, "kill_harness.json"), "w") as f:
        json.dump(result, f, indent=2)
    aims = ", ".join(f"{n} aimed at {k}" for k, n in result["kills_by_aim"].items() if n)
    print(
        f"kills survived: {result['kills_survived']} ({aims}; {result['kills_during_checkpoint_write']} landed while "
        f"a checkpoint was being written)\n"
        f"restarts: {result['restarts']}\n"
        f"checkpoints verified: {result['checkpoints_verified']} ({result['restores_verified']} restores at restart, "
        f"{result['kept_checkpoints_verified']} kept steps at the end), 0 failed\n"
        f"steps redone: {result['steps_redone']} (of {steps})\n"
        f"bytes lost: {result['bytes_lost']}\n"
        f"final state ({result['identical_arrays']} arrays), evaluation results and "
        f"{result['identical_metric_records']} metric records: identical to the uninterrupted run\n"
        f"time: {result['seconds']} s",
        flush=True,
    )
    return result


if __name__ == "__main__":
    try:
        main()
    except KillTestError as error:
        print(f"kill test FAILED: {error}", file=sys.stderr)
        sys.exit(1)
