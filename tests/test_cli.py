"""The experiment launcher's start-up: the compile cache, the time limit and multi-process flags."""

import os
import subprocess
import sys

import pytest

from mmjax import cli


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
