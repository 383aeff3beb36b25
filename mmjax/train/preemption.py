"""Pre-emption: SIGTERM/SIGINT (and an exhausted time budget) become a request to stop after the current step.

The loop then saves a checkpoint and returns `{"preempted": True}`; the CLI exits with `PREEMPTED_EXIT_CODE`
(75, EX_TEMPFAIL) and re-running the command resumes. Every process agrees on when to stop (`any_process`).

A second signal stops at once (`StopNow`), but never at the cost of a checkpoint being written: one arriving
while a save is being started waits until its write is under way, and the write in flight gets a grace period
(`SECOND_SIGNAL_GRACE_S`) to finish. `run()` then prints one line naming the checkpoint step that survives and
raises `StoppedAtOnce` (exit status 75: re-running resumes from that step).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import reporting

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; re-run the command to resume.
SECOND_SIGNAL_GRACE_S = 10.0  # How long a second signal lets the checkpoint write in flight finish.


class StopNow(KeyboardInterrupt):
    """Raised by a second SIGTERM/SIGINT: stop at once. `run()` gives the checkpoint write in flight its grace
    period (recording `in_flight`, the step, and `written`, whether it finished) and raises `StoppedAtOnce`."""

    in_flight: int | None = None
    written: bool = False


class StoppedAtOnce(SystemExit):
    """`run()` stopped at once on a second signal, after the one line naming the checkpoint that survives (`step`,
    None when there is none). Exit status `PREEMPTED_EXIT_CODE`: re-running resumes from that step."""

    def __init__(self, step: int | None, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.message = step, message

    def __str__(self) -> str:
        return self.message


def stopped_at_once(error: StopNow, checkpoint_dir: str) -> StoppedAtOnce:
    """Prints the one line that ends a run stopped by a second signal and returns the `StoppedAtOnce` to raise."""
    steps = sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit()) if os.path.isdir(checkpoint_dir) else []
    survivor = steps[-1] if steps else None
    resume = (f"re-run to resume from step {survivor}" if survivor is not None
              else "no checkpoint was written yet, so a re-run starts from scratch")
    if error.in_flight is not None and error.written:
        what = f"checkpoint step {error.in_flight} was being written and is complete"
    elif error.in_flight is not None:  # Orbax's writer threads are not daemons: the interpreter waits for them.
        what = (f"checkpoint step {error.in_flight} is still being written after {SECOND_SIGNAL_GRACE_S:g} s (the "
                "process ends when it is; another signal abandons it, and a partial step is never resumed from)")
        resume = resume.replace("re-run to resume from step", "re-run to resume from the latest complete step, now")
    else:
        what = "no checkpoint write was in flight"
    message = f"{error.args[0] if error.args else 'second signal'}: stopped at once; {what}; {resume}"
    reporting.console(message)
    return StoppedAtOnce(survivor, message)


def any_process(flag: bool) -> bool:
    """True when `flag` is set in any process (all processes get the same answer, so they act at the same step)."""
    if jax.process_count() > 1:
        flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
    return bool(flag)


class StopRequest:
    """Turns SIGTERM/SIGINT (and an exhausted time budget, `time_up`) into a flag the loop checks after each step.

    Handlers are installed for the whole of `run()` (main thread only), so a signal during start-up, compilation or
    evaluation is not lost either: the run stops before its first step or after its current one. A signal that
    arrives after the last step (final evaluation, results) is carried over to the next `run()` of the process,
    which then stops before training (e.g. the next variant of a comparison). A second signal stops at once
    (`StopNow`; no new checkpoint is started), except inside `saving()`, where it is acted on once the save has
    started writing; while `finish_pending` waits for that write, further signals end the wait.
    """

    carried_over: int | None = None  # A signal the previous run() of this process received but did not act on.

    def __init__(self):
        self.signal, StopRequest.carried_over = StopRequest.carried_over, None
        self.time_up = False
        self.acted_on = False
        self.second: int | None = None  # The second signal, once received.
        self._saving = False  # Inside `saving()`: a second signal waits until the save has started its write.
        self._finishing = False  # Inside `finish_pending`: further signals end the grace period.
        self._give_up = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._finishing:
                self._give_up = True
                reporting.console(f"received {name} again: no longer waiting for the checkpoint write")
                return
            if self.signal is not None:
                self.second = signum
                if self._saving:
                    reporting.console(f"second signal ({name}): stopping once this checkpoint's write has started")
                    return
                raise StopNow(f"second signal ({name})")
            self.signal = signum
            reporting.console(f"received {name}: finishing this step and saving a checkpoint")

        for s in previous:
            signal.signal(s, handler)
        finished = False
        try:
            yield self
            finished = True
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if finished and self.signal is not None and not self.acted_on:
                StopRequest.carried_over = self.signal
                reporting.console(f"{signal.Signals(self.signal).name} arrived after the last step, so this run "
                                  "finished; "
                                "a next run in this process will stop before training")

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Around starting a checkpoint save: a second signal meanwhile raises `StopNow` only once the save has
        started its (asynchronous) write, so the step is not lost half-way through being handed to Orbax."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self.second is not None:
            raise StopNow(f"second signal ({signal.Signals(self.second).name})")

    def finish_pending(self, error: StopNow, finish_within: Callable[..., bool], in_flight: int | None) -> None:
        """Gives the checkpoint write in flight (step `in_flight`, if any) `SECOND_SIGNAL_GRACE_S` to finish with
        `finish_within(seconds, give_up)`, recording the outcome on `error`; a further signal ends the wait."""
        self._finishing = True
        try:
            written = finish_within(SECOND_SIGNAL_GRACE_S, lambda: self._give_up)
            error.in_flight, error.written = in_flight, bool(in_flight is not None and written)
        finally:
            self._finishing = False

    @property
    def reason(self) -> str:
        return f"a {signal.Signals(self.signal).name}" if self.signal is not None else "the time limit"

    def requested(self) -> bool:
        """True when any process was signalled or ran out of time (all processes agree, so they stop at the same
        step)."""
        return any_process(self.signal is not None or self.time_up)
