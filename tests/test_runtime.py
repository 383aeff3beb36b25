"""The process set-up every command shares: the malloc re-exec that speeds up XLA on CPU, and XLA flags."""

import os
import subprocess
import sys

import pytest

from mmjax import runtime
from tests.conftest import REPO_ROOT


@pytest.fixture
def execve_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime, "_jax_started", lambda: False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(runtime.NO_REEXEC_ENV, raising=False)
    return calls


def test_reexecs_the_same_command_with_huge_pages(execve_calls):
    runtime.reexec_with_hugepages()
    [(path, argv, env)] = execve_calls
    assert path == sys.executable and argv == list(sys.orig_argv)
    assert env["GLIBC_TUNABLES"] == runtime.HUGEPAGES_TUNABLE


@pytest.mark.parametrize(
    "setting",
    [
        lambda mp: mp.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2"),  # The user's own choice wins.
        lambda mp: mp.setenv(runtime.NO_REEXEC_ENV, "1"),
        lambda mp: mp.setattr(runtime.platform, "system", lambda: "Darwin"),
        lambda mp: mp.setattr(runtime, "_jax_started", lambda: True),  # JAX running: too late to restart.
    ],
)
def test_no_reexec_when_it_would_be_wrong(execve_calls, monkeypatch, setting):
    setting(monkeypatch)
    runtime.reexec_with_hugepages()
    assert execve_calls == []


def test_xla_flags_are_appended_unless_the_user_set_them():
    assert runtime.xla_flags("", ("--a=1", "--b=2")) == "--a=1 --b=2"
    assert runtime.xla_flags("--b=3 --c", ("--a=1", "--b=2")) == "--b=3 --c --a=1"


def test_jax_started_follows_the_backends():
    code = ("import jax; from mmjax import runtime; before = runtime._jax_started(); jax.devices(); "
            "print(before, runtime._jax_started())")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO_ROOT), check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["False", "True"]
