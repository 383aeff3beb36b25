"""Pre-emption: SIGTERM/SIGINT (and an exhausted time budget) become a request to stop after the current step.

The loop then saves a checkpoint and returns `{"preempted": True}`; the CLI exits with `PREEMPTED_EXIT_CODE`
(75, EX_TEMPFAIL) and re-running the command resumes. Every process agrees on when to stop (`any_process`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from mmjax import reporting

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; re-run the command to resume.


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
    (`KeyboardInterrupt`; pending checkpoint writes are still finished, no new checkpoint is started).
    """

    carried_over: int | None = None  # A signal the previous run() of this process received but did not act on.

    def __init__(self):
        self.signal, StopRequest.carried_over = StopRequest.carried_over, None
        self.time_up = False
        self.acted_on = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal is not None:
                raise KeyboardInterrupt(
                    f"second signal ({name}) while stopping: stopping now, without a new checkpoint"
                )
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

    @property
    def reason(self) -> str:
        return f"a {signal.Signals(self.signal).name}" if self.signal is not None else "the time limit"

    def requested(self) -> bool:
        """True when any process was signalled or ran out of time (all processes agree, so they stop at the same
        step)."""
        return any_process(self.signal is not None or self.time_up)
