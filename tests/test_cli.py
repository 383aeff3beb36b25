"""The experiment launcher's start-up: the malloc re-exec that speeds up XLA on CPU, and the compile cache."""

import os
import subprocess
import sys

import pytest

from mmjax import cli


@pytest.fixture
def execve_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(cli.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cli.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(cli.NO_REEXEC_ENV, raising=False)
    return calls


def test_reexecs_the_same_command_with_huge_pages(execve_calls):
    cli.reexec_with_hugepages()
    [(path, argv, env)] = execve_calls
    assert path == sys.executable and argv == list(sys.orig_argv)
    assert env["GLIBC_TUNABLES"] == cli.HUGEPAGES_TUNABLE


@pytest.mark.parametrize(
    "setting",
    [
        lambda mp: mp.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2"),  # The user's own choice wins.
        lambda mp: mp.setenv(cli.NO_REEXEC_ENV, "1"),
        lambda mp: mp.setattr(cli.platform, "system", lambda: "Darwin"),
        lambda mp: mp.setitem(sys.modules, "jax", object()),  # JAX already loaded: too late to restart.
    ],
)
def test_no_reexec_when_it_would_be_wrong(execve_calls, monkeypatch, setting):
    setting(monkeypatch)
    cli.reexec_with_hugepages()
    assert execve_calls == []


def _get_config():
    import ml_collections

    return ml_collections.ConfigDict({"seed": 0})


@pytest.mark.parametrize(
    "default, flags, expected",
    [(False, [], False), (False, ["--compile_cache"], True), (True, [], True), (True, ["--no-compile_cache"], False)],
)
def test_compile_cache_flag_and_per_experiment_default(default, flags, expected):
    _, args = cli.parse(_get_config, ["--workdir", "/tmp/w", *flags], compile_cache=default)
    assert args.compile_cache is expected


def test_compile_cache_loads_a_program_compiled_by_another_function(tmp_path):
    """Two jitted functions with the same program (as two seeds of one model build): the second is a cache hit."""
    script = f"""
import jax, jax.numpy as jnp
from mmjax import cli
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
path = cli.enable_compile_cache({str(tmp_path)!r})
for _ in range(2):
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8)))
print(path, hits.count("/jax/compilation_cache/cache_hits"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    path, hits = result.stdout.split()
    assert path == str(tmp_path / cli.COMPILE_CACHE_DIR) and os.listdir(path)
    assert int(hits) == 1
