"""The experiment launcher's start-up: the malloc re-exec that speeds up XLA on CPU."""

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
