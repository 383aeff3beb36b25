"""The process set-up every mmjax command shares, chosen by measurement (README "Performance"), in one place.

- XLA flags (`XLA_FLAGS_CPU`), set when mmjax is imported (so a library user, a test and a command compute
  the same numbers) unless JAX has already started: XLA's CPU backend runs plain matrix products with its
  Eigen kernels instead of YNNPACK's (`-individual_dot`), 5-20% faster train steps on the measured models (the
  transposed-weight products of backward passes ran at half speed in YNNPACK); YNNPACK keeps the fused ones.
- `prepare_process()`, the first thing each command does (experiments and the sweep through `cli.start`, the
  benchmarks in their `main`): the flags, then one re-exec with glibc's malloc backed by transparent huge pages
  (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; XLA's large scratch buffers are otherwise page-faulted anew on every
  step: the CLIP throughput step spent a third of its time in the kernel without it).

Light on purpose: no JAX import. A user's own `GLIBC_TUNABLES` or XLA flag always wins;
`MMJAX_NO_MALLOC_TUNING=1` turns the re-exec off.
"""

from __future__ import annotations

import os
import platform
import sys

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
NO_REEXEC_ENV = "MMJAX_NO_MALLOC_TUNING"
START_TIME_ENV = "MMJAX_START_TIME"  # The command's start, kept across the re-exec (see reliability.TimeBudget).
# XLA flags for the CPU backend, appended to XLA_FLAGS unless the user sets the same flag (see the docstring).
XLA_FLAGS_CPU: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot",)


def _jax_started() -> bool:
    """Whether JAX has created its backends (then neither a re-exec nor new XLA flags can take effect safely)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from jax._src import xla_bridge  # Private, but the one place that knows; absent -> assume started.

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def xla_flags(existing: str, wanted: tuple[str, ...] = XLA_FLAGS_CPU) -> str:
    """`existing` XLA_FLAGS plus each flag of `wanted` whose name the user has not set."""
    names = {flag.split("=", 1)[0] for flag in existing.split()}
    added = [flag for flag in wanted if flag.split("=", 1)[0] not in names]
    return " ".join([*existing.split(), *added])


def reexec_with_hugepages(start_time: float | None = None) -> None:
    """Restarts this command once with glibc's malloc backed by transparent huge pages, then returns there.

    glibc reads the tunable only at start-up, hence the re-exec. Skipped when GLIBC_TUNABLES is already set, off
    Linux/glibc, with MMJAX_NO_MALLOC_TUNING=1, or once JAX has started (a re-exec would throw its runtime away).
    """
    if (
        platform.system() != "Linux"
        or "GLIBC_TUNABLES" in os.environ
        or os.environ.get(NO_REEXEC_ENV) == "1"
        or platform.libc_ver()[0] != "glibc"
        or _jax_started()
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=HUGEPAGES_TUNABLE)
    if start_time is not None:  # The time budget counts from the original start, not the re-exec.
        env[START_TIME_ENV] = repr(start_time)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def apply_xla_flags() -> None:
    """Adds `XLA_FLAGS_CPU` to this process's XLA_FLAGS while JAX has not started (they take effect at start)."""
    flags = xla_flags(os.environ.get("XLA_FLAGS", ""))
    if flags != os.environ.get("XLA_FLAGS", "") and not _jax_started():
        os.environ["XLA_FLAGS"] = flags


def prepare_process(start_time: float | None = None, *, reexec: bool = True) -> None:
    """The measured-best set-up of this process: XLA flags now, huge pages by one re-exec (`reexec`: only for a
    real command line, which can be re-executed)."""
    apply_xla_flags()
    if reexec:
        reexec_with_hugepages(start_time)
