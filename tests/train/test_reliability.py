"""Reliability of training runs: kills at any moment, pre-emption (signals, time limit), corrupt or partial
checkpoints, NaN/Inf losses, a dead process among several, a full disk. Each test states the guarantee it checks.

Subprocess runs use 8 CPU devices like this process, so that their results compare bit for bit with in-process
runs.
"""

import errno
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import av_digits
from mmjax import cli
from mmjax import config as config_lib
from mmjax.train import checkpoint, kill_harness, loop, parallel, preemption, reliability
from mmjax.train import setup as setup_lib
from tests.conftest import REPO_ROOT, cpu_env, tiny_overrides

NUM_STEPS = 6  # tiny_overrides: checkpoints at steps 2, 3, 4, 6 (every 2 steps and at each evaluation: 3, 6).


def variant_config(data_dir, **extra):
    """Exactly the config that `python -m experiments.av_digits --config.variants=early` trains (tiny)."""
    config = config_lib.apply_overrides(
        cli.with_optional_keys(av_digits.get_config(), [f"{k}=" for k in extra]),
        tiny_overrides(data_dir, variants="early", **extra),
    )
    variant = av_digits.VARIANTS["early"](ml_collections.ConfigDict(config.to_dict()))
    variant.name = f"{config.name}/early"
    return variant


def experiment_command(workdir, data_dir, *args, **overrides):
    return [sys.executable, "-m", "experiments.av_digits", "--workdir", workdir, *args,
            *(f"--config.{o}" for o in tiny_overrides(data_dir, variants="early", **overrides))]



def raw_state(workdir, step):
    """A saved step's train state as written (no target, no verification)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def flat(tree):
    """Leaves by "/"-joined path: the same names for a `TrainState` and for its raw (dict) restore."""
    return {checkpoint.leaf_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_identical(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


def records(workdir):
    """metrics.jsonl without the timing fields."""
    from mmjax.train.kill_harness import TIMING_KEYS

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def committed(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def assert_same_run(workdir, reference_dir, reference_results, results, step=NUM_STEPS):
    assert_identical(raw_state(workdir, step), raw_state(reference_dir, step))
    assert results["splits"] == reference_results["splits"]
    assert records(workdir) == records(reference_dir)


@pytest.fixture(scope="module")
def reference(av_digits_dir, tmp_path_factory):
    """The tiny run, uninterrupted: what every interrupted and resumed run must equal bit for bit."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    return workdir, loop.run(variant_config(av_digits_dir), workdir)


def copy_of(reference_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_dir, workdir)
    return workdir


# --- Fingerprints ------------------------------------------------------------------------------------------------


def test_fingerprint_is_exact_whatever_the_sharding_and_sees_a_single_bit():
    """The checksum is an exact integer per leaf: equal on any mesh, different after any one-bit change."""
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(64, 32)).astype(np.float32), "h": rng.normal(size=(8, 16)).astype(jnp.bfloat16),
            "i": np.arange(10, dtype=np.int32), "key": np.asarray(jax.random.PRNGKey(3)), "b": np.array([True, False])}
    expected = checkpoint.state_fingerprint(tree)
    for fsdp in (1, 2, 8):
        mesh = parallel.make_mesh(fsdp)
        placed = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, parallel.fsdp_spec(v.shape, fsdp, 64)))
                  for k, v in tree.items()}
        assert checkpoint.state_fingerprint(placed) == expected
    for key, index, bit in (("w", 777, 0), ("w", 0, 31), ("h", 5, 15), ("i", 9, 3), ("b", 1, 0)):
        changed = {k: v.copy() for k, v in tree.items()}
        view = changed[key].reshape(-1).view(np.uint8 if key == "b" else f"uint{8 * changed[key].itemsize}")
        view[index] ^= view.dtype.type(1 << bit)
        assert checkpoint.fingerprint_differences(expected, checkpoint.state_fingerprint(changed)) == [key]
    swapped = {**tree, "i": tree["i"][::-1].copy()}  # Same values, other positions: the weighted sum sees it.
    assert checkpoint.fingerprint_differences(expected, checkpoint.state_fingerprint(swapped)) == ["i"]


# --- Corrupt or partial checkpoints ------------------------------------------------------------------------------


def largest_array_file(workdir, step):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, "checkpoints", str(step), "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep]
    return max(files, key=lambda p: (os.path.getsize(p), p))


def test_truncated_file_of_latest_step_is_reported_and_the_previous_step_used(reference, av_digits_dir, tmp_path):
    reference_dir, reference_results = reference
    workdir = copy_of(reference_dir, tmp_path)
    path = largest_array_file(workdir, NUM_STEPS)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.warns(RuntimeWarning, match=f"checkpoint step {NUM_STEPS} in .* could not be restored") as caught:
        results = loop.run(variant_config(av_digits_dir), workdir)
    assert len(caught) == 1
    assert results["resumed_from_step"] == 4
    assert os.listdir(os.path.join(workdir, "checkpoints", checkpoint.CORRUPT_DIRNAME))  # Kept for inspection.
    assert_same_run(workdir, reference_dir, reference_results, results)


def flip_one_bit_that_orbax_restores(workdir, step):
    """Flips one bit of the largest array file of `step` at the first position (from the middle on, a fixed order)
    where a plain Orbax restore still succeeds but returns other values: the damage Orbax alone cannot see.
    Returns the flipped file and byte offset."""
    path = largest_array_file(workdir, step)
    original = open(path, "rb").read()
    before = flat(raw_state(workdir, step))
    for offset in list(range(len(original) // 2, len(original))) + list(range(len(original) // 2)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x10
        with open(path, "wb") as f:
            f.write(damaged)
        try:
            after = flat(raw_state(workdir, step))
        except Exception:  # noqa: BLE001 - this position breaks the file's structure; Orbax would notice.
            continue
        if any(after[k].tobytes() != before[k].tobytes() for k in before):
            return path, offset
    raise AssertionError(f"no single-bit flip of {path} restores silently")


def test_bit_flip_in_latest_step_is_detected_by_the_fingerprint(reference, av_digits_dir, tmp_path):
    reference_dir, reference_results = reference
    workdir = copy_of(reference_dir, tmp_path)
    path, offset = flip_one_bit_that_orbax_restores(workdir, NUM_STEPS)  # Without the check: silently wrong.
    with pytest.warns(RuntimeWarning, match=f"checkpoint step {NUM_STEPS} in .* could not be restored "
                                            r"\(CheckpointVerificationError: .*failed verification: 1 of \d+ arrays"):
        results = loop.run(variant_config(av_digits_dir), workdir)
    assert results["resumed_from_step"] == 4
    quarantined = os.listdir(os.path.join(workdir, "checkpoints", checkpoint.CORRUPT_DIRNAME))
    assert [n.split("-")[0] for n in quarantined] == [str(NUM_STEPS)]
    assert_same_run(workdir, reference_dir, reference_results, results)


def test_checkpoint_without_fingerprint_restores_with_a_note(reference, av_digits_dir, tmp_path, capsys):
    """Steps saved before fingerprints existed (no `meta` item) still restore, unverified, and the finished run
    is not evaluated and logged twice."""
    reference_dir, reference_results = reference
    workdir = copy_of(reference_dir, tmp_path)
    for step in committed(workdir):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), checkpoint.META_ITEM))
    results = loop.run(variant_config(av_digits_dir), workdir)
    assert f"note: checkpoint step {NUM_STEPS} in" in capsys.readouterr().out
    assert results["resumed_from_step"] == NUM_STEPS
    assert_same_run(workdir, reference_dir, reference_results, results)


# --- Pre-emption -------------------------------------------------------------------------------------------------


def signal_at_step(monkeypatch, step, *signals):
    """Sends `signals` to this process as step `step` starts (a real signal, real handler). Hooked on the train
    step itself: batches are read ahead by the prefetch thread, so reading batch k is not step k."""
    train_step_fn = setup_lib.Setup.train_step_fn

    def signalling_train_step_fn(self):
        step_fn, calls = train_step_fn(self), {"n": 0}

        def step_and_signal(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step:
                for s in signals:
                    os.kill(os.getpid(), s)
            return step_fn(*args, **kwargs)

        step_and_signal.lower = step_fn.lower  # The loop's memory analysis lowers the jitted step.
        return step_and_signal

    monkeypatch.setattr(setup_lib.Setup, "train_step_fn", signalling_train_step_fn)


def test_sigint_finishes_the_step_saves_and_logs(av_digits_dir, tmp_path, monkeypatch, capsys):
    """A real SIGINT during step 5: the step finishes, is logged and saved, and run() returns `preempted` (the
    resumed run's exactness: the slow subprocess test below, and tests/train/test_loop.py)."""
    workdir = str(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        signal_at_step(patch, 5, signal.SIGINT)
        stopped = loop.run(variant_config(av_digits_dir), workdir)
    assert stopped == {"preempted": True, "step": 5}
    assert "stopped at step 5 after a SIGINT; checkpoint saved" in capsys.readouterr().out
    assert committed(workdir)[-1] == 5 and records(workdir)[-1]["step"] == 5  # Saved and logged.
    assert signal.getsignal(signal.SIGINT) is handler  # Restored.


def test_second_signal_stops_at_once_after_finishing_the_pending_write(av_digits_dir, tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path)
    signal_at_step(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM)
    with pytest.raises(preemption.StoppedAtOnce) as stopped:
        loop.run(variant_config(av_digits_dir), workdir)
    assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE and stopped.value.step == 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "second signal (SIGTERM): stopped at once; checkpoint step 2 was being written and is complete; re-run to "
        "resume from step 2")
    assert committed(workdir) == [2]  # Step 2's asynchronous write was completed; no new checkpoint started.
    restored = raw_state(workdir, 2)
    meta = json.load(open(os.path.join(workdir, "checkpoints", "2", "meta", "metadata")))
    assert checkpoint.verify_fingerprint(2, workdir, meta, restored) > 0


def test_second_signal_while_the_stop_checkpoint_is_saved_keeps_it(av_digits_dir, tmp_path, monkeypatch, capsys):
    """The probe: Ctrl-C, then Ctrl-C again as the checkpoint of the stop is being saved. That save used to be
    dropped (the run fell back to an older step) with a 30-line traceback; it is now completed, and one line names
    it."""
    workdir = str(tmp_path)
    signal_at_step(monkeypatch, 5, signal.SIGINT)
    save = checkpoint.Checkpointer.save

    def save_and_signal(self, step, *args, **kwargs):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # The second Ctrl-C, as the save starts.
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_and_signal)
    with pytest.raises(preemption.StoppedAtOnce) as stopped:
        loop.run(variant_config(av_digits_dir), workdir)
    assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE and stopped.value.step == 5
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "second signal (SIGINT): stopped at once; checkpoint step 5 was being written and is complete; re-run to "
        "resume from step 5")
    assert committed(workdir)[-1] == 5
    meta = json.load(open(os.path.join(workdir, "checkpoints", "5", "meta", "metadata")))
    assert checkpoint.verify_fingerprint(5, workdir, meta, raw_state(workdir, 5)) > 0


def test_a_write_that_outlasts_the_grace_period_is_not_waited_for(av_digits_dir, tmp_path, monkeypatch, capsys):
    """After a second signal, a checkpoint write still running after `SECOND_SIGNAL_GRACE_S` is left behind (here one
    that never seems to finish): the run stops, naming it and the step a re-run resumes from."""
    monkeypatch.setattr(preemption, "SECOND_SIGNAL_GRACE_S", 0.5)
    stuck = {"on": False}
    writing = checkpoint.Checkpointer._writing
    monkeypatch.setattr(checkpoint.Checkpointer, "_writing",
                        lambda self: (stuck["on"] and self.in_flight_step is not None) or writing(self))
    train_step_fn = setup_lib.Setup.train_step_fn

    def stuck_at_step_3(self):
        step_fn, calls = train_step_fn(self), {"n": 0}

        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                stuck["on"] = True
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return step_fn(*args, **kwargs)

        step.lower = step_fn.lower
        return step

    monkeypatch.setattr(setup_lib.Setup, "train_step_fn", stuck_at_step_3)
    started = time.monotonic()
    with pytest.raises(preemption.StoppedAtOnce):
        loop.run(variant_config(av_digits_dir), str(tmp_path))
    assert time.monotonic() - started < 120
    assert ("second signal (SIGTERM): stopped at once; checkpoint step 2 is still being written after 0.5 s (the "
            "process ends when it is; another signal abandons it, and a partial step is never resumed from); re-run "
            "to resume from the latest complete step, now") in capsys.readouterr().out


def test_signal_in_start_up_stops_before_training_and_one_after_the_last_step_carries_over(
        reference, av_digits_dir, tmp_path, monkeypatch, capsys):
    """A signal while the run sets up stops it before its first step (nothing new to save); one that arrives
    when no step is left (here: a finished run restarted) lets it finish and stops the next run of the process
    (e.g. the next variant of a comparison) before it trains."""
    reference_dir, reference_results = reference
    real_setup = setup_lib.setup

    def setup_and_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_setup(*args, **kwargs)

    fresh = str(tmp_path / "fresh")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "setup", setup_and_signal)
        assert loop.run(variant_config(av_digits_dir), fresh) == {"preempted": True, "step": 0}
        assert "stopping before training, at step 0" in capsys.readouterr().out
        assert committed(fresh) == []
        finished = loop.run(variant_config(av_digits_dir), copy_of(reference_dir, tmp_path))
    assert finished["splits"] == reference_results["splits"]
    assert "SIGTERM arrived after the last step" in capsys.readouterr().out
    try:
        assert loop.run(variant_config(av_digits_dir), fresh) == {"preempted": True, "step": 0}
        assert "because of a SIGTERM" in capsys.readouterr().out
    finally:
        preemption.StopRequest.carried_over = None
    assert preemption.StopRequest.carried_over is None


class LineReader:
    """Reads a subprocess's output lines on a thread, so that waiting for a line can time out."""

    def __init__(self, proc):
        self.proc, self.lines, self._queue = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(self.lines[-40:])}")

    def rest(self, timeout):
        self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return "".join(self.lines)


@pytest.mark.slow
def test_time_limit_and_sigterm_stop_with_a_checkpoint_and_resume_exactly(av_digits_dir, tmp_path):
    """Two real runs of the CLI: the first stops before its --time_limit_s runs out, the second (resumed) on
    SIGTERM; each finishes its step, saves, flushes and exits 75. Resumed to the end, the run equals an
    uninterrupted one. A constant learning rate makes the trajectory independent of `train.num_steps`, so the
    open-ended runs can be finished, and compared, at a step known only once they stopped."""
    workdir = str(tmp_path / "run")
    run_dir = os.path.join(workdir, "early")
    overrides = {"train.num_steps": 100_000, "train.eval_every_steps": 100_000, "checkpoint.every_steps": 1,
                 "checkpoint.keep": 2, "optimizer.schedule": "constant"}
    limit = 60
    started = time.monotonic()
    first = subprocess.run(experiment_command(workdir, av_digits_dir, f"--time_limit_s={limit}", **overrides),
                           env=cpu_env(8), cwd=REPO_ROOT, capture_output=True, text=True, timeout=limit + 120)
    elapsed = time.monotonic() - started
    assert first.returncode == preemption.PREEMPTED_EXIT_CODE, first.stdout[-3000:] + first.stderr[-3000:]
    k1 = int(re.search(r"stopped at step (\d+) after the time limit; checkpoint saved", first.stdout).group(1))
    assert k1 >= 1, first.stdout[-3000:]
    assert elapsed < limit + 5  # Saved and exited in time (the interpreter's own exit is the 5 s).
    assert committed(run_dir)[-1] == k1 and records(run_dir)[-1]["step"] == k1

    proc = subprocess.Popen(experiment_command(workdir, av_digits_dir, **overrides), env=cpu_env(8), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        reader = LineReader(proc)
        reader.wait_for(f"resumed from step {k1} in", 240)
        reader.wait_for(rf"step +{k1 + 3}/", 120)
        proc.send_signal(signal.SIGTERM)
        output = reader.rest(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, output[-3000:]
    assert "received SIGTERM: finishing this step and saving a checkpoint" in output
    k2 = int(re.search(r"stopped at step (\d+) after a SIGTERM; checkpoint saved", output).group(1))
    assert k2 >= k1 + 3 and committed(run_dir)[-1] == k2 and records(run_dir)[-1]["step"] == k2

    final = k2 + 2
    finish = variant_config(av_digits_dir, **{**overrides, "train.num_steps": final})
    with warnings.catch_warnings(record=True) as caught:  # Fewer steps than before: recorded, not warned about.
        warnings.simplefilter("always")
        resumed = loop.run(finish, run_dir)
    assert not [w for w in caught if "changed config" in str(w.message)]
    assert resumed["config_history"][-1] == {"step": k2, "file": f"config.step_{k2}.json",
                                             "changed": {"train.num_steps": [100_000, final]}}
    assert resumed["resumed_from_step"] == k2
    reference_dir = str(tmp_path / "reference")
    reference = loop.run(variant_config(av_digits_dir, **{**overrides, "train.num_steps": final,
                                                          "checkpoint.every_steps": 1000}), reference_dir)
    assert_same_run(run_dir, reference_dir, reference, resumed, step=final)


def test_time_limit_flag_and_key_are_validated(tmp_path):
    command = [sys.executable, "-m", "experiments.av_digits", "--workdir", str(tmp_path), "--time_limit_s=soon"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--time_limit_s: 'soon' is not a positive number of seconds" in result.stderr
    config = av_digits.get_config()
    config.train.time_limit_s = -1
    with pytest.raises(ValueError, match=r"train.time_limit_s=-1 must be a number of seconds >= 0"):
        reliability.options(config)
    config.train.time_limit_s, config.train.nonfinite = 0, "ignore"
    with pytest.raises(ValueError, match="train.nonfinite='ignore'; valid: stop, skip"):
        reliability.options(config)


def test_time_budget_keeps_a_margin_for_one_more_step_and_a_save():
    budget = reliability.TimeBudget(time.time() + 10.0)
    budget.step_seconds = [30.0, 1.0, 1.0, 1.0]  # The first (compilation) does not count.
    assert budget.needed(evaluates=False, save_seconds=[2.0]) == pytest.approx(1.5 * (1.0 + 2.0) + 2.0)
    assert not budget.exhausted(evaluates=False, save_seconds=[2.0])  # 10 s left, 6.5 s needed.
    budget.eval_seconds = [3.0]
    assert budget.exhausted(evaluates=True, save_seconds=[2.0])  # 11 s needed with the evaluation.
    assert not reliability.TimeBudget(None).exhausted(evaluates=True)


# --- Numerical faults --------------------------------------------------------------------------------------------

EXPLODING = {"optimizer.lr": 1e30, "optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
             "checkpoint.every_steps": 1}  # Step 1 moves the parameters to ~1e30: step 2's loss overflows.


def test_nonfinite_loss_stops_naming_step_metric_and_the_kept_checkpoint(av_digits_dir, tmp_path):
    workdir = str(tmp_path)
    with pytest.raises(reliability.NonFiniteError,
                       match=r"non-finite (loss|grad_norm)=(nan|inf) at step 2 .*last good checkpoint is step 1 in "
                             + re.escape(os.path.join(workdir, "checkpoints"))):
        loop.run(variant_config(av_digits_dir, **EXPLODING), workdir)
    assert committed(workdir) == [1]  # Nothing was saved after the fault; step 1's write was finished.
    assert [r["step"] for r in records(workdir)] == [1]  # Nor logged.
    assert all(np.isfinite(x).all() for x in flat(raw_state(workdir, 1)).values())


def test_nonfinite_skip_keeps_the_old_state_and_counts_skipped_steps(av_digits_dir, tmp_path):
    workdir = str(tmp_path)
    results = loop.run(variant_config(av_digits_dir, **EXPLODING, **{"train.nonfinite": "skip", "checkpoint.keep": 10}),
                       workdir)
    assert results["nonfinite_skipped_steps"] == NUM_STEPS - 1
    train = [r for r in records(workdir) if r["split"] == "train"]
    assert [r[reliability.SKIPPED_METRIC] for r in train] == [0] + [1] * (NUM_STEPS - 1)
    after_step_1, final = raw_state(workdir, 1), raw_state(workdir, NUM_STEPS)
    for part in ("params", "opt_state"):  # Every update after step 1 was skipped, inside the compiled step.
        assert_identical(after_step_1[part], final[part])
    assert int(final["step"]) == NUM_STEPS


# --- Disk full ---------------------------------------------------------------------------------------------------


def test_disk_full_while_saving_names_the_directory_and_keeps_previous_checkpoints(
        reference, av_digits_dir, tmp_path, monkeypatch):
    """Every file write into step 4's checkpoint fails with ENOSPC (at the lowest Python-level write of Orbax and
    Grain: etils' file objects; tensorstore writes array bytes in C++)."""
    from etils.epath import backend

    reference_dir, _ = reference
    workdir = str(tmp_path)
    failing = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp")
    real_open = backend._OsPathBackend.open

    def open_on_full_disk(self, path, mode):
        handle = real_open(self, path, mode)
        if str(path).startswith(failing) and any(c in mode for c in "wax+"):
            def write(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            handle.write = write
        return handle

    with monkeypatch.context() as patch:
        patch.setattr(backend._OsPathBackend, "open", open_on_full_disk)
        with pytest.raises(checkpoint.CheckpointWriteError) as raised:
            loop.run(variant_config(av_digits_dir), workdir)
    message = str(raised.value)
    directory = os.path.join(workdir, "checkpoints")
    assert f"could not write checkpoint step 4 to {directory}: No space left on device" in message
    assert "The disk is full. The previous checkpoints are intact (steps [2, 3])" in message
    assert committed(workdir) == [2, 3]
    s = setup_lib.setup(variant_config(av_digits_dir))  # They restore, match their fingerprints and the reference's.
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, best_metric=None)
    try:
        for step in (2, 3):
            assert_identical(checkpointer.restore_state(step, s.abstract_state), raw_state(reference_dir, step))
    finally:
        checkpointer.close()


# --- Kills at any moment -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ten_kills_anywhere_lose_nothing_and_end_bit_identical(av_digits_dir, tmp_path, capsys):
    """`python -m mmjax.train.kill_harness`: 10 SIGKILLs (the first during the first checkpoint write), a restart
    after each; the harness raises on any difference from the uninterrupted run or any lost checkpoint."""
    result = kill_harness.main(["--kills", "10", "--workdir", str(tmp_path / "kill"), "--data_dir", av_digits_dir])
    print(capsys.readouterr().out)  # The figures, in the test log.
    assert result["kills_survived"] == 10 and result["restarts"] == 10
    assert result["kills_by_aim"]["first checkpoint write"] == 1
    assert result["kills_during_checkpoint_write"] >= 1
    assert result["bytes_lost"] == 0
    assert result["kept_checkpoints_verified"] >= 2 and result["identical_arrays"] > 0
    assert result["identical_metric_records"] > result["steps"]  # Every train step's record, and the evaluations.


# --- Multi-process faults ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_when_one_of_two_processes_dies_the_other_exits_with_a_clear_error(av_digits_dir, tmp_path):
    """SIGKILL process 1 of 2 mid-training: process 0 must not hang in its next collective; with the default
    heartbeat timeout (parallel.DEFAULT_HEARTBEAT_TIMEOUT_S) it exits non-zero, naming the cause."""
    from tests.train.test_parallel import free_port

    port = free_port()
    overrides = {"train.num_steps": 100_000, "train.eval_every_steps": 100_000, "checkpoint.every_steps": 100_000,
                 "train.log_every_steps": 5}
    env = {k: v for k, v in cpu_env(2).items() if not k.startswith("MMJAX_")}
    procs = [
        subprocess.Popen(experiment_command(str(tmp_path), av_digits_dir, f"--coordinator_address=127.0.0.1:{port}",
                                            "--num_processes=2", f"--process_id={i}", **overrides),
                         env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    try:
        survivor = LineReader(procs[0])
        threading.Thread(target=procs[1].communicate, daemon=True).start()  # Drain its pipe.
        survivor.wait_for(r"step +10/", 300)
        procs[1].kill()
        killed = time.monotonic()
        output = survivor.rest(timeout=parallel.DEFAULT_HEARTBEAT_TIMEOUT_S + 60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert waited < parallel.DEFAULT_HEARTBEAT_TIMEOUT_S + 60
    assert "another task died" in output and "stopped sending heartbeats" in output, output[-3000:]
