"""Run any mmjax command on a SLURM cluster through submitit, surviving time limits and pre-emption.

    python -m mmjax.launch slurm --nodes 2 --gpus-per-node 8 --time 240 [--partition P] [--account A] [--qos Q]
        [--cpus-per-task C] [--mem-gb M] [--folder DIR] [--requeues 10] [--signal-delay 120] [--wait]
        [--local] [--dry-run] -- python -m experiments.NAME --workdir W [--config.KEY=VALUE ...]

One task per node; each runs the command, which finds the other nodes itself (SLURM's variables, see
`mmjax.train.parallel.process_group`) and uses every GPU of its node. `--signal-delay` seconds before the time limit
(or when the job is pre-empted) SLURM signals the job; the launcher then sends the command SIGTERM, which finishes
the current step, writes a checkpoint and exits with status 75, and requeues the job (at most `--requeues` times
for time limits): the requeued job runs the same command, which resumes from that checkpoint, so a long run
survives its time limit with nothing lost. `--local` runs the job here through submitit's local executor (one
node; what the tests use), `--dry-run` prints the sbatch script and submits nothing, `--wait` waits for the end
and exits with the command's status. Logs: `--folder` (default `WORKDIR/slurm`, else `./slurm`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from mmjax import runtime

PROG = "python -m mmjax.launch"
PREEMPTED_EXIT_CODE = 75  # = mmjax.train.preemption.PREEMPTED_EXIT_CODE (not imported: this module stays light).
SUBMITIT_LOG_ENV = "SUBMITIT_LOG_LEVEL"
STOP_GRACE_S = 0.8  # Share of --signal-delay the command gets to save after SIGTERM, before the requeue goes on.


def import_submitit():
    """submitit, imported without its logging set-up in this process (it binds handlers to the sys.stdout/stderr of
    the moment, which test runners and notebooks later close); the jobs, other processes, still log normally."""
    saved = os.environ.get(SUBMITIT_LOG_ENV)
    os.environ[SUBMITIT_LOG_ENV] = "NOCONFIG"
    try:
        import submitit
    finally:
        if saved is None:
            del os.environ[SUBMITIT_LOG_ENV]
        else:
            os.environ[SUBMITIT_LOG_ENV] = saved
    return submitit


class TrainJob:
    """The submitit job: runs `command` in a child process. On SLURM's signal (time limit or pre-emption),
    submitit calls `checkpoint`, which stops the child with SIGTERM (it saves and exits 75) and returns the same
    job for the requeue."""

    def __init__(self, command: Sequence[str], stop_timeout_s: float):
        self.command = list(command)
        self.stop_timeout_s = stop_timeout_s
        self._process: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:  # Pickled by submitit; the child process stays behind.
        return {"command": self.command, "stop_timeout_s": self.stop_timeout_s, "_process": None}

    def __call__(self) -> int:
        self._process = subprocess.Popen(self.command)
        status = self._process.wait()
        if status == PREEMPTED_EXIT_CODE:
            raise RuntimeError(f"{self.command[:4]}... stopped early (status 75) without a requeue; submit again")
        if status != 0:
            raise RuntimeError(f"the command exited with status {status}: {' '.join(self.command)}")
        return status

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Stops the running command so that it saves a checkpoint (SIGTERM: finish the step, save, exit 75), then
        hands submitit the same job to requeue."""
        submitit = import_submitit()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                print(f"{PROG}: the command did not stop within {self.stop_timeout_s:.0f} s of SIGTERM; requeued "
                      "anyway (it resumes from its last checkpoint)", flush=True)
        return submitit.helpers.DelayedSubmission(TrainJob(self.command, self.stop_timeout_s))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cluster", choices=("slurm",), help="the scheduler (SLURM, through submitit)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes, one process each (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0)")
    parser.add_argument("--time", type=int, required=True, metavar="MINUTES", help="time limit of each job (minutes)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--qos", help="SLURM quality of service")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs of each node's process")
    parser.add_argument("--mem-gb", type=int, help="memory per node (GB)")
    parser.add_argument("--folder", help="where submitit writes the job's scripts and logs (default WORKDIR/slurm)")
    parser.add_argument("--requeues", type=int, default=10, help="time-limit requeues before giving up (default 10)")
    parser.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                        help="seconds before the time limit at which the command is told to save (default 120)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and exit with the command's status")
    parser.add_argument("--local", action="store_true", help="run here with submitit's local executor (one node)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    return parser


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments, the command after `--`)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def _workdir(command: Sequence[str]) -> str | None:
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return None


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's arguments and the command; exits with status 2 and a clear message on bad input."""
    parser = _parser()
    own, command = _split(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    if not command:
        parser.error("give the command to run after --, e.g. -- python -m experiments.av_digits --workdir W")
    for name in ("nodes", "time", "requeues", "signal_delay"):
        if getattr(args, name) < (0 if name == "requeues" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'requeues' else 'positive'}")
    if args.gpus_per_node < 0:
        parser.error("--gpus-per-node must be >= 0")
    if args.signal_delay >= args.time * 60:
        parser.error(f"--signal-delay {args.signal_delay} s must be shorter than --time {args.time} min")
    if args.local and args.nodes != 1:
        parser.error("--local runs one node; use --nodes 1")
    if args.folder is None:
        workdir = _workdir(command)
        args.folder = os.path.join(workdir, "slurm") if workdir else "slurm"
    return args, command


def executor(args: argparse.Namespace):
    """The submitit executor of the arguments: SLURM, or local with `--local` (one node, no GPU request)."""
    submitit = import_submitit()
    if args.local:
        ex = submitit.LocalExecutor(folder=args.folder, max_num_timeout=args.requeues)
        ex.update_parameters(timeout_min=args.time, signal_delay_s=args.signal_delay, tasks_per_node=1,
                             stderr_to_stdout=True)
        return ex
    ex = submitit.AutoExecutor(folder=args.folder, cluster="slurm", slurm_max_num_timeout=args.requeues)
    params: dict[str, Any] = {"name": "mmjax", "timeout_min": args.time, "nodes": args.nodes, "tasks_per_node": 1,
                              "stderr_to_stdout": True, "slurm_signal_delay_s": args.signal_delay}
    for name, value in (("gpus_per_node", args.gpus_per_node), ("cpus_per_task", args.cpus_per_task),
                        ("mem_gb", args.mem_gb), ("slurm_partition", args.partition),
                        ("slurm_account", args.account), ("slurm_qos", args.qos)):
        if value:
            params[name] = value
    ex.update_parameters(**params)
    return ex


def sbatch_script(args: argparse.Namespace) -> str:
    """The sbatch script submitit would submit for these arguments (for `--dry-run` and documentation)."""
    import_submitit()
    from submitit.slurm import slurm

    params = {"job_name": "mmjax", "time": args.time, "nodes": args.nodes, "ntasks_per_node": 1,
              "signal_delay_s": args.signal_delay, "stderr_to_stdout": True}
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    for name in ("partition", "account", "qos", "cpus_per_task"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    if args.mem_gb:
        params["mem"] = f"{args.mem_gb}GB"
    return slurm._make_sbatch_string(command="python -u -m submitit.core._submit %j", folder=args.folder, **params)


def main(argv: Sequence[str] | None = None):
    args, command = parse(argv)
    if args.dry_run:
        print(sbatch_script(args))
        print(f"# the job runs: {' '.join(command)}")
        return None
    runtime.apply_xla_flags()
    os.makedirs(args.folder, exist_ok=True)
    job = executor(args).submit(TrainJob(command, STOP_GRACE_S * args.signal_delay))
    print(f"{PROG}: submitted job {job.job_id}: {' '.join(command)}\n  logs: {args.folder}", flush=True)
    if not args.wait:
        return job
    try:
        job.result()
    except Exception as error:  # submitit re-raises the job's failure with its traceback text.
        print(f"{PROG}: job {job.job_id} failed: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{PROG}: job {job.job_id} finished", flush=True)
    return job


if __name__ == "__main__":
    main()
