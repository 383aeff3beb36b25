"""Workdir integrity: one run per workdir, no resume that mislabels a later model, metric logs that survive a bad
line, a config history instead of an overwritten config, and read-only directories refused before any work."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import pytest

from mmjax.train import loop, preemption, preflight, workdir_lock
from mmjax.train import workdir as workdir_lib
from tests.conftest import REPO_ROOT
from tests.train.test_loop import tiny_config
from tests.train.test_reliability import LineReader, cpu_env, experiment_command, records


@pytest.fixture(scope="module")
def finished(av_digits_dir, tmp_path_factory):
    """A finished tiny run (6 steps, checkpoints 2, 3, 4, 6)."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    return workdir, loop.run(tiny_config(av_digits_dir), workdir)


def copy_of(workdir, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    return copy


def read(path):
    with open(path) as f:
        return f.read()


@contextlib.contextmanager
def read_only(path):
    """Makes the directory `path` (and what it holds) read-only for this process: permissions for a normal user; for
    root, whom permissions do not stop, a read-only bind mount of it onto itself. Skips where neither works."""
    path = str(path)
    if os.geteuid() != 0:
        folders = [path] + [os.path.join(r, d) for r, ds, _ in os.walk(path) for d in ds]
        for folder in folders:
            os.chmod(folder, 0o555)
        try:
            yield
        finally:
            for folder in folders:
                os.chmod(folder, 0o755)
        return
    if subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to mount: cannot make a read-only directory here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", path], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", path], check=True)


# --- One run per workdir -----------------------------------------------------------------------------------------

HOLD_LOCK = ("import sys, time; from mmjax.train.workdir_lock import WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); "
             "print('locked', flush=True); time.sleep(600)")


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(av_digits_dir, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir], env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lock.WorkdirBusy) as refused:
            loop.run(tiny_config(av_digits_dir), workdir)
        assert re.fullmatch(rf"workdir {re.escape(workdir)} is in use by the run of process {holder.pid} on host "
                            rf"{re.escape(socket.gethostname())}, started \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\S*; "
                            r"wait for it to finish \(or stop it\), or use another --workdir", str(refused.value))
        assert refused.value.code == f"error: {refused.value}"  # What the command line prints, as one line.
        assert os.listdir(workdir) == [workdir_lock.LOCK_FILENAME]  # Nothing else was written.
    finally:
        holder.kill()
        holder.wait()
    assert json.loads(read(os.path.join(workdir, workdir_lock.LOCK_FILENAME)))["pid"] == holder.pid  # Stale file.
    results = loop.run(tiny_config(av_digits_dir), workdir)  # The killed holder's lock went with it.
    assert results["resumed_from_step"] == 0 and results["steps"] == 6
    assert read(os.path.join(workdir, workdir_lock.LOCK_FILENAME)) == ""  # Released, its details cleared.


def test_a_second_run_in_the_same_process_is_refused(av_digits_dir, tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirBusy, match=rf"in use by the run of process {os.getpid()} .*"
                                                           r"\(in this process\)"):
            loop.run(tiny_config(av_digits_dir), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


@pytest.mark.slow
def test_two_commands_on_one_workdir_the_second_stops_with_one_line(av_digits_dir, tmp_path):
    """The probe: the same command started twice on one --workdir. The second now exits 1 at once, naming the
    first; the first trains alone (each metric record once) and stops cleanly on SIGTERM."""
    workdir = str(tmp_path / "w")
    overrides = {"train.num_steps": 100_000, "train.eval_every_steps": 100_000, "checkpoint.every_steps": 5}
    command = experiment_command(workdir, av_digits_dir, **overrides)
    first = subprocess.Popen(command, env=cpu_env(8), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        reader = LineReader(first)
        reader.wait_for(r"step +2/", 300)
        second = subprocess.run(command, env=cpu_env(8), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: workdir {workdir}/early is in use by the run of process {first.pid} on host "
                               f"{socket.gethostname()}, started "), second.stderr[-2000:]
        first.send_signal(signal.SIGTERM)
        output = reader.rest(timeout=120)
    finally:
        first.kill()
    assert first.returncode == preemption.PREEMPTED_EXIT_CODE, output[-3000:]
    steps = [r["step"] for r in records(os.path.join(workdir, "early")) if r["split"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # One record per step: nothing written twice.


# --- Resuming with fewer steps than saved ------------------------------------------------------------------------


def test_resuming_with_num_steps_below_the_saved_step_is_refused(finished, av_digits_dir, tmp_path):
    """The probe: a finished 6-step run re-run with train.num_steps=3 used to evaluate the step-6 model, log it as
    step 3 and write "steps": 3 into results.json and config.json."""
    workdir = copy_of(finished[0], tmp_path)
    names = ("metrics.jsonl", "results.json", "config.json")
    before = {name: read(os.path.join(workdir, name)) for name in names}
    with pytest.raises(preflight.RunRefused, match=re.escape(
            f"workdir {workdir} holds a checkpoint of step 6, beyond train.num_steps=3: a run cannot be shortened "
            "after the fact. To continue it, give train.num_steps >= 6; to train train.num_steps=3 from scratch, use a "
            "new --workdir")):
        loop.run(tiny_config(av_digits_dir, **{"train.num_steps": 3}), workdir)
    assert {name: read(os.path.join(workdir, name)) for name in names} == before
    assert workdir_lib.committed_steps(workdir) == [2, 3, 4, 6]


# --- A malformed metrics line ------------------------------------------------------------------------------------


def test_a_malformed_metrics_line_is_moved_aside_and_the_run_resumes(finished, av_digits_dir, tmp_path):
    """The probe: one bad line in the middle of metrics.jsonl used to stop every resume with a JSONDecodeError."""
    workdir = copy_of(finished[0], tmp_path)
    path = os.path.join(workdir, "metrics.jsonl")
    good = read(path).splitlines(keepends=True)
    bad = ['{"step": 3, "split": "train", "loss": 0.5\n', "[1, 2]\n"]
    with open(path, "w") as f:
        f.writelines(good[:3] + bad[:1] + good[3:7] + bad[1:] + good[7:])
    with pytest.warns(RuntimeWarning, match=re.escape(f"{path}: 2 malformed line(s) (line 4, 9) moved to "
                                                      f"{path}.malformed; the {len(good)} good record(s) up to step 6 "
                                                      "are kept")):
        results = loop.run(tiny_config(av_digits_dir), workdir)
    assert results["resumed_from_step"] == 6 and results["splits"] == finished[1]["splits"]
    assert read(path).splitlines(keepends=True) == good
    assert read(path + ".malformed") == "".join(bad)


# --- Config history ----------------------------------------------------------------------------------------------


def test_a_changed_config_is_kept_beside_the_first_and_extending_a_run_does_not_warn(finished, av_digits_dir,
                                                                                       tmp_path, capsys):
    """The probe: resuming with another learning rate used to overwrite config.json, so the workdir no longer said
    what trained its first steps."""
    workdir = copy_of(finished[0], tmp_path)
    first = read(os.path.join(workdir, "config.json"))
    changed = tiny_config(av_digits_dir, **{"train.num_steps": 8, "optimizer.lr": 0.01})
    with pytest.warns(RuntimeWarning, match=re.escape(
            f"resuming {workdir} at step 6 with a changed config (optimizer.lr: 0.002 -> 0.01); the config that "
            "trained the earlier steps is kept in config.json, this one in config.step_6.json")):
        results = loop.run(changed, workdir)
    assert results["steps"] == 8
    assert read(os.path.join(workdir, "config.json")) == first
    step_6 = {"step": 6, "file": "config.step_6.json",
              "changed": {"optimizer.lr": [0.002, 0.01], "train.num_steps": [6, 8]}}
    assert results["config_history"] == [{"step": 0, "file": "config.json"}, step_6]
    assert json.loads(read(os.path.join(workdir, "results.json")))["config_history"] == results["config_history"]
    capsys.readouterr()

    with warnings.catch_warnings(record=True) as caught:  # Raising num_steps: the normal way to continue.
        warnings.simplefilter("always")
        results = loop.run(tiny_config(av_digits_dir, **{"train.num_steps": 10, "optimizer.lr": 0.01}), workdir)
    assert not [w for w in caught if "changed config" in str(w.message)]
    assert results["config_history"][2] == {"step": 8, "file": "config.step_8.json",
                                            "changed": {"train.num_steps": [8, 10]}}
    capsys.readouterr()

    s, state = workdir_lib.load_trained(workdir)
    out = capsys.readouterr().out
    assert f"{workdir}: config changed at step 6 (config.step_6.json): optimizer.lr: 0.002 -> 0.01; " \
           "train.num_steps: 6 -> 8" in out
    assert f"{workdir}: config changed at step 8 (config.step_8.json): train.num_steps: 8 -> 10" in out
    assert int(state.step) == 10 and s.config.train.num_steps == 10  # The last config of the history.


def test_a_run_restarted_from_scratch_starts_a_new_history(av_digits_dir, tmp_path):
    """Steps after the resumed checkpoint are recomputed, so configs recorded for them go; with no checkpoint at all
    config.json is the new run's."""
    workdir = str(tmp_path)
    with open(os.path.join(workdir, "config.step_4.json"), "w") as f:
        f.write("{}")
    results = loop.run(tiny_config(av_digits_dir, **{"train.num_steps": 2}), workdir)
    assert results["config_history"] == [{"step": 0, "file": "config.json"}]
    assert sorted(n for n in os.listdir(workdir) if n.startswith("config")) == ["config.json"]


# --- Read-only directories ---------------------------------------------------------------------------------------


def test_a_read_only_workdir_stops_at_once_with_one_line(av_digits_dir, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    with read_only(parent):
        with pytest.raises(preflight.RunRefused, match=rf"^workdir {re.escape(str(parent))} is not writable \(.*"
                                                       r"\(errno E(ROFS|ACCES)\)\); give a writable --workdir$"):
            loop.run(tiny_config(av_digits_dir), str(parent))
        # The probe, from the command line: one line naming the directory, no traceback.
        command = experiment_command(str(parent / "run"), av_digits_dir)
        result = subprocess.run(command, env=cpu_env(8), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.fullmatch(rf"error: workdir {re.escape(str(parent / 'run' / 'early'))} cannot be created: "
                        rf"{re.escape(str(parent))} is not writable \(.*\(errno E(ROFS|ACCES)\)\); give a writable "
                        "--workdir", result.stderr.strip().splitlines()[-1])


def test_a_read_only_data_dir_is_refused_unless_it_already_holds_the_dataset(av_digits_dir, tmp_path, monkeypatch):
    empty = tmp_path / "tfds"
    empty.mkdir()
    workdir = tmp_path / "run"
    message = (rf"^the TFDS data dir {re.escape(str(empty))} is not writable \(.*\), and dataset 'av_digits' 1\.0\.0 "
               r"is not built there yet, so it cannot be built; set --config\.data\.data_dir \(or \$TFDS_DATA_DIR\) to "
               r"a writable folder, or to one that already holds it$")
    with read_only(empty):
        with pytest.raises(preflight.RunRefused, match=message):
            loop.run(tiny_config(str(empty)), str(workdir))
        monkeypatch.setenv("TFDS_DATA_DIR", str(empty))  # The default data dir, the same.
        with pytest.raises(preflight.RunRefused, match=message):
            loop.run(tiny_config(""), str(workdir))
    assert not workdir.exists()  # Refused before anything was written.
    built = tmp_path / "built"
    shutil.copytree(av_digits_dir, built)
    with read_only(built):  # Nothing is written into a data dir that holds the built dataset.
        results = loop.run(tiny_config(str(built), **{"train.num_steps": 2}), str(workdir))
    assert results["steps"] == 2
