"""Test set-up: 8 simulated CPU devices, so every sharding path runs on a laptop or CI."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # For subprocess runs.

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    # CI runs every test; `pytest -m "not slow"` skips these for a quicker local pass.
    config.addinivalue_line("markers", "slow: takes more than ~20 s")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def av_digits_dir(tmp_path_factory):
    """AV-Digits built once per test session into a temporary TFDS data dir."""
    from mmjax.data import av_digits

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    av_digits.build(data_dir)
    return data_dir


def tiny_overrides(data_dir: str, **extra) -> list[str]:
    """Command-line overrides that shrink the AV-Digits experiment to seconds (used by tests and CI)."""
    values = {
        "data.data_dir": data_dir,
        "data.batch_size": 16,
        "data.eval_batch_size": 64,
        "model.encoders.image.features": "(4,)",
        "model.encoders.image.width": 16,
        "model.encoders.audio.features": "(4, 8)",
        "model.encoders.audio.width": 16,
        "model.head.hidden": "(16,)",
        "train.num_steps": 6,
        "train.log_every_steps": 1,
        "train.eval_every_steps": 3,
        "checkpoint.every_steps": 2,
        "checkpoint.keep": 5,
        "optimizer.warmup_steps": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cpu_env(devices: int) -> dict:
    """The environment of a subprocess run on `devices` simulated CPU devices, with mmjax's XLA flags."""
    from mmjax import runtime

    flags = runtime.xla_flags(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


# Tiny trained workdirs (tests/trained_workdirs.py), each trained once per session, for predict, search and export.
@pytest.fixture(scope="session")
def classifier_workdir(tmp_path_factory):
    """(workdir, manifest, data dir): image + audio classifier (audio optional) on own files."""
    from tests import trained_workdirs

    return trained_workdirs.train_classifier(str(tmp_path_factory.mktemp("classifier")))


@pytest.fixture(scope="session")
def clip_workdir(tmp_path_factory):
    """(workdir, pairs manifest, data dir): CLIP on own image-caption pairs (40 steps: its text queries work)."""
    from tests import trained_workdirs

    return trained_workdirs.train_pairs(str(tmp_path_factory.mktemp("clip")), "dual", trained_workdirs.CLIP_OVERRIDES)


@pytest.fixture(scope="session")
def itm_workdir(tmp_path_factory):
    """(workdir, pairs manifest, data dir): the matching (ITM) model on own image-caption pairs."""
    from tests import trained_workdirs

    return trained_workdirs.train_pairs(str(tmp_path_factory.mktemp("itm")), "cross")


@pytest.fixture(scope="session")
def shapes_workdir(tmp_path_factory):
    """(workdir, TFDS data dir): CLIP on a tiny Shapes-Captions."""
    from tests import trained_workdirs

    return trained_workdirs.train_shapes(str(tmp_path_factory.mktemp("shapes")))
