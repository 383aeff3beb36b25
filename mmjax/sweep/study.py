"""The sweep's parallel backend on optuna: the trials live in a study in a database, and any number of workers (the
same command started again: processes on one machine, SLURM array tasks, one per TPU host) pull trials from it.

- Storage: `--storage URL` (any SQLAlchemy URL, e.g. `postgresql://user@host/db` for many hosts), default
  `sqlite:///WORKDIR/study.db`. The study is named after the sweep's workdir; its definition (base, grids, fixed
  overrides, sampler, trial count, pruner, metric) is stored with it and a worker with another one is refused.
- Samplers: `grid` (the product of the lists, exactly the serial sweep's trials, enqueued once: a waiting trial is
  taken by one worker only, so each grid point runs once), `random` and `tpe` (`--trials N` trials sampled from
  the lists and distributions by optuna's RandomSampler / TPESampler; with several workers the count may be
  exceeded by at most one trial per worker, and the samples depend on the workers' timing).
- Pruning (`--pruner median|halving`): every evaluation of the ranking metric is reported to the study; a trial
  the pruner stops ends like an early-stopped run (its checkpoint kept, finished) and is listed as pruned.
- Failures: a worker sends a heartbeat every `--heartbeat` seconds. When one dies (killed, node lost), the next
  worker to look at the study marks its trial failed and queues it again (at most 3 times); that retry runs in the
  same trial workdir, so it resumes from the last checkpoint. A preempted worker (SIGTERM) saves, queues its trial
  again and exits with status 75.
- Workers beyond the trials find nothing left to run and exit at once (status 0), saying so.

The leaderboard (md / csv / png) and sweep.json are rewritten from the study by each worker after each trial;
`optuna-dashboard sqlite:///WORKDIR/study.db` shows the same study live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random as random_lib
import time
import warnings
from typing import Any

from mmjax import config as config_lib
from mmjax import experiment
from mmjax.sweep.grid import SweepError, Trial, make_trial
from mmjax.sweep.leaderboard import metric_value, result_rows

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")
STORAGE_FILENAME = "study.db"
MAX_RETRIES = 3  # A trial whose worker died is queued again at most this many times.
MEDIAN_STARTUP_TRIALS = 2  # The median pruner prunes only once this many trials have finished.


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """The optuna backend's command-line options (`--storage`, `--sampler`, `--trials`, `--pruner`, `--heartbeat`)."""

    storage: str | None = None
    sampler: str = "grid"
    trials: int | None = None
    pruner: str = "none"
    heartbeat_s: int = 30

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SweepError(f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise SweepError(f"--pruner {self.pruner!r}: expected one of {', '.join(PRUNERS)}")
        if self.sampler == "grid" and self.trials is not None:
            raise SweepError("--trials is for --sampler random or tpe; the grid sampler runs every combination")
        if self.sampler != "grid" and (self.trials is None or self.trials < 1):
            raise SweepError(f"--sampler {self.sampler} needs --trials N (N >= 1): how many trials to sample")
        if self.heartbeat_s < 1:
            raise SweepError(f"--heartbeat {self.heartbeat_s}: give the seconds between heartbeats (>= 1)")

    def url(self, workdir: str) -> str:
        return self.storage or f"sqlite:///{os.path.join(os.path.abspath(workdir), STORAGE_FILENAME)}"


def import_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # mmjax prints each trial itself.
    return optuna


class _Preempted(Exception):
    """The trial's run was stopped by a signal; it is queued again and the worker exits with status 75."""


@contextlib.contextmanager
def _file_lock(path: str):
    """Serialises the study's creation (definition, grid enqueueing) between workers sharing the workdir."""
    with open(path, "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


class StudySweep:
    """One worker of a sweep on an optuna study (see the module docstring)."""

    def __init__(self, sweep, options: StudyOptions, workdir: str):
        options.check()
        self.sweep, self.options = sweep, options
        self.workdir = os.path.abspath(workdir)
        self.optuna = import_optuna()
        self.keys = [g.key for g in sweep.grids]
        total = len(sweep.trials) if options.sampler == "grid" else options.trials
        self.width = max(3, len(str(total)))
        self.total = total

    def definition(self) -> dict:
        o = self.options
        return config_lib.normalize({**self.sweep.definition(), "sampler": o.sampler, "trials": o.trials,
                                     "pruner": o.pruner, "metric": self.sweep.metric, "mode": self.sweep.mode})

    # --- The study -----------------------------------------------------------------------------------------------

    def _sampler(self):
        samplers = self.optuna.samplers
        if self.options.sampler == "grid":
            return samplers.GridSampler({g.key: list(g.values) for g in self.sweep.grids}, seed=self.sweep.seed)
        # Each worker samples from its own stream (one seed for all would make them propose the same trials).
        seed = random_lib.SystemRandom().randrange(2**31)
        if self.options.sampler == "random":
            return samplers.RandomSampler(seed=seed)
        return samplers.TPESampler(seed=seed)

    def _pruner(self):
        pruners = self.optuna.pruners
        if self.options.pruner == "median":
            return pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS)
        if self.options.pruner == "halving":
            return pruners.SuccessiveHalvingPruner()
        return pruners.NopPruner()

    def open(self):
        """Creates or joins the study; refuses one made with another definition (nothing in it is changed)."""
        optuna = self.optuna
        url = self.options.url(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        direction = "maximize" if self.sweep.mode == "max" else "minimize"
        # Under a lock on the shared workdir: the first worker creates the database's tables, the study and its
        # grid; the others wait, then join (optuna's own creation is not safe against simultaneous starts).
        with _file_lock(os.path.join(self.workdir, ".study.lock")):
            try:
                with warnings.catch_warnings():  # Heartbeats are "experimental" in optuna since 2.8.
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
                    storage = optuna.storages.RDBStorage(
                        url, heartbeat_interval=self.options.heartbeat_s, grace_period=3 * self.options.heartbeat_s,
                        heartbeat_stale_trial_callback=retry)
            except Exception as error:  # SQLAlchemy's errors: bad URL, missing driver, unreachable server, ...
                raise SweepError(f"--storage {url}: cannot open the study's database: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0]}") from None
            study = optuna.create_study(storage=storage, study_name=f"mmjax:{self.workdir}", sampler=self._sampler(),
                                        pruner=self._pruner(), direction=direction, load_if_exists=True)
            saved = study.user_attrs.get("mmjax_definition")
            now = self.definition()
            if saved is None:
                study.set_user_attr("mmjax_definition", now)
                study.set_user_attr("command", self.command())
                if self.options.sampler == "grid":
                    for trial in self.sweep.trials:
                        study.enqueue_trial(dict(zip(self.keys, _texts(trial), strict=True)),
                                            user_attrs={"mmjax_index": trial.index})
            elif saved != now:
                diffs = [f"{k}: study {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                         if saved.get(k) != now.get(k)]
                raise SweepError(f"the study of {self.workdir} in {url} was made by another sweep; nothing was "
                                 "changed. Differences:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir, or join "
                                 f"the saved sweep with:\n  {study.user_attrs.get('command', '?')}")
        return study

    def command(self) -> str:
        o = self.options
        extra = f" --backend optuna --sampler {o.sampler}" + (f" --trials {o.trials}" if o.trials else "")
        extra += f" --pruner {o.pruner}" + (f" --storage {o.storage}" if o.storage else "")
        return self.sweep.command(self.workdir) + extra

    # --- One trial -----------------------------------------------------------------------------------------------

    def _trial_of(self, trial) -> Trial | None:
        """The sweep trial optuna's `trial` stands for (None for a grid trial beyond the grid)."""
        index = trial.user_attrs.get("mmjax_index")
        if self.options.sampler == "grid":
            if index is None:  # Not one of the enqueued grid points: another worker took the last one meanwhile.
                return None
            texts = [trial.suggest_categorical(g.key, list(g.values)) for g in self.sweep.grids]
            return make_trial(index, self.keys, texts, self.sweep.config, self.width)
        texts = []
        for g in self.sweep.grids:
            if g.distribution is None:
                texts.append(trial.suggest_categorical(g.key, list(g.values)))
            elif g.distribution == "randint":
                texts.append(str(trial.suggest_int(g.key, int(g.low), int(g.high))))
            else:
                texts.append(repr(trial.suggest_float(g.key, g.low, g.high, log=g.distribution == "loguniform")))
        if index is None:  # A new trial (a retried one keeps its first number, hence its workdir).
            index = trial.number + 1
            trial.set_user_attr("mmjax_index", index)
        return make_trial(index, self.keys, texts, self.sweep.config, self.width)

    def objective(self, trial) -> float:
        from mmjax import reporting
        from mmjax.train import early_stopping

        spec = self._trial_of(trial)
        if spec is None:
            raise self.optuna.TrialPruned("the grid has no trial left")
        trial.set_user_attr("name", spec.name)
        sweep, metric = self.sweep, self.sweep.metric
        reporting.console(f"trial {spec.index}/{self.total} (optuna trial {trial.number}): {spec.describe()}")
        pruned: list[str] = []

        def prune(step: int, metrics) -> str | None:
            if metric not in metrics:
                return None
            trial.report(float(metrics[metric]), step)
            if trial.should_prune():
                pruned.append(f"pruned by the {self.options.pruner} pruner at step {step} ({metric} "
                              f"{float(metrics[metric]):.4f})")
                return pruned[-1]
            return None

        rules = (prune,) if self.options.pruner != "none" else ()
        start = time.perf_counter()
        with early_stopping.stop_rules(*rules):
            result = experiment.runner(experiment.load(sweep.base))(sweep.trial_config(spec),
                                                                    os.path.join(self.workdir, spec.name))
        if isinstance(result, dict) and result.get("preempted"):
            trial.study.enqueue_trial(trial.params, user_attrs={"mmjax_index": spec.index})
            raise _Preempted(f"trial {spec.index} preempted; it is queued again")
        rows = config_lib.normalize(result_rows(result, sweep.base))
        trial.set_user_attr("rows", rows)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        values = [v for v in (metric_value(r, metric) for r in rows) if v is not None]
        if not values:
            split = metric.partition("/")[0]
            available = sorted({m for r in rows for m in r["splits"].get(split, {})})
            raise SweepError(f"--metric {metric} is not in trial {spec.index}'s results (split {split!r} has: "
                             f"{', '.join(available) or 'nothing'})")
        value = max(values) if sweep.mode == "max" else min(values)
        if pruned:
            trial.set_user_attr("pruned", pruned[0])
            reporting.console(f"trial {spec.index}: {pruned[0]}")
            raise self.optuna.TrialPruned(pruned[0])
        reporting.console(f"trial {spec.index}/{self.total}: {metric} {value:.4f}")
        return value

    # --- The worker ----------------------------------------------------------------------------------------------

    def _left(self, study) -> bool:
        """Whether this worker should ask for another trial."""
        State = self.optuna.trial.TrialState
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.optuna.exceptions.ExperimentalWarning)
            self.optuna.storages.fail_stale_trials(study)  # Dead workers' trials are failed and queued again.
        trials = study.get_trials(deepcopy=False)
        if any(t.state == State.WAITING for t in trials):
            return True
        if self.options.sampler == "grid":
            return False
        taken = {t.user_attrs.get("mmjax_index", t.number + 1) for t in trials
                 if t.state in (State.COMPLETE, State.PRUNED, State.RUNNING)}
        return len(taken) < self.options.trials

    def records(self, study) -> list[dict]:
        """The trials as sweep.json records (one per sweep trial: its latest optuna trial), for the leaderboard."""
        State = self.optuna.trial.TrialState
        status = {State.COMPLETE: "done", State.PRUNED: "done", State.RUNNING: "running", State.WAITING: "pending",
                  State.FAIL: "failed"}
        latest: dict[int, Any] = {}
        for t in study.get_trials(deepcopy=False):
            index = t.user_attrs.get("mmjax_index")
            if index is not None and (t.state != State.PRUNED or "rows" in t.user_attrs):
                latest[index] = t if index not in latest or t.number > latest[index].number else latest[index]
        records = []
        for index, t in sorted(latest.items()):
            texts = [str(t.params[k]) if not isinstance(t.params.get(k), float) else repr(t.params[k])
                     for k in self.keys] if all(k in t.params for k in self.keys) else None
            spec = make_trial(index, self.keys, texts, self.sweep.config, self.width) if texts else None
            record = {"index": index, "name": t.user_attrs.get("name", spec.name if spec else f"trial_{index}"),
                      "overrides": list(spec.overrides) if spec else [], "values": spec.values if spec else {},
                      "status": status.get(t.state, str(t.state)), "optuna_trial": t.number,
                      "optuna_state": t.state.name}
            for key in ("rows", "seconds", "pruned"):
                if key in t.user_attrs:
                    record[key] = t.user_attrs[key]
            if record["status"] == "done" and "rows" not in record:
                record["status"] = "failed"
            elif "pruned" in record:
                record["status"] = "pruned"  # Listed in sweep.json; the leaderboard ranks the finished trials.
            records.append(record)
        return records

    def run(self, record_cls) -> dict[str, Any]:
        """Runs trials until the study has none left for this worker; returns what `run_sweep` returns."""
        from mmjax import reporting

        study = self.open()
        reporting.console(f"sweep of {self.sweep.base} on optuna ({self.options.sampler} sampler, pruner "
                          f"{self.options.pruner}): {self.total} trial(s), ranked by {self.sweep.mode} "
                          f"{self.sweep.metric} | study {self.options.url(self.workdir)}")
        record = record_cls(self.sweep, self.workdir, None)
        ran = 0
        try:
            while self._left(study):
                try:
                    study.optimize(self.objective, n_trials=1, catch=())
                except _Preempted as stopped:
                    reporting.console(f"{stopped}; re-run the same command to resume the sweep")
                    return {"preempted": True}
                finally:
                    record.trials = self.records(study)
                    record.save(extra={"backend": "optuna", "study": self.definition(), "command": self.command()})
                    record.write_leaderboard()
                ran += 1
        finally:
            record.trials = self.records(study)
        if not ran:
            reporting.console("no trial left to run in this study: the other workers took them all (or the sweep is "
                              "finished); the leaderboard is the study's")
        return record.finish()


def check_study_workdir(workdir: str) -> None:
    """Refuses a workdir that holds a serial sweep (its sweep.json has no optuna backend)."""
    path = os.path.join(workdir, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("backend") != "optuna":
            raise SweepError(f"workdir {workdir} holds a serial sweep (sweep.json); resume it without --backend "
                             f"optuna:\n  {saved.get('command', '?')}\nor use a new --workdir")


def _texts(trial: Trial) -> list[str]:
    return [o.partition("=")[2] for o in trial.overrides]
